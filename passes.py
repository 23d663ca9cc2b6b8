"""Runs that read their training tokens more than once: how many passes a run makes, the most it
makes, and the record of its validation loss that shows when a model starts to memorise.

The guide trains one pass over unique tokens, where a model cannot learn the training text by heart.
A learner's own corpus is often a few megabytes, and --max_minutes gives a run whatever length the
machine allows: the faster the machine, the more often the same text is read. Measured
(docs/defaults.md): with every pass after the first in an order of its own (DatasetLoader), runs of
up to the default --max_passes end at their lowest validation loss on every corpus measured, while
on a megabyte-sized one a longer run turns up halfway and ends well above its lowest point. So a
run makes at most --max_passes passes: a longer one, or a budget that holds more, ends there, and
more compute never trains a worse model.
A run allowed more than 2 passes saves a checkpoint at each new lowest validation loss and keeps it
however many newer ones come, so its best model is never lost.
"""
import math
from pathlib import Path

from checkpoint import checkpoint_path

# Above this many passes over its training tokens a run saves a checkpoint at each new lowest
# validation loss: a model cannot learn its text by heart in fewer.
REPEATS_FROM = 2.0
# Validation losses rising this many evaluations in a row are said in the progress line.
RISING_EVALUATIONS = 3


def most_updates(max_passes: float, train_tokens: int, tokens_per_update: int) -> int:
    """The longest run in updates that reads its training tokens at most max_passes times (0: no
    limit)."""
    return max(1, int(max_passes * train_tokens // tokens_per_update)) if max_passes else 2**62


def plan_repeats(training_steps: int, asked: int, tokens_per_update: int, train_tokens: int,
                 master: bool, planned: dict | None) -> dict:
    """Once the run's length is planned: how many passes it makes over its training tokens, and
    whether the limit (most_updates) cut it short of the `asked` updates, said. `planned`: the plan
    a resumed budgeted run's checkpoint holds, which it goes on with (its length has been planned
    again since). A run of a number of tokens plans again from them: the same plan, or the one for a
    raised --training_tokens."""
    plan = planned or {"passes": training_steps * tokens_per_update / train_tokens,
                       "limited": asked > training_steps}
    if master:
        print(passes_line(plan, train_tokens))
    return plan


def keeps_best(plan: dict | None) -> bool:
    """Whether the run saves a checkpoint at each new lowest validation loss: when it repeats its
    data."""
    return plan is not None and plan["passes"] > REPEATS_FROM


def passes_line(plan: dict, train_tokens: int) -> str:
    """What the run says at start-up about how often it reads its data, and what it does about
    it."""
    line = f"data: {plan['passes']:.3g} passes over {train_tokens:,} training tokens"
    if plan.get("limited"):
        line += (", the most a run makes (--max_passes): more passes end no lower, so it ends "
                 "there, before the length it was given")
    if not keeps_best(plan):
        return line
    return (f"{line}; beyond {REPEATS_FROM:g} passes the validation loss can rise again, so this "
            "run saves a checkpoint at each new lowest validation loss and keeps it (--ckpt=best "
            "in sample.py and export.py)")


class ValidationRecord:
    """The run's validation losses as far as they matter: the lowest so far, how many evaluations in
    a row rose, and the saved checkpoint with the lowest loss (the one to keep). It travels in
    checkpoints, so a resumed run goes on with it."""

    def __init__(self):
        self.last = self.best = math.inf
        self.best_step, self.best_bpb, self.rises = 0, math.inf, 0
        self.best_saved = None  # (step, val_loss, val_bpb) of the best checkpoint saved so far

    def add(self, step: int, val_loss: float, val_bpb: float) -> bool:
        """Record an evaluation; True when it is the lowest yet."""
        self.rises = self.rises + 1 if val_loss > self.last else 0
        self.last = val_loss
        if val_loss < self.best:
            self.best, self.best_step, self.best_bpb = val_loss, step, val_bpb
            return True
        return False

    def saved(self, step: int):
        """A checkpoint of update `step` is saved: it is the best one if that update's evaluation is
        the lowest."""
        if step == self.best_step:
            self.best_saved = (step, self.best, self.best_bpb)

    def best_path(self, ckpt_dir: str, sharded: bool) -> Path | None:
        return checkpoint_path(ckpt_dir, self.best_saved[0], sharded) if self.best_saved else None

    def final_line(self, ckpt_dir: str, sharded: bool) -> str:
        if self.best_saved is None:
            return "no checkpoint was saved at an evaluation, so none is marked best"
        step, _, bpb = self.best_saved
        return (f"lowest validation loss of the saved checkpoints: {bpb:.4f} bpb at update {step}, "
                f"in {self.best_path(ckpt_dir, sharded)} (sample.py and export.py take it as "
                "--ckpt=best)")

    def note(self) -> str:
        """What the progress line adds while the validation loss keeps rising."""
        if self.rises < RISING_EVALUATIONS:
            return ""
        return (f" | val loss rising {self.rises} evaluations in a row (lowest {self.best_bpb:.4f} "
                f"bpb at update {self.best_step})")

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict):
        vars(self).update(state)
