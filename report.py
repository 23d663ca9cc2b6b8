"""The report card of a run: one page (report.md in ckpt_dir) that says what was trained, on what,
for how long and how well, written at the end of every run and when one stops early on a signal.

Every number on it comes from log.csv as written (the last row, the evaluation rows, the
tokens_per_sec column), so the card and the log never disagree. Beside the run's final validation
bits per byte it puts the reference curve of the README's default run (docs/reference_run.json), so
that a learner can tell whether a loss is normal.
"""
import csv
import dataclasses
import datetime
import itertools
import json
import os
import platform
import shlex
import statistics
from pathlib import Path

import torch

from checkpoint import SPACE_FIX
from dataset import split_tokens
from files import write_file

REFERENCE = Path(__file__).resolve().parent / "docs" / "reference_run.json"
SAMPLES_SHOWN = 3  # the last few samples: the first ones are random vocabulary


def machine_line(device: str, dtype: str, world_size: int) -> str:
    """The hardware and software that trained the run, in one line."""
    cpu = platform.processor() or platform.machine()
    # Linux names the model there; platform.processor() says only "x86_64"
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip()
                 for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    line = f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB memory"
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_properties(device)
        line = (f"{gpu.name} ({gpu.total_memory / 2**30:.0f} GiB), {world_size} rank(s); rank 0's "
                f"host: {line}")
    return f"{line}; PyTorch {torch.__version__}; {device}, {dtype}"


def read_log(log_file: str) -> list[dict]:
    with open(log_file, newline="") as f:
        return list(csv.DictReader(f))


