"""Pretrain a LLaMA-style model by next-token prediction, in one loop you can read top to bottom.

    python train.py                                      # small default model on data/shakespeare
    python train.py config/llama_1b3.py --batch_size=4   # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py config/llama_1b3.py
    torchrun --standalone --nproc_per_node=8 train.py config/llama_7b.py   # FSDP: weights sharded over the ranks
    python train.py --load_ckpt=True                     # resume from the newest checkpoint in ckpt_dir
    python train.py --init_from=DIR                      # start from a Hugging Face Llama model's weights

Reading order: TrainConfig and load_config (what can be set) -> DatasetLoader (tokens on disk -> (x, y)
batches) -> Scheduler (learning rate per update) -> the pieces of one update (make_optimizer, wrap_model: none,
DDP or FSDP, train_update, evaluate) -> checkpoints -> train(), the loop itself.

Importing this file has no side effects: tests, notebooks and bench.py reuse its parts.
"""
import ast
import contextlib
import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import math
import os
import pickle
import re
import shutil
import signal
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.checkpoint
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model import ModelConfig, Transformer
from prepare import UserError, damaged, load_tokenizer, lock_directory, read_meta, run_cli, space_for, write_file


# ----------------------------------------------------------------------------------------------------------------
# Configuration: every knob of a run, with the guide's names. A config file is plain Python assigning some of them.
@dataclass
class TrainConfig:
    # The defaults train in about 10 minutes on a 2-core laptop CPU: of the shapes and settings we timed there, this
    # small, fast model with Muon reached the lowest validation loss in that time (README, "Choosing the default").
    # The guide's 1.3B run, with the guide's AdamW, is config/llama_1b3.py.
    # Paths
    dataset_dir: str = "data/shakespeare"  # made by prepare.py: shards, tokenizer.tiktoken, meta.json
    ckpt_dir: str = "out"  # checkpoints, the CSV log and the loss plot go here
    log_file: str = ""  # CSV log; "" means <ckpt_dir>/log.csv
    init_from: str = ""  # a Hugging Face LlamaForCausalLM directory to start from (see init_from_hf); "" = random
    # Batching: one micro-step sees batch_size x max_seq_len tokens per rank; an update sees tokens_per_update.
    batch_size: int = 16
    max_seq_len: int = 256
    tokens_per_update: int = 16 * 256
    # Model architecture (passed on to model.ModelConfig)
    n_embd: int = 128
    n_heads: int = 4
    n_kv_heads: int = 4
    n_layers: int = 4
    multiple_of: int = 128
    eps: float = 1e-5
    theta: float = 10_000.0
    dropout: float = 0.0
    tie_embeddings: bool = False
    # Optimisation and the learning-rate schedule
    schedule: str = "linear"  # "linear", "cosine" (the guide's) or "constant"
    warmup_iterations: int = 20  # updates of linear warm-up
    max_lr: float = 2e-3
    min_lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)
    optimizer: str = "muon"  # "muon": Muon for the blocks' matrices, AdamW for the rest; or "adamw" (the guide's)
    muon_lr: float = 8e-3  # Muon's peak learning rate, on the same schedule; 0 means max_lr
    embedding_lr: float = 3e-2  # with Muon: the token embedding's peak (AdamW), on the same schedule; 0 means max_lr
    # Length of the run, evaluation, samples and checkpoints
    training_tokens: int = 2_000_000
    max_minutes: float = 0.0  # > 0: train for this many minutes of wall clock instead of for training_tokens
    eval_interval: int = 100  # evaluate every this many updates (and at the end)
    eval_tokens: int = 65_536  # validation tokens per evaluation (a fixed slice from the start of val)
    model_gen_multiplier: float = 2.0  # print a sample at updates 1, m, m^2, ... (0 disables)
    token_ckpt: int = 1_000_000  # save a checkpoint every this many tokens (and at the end)
    keep_ckpts: int = 3  # keep the newest K checkpoints; older ones are deleted once a new one is complete
    load_ckpt: bool | str = False  # True: resume (error if none); "auto": resume if a checkpoint exists
    # System
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N" or "mps"
    dtype: str = "auto"  # "auto", "float32" or "bfloat16" (autocast); auto = bf16 where the hardware has it
    compile: bool = False  # torch.compile the model
    seed: int = 1337
    # Scale: beyond what one GPU's memory holds
    fsdp: bool = False  # shard weights, gradients and optimizer state across the torchrun ranks (FSDP2), not DDP
    activation_checkpointing: bool = False  # recompute each block's activations in backward instead of storing them

    def __post_init__(self):
        checks = [
            (self.schedule in ("cosine", "linear", "constant"), "--schedule must be cosine, linear or constant"),
            (self.dtype in ("auto", "float32", "bfloat16"), "--dtype must be auto, float32 or bfloat16"),
            (self.load_ckpt in (True, False, "auto"), "--load_ckpt must be True, False or 'auto'"),
            (min(self.batch_size, self.max_seq_len, self.tokens_per_update, self.eval_interval) > 0,
             "batch_size, max_seq_len, tokens_per_update and eval_interval must be positive"),
            (self.training_tokens >= self.tokens_per_update,
             "--training_tokens must be at least tokens_per_update (one optimizer update)"),
            (0 <= self.min_lr <= self.max_lr, "--min_lr must be between 0 and max_lr"),
            (self.keep_ckpts >= 1, "--keep_ckpts must be at least 1"),
            (self.optimizer in ("adamw", "muon"), "--optimizer must be adamw or muon"),
            (self.optimizer == "adamw" or self.max_lr > 0, "--optimizer=muon needs max_lr > 0"),
            (min(self.muon_lr, self.embedding_lr, self.max_minutes) >= 0,
             "--muon_lr, --embedding_lr and --max_minutes must not be negative"),
            (not (self.fsdp and self.optimizer == "muon"),
             "--fsdp=True needs --optimizer=adamw: Muon orthogonalises whole matrices, which FSDP splits across ranks"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The architecture part of the config, with the vocabulary size taken from the dataset."""
        names = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"]
        return ModelConfig(vocab_size=vocab_size, **{name: getattr(self, name) for name in names})


def _check_type(name: str, value, annotation):
    """Reject a value whose type differs from the field's (ints are fine where floats are expected)."""
    allowed = getattr(annotation, "__args__", (annotation,))
    if isinstance(value, bool) and bool not in allowed:
        ok = False  # bool is a subclass of int, but --n_layers=True is certainly a mistake
    else:
        ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
    if not ok:
        expected = " or ".join(t.__name__ for t in allowed)
        raise UserError(f"--{name} expects {expected}, got {value!r}; fix the value")


def load_config(argv: list[str], cls=TrainConfig):
    """Build a config (a TrainConfig unless told otherwise) from `config/x.py` files and `--key=value` overrides,
    applied in the order given. The result remembers which keys were set (`user_set`), so that a default can
    adapt to the machine where a value the user chose must not."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}

    def set_value(name, value, where):
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"the names are in {cls.__name__}"
            raise UserError(f"unknown config key '{name}' in {where}; {hint}")
        _check_type(name, value, fields[name].type)
        values[name] = value

    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise UserError(f"'{arg}' has no value; write it as {arg}=VALUE")
            name, text = arg[2:].split("=", 1)
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word such as --device=cpu is a string
            set_value(name, value, "the command line")
        else:
            if not os.path.isfile(arg):
                raise UserError(f"config file '{arg}' does not exist; pass a path such as config/llama_1b3.py")
            scope = {}
            try:
                exec(Path(arg).read_text(), scope)
            except Exception as e:
                raise UserError(f"config file '{arg}' raised {type(e).__name__}: {e}; fix the file") from None
            for name, value in scope.items():
                if not name.startswith("_") and not callable(value) and not isinstance(value, type(os)):
                    set_value(name, value, arg)
    cfg = cls(**values)
    cfg.user_set = frozenset(values)  # which keys the user chose, for checks a default must not trip
    return cfg


def replace_config(cfg: TrainConfig, **changes) -> TrainConfig:
    """dataclasses.replace that keeps user_set (which is not a field, so replace alone would drop it)."""
    new = dataclasses.replace(cfg, **changes)
    new.user_set = getattr(cfg, "user_set", frozenset())
    return new


# ----------------------------------------------------------------------------------------------------------------
# Data: shards of token ids on disk -> (x, y) batches, with every rank reading its own slices.
def open_shards(dataset_dir: str, split: str) -> tuple[list[np.ndarray], dict]:
    """Memory-map a split's shards after checking them against meta.json (count, dtype, length, id range)."""
    root = Path(dataset_dir)
    meta = read_meta(dataset_dir, "dtype", "shards")
    names = sorted(name for name in meta["shards"] if name.startswith(split + "_"))
    on_disk = sorted(p.name for p in root.glob(f"{split}_*.npy"))
    if not names or names != on_disk:
        raise UserError(f"{dataset_dir}: the {split} shards on disk do not match meta.json; "
                        "rebuild the dataset with `python prepare.py --overwrite`")
    shards = []
    for name in names:
        try:  # a truncated file (an interrupted copy, a disk error) cannot be mapped
            shard = np.load(root / name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise damaged(root / name, e) from None
        if shard.dtype != np.dtype(meta["dtype"]) or len(shard) != meta["shards"][name]:
            raise UserError(f"{root / name} does not match meta.json (dtype or length); rebuild the dataset with "
                            "`python prepare.py --overwrite`")
        shards.append(shard)
    return shards, meta


class DatasetLoader:
    """Serves (x, y) batches from a split, y being x shifted by one token.

    The shards are read in order through memory maps, so memory use does not grow with the dataset. With W ranks,
    one "group" of W batches is taken per step: rank r reads at offset + r*B*T, and offset advances by B*T*W, so
    ranks never read the same tokens. A shard that cannot fill another whole group is left (its tail, less than
    one batch per rank, is skipped) and the next shard starts; after the last shard the loader wraps around.
    Each pass over the data after the first enters every shard a fraction of a sequence further in (see
    pass_start), so the text is cut into different T-token windows each time.
    The position (shard, offset, passes) is all the state there is, and it goes into checkpoints. It counts tokens,
    not batches, so a run resumed on another number of ranks carries on from the same token: the first group then
    starts at offset, whatever the group size was before.
    """

    def __init__(self, dataset_dir, split, batch_size, seq_len, rank=0, world_size=1, device="cpu", vocab_size=None):
        self.B, self.T, self.rank, self.world_size, self.device = batch_size, seq_len, rank, world_size, device
        shards, _ = open_shards(dataset_dir, split)
        group = batch_size * seq_len * world_size
        # Each shard must feed at least one whole group (+1 token for the shifted target), or it is skipped.
        self.shards = [s for s in shards if len(s) >= group + 1]
        if not self.shards:
            raise UserError(f"no {split} shard in {dataset_dir} holds batch_size*max_seq_len*world_size+1 = "
                            f"{group + 1} tokens; lower batch_size or max_seq_len")
        self.vocab_size = vocab_size
        self.checked = set()  # shards whose token ids were checked against vocab_size
        self.shard, self.offset, self.passes = 0, 0, 0

    def batches_per_shard(self, index: int) -> int:
        return (len(self.shards[index]) - 1) // (self.B * self.T * self.world_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.shards[self.shard]
        if self.vocab_size is not None and self.shard not in self.checked:
            if int(data.max()) >= self.vocab_size:  # one pass per shard, the first time it is used
                raise UserError(f"the dataset holds token id {int(data.max())} but the model's vocabulary has "
                                f"{self.vocab_size} ids; use a dataset made with the same tokenizer")
            self.checked.add(self.shard)
        start = self.offset + self.rank * self.B * self.T
        chunk = torch.from_numpy(data[start:start + self.B * self.T + 1].astype(np.int64))
        self.offset += self.B * self.T * self.world_size
        self.skip_short_tail()
        if str(self.device).startswith("cuda"):
            # Page-locked memory lets the copy run asynchronously, overlapping with the GPU's work.
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
        x, y = chunk[:-1].view(self.B, self.T), chunk[1:].view(self.B, self.T)
        return x, y

    def pass_start(self) -> int:
        """Where each shard is entered on this pass: token 0 on the first pass, then 0.618 * T tokens further (mod T)
        on each new one. A small corpus is read many times; always cutting it at the same places would show the
        model the very same windows, with the same contexts, every pass, and it memorises them (on a 1 MB corpus
        read four times, the validation loss stopped falling and turned up; with new cuts it kept falling, README).
        Stepping by the golden ratio keeps the cuts of successive passes far apart."""
        return int(self.passes * 0.6180339887 * self.T) % self.T

    def skip_short_tail(self):
        """Move to the next shard when what is left of this one cannot fill another whole group."""
        group = self.B * self.T * self.world_size
        if self.offset + group + 1 > len(self.shards[self.shard]):
            self.shard = (self.shard + 1) % len(self.shards)
            self.passes += self.shard == 0
            start = self.pass_start()
            self.offset = start if start + group + 1 <= len(self.shards[self.shard]) else 0  # a shard just big enough

    def state_dict(self) -> dict:
        return {"shard": self.shard, "offset": self.offset, "passes": self.passes}

    def load_state_dict(self, state: dict):
        # Checkpoints written before passes were counted resume as if on the first pass.
        self.shard, self.offset, self.passes = state["shard"], state["offset"], state.get("passes", 0)
        self.skip_short_tail()  # a position saved with fewer ranks may leave too little for this many


# ----------------------------------------------------------------------------------------------------------------
# Learning rate: linear warm-up, then cosine / linear decay to min_lr, or constant.
class Scheduler:
    """Sets the optimizer's learning rate for each update (counted from 0).

    Warm-up: update s < warmup_steps gets max_lr * (s + 1) / warmup_steps, so the first update is gentle and the
    last warm-up update reaches max_lr. Decay: progress p runs from 0 right after warm-up to 1 at the final update;
    cosine gives min + (max - min) * (1 + cos(pi p)) / 2, linear gives max - (max - min) * p. "constant" keeps
    max_lr throughout, with no warm-up, which is handy for debugging.
    """

    def __init__(self, optimizer, schedule, training_steps, warmup_steps, max_lr, min_lr):
        self.optimizer, self.schedule = optimizer, schedule
        self.training_steps, self.warmup_steps = training_steps, warmup_steps
        self.max_lr, self.min_lr = max_lr, min_lr
        self.current_lr = None

    def lr_at(self, step: int) -> float:
        if self.schedule == "constant":
            return self.max_lr
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.training_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.schedule == "cosine":
            return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        return self.max_lr - (self.max_lr - self.min_lr) * progress

    def step(self, step: int) -> float:
        self.current_lr = self.lr_at(step)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                # A group may peak at its own learning rate (Muon's): it then carries the ratio as lr_scale.
                group["lr"] = self.current_lr * group.get("lr_scale", 1.0)
        return self.current_lr

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "optimizer"}

    def load_state_dict(self, state: dict):
        vars(self).update(state)


# ----------------------------------------------------------------------------------------------------------------
# The pieces of one update.
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
            # CPUs without native bf16 emulate it and run matmuls hundreds of times slower than fp32.
            fast = device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, name)


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision: matmuls in bf16, with the weights, norms and loss kept in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """g with its singular values pushed towards 1 by a Newton-Schulz iteration (no SVD, only matrix products).

    Each step maps every singular value s to a*s + b*s^3 + c*s^5; Keller Jordan's coefficients below make small
    values grow fast, and five steps leave all of them between about 0.7 and 1.2, close enough for Muon. Dividing
    by the Frobenius norm first puts every singular value at or below 1, where the iteration starts. The iteration
    runs on the short side's Gram matrix, the cheaper of the two. It runs in float32: torch.optim.Muon uses
    bfloat16, which CPUs without bf16 instructions emulate (on our AVX2 CPU a 384x128 matrix took 65 ms that way
    and 7 ms in float32); for config/llama_1b3.py its products are about 1% of an update's FLOPs (our count)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float() / (g.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-schulz), for 2-D weight matrices.

    The update is the gradient's Nesterov momentum with every singular value set to about 1 (see orthogonalize), so
    a matrix moves by the same amount in every direction instead of mostly along the few directions that dominate
    its gradient. Scaling it by 0.2 * sqrt(max(rows, cols)) gives it the size of a typical AdamW update (Moonshot
    AI's rule, torch.optim.Muon's adjust_lr_fn="match_rms_adamw"), so lr and weight decay mean what AdamW's do."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - momentum)
                update = orthogonalize(p.grad.lerp(buf, momentum))  # Nesterov: a step beyond the momentum
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, as in AdamW
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class MuonAndAdamW:
    """--optimizer=muon: two optimizers that train.py steps, zeroes, saves and loads as one.

    Muon takes the 2-D weight matrices inside the blocks. Orthogonalizing an update only makes sense for a matrix
    that maps vectors to vectors, so the embedding table (a lookup), the output head and the norm gains
    stay with AdamW, as in modded-nanogpt and nanochat."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: load_state_dict gives each optimizer new group dicts, and the Scheduler must set the
        # learning rate in the ones the optimizers use.
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def make_optimizer(model, cfg: TrainConfig, device: str):
    """AdamW, with weight decay on the matrices only: decaying norm gains towards zero would just fight them.
    With --optimizer=muon the matrices inside the blocks go to Muon instead (see MuonAndAdamW), and the token
    embedding gets a peak of its own, embedding_lr. An embedding row is trained only by the tokens that use it, and
    Adam moves it by about the learning rate per update whatever its gradient: at max_lr the rows of rare tokens
    hardly leave their initial values in a short run (the split modded-nanogpt and nanochat use, measured here too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    in_muon = {id(p) for p in model.layers.parameters() if p.dim() == 2} if cfg.optimizer == "muon" else set()
    embedding = model.tok_embeddings.weight if in_muon else None
    matrices = [p for p in params if p.dim() >= 2 and id(p) not in in_muon and p is not embedding]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if embedding is not None:
        groups.append({"params": [embedding], "weight_decay": cfg.weight_decay,
                       "lr_scale": (cfg.embedding_lr or cfg.max_lr) / cfg.max_lr})
    # The fused kernel updates every parameter in one pass instead of a dozen separate element-wise ops over all of
    # them. On a 2-core CPU the default model's optimizer step took 4.7 ms instead of 22.7 (about 2% of an update).
    fused = device == "cpu" or device.startswith("cuda")
    adamw = torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if not in_muon:
        return adamw
    muon_lr = cfg.muon_lr or cfg.max_lr
    muon = Muon([{"params": [p for p in params if id(p) in in_muon], "lr_scale": muon_lr / cfg.max_lr}],
                lr=muon_lr, weight_decay=cfg.weight_decay)
    return MuonAndAdamW(muon, adamw)


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per update: tokens_per_update split over batch_size * max_seq_len tokens on each of the ranks."""
    per_micro_step = cfg.batch_size * cfg.max_seq_len * world_size
    if cfg.tokens_per_update % per_micro_step:
        raise UserError(f"tokens_per_update={cfg.tokens_per_update} is not a multiple of batch_size*max_seq_len*"
                        f"world_size = {cfg.batch_size}*{cfg.max_seq_len}*{world_size} = {per_micro_step}; "
                        "change tokens_per_update or batch_size")
    return cfg.tokens_per_update // per_micro_step


def fit_batch(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, str]:
    """The default batch is sized for one process. When the user chose neither batch_size nor tokens_per_update
    and the ranks cannot split it evenly, give each rank its share of the update's sequences (rounded down to a
    whole number per rank) in micro-batches of at most batch_size. Returns the config and a line saying what
    changed ("" when nothing did). Values the user set are left alone, to fail with accumulation_steps' error."""
    fits = cfg.tokens_per_update % (cfg.batch_size * cfg.max_seq_len * world_size) == 0
    if fits or {"batch_size", "tokens_per_update"} & getattr(cfg, "user_set", set()):
        return cfg, ""
    per_rank = max(1, cfg.tokens_per_update // cfg.max_seq_len // world_size)  # sequences per rank per update
    batch = max(b for b in range(1, min(cfg.batch_size, per_rank) + 1) if per_rank % b == 0)
    fitted = replace_config(cfg, batch_size=batch, tokens_per_update=per_rank * world_size * cfg.max_seq_len)
    return fitted, (f"{world_size} ranks: batch_size {cfg.batch_size} -> {fitted.batch_size}, tokens_per_update "
                    f"{cfg.tokens_per_update} -> {fitted.tokens_per_update} (set them to choose others)")


def checkpoint_blocks(model: Transformer):
    """Activation checkpointing: each Block keeps only its input for backward and runs its forward again there,
    trading about a third more compute for activation memory that no longer grows with n_layers."""
    for block in model.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def wrap_model(model: Transformer, cfg: TrainConfig, device: str, dtype: torch.dtype, world_size: int):
    """Decide how the model is spread over the ranks; returns the module to train.

    - one process: the model itself;
    - DDP (the default under torchrun): every rank holds all the weights, gradients and AdamW state, and gradients
      are averaged with an all-reduce in backward;
    - FSDP2 (--fsdp=True): each rank holds 1/world_size of every weight, gradient and AdamW moment. A Block's
      weights are gathered (all-gather) just before its forward and its backward, and freed after; its gradients
      are summed and scattered (reduce-scatter) so each rank keeps the slice it updates. Sharding Block by Block
      means only one Block is ever whole in memory; the root call takes what is left (embedding, norm, output).
    With FSDP the sharding happens in place: `model` itself becomes the sharded module (its parameters DTensors)."""
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    if cfg.fsdp:
        mesh = init_device_mesh(device.split(":")[0], (world_size,))
        # bf16 weights for compute, gradients reduced in fp32 so the sum over ranks loses nothing; the sharded
        # master weights and AdamW's moments stay fp32.
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            if cfg.compile:
                block.compile()  # per Block, so the hooks that gather and scatter stay outside the compiled code
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device != "cpu" else None)
    return model


def gradient_sync(model, sync: bool):
    """Exchange gradients across ranks in this backward only if `sync`: with accumulation, only the last micro-step
    of an update needs it (DDP's all-reduce, FSDP's reduce-scatter); the others just add to local gradients."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()


BUDGET_PROBE_UPDATES = 10  # --max_minutes: the run's length is planned after each of the first 10 updates


def replans_length(step: int) -> bool:
    """--max_minutes: the run's length is planned after each of the first BUDGET_PROBE_UPDATES updates, then again
    after every BUDGET_PROBE_UPDATES more. A machine's speed drifts (shared, throttled, warming up): on our shared
    2-core CPU by a quarter within minutes. A length fixed early cannot follow that; planned again from the time
    really used so far, the error left shrinks as the end comes near."""
    return step <= BUDGET_PROBE_UPDATES or step % BUDGET_PROBE_UPDATES == 0


def updates_in_budget(cfg: TrainConfig, step: int, seconds_used: float, update_seconds: float, eval_tokens: int,
                      n_params: int, device: str) -> int:
    """--max_minutes: how many updates in all fit in the budget, given the time used so far and what one update costs.

    The time left, less one last evaluation and checkpoint, is divided by the cost of an update plus its share of
    the evaluations (a forward pass over the eval_tokens an evaluation reads, fewer than cfg.eval_tokens when the
    validation split is smaller, every eval_interval updates; forward alone is about a third of forward + backward)
    and of the checkpoints (12 bytes per parameter, weights and AdamW's two moments, at a conservative 200 MB/s,
    every token_ckpt tokens). Rank 0's answer is every rank's, so all run the same updates."""
    eval_seconds = update_seconds * eval_tokens / cfg.tokens_per_update / 3
    ckpt_seconds = 12 * n_params / 200e6
    per_update = (update_seconds + eval_seconds / cfg.eval_interval
                  + ckpt_seconds * cfg.tokens_per_update / cfg.token_ckpt)
    left = cfg.max_minutes * 60 - seconds_used - eval_seconds - ckpt_seconds
    total = torch.tensor(step + max(0, int(left / per_update)), device=device)
    if dist.is_initialized():
        dist.broadcast(total, src=0)
    # The first updates always run, to be timed; and at least one update follows every plan, so that the run's last
    # update has the learning rate of the plan it ends (min_lr) even when a re-plan finds the budget spent.
    return max(BUDGET_PROBE_UPDATES, step + 1, int(total.item()))


def train_update(model, optimizer, loader, accum_steps, cfg, device, dtype) -> tuple[float, float]:
    """One optimizer update: accumulate gradients over micro-steps, clip, step. Returns (mean loss, grad norm)."""
    total_loss = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        x, y = loader.next_batch()
        with gradient_sync(model, sync=micro_step == accum_steps - 1):
            with autocast(device, dtype):
                # Only the loss is kept: holding the logits through backward would cost vocab_size numbers per
                # token, more than all of a small model's other activations together.
                loss = model(x, y)[1]
            # Dividing by accum_steps makes the summed gradients the mean over all micro-batches.
            (loss / accum_steps).backward()
        total_loss += loss.detach()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over all ranks' shards, computed with a collective
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = total_loss / accum_steps
    if dist.is_initialized():
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
    return mean_loss.item(), grad_norm.item()


@torch.no_grad()
def evaluate(model, val_loader, n_batches, device, dtype) -> float:
    """Mean loss over the first n_batches of the validation split: the same tokens every time."""
    model.eval()
    val_loader.load_state_dict({"shard": 0, "offset": 0})
    losses = []
    for _ in range(n_batches):
        x, y = val_loader.next_batch()
        with autocast(device, dtype):
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


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


def next_sample_update(step: int, multiplier: float) -> float:
    """The first update after `step` that prints a sample: the schedule 1, m, m^2, ... (rounded, and never less than
    one update apart). A function of the update number alone, so a resumed run keeps the same schedule."""
    at = 1.0
    while round(at) <= step:
        at = max(at * multiplier, at + 1)
    return at


def sample_text(model, tokenizer, device, seed, max_new_tokens=64) -> str:
    """A short generation from a document boundary: the quickest check that the model learns something.

    It draws from its own random stream, seeded here, for two reasons: a sharded model generates on every rank in
    lockstep (each forward gathers weights from all of them), so all ranks must pick the same tokens and stop at the
    same length; and sampling must not disturb the random state training continues with."""
    start = torch.tensor([[tokenizer.eot_id]], device=device)
    model.eval()  # no dropout while generating
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(seed)
        out = model.generate(start, max_new_tokens, temperature=0.8, top_p=0.95, eos_token=tokenizer.eot_id)
    model.train()
    return tokenizer.decode([t for t in out[0, 1:].tolist() if t != tokenizer.eot_id])


def init_from_hf(cfg: TrainConfig, vocab_size: int) -> tuple[TrainConfig, Transformer]:
    """The model for --init_from=DIR: a Hugging Face LlamaForCausalLM directory's architecture and weights.

    The architecture is config.json's: a setting the user chose (load_config's user_set) that differs from it is
    refused. The returned config holds config.json's values, so checkpoints record them. The training choices
    (max_seq_len, dropout, batch, schedule) stay this run's."""
    from export import read_hf_model  # export.py imports this file, so not at the top

    fields, weights = read_hf_model(cfg.init_from, cfg.multiple_of)
    for name, value in fields.items():
        if name in getattr(cfg, "user_set", ()) and getattr(cfg, name) != value:
            raise UserError(f"{name}={getattr(cfg, name)} (set in a config file or on the command line) contradicts "
                            f"{cfg.init_from}/config.json ({name}={value}); drop it: with --init_from the "
                            "architecture comes from config.json")
    if vocab_size > fields["vocab_size"]:
        raise UserError(f"{cfg.dataset_dir}'s vocabulary has {vocab_size} ids but {cfg.init_from}'s embedding only "
                        f"{fields['vocab_size']}; prepare the data with --tokenizer={cfg.init_from}")
    cfg = replace_config(cfg, **{name: v for name, v in fields.items() if name != "vocab_size"})
    model = Transformer(cfg.model_config(fields["vocab_size"]))
    model.load_state_dict(weights)
    return cfg, model


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, in one of two forms:
# - ckpt_%08d.pt, one file written by rank 0: a single process or DDP, where rank 0 holds the whole state;
# - ckpt_%08d/, a directory written by all the ranks of an FSDP run at once with torch.distributed.checkpoint
#   (DCP): each rank writes the shards it holds (__<rank>_0.distcp), rank 0 adds DCP's index (.metadata) and
#   train_state.pt (everything except the model's and the optimizer's tensors). No rank ever holds the whole model,
#   and the shards can be read back by any number of ranks, each taking the slices it now owns.
# Either is written under a .tmp name and renamed when complete, so a crash never leaves a torn checkpoint.
CHECKPOINT_NAME = re.compile(r"ckpt_(\d{8})(\.pt)?")
RUN_SPACE_FIX = ("free space on that disk (or lower --keep_ckpts), then resume with --load_ckpt=auto: the "
                 "checkpoints saved before are intact")


