"""The machine a run uses: which device and number format, mixed precision, and what the hardware can do.

train.py, bench.py and the notebooks pick their device and dtype here; MFU (model FLOPs utilisation) is measured
against measure_matmul_flops, the speed of a large matrix product on this very device.
"""
import contextlib
import time

import torch

from configurator import UserError


def pick_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but PyTorch sees no CUDA GPU here; use --device=cpu or --device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but this machine has no Apple GPU; use --device=auto")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise UserError(f"unknown --device={name}; use auto, cpu, cuda, cuda:N or mps")
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    """bf16 autocast where the hardware runs it fast (recent GPUs; CPUs with AVX512-BF16/AMX), else fp32."""
    if name == "auto":
        if device.startswith("cuda"):
            fast = torch.cuda.is_bf16_supported()
        else:
            # CPUs without native bf16 emulate it and run its matmuls many times slower than fp32.
            fast = device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, name)


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision: matmuls in bf16, with the weights, norms and loss kept in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def synchronize(device: str):
    """GPU work runs asynchronously: wait for it before reading the clock."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_matmul_flops(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on this device and dtype: the practical peak MFU is measured against.
    A GPU needs a much bigger product than a CPU before launch overhead stops mattering."""
    n = 8192 if device.startswith("cuda") else 2048
    # A generator of its own: drawing from the global RNG here would shift a resumed run's dropout masks.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    # The fastest repeat (the first one warms up): on a busy machine, the best estimate of what the hardware does.
    return 2 * n**3 / min(times[1:])
