"""Our model's training step against nanoGPT's, timed side by side in one run with the same harness.

    python bench_nanogpt.py         # the reference shape: 6 x 384, 6 heads, seq 256, batch 8
    python bench_nanogpt.py --n_layers=4 --n_embd=128 --n_heads=4 --batch_size=16  # our default's
    python bench_nanogpt.py --variants=defaults --steps=20

One step is what an update of batch_size x max_seq_len tokens costs: forward, backward and a fused
AdamW step. The nanoGPT side is a GPT-2 block as nanoGPT writes it (LayerNorm, one matrix for q, k
and v, GELU, learned positions, the output head tied to the embedding), defined below for the
benchmark. The two models are timed alternately, a step of one then a step of the other, so that a
machine whose speed drifts slows both alike; the ratio is of medians.

Variants: "bf16" (autocast, eager), "fp32" (eager), "bf16+compile", "fp32+compile", and "defaults":
each repository's own default on this device, nanoGPT's (fp32 on a CPU, where it does not autocast,
and torch.compile) against train.py's dtype=auto and compile=auto as hardware.choose_speed decides
them on this machine for a run as long as the default `python train.py`.
"""
import functools
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError, load_config, run_cli
from hardware import autocast, choose_speed, pick_device, synchronize
from model import ModelConfig, Transformer
from train import TrainConfig


class GPT2Block(nn.Module):
    """nanoGPT's block: pre-LayerNorm, causal attention from one fused q/k/v matrix, a 4x GELU
    MLP."""

    def __init__(self, n_embd: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd, bias=False), nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    """nanoGPT's GPT: token and position embeddings, the blocks, a final LayerNorm, the head tied to
    the embedding."""

    def __init__(self, vocab_size: int, max_seq_len: int, n_embd: int, n_heads: int, n_layers: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(max_seq_len, n_embd)
        self.h = nn.ModuleList(GPT2Block(n_embd, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("c_proj.weight", "mlp_proj.weight"))
                std = 0.02 / math.sqrt(2 * n_layers) if residual else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@dataclass
class NanoGPTBenchConfig:
    n_layers: int = 6  # blocks of both models
    n_embd: int = 384  # width of the residual stream
    n_heads: int = 6  # attention heads
    max_seq_len: int = 256  # tokens per sequence
    batch_size: int = 8  # sequences per step
    vocab_size: int = 8192  # the vocabulary both models embed and predict (random token ids)
    steps: int = 10  # timed steps of each model, alternating (the median is reported)
    warmup: int = 3  # untimed steps of each first (allocation, caches, compilation)
    variants: str = "bf16,fp32,bf16+compile,defaults"  # comma-separated; also fp32+compile
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N" or "mps"

    def __post_init__(self):
        unknown = set(self.variants.split(",")) - {"bf16", "fp32", "bf16+compile", "fp32+compile",
                                                   "defaults"}
        if unknown:
            raise UserError(f"unknown --variants {sorted(unknown)}; choose from bf16, fp32, "
                            "bf16+compile, fp32+compile, defaults")
        if self.steps < 1 or self.warmup < 0:
            raise UserError("--steps must be at least 1 and --warmup at least 0")


def training_step(model, optimizer, x, y, device: str, dtype: torch.dtype):
    with autocast(device, dtype):
        loss = model(x, y)[1]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_seconds(model, optimizer, x, device: str, dtype: torch.dtype) -> float:
    synchronize(device)
    start = time.perf_counter()
    training_step(model, optimizer, x, x, device, dtype)
    synchronize(device)
    return time.perf_counter() - start


def time_side_by_side(models: dict, cfg: NanoGPTBenchConfig, device: str) -> dict[str, float]:
    """Median seconds per step of each (model, optimizer, dtype), stepping them in turn."""
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len), device=device)
    times = {name: [] for name in models}
    for i in range(cfg.warmup + cfg.steps):
        for name, (model, optimizer, dtype) in models.items():
            seconds = step_seconds(model, optimizer, x, device, dtype)
            if i >= cfg.warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def build(which: str, cfg: NanoGPTBenchConfig, device: str, compile: bool):
    torch.manual_seed(0)
    if which == "nanoGPT":
        model = GPT2(cfg.vocab_size, cfg.max_seq_len, cfg.n_embd, cfg.n_heads, cfg.n_layers)
    else:
        model = Transformer(ModelConfig(vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
                                        n_embd=cfg.n_embd,
                                        n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                                        n_layers=cfg.n_layers))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return (torch.compile(model) if compile else model), optimizer


def main(argv: list[str]):
    cfg = load_config(argv, NanoGPTBenchConfig)
    device = pick_device(cfg.device)
    tokens = cfg.batch_size * cfg.max_seq_len
    print(f"{cfg.n_layers} layers x {cfg.n_embd}, {cfg.n_heads} heads, seq {cfg.max_seq_len}, "
          f"batch {cfg.batch_size}, vocabulary {cfg.vocab_size} | {device} | "
          f"{torch.get_num_threads()} threads | median of {cfg.steps} steps")
    print(f"{'variant':<34}{'nanoGPT tok/s':>15}{'ours tok/s':>13}{'ratio':>8}")
    for variant in cfg.variants.split(","):
        if variant == "defaults":
            # nanoGPT autocasts on CUDA only, and compiles; ours measures, for a run of python
            # train.py's length.
            theirs_dtype, theirs_compile = (torch.bfloat16 if device.startswith("cuda")
                                            else torch.float32), True
            ours, optimizer = build("ours", cfg, device, compile=False)
            x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len), device=device)
            # python train.py's length, in steps of this benchmark's size
            run = TrainConfig(tokens_per_update=tokens)
            time_step = functools.partial(step_seconds, ours, optimizer, x, device)
            ours_dtype, ours_compile, why = choose_speed(run, None, time_step, device)
            print(f"ours with dtype=auto, compile=auto: {why}")
            label = ("defaults (ours "
                     f"{str(ours_dtype).removeprefix('torch.')}{', compiled' * ours_compile})")
        else:
            dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float32
            theirs_dtype = ours_dtype = dtype
            theirs_compile = ours_compile = variant.endswith("+compile")
            label = variant
        models = {"nanoGPT": (*build("nanoGPT", cfg, device, theirs_compile), theirs_dtype),
                  "ours": (*build("ours", cfg, device, ours_compile), ours_dtype)}
        seconds = time_side_by_side(models, cfg, device)
        print(f"{label:<34}{tokens / seconds['nanoGPT']:>15,.0f}{tokens / seconds['ours']:>13,.0f}"
              f"{seconds['nanoGPT'] / seconds['ours']:>7.2f}x", flush=True)


if __name__ == "__main__":
    run_cli(main)