def checkpoint_paths(ckpt_dir: str) -> list[Path]:
    """Complete checkpoints in ckpt_dir, of both forms, oldest first (the update number is in the name)."""
    found = [p for p in Path(ckpt_dir).glob("ckpt_*") if CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name)[1]))


def tokenizer_fingerprint(dataset_dir: str) -> str:
    """Identifies the vocabulary, so a checkpoint is never resumed on data from another tokenizer."""
    meta = read_meta(dataset_dir, "tokenizer", "vocab_size")
    files = [p for p in (Path(dataset_dir) / "tokenizer.tiktoken", Path(dataset_dir) / "tokenizer.json") if p.exists()]
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()[:16] if files else meta["tokenizer"]
    return f"{meta['tokenizer']}-{meta['vocab_size']}-{digest}"


def checkpoint_bytes(state) -> int:
    """A little over the size of torch.save(state) on disk: the bytes of each tensor plus its record in the zip
    file (about 300 bytes; 512 counted). The plain data beside the tensors is tiny."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() + 512
    if isinstance(state, dict):
        return sum(checkpoint_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in state)
    return 0


def write_state(path: Path, state: dict):
    # A full disk ends the run with one line; the checkpoints already saved are untouched.
    with space_for(path, checkpoint_bytes(state), RUN_SPACE_FIX), open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it visible


def write_shards(tmp: Path, state: dict, rank0: bool):
    """Every rank writes its own shards of the model and optimizer state in parallel; rank 0 adds the rest."""
    if rank0 and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while writing this same checkpoint
    dist.barrier()
    # DCP saves tensors only, so that loading never has to unpickle anything else (see read_dcp_index).
    dcp.save({"model": state["model"], "optimizer": state["optimizer"]["state"]}, checkpoint_id=tmp)
    if rank0:  # dcp.save returns on every rank once all shards and the index are written and synced
        rest = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        write_state(tmp / "train_state.pt", rest | {"optimizer_param_groups": state["optimizer"]["param_groups"]})


def save_checkpoint(ckpt_dir: str, step: int, state: dict, keep: int, sharded: bool = False) -> Path:
    """Write a new checkpoint and delete all but the newest `keep`. Called by rank 0 alone, or with `sharded` (an
    FSDP run, whose state holds DTensor shards) by every rank."""
    name = f"ckpt_{step:08d}" + ("" if sharded else ".pt")
    path, tmp = Path(ckpt_dir) / name, Path(ckpt_dir) / f"{name}.tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if sharded:
        write_shards(tmp, state, rank0)
    else:
        write_state(tmp, state)
    if rank0:
        os.replace(tmp, path)
        for old in checkpoint_paths(ckpt_dir)[:-keep]:  # only now that the new one is complete
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    if sharded:
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is in place
    return path


class _IndexUnpickler(pickle.Unpickler):
    """DCP's index (.metadata) is a pickle that DCP loads with no weights_only guard: a crafted one could run code.
    This reads it first admitting only the handful of plain classes an index is made of."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib._local", "PosixPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            found = super().find_class(module, name)
            if isinstance(found, (type, torch.dtype)) or name == "_get_layout":
                return found
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index")


