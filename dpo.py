"""Direct preference optimisation (DPO, Rafailov et al. 2023): teach a chat model which of two
answers people prefer, with the model it starts from frozen as the reference.

    python dpo.py --init_from=out/sft --data=pairs.jsonl --ckpt_dir=out/dpo
    python dpo.py --init_from=out/sft --ckpt_dir=out/dpo    # offline default: pairs from the task
    python dpo.py --init_from=out/sft --hf_dataset=NAME   # online: a hub dataset of such rows
    torchrun --standalone --nproc_per_node=8 dpo.py --init_from=out/sft --data=pairs.jsonl

A pair is a prompt, a chosen answer y_c and a rejected one y_r: one jsonl row with "prompt",
"chosen" and "rejected", each a string or a list of messages (TRL's convention). The policy pi is
the model being trained; the reference pi_ref is the same model as it was before the first update.
The loss of a pair is

    -log sigmoid(beta * ((log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))))

where log pi(y) is the log-probability of the answer's tokens after the prompt, rendered in the
chat format of conversation.py (the prompt's tokens never count). beta * (log pi(y) - log
pi_ref(y)) is the answer's implicit reward: how much more likely the policy makes it than the
reference did. The loss asks only that the chosen answer's reward exceed the rejected one's; beta
sets how much a given margin is worth, and so how far the policy is pushed from the reference for
it. Before the first update pi = pi_ref, every reward is 0 and the loss is -log sigmoid(0) = ln 2.

Without --data the pairs are the offline default: the starting model is asked shakespeare.py's
questions, and each right answer is paired with a wrong one the model gives itself (own_mistakes);
the task's exact match on its held-out questions is printed before and after.

What the run keeps of train.py: the settings (an update is pairs_per_update pairs, the length is
--passes over the training pairs), gradient accumulation, DDP, fp16 loss scaling, clipping, the
schedule, checkpoints and resume, the --max_minutes budget and the signal that stops a run cleanly.
log.csv has train.py's columns (train_loss and val_loss are DPO losses) and the rewards of the
update's pairs and of the validation pairs (training_log.DPO_LOG_FORMAT).

Reading order: the pairs (a jsonl row -> ids and the mask of the answer's tokens) -> the
log-probability of an answer, summed or averaged per token -> the loss and the rewards -> training
(PairLoader, DPOObjective) -> the run (DPOConfig, the starting model, the pairs given or the
offline default's, train_dpo)."""
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from budget import BUDGET_PROBE_UPDATES, replans_length, updates_in_budget
from checkpoint import (
    SPACE_FIX,
    checkpoint_paths,
    checkpoint_state,
    load_model,
    lock_ckpt_dir,
    save_checkpoint,
)
from configurator import UserError, run_cli
from conversation import (
    chat_token_ids,
    check_conversation,
    render_conversation,
    render_prompt,
    stop_ids,
)
from files import write_file
from hardware import autocast, choose_speed
from model import ModelConfig
from preemption import StopRequest
from pretrained import is_hf_directory
from schedule import Scheduler
from shakespeare import exact_match, questions
from train import (
    TrainConfig,
    TrainingDiverged,
    checkpoint_to_resume,
    main,
    make_optimizer,
    make_scaler,
    resume,
    train_update,
    update_timer,
    wrap_model,
)
from training_log import DPO_LOG_FORMAT, REWARD_COLUMNS, append_log, plot_log, start_log

# F.cross_entropy's ignore_index: a target that is not one of the answer's tokens
IGNORE = -100
REDUCTIONS = ("sum", "mean")


