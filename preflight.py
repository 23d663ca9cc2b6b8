"""Preflight: before a long run, learn in a few minutes whether this machine trains correctly and
how fast.

    torchrun --standalone --nproc_per_node=8 bench.py --preflight=True config/llama_1b3.py
    torchrun --standalone --nproc_per_node=2 bench.py --preflight=True --device=cpu  # a CPU

Every rank runs the same fixed list of checks, each a function below that returns one Row (name,
PASS/FAIL, its figure, the reason for a FAIL); the ranks agree on each row (a FAIL on any rank is
the row's result) and rank 0 prints the table and writes it to <ckpt_dir>/preflight.txt. The checks:
1. correctness across ranks, on a tiny model built from train.py's own parts: a few updates on N
   ranks equal the same global batch on one rank, under DDP and under FSDP; a sharded checkpoint
   written on N ranks restores bitwise on N and, resharded, trains on one rank as the N ranks do; a
   kill -9 while the next checkpoint is being written leaves the previous one loadable; fp16 with
   the loss scaler trains finite and close to fp32;
2. the links between the ranks: all-reduce and all-gather bus bandwidth, as nccl-tests reports it;
3. the user's config: the dtype it trains in here and why, and the attention kernel it gets; then
   under DDP and under FSDP, eager and compiled (compile=auto measures both; an explicit --compile
   only that one): tokens/s, MFU against a matmul probe, peak memory beside bench.py --estimate's
   figure (with activation checkpointing when the config runs out of GPU memory without);
4. the projection: wall clock and GPU-hours for training_tokens at the measured speed, and the disk
   the checkpoints need against what ckpt_dir's disk has free.
The same code runs on CUDA (NCCL) and on a CPU (gloo). Every collective has PREFLIGHT_TIMEOUT: a
lost rank or a stuck link ends the preflight with an error instead of a hang.
"""
import dataclasses
import datetime
import gc
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend

from checkpoint import (
    checkpoint_bytes,
    checkpoint_paths,
    checkpoint_state,
    load_checkpoint,
    load_shards,
    newest_loadable_checkpoint,
    save_checkpoint,
    torch_optimizers,
    training_state,
)
from configurator import UserError
from dataset import read_meta
from hardware import (
    choose_speed,
    measure_matmul_flops,
    memory_estimate,
    peak_memory_mib,
    pick_device,
    synchronize,
)
from model import Transformer
from passes import ValidationRecord
from schedule import Scheduler
from tokenizer import load_tokenizer, tokenizer_fingerprint
from train import (
    DatasetLoader,
    TrainConfig,
    accumulation_steps,
    distributed,
    fit_batch,
    make_optimizer,
    make_scaler,
    timed_updates,
    train_update,
    update_timer,
    wrap_model,
)

# Longer than anything one rank does while the others wait at a collective here (compiling a large
# model, rank 0 alone killing a save), far shorter than a training run's: a preflight is meant to
# answer within minutes.
PREFLIGHT_TIMEOUT = datetime.timedelta(minutes=5)
TINY_UPDATES = 3  # enough for the optimizers' state (Muon's momentum, AdamW's moments) to matter


@dataclass
class Speed:
    tokens_per_sec: float
    checkpoint_bytes: int


@dataclass
class Row:
    name: str
    passed: bool
    figure: str = ""
    reason: str = ""
    speed: "Speed | None" = None  # what the projection is made from, on the config's rows