def read_dcp_index(path: Path):
    """A sharded checkpoint's index, read safely; it must describe tensors only (that is all train.py writes)."""
    with open(path / ".metadata", "rb") as f:
        index = _IndexUnpickler(f).load()
    if not all(isinstance(md, TensorStorageMetadata) for md in index.state_dict_metadata.values()):
        raise pickle.UnpicklingError("the index describes pickled objects, not only tensors")
    return index


def read_full_tensors(path: Path, model_only: bool) -> dict:
    """Every tensor of a sharded checkpoint (or, model_only, the model's), whole, into this one process (no process
    group needed)."""
    index = read_dcp_index(path)
    flat = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in index.state_dict_metadata.items()
            if key.startswith("model.") or not model_only}
    with warnings.catch_warnings():  # DCP warns that no process group is running: that is the point here
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(flat, checkpoint_id=path, no_dist=True)
    model = {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")}
    optimizer = {}  # DCP flattened {"optimizer": {param: {"exp_avg": ...}}} to "optimizer.<param>.exp_avg"
    for key, value in flat.items():
        if key.startswith("optimizer."):
            param, moment = key.removeprefix("optimizer.").rsplit(".", 1)
            optimizer.setdefault(param, {})[moment] = value
    return {"model": model, "optimizer_state": optimizer}


def load_checkpoint(path: Path, tensors: str = "all") -> dict:
    """A checkpoint of either form as one dict of CPU tensors and plain values, in this one process (sample.py,
    export.py and resuming use it). A sharded checkpoint's "optimizer" is keyed by parameter name, as DCP's
    get_state_dict gives it. `tensors`: "all"; "model" for a reader of the weights alone (sample.py, export.py),
    which then never reads the optimizer's tensors, twice the weights' size under AdamW: a .pt file is memory-mapped
    (only what is used is read; its tensors stay backed by the file, so not for resuming) and a sharded one reads the
    model's tensors only; "none" leaves a sharded checkpoint's model and optimizer out: an FSDP run reads only its
    own shards of them (load_shards)."""
    try:
        # weights_only refuses arbitrary pickled objects, which could run code when loaded.
        if not path.is_dir():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=tensors == "model")
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        state["optimizer"] = {"param_groups": state.pop("optimizer_param_groups")}
        if tensors != "none":
            full = read_full_tensors(path, model_only=tensors == "model")
            state["model"], state["optimizer"]["state"] = full["model"], full["optimizer_state"]
        return state
    except Exception as e:
        raise UserError(f"cannot load checkpoint {path} safely ({type(e).__name__}); it is damaged or holds "
                        "arbitrary Python objects; delete it to resume from an older one") from None


