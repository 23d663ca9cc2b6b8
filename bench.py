"""Measure training speed: tokens/s, model FLOPs utilisation (MFU), peak memory and the data
loader's share.

    python bench.py                                     # the default model on data/shakespeare
    python bench.py config/llama_1b3.py --batch_size=4  # any config and train.py's overrides
    python bench.py --compile=True --dtype=float32 --steps=20 --warmup=5 --profile=True
    python bench.py config/llama_7b.py --estimate=True --world_size=8 --gpu_memory=80  # memory only
    torchrun --standalone --nproc_per_node=8 bench.py --preflight=True config/llama_1b3.py

The model, optimizer, loader and update are train.py's own (nothing is re-implemented here), so what
is measured is what `python train.py` runs. One timed step is one whole optimizer update: every
micro-step's forward and backward, gradient clipping and the AdamW step. The first updates are left
out of the timing: they allocate memory, warm caches and, with --compile=True, compile the model,
all of which happen once per run.

MFU = (model FLOPs per token x tokens/s) / (FLOP/s of a large matmul measured here, on this device
and dtype). It says how close training comes to what this hardware can do on the operation that
dominates the model.

--estimate=True runs nothing: it prints, per GPU, the bytes that parameters, gradients, optimizer
state and activations take under DDP and under FSDP, with and without activation checkpointing, for
--world_size GPUs of --gpu_memory GB each (see memory_estimate for what is counted).

--preflight=True, under torchrun, checks the machine before a long run (preflight.py): correctness
across the ranks, checkpoints, link bandwidth, this config's speed and memory beside the estimate,
the projected run. It prints one PASS/FAIL table, writes it to <ckpt_dir>/preflight.txt and exits
with status 1 when a row fails.
"""
import statistics
import sys
import time
from dataclasses import dataclass, fields, replace

import torch

import preflight
from configurator import UserError, exit_if_help, load_config, run_cli
from hardware import (
    choose_speed,
    measure_matmul_flops,
    memory_estimate,
    parameter_counts,
    peak_memory_mib,
    pick_device,
    synchronize,
)
from model import Transformer
from tokenizer import load_tokenizer
from train import (
    DatasetLoader,
    TrainConfig,
    accumulation_steps,
    make_optimizer,
    make_scaler,
    timed_updates,
    train_update,
    update_timer,
)


@dataclass
class BenchOptions:
    """bench.py's own options; every other --key=value goes to train.py's TrainConfig."""

    steps: int = 10  # timed optimizer updates (the median is reported)
    warmup: int = 3  # untimed updates first (allocation, caches, compilation)
    profile: bool = False  # also profile one update and print the operators that take the most time
    estimate: bool = False  # print a per-GPU memory estimate instead of timing anything
    world_size: int = 8  # GPUs the estimate is for
    gpu_memory: float = 80.0  # GB (10^9 bytes) per GPU, for the estimate's "fits" column
    preflight: bool = False  # under torchrun: check this machine before a long run (PASS/FAIL)

    def __post_init__(self):
        if self.steps < 1 or self.warmup < 0:
            raise UserError("--steps must be at least 1 and --warmup at least 0")
        if self.world_size < 1 or self.gpu_memory <= 0:
            raise UserError("--world_size must be at least 1 and --gpu_memory positive")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate bench.py's own --key=value options from the ones meant for train.py's config."""
    own = tuple(f"--{f.name}=" for f in fields(BenchOptions))
    return [a for a in argv if a.startswith(own)], [a for a in argv if not a.startswith(own)]


def loader_seconds(loader: DatasetLoader, batches: int, device: str) -> float:
    """Mean time to fetch one batch, measured on its own: it is part of every micro-step inside
    train_update."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    synchronize(device)
    return (time.perf_counter() - start) / batches


