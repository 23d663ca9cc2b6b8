"""Muon, the optimizer for the blocks' weight matrices, and its pairing with AdamW for every other
parameter.

Reading order: orthogonalize (the Newton-Schulz iteration) -> Muon (momentum, orthogonalized,
scaled) -> how the orthogonalizing is shared out among the ranks of a DDP or FSDP run ->
MuonAndAdamW (the two optimizers stepped, zeroed, saved and loaded as one). train.py's
make_optimizer decides which parameter goes where.
"""
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def orthogonalize(g: torch.Tensor, steps: int = 5,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """g with its singular values pushed towards 1 by a Newton-Schulz iteration (no SVD, only matrix
    products).

    Each step maps every singular value s to a*s + b*s^3 + c*s^5; Keller Jordan's coefficients below
    make small values grow fast, and five steps leave all of them between about 0.7 and 1.2, close
    enough for Muon. Dividing by the Frobenius norm first puts every singular value at or below 1,
    where the iteration starts. The iteration runs on the short side's Gram matrix, the cheaper of
    the two.

    It runs in `dtype`: float32, not torch.optim.Muon's bfloat16, which CPUs without bf16
    instructions and GPUs before compute capability 8.0 emulate, many times slower. An fp16 run
    passes float16, the fast tensor-core format of those GPUs, on which fp32 matmuls run several
    times slower. fp16 cannot overflow here: after the division every singular value of x stays
    below about 1.2 through all five steps, and no entry of a matrix can exceed its largest singular
    value, so every number the iteration makes stays within a few units, far inside fp16's limit of
    65504. Its 11-bit significand makes it more accurate than bf16's 8 (docs/benchmarks.md)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = (g.float() / (g.norm() + 1e-7)).to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of t this rank holds: under FSDP a DTensor's own shard (sharing its memory), else t
    itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-schulz), for 2-D weight matrices.

    The update is the gradient's Nesterov momentum with every singular value set to about 1 (see
    orthogonalize), so a matrix moves by the same amount in every direction instead of mostly along
    the few directions that dominate its gradient. Scaling it by 0.2 * sqrt(max(rows, cols)) gives
    it the size of a typical AdamW update (Moonshot AI's rule, torch.optim.Muon's
    adjust_lr_fn="match_rms_adamw"), so lr and weight decay mean what AdamW's do.

    The same step serves one process, DDP and FSDP. Momentum, weight decay and the step itself are
    element by element, so each rank does them on what it holds (the whole matrix, or its FSDP
    shard; the momentum is kept like the weight, sharded under FSDP). Orthogonalizing needs a whole
    matrix and is the expensive part: with several ranks each matrix is orthogonalized by one of
    them only (orthogonalize_on_owners), in `dtype`."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95,
                 dtype: torch.dtype = torch.float32):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        # torch's Optimizer API: re-evaluate the loss first (train.py never asks for it)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(group, [p for p in group["params"] if p.grad is not None])
                  for group in self.param_groups]
        for group, params in groups:
            for p in params:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                local(buf).lerp_(local(p.grad), 1 - group["momentum"])
                # Nesterov: a step beyond the momentum
                local(p.grad).lerp_(local(buf), group["momentum"])
        # The gradients' memory holds the updates from here on: orthogonalized in place, then
        # applied.
        orthogonalize_on_owners([p.grad for _, params in groups for p in params], self.dtype)
        for group, params in groups:
            for p in params:
                # decoupled weight decay, as in AdamW
                local(p).mul_(1 - group["lr"] * group["weight_decay"])
                local(p).add_(local(p.grad), alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))
        return loss


# --------------------------------------------------------------------------------------------------
# Sharing the orthogonalizing out among the ranks.
def newton_schulz_flops(shape, steps: int = 5) -> int:
    """Multiply-adds x2 of orthogonalize on a matrix of this shape: per step, two products with the
    (m x n) matrix and one of the (m x m) Gram matrix with itself, m being the short side."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m**3)


def owners(shapes: list, world_size: int) -> list[int]:
    """Which rank orthogonalizes each matrix: the costliest first, each to the rank with the least
    work so far, so that ranks get about the same FLOPs (not the same count: a block's feed-forward
    matrices cost more than its attention ones). Every rank computes the same answer from the same
    list of shapes."""
    load, owner = [0] * world_size, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -newton_schulz_flops(shapes[i])):
        owner[i] = min(range(world_size), key=lambda r: load[r])
        load[owner[i]] += newton_schulz_flops(shapes[i])
    return owner


