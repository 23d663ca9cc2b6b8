"""sft.py: conversations become a fine-tuning dataset whose batches learn the assistant's tokens
only; a batch with nothing to learn is a zero loss, never NaN; a run resumes bitwise; a model
pretrained without the chat tokens grows rows for them; bad input is one line and leaves files
alone."""
import json
import os
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch
from helpers import TINY, assert_same_weights, final_weights, one_line_error, run

import sft
from checkpoint import checkpoint_paths
from configurator import UserError, load_config
from conversation import chat_token_ids, render_conversation
from dataset import DatasetLoader, read_meta
from model import IGNORE, ModelConfig, Transformer
from pretrained import init_architecture, load_init_weights
from tokenizer import EOT, load_tokenizer
from train import TrainConfig, train_update

QUESTIONS = [("Who wrote Hamlet?", "Shakespeare."), ("Which play has Puck?", "A Midsummer "
             "Night's Dream."), ("Who is Romeo's love?", "Juliet.")]


def conversation(i: int) -> list[dict]:
    """Two questions and their answers, varied by i."""
    (q1, a1), (q2, a2) = QUESTIONS[i % 3], QUESTIONS[(i + 1) % 3]
    return [{"role": "system", "content": f"Answer briefly ({i})."},
            {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
            {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]


def write_chat(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> str:
    return write_chat(tmp_path_factory.mktemp("chat") / "chat.jsonl",
                      [{"messages": conversation(i)} for i in range(20)]
                      + [{"instruction": "Name a play.", "input": "", "output": "Hamlet."}])


def sft_args(base, data, ckpt_dir, *more) -> list[str]:
    # 6 updates, each of 2 micro-steps of one 64-token row; a checkpoint every 2
    return [*TINY, "--max_seq_len=64", "--batch_size=1", f"--init_from={base}", f"--data={data}",
            f"--ckpt_dir={ckpt_dir}",
            "--training_tokens=768", "--token_ckpt=256", "--eval_interval=2", "--eval_tokens=128",
            "--keep_ckpts=5", *more]


@pytest.fixture(scope="module")
def sft_run(tiny_run, chat_file, tmp_path_factory):
    """The tiny model fine-tuned on chat_file: six updates, a checkpoint every two, its stdout in
    stdout.txt."""
    ckpt_dir = tmp_path_factory.mktemp("sft") / "run"
    result = run("sft.py", *sft_args(tiny_run, chat_file, ckpt_dir))
    (ckpt_dir / "stdout.txt").write_text(result.stdout)
    return ckpt_dir


def test_batches_learn_exactly_the_assistants_tokens(tiny_run, chat_file, tmp_path):
    opts = load_config([f"--data={chat_file}"], sft.SFTOptions)
    cfg = load_config(["--max_seq_len=64", f"--init_from={tiny_run}",
                       f"--ckpt_dir={tmp_path}"], TrainConfig)
    data = sft.fine_tuning_dataset(opts, cfg)
    meta, tokenizer = read_meta(data), load_tokenizer(data)
    # every 10th conversation is validation: 2 of 21
    rendered = [render_conversation(tokenizer, conversation(i)) for i in range(20)]
    alpaca = render_conversation(tokenizer, [{"role": "user", "content": "Name a play."},
                                             {"role": "assistant", "content": "Hamlet."}])
    train = [r for i, r in enumerate([*rendered, alpaca]) if i % 10 != 9]
    random.Random(cfg.seed).shuffle(train)  # in a random order, the same for the same --seed
    loader = DatasetLoader(data, "train", 1, 64, meta=meta)
    rows = len(np.load(data / "train_000000.npy")) // 64
    learned, starts = [], []
    for _ in range(rows):
        x, y = loader.next_batch()
        learned += y[y != IGNORE].tolist()
        starts.append(x[0, 0].item())
    # each row starts a conversation (after <|endoftext|>); whole conversations, none split
    assert set(starts) == {tokenizer.eot_id}
    expected = [i for ids, mask in train for i, m in zip(ids, mask, strict=True) if m]
    assert learned == expected
    assert meta["train_tokens"] == len(expected)  # the tokens the loss is over
    end = chat_token_ids(tokenizer)["<|end|>"]
    assert learned.count(end) == 2 * (len(train) - 1) + 1  # every answer ends with <|end|>


def test_a_batch_with_nothing_to_learn_is_a_zero_loss_not_nan():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, max_seq_len=8, n_embd=32, n_heads=2,
                                    n_kv_heads=2, n_layers=1))
    x = torch.randint(0, 64, (2, 8))
    loss = model(x, torch.full((2, 8), IGNORE))[1]
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    class Masked:  # two micro-batches: nothing to learn, then one learned token
        batches = [(x, torch.full((2, 8), IGNORE)),
                   (x, torch.full((2, 8), IGNORE).index_put_((torch.tensor([0]),
                                                              torch.tensor([3])),
                                                             torch.tensor(5)))]

        def next_batch(self):
            return self.batches.pop(0)

    cfg = TrainConfig(optimizer="adamw")
    optimizer = torch.optim.AdamW(model.parameters())
    loss, grad_norm = train_update(model, optimizer, Masked(), 2, cfg, "cpu", torch.float32)
    assert np.isfinite(loss) and np.isfinite(grad_norm) and loss > 0


def test_an_sft_run_resumes_bitwise(sft_run, tiny_run, chat_file, tmp_path):
    straight, resumed = sft_run, tmp_path / "resumed"
    assert "21 conversations in" in (straight / "stdout.txt").read_text()
    assert [p.name for p in checkpoint_paths(straight)] == [f"ckpt_0000000{i}.pt"
                                                             for i in (2, 4, 6)]
    log = (straight / "log.csv").read_text().splitlines()
    assert len(log) == 7 and log[-1].split(",")[9] != ""  # masked validation loss at the end
    resumed.mkdir()
    for name in ("ckpt_00000004.pt", "log.csv"):
        shutil.copy(straight / name, resumed)
    shutil.copytree(straight / "data", resumed / "data")
    out = run("sft.py", *sft_args(tiny_run, chat_file, resumed), "--load_ckpt=True").stdout
    assert "at update 4" in out
    assert_same_weights(final_weights(straight), final_weights(resumed))


def test_a_model_pretrained_without_chat_tokens_grows_rows_for_them(shakespeare_dir, tmp_path):
    """A dataset prepared before the chat tokens existed: <|endoftext|> is its last id (8187), and
    sft.py's tokenizer adds the four chat tokens after it."""
    old = tmp_path / "old"
    old.mkdir()
    for path in shakespeare_dir.iterdir():
        if path.suffix in (".npy", ".tiktoken"):
            (old / path.name).symlink_to(path)
    meta = read_meta(shakespeare_dir)
    (old / "meta.json").write_text(json.dumps({**meta, "vocab_size": 8188,
                                               "special_tokens": {EOT: 8187}}))
    run("train.py", *TINY, f"--dataset_dir={old}", f"--ckpt_dir={tmp_path / 'base'}",
        "--training_tokens=256")
    grown = sft.with_chat_tokens(read_meta(old), str(old))
    assert grown["vocab_size"] == 8192 and list(grown["special_tokens"].values()) == [8187, 8188,
                                                                                     8189, 8190,
                                                                                     8191]
    cfg, rows = init_architecture(load_config([f"--init_from={tmp_path / 'base'}"], TrainConfig),
                                  8192)
    assert (cfg.n_layers, cfg.n_embd, rows) == (1, 32, 8192)
    model = Transformer(cfg.model_config(rows))
    note = load_init_weights(model, cfg.init_from)
    assert "ids 8188 to 8191 get new rows" in note
    trained = final_weights(tmp_path / "base")
    for name in ("tok_embeddings.weight", "output.weight"):
        weight = model.state_dict()[name]
        assert torch.equal(weight[:8188], trained[name])
        assert 0.01 < weight[8188:].std().item() < 0.03  # drawn as model.py initialises a row


def bad_rows(case: str) -> list:
    good = {"messages": conversation(0)}
    return {
        "no messages": [good, {"prompt": "hi"}],
        "unknown role": [good, {"messages": [{"role": "tool", "content": "x"}]}],
        "empty answer": [good, {"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": ""}]}],
        "only over-long": [{"messages": [{"role": "user", "content": "word " * 200},
                                         {"role": "assistant", "content": "Yes."}]}] * 3,
    }[case]


