"""--fsdp=True: sharded training computes what unsharded training does, its checkpoints survive
crashes and move between numbers of ranks, the default batch fits any world size, and the memory
estimate matches a measurement.

Every multi-rank run goes through torchrun on CPU (gloo), as a user would start it."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch.distributed as dist
from helpers import (
    OTHER_ROUNDING,
    PEAK_LR,
    ROOT,
    TINY_384,
    RunsCode,
    assert_same_curve,
    assert_same_weights,
    communicate,
    descendants,
    final_weights,
    free_port,
    logged,
    run,
    torchrun,
    toy_dataset,
)

import hardware
import muon
import train
from checkpoint import checkpoint_paths, load_checkpoint
from configurator import UserError, load_config
from preflight import drift_tolerance
from train import DatasetLoader, TrainConfig, accumulation_steps, fit_batch

SHARDED = [*TINY_384, "--fsdp=True", "--schedule=constant", "--token_ckpt=1536", "--keep_ckpts=5"]
TWELVE = "--training_tokens=4608"  # 12 updates
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.fixture(scope="module")
def reference(shakespeare_dir, tmp_path_factory):
    """An uninterrupted FSDP run on 2 ranks: 12 updates, sharded checkpoints after updates 4, 8 and
    12."""
    out = tmp_path_factory.mktemp("reference")
    torchrun(2, *SHARDED, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={out}", TWELVE)
    return out


# --- what an FSDP run computes --------------------------------------------------------------------
def test_two_and_three_sharded_ranks_match_one_process_with_accumulation(
        reference, shakespeare_dir, tmp_path):
    assert [p.name for p in checkpoint_paths(reference)] == ["ckpt_00000004", "ckpt_00000008",
                                                             "ckpt_00000012"]
    assert sorted(os.listdir(checkpoint_paths(reference)[-1])) == [".metadata", "__0_0.distcp",
                                                                   "__1_0.distcp",
                                                                   "train_state.pt"]
    common = [*TINY_384, "--schedule=constant", f"--dataset_dir={shakespeare_dir}", TWELVE]
    # One process, no FSDP, 6 micro-steps per update; and activation checkpointing, which must
    # change nothing.
    run("train.py", *common, f"--ckpt_dir={tmp_path / 'one'}", "--activation_checkpointing=True",
        env=os.environ | OTHER_ROUNDING)
    torchrun(3, *common, "--fsdp=True", f"--ckpt_dir={tmp_path / 'three'}")
    # DDP, each rank orthogonalizing a third
    torchrun(3, *common, f"--ckpt_dir={tmp_path / 'ddp_three'}")
    # The same losses and the same global gradient norm (before clipping) at every update, the same
    # weights after.
    for other in ("one", "three", "ddp_three"):
        assert_same_curve(logged(reference), logged(tmp_path / other), range(1, 13))
        assert_same_curve(logged(reference), logged(tmp_path / other), range(1, 13),
                          column="grad_norm")
        assert_same_weights(final_weights(reference), final_weights(tmp_path / other),
                            atol=drift_tolerance(PEAK_LR, 12))


def test_adamw_sharded_on_two_ranks_matches_one_process(shakespeare_dir, tmp_path):
    common = [*TINY_384, "--optimizer=adamw", "--schedule=constant",
              f"--dataset_dir={shakespeare_dir}",
              "--training_tokens=1536"]  # 4 updates
    run("train.py", *common, f"--ckpt_dir={tmp_path / 'one'}", env=os.environ | OTHER_ROUNDING)
    torchrun(2, *common, "--fsdp=True", f"--ckpt_dir={tmp_path / 'two'}")
    assert_same_curve(logged(tmp_path / "one"), logged(tmp_path / "two"), range(1, 5))
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"),
                        atol=drift_tolerance(train.TrainConfig.max_lr, 4))


# --- sharded checkpoints --------------------------------------------------------------------------
def test_a_two_rank_checkpoint_resumes_on_one_rank_then_on_three(
        reference, shakespeare_dir, tmp_path):
    args = [*SHARDED, f"--dataset_dir={shakespeare_dir}", "--load_ckpt=True"]
    one, three = tmp_path / "one", tmp_path / "three"
    one.mkdir()
    (one / "log.csv").write_text((reference / "log.csv").read_text())
    shutil.copytree(reference / "ckpt_00000004", one / "ckpt_00000004")
    # 2 ranks -> 1 rank (6 micro-steps each skipping the reduce-scatter but the last), with
    # activation checkpointing, up to update 8 ...
    out = torchrun(1, *args, f"--ckpt_dir={one}", "--training_tokens=3072",
                   "--activation_checkpointing=True",
                   env=os.environ | OTHER_ROUNDING).stdout
    assert "resumed from" in out and "at update 4" in out
    assert_same_curve(logged(reference), logged(one), range(1, 9))
    # ... then that 1-rank checkpoint on 3 ranks, to the end: Muon's momentum and AdamW's moments
    # re-sharded.
    shutil.copytree(one, three)
    torchrun(3, *args, f"--ckpt_dir={three}", TWELVE)
    assert_same_curve(logged(reference), logged(three), range(1, 13))
    assert_same_weights(final_weights(reference), final_weights(three),
                        atol=drift_tolerance(PEAK_LR, 12))
    # sample.py reads a sharded checkpoint in one process
    text = run("sample.py", f"--ckpt_dir={three}", "--prompt=ROMEO:", "--max_new_tokens=5").stdout
    assert "ckpt_00000012 (update 12, 4,608 tokens)" in text


def test_load_checkpoint_gives_the_whole_state_in_one_process(reference):
    ckpt = load_checkpoint(checkpoint_paths(reference)[-1])
    assert ckpt["step"] == 12 and ckpt["tokens"] == 4608 and ckpt["config"]["fsdp"] is True
    assert ckpt["model"]["tok_embeddings.weight"].shape == (8192, 32)  # whole, not one rank's half
    state = ckpt["optimizer"]["state"]
    assert set(state["output.weight"]) == {"exp_avg", "exp_avg_sq", "step"}  # AdamW
    assert set(state["layers.0.feed_forward.w1.weight"]) == {"momentum_buffer"}  # Muon
    assert state["layers.0.feed_forward.w1.weight"]["momentum_buffer"].shape == (128, 32)  # whole
    assert len(ckpt["rng"]) == 2  # one random state per rank
    assert ckpt["loader"] == {"shard": 0, "offset": 12 * 384, "passes": 0}
    # what sample.py, export.py read
    weights_only = load_checkpoint(checkpoint_paths(reference)[-1], tensors="model")
    assert weights_only["optimizer"]["state"] == {}
    assert_same_weights(weights_only["model"], ckpt["model"])


def test_sigterm_then_kill_9_then_auto_resume_is_bitwise_equal_to_an_uninterrupted_run(
        reference, shakespeare_dir, tmp_path):
    cmd = [*TORCHRUN, "--nproc_per_node=2", "train.py", *SHARDED,
           f"--dataset_dir={shakespeare_dir}",
           f"--ckpt_dir={tmp_path}", TWELVE, "--load_ckpt=auto"]

    def interrupt(at_line: str, sig) -> tuple[str, str]:
        # A new session makes the job its own process group: what a scheduler or a dying node takes
        # down at once.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True,
                                start_new_session=True)
        seen = ""
        for line in proc.stdout:
            seen += line
            if line.startswith(at_line):
                if sig == signal.SIGKILL:  # a crash: the ranks die at once, wherever they are
                    for pid in descendants(proc.pid):
                        os.kill(pid, sig)
                os.killpg(proc.pid, sig)
                break
        out, err = communicate(proc, timeout=120)
        return seen + out, err

    out, err = interrupt("update 2/", signal.SIGTERM)
    assert "stopped by signal" in out, err
    assert "train.py" not in err and "ChildFailedError" not in err, err  # every rank exited 0
    assert checkpoint_paths(tmp_path)[-1].name in ("ckpt_00000002", "ckpt_00000003")
    interrupt("update 5/", signal.SIGKILL)  # no handler runs anywhere
    newest = int(checkpoint_paths(tmp_path)[-1].name[5:13])
    assert newest < 12, "killed too late to test anything"
    # What a kill while writing the next checkpoint leaves (maybe it did already); the resumed run
    # rewrites it.
    torn = tmp_path / f"ckpt_{(newest // 4 + 1) * 4:08d}.tmp"
    torn.mkdir(exist_ok=True)
    (torn / "__0_0.distcp").write_bytes(b"half a shard")
    run(" ".join(cmd[1:]))
    assert_same_weights(final_weights(reference), final_weights(tmp_path))  # bitwise
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_index_carrying_code_is_refused_and_never_run(reference, tmp_path):
    ckpt = shutil.copytree(checkpoint_paths(reference)[-1], tmp_path / "ckpt_00000012")
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UserError, match="arbitrary Python objects"):
        load_checkpoint(ckpt)
    assert not marker.exists()


# --- memory ---------------------------------------------------------------------------------------
SHARD_BYTES = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[1])
from model import Transformer
from configurator import load_config
from train import TrainConfig, make_optimizer, wrap_model
fsdp = dist.is_torchelastic_launched()
if fsdp:
    dist.init_process_group("gloo")
cfg = load_config(["--n_embd=64", "--n_heads=2", "--n_kv_heads=2", "--n_layers=2", f"--fsdp={fsdp}",
                  "--optimizer=adamw"], TrainConfig)
model = Transformer(cfg.model_config(1000))
wrap_model(model, cfg, "cpu", torch.float32, 2 if fsdp else 1)
optimizer = make_optimizer(model, cfg, "cpu")
x = torch.randint(0, 1000, (2, 16))
model(x, x)[1].backward()
optimizer.step()
local = lambda t: t.to_local() if isinstance(t, DTensor) else t
weights = sum(local(p).nbytes for p in model.parameters())
adamw = sum(local(t).nbytes for state in optimizer.state.values() for t in state.values())
rank = dist.get_rank() if fsdp else 0
# a file per rank: two ranks printing to one pipe can interleave
with open(f"{sys.argv[2]}.{rank}.json", "w") as f:
    json.dump({"weights": weights, "optimizer": adamw}, f)
"""


