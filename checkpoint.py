"""The checkpoint format on disk: writing and reading both forms, finding the newest one that loads,
one run per directory, and what a checkpoint holds.

A checkpoint is one of:
- ckpt_%08d.pt, one file written by rank 0: a single process or DDP, where rank 0 holds the whole
  state;
- ckpt_%08d/, a directory written by all the ranks of an FSDP run at once with
  torch.distributed.checkpoint (DCP):
  each rank writes the shards it holds (__<rank>_0.distcp), rank 0 adds DCP's index (.metadata) and
  train_state.pt (everything except the model's and the optimizer's tensors). No rank ever holds the
  whole model, and the shards can be read back by any number of ranks, each taking the slices it
  owns then.
Either is written under a .tmp name and renamed when complete, so a crash never leaves a torn
checkpoint. Reading never unpickles anything but tensors and plain values (torch.load's
weights_only, and a guard on DCP's index), so a checkpoint from someone else cannot run code.

Reading order: names -> writing -> reading -> the newest loadable one -> the best one -> load_model
(sample.py, export.py, eval.py) -> the directory lock -> what a checkpoint holds (checkpoint_state,
which train.py and the preflight save, and restore, which puts a run back from it).
"""
import dataclasses
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from configurator import UserError
from dataset import read_meta
from files import full_disk_error, is_full_disk, lock_directory, space_for
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer, tokenizer_fingerprint

CHECKPOINT_NAME = re.compile(r"ckpt_(\d{8})(\.pt)?")
# What a run says when its disk is full: the checkpoints already saved are intact, so it can go on
# from them.
SPACE_FIX = ("free space on that disk (or lower --keep_ckpts), then resume with --load_ckpt=auto: "
             "the checkpoints saved before are intact")


def checkpoint_paths(ckpt_dir: str) -> list[Path]:
    """Complete checkpoints in ckpt_dir, of both forms, oldest first (the update number is in the
    name)."""
    found = [p for p in Path(ckpt_dir).glob("ckpt_*") if CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name)[1]))


# --------------------------------------------------------------------------------------------------
# Writing
def checkpoint_bytes(state) -> int:
    """A little over the size of torch.save(state) on disk: the bytes of each tensor plus its record
    in the zip file (about 300 bytes; 512 counted). The plain data beside the tensors is tiny."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() + 512
    if isinstance(state, dict):
        return sum(checkpoint_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in state)
    return 0


def write_state(path: Path, state: dict):
    # A full disk ends the run with one line; the checkpoints already saved are untouched.
    with space_for(path, checkpoint_bytes(state), SPACE_FIX), open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it visible


def write_shards(tmp: Path, state: dict, rank0: bool):
    """Every rank writes its own shards of the model and optimizer state in parallel; rank 0 adds
    the rest."""
    if rank0 and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while writing this same checkpoint
    dist.barrier()
    tensors = {"model": state["model"], "optimizer": state["optimizer"]["state"]}
    try:
        # DCP saves tensors only, so that loading never has to unpickle anything else (see
        # read_dcp_index).
        dcp.save(tensors, checkpoint_id=tmp)
    except CheckpointException as e:  # every rank gets it, with each failed rank's exception
        full = [error for error, _ in e.failures.values() if is_full_disk(error)]
        if not full:
            raise
        if rank0:
            # the partial shards would go on holding the space
            shutil.rmtree(tmp, ignore_errors=True)
        # A DTensor counts its whole tensor, so this is the size of the checkpoint over all the
        # ranks.
        raise full_disk_error(tmp, checkpoint_bytes(tensors), full[0], SPACE_FIX) from None
    if rank0:  # dcp.save returns on every rank once all shards and the index are written and synced
        rest = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        write_state(tmp / "train_state.pt",
                    rest | {"optimizer_param_groups": state["optimizer"]["param_groups"]})


def checkpoint_path(ckpt_dir: str, step: int, sharded: bool) -> Path:
    return Path(ckpt_dir) / (f"ckpt_{step:08d}" + ("" if sharded else ".pt"))


def save_checkpoint(ckpt_dir: str, step: int, state: dict, keep: int, sharded: bool = False,
                    best: Path | None = None) -> Path:
    """Write a new checkpoint and delete all but the newest `keep` and `best` (the one with the
    lowest validation loss, which an overfitting run must not lose). Called by rank 0 alone, or with
    `sharded` (an FSDP run, whose state holds DTensor shards) by every rank."""
    path = checkpoint_path(ckpt_dir, step, sharded)
    tmp = path.with_name(f"{path.name}.tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if sharded:
        write_shards(tmp, state, rank0)
    else:
        write_state(tmp, state)
    if rank0:
        os.replace(tmp, path)
        for old in checkpoint_paths(ckpt_dir)[:-keep]:  # only now that the new one is complete
            if old != best:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    if sharded:
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is in place
    return path


# --------------------------------------------------------------------------------------------------
# Reading
def unsafe(path: Path, e: Exception) -> UserError:
    return UserError(f"cannot load checkpoint {path} safely ({type(e).__name__}); it is damaged or "
                     "holds arbitrary Python objects; delete it to resume from an older one")


class _IndexUnpickler(pickle.Unpickler):
    """DCP's index (.metadata) is a pickle that DCP loads with no weights_only guard: a crafted one
    could run code.
    This reads it first admitting only the handful of plain classes an index is made of."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib._local", "PosixPath"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            found = super().find_class(module, name)
            if isinstance(found, (type, torch.dtype)) or name == "_get_layout":
                return found
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index")