def orthogonalize_on_owners(updates: list[torch.Tensor], dtype: torch.dtype):
    """Orthogonalize every update in place, each on one rank, the result reaching every rank that
    holds the matrix.

    - one process: each in turn;
    - DDP: every rank holds every whole update (the gradients were all-reduced); the owner
      orthogonalizes it and broadcasts the result;
    - FSDP: a rank holds a shard of rows of each update (a DTensor); the shards are gathered on the
      owner, which orthogonalizes the whole matrix and scatters the result's rows back. The owner
      holds whole only the matrices it owns, about 1/world_size of them.
    All the collectives of one phase are started together, so that the ranks orthogonalize at the
    same time."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size == 1:
        for u in updates:
            local(u).copy_(orthogonalize(local(u), dtype=dtype))
        return
    rank, owner = dist.get_rank(), owners([u.shape for u in updates], world_size)
    if not isinstance(updates[0], DTensor):
        for u, r in zip(updates, owner, strict=True):
            if r == rank:
                u.copy_(orthogonalize(u, dtype=dtype))
        wait([dist.broadcast(u, src=r, async_op=True) for u, r in zip(updates, owner, strict=True)])
        return
    # FSDP shards a matrix's rows as torch.chunk does; collectives need pieces of one size, so each
    # is padded.
    rows = [[len(c) for c in torch.empty(u.shape[0], 0).chunk(world_size)] for u in updates]
    rows = [counts + [0] * (world_size - len(counts)) for counts in rows]
    pieces = [[local(u).new_zeros(max(counts), u.shape[1]) for _ in range(world_size)] if r == rank
              else None
              for u, r, counts in zip(updates, owner, rows, strict=True)]
    mine = [padded(local(u), max(counts)) for u, counts in zip(updates, rows, strict=True)]
    wait([dist.gather(m, pieces[i], dst=owner[i], async_op=True) for i, m in enumerate(mine)])
    for i, counts in enumerate(rows):
        if owner[i] == rank:
            whole = orthogonalize(torch.cat([piece[:n] for piece,
                                             n in zip(pieces[i], counts, strict=True)]),
                                  dtype=dtype)
            for piece, part in zip(pieces[i], whole.split(counts), strict=True):
                piece[:len(part)] = part
    wait([dist.scatter(m, pieces[i], src=owner[i], async_op=True) for i, m in enumerate(mine)])
    for u, m, counts in zip(updates, mine, rows, strict=True):
        local(u).copy_(m[:counts[rank]])


def padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with zero rows added up to `rows` (a copy, which the collectives fill)."""
    return torch.cat([t, t.new_zeros(rows - len(t), *t.shape[1:])])


def wait(works):
    for work in works:
        work.wait()


class MuonAndAdamW:
    """--optimizer=muon: two optimizers that train.py steps, zeroes, saves and loads as one.

    Muon takes the 2-D weight matrices inside the blocks. Orthogonalizing an update only makes sense
    for a matrix that maps vectors to vectors, so the embedding table (a lookup), the output head
    and the norm gains stay with AdamW, as in modded-nanogpt and nanochat."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        # what torch.distributed.checkpoint saves and loads, one by one
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: load_state_dict gives each optimizer new group dicts, and the
        # Scheduler must set the learning rate in the ones the optimizers use.
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
