"""A wall-clock budget for a run (train.py --max_minutes=N): the run's length in updates, planned
from timing them.

The learning-rate schedule must know where it ends, but how many updates fit in N minutes depends on
the machine.
So the run times its first updates, plans its length from them, and plans again every few updates as
it goes: the schedule's decay then ends at min_lr on the last update, close to the end of the
budget, even on a machine whose speed drifts.
"""
import statistics

import torch
import torch.distributed as dist

# the length is planned after each of the first 10 updates, then after every 10 more
BUDGET_PROBE_UPDATES = 10


def replans_length(step: int) -> bool:
    """Whether the length is planned again after update `step`. A machine's speed drifts (shared,
    throttled, warming up); a length fixed early cannot follow that, one planned again from the time
    really used so far leaves an error that shrinks as the end comes near."""
    return step <= BUDGET_PROBE_UPDATES or step % BUDGET_PROBE_UPDATES == 0


def updates_in_budget(cfg, step: int, seconds_used: float, update_seconds: list[float],
                      eval_tokens: int,
                      n_params: int, device: str) -> int:
    """How many updates in all fit in cfg.max_minutes (cfg a train.py TrainConfig), given the time
    used so far and the updates' times so far.

    One update costs the median of the latest 20 (update 1 is left out: it allocates, warms caches,
    compiles), plus its share of the evaluations (a forward pass over the eval_tokens an evaluation
    reads every eval_interval updates; forward alone is about a third of forward + backward) and of
    the checkpoints (12 bytes per parameter, weights and AdamW's two moments, at a conservative 200
    MB/s, every token_ckpt tokens). The time left, less one last evaluation and checkpoint, is
    divided by that. Rank 0's answer is every rank's, so all run the same updates."""
    timed = update_seconds[1:][-2 * BUDGET_PROBE_UPDATES:] or update_seconds
    per_update = statistics.median(timed)
    eval_seconds = per_update * eval_tokens / cfg.tokens_per_update / 3
    ckpt_seconds = 12 * n_params / 200e6
    per_update += (eval_seconds / cfg.eval_interval
                   + ckpt_seconds * cfg.tokens_per_update / cfg.token_ckpt)
    left = cfg.max_minutes * 60 - seconds_used - eval_seconds - ckpt_seconds
    total = torch.tensor(step + max(0, int(left / per_update)), device=device)
    if dist.is_initialized():
        dist.broadcast(total, src=0)
    # The first updates always run, to be timed; and at least one update follows every plan, so that
    # the run's last update has the learning rate of the plan it ends (min_lr) even when a re-plan
    # finds the budget spent.
    return max(BUDGET_PROBE_UPDATES, step + 1, int(total.item()))