def profile_update(model, optimizer, loader, accum_steps, cfg, device, dtype, rows=15):
    """Print the operators with the most self time (time in the operator itself, not in what it
    calls)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_update(model, optimizer, loader, accum_steps, cfg, device, dtype,
                     make_scaler(device, dtype))
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def print_estimate(cfg, opts: BenchOptions):
    vocab_size = load_tokenizer(cfg.dataset_dir).vocab_size
    n, _ = parameter_counts(cfg.model_config(vocab_size))
    print(f"{n / 1e9:.2f}B parameters (vocabulary {vocab_size}) | micro-batch "
          f"{cfg.batch_size}x{cfg.max_seq_len} "
          f"per GPU | {opts.world_size} GPUs of {opts.gpu_memory:g} GB | "
          f"{'fp32' if cfg.dtype == 'float32' else '16-bit compute'} | GB per GPU:")
    print(f"{'':<10}{'params':>9}{'grads':>9}{'optim.':>9}{'activ.':>9}{'total':>9}  fits")
    for fsdp in (False, True):
        for checkpointing in (False, True):
            est = memory_estimate(cfg, vocab_size, opts.world_size, fsdp, checkpointing)
            total = sum(est.values())
            name = ("FSDP" if fsdp else "DDP") + (" + AC" if checkpointing else "")
            print(f"{name:<10}" + "".join(f"{v / 1e9:9.1f}" for v in est.values())
                  + f"{total / 1e9:9.1f}  {'yes' if total <= opts.gpu_memory * 1e9 else 'no'}")


def main(argv: list[str]):
    # both groups: bench.py's options, then the training config
    exit_if_help(argv, BenchOptions, TrainConfig)
    own, rest = split_argv(argv)
    opts = load_config(own, BenchOptions)
    cfg = load_config(rest, TrainConfig)
    if opts.estimate:
        print_estimate(cfg, opts)
        return
    if opts.preflight:
        if not preflight.run(cfg, opts.warmup, opts.steps):
            sys.exit(1)
        return
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py does
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()

    tokenizer = load_tokenizer(cfg.dataset_dir)
    accum_steps = accumulation_steps(cfg, world_size=1)
    loader = DatasetLoader(cfg.dataset_dir, "train", cfg.batch_size, cfg.max_seq_len, device=device,
                           vocab_size=tokenizer.vocab_size)
    raw_model = Transformer(cfg.model_config(tokenizer.vocab_size)).to(device)
    # dtype=auto and compile=auto as train.py decides them for the run this config describes
    # (training_tokens or max_minutes long), not for the benchmark's few updates: what is timed is
    # what `python train.py` would run.
    dtype, compile, why = choose_speed(cfg, None,
                                       update_timer(raw_model, cfg, loader, accum_steps, device),
                                       device)
    # as train.py runs it: Muon's dtype follows it
    cfg = replace(cfg, dtype=str(dtype).removeprefix("torch."))
    optimizer = make_optimizer(raw_model, cfg, device)
    model = torch.compile(raw_model) if compile else raw_model
    print(f"{raw_model.num_params():,} parameters | {cfg.tokens_per_update:,} tokens per update "
          f"({accum_steps} micro-steps of {cfg.batch_size}x{cfg.max_seq_len}) | {device} "
          f"{str(dtype).removeprefix('torch.')} | compile={compile} | {torch.get_num_threads()} "
          "CPU threads"
          + (f" | {why}" if why else ""))

    start = time.perf_counter()
    times = timed_updates(model, optimizer, loader, accum_steps, cfg, device, dtype, opts.warmup,
                          opts.steps)
    print(f"warm-up and {opts.steps} timed updates in {time.perf_counter() - start:.1f} s")
    step_time = statistics.median(times)
    load_time = accum_steps * loader_seconds(loader, accum_steps * opts.steps, device)
    if opts.profile:
        profile_update(model, optimizer, loader, accum_steps, cfg, device, dtype)

    # The probe runs after training so that its time and memory do not disturb the measurements
    # above.
    peak_flops = measure_matmul_flops(device, dtype)
    tokens_per_sec = cfg.tokens_per_update / step_time
    mfu = raw_model.flops_per_token() * tokens_per_sec / peak_flops
    memory, what = peak_memory_mib(device)
    print(f"update time: median {1000 * step_time:.1f} ms over {opts.steps} updates "
          f"(min {1000 * min(times):.1f}, max {1000 * max(times):.1f})")
    print(f"tokens/s: {tokens_per_sec:,.0f}")
    print(f"matmul probe: {peak_flops / 1e9:,.1f} GFLOP/s ({device}, "
          f"{str(dtype).removeprefix('torch.')})")
    print(f"MFU: {100 * mfu:.1f}% ({raw_model.flops_per_token() / 1e6:.1f} MFLOP per token)")
    print(f"peak memory: {memory:,.0f} MiB ({what})")
    print(f"data loader: {100 * load_time / step_time:.2f}% of update time ({1000 * load_time:.2f} "
          "ms per update)")


if __name__ == "__main__":
    run_cli(main)
