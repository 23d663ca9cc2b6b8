"""fp16 mixed precision, for the GPUs without bf16 (T4, V100): a loss scaler keeps small gradients
from rounding to zero, an update whose gradients overflow is skipped, said and logged, a resume is
exact, and dtype=auto on a CUDA GPU decides by its compute capability, never by whether PyTorch can
emulate bf16. All of it runs on the CPU, which emulates fp16: slowly, but the tiny model takes
seconds."""
import csv
import math
import os
import shutil

import pytest
import torch
from helpers import TINY, assert_same_weights, final_weights, run
from safetensors.torch import load_file

import hardware
import preemption
import train
from checkpoint import checkpoint_paths
from configurator import UserError, load_config
from export import ExportConfig, export
from model import Transformer
from muon import orthogonalize
from preflight import drift_tolerance
from train import DatasetLoader, TrainConfig, make_optimizer, make_scaler, train_update

FP16 = [arg for arg in TINY if not arg.startswith("--dtype")] + ["--dtype=float16"]
# checkpoints after 5 and 10
TEN_UPDATES = ["--training_tokens=1280", "--token_ckpt=640", "--keep_ckpts=5"]
# The log's columns: DESIGN.md's eleven, whether the loss scaler skipped the update, --eval_data's
# accuracies, --eval_suite's aggregate.
HEADER = ("step,progress_pct,train_loss,perplexity,lr,grad_norm,tokens,tokens_per_sec,elapsed_s,"
          "val_loss,val_bpb,skipped,eval_acc,eval_acc_norm,suite")