def changed_settings(cfg) -> list[tuple[str, object, object]]:
    """(name, default, value) of every setting the run used that is not its default (auto ones as
    resolved)."""
    return [(f.name, f.default, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if f.name != "user_set" and getattr(cfg, f.name) != f.default]


def reference_at(curve: list[list], tokens: int) -> float | None:
    """The reference curve's bits per byte at `tokens`, read off between its evaluations (None
    outside them)."""
    for (t0, b0), (t1, b1) in itertools.pairwise(curve):
        if t0 <= tokens <= t1:
            return b0 + (b1 - b0) * (tokens - t0) / (t1 - t0)
    return None


def reference_lines(evals: list[dict], dataset: dict) -> list[str]:
    """The run's final validation bits per byte beside the reference curve, and the curve beside
    this run's evaluations at the same tokens; nothing to compare when the run trained on another
    dataset."""
    reference = json.loads(REFERENCE.read_text())
    lines = [f"The reference is the README's default run (`{reference['command']}` on "
             f"{reference['dataset_dir']}, "
             f"{reference['machine']}, {reference['date']}; docs/reference_run.md)."]
    if any(dataset.get(k) != v for k, v in reference["dataset"].items()):
        return lines + ["This run trained on another dataset: its losses are not comparable with "
                        "it."]
    if evals:
        tokens, bpb = int(evals[-1]["tokens"]), evals[-1]["val_bpb"]
        at = reference_at(reference["curve"], tokens)
        lines[0] += (f" This run ended at **{bpb} bpb** after {tokens:,} tokens; the reference had "
                     + (f"**{at:.4f} bpb** there." if at is not None
                        else "no evaluation that early."))
    run = {int(r["tokens"]): r["val_bpb"] for r in evals}
    return lines + ["", "| tokens | reference val bpb | this run's val bpb |", "|---:|---:|---:|",
                    *[f"| {t:,} | {bpb:.4f} | {run.get(t, '')} |" for t, bpb in reference["curve"]]]


def report_text(cfg, meta: dict, rows: list[dict], argv: list[str], device: str, world_size: int,
                n_params: int, mfu_per_token: float, samples: dict, stopped: bool) -> str:
    """The card as Markdown. meta: the dataset's meta.json; mfu_per_token: the MFU of one token per
    second (FLOPs per token / ranks / peak)."""
    last = rows[-1]
    tokens, elapsed = int(last["tokens"]), float(last["elapsed_s"])
    speeds = [float(r["tokens_per_sec"]) for r in rows
              if int(r["step"]) > 1] or [float(last["tokens_per_sec"])]
    speed = statistics.median(speeds)  # update 1 also compiles and warms up: left out
    evals = [r for r in rows if r["val_loss"]]
    # a run stopped within its first tenth of a second logs 0.0 s: no whole-run rate then
    overall = f"; {tokens / elapsed:,.0f} tokens/s over the whole run" if elapsed > 0 else ""
    how = (f"stopped by a signal after update {last['step']}" if stopped
           else f"finished at update {last['step']}")
    launcher = "torchrun ... " if world_size > 1 else "python "
    # a fine-tuning dataset (one with loss masks) is what sft.py trains on
    script = "sft.py" if "row_tokens" in meta else "train.py"
    command = f"{launcher}{script} {shlex.join(argv)}".rstrip()
    train_tokens = split_tokens(meta, "train")
    lines = [f"# Report card: {cfg.ckpt_dir}", "",
             f"Written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; the run {how}. "
             "Every number is read from log.csv.", "",
             "| | |", "|---|---|",
             f"| machine | {machine_line(device, cfg.dtype, world_size)} |",
             f"| command | `{command}` ({world_size} rank{'s' * (world_size > 1)}) |",
             f"| parameters | {n_params:,} |",
             f"| tokens trained | {tokens:,} in {last['step']} updates: "
             f"{tokens / train_tokens:.2f} passes "
             f"over {train_tokens:,} training tokens ({cfg.dataset_dir}) |",
             f"| wall time | {elapsed / 60:.1f} min ({elapsed:.0f} s) |",
             f"| speed | {speed:,.0f} tokens/s (median over the updates after the first), MFU "
             f"{100 * speed * mfu_per_token:.1f}%{overall} |"]
    if evals:
        best = min(evals, key=lambda r: float(r["val_loss"]))
        lines += [f"| final validation | loss {evals[-1]['val_loss']}, {evals[-1]['val_bpb']} bits "
                  f"per byte (update {evals[-1]['step']}, {int(evals[-1]['tokens']):,} tokens) |",
                  f"| best validation | loss {best['val_loss']}, {best['val_bpb']} bits per byte "
                  f"(update {best['step']}) |"]
        scored = [r for r in evals if r["eval_acc"]]
        if scored:
            lines.append(f"| {os.path.basename(cfg.eval_data)} | acc {scored[-1]['eval_acc']}, "
                         f"acc_norm {scored[-1]['eval_acc_norm']} (update {scored[-1]['step']}) |")
    lines += ["", "## What to expect", "", *reference_lines(evals, meta)]
    changed = changed_settings(cfg)
    lines += ["", "## Settings that differ from the defaults", ""]
    if changed:
        lines += ["| setting | default | this run |", "|---|---|---|",
                  *[f"| {name} | `{default!r}` | `{value!r}` |"
                    for name, default, value in changed]]
    else:
        lines += ["None: the defaults of train.py."]
    lines += ["", "## Loss", "", "![loss and learning rate against tokens trained](loss.png)", ""]
    if samples:
        lines += ["## Samples", ""]
        for step in sorted(samples)[-SAMPLES_SHOWN:]:
            lines += [f"At update {step}:", "", "```", samples[step], "```", ""]
    return "\n".join(lines)


def write_report(cfg, meta: dict, log_file: str, argv: list[str], device: str, world_size: int,
                 n_params: int, mfu_per_token: float, samples: dict, stopped: bool) -> Path | None:
    """report.md in ckpt_dir, from log.csv (cfg a train.py TrainConfig as the run resolved it)."""
    rows = read_log(log_file)
    if not rows:  # stopped before its first update was logged: nothing to report
        return None
    text = report_text(cfg, meta, rows, argv, device, world_size, n_params, mfu_per_token, samples,
                       stopped)
    path = Path(cfg.ckpt_dir) / "report.md"
    write_file(path, text.encode(), SPACE_FIX)
    return path
