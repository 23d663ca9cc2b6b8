"""The CSV log of a training run (<ckpt_dir>/log.csv) and the loss plot drawn from it (loss.png).

One header row, then one row per optimizer update: step, progress_pct, train_loss, perplexity, lr,
grad_norm, tokens, tokens_per_sec, elapsed_s, val_loss, val_bpb (these two on evaluation updates
only), skipped (1 where an fp16 run's loss scaler skipped the update because a gradient overflowed,
else 0), eval_acc and eval_acc_norm (--eval_data's multiple-choice accuracy, on evaluation updates
only), suite (--eval_suite's aggregate, suite.py, likewise); dpo.py's log has its rewards columns
after these (DPO_LOG_FORMAT). train.py starts the log (or cuts it
back to the checkpoint it resumes from), appends a row after each update and plots it at the end.
"""
import csv
import io
import os
from pathlib import Path

from checkpoint import SPACE_FIX
from files import space_for, write_file

# The log's columns, in order, and how each value is written; a value of None (no evaluation) is
# left empty.
LOG_FORMAT = {"step": "d", "progress_pct": ".2f", "train_loss": ".4f", "perplexity": ".2f",
              "lr": ".3e",
              "grad_norm": ".4f", "tokens": "d", "tokens_per_sec": ".0f", "elapsed_s": ".1f",
              "val_loss": ".4f",
              "val_bpb": ".4f", "skipped": "d"}
# --eval_data's multiple-choice accuracy (multiple_choice.py): acc, then acc_norm (per character of
# the choice).
LOG_FORMAT |= {"eval_acc": ".4f", "eval_acc_norm": ".4f"}
# --eval_suite's aggregate: the mean of its sets' chance-centred scores (suite.py).
LOG_FORMAT |= {"suite": ".4f"}
LOG_COLUMNS = list(LOG_FORMAT)
# dpo.py's log adds the rewards of the update's pairs and, on evaluation updates, of the validation
# pairs (whose loss is val_loss), as TRL logs rewards/chosen, rewards/rejected, rewards/margins and
# rewards/accuracies.
REWARD_COLUMNS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")
DPO_LOG_FORMAT = LOG_FORMAT | {name: ".4f" for name in (*REWARD_COLUMNS,
                                                       *(f"val_{n}" for n in REWARD_COLUMNS))}


def csv_text(rows: list[list]) -> str:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def start_log(log_file: str, step: int, formats: dict = LOG_FORMAT):
    """Start the CSV log afresh, or on resume keep only the rows up to the checkpoint's update: rows
    logged after it (before a crash) are trained again and must not appear twice. `formats` are the
    run's columns (LOG_FORMAT's, or DPO_LOG_FORMAT's)."""
    kept = []
    if step > 0 and os.path.exists(log_file):
        with open(log_file, newline="") as f:
            kept = [row for row in list(csv.reader(f))[1:] if len(row) == len(formats)
                    and int(row[0]) <= step]
    write_file(Path(log_file), csv_text([list(formats), *kept]).encode(), SPACE_FIX)


def append_log(log_file: str, row: dict, formats: dict = LOG_FORMAT):
    """Append one row and close the file: a full disk cuts the log back to its last whole row."""
    line = csv_text([["" if row.get(k) is None else format(row[k], f) for k,
                      f in formats.items()]])
    with space_for(log_file, len(line), SPACE_FIX), open(log_file, "a", newline="") as f:
        f.write(line)


def plot_log(log_file: str, png_path: str):
    """Loss (train and validation) and learning rate against tokens trained, from the CSV log."""
    # A bare Figure, not pyplot: no window, and the plotting backend of a notebook that calls
    # train.main is left alone.
    from matplotlib.figure import Figure

    with open(log_file) as f:
        rows = list(csv.DictReader(f))
    tokens = [int(r["tokens"]) for r in rows]
    fig = Figure(figsize=(8, 6))
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
    ax_loss.plot(tokens, [float(r["train_loss"]) for r in rows], label="train")
    val = [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if val:
        ax_loss.plot(*zip(*val, strict=True), "o-", label="validation")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_lr.plot(tokens, [float(r["lr"]) for r in rows])
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens trained")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    write_file(Path(png_path), png.getvalue(), SPACE_FIX)
