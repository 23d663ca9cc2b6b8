"""Measure training speed: tokens/s, model FLOPs utilisation (MFU), peak memory and the data loader's share.

    python bench.py                                        # the default model on data/shakespeare
    python bench.py config/llama_1b3.py --batch_size=4     # any config and overrides train.py accepts
    python bench.py --compile=True --dtype=float32 --steps=20 --warmup=5 --profile=True

The model, optimizer, loader and update are train.py's own (nothing is re-implemented here), so what is measured
is what `python train.py` runs. One timed step is one whole optimizer update: every micro-step's forward and
backward, gradient clipping and the AdamW step. The first updates are left out of the timing: they allocate memory,
warm caches and, with --compile=True, compile the model, all of which happen once per run.

MFU = (model FLOPs per token x tokens/s) / (FLOP/s of a large matmul measured here, on this device and dtype). It
says how close training comes to what this hardware can do on the operation that dominates the model.
"""
import resource
import statistics
import time
from dataclasses import dataclass, fields

import torch

from model import Transformer
from prepare import UserError, load_tokenizer, run_cli
from train import (
    DatasetLoader,
    accumulation_steps,
    load_config,
    make_optimizer,
    measure_matmul_flops,
    pick_device,
    pick_dtype,
    synchronize,
    train_update,
)


@dataclass
class BenchOptions:
    """bench.py's own options; every other --key=value goes to train.py's TrainConfig."""

    steps: int = 10  # timed optimizer updates (the median is reported)
    warmup: int = 3  # untimed updates first (allocation, caches, compilation)
    profile: bool = False  # also profile one update and print the operators that take the most time

    def __post_init__(self):
        if self.steps < 1 or self.warmup < 0:
            raise UserError("--steps must be at least 1 and --warmup at least 0")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate bench.py's own --key=value options from the ones meant for train.py's config."""
    own = tuple(f"--{f.name}=" for f in fields(BenchOptions))
    return [a for a in argv if a.startswith(own)], [a for a in argv if not a.startswith(own)]


def peak_memory_mib(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "peak GPU memory allocated by tensors"
    # Linux reports the peak resident set size in KiB. It covers the whole process (Python, PyTorch, data).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak resident memory of the process"


def loader_seconds(loader: DatasetLoader, batches: int, device: str) -> float:
    """Mean time to fetch one batch, measured on its own: it is part of every micro-step inside train_update."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    synchronize(device)
    return (time.perf_counter() - start) / batches


def profile_update(model, optimizer, loader, accum_steps, cfg, device, dtype, rows=15):
    """Print the operators with the most self time (time in the operator itself, not in what it calls)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_update(model, optimizer, loader, accum_steps, cfg, device, dtype)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main(argv: list[str]):
    own, rest = split_argv(argv)
    opts = load_config(own, cls=BenchOptions)
    cfg = load_config(rest)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
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
    optimizer = make_optimizer(raw_model, cfg, device)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    print(f"{raw_model.num_params():,} parameters | {cfg.tokens_per_update:,} tokens per update "
          f"({accum_steps} micro-steps of {cfg.batch_size}x{cfg.max_seq_len}) | {device} "
          f"{str(dtype).removeprefix('torch.')} | compile={cfg.compile} | {torch.get_num_threads()} CPU threads")

    start = time.perf_counter()
    for _ in range(opts.warmup):
        train_update(model, optimizer, loader, accum_steps, cfg, device, dtype)
    print(f"warm-up: {opts.warmup} updates in {time.perf_counter() - start:.1f} s (not timed)")
    times = []
    for _ in range(opts.steps):
        synchronize(device)
        start = time.perf_counter()
        train_update(model, optimizer, loader, accum_steps, cfg, device, dtype)  # returns floats: already synced
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    load_time = accum_steps * loader_seconds(loader, accum_steps * opts.steps, device)
    if opts.profile:
        profile_update(model, optimizer, loader, accum_steps, cfg, device, dtype)

    # The probe runs after training so that its time and memory do not disturb the measurements above.
    peak_flops = measure_matmul_flops(device, dtype)
    tokens_per_sec = cfg.tokens_per_update / step_time
    mfu = raw_model.flops_per_token() * tokens_per_sec / peak_flops
    memory, what = peak_memory_mib(device)
    print(f"update time: median {1000 * step_time:.1f} ms over {opts.steps} updates "
          f"(min {1000 * min(times):.1f}, max {1000 * max(times):.1f})")
    print(f"tokens/s: {tokens_per_sec:,.0f}")
    print(f"matmul probe: {peak_flops / 1e9:,.1f} GFLOP/s ({device}, {str(dtype).removeprefix('torch.')})")
    print(f"MFU: {100 * mfu:.1f}% ({raw_model.flops_per_token() / 1e6:.1f} MFLOP per token)")
    print(f"peak memory: {memory:,.0f} MiB ({what})")
    print(f"data loader: {100 * load_time / step_time:.2f}% of update time ({1000 * load_time:.2f} ms per update)")


if __name__ == "__main__":
    run_cli(main)
