"""--tracker (tracking.py) and the report card (report.py): the trackers hold the numbers of
log.csv, a resumed run continues its tracked runs without drawing a step twice, a missing tracker is
one line, and report.md says what log.csv says. Every tracker runs offline: TensorBoard's event
files, wandb's offline mode, trackio's local store."""
import csv
import json
import os
import shutil
import sqlite3
import statistics
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto.wandb_internal_pb2 import Record

from configurator import UserError
from report import reference_at
from tracking import tracker_names
from train import TrainConfig
from training_log import LOG_COLUMNS

# 10 updates, checkpoints after 5 and 10, samples at updates 1, 2, 4 and 8, a multiple-choice set
# scored.
TRACKED = [*TINY, "--training_tokens=1280", "--token_ckpt=640", "--keep_ckpts=5",
           "--model_gen_multiplier=2",
           "--eval_data=tests/eval_sets/multiple_choice.jsonl", "--eval_items=4",
           "--tracker=tensorboard,wandb,trackio"]
# what a tracker gets of a row: the step is its x-axis
LOGGED = [c for c in LOG_COLUMNS if c != "step"]


def offline(tmp: Path) -> dict:
    """The environment of a run that tracks with no network and writes nothing outside `tmp`."""
    return {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp / "wandb_config"),
            "WANDB_CACHE_DIR": str(tmp),
            "WANDB_DATA_DIR": str(tmp), "TRACKIO_DIR": str(tmp / "trackio"), "HF_HUB_OFFLINE": "1"}


def log_rows(ckpt_dir: Path) -> list[dict]:
    with open(ckpt_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict], column: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[column])) for r in rows if r[column]]


@pytest.fixture(scope="module")
def tracked(shakespeare_dir, tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("tracked")
    env = offline(tmp)
    run("train.py", *TRACKED, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp / 'out'}",
        env={**os.environ, **env})
    return tmp / "out", env


def tensorboard_scalars(ckpt_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(ckpt_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def wandb_history(run_dir: Path) -> list[dict]:
    """The rows a wandb offline run logged, read from its transaction log (run-ID.wandb): LevelDB's
    log format, 32 KiB blocks of records with 7-byte headers (checksum, length, type), after a
    7-byte file header."""
    data, pos, part, rows = next(run_dir.glob("run-*.wandb")).read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # too little left of the block for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = Record.FromString(part)
            if record.HasField("history"):
                rows.append({"/".join(i.nested_key) or i.key: i.value_json
                             for i in record.history.item})
            part = b""
    return rows


def test_tensorboard_events_hold_the_values_of_log_csv(tracked):
    ckpt_dir, _ = tracked
    rows, scalars = log_rows(ckpt_dir), tensorboard_scalars(ckpt_dir)
    # every column the run filled in (this one scores no --eval_suite: `suite` stays empty)
    filled = [c for c in LOGGED if any(row[c] for row in rows)]
    assert "suite" not in filled and set(scalars) == set(filled)
    for column in filled:  # TensorBoard keeps float32: the CSV's value, rounded to float32
        assert scalars[column] == [(s, float(np.float32(v)))
                                   for s, v in logged(rows, column)], column
    assert [s for s, _ in scalars["val_bpb"]] == [4, 8, 10] and len(scalars["train_loss"]) == 10


def test_wandb_offline_run_holds_the_rows_of_log_csv(tracked):
    ckpt_dir, _ = tracked
    (run_dir,) = (ckpt_dir / "wandb").glob("offline-run-*")
    history, rows = wandb_history(run_dir), log_rows(ckpt_dir)
    assert [int(h["_step"]) for h in history] == list(range(1, 11))
    for h, row in zip(history, rows, strict=True):
        sample = {"sample"} if int(row["step"]) in (1, 2, 4, 8) else set()
        assert {k for k in h if not k.startswith("_")} == {c for c in LOGGED if row[c]} | sample
        assert {k: float(h[k]) for k in LOGGED if row[k]} == {k: float(row[k]) for k in LOGGED
                                                              if row[k]}


def test_trackio_local_store_holds_the_rows_of_log_csv(tracked):
    ckpt_dir, env = tracked
    db = sqlite3.connect(Path(env["TRACKIO_DIR"]) / "llama-pretrain.db")
    stored = db.execute("SELECT step, metrics FROM metrics ORDER BY id").fetchall()
    rows = log_rows(ckpt_dir)
    assert [step for step, _ in stored] == list(range(1, 11))
    for (_, metrics), row in zip(stored, rows, strict=True):
        values = json.loads(metrics)
        assert {k: values[k] for k in LOGGED if row[k]} == {k: float(row[k]) for k in LOGGED
                                                            if row[k]}


def test_a_resumed_run_continues_its_tracked_runs_without_drawing_a_step_twice(
        tracked, shakespeare_dir, tmp_path):
    # A run that crashed after update 10 with its newest checkpoint at update 5: everything it
    # tracked is there, updates 6 to 10 are trained again.
    straight, env = tracked
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed,
                    ignore=shutil.ignore_patterns("ckpt_00000010.pt", "report.md"))
    env = env | {"TRACKIO_DIR": str(tmp_path / "trackio")}
    shutil.copytree(tracked[1]["TRACKIO_DIR"], env["TRACKIO_DIR"])
    run("train.py", *TRACKED, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={crashed}",
        "--load_ckpt=True",
        env={**os.environ, **env})
    scalars = tensorboard_scalars(crashed)
    # once each, the resumed run's from 6 on
    assert [s for s, _ in scalars["train_loss"]] == list(range(1, 11))
    assert scalars["train_loss"] == [(s, float(np.float32(v))) for s,
                                     v in logged(log_rows(crashed), "train_loss")]
    # the same run id: `wandb sync` joins them
    first, resumed = sorted((crashed / "wandb").glob("offline-run-*"))
    assert first.name.split("-")[-1] == resumed.name.split("-")[-1]
    assert [int(h["_step"]) for h in wandb_history(resumed)] == [6, 7, 8, 9, 10]
    db = sqlite3.connect(Path(env["TRACKIO_DIR"]) / "llama-pretrain.db")
    assert db.execute("SELECT step FROM metrics ORDER BY id").fetchall() == [(s,)
                                                                             for s in range(1, 11)]
    # one run, as it was
    assert len(db.execute("SELECT DISTINCT run_name FROM metrics").fetchall()) == 1


def test_a_missing_tracker_package_is_one_line_before_anything_starts(tmp_path):
    # wandb hidden as if it were not installed (a None in sys.modules is how Python marks a module
    # as absent).
    hide = "import sys, runpy; sys.modules['wandb'] = None; sys.argv = sys.argv[1:]; " \
           "runpy.run_path('train.py', run_name='__main__')"
    result = run("-c", hide, "train.py", "--tracker=tensorboard,wandb",
                 f"--ckpt_dir={tmp_path / 'out'}",
                 check=False)
    assert (result.returncode, result.stderr, result.stdout) == (
        2, "error: --tracker=wandb needs the wandb package: pip install wandb\n", "")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, message", [
    ("tensorboard", "--tracker=tensorboard needs the tensorboard package: pip install tensorboard"),
    ("wandb,trackio", "--tracker=trackio needs the trackio package: pip install trackio"),
    ("tensorbord",
     "unknown --tracker=tensorbord; choose from tensorboard, wandb, trackio (a comma list)"),
])
def test_each_tracker_names_its_package(monkeypatch, spec, message):
    assert tracker_names(" tensorboard, wandb ,") == ["tensorboard",
                                                      "wandb"] and tracker_names("") == []
    monkeypatch.setitem(sys.modules, spec.split(",")[-1], None)
    with pytest.raises(UserError) as error:
        TrainConfig(tracker=spec)
    assert str(error.value) == message


