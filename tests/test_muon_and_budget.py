"""Learning more per minute: --optimizer=muon (Muon for the blocks' matrices, AdamW for the rest)
and --max_minutes (a wall-clock budget that plans the run's length from timing its updates). Muon is
the default optimizer, so tests/test_train.py's whole runs check that it resumes bitwise and that
two ranks match one with accumulation."""
import csv
import re
import shutil

import pytest
import torch
from helpers import TINY, assert_same_weights, final_weights, run

import train
from budget import BUDGET_PROBE_UPDATES, replans_length
from checkpoint import checkpoint_paths
from configurator import UserError, load_config
from model import ModelConfig, Transformer
from muon import Muon, MuonAndAdamW, orthogonalize
from train import Scheduler, TrainConfig, make_optimizer


def rows(ckpt_dir) -> list[dict]:
    with open(ckpt_dir / "log.csv") as f:
        return list(csv.DictReader(f))


# --- Muon -----------------------------------------------------------------------------------------
def test_muon_takes_exactly_the_blocks_matrices_and_adamw_everything_else():
    model = Transformer(ModelConfig(vocab_size=64, n_embd=32, n_heads=2, n_kv_heads=1, n_layers=2,
                                    max_seq_len=16))
    cfg = load_config(["--optimizer=muon", "--max_lr=1e-3", "--muon_lr=2e-2",
                       "--embedding_lr=5e-3"], TrainConfig)
    opt = make_optimizer(model, cfg, "cpu")
    assert isinstance(opt, MuonAndAdamW)
    muon = [p for group in opt.muon.param_groups for p in group["params"]]
    adamw = [p for group in opt.adamw.param_groups for p in group["params"]]
    assert sorted(
        map(id, muon + adamw)) == sorted(map(id,
                                             model.parameters())), "every parameter in one group"
    in_blocks = {id(p) for p in model.layers.parameters() if p.dim() == 2}
    # wq wk wv wo w1 w2 w3 per block
    assert {id(p) for p in muon} == in_blocks and len(muon) == 2 * 7
    assert {id(model.tok_embeddings.weight), id(model.output.weight)} <= {id(p) for p in adamw}
    # One schedule, three peaks: the Scheduler scales Muon's group by muon_lr / max_lr and the
    # embedding's (a group of its own) by embedding_lr / max_lr; the output layer and the norm gains
    # peak at max_lr.
    train.Scheduler(opt, "cosine", 100, 10, cfg.max_lr, cfg.min_lr).step(9)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(2e-2)
    peaks = {id(p): group["lr"] for group in opt.adamw.param_groups for p in group["params"]}
    assert peaks.pop(id(model.tok_embeddings.weight)) == pytest.approx(5e-3)
    assert list(peaks.values()) == pytest.approx([1e-3] * len(peaks))


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_orthogonalize_sets_every_singular_value_near_one(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.linalg.svdvals(g).max() > 3 * torch.linalg.svdvals(g).min()
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.6 and s.max() < 1.25, s


def test_muon_step_equals_torch_optim_muon_up_to_its_bfloat16_arithmetic():
    # torch.optim.Muon orthogonalizes in bfloat16, ours in float32 (much faster on CPUs without bf16
    # instructions):
    # three steps from the same weights and gradients agree to bfloat16's precision.
    w = torch.randn(96, 32, generator=torch.Generator().manual_seed(1))
    ours, theirs = w.clone().requires_grad_(), w.clone().requires_grad_()
    mine = Muon([ours], lr=0.02, weight_decay=0.1)
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1,
                                 adjust_lr_fn="match_rms_adamw")
    for seed in range(3):
        ours.grad = torch.randn(96, 32, generator=torch.Generator().manual_seed(seed))
        theirs.grad = ours.grad.clone()
        mine.step()
        reference.step()
    moved = (theirs - w).norm()
    assert moved > 0.5, "the weights moved"
    # bfloat16 keeps 8 bits of mantissa: ~0.4% per number
    assert (ours - theirs).norm() < 0.03 * moved


def test_muon_needs_a_positive_max_lr():
    with pytest.raises(UserError, match="max_lr > 0"):
        load_config(["--optimizer=muon", "--max_lr=0", "--min_lr=0"], TrainConfig)


# --- the time budget ------------------------------------------------------------------------------
def test_a_budgeted_run_fills_its_minutes_and_ends_at_min_lr(shakespeare_dir, tmp_path):
    budget_s = 8.0
    out = run("train.py", *TINY, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}",
              f"--max_minutes={budget_s / 60}", "--schedule=linear").stdout
    log = rows(tmp_path)
    total = len(log)
    assert total > BUDGET_PROBE_UPDATES, "the length was planned beyond the timed updates"
    assert f"update {total}/{total} " in out and log[-1]["val_bpb"], "the last update evaluates"
    # Each update's learning rate is the schedule's under the plan in force when it ran: the first
    # plan is the timed updates, then the length each progress line shows. How the plans move
    # depends on the machine's speed; that every update follows the latest one does not.
    plans = [BUDGET_PROBE_UPDATES] + [int(n) for n in re.findall(r"^update \d+/(\d+) ", out, re.M)]
    expected = [Scheduler(None, "linear", plans[step], 2, 2e-3, 2e-4).lr_at(step)
                for step in range(total)]
    # the log keeps 4 digits
    assert [float(row["lr"]) for row in log] == pytest.approx(expected, rel=5e-4)
    assert float(
        log[-1]["lr"]) == pytest.approx(2e-4), "the decay reaches min_lr exactly at the last update"
    # The whole schedule fits the budget (loosely: shared CI machines are noisy; docs/ has measured
    # figures).
    assert 0.4 * budget_s < float(log[-1]["elapsed_s"]) < 1.5 * budget_s


def test_the_length_is_planned_after_each_of_the_first_ten_updates_then_after_every_ten():
    assert [step for step in range(1, 50) if replans_length(step)] == [*range(1, 11), 20, 30, 40]


def test_a_resumed_budgeted_run_keeps_its_schedule(shakespeare_dir, tmp_path):
    common = [*TINY, f"--dataset_dir={shakespeare_dir}", "--max_minutes=0.1", "--token_ckpt=1280",
              "--keep_ckpts=1000"]  # a checkpoint every 10 updates, each right after a re-plan
    straight = tmp_path / "straight"
    run("train.py", *common, f"--ckpt_dir={straight}")
    total = len(rows(straight))
    step_of = {torch.load(path, weights_only=True)["step"]: path
               for path in checkpoint_paths(straight)}
    last_plan = max(step for step in range(1, total) if replans_length(step))
    for at, same_until in [(20, 30), (last_plan, total)]:
        resumed = tmp_path / f"resumed_at_{at}"
        resumed.mkdir()
        shutil.copy(step_of[at], resumed)
        shutil.copy(straight / "log.csv", resumed)
        run("train.py", *common, f"--ckpt_dir={resumed}", "--load_ckpt=True")
        # The resumed run goes on with the length the checkpoint planned (the budget does not start
        # again), up to its own next re-plan, which draws on its own timings.
        assert [
            r["lr"] for r in rows(resumed)][:same_until] == [r["lr"]
                                                             for r in rows(straight)][:same_until]
    # Resumed after the last re-plan, it ends exactly as the run it continues.
    assert_same_weights(final_weights(straight), final_weights(resumed))


def test_a_budget_and_a_token_count_are_one_too_many(shakespeare_dir, tmp_path):
    result = run("train.py", *TINY, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}",
                 "--max_minutes=1", "--training_tokens=10000", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --max_minutes and --training_tokens both set the "
                                     "length of the run; pass only one of them")
