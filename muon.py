"""Muon, the optimizer for the blocks' weight matrices, and its pairing with AdamW for every other parameter.

Reading order: orthogonalize (the Newton-Schulz iteration) -> Muon (momentum, orthogonalized, scaled) ->
MuonAndAdamW (the two optimizers stepped, zeroed, saved and loaded as one). train.py's make_optimizer decides which
parameter goes where.
"""
import math

import torch


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """g with its singular values pushed towards 1 by a Newton-Schulz iteration (no SVD, only matrix products).

    Each step maps every singular value s to a*s + b*s^3 + c*s^5; Keller Jordan's coefficients below make small
    values grow fast, and five steps leave all of them between about 0.7 and 1.2, close enough for Muon. Dividing
    by the Frobenius norm first puts every singular value at or below 1, where the iteration starts. The iteration
    runs on the short side's Gram matrix, the cheaper of the two. It runs in float32: torch.optim.Muon uses
    bfloat16, which CPUs without bf16 instructions emulate, many times slower."""
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
