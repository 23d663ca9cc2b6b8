"""Chat with a fine-tuned model in the terminal: each reply is printed token by token as it comes,
and the whole conversation so far is the next reply's prompt.

    python chat.py --ckpt_dir=out/sft                      # a conversation; /new starts over
    python chat.py --ckpt_dir=out/sft --prompt="Who speaks: 'To be, or not to be'?"  # one answer
    python chat.py --ckpt_dir=out/sft --temperature=0      # greedy: the same answer every time
    python chat.py --ckpt_dir=out/sft --questions=shakespeare  # score the held-out questions
    python chat.py --ckpt_dir=out --questions=shakespeare      # the base model, asked few-shot

The conversation is rendered as conversation.py says (render_prompt), and a reply ends at the
model's <|end|> (or <|endoftext|>), as transformers and llama.cpp render and stop with the exported
template. A model that was pretrained only, never fine-tuned with sft.py, continues text instead of
answering: chat.py says what to run first. --questions=shakespeare answers the held-out questions of
sft.py's default task (shakespeare.py) greedily and prints the exact-match accuracy of each kind and
the share of replies that ended by themselves; a base model gets them as a few-shot text prompt,
the best it can be asked, and its reply ends at the line break.
"""
import dataclasses
import sys
from dataclasses import dataclass

import torch

import shakespeare
from checkpoint import load_model
from configurator import UserError, load_config, run_cli
from conversation import END_OF_TURN, chat_token_ids, render_prompt, stop_ids
from dataset import read_meta
from hardware import pick_device
from model import check_sampling
from tokenizer import prompt_ids


@dataclass
class ChatConfig:
    ckpt_dir: str = "out/sft"  # the fine-tuning run (sft.py) whose newest checkpoint answers
    ckpt: str = ""  # a checkpoint to chat with instead of the newest one; "best": the lowest val
                    # loss
    prompt: str = ""  # answer this one message and exit (for scripts); "" = a conversation
    max_new_tokens: int = 256  # the longest reply, in tokens (most end sooner, at <|end|>)
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 0.9  # 1.0 = no nucleus cut
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N" or "mps"
    seed: int = 1337  # the random numbers sampling draws: the same seed gives the same replies
    questions: str = ""  # "shakespeare": score the held-out questions of sft.py's default task,
                         # greedily

    def __post_init__(self):
        try:
            check_sampling(self.temperature, self.top_k or None, self.top_p)
        except ValueError as e:
            raise UserError(f"{e}; fix --temperature, --top_k or --top_p") from None
        if self.questions not in ("", "shakespeare"):
            raise UserError("--questions must be shakespeare (the held-out questions of "
                            "sft.py's default task) or empty")


def check_fine_tuned(ckpt_dir: str, ckpt: dict, tokenizer):
    """A one-line error, naming the command to run, for a model that cannot hold a conversation:
    its vocabulary has no chat tokens, or it was never trained on conversations."""
    fix = (f"fine-tune it first: python sft.py --init_from={ckpt_dir} --data=chat.jsonl "
           f"--ckpt_dir={ckpt_dir.rstrip('/')}/sft")
    try:
        chat_token_ids(tokenizer)
    except UserError:
        raise UserError(f"{ckpt_dir} holds a base model whose tokenizer has no chat tokens; "
                        f"{fix}") from None
    if "row_tokens" not in read_meta(ckpt["config"]["dataset_dir"]):
        raise UserError(f"{ckpt_dir} holds a base model, pretrained on text but never on "
                        f"conversations; {fix}")


def generated(model, tokenizer, prompt: list[int], cfg: ChatConfig, device: str, stops: list[int],
              echo: bool) -> tuple[str, int | None]:
    """The text generated after `prompt` up to a stop id (printed as it comes with `echo`), and the
    stop id it ended at (None: it ran out of max_new_tokens)."""
    ids, printed = [], ""
    for token in model.generate_tokens(torch.tensor([prompt], device=device), cfg.max_new_tokens,
                                       cfg.temperature, cfg.top_k or None,
                                       cfg.top_p if cfg.top_p < 1 else None, eos_token=stops):
        if token.item() in stops:
            return tokenizer.decode(ids), token.item()
        ids.append(token.item())
        text = tokenizer.decode(ids)
        # a character split over two byte-level tokens waits for its second half
        if echo and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    return tokenizer.decode(ids), None


