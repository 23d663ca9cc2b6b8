"""Stopping a run cleanly when it is asked to: preemption by a cluster's scheduler (SIGTERM) or
Ctrl-C (SIGINT).

The signal only sets a flag; train.py checks it after each update, so the run saves a checkpoint at
a whole update and exits, instead of dying halfway through an optimizer step.
"""
import signal

import torch
import torch.distributed as dist


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each update."""

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