# --------------------------------------------------------------------------------------------------
# The pairs.
def messages_of(row: dict, field: str, where: str, prompt: list[dict] | None = None) -> list[dict]:
    """A pair's field as messages: a string is one turn, the user's for the prompt and the
    assistant's for an answer. An answer is what the assistant says, so its turns are all
    assistant turns; many hub datasets write each answer as the whole conversation, `prompt`'s
    turns first, and those are left to the prompt."""
    value = row.get(field)
    role = "user" if field == "prompt" else "assistant"
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    elif not isinstance(value, list):
        raise UserError(f"{where}: a pair needs \"prompt\", \"chosen\" and \"rejected\", each a "
                        f"string or a list of messages; {field!r} is "
                        + ("missing" if value is None else f"a {type(value).__name__}"))
    if prompt and value[:len(prompt)] == prompt:
        value = value[len(prompt):]
    messages = check_conversation(value, f"{where} ({field})")
    if field != "prompt" and any(m["role"] != "assistant" for m in messages):
        raise UserError(f"{where} ({field}): an answer's messages must have the role "
                        "\"assistant\"; the question belongs in \"prompt\"")
    return messages


def pair_messages(row, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) of one jsonl row, as messages; a UserError naming `where` if it
    is not a pair."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a pair is a JSON object with \"prompt\", \"chosen\" and "
                        "\"rejected\"")
    prompt = messages_of(row, "prompt", where)
    chosen, rejected = (messages_of(row, field, where, prompt) for field in ("chosen", "rejected"))
    if chosen == rejected:
        raise UserError(f"{where}: \"chosen\" and \"rejected\" are the same answer; a pair must "
                        "hold two different answers, the better one as \"chosen\"")
    return prompt, chosen, rejected


def render_answer(tokenizer, prompt: list[dict], answer: list[dict]) -> tuple[list[int], list[int]]:
    """ids of the prompt followed by the answer, and their mask: 1 on the answer's tokens that
    count (what the assistant says and its end of turn, as supervised fine-tuning learns them),
    0 on the prompt, which is the same in both answers and tells nothing about which is better."""
    prompt_len = len(render_conversation(tokenizer, prompt)[0])
    ids, mask = render_conversation(tokenizer, prompt + answer)
    return ids, [0] * prompt_len + mask[prompt_len:]


def pair_from_row(tokenizer, row, where: str) -> tuple[tuple, tuple]:
    """One jsonl row as ((chosen ids, mask), (rejected ids, mask)); a UserError naming `where` if
    it is not a pair."""
    prompt, chosen, rejected = pair_messages(row, where)
    return render_answer(tokenizer, prompt, chosen), render_answer(tokenizer, prompt, rejected)


# --------------------------------------------------------------------------------------------------
# Log-probabilities of the answers, and the loss.
def collate(pairs: list[tuple[tuple, tuple]], pad_id: int, device) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """A micro-batch of pairs as one batch of sequences, the chosen answers first and then the
    rejected ones (TRL's order): inputs x and next-token targets y, right-padded to the longest,
    y = IGNORE wherever the target is not one of the answer's tokens (the prompt, the padding).
    Padding on the right leaves every real position as it was: a causal model never looks ahead."""
    rows = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]
    length = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), length), pad_id, dtype=torch.long)
    y = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:],
                                                                            strict=True)])
    return x.to(device), y.to(device)


def answer_logps(model, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """log pi(answer | prompt) of each sequence: its answer tokens' log-probabilities summed (the
    paper's, a sequence's log-likelihood) or averaged over them ("mean", SimpleLLaMA's). A sum
    grows with the answer's length, so a long answer moves its reward further for the same change
    per token; the mean weighs every answer alike, and so needs a larger beta for the same push."""
    logits = model(x)[0]
    # in fp32 even under bf16 autocast, like model.py's loss; the padding and the prompt give 0
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=IGNORE,
                                   reduction="none")
    total = token_logps.sum(dim=1)
    return total if reduction == "sum" else total / (y != IGNORE).sum(dim=1)


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards) of a micro-batch from the policy's and the
    reference's log-probabilities of its answers (collate's order: chosen, then rejected)."""
    chosen, rejected = (beta * (logps - ref_logps)).chunk(2)
    # logsigmoid, not log(sigmoid(.)): a large margin would round sigmoid to 1 and its log to 0
    # with no gradient left, and a large negative one to log(0)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """What TRL logs for a set of pairs, from their rewards: the loss, each answer's mean reward,
    the mean margin and the preference accuracy (the share of pairs whose chosen answer has the
    higher reward)."""
    margin = chosen - rejected
    return {"loss": -F.logsigmoid(margin).mean().item(), "rewards_chosen": chosen.mean().item(),
            "rewards_rejected": rejected.mean().item(), "rewards_margin": margin.mean().item(),
            "rewards_accuracy": (margin > 0).float().mean().item()}


@torch.no_grad()
def pair_logps(model, pairs: list, batch_size: int, pad_id: int, reduction: str, device: str,
               dtype: torch.dtype) -> torch.Tensor:
    """(len(pairs), 2) log-probabilities of each pair's chosen and rejected answer, in eval mode
    (no dropout): the reference's, computed once before training (the reference never changes, so
    it need not stay in memory beside the policy), or the policy's when it is evaluated."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        x, y = collate(pairs[start:start + batch_size], pad_id, device)
        with autocast(device, dtype):
            out.append(answer_logps(model, x, y, reduction).view(2, -1).T)
    model.train(was_training)
    return torch.cat(out).cpu()


