"""Watching a run from a browser: every row of log.csv, the run's settings and its samples, sent to
experiment trackers.

    python train.py --tracker=tensorboard          # events in ckpt_dir; tensorboard --logdir=out
    python train.py --tracker=wandb                # offline unless logged in; then `wandb sync`
    python train.py --tracker=tensorboard,trackio  # any of them together; trackio: `trackio show`

log.csv stays the record of the run: a tracker gets the very numbers written there (each value as
the CSV prints it), under the same names, with the update as the step; the resolved config once, as
the run's hyperparameters; and the samples, as text. Only rank 0 tracks. The trackers are optional
packages, imported only when asked for, and a missing one is refused when the options are read,
before anything is trained.

A resumed run goes on with the same tracked run. wandb and trackio find it again by the id or name
the checkpoint keeps (state_dict); TensorBoard is told that the steps after the checkpoint start
over (purge_step), so points a crashed run logged past its last checkpoint are dropped instead of
drawn twice.
"""
import dataclasses
import importlib.util
import os

from configurator import UserError
from training_log import LOG_FORMAT

# --tracker name -> the package it needs (what `pip install` takes).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
# the wandb and trackio project every run goes to, unless WANDB_PROJECT says otherwise
PROJECT = "llama-pretrain"


def tracker_names(spec: str) -> list[str]:
    """The trackers of a --tracker value ("" = none), each known and installed, or one line that
    names the fix."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"unknown --tracker={name}; choose from {', '.join(TRACKERS)} (a comma "
                            "list)")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"--tracker={name} needs the {TRACKERS[name]} package: pip install "
                            f"{TRACKERS[name]}")
    return names


def logged_values(row: dict) -> dict:
    """A log row as log.csv holds it: each value rounded as its column prints it, empty columns left
    out."""
    return {key: float(format(row[key], fmt)) for key, fmt in LOG_FORMAT.items()
            if key != "step" and row.get(key) is not None}


def config_markdown(config: dict) -> str:
    """The settings as a Markdown table, for TensorBoard's text tab (it has no other place for a
    whole config)."""
    return "| setting | value |\n|---|---|\n" + "".join(f"| {k} | `{v}` |\n" for k,
                                                        v in config.items())


class Tracking:
    """The trackers of one run, fed one log row at a time. Without trackers (or off rank 0) every
    call does nothing."""

    def __init__(self, names: list[str], ckpt_dir: str, config: dict, step: int, saved: dict):
        self.writer = self.wandb_run = self.trackio = self.trackio_run = None
        self.samples = {}  # update -> the sample printed at it, for the report card
        self.saved = saved  # kept for a later resume, also when this part of the run tracks nothing
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package

            # purge_step: a reader drops the points of steps from here on that an earlier, crashed
            # run wrote.
            self.writer = SummaryWriter(ckpt_dir, purge_step=step + 1 if step else None)
            if not step:
                self.writer.add_text("config", config_markdown(config), 0)
        if "wandb" in names:
            import wandb

            # Without a key (wandb login or WANDB_API_KEY) the run is kept on disk, to upload with
            # `wandb sync`.
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT),
                                        dir=ckpt_dir,
                                        id=saved.get("wandb_id"), resume="allow", config=config,
                                        mode=mode)
        if "trackio" in names:
            import trackio

            name = saved.get("trackio_name")
            self.trackio_run = trackio.init(project=PROJECT, name=name, config=config,
                                            resume="allow" if name else "never")
            self.trackio = trackio
            # trackio appends whatever it is given: steps it already holds (logged past the
            # checkpoint by a run that then crashed, and trained again now) are not sent twice.
            # TensorBoard drops them (purge_step above), and wandb's server ignores a step below one
            # it holds.
            self.trackio_holds = (name
                                  and trackio.SQLiteStorage.get_max_step_for_run(PROJECT,
                                                                                 name)) or 0

    def log(self, row: dict, sample: str = ""):
        """One update's row of log.csv (train.py's dict), and the sample printed at it, if any."""
        step, values = row["step"], logged_values(row)
        if sample:
            self.samples[step] = sample
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            if sample:  # Markdown: a fenced block keeps the sample's line breaks
                self.writer.add_text("sample", f"```\n{sample}\n```", step)
        text = {"sample": sample} if sample else {}
        if self.wandb_run:
            self.wandb_run.log(values | text, step=step)
        if self.trackio and step > self.trackio_holds:
            self.trackio.log(values | text, step=step)

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed run continues the same tracked runs."""
        state = dict(self.saved)
        if self.wandb_run:
            state["wandb_id"] = self.wandb_run.id
        if self.trackio:
            state["trackio_name"] = self.trackio_run.name
        return state

    def finish(self):
        if self.writer:
            self.writer.close()
        if self.wandb_run:
            self.wandb_run.finish()
        if self.trackio:
            self.trackio.finish()


def wandb_logged_in() -> bool:
    """Whether wandb has an API key here (WANDB_API_KEY, or ~/.netrc from `wandb login`); asks no
    server."""
    import wandb

    return wandb.login(prompt=False, verify=False)


def start_tracking(cfg, step: int, saved: dict | None, master: bool) -> Tracking:
    """The run's trackers (cfg a dataclass with `tracker` and `ckpt_dir`), given the update it
    starts from and what the checkpoint it resumes from kept (state_dict's)."""
    names = tracker_names(cfg.tracker) if master else []
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "user_set"}
    return Tracking(names, cfg.ckpt_dir, config, step, saved or {})
