"""Runs that read their training tokens more than once: the passes said at start-up, at most
--max_passes of them (5) whatever length or budget the run is given, the checkpoint with the lowest
validation loss saved and kept by a run beyond 2 passes and taken by sample.py and export.py, and a
rising validation loss said in the progress line."""
import random
import re
import shutil

import pytest
import torch
from helpers import TINY, run

import checkpoint
from passes import REPEATS_FROM, ValidationRecord, most_updates, passes_line


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """About 1,500 training tokens: a run of 15,360 tokens reads them about 10 times."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(12)) + "\n"
                            for _ in range(60)))
    data = path.parent / "data"
    run("prepare.py", f"--input={path}", f"--out_dir={data}", "--vocab_size=280")
    return data


# --- how many passes, and what a run that repeats its data does -----------------------------------
def test_up_to_two_passes_a_run_only_says_them_beyond_it_keeps_its_best_checkpoint():
    assert REPEATS_FROM == 2  # up to here runs end at their lowest validation loss (docs/)
    assert passes_line({"passes": 0.5}, 2_000) == "data: 0.5 passes over 2,000 training tokens"
    assert passes_line({"passes": 2.0}, 2_000) == "data: 2 passes over 2,000 training tokens"
    assert passes_line({"passes": 3.0}, 2_000) == (
        "data: 3 passes over 2,000 training tokens; beyond 2 passes the validation loss can rise "
        "again, so this run saves a checkpoint at each new lowest validation loss and keeps it "
        "(--ckpt=best in sample.py and export.py)")
    assert passes_line({"passes": 9.95, "limited": True}, 2_000).startswith(
        "data: 9.95 passes over 2,000 training tokens, the most a run makes (--max_passes): more "
        "passes end no lower, so it ends there, before the length it was given; beyond 2 passes")


def test_a_run_makes_at_most_max_passes_over_its_data_whatever_length_it_is_given(
        small_corpus, tmp_path):
    assert most_updates(10, 1_525, 128) == 119 and most_updates(0.01, 1_525, 128) == 1
    assert most_updates(0, 1_525, 128) > 10**15  # 0: no limit
    args = [*TINY, f"--dataset_dir={small_corpus}", "--compile=False", "--model_gen_multiplier=0"]
    out = run("train.py", *args, f"--ckpt_dir={tmp_path / 'tokens'}",
              "--training_tokens=15360").stdout
    assert "| 59 updates of 128 tokens" in out.splitlines()[0]  # asked for 120
    assert out.splitlines()[1].startswith(
        "data: 4.95 passes over 1,525 training tokens, the most a run makes")
    assert re.search(r"^update 59/59 .*\| val loss", out, re.M)
    # A budget that holds more than the limit ends at it too, long before the budget: here 20
    # updates, a length the budget is planned again at.
    out = run("train.py", *args, f"--ckpt_dir={tmp_path / 'budget'}", "--max_minutes=5",
              "--max_passes=1.75").stdout
    assert re.findall(r"^update (\d+)/(\d+) ", out, re.M)[-1] == ("20", "20")
    assert "data: 1.68 passes over 1,525 training tokens, the most a run makes" in out


def test_a_run_says_its_passes_keeps_its_best_checkpoint_and_names_it_last(small_corpus, tmp_path):
    out = run("train.py", *TINY, f"--dataset_dir={small_corpus}", f"--ckpt_dir={tmp_path}",
              "--compile=False", "--training_tokens=15360", "--keep_ckpts=1",
              "--max_passes=0").stdout
    lines = out.splitlines()
    assert lines[1].startswith("data: 10.1 passes over 1,525 training tokens; beyond 2 passes")
    # Each evaluation with a new lowest validation loss is saved (keep_ckpts=1 deletes the rest,
    # except the best).
    val = {int(m[1]): float(m[2])
           for m in re.finditer(r"^update (\d+)/120 .*\| val loss ([\d.]+)", out, re.M)}
    saved = [int(m) for m in re.findall(r"^saved .*ckpt_(\d+)\.pt$", out, re.M)]
    lowest = [s for s in sorted(val) if val[s] < min([val[t] for t in val if t < s], default=99)]
    assert set(lowest) <= set(saved) and saved[-1] == 120
    best = min(val, key=val.get)
    assert lines[-1].startswith("lowest validation loss of the saved checkpoints: ") and \
        lines[-1].endswith(f"bpb at update {best}, in {tmp_path}/ckpt_{best:08d}.pt (sample.py "
                           "and export.py take it as --ckpt=best)")
    assert {p.name for p in checkpoint.checkpoint_paths(tmp_path)} == {f"ckpt_{best:08d}.pt",
                                                                       "ckpt_00000120.pt"}


def test_a_budgeted_run_says_its_passes_once_its_length_is_planned_and_keeps_that_plan_on_resume(
        small_corpus, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*TINY, f"--dataset_dir={small_corpus}", "--compile=False", "--max_minutes=0.1",
            "--token_ckpt=1280"]
    lines = run("train.py", *args, f"--ckpt_dir={straight}", "--keep_ckpts=100").stdout.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("data: ")]
    updates = [int(line.split()[1].split("/")[0]) for line in lines[:said[0]]
               if line.startswith("update ")]
    assert len(said) == 1 and updates[-1] == 10  # said before update 11
    # Resumed after update 20, when its length has been planned again, the run goes on with the plan
    # of update 10.
    resumed.mkdir()
    shutil.copy(straight / "ckpt_00000020.pt", resumed)
    again = run("train.py", *args, f"--ckpt_dir={resumed}", "--load_ckpt=True").stdout.splitlines()
    assert [line for line in again if line.startswith("data: ")] == [lines[said[0]]]


# --- the best checkpoint --------------------------------------------------------------------------
def test_keep_ckpts_never_deletes_the_best_checkpoint(tmp_path):
    state = {"weights": torch.zeros(2)}
    first = checkpoint.save_checkpoint(str(tmp_path), 1, state, keep=1)
    for step in (2, 3):
        checkpoint.save_checkpoint(str(tmp_path), step, state, keep=1, best=first)
    assert [p.name for p in checkpoint.checkpoint_paths(tmp_path)] == ["ckpt_00000001.pt",
                                                                       "ckpt_00000003.pt"]
    checkpoint.save_checkpoint(str(tmp_path), 4, state, keep=1)
    assert [p.name for p in checkpoint.checkpoint_paths(tmp_path)] == ["ckpt_00000004.pt"]


def test_sample_and_export_take_the_best_checkpoint_or_say_there_is_none(small_corpus, tmp_path):
    ckpt_dir = tmp_path / "out"
    run("train.py", *TINY, f"--dataset_dir={small_corpus}", f"--ckpt_dir={ckpt_dir}",
        "--compile=False",
        "--training_tokens=1024", "--token_ckpt=512", "--keep_ckpts=2")
    # Mark the first checkpoint the best, as a run whose validation loss rose after it would have.
    first, newest = checkpoint.checkpoint_paths(ckpt_dir)
    state = torch.load(newest, weights_only=True)
    assert state["validation"]["best_saved"][0] == 8
    state["validation"]["best_saved"] = (4, 5.0, 4.0)
    torch.save(state, newest)
    text = run("sample.py", f"--ckpt_dir={ckpt_dir}", "--ckpt=best", "--max_new_tokens=5").stdout
    assert text.startswith(f"# {first} (update 4, 512 tokens)")
    run("export.py", f"--ckpt_dir={ckpt_dir}", "--ckpt=best", f"--out_dir={tmp_path / 'hf'}")
    # the model card
    assert "512 (4 updates of 128 tokens" in (tmp_path / "hf" / "README.md").read_text()
    state["validation"]["best_saved"] = None  # no checkpoint was saved at an evaluation
    torch.save(state, newest)
    result = run("sample.py", f"--ckpt_dir={ckpt_dir}", "--ckpt=best", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {newest} records no checkpoint saved at an "
                                     "evaluation; pass --ckpt=PATH instead of best")


# --- a rising validation loss ---------------------------------------------------------------------
def test_validation_loss_rising_three_evaluations_in_a_row_is_said():
    record = ValidationRecord()
    notes = []
    for step, loss in zip(range(100, 800, 100), [3.0, 2.0, 2.1, 2.2, 2.3, 2.25, 2.4], strict=True):
        record.add(step, loss, loss / 2)
        notes.append(record.note())
    assert notes[:4] == ["", "", "", ""]  # one and two rises: noise as often as not
    assert notes[4] == " | val loss rising 3 evaluations in a row (lowest 1.0000 bpb at update 200)"
    assert notes[5:] == ["", ""]  # a fall starts the count again
    assert (record.best_step, record.best) == (200, 2.0)
