"""One run on several machines: what every rank must see alike before it trains, checked at
start-up.

On one machine every rank reads the same files. Across machines each node may have disks of its own,
and two mistakes then pass without an error: ranks that read different copies of a dataset (one
older, or copied only in part) train on different text, and a ckpt_dir on each node's own disk
splits the run's files across machines (rank 0's node gets the log and a DDP checkpoint, every node
the shards of an FSDP checkpoint that its ranks write), so no node holds a checkpoint anyone can
resume from. check_same_files stops every rank with one line that names the fix before anything is
trained, read or saved. The dataset may be a copy on each node's own disk if the copies are alike;
ckpt_dir must be one directory that every node mounts.
"""
import hashlib
import json
import os
import secrets
import socket
from pathlib import Path

import torch.distributed as dist

from checkpoint import checkpoint_paths
from configurator import UserError
from dataset import read_meta
from tokenizer import tokenizer_fingerprint

CKPT_FIX = "put ckpt_dir on a filesystem every node mounts"
DATASET_FIX = ("copy the same prepared dataset to every node, or put dataset_dir on a filesystem "
               "every node mounts")


def dataset_view(dataset_dir: str) -> tuple[str, str]:
    """What this rank sees at dataset_dir: ("dataset", a digest of meta.json, the tokenizer and the
    size of every shard file), or ("none", why it sees no dataset). No shard is read: the sizes tell
    a copy cut short, meta.json and the tokenizer a dataset prepared otherwise."""
    root = Path(dataset_dir)
    try:
        meta = read_meta(dataset_dir)
        tokenizer = tokenizer_fingerprint(dataset_dir, meta)
        sizes = sorted((p.name, p.stat().st_size) for p in root.glob("*.npy"))
    except (UserError, OSError) as e:
        return "none", str(e)
    digest = hashlib.sha256(f"{json.dumps(meta, sort_keys=True)} {tokenizer} {sizes}".encode())
    return "dataset", digest.hexdigest()[:16]


def ckpt_dir_view(ckpt_dir: str, probe: str) -> tuple[str, list[str]]:
    """What this rank sees in ckpt_dir: ("shared", the checkpoints it lists) when it can read back
    the file rank 0 has just written there (named `probe`, holding its own name), else ("apart",
    [])."""
    try:
        if (Path(ckpt_dir) / probe).read_text() == probe:
            return "shared", [p.name for p in checkpoint_paths(ckpt_dir)]
    except OSError:
        pass
    return "apart", []


def odd_ranks(views: list, hosts: list[str], expected) -> tuple[int, str]:
    """The first rank whose view is not `expected`, and how a message names those that differ ("rank
    8 (on node1) and 7 more of the 16 ranks"); (-1, "") when there is none."""
    odd = [r for r, view in enumerate(views) if view != expected]
    if not odd:
        return -1, ""
    more = f" and {len(odd) - 1} more of the {len(views)} ranks" if len(odd) > 1 else ""
    return odd[0], f"rank {odd[0]} (on {hosts[odd[0]]}){more}"


def dataset_problem(views: list, hosts: list[str], dataset_dir: str) -> str:
    """The line that says which ranks see another dataset than rank 0, or none, or "" when all see
    rank 0's."""
    r, ranks = odd_ranks(views, hosts, views[0])
    if not ranks:
        return ""
    if views[0][0] == "none":
        return (f"rank 0 (on {hosts[0]}) cannot find a prepared dataset at {dataset_dir}, which "
                f"{ranks} can read; {DATASET_FIX}")
    if views[r][0] == "none":
        return (f"{ranks} cannot find a prepared dataset at {dataset_dir}, which rank 0 (on "
                f"{hosts[0]}) reads; {DATASET_FIX}")
    return (f"{dataset_dir} holds another dataset for {ranks} than for rank 0 (on {hosts[0]}) "
            f"(meta.json, the tokenizer or a shard's size differ); {DATASET_FIX}")


def ckpt_dir_problem(views: list, hosts: list[str], ckpt_dir: str) -> str:
    """The line that says which ranks do not share rank 0's ckpt_dir, or "" when all do."""
    r, ranks = odd_ranks(views, hosts, ("shared", views[0][1]))
    if not ranks:
        return ""
    if views[r][0] == "apart":
        return (f"{ranks} cannot see the files rank 0 (on {hosts[0]}) writes in {ckpt_dir}; "
                f"{CKPT_FIX}")
    return (f"{ckpt_dir} lists other checkpoints for {ranks} than for rank 0 (on {hosts[0]}); "
            f"{CKPT_FIX}")


def check_same_files(dataset_dir: str, ckpt_dir: str):
    """Every rank of a run must read the same dataset and share one ckpt_dir; otherwise all of them
    stop with the same UserError, which rank 0 alone prints. Each rank sends rank 0 what it sees at
    dataset_dir (dataset_view);
    then rank 0 writes a file with a random name in ckpt_dir, every rank tries to read it back (and
    lists the checkpoints there: a network filesystem's cache could hide a new one from some node),
    and rank 0 removes it.
    Called by every rank once the process group is up; a single process has nothing to compare."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world_size, rank0 = dist.get_world_size(), dist.get_rank() == 0
    seen = [None] * world_size
    dist.all_gather_object(seen, (socket.gethostname(), dataset_view(dataset_dir)))
    hosts, datasets = [host for host, _ in seen], [view for _, view in seen]
    # no rank sees one: rank 0's reason, as on one machine
    if all(kind == "none" for kind, _ in datasets):
        raise UserError(datasets[0][1], every_rank=True)
    problem = dataset_problem(datasets, hosts, dataset_dir)
    if problem:
        raise UserError(problem, every_rank=True)
    probe = [f".shared-check-{secrets.token_hex(8)}" if rank0 else None]
    if rank0:
        os.makedirs(ckpt_dir, exist_ok=True)
        (Path(ckpt_dir) / probe[0]).write_text(probe[0])
    dist.broadcast_object_list(probe, src=0)
    try:
        views = [None] * world_size
        dist.all_gather_object(views, ckpt_dir_view(ckpt_dir, probe[0]))
    finally:
        if rank0:
            (Path(ckpt_dir) / probe[0]).unlink()
    problem = ckpt_dir_problem(views, hosts, ckpt_dir)
    if problem:
        raise UserError(problem, every_rank=True)