# --------------------------------------------------------------------------------------------------
# Training: micro-batches of pairs, and the policy with DPO's loss as its forward.
class PairLoader:
    """Micro-batches of training pairs for one rank, with their reference log-probabilities, in a
    new order each pass. With W ranks each micro-step takes W * batch_size pairs, rank r the r-th
    batch_size of them; a pass ends when fewer than that are left. The position (pairs taken in
    this pass, passes) is all the state there is: it counts pairs, so a run resumed on another
    number of ranks goes on from the same pair."""

    def __init__(self, pairs: list, ref_logps: torch.Tensor, batch_size: int, rank: int,
                 world_size: int, pad_id: int, device: str, seed: int):
        if len(pairs) < batch_size * world_size:
            raise UserError(f"{len(pairs)} training pairs cannot fill one micro-step of "
                            f"batch_size*world_size = {batch_size * world_size}; lower batch_size "
                            "or add pairs")
        self.pairs, self.ref_logps, self.pad_id, self.device = pairs, ref_logps, pad_id, device
        self.B, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.position, self.passes = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x, (y, the reference's log-probabilities): what DPOObjective's forward takes."""
        if self.position + self.B * self.world_size > len(self.pairs):
            self.position, self.passes = 0, self.passes + 1
        # the same order on every rank: each pass is shuffled with its own seed
        order = torch.randperm(len(self.pairs),
                               generator=torch.Generator().manual_seed(self.seed + self.passes))
        start = self.position + self.rank * self.B
        taken = order[start:start + self.B].tolist()
        self.position += self.B * self.world_size
        x, y = collate([self.pairs[i] for i in taken], self.pad_id, self.device)
        # chosen then rejected, as collate orders the sequences
        return x, (y, self.ref_logps[taken].T.reshape(-1).to(self.device))

    def state_dict(self) -> dict:
        return {"position": self.position, "passes": self.passes}

    def load_state_dict(self, state: dict):
        self.position, self.passes = state["position"], state["passes"]


class DPOObjective(torch.nn.Module):
    """The policy, with DPO's loss as what its forward returns: train.py's train_update computes a
    micro-step's loss as model(x, y)[1], so with this in the model's place it accumulates gradients,
    synchronises DDP's ranks, scales fp16 losses and clips exactly as pretraining does. Its
    parameters are the policy's. The rewards of the micro-steps since the last call of
    take_rewards() are kept for the log."""

    def __init__(self, policy, beta: float, reduction: str):
        super().__init__()
        self.policy, self.beta, self.reduction = policy, beta, reduction
        self.rewards = []

    def forward(self, x, batch):
        y, ref_logps = batch
        loss, chosen, rejected = dpo_loss(answer_logps(self.policy, x, y, self.reduction),
                                          ref_logps, self.beta)
        self.rewards.append(torch.stack([chosen, rejected]))
        return None, loss

    def take_rewards(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards of every pair trained on since the last call, on all ranks."""
        rewards = torch.cat(self.rewards, dim=1)
        self.rewards = []
        if dist.is_initialized():
            gathered = [torch.empty_like(rewards) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, rewards)
            rewards = torch.cat(gathered, dim=1)
        return rewards[0], rewards[1]


def evaluate_pairs(policy, pairs: list, ref_logps: torch.Tensor, cfg, pad_id: int, device: str,
                   dtype: torch.dtype) -> dict[str, float]:
    """preference_metrics of the validation pairs: the same pairs every time, never trained on."""
    logps = pair_logps(policy, pairs, cfg.batch_size, pad_id, cfg.reduction, device, dtype)
    rewards = cfg.beta * (logps - ref_logps)
    return preference_metrics(rewards[:, 0], rewards[:, 1])


# --------------------------------------------------------------------------------------------------
# The run.
@dataclass
class DPOConfig(TrainConfig):
    """dpo.py's own settings; the rest are train.py's, with fine-tuning's defaults."""
    init_from: str = "out/sft"  # the model to start from and the reference: a run's ckpt_dir
                                # (sft.py's)
    ckpt_dir: str = "out/dpo"  # checkpoints, the CSV log and the loss plot go here
    data: str = ""  # a jsonl file of pairs (prompt, chosen, rejected); "" = the offline default
    hf_dataset: str = ""  # a Hugging Face dataset of pairs instead (online): its train split
    val_fraction: float = 0.1  # --data/--hf_dataset: the share of prompts held out for validation
    reduction: str = "sum"  # an answer's log-probability: "sum" over its tokens (the paper) or
                            # "mean" per token (SimpleLLaMA)
    beta: float = 0.0  # how far the policy may move from the reference; 0 = the reduction's own
                       # (0.1 for sum, 0.5 for mean)
    pairs_per_update: int = 32  # pairs per optimizer update, summed over micro-steps and ranks
    passes: float = 2.0  # passes over the training pairs: the run's length
    batch_size: int = 8  # pairs per micro-step on each rank (twice as many sequences)
    optimizer: str = "adamw"  # fine-tuning moves the weights a little: AdamW, as TRL's trainer
    max_lr: float = 5e-5  # AdamW's peak learning rate
    min_lr: float = 5e-6  # the learning rate the decay ends at
    warmup_iterations: int = 5  # updates of linear warm-up
    weight_decay: float = 0.0  # no pull towards zero: the reference, not zero, is where it starts
    eval_interval: int = 10  # evaluate the validation pairs every this many updates (and at the
                             # end)

    def __post_init__(self):
        if "tokens_per_update" in self.user_set or "training_tokens" in self.user_set:
            raise UserError("dpo.py counts in pairs: set --pairs_per_update and --passes instead "
                            "of tokens_per_update and training_tokens")
        if self.reduction not in REDUCTIONS:
            raise UserError("--reduction must be sum or mean")
        if self.dropout or self.fsdp:
            raise UserError("dpo.py compares the policy with its reference exactly, so it runs "
                            "without dropout and with DDP, not FSDP; drop --dropout and --fsdp")
        self.beta = self.beta or {"sum": 0.1, "mean": 0.5}[self.reduction]
        # train.py's functions count an update in tokens: pairs, at most max_seq_len tokens each
        self.tokens_per_update = self.training_tokens = self.pairs_per_update * self.max_seq_len
        super().__post_init__()


def starting_model(cfg: DPOConfig) -> tuple[object, object, DPOConfig, str]:
    """(policy, tokenizer, cfg, tokenizer fingerprint) from --init_from, a checkpoint directory.
    The run's config takes the model's architecture and the dataset its tokenizer belongs to, so
    that checkpoints record them and sample.py, chat.py and export.py read the DPO model as they
    read the one it started from. max_seq_len may be set lower, to drop long pairs."""
    if is_hf_directory(cfg.init_from):
        raise UserError(f"{cfg.init_from} is a Hugging Face model directory; dpo.py starts from "
                        "a run's ckpt_dir: fine-tune it with sft.py first (--init_from="
                        f"{cfg.init_from}) and pass that run's --ckpt_dir")
    if not checkpoint_paths(cfg.init_from):
        raise UserError(f"--init_from={cfg.init_from} holds no checkpoint; fine-tune a model with "
                        "sft.py first (python sft.py --init_from=out) or pass its ckpt_dir")
    _, state, policy, tokenizer = load_model(cfg.init_from, purpose="starting from")
    chat_token_ids(tokenizer)  # a base model: the error says to run sft.py first
    architecture = {f.name: state["config"][f.name] for f in dataclasses.fields(ModelConfig)
                    if f.name not in ("vocab_size", "dropout")}
    if "max_seq_len" in cfg.user_set:
        if cfg.max_seq_len > architecture["max_seq_len"]:
            raise UserError(f"--max_seq_len={cfg.max_seq_len} is longer than {cfg.init_from}'s "
                            f"model was built for ({architecture['max_seq_len']}); lower it")
        architecture["max_seq_len"] = cfg.max_seq_len
    cfg = dataclasses.replace(cfg, dataset_dir=state["config"]["dataset_dir"], **architecture)
    return policy.train(), tokenizer, cfg, state["tokenizer"]


def split_by_prompt(rows: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val) rows, every row of one prompt on the same side, chosen by a hash of the prompt:
    a model is never validated on a question it was trained on, whatever the file's order."""
    def held_out(row) -> bool:
        digest = hashlib.sha256(json.dumps(row["prompt"], sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:4]) < val_fraction * 2**32
    return [r for r in rows if not held_out(r)], [r for r in rows if held_out(r)]


def given_rows(cfg: DPOConfig, tokenizer) -> list[dict] | None:
    """The rows of --data or --hf_dataset, each checked (pair_from_row), or None for the offline
    default."""
    if cfg.hf_dataset:
        import datasets

        try:
            rows = list(datasets.load_dataset(cfg.hf_dataset, split="train"))
        except Exception as e:
            raise UserError("cannot load the train split of the Hugging Face dataset "
                            f"{cfg.hf_dataset} ({type(e).__name__}); check the name and the "
                            "network, or pass a jsonl file with --data") from None
        where = cfg.hf_dataset
    elif cfg.data:
        rows, where = read_jsonl(cfg.data), cfg.data
    else:
        return None
    if not rows:
        raise UserError(f"{where} holds no pairs; write one JSON object per line")
    for number, row in enumerate(rows, 1):
        pair_from_row(tokenizer, row, f"{where}:{number}")
    return [{field: row[field] for field in ("prompt", "chosen", "rejected")} for row in rows]


def read_jsonl(path: str) -> list:
    if not Path(path).is_file():
        raise UserError(f"--data={path} does not exist; pass a jsonl file of preference pairs")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{number} is not JSON ({e.msg}); write one pair per "
                                    "line") from None
    return rows


