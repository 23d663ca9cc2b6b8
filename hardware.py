"""The machine a run uses: which device and number format, mixed precision, compiling, and what the
hardware can do.

train.py, bench.py and the notebooks pick their device and dtype here. On a CPU dtype=auto and
compile=auto are decided by measuring the run's own model on this machine (choose_speed), not from
instruction-set flags: which is faster depends on the CPU, the model's shape and the PyTorch
version. On a CUDA GPU they follow its compute capability (gpu_dtype, cuda_speed): bf16, or fp16
with a loss scaler where it has no bf16. MFU (model FLOPs utilisation) is measured against
measure_matmul_flops, the speed of a large matrix product on this very device.
"""
import contextlib
import functools
import logging
import math
import resource
import time
import warnings

import torch
import torch.distributed as dist

from configurator import UserError
from model import ModelConfig, Transformer


def pick_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but PyTorch sees no CUDA GPU here; use --device=cpu or "
                        "--device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but this machine has no Apple GPU; use --device=auto")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise UserError(f"unknown --device={name}; use auto, cpu, cuda, cuda:N or mps")
    return name


# Below compute capability 8.0 a GPU has no bf16 units (PyTorch emulates bf16 there, many times
# slower), so dtype=auto trains in fp16 with a loss scaler where fp16 is fast: tensor cores from 7.0
# (V100; T4 and RTX 20xx are 7.5), and the paired fp16 units of the P100 (6.0) and of the Jetson TX1
# and TX2 (5.3, 6.2). The other Pascal chips (6.1:
# GTX 10xx, P4, P40) run fp16 at a small fraction of their fp32 speed, and Maxwell has no fp16
# units: fp32 there.
FAST_FP16_BEFORE_TENSOR_CORES = ((5, 3), (6, 0), (6, 2))
# torch.compile generates its GPU kernels with Triton, which supports compute capability 7.0 and up.
TRITON_MIN_CAPABILITY = (7, 0)


def gpu_dtype(device: str) -> tuple[torch.dtype, str]:
    """dtype=auto on a CUDA GPU, decided by its compute capability alone, and why in a few words.

    torch.cuda.is_bf16_supported() is not asked: by default it also counts bf16 that the GPU can
    only emulate."""
    capability = torch.cuda.get_device_capability(device)
    name = f"compute capability {capability[0]}.{capability[1]}"
    if capability >= (8, 0):
        return torch.bfloat16, f"{name} has bf16"
    if capability >= (7, 0) or capability in FAST_FP16_BEFORE_TENSOR_CORES:
        return (torch.float16,
                f"{name} has fast fp16 but no bf16 (from 8.0): fp16 with a loss scaler")
    return torch.float32, f"{name} runs fp16 no faster than fp32"


def pick_dtype(name: str, device: str) -> torch.dtype:
    """The dtype=auto of a caller that does not measure (choose_speed does, on a CPU): on a GPU,
    gpu_dtype's choice; on a CPU, bf16 autocast where it has bf16 instructions (AVX512-BF16/AMX),
    else fp32."""
    if name == "auto":
        if device.startswith("cuda"):
            return gpu_dtype(device)[0]
        # CPUs without native bf16 emulate it and run its matmuls many times slower than fp32.
        fast = device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, name)


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision: matmuls in bf16 or fp16, with the weights, norms and loss kept in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def synchronize(device: str):
    """GPU work runs asynchronously: wait for it before reading the clock."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mib(device: str) -> tuple[float, str]:
    """The most memory used so far (MiB), and what that figure covers."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "peak GPU memory allocated by tensors"
    # Linux reports the peak resident set size in KiB. It covers the whole process (Python, PyTorch,
    # data).
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak resident memory of the process")