def reply(model, tokenizer, history: list[dict], cfg: ChatConfig, device: str) -> str:
    """The assistant's next turn after `history`, printed as it is generated; returns its text."""
    return generated(model, tokenizer, render_prompt(tokenizer, history), cfg, device,
                     stop_ids(tokenizer), echo=True)[0]


def score_questions(model, tokenizer, cfg: ChatConfig, device: str, chat: bool) -> dict:
    """Exact match of each kind of question and the share of replies that ended by themselves
    (at <|end|>, or for a base model at a line break), over shakespeare.py's held-out questions."""
    examples = shakespeare.questions("train")
    # a base model's answer ends with its line: at any token that holds a line break
    line_ends = [i for i in range(tokenizer.eot_id) if "\n" in tokenizer.decode([i])]
    results = {}
    for q in shakespeare.questions("eval"):
        if chat:
            prompt = render_prompt(tokenizer, [{"role": "user", "content": q["question"]}])
            text, stop = generated(model, tokenizer, prompt, cfg, device, stop_ids(tokenizer),
                                   echo=False)
            ended = stop == tokenizer.special_tokens.get(END_OF_TURN)
        else:  # three solved questions of the same kind, then this one
            shots = [e for e in examples if e["kind"] == q["kind"]][:3]
            prompt = prompt_ids(tokenizer, shakespeare.few_shot_prompt(shots, q["question"]))
            text, stop = generated(model, tokenizer, prompt, cfg, device,
                                   [*line_ends, tokenizer.eot_id], echo=False)
            ended = stop in line_ends
            text = text + tokenizer.decode([stop]).split("\n")[0] if ended else text
        results.setdefault(q["kind"], []).append((shakespeare.exact_match(text, q["answer"]),
                                                  ended, text))
    return results


def print_scores(results: dict, chat: bool):
    replies = [r for kind in results.values() for r in kind]
    for kind, rows in results.items():
        print(f"{kind}: exact match {sum(r[0] for r in rows) / len(rows):.3f} ({len(rows)} "
              "questions)")
    print(f"replies that ended at {'<|end|>' if chat else 'a line break'}: "
          f"{sum(r[1] for r in replies) / len(replies):.3f}")


def converse(model, tokenizer, cfg: ChatConfig, device: str):
    """The terminal conversation: a line in, a reply out, until /quit or end of input."""
    print("/new starts a new conversation, /quit (or Ctrl-D) ends")
    history = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line == "/quit":
            return
        if line == "/new":
            history = []
            print("(a new conversation)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        history.append({"role": "assistant", "content": reply(model, tokenizer, history, cfg,
                                                              device)})
        print()


def main(argv: list[str]):
    cfg = load_config(argv, ChatConfig)
    path, ckpt, model, tokenizer = load_model(cfg.ckpt_dir, cfg.ckpt, purpose="chatting with")
    device = pick_device(cfg.device)
    model.to(device)
    torch.manual_seed(cfg.seed)
    if cfg.questions:  # greedy: a score that does not depend on the seed
        chat = "row_tokens" in read_meta(ckpt["config"]["dataset_dir"])
        greedy = dataclasses.replace(cfg, temperature=0.0)
        print_scores(score_questions(model, tokenizer, greedy, device, chat), chat)
        return
    check_fine_tuned(cfg.ckpt_dir, ckpt, tokenizer)
    if cfg.prompt:
        reply(model, tokenizer, [{"role": "user", "content": cfg.prompt}], cfg, device)
        print()
        return
    print(f"# {path} (update {ckpt['step']}, {ckpt['tokens']:,} tokens)")
    converse(model, tokenizer, cfg, device)


if __name__ == "__main__":
    run_cli(main)