# The longest answer asked for: the offline task's answers (a play's title, a speaker's name) are a
# few tokens, so a longer reply is wrong whatever follows.
MAX_ANSWER_TOKENS = 24


def model_answer(model, tokenizer, question: str, temperature: float) -> str:
    """The model's answer to one user message, up to its end of turn."""
    prompt = render_prompt(tokenizer, [{"role": "user", "content": question}])
    prompt = torch.tensor([prompt], device=next(model.parameters()).device)
    stops = stop_ids(tokenizer)
    ids = []
    for token in model.generate_tokens(prompt, MAX_ANSWER_TOKENS, temperature, eos_token=stops):
        if token.item() in stops:
            break
        ids.append(token.item())
    return tokenizer.decode(ids)


def own_mistakes(model, tokenizer, items: list[tuple[str, str]], seed: int,
                 tries: int = 4) -> list[dict]:
    """Pairs from questions with known answers, (question, right answer): chosen is the right
    answer, rejected a wrong one the model gives itself, greedy first, then sampled (temperature
    1) up to `tries` times in all. These are the mistakes it is likely to make, so the preference
    is about them; a question it always answers right gives no pair."""
    torch.manual_seed(seed)
    rows = []
    for question, right in items:
        for attempt in range(tries):
            answer = model_answer(model, tokenizer, question, temperature=float(attempt > 0))
            if answer.strip() and not exact_match(answer, right):
                rows.append({"prompt": question, "chosen": right, "rejected": answer})
                break
    return rows


