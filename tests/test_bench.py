"""bench.py: it times train.py's own update and reports speed, MFU, memory and the loader's share
(no speed limits)."""
import re

import pytest
from helpers import TINY, run

import bench
import hardware
from configurator import UserError, load_config
from train import TrainConfig


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match[1].replace(",", ""))


def test_bench_options_are_separated_from_the_training_config():
    own, rest = bench.split_argv(["config/x.py", "--steps=3", "--batch_size=4", "--warmup=0",
                                  "--profile=True"])
    assert own == ["--steps=3", "--warmup=0", "--profile=True"]
    assert rest == ["config/x.py", "--batch_size=4"]


def test_bench_reports_tokens_per_second_mfu_memory_and_loader_share(shakespeare_dir):
    result = run("bench.py", *TINY, f"--dataset_dir={shakespeare_dir}", "--steps=2", "--warmup=1",
                 "--profile=True")
    out = result.stdout
    # tokens_per_update=128 over batches of 2x32: accumulation is timed too
    assert "2 micro-steps of 2x32" in out
    assert number(r"median ([\d.]+) ms over 2 updates", out) > 0
    assert number(r"tokens/s: ([\d,]+)", out) > 0
    assert number(r"matmul probe: ([\d,.]+) GFLOP/s \(cpu, float32\)", out) > 0
    assert 0 < number(r"MFU: ([\d.]+)%", out) < 100
    # the process holds at least PyTorch itself
    assert number(r"peak memory: ([\d,]+) MiB", out) > 100
    assert 0 <= number(r"data loader: ([\d.]+)% of update time", out) < 100
    assert "aten::mm" in out  # the profile's operator table


def test_bench_without_a_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="python prepare.py"):
        bench.main([*TINY, f"--dataset_dir={tmp_path / 'missing'}"])


def test_bench_rejects_a_zero_step_count():
    with pytest.raises(UserError, match="--steps must be at least 1"):
        bench.main(["--steps=0"])


def test_the_memory_estimate_counts_the_optimizer_the_run_uses():
    # AdamW keeps two fp32 moments per parameter; Muon one momentum for each of the blocks'
    # matrices, which in the default model hold 4 blocks x (4 x 128x128 attention + 3 x 128x384
    # SwiGLU) = 851,968 parameters.
    def optimizer_bytes(argv, fsdp=False):
        cfg = load_config(argv, TrainConfig)
        return hardware.memory_estimate(cfg, 8192, world_size=4, fsdp=fsdp,
                                        checkpointing=False)["optimizer"]

    n = 2_950_272
    assert optimizer_bytes(["--optimizer=adamw"]) == 8 * n
    assert optimizer_bytes(["--optimizer=muon"]) == 8 * n - 4 * 851_968
    # FSDP shards it, Muon's momentum like AdamW's moments: a quarter on each of 4 ranks.
    assert optimizer_bytes(["--optimizer=muon"], fsdp=True) == (8 * n - 4 * 851_968) / 4
