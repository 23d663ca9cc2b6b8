"""Supervised fine-tuning (SFT): teach a pretrained model to answer in turns, by training it on
conversations with a loss on the assistant's tokens only.

    python sft.py --init_from=out                   # the offline task -> out/sft
    python sft.py --init_from=out --data=chat.jsonl --ckpt_dir=out/sft  # a run's ckpt_dir, or a
                                                                        # Hugging Face model dir
    python sft.py --init_from=out --data=chat.jsonl --ckpt_dir=out/sft --load_ckpt=True  # resume
    torchrun --standalone --nproc_per_node=8 sft.py --init_from=out/hf --data=chat.jsonl

--data is the offline task by default (shakespeare.py: which play a line is from, who says it), or a
jsonl file, one conversation a line: {"messages": [{"role", "content"}, ...]} (the
Hugging Face convention) or an Alpaca row (instruction, input, output); or, online, a Hugging Face
dataset with a "messages" column (e.g. HuggingFaceTB/smol-smoltalk). conversation.py renders each
one as ids and a loss mask.

How it works: the conversations become a fine-tuning dataset in <ckpt_dir>/data, in prepare.py's
format plus a mask beside each shard (dataset.py), laid out so that every batch row starts a
conversation: the training conversations, shuffled, are packed whole into rows of max_seq_len tokens
and the rest of a row is padding that nothing learns from. Then train.py's train() runs on it as it
does on text, so SFT has everything pretraining has: gradient accumulation, DDP and FSDP, atomic
checkpoints and resume, the time budget, log.csv (whose losses count the learned tokens only) and
report.md.
A model pretrained on a vocabulary without the chat tokens gets them: the dataset's tokenizer is
the model's plus the chat tokens after its last id, and the model grows rows for them
(pretrained.py).

Every other --key=value is train.py's (python train.py --help); SFT_DEFAULTS changes a few of
their defaults for fine-tuning.
"""
import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import shakespeare
from checkpoint import load_model
from configurator import UserError, exit_if_help, load_config, run_cli
from conversation import CHAT_TOKENS, conversation_from_row, render_conversation
from dataset import read_meta
from files import write_file
from pretrained import is_hf_directory
from tokenizer import load_tokenizer
from train import TrainConfig, checkpoint_to_resume, distributed, train


@dataclass
class SFTOptions:
    """sft.py's own options; the rest are TrainConfig's, some defaults changed (SFT_DEFAULTS)."""

    data: str = "shakespeare"  # conversations: a .jsonl file, a Hugging Face dataset with a
                               # messages column, or shakespeare: the offline task (shakespeare.py)
    overlong: str = "cut"  # a conversation longer than max_seq_len: "cut" to fit, or "drop"
    val_fraction: float = 0.1  # every k-th conversation (k = 1 / val_fraction) is validation

    def __post_init__(self):
        if not self.data:
            raise UserError("pass --data=FILE.jsonl (one conversation a line), or a Hugging Face "
                            "dataset with a messages column")
        if self.overlong not in ("cut", "drop"):
            raise UserError("--overlong must be cut or drop")
        if not 0 < self.val_fraction < 1:
            raise UserError("--val_fraction must be between 0 and 1 (e.g. 0.1)")


# Fine-tuning starts from weights that already know the language: a short warm-up, a lower peak than
# pretraining's, a length of about two passes over the default task's conversations, and checkpoints
# into their own directory.
SFT_DEFAULTS = {"ckpt_dir": "out/sft", "warmup_iterations": 5, "max_lr": 5e-4, "min_lr": 5e-5,
                "muon_lr": 2e-3, "embedding_lr": 5e-3, "training_tokens": 250_000,
                "token_ckpt": 100_000, "eval_interval": 20, "model_gen_multiplier": 0.0}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """sft.py's own --key=value options, and the ones meant for train.py's config."""
    own = tuple(f"--{f.name}=" for f in dataclasses.fields(SFTOptions))
    return [a for a in argv if a.startswith(own)], [a for a in argv if not a.startswith(own)]


# --------------------------------------------------------------------------------------------------
# Reading conversations
def read_rows(data: str):
    """(row, where) for every conversation of --data: a jsonl file's lines, or a hub dataset's
    rows."""
    if data == "shakespeare":
        yield from ((row, f"shakespeare.py question {i}")
                    for i, row in enumerate(shakespeare.training_rows()))
        return
    path = Path(data)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line), f"{data}:{number}"
                    except ValueError:
                        raise UserError(f"{data}:{number} is not a JSON object; write one "
                                        "conversation per line") from None
        return
    if path.suffix in (".jsonl", ".json") or path.exists():
        raise UserError(f"--data={data} is not a file; pass a .jsonl file or a Hugging Face "
                        "dataset")
    try:
        import datasets

        rows = datasets.load_dataset(data, split="train")
    except Exception as e:
        raise UserError(f"cannot load the Hugging Face dataset {data} ({type(e).__name__}); check "
                        "the name and the network, or pass a .jsonl file") from None
    for number, row in enumerate(rows):
        yield row, f"{data} row {number}"