def test_fsdp_on_two_ranks_holds_half_the_weights_and_optimizer_state_per_rank(tmp_path):
    script = tmp_path / "shard_bytes.py"
    script.write_text(SHARD_BYTES)
    run(str(script), str(ROOT), str(tmp_path / "whole"))
    whole = json.loads((tmp_path / "whole.0.json").read_text())
    run(f"-m torch.distributed.run --standalone --nproc_per_node=2 {script}", str(ROOT),
        str(tmp_path / "sharded"))
    for rank in (0, 1):
        per_rank = json.loads((tmp_path / f"sharded.{rank}.json").read_text())
        for part in ("weights", "optimizer"):
            assert 0.49 <= per_rank[part] / whole[part] <= 0.51, (part, per_rank, whole)


NEWTON_SCHULZ_CALLS = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import muon
from configurator import load_config
from model import Transformer
from train import TrainConfig, make_optimizer, wrap_model
calls, orthogonalize = [], muon.orthogonalize
# every matrix here
muon.orthogonalize = lambda g, **kw: calls.append(list(g.shape)) or orthogonalize(g, **kw)
launched = dist.is_torchelastic_launched()
if launched:
    dist.init_process_group("gloo")
world_size = dist.get_world_size() if launched else 1
done = {}
for fsdp in (False, True) if launched else (False,):
    cfg = load_config(["--n_embd=64", "--n_heads=2", "--n_kv_heads=2", "--n_layers=2",
                       f"--fsdp={fsdp}"], TrainConfig)
    model = Transformer(cfg.model_config(1000))
    wrapped = wrap_model(model, cfg, "cpu", torch.float32, world_size)
    optimizer = make_optimizer(model, cfg, "cpu")
    x = torch.randint(0, 1000, (2, 16))
    calls.clear()
    wrapped(x, x)[1].backward()
    optimizer.step()
    done["FSDP" if fsdp else "DDP"] = list(calls)