def test_the_report_card_holds_the_numbers_of_log_csv(tracked):
    ckpt_dir, _ = tracked
    rows, card = log_rows(ckpt_dir), (ckpt_dir / "report.md").read_text()
    last, evals = rows[-1], [r for r in rows if r["val_loss"]]
    best = min(evals, key=lambda r: float(r["val_loss"]))
    speed = statistics.median(float(r["tokens_per_sec"]) for r in rows[1:])
    expected = [
        "the run finished at update 10",
        f"| command | `python train.py {' '.join(TRACKED)} --dataset_dir=",
        "| parameters | 540,768 |",
        f"| tokens trained | {int(last['tokens']):,} in 10 updates: 0.00 passes over 1,187,468 "
                "training tokens",
        f"| wall time | {float(last['elapsed_s']) / 60:.1f} min ({float(last['elapsed_s']):.0f} s) "
                "|",
        f"| speed | {speed:,.0f} tokens/s (median over the updates after the first)",
        f"| final validation | loss {last['val_loss']}, {last['val_bpb']} bits per byte (update "
                "10, 1,280 tokens) |",
        f"| best validation | loss {best['val_loss']}, {best['val_bpb']} bits per byte (update "
                f"{best['step']}) |",
        f"| multiple_choice.jsonl | acc {last['eval_acc']}, acc_norm {last['eval_acc_norm']} "
                "(update 10) |",
        "| tracker | `''` | `'tensorboard,wandb,trackio'` |",
        "![loss and learning rate against tokens trained](loss.png)",
        "At update 2:", "At update 4:", "At update 8:",
    ]
    for line in expected:
        assert line in card, line
    assert "At update 1:" not in card  # the last three samples only
    # The reference run's curve beside this run's final value and its evaluations at the same tokens
    # (here none).
    assert ("The reference is the README's default run (`python train.py` on data/shakespeare, "
            in card)
    assert (f"This run ended at **{last['val_bpb']} bpb** after 1,280 tokens; "
            "the reference had no evaluation that early.") in card
    assert "| 409,600 | 2.4736 |  |\n" in card and "| 1,998,848 | 2.1251 |  |\n" in card
    assert reference_at([[0, 2.0], [100, 1.0]],
                        25) == 1.75 and reference_at([[10, 2.0], [100, 1.0]], 5) is None