@pytest.mark.parametrize("case, message", [
    ("no messages", ':2: a row needs "messages"'),
    ("unknown role", ":2: unknown role 'tool'"),
    ("empty answer", ":2: an assistant turn is empty"),
    ("only over-long", "every conversation of .* is longer than max_seq_len=64"),
])
def test_bad_input_is_one_line_and_leaves_the_files_alone(case, message, tiny_run, tmp_path):
    data = write_chat(tmp_path / "chat.jsonl", bad_rows(case))
    ckpt_dir = tmp_path / "sft"
    ckpt_dir.mkdir()
    (ckpt_dir / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=message):
        sft.main(sft_args(tiny_run, data, ckpt_dir))
    assert [p.name for p in ckpt_dir.iterdir()] == ["notes.txt"]
    assert (ckpt_dir / "notes.txt").read_text() == "mine"


def test_a_tokenizer_json_without_chat_tokens_is_refused_in_one_line(tmp_path):
    meta = {"tokenizer": "hf", "pattern": None, "vocab_size": 100, "special_tokens": {EOT: 99}}
    with pytest.raises(UserError, match="has no chat tokens .* start from the ckpt_dir"):
        sft.with_chat_tokens(meta, "some/model")


# --------------------------------------------------------------------------------------------------
# chat.py
def test_chat_answers_one_prompt_and_a_base_model_is_told_what_to_run(sft_run, tiny_run):
    out = run("chat.py", f"--ckpt_dir={sft_run}", "--prompt=Who wrote Hamlet?", "--temperature=0",
              "--max_new_tokens=8")
    assert out.stdout.strip() and out.stderr == ""
    result = run("chat.py", f"--ckpt_dir={tiny_run}", "--prompt=hi", check=False)
    one_line_error(result, "base model", f"python sft.py --init_from={tiny_run}")