def load_shards(path: Path, model, optimizer, param_groups: list):
    """An FSDP run resumes from a sharded checkpoint: each rank reads just the slices of every tensor it holds now,
    whatever the number of ranks that wrote them."""
    try:
        read_dcp_index(path)
        model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's DTensors, filled in place
        dcp.load({"model": model_state, "optimizer": optimizer_state["state"]}, checkpoint_id=path)
    except Exception as e:
        raise UserError(f"cannot load checkpoint {path} safely ({type(e).__name__}); it is damaged or holds "
                        "arbitrary Python objects; delete it to resume from an older one") from None
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": optimizer_state["state"], "param_groups": param_groups})


def newest_loadable_checkpoint(paths: list[Path], master: bool, tensors: str = "all") -> tuple[Path, dict]:
    """The newest checkpoint that loads. One that does not (say, cut short by a disk fault after its rename) is
    renamed to *.damaged, so it no longer counts as the newest, and the one before it is tried: a restarted job
    goes on by itself instead of waiting for a person to delete a file. The oldest one failing is an error.
    `tensors` as in load_checkpoint."""
    for i in reversed(range(len(paths))):
        try:
            return paths[i], load_checkpoint(paths[i], tensors)
        except UserError:
            if i == 0:
                raise
            if master:
                paths[i].rename(paths[i].with_name(paths[i].name + ".damaged"))
                print(f"warning: {paths[i]} cannot be loaded (damaged or unsafe), renamed it to {paths[i].name}"
                      f".damaged; resuming from the previous checkpoint {paths[i - 1]}", file=sys.stderr)