# The offline default's pairs come from every OFFLINE_EVERY-th training question of shakespeare.py's
# task (both kinds alike): enough pairs for a run of a few minutes, answered in about one.
OFFLINE_EVERY = 4


def offline_pairs(cfg: DPOConfig, tokenizer, policy) -> tuple[list[dict], list[dict]]:
    """The offline default: shakespeare.py's questions (which play a line is from, who says it),
    each paired with a wrong answer the starting model gives (own_mistakes). The training pairs
    come from its training questions, the validation pairs from its held-out ones, whose lines no
    training question quotes."""
    train_items, eval_items = ([(q["question"], q["answer"]) for q in questions(split)]
                               for split in ("train", "eval"))
    return (own_mistakes(policy, tokenizer, train_items[::OFFLINE_EVERY], cfg.seed),
            own_mistakes(policy, tokenizer, eval_items, cfg.seed))


def held_out_exact_match(model, tokenizer) -> float:
    """The offline task's score: the share of its held-out questions the model answers exactly
    (greedy, shakespeare.exact_match)."""
    answered = [exact_match(model_answer(model, tokenizer, q["question"], 0.0), q["answer"])
                for q in questions("eval")]
    return sum(answered) / len(answered)


def run_pairs(cfg: DPOConfig, tokenizer, rows: list[dict] | None, policy, master: bool,
              new_run: bool) -> tuple[list, list]:
    """The run's training and validation pairs, rendered. A new run splits the given rows (or
    makes the offline default's) and writes both sides to ckpt_dir as pairs_train.jsonl and
    pairs_val.jsonl, to be read and resumed from; pairs longer than max_seq_len are dropped."""
    paths = [Path(cfg.ckpt_dir) / f"pairs_{split}.jsonl" for split in ("train", "val")]
    if new_run and master:
        sides = split_by_prompt(rows, cfg.val_fraction) if rows else offline_pairs(cfg, tokenizer,
                                                                                   policy)
        for path, side in zip(paths, sides, strict=True):
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in side)
            write_file(path, text.encode(), SPACE_FIX)
    if dist.is_initialized():
        dist.barrier()
    rendered = []
    for path in paths:
        pairs = [pair_from_row(tokenizer, row, f"{path}:{i}")
                 for i, row in enumerate(read_jsonl(str(path)), 1)]
        kept = [p for p in pairs if max(len(p[0][0]), len(p[1][0])) <= cfg.max_seq_len + 1]
        if master and len(kept) < len(pairs):
            print(f"{path.name}: {len(pairs) - len(kept)} of {len(pairs)} pairs are longer than "
                  f"max_seq_len={cfg.max_seq_len} tokens and are left out")
        rendered.append(kept)
    if not rendered[0] or not rendered[1]:
        raise UserError(f"the pairs split into {len(rendered[0])} for training and "
                        f"{len(rendered[1])} for validation; both need some (change "
                        "--val_fraction, --max_seq_len, or add pairs)")
    return rendered[0], rendered[1]