with open(f"{sys.argv[2]}.{dist.get_rank() if launched else 0}.json", "w") as f:
    json.dump(done, f)
if launched:
    dist.destroy_process_group()
"""


def test_each_rank_orthogonalizes_only_its_own_matrices_about_half_the_work(tmp_path):
    script = tmp_path / "calls.py"
    script.write_text(NEWTON_SCHULZ_CALLS)
    run(str(script), str(ROOT), str(tmp_path / "one"))
    # one process: every matrix, in turn
    whole = json.loads((tmp_path / "one.0.json").read_text())["DDP"]
    assert len(whole) == 2 * 7  # wq wk wv wo w1 w2 w3 in each of the 2 blocks
    run(f"-m torch.distributed.run --standalone --nproc_per_node=2 {script}", str(ROOT),
        str(tmp_path / "two"))
    ranks = [json.loads((tmp_path / f"two.{rank}.json").read_text()) for rank in (0, 1)]
    total = sum(muon.newton_schulz_flops(shape) for shape in whole)
    for mode in ("DDP", "FSDP"):
        # Every matrix exactly once per update, whole (not an FSDP shard), by one of the ranks ...
        assert sorted(ranks[0][mode] + ranks[1][mode]) == sorted(whole), mode
        # ... and the work split evenly by FLOPs: a block's feed-forward matrices cost three times
        # its attention's.
        for calls in (ranks[0][mode], ranks[1][mode]):
            assert abs(sum(muon.newton_schulz_flops(shape) for shape in calls) / total
                       - 0.5) < 0.05, (mode, calls)


PEAK_MEMORY = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from model import Transformer
from configurator import load_config
from train import DatasetLoader, TrainConfig, make_optimizer, train_update
cfg = load_config(sys.argv[2:], TrainConfig)
loader = DatasetLoader(cfg.dataset_dir, "train", cfg.batch_size, cfg.max_seq_len)
model = Transformer(cfg.model_config(8192))
if cfg.activation_checkpointing:
    from train import checkpoint_blocks
    checkpoint_blocks(model)
def status(field):  # bytes, from the kernel's accounting of this process
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now: imports had theirs
before = status("VmRSS")
optimizer = make_optimizer(model, cfg, "cpu")
for _ in range(2):
    train_update(model, optimizer, loader, 2, cfg, "cpu", torch.float32)
weights = sum(p.nbytes for p in model.parameters())
print(json.dumps({"peak": status("VmHWM") - before, "weights": weights}))
"""


