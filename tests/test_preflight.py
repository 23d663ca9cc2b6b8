"""bench.py --preflight=True: on 2 gloo ranks every row passes and the table lands in ckpt_dir; a
rank reading other data, or a checkpoint shard cut short, fails the rows that check them, with the
reason. No speed is asserted."""
import json
import os

import pytest
from helpers import ROOT, TINY, run

import bench
from configurator import UserError


def test_preflight_on_two_cpu_ranks_passes_every_row_and_writes_the_table(
        shakespeare_dir, tmp_path):
    out = run("-m torch.distributed.run --standalone --nproc_per_node=2 bench.py --preflight=True",
              *TINY,
              f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}", "--steps=1",
              "--warmup=1",
              "--compile=auto").stdout  # auto: the config's rows eager and compiled
    table = (tmp_path / "preflight.txt").read_text()
    assert table in out
    rows = table.splitlines()[2:]
    assert len(rows) == 15 and all("  PASS  " in row for row in rows), table
    for check in ("DDP, 2 ranks = 1 rank", "FSDP, 2 ranks = 1 rank",
                  "checkpoint 2 -> 2 ranks, bitwise",
                  "checkpoint 2 -> 1 rank", "kill -9 mid-save", "fp16 + loss scaler, 2 ranks",
                  "dtype and attention",
                  "all-reduce bus bandwidth",
                  "all-gather bus bandwidth", "your config, DDP, eager",
                  "your config, DDP, compiled",
                  "your config, FSDP, eager", "your config, FSDP, compiled", "projected run",
                  "checkpoint disk"):
        assert any(row.startswith(check) for row in rows), check
    # TINY trains in fp32 (dropout 0): PyTorch's fused CPU attention kernel; the fp16 run skipped
    # nothing.
    assert "  float32, attention: flash (CPU)" in table and "0 skipped, loss scale 65536" in table
    assert os.listdir(tmp_path) == ["preflight.txt"]  # the scratch checkpoints are gone


# Runs single checks under torchrun with a fault injected: rank 1's targets shifted by one token,
# then every sharded checkpoint's rank-1 shard cut to 100 bytes right after it is written.
BROKEN = """
import dataclasses, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import checkpoint, preflight
from configurator import load_config
from tokenizer import load_tokenizer
from train import DatasetLoader, TrainConfig, distributed
import torch.distributed as dist

class OtherDataOnRank1(DatasetLoader):
    def next_batch(self):
        x, y = super().next_batch()
        return x, ((y + 1) % self.vocab_size if self.rank == 1 else y)

def save_then_truncate(*args, **kwargs):
    path = checkpoint.save_checkpoint(*args, **kwargs)
    if dist.get_rank() == 0:
        shard = path / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
    dist.barrier()
    return path

cfg = load_config([f"--dataset_dir={sys.argv[2]}", "--device=cpu"], TrainConfig)
checks = [preflight.check_ddp_equals_one_rank, preflight.check_fsdp_equals_one_rank,
          preflight.check_resume_on_n_ranks, preflight.check_resume_on_one_rank,
          preflight.check_kill_mid_save]
sharded = dataclasses.replace(cfg, fsdp=True)
with distributed(sharded, preflight.PREFLIGHT_TIMEOUT) as (rank, world_size, device):
    rows = {}
    faults = (("data", "DatasetLoader", OtherDataOnRank1),
              ("shard", "save_checkpoint", save_then_truncate))
    for fault, name, broken in faults:
        scratch = Path(sys.argv[3], fault)  # a checkpoint directory of its own for each fault
        scratch.mkdir(exist_ok=True)
        vocab_size = load_tokenizer(cfg.dataset_dir).vocab_size
        m = preflight.Machine(cfg, rank, world_size, device, vocab_size, scratch)
        original = getattr(preflight, name)
        setattr(preflight, name, broken)
        rows[fault] = [dataclasses.asdict(preflight.guarded(m, c.__name__, c)) for c in checks]
        setattr(preflight, name, original)
    if rank == 0:
        Path(sys.argv[3], "rows.json").write_text(json.dumps(rows))
"""


def test_a_rank_with_other_data_or_a_truncated_shard_fails_the_rows_that_check_it(
        shakespeare_dir, tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(BROKEN)
    run(f"-m torch.distributed.run --standalone --nproc_per_node=2 {script}", str(ROOT),
        str(shakespeare_dir),
        str(tmp_path))
    rows = json.loads((tmp_path / "rows.json").read_text())
    passed = {fault: [row["passed"] for row in found] for fault, found in rows.items()}
    # Other data on rank 1: every comparison of N ranks with one fails; the checkpoint restores
    # bitwise still.
    assert passed["data"] == [False, False, True, False, True], rows["data"]
    assert "the losses differ" in rows[
        "data"][0]["reason"] and "different data" in rows["data"][1]["reason"]
    # A shard cut short: nothing that reads the checkpoint passes, and the reason names the damage.
    assert passed["shard"] == [True, True, False, False, False], rows["shard"]
    assert all("damaged" in row["reason"] for row in rows["shard"][2:]), rows["shard"]


def test_preflight_outside_torchrun_is_refused_with_the_command_to_run():
    with pytest.raises(UserError,
                       match="torchrun --standalone --nproc_per_node=N bench.py --preflight=True"):
        bench.main(["--preflight=True"])
