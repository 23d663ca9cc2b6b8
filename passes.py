"""Runs that read their training tokens more than once: how many passes a run makes, what it does
about it, and the record of its validation loss that shows when a model starts to memorise.

The guide trains one pass over unique tokens, where a model cannot learn the training text by heart.
A learner's own corpus is often a few megabytes, and --max_minutes gives a run whatever length the
machine allows: the faster the machine, the more often the same text is read. With each pass cut
into new windows (DatasetLoader.pass_start) the guide's settings keep the validation loss falling to
the end of runs of up to 10 passes, and a longer run ends lower than a shorter one; dropout there
only costs (docs/defaults.md). Beyond what was measured a model may learn the text by heart and its
validation loss climb again, so such a run saves a checkpoint at each new lowest validation loss and
keeps that one however many newer ones come: its best model is never lost.
"""
import math
from pathlib import Path

from checkpoint import checkpoint_path

# Above this many passes over its training tokens a run keeps its best checkpoint. Up to here the
# guide's settings end a run at its lowest validation loss (docs/defaults.md).
REPEATS_FROM = 10.0
# Validation losses rising this many evaluations in a row are said in the progress line.
RISING_EVALUATIONS = 3


def plan_repeats(training_steps: int, tokens_per_update: int, train_tokens: int, master: bool,
                 planned: dict | None) -> dict:
    """Once the run's length is planned: how many passes it makes over its training tokens, said.
    `planned`: the plan a resumed budgeted run's checkpoint holds, which it goes on with (its length
    has been planned again since). A run of a number of tokens plans again from them: the same plan,
    or the one for a raised --training_tokens."""
    plan = planned or {"passes": training_steps * tokens_per_update / train_tokens}
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
    if not keeps_best(plan):
        return line
    return (f"{line}; beyond {REPEATS_FROM:g} passes a model may learn the text by heart, so this "
            "run saves a "
            "checkpoint at each new lowest validation loss and keeps it (--ckpt=best in sample.py "
            "and export.py)")


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
                "in "
                f"{self.best_path(ckpt_dir, sharded)} (sample.py and export.py take it as "
                "--ckpt=best)")

    def note(self) -> str:
        """What the progress line adds while the validation loss keeps rising."""
        if self.rises < RISING_EVALUATIONS:
            return ""
        return (f" | val loss rising {self.rises} evaluations in a row (lowest {self.best_bpb:.4f} "
                "bpb at update "
                f"{self.best_step})")

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict):
        vars(self).update(state)