# One thread; and glibc told to return every freed block above 64 KiB to the system at once: by
# default it keeps freed blocks of up to 32 MiB for reuse, and the resident size then overstates the
# tensors alive.
MEASURE_TENSORS = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_estimate_is_within_a_quarter_of_the_measured_peak(
        shakespeare_dir, tmp_path, checkpointing):
    args = [f"--dataset_dir={shakespeare_dir}", "--n_embd=256", "--n_heads=4", "--n_kv_heads=4",
            "--n_layers=4",
            "--batch_size=8", "--max_seq_len=256", "--tokens_per_update=4096", "--dtype=float32",
            "--optimizer=adamw", f"--activation_checkpointing={checkpointing}"]
    script = tmp_path / "peak.py"
    script.write_text(PEAK_MEMORY)
    measured = json.loads(subprocess.run([sys.executable, script, ROOT, *args], capture_output=True,
                                         text=True,
                                         check=True, env=os.environ | MEASURE_TENSORS).stdout)
    cfg = load_config(args, TrainConfig)
    estimate = hardware.memory_estimate(cfg, 8192, world_size=1, fsdp=False,
                                        checkpointing=checkpointing)
    # The weights were allocated before the measurement started; everything else during it.
    grown = sum(estimate.values()) - measured["weights"]
    assert abs(grown - measured["peak"]) <= 0.25 * measured["peak"], (estimate, measured)