def read_dcp_index(path: Path):
    """A sharded checkpoint's index, read safely; it must describe tensors only (that is all
    train.py writes)."""
    with open(path / ".metadata", "rb") as f:
        index = _IndexUnpickler(f).load()
    if not all(isinstance(md, TensorStorageMetadata) for md in index.state_dict_metadata.values()):
        raise pickle.UnpicklingError("the index describes pickled objects, not only tensors")
    return index


def read_full_tensors(path: Path, model_only: bool) -> dict:
    """Every tensor of a sharded checkpoint (or, model_only, the model's), whole, into this one
    process (no process group needed)."""
    index = read_dcp_index(path)
    flat = {key: torch.empty(md.size, dtype=md.properties.dtype) for key,
            md in index.state_dict_metadata.items()
            if key.startswith("model.") or not model_only}
    # DCP warns that no process group is running: that is the point here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(flat, checkpoint_id=path, no_dist=True)
    model = {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")}
    # DCP flattened {"optimizer": {param: {"exp_avg": ...}}} to "optimizer.<param>.exp_avg"
    optimizer = {}
    for key, value in flat.items():
        if key.startswith("optimizer."):
            param, moment = key.removeprefix("optimizer.").rsplit(".", 1)
            optimizer.setdefault(param, {})[moment] = value
    return {"model": model, "optimizer_state": optimizer}


def load_checkpoint(path: Path, tensors: str = "all") -> dict:
    """A checkpoint of either form as one dict of CPU tensors and plain values, in this one process.
    A sharded checkpoint's "optimizer" is keyed by parameter name, as DCP's get_state_dict gives it.
    `tensors`: "all"; "model" for a reader of the weights alone (sample.py, export.py), which then
    never reads the optimizer's tensors, twice the weights' size under AdamW: a .pt file is
    memory-mapped (only what is used is read; its tensors stay backed by the file, so not for
    resuming) and a sharded one reads the model's tensors only; "none" leaves a sharded checkpoint's
    model and optimizer out: an FSDP run reads only its own shards of them (load_shards)."""
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
    except (Exception, CheckpointException) as e:
        raise unsafe(path, e) from None


def load_shards(path: Path, model, optimizer, param_groups: list):
    """An FSDP run resumes from a sharded checkpoint: each rank reads just the slices of every
    tensor it holds now, whatever the number of ranks that wrote them."""
    optimizers = torch_optimizers(optimizer)
    try:
        read_dcp_index(path)
        # this rank's DTensors, filled in place
        model_state, optimizer_state = get_state_dict(model, optimizers)
        dcp.load({"model": model_state, "optimizer": optimizer_state["state"]}, checkpoint_id=path)
    # DCP's CheckpointException (a shard cut short) is a BaseException
    except (Exception, CheckpointException) as e:
        raise unsafe(path, e) from None
    set_state_dict(model, optimizers, model_state_dict=model_state,
                   optim_state_dict={"state": optimizer_state["state"],
                                     "param_groups": param_groups})


def newest_loadable_checkpoint(paths: list[Path], master: bool,
                               tensors: str = "all") -> tuple[Path, dict]:
    """The newest checkpoint that loads. One that does not (say, cut short by a disk fault after its
    rename) is renamed to *.damaged by the run's master, so it no longer counts as the newest, and
    the one before it is tried:
    a restarted job goes on by itself instead of waiting for a person to delete a file. A reader
    that is not a run's master (sample.py, export.py) leaves it in place. The oldest one failing is
    an error. `tensors` as in load_checkpoint."""
    for i in reversed(range(len(paths))):
        try:
            return paths[i], load_checkpoint(paths[i], tensors)
        except UserError:
            if i == 0:
                raise
            if master:
                paths[i].rename(paths[i].with_name(paths[i].name + ".damaged"))
                print(f"warning: {paths[i]} cannot be loaded (damaged or unsafe), renamed it to "
                      f"{paths[i].name}"
                      f".damaged; resuming from the previous checkpoint {paths[i - 1]}",
                      file=sys.stderr)


def best_checkpoint(ckpt_dir: str) -> Path:
    """The checkpoint of ckpt_dir with the lowest validation loss, as the run's newest checkpoint
    records it."""
    paths = checkpoint_paths(ckpt_dir)
    if not paths:
        raise UserError(f"no checkpoint in {ckpt_dir}; train first (python train.py) or pass "
                        "--ckpt_dir")
    # Only the record is needed: a .pt file is memory-mapped, a sharded checkpoint's tensors are not
    # read at all.
    newest, state = newest_loadable_checkpoint(paths, master=False,
                                               tensors="none" if paths[-1].is_dir() else "model")
    best = state["validation"]["best_saved"]
    if best is None:
        raise UserError(f"{newest} records no checkpoint saved at an evaluation; pass --ckpt=PATH "
                        "instead of best")
    path = checkpoint_path(ckpt_dir, best[0], sharded=newest.is_dir())
    if not path.exists():
        raise UserError(f"{path}, the checkpoint with the lowest validation loss, was deleted; "
                        "pass --ckpt=PATH")
    return path


def load_model(ckpt_dir: str, ckpt: str = "", dataset_dir: str = "", purpose: str = "reading"
               ) -> tuple[Path, dict, Transformer, object]:
    """(path, checkpoint, model, tokenizer) for a reader of a trained model: sample.py and
    export.py.

    The checkpoint is `ckpt` ("best": the one with the lowest validation loss, which a run keeps),
    or the newest one in ckpt_dir that loads (a warning names a damaged newer one, which is left in
    place; `purpose` says what is done instead); only its weights are read. The tokenizer is
    dataset_dir's, by default the one of the dataset the model was trained on, and must be the one
    it was trained with. The model is built with the checkpoint's architecture, in eval mode, on the
    CPU."""
    if ckpt == "best":
        ckpt = str(best_checkpoint(ckpt_dir))
    if ckpt and not Path(ckpt).exists():
        raise UserError(f"--ckpt={ckpt} does not exist; pass a checkpoint path, or --ckpt_dir for "
                        "its newest")
    paths = [Path(ckpt)] if ckpt else checkpoint_paths(ckpt_dir)
    if not paths:
        raise UserError(f"no checkpoint in {ckpt_dir}; train first (python train.py) or pass "
                        "--ckpt_dir")
    path, state = newest_loadable_checkpoint(paths, master=False, tensors="model")
    if path != paths[-1]:
        print(f"warning: {paths[-1]} cannot be loaded (damaged or unsafe); {purpose} {path}",
              file=sys.stderr)
    dataset_dir = dataset_dir or state["config"]["dataset_dir"]
    meta = read_meta(dataset_dir)
    tokenizer = load_tokenizer(dataset_dir, meta)
    if tokenizer_fingerprint(dataset_dir, meta) != state["tokenizer"]:
        raise UserError(f"{dataset_dir} has another tokenizer than {path} was trained with; pass "
                        "the training dataset with --dataset_dir, or restore it")
    # The embedding's rows, not the tokenizer's size: a model imported with --init_from may have
    # spare rows.
    vocab_size = state["model"]["tok_embeddings.weight"].shape[0]
    model = Transformer(ModelConfig.from_dict(state["config"], vocab_size=vocab_size))
    # assign=True makes the checkpoint's tensors (mapped from the file) the model's weights instead
    # of copying them into its freshly initialised ones: memory holds one model, not two. Assigning
    # gives the output layer a parameter of its own, so a tied head is tied again.
    model.load_state_dict(state["model"], assign=True)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return path, state, model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------
def lock_ckpt_dir(ckpt_dir: str, master: bool):
    """One run per ckpt_dir: two would interleave their checkpoints and overwrite each other's log.
    Rank 0 takes an OS lock on <ckpt_dir>/.lock and every rank learns the outcome before any work,
    so that all of them stop together (with rank 0's reason) when another run holds it. Returns the
    lock (None on other ranks); closing it releases it."""
    lock, refusal = None, [None]
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
        try:
            lock = lock_directory(Path(ckpt_dir) / ".lock", ckpt_dir,
                                  "wait for that run to end or stop it, or pass another --ckpt_dir")
        except UserError as e:
            refusal = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise UserError(refusal[0], every_rank=True)
    return lock


# --------------------------------------------------------------------------------------------------
# What a checkpoint holds: a run's whole state, built by checkpoint_state and put back by restore.

def torch_optimizers(optimizer):
    """The torch optimizer behind `optimizer`, or with --optimizer=muon its two (muon.MuonAndAdamW):
    what torch.distributed.checkpoint saves and loads, each one's state under the parameters'
    names."""
    return getattr(optimizer, "optimizers", optimizer)


def checkpoint_state(cfg, model, optimizer, world_size: int, device: str, *, scheduler, scaler,
                     loader, record,
                     fingerprint: str, step: int, elapsed_s: float, argv: list[str],
                     repeats) -> dict:
    """Everything a checkpoint holds, the one place that says what that is: the model's, the
    optimizer's and the random generators' state (training_state); the schedule's (scheduler), an
    fp16 run's loss scale (scaler, {} in bf16 and fp32) and the position in the data (loader); the
    run's whole config (cfg, a TrainConfig), the tokenizer's fingerprint, the updates done (step)
    and their tokens, the seconds trained, the command line (for export.py's model card), the
    validation record (passes.ValidationRecord) and the plan for repeated data
    (passes.plan_repeats). Under FSDP every rank calls it and holds only its own shards of the
    tensors."""
    model_state, optimizer_state, rng = training_state(model, optimizer, cfg.fsdp, world_size,
                                                       device)
    return {"model": model_state, "optimizer": optimizer_state, "rng": rng,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "loader": loader.state_dict(),
            "config": dataclasses.asdict(cfg),
            "tokenizer": fingerprint, "step": step, "tokens": step * cfg.tokens_per_update,
            "elapsed_s": elapsed_s,
            "argv": argv, "validation": record.state_dict(), "repeats": repeats}


def training_state(model, optimizer, fsdp: bool, world_size: int,
                   device: str) -> tuple[dict, dict, object]:
    """The model's, the optimizer's and the random number generator's state, as a checkpoint holds
    them. Under FSDP:
    this rank's shards (DTensors), the optimizer's state keyed by parameter name, and every rank's
    RNG (a list)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict(), rng_state(device)
    model_state, optimizer_state = get_state_dict(model, torch_optimizers(optimizer))
    rng = [None] * world_size
    dist.all_gather_object(rng, rng_state(device))
    return model_state, optimizer_state, rng


def rng_state(device: str) -> dict:
    return {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()}
                                             if device.startswith("cuda") else {})


def restore_rng(rng, rank: int, device: str):
    """`rng` is rank 0's state (a .pt checkpoint) or a list of every rank's (a sharded one). A rank
    the list has no entry for (resumed on more ranks) keeps its fresh seed."""
    if isinstance(rng, list):
        if rank >= len(rng):
            return
        rng = rng[rank]
    torch.set_rng_state(rng["cpu"])
    if device.startswith("cuda") and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def check_resumable(ckpt: dict, cfg, fingerprint: str, path: Path):
    """Refuse to resume with another architecture, tokenizer or update size than the checkpoint was
    trained with."""
    if path.is_dir() != cfg.fsdp:
        raise UserError(f"{path} was written by a{'n FSDP' if cfg.fsdp is False else ' non-FSDP'} "
                        "run; resume it "
                        f"with --fsdp={not cfg.fsdp}" + (" under torchrun" if not cfg.fsdp else ""))
    if ckpt["config"]["optimizer"] != cfg.optimizer:
        raise UserError(f"{path} holds optimizer state that does not fit "
                        f"--optimizer={cfg.optimizer}; resume with "
                        f"--optimizer={ckpt['config']['optimizer']}, or use a new --ckpt_dir")
    if ckpt["tokenizer"] != fingerprint:
        raise UserError(f"{path} was trained with another tokenizer than {cfg.dataset_dir}'s; use "
                        "the dataset it was trained on or a new --ckpt_dir")
    saved = ModelConfig.from_dict(ckpt["config"], vocab_size=1)
    for field in dataclasses.fields(ModelConfig):
        if field.name != "vocab_size" and getattr(saved, field.name) != getattr(cfg, field.name):
            raise UserError(f"{path} has {field.name}={getattr(saved, field.name)} but the config "
                            f"says {getattr(cfg, field.name)}; resume with the same architecture "
                            "or use a new --ckpt_dir")
    # updates are counted in these units
    if ckpt["config"]["tokens_per_update"] != cfg.tokens_per_update:
        raise UserError(f"{path} has tokens_per_update={ckpt['config']['tokens_per_update']} but "
                        f"this run {cfg.tokens_per_update}; pass "
                        f"--tokens_per_update={ckpt['config']['tokens_per_update']} with a "
                        "batch_size that divides it")


def restore(path: Path, ckpt: dict, cfg, fingerprint: str, model, optimizer, scaler, scheduler,
            loader, rank: int,
            device: str):
    """Put a run back as checkpoint_state saved it (`ckpt`: load_checkpoint's, without the tensors
    for FSDP), after checking that it fits this run (check_resumable). What resumes is the run's
    state; the learning rates are this run's config: a run that diverged is resumed with a lower
    max_lr."""
    check_resumable(ckpt, cfg, fingerprint, path)
    if cfg.fsdp:
        load_shards(path, model, optimizer, ckpt["optimizer"]["param_groups"])
    else:
        model.load_state_dict(ckpt["model"])
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        # parameter groups that another version of make_optimizer made
        except (KeyError, ValueError) as e:
            raise UserError(f"{path} holds optimizer state that does not fit "
                            f"--optimizer={cfg.optimizer} ({type(e).__name__}); resume with the "
                            "train.py it was saved with, or use a new --ckpt_dir") from None
    # A budgeted run keeps the length it planned; otherwise training_tokens sets it (it may be
    # raised, to go on).
    if cfg.max_minutes:
        scheduler.training_steps = ckpt["scheduler"]["training_steps"]
    loader.load_state_dict(ckpt["loader"])  # a position in tokens: valid for any number of ranks
    if ckpt["scaler"]:  # an fp16 run's loss scale; {} in bf16 and fp32
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], rank, device)
