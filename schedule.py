"""The learning rate of each update: linear warm-up, then cosine or linear decay to min_lr, or
constant.

train.py's loop sets it before every update (Scheduler.step); notebooks/04_lr_scheduler.ipynb draws
the curves.
"""
import math


class Scheduler:
    """Sets the optimizer's learning rate for each update (counted from 0).

    Warm-up: update s < warmup_steps gets max_lr * (s + 1) / warmup_steps, so the first update is
    gentle and the last warm-up update reaches max_lr. Decay: progress p runs from 0 right after
    warm-up to 1 at the final update, training_steps - 1; cosine gives min + (max - min) * (1 +
    cos(pi p)) / 2, linear gives max - (max - min) * p.
    "constant" keeps max_lr throughout, with no warm-up, which is handy for debugging.
    training_steps is the run's length in updates: the loop runs until it, and a time budget plans
    it (updates_in_budget).
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
            return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (
                1 + math.cos(math.pi * progress))
        return self.max_lr - (self.max_lr - self.min_lr) * progress

    def step(self, step: int) -> float:
        self.current_lr = self.lr_at(step)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                # A group may peak at its own learning rate (Muon's): it then carries the ratio as
                # lr_scale.
                group["lr"] = self.current_lr * group.get("lr_scale", 1.0)
        return self.current_lr

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "optimizer"}