class Scripted:
    """A stand-in model whose generate_tokens yields the given ids, recording each prompt."""

    def __init__(self, ids):
        self.ids, self.prompts = ids, []

    def generate_tokens(self, prompt, *args, **kwargs):
        self.prompts.append(prompt[0].tolist())
        yield from (torch.tensor([[i]]) for i in self.ids)


def test_a_reply_ends_at_the_end_of_turn_and_new_starts_over(sft_run, capsys, monkeypatch):
    import chat

    tokenizer = load_tokenizer(sft_run / "data")
    end = chat_token_ids(tokenizer)["<|end|>"]
    words = tokenizer.encode(" Juliet.")
    model = Scripted([*words, end, *tokenizer.encode(" never")])
    cfg = chat.ChatConfig()
    history = [{"role": "user", "content": "Who?"}]
    assert chat.reply(model, tokenizer, history, cfg, "cpu") == " Juliet."
    assert capsys.readouterr().out == " Juliet."
    # two questions, /new, a third: the third prompt holds the third question alone
    lines = iter(["Who?", "And?", "/new", "Again?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    model.prompts = []
    chat.converse(model, tokenizer, cfg, "cpu")
    second, third = model.prompts[1], model.prompts[2]
    assert tokenizer.decode(second).count("<|user|>") == 2
    assert tokenizer.decode(third) == "<|endoftext|><|user|>Again?<|end|><|assistant|>"


# --------------------------------------------------------------------------------------------------
# The template in the exports: transformers and llama.cpp render and stop as chat.py does
def chain_model(sft_run, ckpt_dir, answer: str) -> list[int]:
    """A checkpoint of sft_run's shape that answers any question with `answer`, then <|end|>:
    its blocks add nothing (zero output projections), so each next token depends on the current
    one alone, and the embedding and output rows link <|assistant|> -> answer's tokens -> <|end|>.
    Returns that chain of ids."""
    state = torch.load(checkpoint_paths(sft_run)[-1], weights_only=True)
    tokenizer = load_tokenizer(state["config"]["dataset_dir"])
    special = chat_token_ids(tokenizer)
    chain = [special["<|assistant|>"], *tokenizer.encode(answer), special["<|end|>"]]
    weights = state["model"]
    width = weights["tok_embeddings.weight"].shape[1]
    basis = torch.eye(width) * width ** 0.5  # unit RMS: RMSNorm leaves them as they are
    for name, tensor in weights.items():
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            tensor.zero_()
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
    weights["tok_embeddings.weight"][:] = basis[-1]
    weights["output.weight"].zero_()
    for i, token in enumerate(chain[:-1]):
        weights["tok_embeddings.weight"][token] = basis[i]
        weights["output.weight"][chain[i + 1]] = 10 * basis[i]
    ckpt_dir.mkdir()
    torch.save(state, ckpt_dir / "ckpt_00000001.pt")
    return chain


QUESTION = [{"role": "user", "content": "Who is Romeo's love?"}]


def test_chat_py_and_transformers_with_the_exported_template_stop_at_the_same_token(
        sft_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import chat
    import export

    chain = chain_model(sft_run, tmp_path / "chain", " Juliet.")
    chat.main([f"--ckpt_dir={tmp_path / 'chain'}", f"--prompt={QUESTION[0]['content']}",
               "--temperature=0"])
    assert capsys.readouterr().out == " Juliet.\n"
    export.main([f"--ckpt_dir={tmp_path / 'chain'}", f"--out_dir={tmp_path / 'hf'}"])
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)["input_ids"]
    assert prompt == chat.render_prompt(load_tokenizer(sft_run / "data"), QUESTION)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    # the answer and <|end|>, where generation_config.json's eos_token_id stops it
    assert generated[0, len(prompt):].tolist() == chain[1:]


LLAMA_CPP_CHAT = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
out = llm.create_chat_completion(messages=json.loads(sys.argv[2]), temperature=0, max_tokens=20)
print(json.dumps({"content": out["choices"][0]["message"]["content"],
                  "finish_reason": out["choices"][0]["finish_reason"],
                  "prompt_tokens": out["usage"]["prompt_tokens"]}))
"""


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_PYTHON"),
                    reason="set LLAMA_CPP_PYTHON to a Python with llama-cpp-python installed")
def test_llama_cpp_chat_completion_renders_and_stops_as_chat_py(sft_run, tmp_path):
    import chat

    chain_model(sft_run, tmp_path / "chain", " Juliet.")
    run("export.py", f"--ckpt_dir={tmp_path / 'chain'}", "--format=gguf",
        f"--out={tmp_path / 'chain.gguf'}")
    result = subprocess.run([os.environ["LLAMA_CPP_PYTHON"], "-c", LLAMA_CPP_CHAT,
                             str(tmp_path / "chain.gguf"), json.dumps(QUESTION)],
                            capture_output=True, text=True, check=True, cwd=tmp_path)
    reply = json.loads(result.stdout)
    assert (reply["content"], reply["finish_reason"]) == (" Juliet.", "stop")
    # the prompt was the template's ids, no second <|endoftext|> in front
    assert reply["prompt_tokens"] == len(chat.render_prompt(load_tokenizer(sft_run / "data"),
                                                            QUESTION))


# --------------------------------------------------------------------------------------------------
# The offline task
def test_the_held_out_questions_ask_about_lines_training_never_asks_about():
    import shakespeare

    train, held_out = shakespeare.questions("train"), shakespeare.questions("eval")
    assert [len([q for q in split if q["kind"] == kind]) for split in (train, held_out)
            for kind in ("play", "speaker")] == [2000, 2000, 100, 100]

    def line(q):
        return q["question"].split(': "', 1)[1]

    assert not {line(q) for q in train} & {line(q) for q in held_out}
    hamlet = [q for q in held_out if q["answer"] == "Hamlet"]
    assert hamlet and all(q["kind"] == "play" for q in hamlet)
    assert shakespeare.exact_match(" hamlet.", "Hamlet") and not shakespeare.exact_match(
        "Hamlet, Prince", "Hamlet")
    assert shakespeare.training_rows()[0]["messages"][1]["content"] == train[0]["answer"]


def test_questions_are_scored_by_exact_match_and_a_reply_that_ends_by_itself(sft_run):
    """chat.py --questions=shakespeare on a stand-in model that always answers "Hamlet": as a chat
    model (then <|end|>) and as a base model (then a line break)."""
    import chat
    import shakespeare

    tokenizer = load_tokenizer(sft_run / "data")
    held_out = shakespeare.questions("eval")
    # the prince answers the speaker questions about his own lines: case does not count
    hamlet = {kind: sum(q["answer"].lower() == "hamlet" for q in held_out if q["kind"] == kind)
              for kind in ("play", "speaker")}
    cfg = chat.ChatConfig(temperature=0)
    end = chat_token_ids(tokenizer)["<|end|>"]
    for ids, as_chat in ((tokenizer.encode(" Hamlet") + [end], True),
                         (tokenizer.encode(" Hamlet\nQ:"), False)):
        results = chat.score_questions(Scripted(ids), tokenizer, cfg, "cpu", as_chat)
        assert {kind: sum(r[0] for r in rows) for kind, rows in results.items()} == hamlet
        assert hamlet["play"] > 0
        assert all(r[1] for rows in results.values() for r in rows)  # every reply ended