# --- the mission's command line, and what is refused ----------------------------------------------
@pytest.mark.parametrize("world_size, batch, tokens",
                         [(1, 16, 4096), (2, 8, 4096), (3, 5, 3840), (5, 3, 3840),
                                                       (6, 2, 3072), (7, 2, 3584), (8, 2, 4096)])
def test_the_default_batch_fits_any_number_of_ranks(world_size, batch, tokens):
    cfg, note = fit_batch(load_config([], TrainConfig), world_size)
    assert (cfg.batch_size, cfg.tokens_per_update) == (batch, tokens)
    assert accumulation_steps(cfg, world_size) == tokens // (batch * 256 * world_size)
    assert (note == "") == (world_size == 1)
    if note:
        assert note.startswith(f"{world_size} ranks: batch_size 16 -> {batch}")


def test_fitting_the_batch_keeps_the_record_of_what_the_user_set():
    cfg, note = fit_batch(load_config(["--n_layers=2"], TrainConfig), 3)
    # --init_from's contradiction check still sees it
    assert note and set(cfg.user_set) == {"n_layers"}


def test_a_batch_the_user_chose_is_never_changed():
    for argv in (["--batch_size=16"], ["--tokens_per_update=4096"]):
        cfg, note = fit_batch(load_config(argv, TrainConfig), 8)
        assert note == ""
        with pytest.raises(UserError, match="not a multiple of batch_size"):
            accumulation_steps(cfg, 8)


def test_fsdp_without_torchrun_is_refused_before_anything_is_written(shakespeare_dir, tmp_path):
    with pytest.raises(UserError, match="launch it as torchrun"):
        train.main([*TINY_384, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path / 'out'}",
                    "--fsdp=True"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message",
                         [(["--fsdp=True", "--n_layers=2"], "n_layers=1 but the config says 2"),
                                            ([],
                                             "written by an FSDP run; resume it with --fsdp=True")])
def test_resuming_a_sharded_checkpoint_differently_is_refused(
        reference, shakespeare_dir, tmp_path, monkeypatch, extra, message):
    ckpt_dir = shutil.copytree(reference, tmp_path / "copy")
    # torchrun's environment for a single rank, in this process
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    try:
        with pytest.raises(UserError, match=message):
            train.main([*TINY_384, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={ckpt_dir}",
                        "--load_ckpt=True",
                        *extra])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert sorted(
        p.name for p in checkpoint_paths(ckpt_dir)) == [p.name for p in checkpoint_paths(reference)]


def test_the_loader_position_carries_over_to_another_number_of_ranks(tmp_path):
    path = toy_dataset(tmp_path, [1000])
    B, T = 2, 4
    read = []

    def take(world_size, groups, state=None):
        loaders = [DatasetLoader(path, "train", B, T, rank, world_size)
                   for rank in range(world_size)]
        for loader in loaders:
            if state:
                loader.load_state_dict(state)
        for _ in range(groups):
            for loader in loaders:
                read.extend(loader.next_batch()[0].flatten().tolist())
        return loaders[0].state_dict()

    state = take(2, 3)  # 2 ranks: 3 groups of 16 tokens
    state = take(1, 5, state)  # then 1 rank, 5 groups of 8
    state = take(3, 2, state)  # then 3 ranks, 2 groups of 24
    # no token skipped or repeated
    assert read == list(range(len(read))) and len(read) == 3 * 16 + 5 * 8 + 2 * 24
