"""The picture of a run: its training and validation loss and its learning rate against tokens trained, drawn from
the CSV log train.py writes (loss.png in ckpt_dir, at the end of every run)."""
import csv
import io
from pathlib import Path

from checkpoint import SPACE_FIX
from prepare import write_file


def plot_log(log_file: str, png_path: str):
    """Loss (train and validation) and learning rate against tokens trained, from the CSV log."""
    # A bare Figure, not pyplot: no window, and the plotting backend of a notebook that calls train.main is left alone.
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