def measure_matmul_flops(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on this device and dtype: the practical peak MFU is measured
    against.
    A GPU needs a much bigger product than a CPU before launch overhead stops mattering; a CPU
    emulates fp16, many times slower than fp32, so there a small product measures it in moments."""
    n = 8192 if device.startswith("cuda") else 256 if dtype == torch.float16 else 2048
    # A generator of its own: drawing from the global RNG here would shift a resumed run's dropout
    # masks.
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
    # The fastest repeat (the first one warms up): on a busy machine, the best estimate of what the
    # hardware does.
    return 2 * n**3 / min(times[1:])


# Compiling costs a fixed time once and then saves a fraction of every update. A run whose eager
# updates take longer than this gains by compiling: the threshold lies between the break-even points
# of the CPUs measured in docs/benchmarks.md ("compile=auto"), so near it either choice costs only
# seconds.
COMPILE_PAYS_AFTER_MINUTES = 2
# Timed updates per dtype, after one that warms up (it allocates memory and the optimizer's state).
SPEED_ROUNDS = 3


def update_seconds(time_update, dtypes: list, device: str,
                   rounds: int = SPEED_ROUNDS) -> torch.Tensor:
    """Seconds of one whole update (every micro-step's forward and backward, clipping, the
    optimizer's step) in each of `dtypes`, as time_update(dtype) measures one. The dtypes take
    turns, so that other work on a shared machine slows them alike, and each keeps its fastest
    update: other work only ever adds time. The random state is left as it was. Under torchrun every
    rank measures and all keep the slowest rank's figures, so that they choose alike."""
    times = [[] for _ in dtypes]
    # dropout in the timed updates draws from the CPU's generator
    with torch.random.fork_rng(devices=[]):
        for _ in range(rounds + 1):
            for dtype, seconds in zip(dtypes, times, strict=True):
                seconds.append(time_update(dtype))
    seconds = torch.tensor([min(s[1:]) for s in times], device=device)
    if dist.is_initialized():
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds


@functools.cache
def compile_failure(device: str) -> str:
    """Why torch.compile cannot build code here, in a few words, or "" when it can: a tiny function
    is compiled and run. On a CPU, inductor writes C++ and builds it with the compiler in $CXX (g++
    by default) against Python's headers; a missing compiler or missing headers show up here in
    seconds, before any training. Most of those seconds load the compiler stack, which compiling the
    model then finds loaded. Asked once per process."""
    quiet = logging.root.manager.disable
    # inductor logs a failed build at length; the caller says it in one line
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Can't find Python.h": the failure below says it
            torch.compile(lambda x: (x.sin() * 2).sum(),
                          fullgraph=True)(torch.ones(8, device=device))
    except Exception as e:
        lines = str(e).splitlines() or [type(e).__name__]
        # A failed build names its cause on the compiler's first "error:" line; other failures on
        # their first line.
        return next((line.split("error: ", 1)[1] for line in lines if "error: " in line), lines[0])
    finally:
        logging.disable(quiet)
    return ""


def resumed_speed(cfg, saved: dict) -> tuple[str, bool | str, str]:
    """A resumed run's dtype and compile: those it trained with (its checkpoint's config, `saved`,
    records what it chose), unless the user set them now; and what the start-up line says about
    it."""
    taken = [name for name in ("dtype", "compile") if name not in cfg.user_set]
    chosen = {name: saved[name] if name in taken else getattr(cfg, name)
              for name in ("dtype", "compile")}
    said = [" and ".join(f"{name} {saved[name]}" for name in taken)
            + " from the checkpoint"] if taken else []
    if "dtype" not in taken and chosen["dtype"] != saved["dtype"]:
        said.append(f"dtype {chosen['dtype']} as set, the checkpoint trained in {saved['dtype']}")
    if "compile" not in taken and chosen["compile"] != saved["compile"]:
        said.append(f"compile {chosen['compile']} as set, the checkpoint trained with compile "
                    f"{saved['compile']}")
    return chosen["dtype"], chosen["compile"], "; ".join(said)


def choose_speed(cfg, saved: dict | None, time_update,
                 device: str) -> tuple[torch.dtype, bool, str]:
    """(dtype, compile, what the start-up line says about them) for the run `cfg` (a TrainConfig)
    describes.

    A resumed run (`saved`: its checkpoint's config) keeps the dtype and compile it trained with,
    unless the user set them: its updates then round as they did, and nothing is measured. Otherwise
    "auto" asks for a measurement and explicit choices are obeyed. On a GPU: cuda_speed's choice, by
    the compute capability. On a CPU, dtype=auto times whole updates (update_seconds;
    time_update(dtype) runs one on a copy of the run's state) in bf16 autocast and in fp32 where the
    CPU has bf16 instructions (else fp32: emulated bf16 is many times slower) and keeps the faster;
    compile=auto compiles when the run's updates, at the measured speed, take longer than
    COMPILE_PAYS_AFTER_MINUTES (a --max_minutes run: when it is longer). Where torch.compile cannot
    build (compile_failure), compile=auto trains eager and --compile=True is a UserError."""
    dtype, compile, resumed = cfg.dtype, cfg.compile, ""
    if saved:
        dtype, compile, resumed = resumed_speed(cfg, saved)
    if device.startswith("cuda"):
        chosen, compile, why = cuda_speed(dtype, compile, device)
        return chosen, compile, " | ".join(([resumed] if resumed else [])
                                           + ([f"auto: {why}"] if why else []))
    candidates = [getattr(torch, dtype)] if dtype != "auto" else [pick_dtype("auto", device)]
    if dtype == "auto" and candidates[0] == torch.bfloat16:
        candidates.append(torch.float32)
    best, length, auto = 0, "", []  # auto: what the measurements decided, in a few words each
    if len(candidates) > 1 or (compile == "auto" and not cfg.max_minutes):
        seconds = update_seconds(time_update, candidates, device)
        best = int(seconds.argmin())
        if len(candidates) > 1:
            took = ", ".join(f"{str(c).removeprefix('torch.')} {t:.3f} s"
                             for c, t in zip(candidates, seconds.tolist(), strict=True))
            auto.append(f"dtype: an update took {took}")
    if compile == "auto":
        run_minutes = (cfg.max_minutes or cfg.training_tokens // cfg.tokens_per_update
                       * seconds[best].item() / 60)
        compile = run_minutes > COMPILE_PAYS_AFTER_MINUTES
        length = (f"the run lasts {cfg.max_minutes:g} min" if cfg.max_minutes else
                  f"its updates take about {run_minutes:.1f} min eager")
    failure = compile_failure(device) if compile and device == "cpu" else ""
    if failure and cfg.compile is True:
        raise UserError("--compile=True but torch.compile cannot build code on this machine "
                        f"({failure}); install a C++ compiler (or point CXX at one) and Python's "
                        "headers, or pass --compile=False")
    if failure:
        compile = False
        auto.append(f"compile: no, torch.compile cannot build code here ({failure})")
    elif length:
        auto.append(f"compile: {'yes' if compile else 'no'}, {length} (it pays after "
                    f"{COMPILE_PAYS_AFTER_MINUTES})")
    said = ([resumed] if resumed else []) + ([f"auto: {'; '.join(auto)}"] if auto else [])
    return candidates[best], compile, " | ".join(said)


def cuda_speed(dtype: str, compile: bool | str, device: str) -> tuple[torch.dtype, bool, str]:
    """choose_speed on a CUDA GPU, where nothing is measured: for dtype=auto the dtype gpu_dtype
    picks, and compiling wherever Triton runs (it pays for any run worth a GPU)."""
    capability = torch.cuda.get_device_capability(device)
    triton = capability >= TRITON_MIN_CAPABILITY
    if compile is True and not triton:
        raise UserError("--compile=True, but torch.compile's Triton needs compute capability 7.0 "
                        "and this GPU has "
                        f"{capability[0]}.{capability[1]}; use --compile=False or auto")
    auto, why = gpu_dtype(device)
    chosen = auto if dtype == "auto" else getattr(torch, dtype)
    reasons = []
    if dtype == "auto":
        reasons.append(f"dtype: {why}")
    elif chosen == torch.bfloat16 and auto != torch.bfloat16:
        reasons.append("dtype: bfloat16 as asked, which this GPU emulates (auto: "
                       f"{str(auto).removeprefix('torch.')})")
    if compile == "auto" and not triton:
        reasons.append("compile: no, Triton needs compute capability 7.0")
    return chosen, triton if compile == "auto" else compile, "; ".join(reasons)


# --------------------------------------------------------------------------------------------------
# Memory: what a config needs per GPU, before anything is allocated (bench.py --estimate, the
# preflight).

def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(all parameters, those of one Block), counted on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        model = Transformer(config)
    return model.num_params(), sum(p.numel() for p in model.layers[0].parameters())


def memory_estimate(cfg, vocab_size: int, world_size: int, fsdp: bool,
                    checkpointing: bool) -> dict[str, float]:
    """Bytes per GPU at the peak of an update (the start of backward, gradients kept from earlier
    micro-steps).

    Weights, gradients and AdamW's two moments are fp32 (4 bytes each per parameter); with
    --optimizer=muon the blocks' matrices keep Muon's one momentum instead (4 bytes), sharded like
    the rest under FSDP. (Muon's step also holds whole, for a moment, the matrices a rank
    orthogonalizes: about 1/world_size of them, after backward has freed the activations, so not at
    this peak.) Under bf16 (dtype auto or bfloat16; float16 takes as much) the matmuls run in bf16,
    so each layer also keeps bf16 copies:
    - DDP: autocast's bf16 copy of every matrix, saved for backward (2 bytes per parameter); with
      more than one rank, DDP's gradient buckets are a second fp32 copy of the gradients;
    - FSDP: the sharded fp32 state is 1/world_size of the above; on top, weights are gathered whole
      in the compute dtype for two Blocks at a time (one computing, the next prefetched) and for the
      root (embedding, final norm, output) through the whole step; a Block's gradients are whole,
      then cast to fp32 for the reduce-scatter.
    Activations, per token of a micro-batch (batch_size x max_seq_len), as saved by model.py's code
    (counted with saved-tensor hooks): each RMSNorm keeps its fp32 input and normalised value and
    the bf16 copy the matmuls read (8h + a*h bytes, a = 2 in bf16, 4 in fp32); attention keeps q, k,
    v after RoPE, the attention output and its reshaped copy (a*(3h + 2kv), with grouped-query
    attention the repeated k, v instead: 5a*h); SwiGLU keeps four tensors of the hidden width f
    (4a*f). Checkpointing keeps only each Block's fp32 input (4h) and redoes one Block at a time in
    backward. The loss adds 12 bytes per vocabulary entry (fp32 log-probabilities and the two
    gradients that replace them)."""
    config = cfg.model_config(vocab_size)
    n, per_block = parameter_counts(config)
    root = n - config.n_layers * per_block
    a = 4 if cfg.dtype == "float32" else 2
    h, L = config.n_embd, config.n_layers
    kv = h // config.n_heads * config.n_kv_heads
    f = config.multiple_of * math.ceil(int(8 * h / 3) / config.multiple_of)
    attention = 5 * a * h if kv < h else a * (3 * h + 2 * kv)
    layer = 2 * (8 * h + a * h) + attention + 4 * a * f
    kept = L * 4 * h + layer if checkpointing else L * layer
    activations = cfg.batch_size * cfg.max_seq_len * (kept + 8 * h + a * h + 12 * vocab_size)
    # all but a Block's two norm gains
    in_muon = L * (per_block - 2 * h) if cfg.optimizer == "muon" else 0
    optimizer = 8 * n - 4 * in_muon
    if fsdp:
        params = 4 * n / world_size + a * (2 * per_block + root)
        grads = 4 * n / world_size + a * root + (a + (4 if a != 4 else 0)) * per_block
        optimizer /= world_size
    else:
        params = 4 * n + (2 * n if a == 2 else 0)
        grads = 4 * n * (2 if world_size > 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "activations": activations}