def data_digest(data: str) -> str:
    """What the fine-tuning dataset was built from: the file's bytes, or the hub dataset's name."""
    path = Path(data)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else data


# --------------------------------------------------------------------------------------------------
# Laying conversations out in rows
def rendered(tokenizer, rows, row_tokens: int, overlong: str) -> tuple[list, dict]:
    """(ids, mask) of every conversation that fits a row (cut to row_tokens, or left out, as
    `overlong` says) and still has something to learn, and the counts of what was cut and left
    out."""
    kept, counts = [], {"conversations": 0, "cut": 0, "dropped": 0, "nothing to learn": 0}
    for row, where in rows:
        ids, mask = render_conversation(tokenizer, conversation_from_row(row, where))
        counts["conversations"] += 1
        if len(ids) > row_tokens:
            if overlong == "drop":
                counts["dropped"] += 1
                continue
            counts["cut"] += 1
            ids, mask = ids[:row_tokens], mask[:row_tokens]
        if not any(mask):  # cut before the assistant's first word
            counts["nothing to learn"] += 1
            continue
        kept.append((ids, mask))
    return kept, counts


def packed(conversations: list, row_tokens: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The conversations, in order, packed into rows of row_tokens without splitting any; a row's
    rest is padding (`pad`, never learned). One more padding token at the end: the target of the
    last row's last position."""
    ids, mask, used = [], [], 0
    for conversation_ids, conversation_mask in conversations:
        if used + len(conversation_ids) > row_tokens:  # start a new row
            ids += [pad] * (row_tokens - used)
            mask += [0] * (row_tokens - used)
            used = 0
        ids += conversation_ids
        mask += conversation_mask
        used += len(conversation_ids)
    ids += [pad] * (row_tokens - used + 1)
    mask += [0] * (row_tokens - used + 1)
    return np.array(ids), np.array(mask, dtype=np.uint8)


def learned_bytes(tokenizer, ids: np.ndarray, mask: np.ndarray) -> int:
    """UTF-8 bytes of the text the learned tokens stand for (the chat tokens have none): the
    bits-per-byte of the validation loss divides by it."""
    special = set(tokenizer.special_tokens.values())
    return len(tokenizer.decode([int(i) for i in ids[mask == 1] if i not in special]).encode())


# --------------------------------------------------------------------------------------------------
# The fine-tuning dataset
def base_tokenizer_files(init_from: str) -> tuple[Path, dict]:
    """The directory holding --init_from's tokenizer, and its meta.json (or, for a Hugging Face
    directory, what meta.json would say)."""
    if is_hf_directory(init_from):
        tokenizer = load_tokenizer(init_from)
        return Path(init_from), {"tokenizer": "hf", "pattern": None,
                                 "vocab_size": tokenizer.vocab_size,
                                 "special_tokens": tokenizer.special_tokens}
    _, state, _, _ = load_model(init_from, purpose="starting from")
    return Path(state["config"]["dataset_dir"]), read_meta(state["config"]["dataset_dir"])


def with_chat_tokens(meta: dict, source: str) -> dict:
    """The tokenizer part of meta.json with the chat tokens, added after the last id when the model
    was pretrained without them."""
    special = dict(meta["special_tokens"])
    if all(token in special for token in CHAT_TOKENS):
        return {key: meta[key] for key in ("tokenizer", "pattern", "vocab_size")} | {
            "special_tokens": special}
    if meta["tokenizer"] == "hf":
        raise UserError(f"{source}'s tokenizer has no chat tokens ({', '.join(CHAT_TOKENS)}) and "
                        "sft.py cannot add them to a tokenizer.json; start from the ckpt_dir of a "
                        "run of train.py instead")
    vocab_size = meta["vocab_size"]
    special |= {token: vocab_size + i for i, token in enumerate(CHAT_TOKENS)}
    return {"tokenizer": meta["tokenizer"], "pattern": meta["pattern"],
            "vocab_size": vocab_size + len(CHAT_TOKENS), "special_tokens": special}


def write_sft_dataset(out_dir: Path, opts: SFTOptions, cfg: TrainConfig, built_from: dict):
    """Render and pack --data into a fine-tuning dataset in out_dir (written in a temporary
    directory, renamed into place when complete); print what was cut and left out."""
    base_dir, base_meta = base_tokenizer_files(cfg.init_from)
    meta = with_chat_tokens(base_meta, cfg.init_from)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".data.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name in ("tokenizer.tiktoken", "tokenizer.json"):
            if (base_dir / name).exists():
                shutil.copyfile(base_dir / name, tmp / name)
        write_file(tmp / "meta.json", json.dumps({**meta, "shards": {}}).encode(), "free space")
        tokenizer = load_tokenizer(tmp, {**meta, "shards": {}})
        conversations, counts = rendered(tokenizer, read_rows(opts.data), cfg.max_seq_len,
                                         opts.overlong)
        say_counts(counts, cfg.max_seq_len, opts)
        k = max(2, round(1 / opts.val_fraction))
        train = [c for i, c in enumerate(conversations) if i % k != k - 1]
        # Shuffled (with --seed), so that each batch mixes the file's conversations: a file sorted
        # by topic would otherwise be learnt one topic at a time, each undoing the one before.
        random.Random(cfg.seed).shuffle(train)
        splits = {"val": conversations[k - 1::k], "train": train}
        if not splits["val"]:
            raise UserError(f"{opts.data} has {len(conversations)} conversation(s) left to learn "
                            f"from; fine-tuning needs at least {k} (one of every {k} is "
                            "validation)")
        dtype = np.uint16 if meta["vocab_size"] <= 2**16 else np.uint32
        shards, sizes = {}, {}
        for split, chosen in splits.items():
            ids, mask = packed(chosen, cfg.max_seq_len, tokenizer.eot_id)
            np.save(tmp / f"{split}_000000.npy", ids.astype(dtype))
            np.save(tmp / f"mask_{split}_000000.npy", mask)
            shards[f"{split}_000000.npy"] = len(ids)
            # the learned tokens and their text, for the loss per token and bits per byte
            sizes[f"{split}_tokens"] = int(mask.sum())
            sizes[f"{split}_bytes"] = learned_bytes(tokenizer, ids, mask)
        meta = {**meta, "dtype": np.dtype(dtype).name, **sizes, "shards": shards,
                "row_tokens": cfg.max_seq_len, "built_from": built_from,
                "source": f"conversations of {opts.data}"}
        write_file(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode(), "free space")
        try:
            tmp.rename(out_dir)
        except OSError:  # another rank of this run published the same dataset first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def say_counts(counts: dict, row_tokens: int, opts: SFTOptions):
    """One line: how many conversations there are and what happened to the long ones; an error when
    none is left."""
    left_out = counts["dropped"] + counts["nothing to learn"]
    if counts["conversations"] == left_out:
        raise UserError(f"every conversation of {opts.data} is longer than max_seq_len="
                        f"{row_tokens} tokens before the assistant speaks, or left out by "
                        "--overlong=drop; raise --max_seq_len or shorten them")
    line = f"{counts['conversations']:,} conversations in {opts.data}"
    if counts["cut"]:
        line += (f"; {counts['cut']:,} longer than max_seq_len={row_tokens} tokens, cut to fit "
                 "(--overlong=drop leaves them out)")
    if counts["dropped"]:
        line += (f"; {counts['dropped']:,} longer than max_seq_len={row_tokens} tokens, left out "
                 "(--overlong=cut keeps their start)")
    if counts["nothing to learn"]:
        line += f"; {counts['nothing to learn']:,} left out: cut before the assistant's answer"
    if int(os.environ.get("RANK", 0)) == 0:
        print(line)


def fine_tuning_dataset(opts: SFTOptions, cfg: TrainConfig) -> Path:
    """<ckpt_dir>/data, built from --data unless it is there already (a resumed run): then it must
    have been built from the same data and settings."""
    out_dir = Path(cfg.ckpt_dir) / "data"
    built_from = {"data": opts.data, "digest": data_digest(opts.data), "init_from": cfg.init_from,
                  "max_seq_len": cfg.max_seq_len, "overlong": opts.overlong,
                  "val_fraction": opts.val_fraction}
    if not (out_dir / "meta.json").exists():
        write_sft_dataset(out_dir, opts, cfg, built_from)
    if read_meta(out_dir).get("built_from") != built_from:
        raise UserError(f"{out_dir} was built from other conversations or settings; fine-tune "
                        "into another --ckpt_dir, or pass the same --data, --init_from, "
                        "--max_seq_len and --overlong")
    return out_dir


def main(argv: list[str]):
    exit_if_help(argv, SFTOptions, TrainConfig)
    own, rest = split_argv(argv)
    opts = load_config(own, SFTOptions)
    cfg = load_config(rest, TrainConfig)
    if not cfg.init_from:
        raise UserError("pass --init_from=DIR: the ckpt_dir of a pretraining run (e.g. out) or a "
                        "Hugging Face model directory")
    if "dataset_dir" in cfg.user_set:
        raise UserError("sft.py builds its dataset from --data into <ckpt_dir>/data; drop "
                        "--dataset_dir")
    cfg = dataclasses.replace(cfg, **{key: value for key, value in SFT_DEFAULTS.items()
                                      if key not in cfg.user_set})
    if not cfg.load_ckpt:  # a ckpt_dir holding another run is refused before anything is written
        checkpoint_to_resume(cfg, master=True)
    cfg = dataclasses.replace(cfg, dataset_dir=str(fine_tuning_dataset(opts, cfg)))
    with distributed(cfg) as (rank, world_size, device):
        train(cfg, rank, world_size, device, argv)


if __name__ == "__main__":
    run_cli(main)