def check_resumable(ckpt: dict, cfg: TrainConfig, fingerprint: str, path: Path):
    """Refuse to resume with another architecture, tokenizer or update size than the checkpoint was trained with."""
    if ckpt["tokenizer"] != fingerprint:
        raise UserError(f"{path} was trained with another tokenizer than {cfg.dataset_dir}'s; use the dataset "
                        "it was trained on or a new --ckpt_dir")
    for name in [f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"]:
        saved = ckpt["config"].get(name, getattr(ModelConfig, name))  # a key newer than the checkpoint: its default
        if saved != getattr(cfg, name):
            raise UserError(f"{path} has {name}={saved} but the config says {getattr(cfg, name)}; "
                            "resume with the same architecture or use a new --ckpt_dir")
    if ckpt["config"]["tokens_per_update"] != cfg.tokens_per_update:  # updates are counted in these units
        raise UserError(f"{path} has tokens_per_update={ckpt['config']['tokens_per_update']} but this run "
                        f"{cfg.tokens_per_update}; pass --tokens_per_update={ckpt['config']['tokens_per_update']} "
                        "with a batch_size that divides it")


def rng_state(device: str) -> dict:
    return {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if device.startswith("cuda") else {})


def restore_rng(rng, rank: int, device: str):
    """`rng` is rank 0's state (a .pt checkpoint) or a list of every rank's (a sharded one). A rank the list has no
    entry for (resumed on more ranks) keeps its fresh seed."""
    if isinstance(rng, list):
        if rank >= len(rng):
            return
        rng = rng[rank]
    torch.set_rng_state(rng["cpu"])
    if device.startswith("cuda") and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def resume(path: Path, ckpt: dict, cfg, fingerprint, model, optimizer, scheduler, loader, rank,
           device) -> tuple[int, float]:
    """Restore a run from a checkpoint (loaded by load_checkpoint, with tensors="none" under FSDP), after checking it
    fits this run. Returns (updates done, seconds trained)."""
    if path.is_dir() != cfg.fsdp:
        raise UserError(f"{path} was written by a{'n FSDP' if cfg.fsdp is False else ' non-FSDP'} run; resume it "
                        f"with --fsdp={not cfg.fsdp}" + (" under torchrun" if not cfg.fsdp else ""))
    check_resumable(ckpt, cfg, fingerprint, path)
    if cfg.fsdp:
        load_shards(path, model, optimizer, ckpt["optimizer"]["param_groups"])
    else:
        model.load_state_dict(ckpt["model"])
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as e:  # another --optimizer, or the parameter groups of another train.py
            raise UserError(f"{path} holds optimizer state that does not fit --optimizer={cfg.optimizer} "
                            f"({type(e).__name__}); resume with the optimizer and the train.py it was saved with, "
                            "or use a new --ckpt_dir") from None
    scheduler.load_state_dict(ckpt["scheduler"])
    loader.load_state_dict(ckpt["loader"])  # a position in tokens: valid for any number of ranks
    restore_rng(ckpt["rng"], rank, device)
    return ckpt["step"], ckpt["elapsed_s"]


# ----------------------------------------------------------------------------------------------------------------
# Logging.
LOG_COLUMNS = ["step", "progress_pct", "train_loss", "perplexity", "lr", "grad_norm", "tokens", "tokens_per_sec",
               "elapsed_s", "val_loss", "val_bpb"]


def csv_text(rows: list[list]) -> str:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def start_log(log_file: str, step: int):
    """Start the CSV log afresh, or on resume keep only the rows up to the checkpoint's update: rows logged
    after it (before a crash) are trained again and must not appear twice."""
    kept = []
    if step > 0 and os.path.exists(log_file):
        with open(log_file, newline="") as f:
            kept = [row for row in list(csv.reader(f))[1:] if len(row) == len(LOG_COLUMNS) and int(row[0]) <= step]
    write_file(Path(log_file), csv_text([LOG_COLUMNS, *kept]).encode(), RUN_SPACE_FIX)


def append_log(log_file: str, row: list):
    """Append one row and close the file: a full disk cuts the log back to its last whole row."""
    line = csv_text([row])
    with space_for(log_file, len(line), RUN_SPACE_FIX), open(log_file, "a", newline="") as f:
        f.write(line)


def plot_log(log_file: str, png_path: str):
    """Loss (train and validation) and learning rate against tokens trained, from the CSV log."""
    # A bare Figure, not pyplot: no window, and the plotting backend of a notebook that calls train.main is left alone.
    from matplotlib.figure import Figure

    with open(log_file) as f:
        rows = list(csv.DictReader(f))
    tokens = [int(r["tokens"]) for r in rows]
    fig = Figure(figsize=(8, 6))
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
    ax_loss.plot(tokens, [float(r["train_loss"]) for r in rows], label="train")
    val = [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if val:
        ax_loss.plot(*zip(*val, strict=True), "o-", label="validation")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_lr.plot(tokens, [float(r["lr"]) for r in rows])
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens trained")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    write_file(Path(png_path), png.getvalue(), RUN_SPACE_FIX)


class StopRequest:
    """Turns SIGTERM/SIGINT (preemption, Ctrl-C) into a flag the loop checks after each update."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request)

    def request(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        """All ranks stop at the same update: if any rank was signalled, all of them stop."""
        flag = torch.tensor(float(self.requested), device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def lock_ckpt_dir(ckpt_dir: str, master: bool, device: str):
    """One run per ckpt_dir: two would interleave their checkpoints and overwrite each other's log. Rank 0 takes an
    OS lock on <ckpt_dir>/.lock and every rank learns the outcome before any work, so all of them stop together
    when another run holds it. Returns the lock (None on other ranks); closing it releases it."""
    lock, refused = None, None
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
        try:
            lock = lock_directory(Path(ckpt_dir) / ".lock", ckpt_dir,
                                  "wait for that run to end or stop it, or pass another --ckpt_dir")
        except UserError as e:
            refused = e
    if dist.is_initialized():
        flag = torch.tensor(float(refused is not None), device=device)
        dist.broadcast(flag, src=0)
        if flag.item():
            dist.destroy_process_group()
            if not master:
                sys.exit(2)  # rank 0 prints the reason
    if refused:
        raise refused
    return lock


# ----------------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, argv: list[str] | None = None):
    if cfg.max_minutes and "training_tokens" in getattr(cfg, "user_set", ()):
        raise UserError("--max_minutes and --training_tokens both set the length of the run; pass only one of them")
    # --- Processes and devices. torchrun sets RANK/WORLD_SIZE; plain `python train.py` is rank 0 of 1. ---
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.fsdp and "RANK" not in os.environ:
        raise UserError("--fsdp=True shards the model across the processes torchrun starts; launch it as "
                        "torchrun --standalone --nproc_per_node=N train.py ... (N=1 on one GPU)")
    cfg, fitted = fit_batch(cfg, world_size)
    accum_steps = accumulation_steps(cfg, world_size)
    device = pick_device(cfg.device)
    if world_size > 1 or cfg.fsdp:
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        # Share the CPU cores between the ranks on this machine instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards them as they are)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores where bf16 is not used
        torch.backends.cudnn.allow_tf32 = True

    # --- Data and tokenizer. ---
    tokenizer = load_tokenizer(cfg.dataset_dir)
    loader = DatasetLoader(cfg.dataset_dir, "train", cfg.batch_size, cfg.max_seq_len, rank, world_size, device,
                           vocab_size=tokenizer.vocab_size)
    val_loader = DatasetLoader(cfg.dataset_dir, "val", cfg.batch_size, cfg.max_seq_len, 0, 1, device,
                               vocab_size=tokenizer.vocab_size)
    meta = read_meta(cfg.dataset_dir, "val_tokens", "val_bytes")
    eval_batches = max(1, min(cfg.eval_tokens // (cfg.batch_size * cfg.max_seq_len), val_loader.batches_per_shard(0)))
    fingerprint = tokenizer_fingerprint(cfg.dataset_dir)

    # --- Model, optimizer, schedule. ---
    if cfg.init_from:
        cfg, raw_model = init_from_hf(cfg, tokenizer.vocab_size)
    else:
        raw_model = Transformer(cfg.model_config(tokenizer.vocab_size))
    raw_model = raw_model.to(device)
    torch.manual_seed(cfg.seed + rank)  # from here on each rank draws its own random numbers (dropout)
    # raw_model is what checkpoints hold, evaluates and samples: the plain module, or under FSDP the sharded one.
    model = wrap_model(raw_model, cfg, device, dtype, world_size)
    optimizer = make_optimizer(raw_model, cfg, device)
    # With a time budget, the first updates are timed and the run's length is planned from them (updates_in_budget),
    # then planned again as the run goes on (replans_length).
    # The budget covers the loop (training, evaluation, samples, checkpoints), as the log's elapsed_s does; the few
    # seconds of start-up before it are not counted.
    total_updates = BUDGET_PROBE_UPDATES if cfg.max_minutes else cfg.training_tokens // cfg.tokens_per_update
    scheduler = Scheduler(optimizer, cfg.schedule, total_updates, cfg.warmup_iterations, cfg.max_lr, cfg.min_lr)

    # --- Resume, or refuse to mix a new run into a directory that holds another run's checkpoints. ---
    lock = lock_ckpt_dir(cfg.ckpt_dir, master, device)
    step, elapsed_before = 0, 0.0
    existing = checkpoint_paths(cfg.ckpt_dir)
    log_file = cfg.log_file or os.path.join(cfg.ckpt_dir, "log.csv")
    if cfg.load_ckpt is True and not existing:
        raise UserError(f"--load_ckpt=True but {cfg.ckpt_dir} holds no checkpoint; train without it first")
    if cfg.load_ckpt and existing:
        # An FSDP run reads its own shards of the tensors in resume(), not the whole model here.
        path, ckpt = newest_loadable_checkpoint(existing, master, tensors="none" if cfg.fsdp else "all")
        step, elapsed_before = resume(path, ckpt, cfg, fingerprint, raw_model, optimizer, scheduler, loader, rank,
                                      device)
        if cfg.max_minutes:
            total_updates = scheduler.training_steps  # a budgeted run keeps the length it planned
        else:
            scheduler.training_steps = total_updates  # training_tokens may be raised to train for longer
        if master:
            print(f"resumed from {path} at update {step} ({step * cfg.tokens_per_update:,} tokens)")
    elif existing:
        raise UserError(f"{cfg.ckpt_dir} already holds checkpoints of an earlier run; resume it with "
                        "--load_ckpt=True or choose another --ckpt_dir")

    if master:
        if fitted:
            print(fitted)
        start_log(log_file, step)
        peak_flops = measure_matmul_flops(device, dtype)
        flops_per_token = raw_model.flops_per_token()
        size = f"{cfg.tokens_per_update:,} tokens"
        plan = (f"updates of {size} for {cfg.max_minutes:g} min" if cfg.max_minutes
                else f"{total_updates} updates of {size}")
        print(f"{raw_model.num_params():,} parameters | {plan} "
              f"({accum_steps} micro-steps x {world_size} ranks x {cfg.batch_size}x{cfg.max_seq_len}) | "
              f"{device} {str(dtype).removeprefix('torch.')}" + (" | FSDP" if cfg.fsdp else " | DDP" * (world_size > 1))
              + (" | activation checkpointing" if cfg.activation_checkpointing else ""))

    def checkpoint_state():
        if cfg.fsdp:  # this rank's shards (DTensors), optimizer state keyed by parameter name; every rank's RNG
            model_state, optimizer_state = get_state_dict(raw_model, optimizer)
            rng = [None] * world_size
            dist.all_gather_object(rng, rng_state(device))
        else:
            model_state, optimizer_state, rng = raw_model.state_dict(), optimizer.state_dict(), rng_state(device)
        return {"model": model_state, "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "rng": rng,
                "config": dataclasses.asdict(cfg), "tokenizer": fingerprint, "step": step,
                "tokens": step * cfg.tokens_per_update, "elapsed_s": elapsed_before + time.time() - start_time,
                "argv": argv or []}  # the command line, for export.py's model card

    # --- The loop: one iteration is one optimizer update. ---
    stop = StopRequest()
    ckpt_every = max(1, cfg.token_ckpt // cfg.tokens_per_update)
    next_sample = next_sample_update(step, cfg.model_gen_multiplier)
    start_step, start_time = step, time.time()
    update_seconds = []
    while step < total_updates:
        t0 = time.time()
        lr = scheduler.step(step)
        loss, grad_norm = train_update(model, optimizer, loader, accum_steps, cfg, device, dtype)
        step += 1
        update_seconds.append(time.time() - t0)
        if cfg.max_minutes and replans_length(step):
            # The speed of the latest 20 updates, without update 1's one-time costs (allocation, compiling).
            timed = update_seconds[1:][-2 * BUDGET_PROBE_UPDATES:] or update_seconds
            total_updates = scheduler.training_steps = updates_in_budget(
                cfg, step, elapsed_before + time.time() - start_time, statistics.median(timed),
                eval_batches * cfg.batch_size * cfg.max_seq_len, raw_model.num_params(), device)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # Nothing is saved: the last checkpoint on disk is the last good state.
            sys.exit(f"error: non-finite loss ({loss}) or gradient norm ({grad_norm}) at update {step}; "
                     f"resume from the last checkpoint in {cfg.ckpt_dir} with a lower max_lr")
        tokens_per_sec = cfg.tokens_per_update / update_seconds[-1]
        # Rank 0 alone evaluates and samples, except under FSDP: there every forward gathers weights from all ranks.
        takes_part = master or cfg.fsdp
        val_loss = val_bpb = sample = ""
        if takes_part and (step % cfg.eval_interval == 0 or step == total_updates):
            val_loss = evaluate(raw_model, val_loader, eval_batches, device, dtype)
            # nats/token -> bits/byte: divide by ln 2, times tokens per byte of the validation text.
            val_bpb = val_loss / math.log(2) * meta["val_tokens"] / meta["val_bytes"]
        if takes_part and cfg.model_gen_multiplier and step >= round(next_sample):
            sample = sample_text(raw_model, tokenizer, device, seed=cfg.seed + step)
            next_sample = next_sample_update(step, cfg.model_gen_multiplier)
        if master:
            elapsed = elapsed_before + time.time() - start_time
            eta = (total_updates - step) * (time.time() - start_time) / (step - start_step)
            append_log(log_file, [step, f"{100 * step / total_updates:.2f}", f"{loss:.4f}", f"{math.exp(loss):.2f}",
                                  f"{lr:.3e}", f"{grad_norm:.4f}", step * cfg.tokens_per_update,
                                  f"{tokens_per_sec:.0f}", f"{elapsed:.1f}",
                                  f"{val_loss:.4f}" if val_loss != "" else "",
                                  f"{val_bpb:.4f}" if val_bpb != "" else ""])
            mfu = flops_per_token * tokens_per_sec / world_size / peak_flops
            print(f"update {step}/{total_updates} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                  f"{tokens_per_sec:,.0f} tok/s | MFU {100 * mfu:.1f}% | ETA {eta / 60:.1f} min"
                  + (f" | val loss {val_loss:.4f} bpb {val_bpb:.4f}" if val_loss != "" else ""), flush=True)
            if sample:
                print(f"--- sample at update {step} ---\n{sample}\n---")
        stopping = stop.agreed(device)
        if (master or cfg.fsdp) and (step % ckpt_every == 0 or step == total_updates or stopping):
            path = save_checkpoint(cfg.ckpt_dir, step, checkpoint_state(), cfg.keep_ckpts, sharded=cfg.fsdp)
            if master:
                print(f"saved {path}")
        if stopping:
            if master:
                print(f"stopped by signal after update {step}; resume with --load_ckpt=True")
            break

    if master:
        plot_log(log_file, os.path.join(cfg.ckpt_dir, "loss.png"))
        lock.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str]):
    train(load_config(argv), argv)


if __name__ == "__main__":
    run_cli(main)