def log_rows(ckpt_dir) -> list[dict]:
    with open(os.path.join(ckpt_dir, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def last_checkpoint(ckpt_dir) -> dict:
    return torch.load(checkpoint_paths(ckpt_dir)[-1], weights_only=True)


@pytest.fixture(scope="module")
def fp16_run(shakespeare_dir, tmp_path_factory):
    """Ten updates of the tiny model in fp16, uninterrupted: what the resumed and the two-rank runs
    must match."""
    ckpt_dir = tmp_path_factory.mktemp("fp16")
    run("train.py", *FP16, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={ckpt_dir}",
        *TEN_UPDATES)
    return ckpt_dir


# --- dtype=auto on a CUDA GPU ---------------------------------------------------------------------
@pytest.mark.parametrize("capability, dtype", [
    ((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),  # H100, A100
    ((7, 5), torch.float16), ((7, 0), torch.float16), ((6, 0), torch.float16),  # T4, V100, P100
    # GTX 1080 (fp16 at a fraction of fp32's speed), Maxwell
    ((6, 1), torch.float32), ((5, 2), torch.float32),
])
def test_auto_on_a_gpu_decides_by_compute_capability_not_by_emulated_bf16(
        monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # as on a T4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.pick_dtype("auto", "cuda") == dtype
    # train.py, bench.py and the preflight ask choose_speed; on a GPU it measures nothing (no model
    # needed).
    chosen, compile, why = hardware.choose_speed(TrainConfig(dtype="auto", compile="auto"), None,
                                                 None, "cuda:0")
    # Triton, for torch.compile, needs 7.0
    assert chosen == dtype and compile == (capability >= (7, 0))
    assert why.startswith(f"auto: dtype: compute capability {capability[0]}.{capability[1]} ")


def test_the_reason_is_printed_and_an_impossible_compile_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert hardware.choose_speed(TrainConfig(dtype="auto", compile="auto"), None, None, "cuda") == (
        torch.float16, True, "auto: dtype: compute capability 7.5 has fast fp16 but no bf16 "
                             "(from 8.0): fp16 with a loss scaler")
    assert hardware.choose_speed(TrainConfig(dtype="bfloat16", compile=False), None, None,
                                 "cuda") == (
        torch.bfloat16, False, "auto: dtype: bfloat16 as asked, which this GPU emulates (auto: "
                                             "float16)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    assert hardware.choose_speed(TrainConfig(dtype="auto", compile="auto"), None, None,
                                 "cuda")[1:] == (
        False, "auto: dtype: compute capability 6.1 runs fp16 no faster than fp32; compile: no, "
                                                 "Triton needs compute "
               "capability 7.0")
    with pytest.raises(UserError,
                       match="Triton needs compute capability 7.0 and this GPU has 6.1; use "
                                        "--compile=False"):
        hardware.choose_speed(TrainConfig(dtype="float32", compile=True), None, None, "cuda")


def test_float16_is_a_dtype_the_config_takes():
    assert load_config(["--dtype=float16"], TrainConfig).dtype == "float16"
    with pytest.raises(UserError, match="--dtype must be auto, float32, bfloat16 or float16"):
        load_config(["--dtype=half"], TrainConfig)


# --- one update -----------------------------------------------------------------------------------
def tiny_setup(shakespeare_dir, batch_size=2, optimizer="muon", dtype="float16"):
    cfg = load_config([*FP16[:-1], f"--dataset_dir={shakespeare_dir}", f"--batch_size={batch_size}",
                       f"--optimizer={optimizer}", f"--dtype={dtype}"], TrainConfig)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_config(8192))
    loader = DatasetLoader(cfg.dataset_dir, "train", cfg.batch_size, cfg.max_seq_len)
    return cfg, model, make_optimizer(model, cfg, "cpu"), loader


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_an_update_whose_fp16_gradients_overflow_is_skipped_and_the_scale_halved(
        shakespeare_dir, optimizer):
    cfg, model, opt, loader = tiny_setup(shakespeare_dir, optimizer=optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the scaled gradients overflow fp16's 65504
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    loss, grad_norm = train_update(model, opt, loader, 2, cfg, "cpu", torch.float16, scaler)
    assert math.isfinite(loss) and not math.isfinite(grad_norm) and scaler.get_scale() == 2.0**39
    assert_same_weights(model.state_dict(), before)  # the optimizer did not step ...
    moments = [t for o in getattr(opt, "optimizers", [opt]) for state in o.state.values()
               for t in state.values()]
    # ... nor keep anything of the overflowed gradients
    assert not any(torch.any(t) for t in moments)
    scaler.update(new_scale=2.0**16)
    _, grad_norm = train_update(model, opt, loader, 2, cfg, "cpu", torch.float16, scaler)
    assert math.isfinite(grad_norm) and scaler.get_scale() == 2.0**16
    assert not torch.equal(model.state_dict()["output.weight"], before["output.weight"])


def test_accumulated_fp16_gradients_are_unscaled_once_to_the_fp32_mean(shakespeare_dir):
    """Two micro-steps under the scaler: the logged norm is the true gradient's (not 2^16 times it,
    nor the sum of the micro-steps'), and three updates move every weight matrix as fp32's do,
    within fp16's rounding. (A few weights whose gradient is near zero step the other way: AdamW
    moves a weight by its learning rate whatever the gradient's size, so the weights are compared by
    their whole change.)"""
    results = {}
    for dtype in ("float32", "float16"):
        cfg, model, opt, loader = tiny_setup(shakespeare_dir, dtype=dtype)
        start = {name: w.clone() for name, w in model.state_dict().items()}
        scaler = make_scaler("cpu", getattr(torch, dtype))
        updates = [train_update(model, opt, loader, 2, cfg, "cpu", getattr(torch, dtype), scaler)
                   for _ in range(3)]
        results[dtype] = updates, {name: w - start[name] for name, w in model.state_dict().items()}
    (updates32, moved32), (updates16, moved16) = results["float32"], results["float16"]
    for (loss32, norm32), (loss16, norm16) in zip(updates32, updates16, strict=True):
        assert loss16 == pytest.approx(loss32, abs=1e-3) and norm16 == pytest.approx(norm32,
                                                                                     rel=1e-3)
    for name, change in moved32.items():
        assert (moved16[name] - change).norm() < 0.02 * change.norm(), name


def test_muon_orthogonalizes_in_fp16_for_an_fp16_run_finite_and_closer_to_exact_than_bf16():
    torch.manual_seed(0)
    g = torch.randn(128, 352) * 1e-3
    exact = orthogonalize(g.double(), dtype=torch.float64)
    errors = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = orthogonalize(g, dtype=dtype)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        errors[dtype] = ((out.double() - exact).norm() / exact.norm()).item()
    assert errors[torch.float32] < errors[torch.float16] < errors[torch.bfloat16] / 3
    assert make_optimizer(Transformer(TrainConfig(dtype="float16").model_config(64)),
                          TrainConfig(dtype="float16"),
                          "cpu").muon.dtype == torch.float16
    model = Transformer(TrainConfig().model_config(64))
    assert make_optimizer(model, TrainConfig(), "cpu").muon.dtype == torch.float32


# --- whole runs -----------------------------------------------------------------------------------
def test_a_float16_run_ends_finite_next_to_float32_and_saves_fp32_weights(
        fp16_run, shakespeare_dir, tmp_path):
    run("train.py", *TINY, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path / 'fp32'}",
        *TEN_UPDATES)
    half, full = log_rows(fp16_run), log_rows(tmp_path / "fp32")
    assert (fp16_run / "log.csv").read_text().splitlines()[0] == HEADER
    assert all(math.isfinite(float(r["train_loss"])) and r["skipped"] == "0" for r in half)
    assert float(half[-1]["train_loss"]) == pytest.approx(float(full[-1]["train_loss"]), abs=0.01)
    assert float(half[-1]["val_loss"]) == pytest.approx(float(full[-1]["val_loss"]), abs=0.01)
    ckpt = last_checkpoint(fp16_run)
    assert ckpt[
        "config"]["dtype"] == "float16" and {t.dtype
                                             for t in ckpt["model"].values()} == {torch.float32}
    assert ckpt["scaler"] == {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                              "growth_interval": 2000,
                              # PyTorch's defaults, ten updates without an overflow
                              "_growth_tracker": 10}
    assert last_checkpoint(tmp_path / "fp32")["scaler"] == {}  # fp32 needs no loss scale
    export(ExportConfig(ckpt_dir=str(fp16_run), out_dir=str(tmp_path / "hf")))
    assert {t.dtype
            for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.float32}


class OverflowAtUpdate(torch.amp.GradScaler):
    """A loss scaler whose scaled loss turns to inf at the given updates (counted from 1), as a real
    overflow would turn the gradients: every gradient is then inf or NaN. `init_scale` starts lower
    to reach a scale below 1."""

    def __init__(self, device, updates, init_scale=2.0**16):
        super().__init__(device, init_scale=init_scale)
        self.updates, self.calls = updates, 0

    def scale(self, loss):
        self.calls += 1  # one call per micro-step: TINY takes two per update
        return super().scale(loss) * (math.inf if (self.calls + 1) // 2 in self.updates else 1.0)


def in_process(argv, monkeypatch, capsys, updates, init_scale=2.0**16) -> str:
    """train.main(argv) in this process with a scaler that overflows at `updates`; what it
    printed."""
    monkeypatch.setattr(train, "make_scaler", lambda device,
                        dtype: OverflowAtUpdate(device, updates, init_scale))
    # leave pytest's Ctrl-C handler in place
    monkeypatch.setattr(preemption.signal, "signal", lambda *args: None)
    try:
        train.main(argv)
    finally:
        printed = capsys.readouterr().out
    return printed


def test_an_overflowing_update_is_skipped_said_in_its_line_and_logged(
        shakespeare_dir, tmp_path, monkeypatch, capsys):
    argv = [*FP16, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}",
            "--training_tokens=768"]
    printed = in_process(argv, monkeypatch, capsys, updates={3})
    lines = [line for line in printed.splitlines() if line.startswith("update ")]
    assert [("skipped" in line) for line in lines] == [False, False, True, False, False, False]
    assert lines[2].endswith("| skipped: a gradient overflowed fp16, the loss scale is halved")
    rows = log_rows(tmp_path)
    assert [r["skipped"] for r in rows] == ["0", "0", "1", "0", "0", "0"]
    assert rows[2]["grad_norm"] in ("inf", "nan") and math.isfinite(float(rows[2]["train_loss"]))
    # halved once, then 3 clean updates
    assert last_checkpoint(tmp_path)["scaler"]["scale"] == 32768.0


def test_a_scale_driven_below_one_ends_the_run_as_diverged(
        shakespeare_dir, tmp_path, monkeypatch, capsys):
    argv = [*FP16, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}",
            "--training_tokens=768"]
    with pytest.raises(train.TrainingDiverged, match="at update 3; .* or --dtype=float32") as error:
        # 4 -> 2 -> 1 -> 0.5
        in_process(argv, monkeypatch, capsys, updates={1, 2, 3, 4, 5, 6}, init_scale=4.0)
    assert error.value.exit_status == 1 and not checkpoint_paths(tmp_path)


def test_a_stopped_and_resumed_float16_run_ends_bitwise_where_the_uninterrupted_one_does(
        fp16_run, shakespeare_dir, tmp_path):
    shutil.copy(fp16_run / "ckpt_00000005.pt", tmp_path)
    shutil.copy(fp16_run / "log.csv", tmp_path)
    out = run("train.py", *FP16, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}",
              *TEN_UPDATES,
              "--load_ckpt=True").stdout
    assert "at update 5" in out
    assert_same_weights(final_weights(fp16_run), final_weights(tmp_path))
    # The loss scaler's state came back too: a fresh one would have counted 5 clean updates, not 10.
    assert last_checkpoint(tmp_path)["scaler"] == last_checkpoint(fp16_run)["scaler"]
    assert [r["train_loss"] for r in log_rows(tmp_path)] == [r["train_loss"]
                                                             for r in log_rows(fp16_run)]


def test_two_ddp_ranks_in_float16_match_one_rank_with_accumulation(
        fp16_run, shakespeare_dir, tmp_path):
    run("-m torch.distributed.run --standalone --nproc_per_node=2 train.py", *FP16,
        f"--dataset_dir={shakespeare_dir}",
        f"--ckpt_dir={tmp_path}", *TEN_UPDATES)  # 2 ranks x 1 micro-step against 1 rank x 2
    assert_same_weights(final_weights(fp16_run), final_weights(tmp_path),
                        atol=drift_tolerance(TrainConfig.embedding_lr, 10))
    assert last_checkpoint(tmp_path)["scaler"] == last_checkpoint(fp16_run)["scaler"]