def check_same_run(ckpt: dict, cfg: DPOConfig, path):
    """A resumed run goes on with the loss it started with: the reference, the pairs, beta and the
    reduction are those of the checkpoint."""
    for name in ("init_from", "data", "hf_dataset", "reduction", "beta"):
        if ckpt["config"][name] != getattr(cfg, name):
            raise UserError(f"{path} was trained with --{name}={ckpt['config'][name]!r}; resume "
                            "with it, or use a new --ckpt_dir")


def dpo_row(step: int, total: int, lr: float, grad_norm: float, train: dict, cfg: DPOConfig,
            seconds: float) -> dict:
    """One row of log.csv: train.py's columns (train_loss the DPO loss of the update's pairs,
    tokens counted as train.py counts them) and the rewards columns, train and validation."""
    return {"step": step, "progress_pct": 100 * step / total, "train_loss": train["loss"],
            "perplexity": None, "lr": lr, "grad_norm": grad_norm,
            "tokens": step * cfg.tokens_per_update,
            "tokens_per_sec": cfg.tokens_per_update / seconds, "val_loss": None, "val_bpb": None,
            **{name: train[name] for name in REWARD_COLUMNS}}


def train_dpo(cfg: DPOConfig, rank: int, world_size: int, device: str, argv: list[str]):
    """One DPO run on this rank: the starting model, the pairs and their reference log-probs, then
    train.py's updates with DPOObjective as the model, to the last checkpoint."""
    master = rank == 0
    if cfg.pairs_per_update % (cfg.batch_size * world_size):
        raise UserError(f"pairs_per_update={cfg.pairs_per_update} is not a multiple of "
                        f"batch_size*world_size = {cfg.batch_size * world_size}; change one")
    accum_steps = cfg.pairs_per_update // (cfg.batch_size * world_size)
    policy, tokenizer, cfg, fingerprint = starting_model(cfg)
    policy.to(device)
    rows = given_rows(cfg, tokenizer)  # a bad pair ends the run here, before ckpt_dir is touched
    lock = lock_ckpt_dir(cfg.ckpt_dir, master)
    resume_from = checkpoint_to_resume(cfg, master)
    if resume_from:
        check_same_run(resume_from[1], cfg, resume_from[0])
    train_pairs, val_pairs = run_pairs(cfg, tokenizer, rows, policy, master, resume_from is None)
    offline = rows is None and master  # the offline task: its score before and after
    if offline and not resume_from:
        print("shakespeare.py's held-out questions: exact match "
              f"{held_out_exact_match(policy, tokenizer):.1%} before DPO")
    pad_id = tokenizer.eot_id

    # Timing dtype=auto's candidates needs batches, not the reference's values: zeros stand in.
    loader = PairLoader(train_pairs, torch.zeros(len(train_pairs), 2), cfg.batch_size, rank,
                        world_size, pad_id, device, cfg.seed)
    dtype, compile, speed_note = choose_speed(
        cfg, resume_from and resume_from[1]["config"],
        update_timer(DPOObjective(policy, cfg.beta, cfg.reduction), cfg, loader, accum_steps,
                     device), device)
    cfg = dataclasses.replace(cfg, dtype=str(dtype).removeprefix("torch."), compile=compile)
    # The reference: the starting model's log-probabilities of every answer, computed once here
    # (before the first update the policy is the reference) and kept in the checkpoints.
    if resume_from:
        reference = resume_from[1]["reference"]
    else:
        reference = {split: pair_logps(policy, pairs, cfg.batch_size, pad_id, cfg.reduction,
                                       device, dtype)
                     for split, pairs in (("train", train_pairs), ("val", val_pairs))}
    loader.ref_logps = reference["train"]

    torch.manual_seed(cfg.seed + rank)
    objective = DPOObjective(policy, cfg.beta, cfg.reduction)
    model = wrap_model(objective, cfg, device, dtype, world_size)
    optimizer = make_optimizer(policy, cfg, device)
    scaler = make_scaler(device, dtype)
    updates = max(1, int(cfg.passes * len(train_pairs) / cfg.pairs_per_update))
    asked = BUDGET_PROBE_UPDATES if cfg.max_minutes else updates
    scheduler = Scheduler(optimizer, cfg.schedule, asked, cfg.warmup_iterations, cfg.max_lr,
                          cfg.min_lr)
    step, elapsed_before, record = resume(resume_from, cfg, fingerprint, policy, optimizer, scaler,
                                          scheduler, loader, rank, device)
    log_file = cfg.log_file or os.path.join(cfg.ckpt_dir, "log.csv")
    if master:
        start_log(log_file, step, DPO_LOG_FORMAT)
        print(f"{policy.num_params():,} parameters | {len(train_pairs)} training pairs, "
              f"{len(val_pairs)} validation pairs | {cfg.pairs_per_update} pairs per update "
              f"({accum_steps} micro-steps x {world_size} ranks x {cfg.batch_size}) | "
              f"{cfg.reduction} of log-probs, beta {cfg.beta:g} | {device} "
              f"{str(dtype).removeprefix('torch.')}" + (f" | {speed_note}" if speed_note else ""))
    stop = StopRequest()
    ckpt_every = max(1, cfg.token_ckpt // cfg.tokens_per_update)
    start_time, update_seconds, stopped = time.time(), [], False
    while step < scheduler.training_steps and not stopped:
        t0 = time.time()
        lr = scheduler.step(step)
        scale = scaler.get_scale()
        loss, grad_norm = train_update(model, optimizer, loader, accum_steps, cfg, device, dtype,
                                       scaler)
        skipped = scaler.get_scale() < scale  # fp16: a gradient overflowed, the update was skipped
        step += 1
        update_seconds.append(time.time() - t0)
        if cfg.max_minutes and replans_length(step):
            # an evaluation costs about a forward of the validation pairs
            eval_tokens = len(val_pairs) * cfg.max_seq_len
            scheduler.training_steps = updates_in_budget(
                cfg, step, elapsed_before + time.time() - start_time, update_seconds, eval_tokens,
                policy.num_params(), device)
        if not (math.isfinite(loss) and (math.isfinite(grad_norm) or skipped)):
            raise TrainingDiverged(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at "
                                   f"update {step}; resume from the last checkpoint in "
                                   f"{cfg.ckpt_dir} with a lower max_lr")
        total = scheduler.training_steps
        row = dpo_row(step, total, lr, grad_norm, preference_metrics(*objective.take_rewards()),
                      cfg, update_seconds[-1]) | {"skipped": int(skipped)}
        if master and (step % cfg.eval_interval == 0 or step == total):
            val = evaluate_pairs(policy, val_pairs, reference["val"], cfg, pad_id, device, dtype)
            row |= {"val_loss": val["loss"],
                    **{f"val_{name}": val[name] for name in REWARD_COLUMNS}}
        row["elapsed_s"] = elapsed_before + time.time() - start_time
        if master:
            append_log(log_file, row, DPO_LOG_FORMAT)
            print(progress_line(row, total), flush=True)
        stopped = stop.agreed(device)
        if master and (step % ckpt_every == 0 or step == total or stopped):
            state = checkpoint_state(cfg, policy, optimizer, world_size, device,
                                     scheduler=scheduler, scaler=scaler, loader=loader,
                                     record=record, fingerprint=fingerprint, step=step,
                                     elapsed_s=row["elapsed_s"], argv=argv, repeats=None)
            state |= {"reference": reference, "script": "dpo.py"}
            print(f"saved {save_checkpoint(cfg.ckpt_dir, step, state, cfg.keep_ckpts)}")
    if master:
        if stopped:
            print(f"stopped by signal after update {step}; resume with --load_ckpt=True")
        plot_log(log_file, os.path.join(cfg.ckpt_dir, "loss.png"))
        if offline:
            print("shakespeare.py's held-out questions: exact match "
                  f"{held_out_exact_match(policy, tokenizer):.1%} after {step} updates of DPO")
        lock.close()


def progress_line(row: dict, total: int) -> str:
    line = (f"update {row['step']}/{total} | loss {row['train_loss']:.4f} | margin "
            f"{row['rewards_margin']:.4f} | accuracy {row['rewards_accuracy']:.2f} | lr "
            f"{row['lr']:.2e} | grad norm {row['grad_norm']:.3f}")
    if row["val_loss"] is not None:
        line += (f" | val loss {row['val_loss']:.4f} margin {row['val_rewards_margin']:.4f} "
                 f"accuracy {row['val_rewards_accuracy']:.2f}")
    return line


if __name__ == "__main__":
    run_cli(functools.partial(main, config=DPOConfig, run=train_dpo))