@dataclass
class Machine:
    """What every check is given: the user's config, this rank's place, and a scratch directory in
    ckpt_dir (on the disk the run will write to) that the preflight removes at the end."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: str
    vocab_size: int
    scratch: Path
    fingerprint: str = ""  # the dataset's tokenizer, as checkpoints record it


# --------------------------------------------------------------------------------------------------
# 1. Correctness on a tiny model: train.py's own model, wrapping, optimizer, loader and update.
@dataclass
class TinyRun:
    raw: Transformer  # the module checkpoints hold (sharded in place under FSDP)
    model: object  # what is trained: the module itself, DDP's wrapper or the sharded module
    optimizer: object
    loader: DatasetLoader
    accum_steps: int
    losses: list[float]
    dtype: torch.dtype  # what the tiny model computes in: fp32, or fp16 with its loss scaler
    scaler: torch.amp.GradScaler
    skipped: int = 0  # updates the loss scaler skipped


def tiny_config(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """The user's optimizer and dataset with a model and batch small enough to train in moments. Two
    micro-steps per rank on N ranks are 2N on one: accumulation is part of what is compared. fp32
    and no compiling, so that the checks compare the arithmetic, not the rounding of lower
    precision."""
    return dataclasses.replace(cfg, n_layers=2, n_embd=64, n_heads=4, n_kv_heads=2, multiple_of=32,
                               batch_size=2,
                               max_seq_len=32, tokens_per_update=2 * 2 * 32 * world_size,
                               dropout=0.0,
                               dtype="float32", compile=False, activation_checkpointing=False,
                               grad_clip=1.0,
                               schedule="constant",
                               training_tokens=2 * 2 * 32 * world_size * TINY_UPDATES)


def train_tiny(m: Machine, ranks: int, fsdp: bool, updates: int = TINY_UPDATES,
               dtype: torch.dtype = torch.float32) -> TinyRun:
    """A tiny model trained `updates` updates as a run on `ranks` ranks trains it (ranks=1: every
    rank computes the whole one-rank run by itself, the reference the N-rank runs are compared
    with), in fp32 unless `dtype` says."""
    cfg = dataclasses.replace(tiny_config(m.cfg, m.world_size),
                              dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
    raw = Transformer(cfg.model_config(m.vocab_size)).to(m.device)
    model = wrap_model(raw, dataclasses.replace(cfg, fsdp=fsdp), m.device, dtype, ranks)
    rank = m.rank if ranks > 1 else 0
    loader = DatasetLoader(cfg.dataset_dir, "train", cfg.batch_size, cfg.max_seq_len, rank, ranks,
                           m.device,
                           vocab_size=m.vocab_size)
    run = TinyRun(raw, model, make_optimizer(raw, cfg, m.device), loader,
                  accumulation_steps(cfg, ranks), [], dtype,
                  make_scaler(m.device, dtype))
    train_more(run, cfg, m.device, updates)
    return run


def train_more(run: TinyRun, cfg: TrainConfig, device: str, updates: int):
    for _ in range(updates):
        scale = run.scaler.get_scale()
        loss, _ = train_update(run.model, run.optimizer, run.loader, run.accum_steps, cfg, device,
                               run.dtype,
                               run.scaler)
        # the scaler lowers its scale exactly when it skips
        run.skipped += run.scaler.get_scale() < scale
        run.losses.append(loss)


def full_tensors(state: dict) -> dict:
    """A state dict (model or optimizer, nested) with every DTensor gathered whole, detached and
    copied."""
    if isinstance(state, dict):
        return {k: full_tensors(v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return [full_tensors(v) for v in state]
    if isinstance(state, DTensor):
        return state.full_tensor().detach().clone()
    return state.detach().clone() if isinstance(state, torch.Tensor) else state


def weights(run: TinyRun) -> dict:
    return full_tensors(dict(run.raw.named_parameters()))


def drift_tolerance(peak_lr: float, updates: int) -> float:
    """How far apart the weights of two runs may be that are equal in exact arithmetic but round
    differently.

    An AdamW update moves a weight by at most about its learning rate (Muon's by less), so no weight
    travels further than peak_lr * updates. Rounding changes the direction of a step only where the
    gradient itself is at rounding level, so it moves a few weights by a small part of that travel;
    a real bug (a batch read twice, a gradient not averaged) changes most steps, by the whole of it.
    1% of the travel lies far from both."""
    return 1e-2 * peak_lr * updates


def largest_difference(a: dict, b: dict) -> float:
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


def compare_runs(name: str, run: TinyRun, reference: TinyRun, cfg: TrainConfig) -> Row:
    """PASS when the losses agree to fp32 rounding and the weights to drift_tolerance."""
    loss_gap = max(abs(a - b) for a, b in zip(run.losses, reference.losses, strict=True))
    weight_gap = largest_difference(weights(run), weights(reference))
    tolerance = drift_tolerance(max(cfg.max_lr, cfg.muon_lr, cfg.embedding_lr), TINY_UPDATES)
    figure = (f"loss within {loss_gap:.1e}, weights within {weight_gap:.1e} (tolerance "
              f"{tolerance:.1e})")
    if loss_gap > 1e-4:
        return Row(name, False, figure,
                   f"the losses differ by {loss_gap:.2e}: the ranks do not compute one "
                                        "global batch (different data on some rank, or a broken "
                   "collective)")
    if weight_gap > tolerance:
        return Row(name, False, figure, "the weights drift apart more than rounding explains")
    return Row(name, True, figure)


def check_ddp_equals_one_rank(m: Machine) -> Row:
    return compare_runs(f"DDP, {m.world_size} ranks = 1 rank",
                        train_tiny(m, m.world_size, fsdp=False),
                        train_tiny(m, 1, fsdp=False), tiny_config(m.cfg, m.world_size))


def check_fsdp_equals_one_rank(m: Machine) -> Row:
    return compare_runs(f"FSDP, {m.world_size} ranks = 1 rank",
                        train_tiny(m, m.world_size, fsdp=True),
                        train_tiny(m, 1, fsdp=False), tiny_config(m.cfg, m.world_size))


def save_tiny(run: TinyRun, m: Machine, ckpt_dir: Path) -> Path:
    """A sharded checkpoint of an FSDP run, built and written by every rank as train.py builds and
    writes one."""
    cfg = dataclasses.replace(tiny_config(m.cfg, m.world_size), fsdp=True)
    updates = len(run.losses)
    scheduler = Scheduler(run.optimizer, cfg.schedule, updates, cfg.warmup_iterations, cfg.max_lr,
                          cfg.min_lr)
    state = checkpoint_state(cfg, run.raw, run.optimizer, m.world_size, m.device,
                             scheduler=scheduler,
                             scaler=run.scaler, loader=run.loader, record=ValidationRecord(),
                             fingerprint=m.fingerprint, step=updates, elapsed_s=0.0, argv=[],
                             repeats=None)
    return save_checkpoint(str(ckpt_dir), updates, state, cfg.keep_ckpts, sharded=True)


def check_resume_on_n_ranks(m: Machine) -> Row:
    """What a resumed FSDP run restores is bitwise what it saved: weights and optimizer state."""
    name = f"checkpoint {m.world_size} -> {m.world_size} ranks, bitwise"
    written = train_tiny(m, m.world_size, fsdp=True)
    path = save_tiny(written, m, m.scratch / "resume_n")
    saved = full_tensors(get_state_dict(written.raw, torch_optimizers(written.optimizer)))
    resumed = train_tiny(m, m.world_size, fsdp=True, updates=0)
    try:
        load_shards(path, resumed.raw, resumed.optimizer,
                    load_checkpoint(path, "none")["optimizer"]["param_groups"])
    except UserError as e:
        return Row(name, False, "", str(e))
    restored = full_tensors(get_state_dict(resumed.raw, torch_optimizers(resumed.optimizer)))
    differ = [k for k, v in flatten(saved).items() if not torch.equal(v, flatten(restored)[k])]
    if differ:
        return Row(name, False, f"{len(differ)} tensors differ",
                   f"{differ[0]} is not restored bitwise")
    return Row(name, True, f"{len(flatten(saved))} tensors equal")


def flatten(state, prefix: str = "") -> dict:
    """{"a.b.c": tensor} from nested dicts and tuples of tensors."""
    if isinstance(state, (dict, tuple, list)):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        return {k: v for key, value in items for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: state} if isinstance(state, torch.Tensor) else {}


def check_resume_on_one_rank(m: Machine) -> Row:
    """The sharded checkpoint, read whole into one process (as a run resumed on one rank reads it),
    trains on as the N ranks go on training: the same losses and weights, within rounding."""
    name = f"checkpoint {m.world_size} -> 1 rank, then 1 update"
    cfg = tiny_config(m.cfg, m.world_size)
    written = train_tiny(m, m.world_size, fsdp=True)
    path = save_tiny(written, m, m.scratch / "resume_1")
    one = train_tiny(m, 1, fsdp=False, updates=0)
    try:
        ckpt = load_checkpoint(path)
    except UserError as e:
        return Row(name, False, "", str(e))
    set_state_dict(one.raw, torch_optimizers(one.optimizer), model_state_dict=ckpt["model"],
                   optim_state_dict=ckpt["optimizer"])
    one.loader.load_state_dict(ckpt["loader"])
    written.losses, one.losses = [], []
    train_more(written, cfg, m.device, 1)
    train_more(one, cfg, m.device, 1)
    return compare_runs(name, one, written, cfg)


# A process that writes a checkpoint large enough to take a while, to be killed while it does.
SLOW_SAVE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from checkpoint import save_checkpoint
save_checkpoint(sys.argv[2], int(sys.argv[3]), {"model": {"w": torch.ones(2**26)}}, keep=10)
"""


def check_kill_mid_save(m: Machine) -> Row:
    """kill -9 a process while it writes the next checkpoint into ckpt_dir: the sharded checkpoint
    the N ranks wrote before is still the newest that loads. Rank 0 does the killing; a disk or file
    system that makes a file visible before it is complete fails here."""
    name = "kill -9 mid-save keeps the previous checkpoint"
    ckpt_dir = m.scratch / "kill"
    previous = save_tiny(train_tiny(m, m.world_size, fsdp=True), m, ckpt_dir)
    if m.rank != 0:
        return Row(name, True)
    step = TINY_UPDATES + 1
    tmp = ckpt_dir / f"ckpt_{step:08d}.pt.tmp"
    writer = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(Path(__file__).parent),
                               str(ckpt_dir),
                               str(step)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + PREFLIGHT_TIMEOUT.total_seconds() / 2
    while writer.poll(
        ) is None and not (tmp.exists() and tmp.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(writer.pid, signal.SIGKILL)
    _, err = writer.communicate()
    if writer.returncode != -signal.SIGKILL:
        return Row(name, False, "",
                   f"the save ended before it could be killed (status {writer.returncode}) "
                                    f"{err.strip().splitlines()[-1] if err.strip() else ''}".strip(
                                        ))
    try:
        found, _ = newest_loadable_checkpoint(checkpoint_paths(str(ckpt_dir)), master=False)
    except UserError as e:
        return Row(name, False, "", str(e))
    if found != previous:
        return Row(name, False, f"newest loadable: {found.name}",
                   "the killed save counts as a checkpoint")
    return Row(name, True, f"killed with {tmp.stat().st_size:,} bytes written; {found.name} loads")


# fp16's rounding (11 significant bits) moves a tiny run's loss by some 1e-3 in a few updates; an
# fp16 kernel or a loss scaler that is broken moves it by far more, or to inf.
FP16_LOSS_TOLERANCE = 0.02


def check_float16(m: Machine) -> Row:
    """A tiny run in fp16 with the loss scaler, sharded over the ranks (FSDP gathers the weights in
    fp16 and reduces the gradients in fp32): every loss is finite and close to the fp32 one-rank
    run's. It runs on any GPU, with or without bf16 (dtype=auto trains in fp16 below compute
    capability 8.0), and on a CPU, which emulates fp16."""
    name = f"fp16 + loss scaler, {m.world_size} ranks"
    updates = 2 * TINY_UPDATES
    half = train_tiny(m, m.world_size, fsdp=True, updates=updates, dtype=torch.float16)
    full = train_tiny(m, 1, fsdp=False, updates=updates)
    if not all(math.isfinite(loss) for loss in half.losses):
        return Row(name, False, f"losses {', '.join(f'{loss:.4f}' for loss in half.losses)}",
                   "fp16 training gave a non-finite loss: train in --dtype=float32 on this machine")
    gap = max(abs(a - b) for a, b in zip(half.losses, full.losses, strict=True))
    figure = (f"{updates} updates, losses within {gap:.1e} of fp32, {half.skipped} skipped, loss "
              f"scale {half.scaler.get_scale():g}")
    if gap > FP16_LOSS_TOLERANCE:
        return Row(name, False, figure,
                   f"fp16 losses differ from fp32 by more than {FP16_LOSS_TOLERANCE}: an fp16 "
                                        "kernel computes wrongly here; train in --dtype=float32")
    return Row(name, True, figure)


# --------------------------------------------------------------------------------------------------
# 2. The links between the ranks.
def check_bandwidth(m: Machine, op: str) -> Row:
    """Bus bandwidth of all_reduce or all_gather, as nccl-tests defines it: the data size over the
    time (algbw), times 2(n-1)/n for an all-reduce and (n-1)/n for an all-gather, the share each
    link must carry, so that the figure is comparable across numbers of ranks with the link's own
    speed. The first call's result is checked."""
    n, name = m.world_size, f"{op} bus bandwidth"
    # bytes: large enough that latency does not dominate
    size = 2**28 if m.device.startswith("cuda") else 2**24
    full = torch.full((size // 4,), float(m.rank + 1), device=m.device)
    if op == "all-reduce":
        def call():
            dist.all_reduce(full)
        expected, factor = n * (n + 1) / 2, 2 * (n - 1) / n
    else:
        part = full[:size // 4 // n].clone()
        out = torch.empty(part.numel() * n, device=m.device)

        def call():
            # newer PyTorch renames it; the old name is the one torch 2.4 has
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore",
                                        "`torch.distributed.all_gather_into_tensor` is deprecated")
                dist.all_gather_into_tensor(out, part)
        expected, factor = None, (n - 1) / n
    call()
    if expected is not None:
        ok = bool(torch.all(full == expected))
    else:
        ok = bool(torch.all(out.view(n, -1) == torch.arange(1, n + 1, device=m.device).view(n, 1)))
    if not ok:
        return Row(name, False, "",
                   f"the {op} of known values gave wrong numbers: the link or its driver is faulty")
    times = []
    for _ in range(5):
        synchronize(m.device)
        start = time.perf_counter()
        call()
        synchronize(m.device)
        times.append(time.perf_counter() - start)
    bus = size / statistics.median(times) * factor / 1e9
    return Row(name, True,
               f"{bus:.2f} GB/s ({size / 2**20:.0f} MiB, {n} ranks)" if n > 1
               else "one rank: no link")


# --------------------------------------------------------------------------------------------------
# 3. The user's config.
ATTENTION_KERNELS = {SDPBackend.FLASH_ATTENTION: "flash",
                     SDPBackend.EFFICIENT_ATTENTION: "memory-efficient",
                     SDPBackend.CUDNN_ATTENTION: "cuDNN",
                     SDPBackend.MATH: "math (unfused, the slowest)"}


def attention_kernel(cfg: TrainConfig, device: str, dtype: torch.dtype) -> str:
    """The kernel scaled_dot_product_attention runs for this config's attention in training: causal,
    with its dropout, q, k and v of its head size in the dtype the matmuls run in (model.py repeats
    grouped keys and values before the call). Flash attention needs compute capability 8.0 and fp16
    or bf16; the memory-efficient kernel runs on older GPUs and in fp32 too; on a CPU "flash" is
    PyTorch's CPU kernel. torch._fused_sdp_choice is the choice SDPA itself makes, asked without
    computing anything."""
    q = torch.empty(1, cfg.n_heads, cfg.max_seq_len, cfg.n_embd // cfg.n_heads, device=device,
                    dtype=dtype,
                    requires_grad=True)
    choice = torch._fused_sdp_choice(q, q, q, dropout_p=cfg.dropout, is_causal=True)
    kernel = ATTENTION_KERNELS[SDPBackend(choice)]
    return kernel + (" (CPU)" if device == "cpu" else "")


def check_precision(m: Machine) -> Row:
    """The dtype a run of this config gets on this device and why (hardware.choose_speed, as
    train.py asks it: a GPU decides by its compute capability, a CPU measures the model, so only
    there is the model built), and the attention kernel it gets in that dtype. Compiling is the
    config rows' business."""
    cfg, _ = fit_batch(m.cfg, m.world_size)
    cfg = dataclasses.replace(cfg, compile=False)
    time_update = None
    if not m.device.startswith("cuda"):
        raw = Transformer(cfg.model_config(m.vocab_size)).to(m.device)
        loader = DatasetLoader(cfg.dataset_dir, "train", cfg.batch_size, cfg.max_seq_len, m.rank,
                               m.world_size,
                               m.device, vocab_size=m.vocab_size)
        time_update = update_timer(raw, cfg, loader, accumulation_steps(cfg, m.world_size),
                                   m.device)
    dtype, _, why = choose_speed(cfg, None, time_update, m.device)
    why = f" ({why.removeprefix('auto: ').removeprefix('dtype: ')})" if why else ""
    return Row("dtype and attention", True, f"{str(dtype).removeprefix('torch.')}{why}, attention: "
                                            f"{attention_kernel(cfg, m.device, dtype)}")


def measure_config(m: Machine, cfg: TrainConfig, warmup: int, steps: int) -> tuple[str, Speed]:
    """Train the user's model `warmup` + `steps` updates as train.py would on these ranks; (figure,
    speed)."""
    accum_steps = accumulation_steps(cfg, m.world_size)
    loader = DatasetLoader(cfg.dataset_dir, "train", cfg.batch_size, cfg.max_seq_len, m.rank,
                           m.world_size,
                           m.device, vocab_size=m.vocab_size)
    torch.manual_seed(cfg.seed)
    raw = Transformer(cfg.model_config(m.vocab_size)).to(m.device)
    dtype, _, _ = choose_speed(cfg, None, update_timer(raw, cfg, loader, accum_steps, m.device),
                               m.device)
    # as train.py runs it (Muon's dtype)
    cfg = dataclasses.replace(cfg, dtype=str(dtype).removeprefix("torch."))
    model = wrap_model(raw, cfg, m.device, dtype, m.world_size)
    optimizer = make_optimizer(raw, cfg, m.device)
    step_time = statistics.median(timed_updates(model, optimizer, loader, accum_steps, cfg,
                                                m.device, dtype, warmup,
                                                steps))
    memory, _ = peak_memory_mib(m.device)
    tokens_per_sec = cfg.tokens_per_update / step_time
    peak_flops = measure_matmul_flops(m.device, dtype)
    mfu = raw.flops_per_token() * tokens_per_sec / m.world_size / peak_flops
    # DTensor.numel() is the whole tensor's: rank 0's state counts the full checkpoint.
    size = checkpoint_bytes(training_state(raw, optimizer, cfg.fsdp, m.world_size, m.device)[:2])
    figure = (f"{tokens_per_sec:,.0f} tok/s, MFU {100 * mfu:.1f}%, peak {memory:,.0f} MiB, "
              f"{str(dtype).removeprefix('torch.')}")
    return figure, Speed(tokens_per_sec, size)


def check_config(m: Machine, fsdp: bool, compile: bool, warmup: int, steps: int) -> Row:
    """The user's config under DDP or FSDP, compiled or eager; on a GPU that runs out of memory,
    again with activation checkpointing. Beside the peak measured: hardware.memory_estimate's
    (bench.py --estimate's)."""
    cfg, _ = fit_batch(dataclasses.replace(m.cfg, fsdp=fsdp, compile=compile), m.world_size)
    name = f"your config, {'FSDP' if fsdp else 'DDP'}, {'compiled' if compile else 'eager'}"
    for checkpointing in dict.fromkeys((cfg.activation_checkpointing, True)):
        if m.device.startswith("cuda"):
            gc.collect()  # a DDP or FSDP model that ran out of memory sits in reference cycles
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            figure, speed = measure_config(
                m, dataclasses.replace(cfg, activation_checkpointing=checkpointing),
                                           warmup, steps)
        except torch.OutOfMemoryError:
            continue
        estimate = sum(memory_estimate(cfg, m.vocab_size, m.world_size, fsdp,
                                       checkpointing).values()) / 2**20
        return Row(name + " + AC" * checkpointing, True, f"{figure} (estimate {estimate:,.0f} MiB)",
                   speed=speed)
    return Row(name, False, "",
               "out of GPU memory even with activation checkpointing; lower --batch_size (with "
                                "--fsdp=True if it is not set)")


# --------------------------------------------------------------------------------------------------
# 4. The projection.
def check_projection(m: Machine, speed: Speed | None) -> Row:
    if speed is None:
        return Row("projected run", False, "", "no config measurement succeeded")
    hours = m.cfg.max_minutes / 60 or m.cfg.training_tokens / speed.tokens_per_sec / 3600
    unit = "GPU" if m.device.startswith("cuda") else "rank"
    return Row("projected run", True,
               f"{m.cfg.training_tokens:,.0f} tokens: {hours:,.1f} h wall clock, "
                                      f"{hours * m.world_size:,.1f} {unit}-hours")


def check_disk(m: Machine, speed: Speed | None) -> Row:
    """keep_ckpts checkpoints, plus the one being written before the oldest is deleted, must fit on
    the disk."""
    if speed is None:
        return Row("checkpoint disk", False, "", "no config measurement succeeded")
    needed = speed.checkpoint_bytes * (m.cfg.keep_ckpts + 1)
    free = shutil.disk_usage(m.scratch).free
    figure = (f"{speed.checkpoint_bytes / 1e9:,.2f} GB per checkpoint, {needed / 1e9:,.2f} GB for "
              f"keep_ckpts={m.cfg.keep_ckpts} + 1; {free / 1e9:,.0f} GB free")
    if needed > free:
        return Row("checkpoint disk", False, figure,
                   f"{m.cfg.ckpt_dir}'s disk is too small; free space, lower "
                                                     "--keep_ckpts or pass another --ckpt_dir")
    return Row("checkpoint disk", True, figure)


# --------------------------------------------------------------------------------------------------
# Running the checks: every rank runs each one, and all agree on its row.
def guarded(m: Machine, name: str, check, *args):
    """check(m, *args), with an error on this rank made its row's FAIL; then the row every rank
    agrees on."""
    try:
        result = check(m, *args)
    except Exception as e:  # the row's reason; the remaining checks still run
        lines = str(e).strip().splitlines() or [""]
        result = Row(name, False, "", f"{type(e).__name__}: {lines[0]}")
    rows = [None] * m.world_size
    dist.all_gather_object(rows, result)
    failed = [(r, row) for r, row in enumerate(rows) if not row.passed]
    if not failed:
        return rows[0]
    r, row = failed[0]
    return dataclasses.replace(row,
                               reason=f"rank {r}: {row.reason}" if m.world_size > 1 else row.reason)


def check_process_group(device: str):
    """The first collective: when the ranks cannot reach each other, say so in one line with the
    usual fixes."""
    try:
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)
    except Exception as e:
        raise UserError(f"the ranks cannot communicate over {dist.get_backend()} "
                        f"({type(e).__name__}); rerun with NCCL_DEBUG=INFO to see why; on a "
                        "machine without InfiniBand try NCCL_IB_DISABLE=1"
                        ) from None
    synchronize(device)


def table(rows: list[Row], header: str) -> str:
    widths = [max(len(r.name) for r in rows), max(len(r.figure) for r in rows)]
    lines = [header, f"{'check':<{widths[0]}}  result  {'figure':<{widths[1]}}  reason"]
    for r in rows:
        lines.append(f"{r.name:<{widths[0]}}  {'PASS' if r.passed else 'FAIL':<6}  "
                     f"{r.figure:<{widths[1]}}  "
                     f"{r.reason}".rstrip())
    return "\n".join(lines) + "\n"


def machine_line(device: str, world_size: int) -> str:
    what = (torch.cuda.get_device_name(device) if device.startswith("cuda")
            else f"CPU, {os.cpu_count()} cores")
    return (f"preflight on {world_size} ranks | {device.split(':')[0]} ({what}) | PyTorch "
            f"{torch.__version__} | {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")


def refuse_a_bad_launch(cfg: TrainConfig):
    if "RANK" not in os.environ:
        raise UserError("--preflight=True checks the ranks torchrun starts; launch it as torchrun "
                        "--standalone --nproc_per_node=N bench.py --preflight=True ... (N = the "
                        "GPUs to check, 2 on a CPU)")
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if pick_device(cfg.device).startswith("cuda") and local_ranks > torch.cuda.device_count():
        raise UserError(f"--nproc_per_node={local_ranks} but this machine has "
                        f"{torch.cuda.device_count()} GPUs; "
                        f"use --nproc_per_node={torch.cuda.device_count()}")


def run(cfg: TrainConfig, warmup: int, steps: int) -> bool:
    """Run every check on this rank, print the table (rank 0) and write it to
    <ckpt_dir>/preflight.txt. True when every row passed."""
    refuse_a_bad_launch(cfg)
    meta = read_meta(cfg.dataset_dir)  # a missing dataset is refused here, naming the fix
    vocab_size, fingerprint = (load_tokenizer(cfg.dataset_dir, meta).vocab_size,
                               tokenizer_fingerprint(cfg.dataset_dir, meta))
    # FSDP is among the checks: the process group starts even on one rank.
    sharded = dataclasses.replace(cfg, fsdp=True)
    with distributed(sharded, timeout=PREFLIGHT_TIMEOUT) as (rank, world_size, device):
        check_process_group(device)
        scratch = [None]
        if rank == 0:
            os.makedirs(cfg.ckpt_dir, exist_ok=True)
            scratch = [tempfile.mkdtemp(prefix="preflight-", dir=cfg.ckpt_dir)]
        dist.broadcast_object_list(scratch, src=0)
        m = Machine(cfg, rank, world_size, device, vocab_size, Path(scratch[0]), fingerprint)
        try:
            rows = [guarded(m, "DDP = 1 rank", check_ddp_equals_one_rank),
                    guarded(m, "FSDP = 1 rank", check_fsdp_equals_one_rank),
                    guarded(m, "checkpoint N -> N", check_resume_on_n_ranks),
                    guarded(m, "checkpoint N -> 1", check_resume_on_one_rank),
                    guarded(m, "kill -9 mid-save", check_kill_mid_save),
                    guarded(m, "fp16", check_float16),
                    guarded(m, "all-reduce", check_bandwidth, "all-reduce"),
                    guarded(m, "all-gather", check_bandwidth, "all-gather")]
            # compile=auto measures both: what compiling buys on this machine is worth knowing
            # before a long run.
            compiles = (False, True) if cfg.compile == "auto" else (cfg.compile,)
            rows += [guarded(m, "dtype and attention", check_precision)]
            rows += [guarded(m, "your config", check_config, fsdp, compile, warmup, steps)
                     for fsdp in (False, True) for compile in compiles]
            fastest = max((r.speed for r in rows if r.speed), key=lambda s: s.tokens_per_sec,
                          default=None)
            rows += [guarded(m, "projected run", check_projection, fastest),
                     guarded(m, "checkpoint disk", check_disk, fastest)]
        finally:
            dist.barrier()
            if rank == 0:
                shutil.rmtree(m.scratch, ignore_errors=True)
        if rank == 0:
            text = table(rows, machine_line(device, world_size))
            print(text, end="")
            (Path(cfg.ckpt_dir) / "preflight.txt").write_text(text)
            print(f"written to {Path(cfg.ckpt_dir) / 'preflight.txt'}")
    return all(r.passed for r in rows)
