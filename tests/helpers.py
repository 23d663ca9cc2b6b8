"""What the tests share: the repository's root, the tiny training settings, running a script as a
user would, comparing what two runs saved, and the processes a test starts, found and stopped.

Fixtures are conftest.py's; this module holds the plain functions and constants that test files
import."""
import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import model as model_py
from checkpoint import checkpoint_paths, load_checkpoint
from train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
# A model small enough that a few updates take a second or two on a laptop CPU. compile=False: a
# test that is not about compiling skips compile=auto's timing of updates at start-up.
TINY = ["--n_layers=1", "--n_embd=32", "--n_heads=2", "--n_kv_heads=2", "--batch_size=2",
        "--max_seq_len=32",
        "--tokens_per_update=128", "--warmup_iterations=2", "--eval_interval=4",
        "--eval_tokens=256",
        "--model_gen_multiplier=0", "--device=cpu", "--dtype=float32", "--compile=False"]
# TINY with 384 tokens per update: micro-batches of 2 x 32 tokens, 6 micro-steps on one rank, 3 on
# each of 2 and 2 on each of 3, so that one run can be compared on all three.
TINY_384 = [*TINY, "--tokens_per_update=384"]
# Ten updates of a 2-layer, 64-wide model, enough to move the weights off their init: what is
# exported.
SMALL = ["--n_layers=2", "--n_embd=64", "--batch_size=4", "--max_seq_len=64",
         "--tokens_per_update=256",
         "--training_tokens=2560", "--warmup_iterations=2", "--eval_interval=5",
         "--eval_tokens=512",
         "--model_gen_multiplier=0", "--device=cpu", "--dtype=float32", "--compile=False"]
# The two shapes of the small model that is exported: multi-head and grouped-query attention.
SHAPES = {"mha": ["--n_heads=4", "--n_kv_heads=4"], "gqa": ["--n_heads=4", "--n_kv_heads=2"]}
# A multiple-choice set written for this project (tests/test_eval.py describes it).
EVAL_SET = ROOT / "tests" / "eval_sets" / "multiple_choice.jsonl"
# Text that tokenizers get wrong first: scripts, emoji sequences, combining marks, odd whitespace,
# digits, code.
VARIED_TEXT = ("Hello, world! 日本語のテキストと中文，还有한국어. emoji 🙂🚀 👨‍👩‍👧‍👦 🇫🇷 👍🏽; "
               "combining e\u0301 a\u0308 \u0915\u094d\u0937 Z\u0351a\u0315; "
               "odd  whitespace:\t\ttabs\r\nCRLF\u00a0nbsp\u2028\u3000 \u200b\n\n\n   digits "
               "1234567890 3.14159 "
               "and code:\n    def f(x):\n        return {'k': x ** 2}  # it's\n  ")
# The largest learning rate of a Muon run, the token embedding's: what bounds how far two runs'
# weights drift.
PEAK_LR = TrainConfig.embedding_lr
# Another CPU's rounding, on this one. ATen's plain kernels (ATEN_CPU_CAPABILITY=default: no vector
# instructions) and MKL's compatible code path add up sums in other orders than this machine's own
# kernels, as another CPU's would. A parity test runs one side with them, so that a tolerance which
# only this machine's rounding happens to meet fails here instead of on a user's machine.
OTHER_ROUNDING = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
# The log prints losses and gradient norms with 4 decimals: two equal values can print up to 1e-4
# apart, and fp32 rounding of a mean over a batch adds a few 1e-6 for values near 10.
LOGGED = 1.2e-4


# --- running the scripts --------------------------------------------------------------------------
def run(script, *args, check=True, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts the way a user would ("train.py", or "-m
    torch.distributed.run ...
    train.py"), from the repository's root. One that fails (with `check`) fails the test, showing
    its output; one still running after `timeout` seconds (a hang) is killed, with every process it
    started, and fails it too."""
    proc = subprocess.Popen([sys.executable, *script.split(), *args], cwd=ROOT,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)
    out, err = communicate(proc, timeout)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed "
                             f"({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def torchrun(ranks: int, *args, **kwargs) -> subprocess.CompletedProcess:
    """train.py on `ranks` processes of this machine, as `torchrun --standalone` starts them."""
    return run(f"-m torch.distributed.run --standalone --nproc_per_node={ranks} train.py", *args,
               **kwargs)


def one_line(stderr: str) -> str:
    """The error line, and nothing else but progress bars: no traceback, no second message."""
    lines = [line for line in stderr.strip().splitlines()
             if line and not line.startswith(("measuring", "tokenizing"))]
    assert len(lines) == 1, stderr
    return lines[0]


def one_line_error(result, *words):
    """A user's mistake: exit status 2 and one line on stderr, `error: ...`, holding each of
    `words`."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert all(word in result.stderr for word in words), result.stderr


# --- what runs saved ------------------------------------------------------------------------------
def final_weights(ckpt_dir) -> dict:
    """The model's weights in the newest checkpoint of ckpt_dir, of either form, whole."""
    return load_checkpoint(checkpoint_paths(ckpt_dir)[-1])["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0):
    """Every tensor equal, bitwise (atol=0), or within atol."""
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def logged(ckpt_dir) -> dict[int, dict]:
    """The rows of a run's log.csv, by update."""
    with open(Path(ckpt_dir) / "log.csv") as f:
        return {int(row["step"]): row for row in csv.DictReader(f)}


def assert_same_curve(a: dict, b: dict, steps, column: str = "train_loss"):
    """Two logs (logged's) agree in `column` at every one of `steps`, to the digits the log
    keeps."""
    for step in steps:
        assert abs(float(a[step][column]) - float(b[step][column])) <= LOGGED, (step, a[step],
                                                                                b[step])


def toy_dataset(path: Path, shard_lengths, split: str = "train") -> Path:
    """A dataset directory like prepare.py's whose token at position i of the whole split is i (ids
    are positions), with a meta.json holding every field the format has."""
    path.mkdir(parents=True, exist_ok=True)
    shards, start = {}, 0
    for i, n in enumerate(shard_lengths):
        name = f"{split}_{i:06d}.npy"
        np.save(path / name, np.arange(start, start + n, dtype=np.uint32))
        shards[name] = n
        start += n
    meta = {"vocab_size": 2**31, "tokenizer": "bpe", "pattern": "", "special_tokens": {},
            "dtype": "uint32",
            "train_tokens": start, "val_tokens": 0, "train_bytes": start, "val_bytes": 0,
            "shards": shards}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


# --- the model's arithmetic -----------------------------------------------------------------------
def logit_tolerance(logits: torch.Tensor) -> float:
    """How far apart two fp32 computations of the same logits may be when they only sum in other
    orders (another kernel, a KV cache, another library's code): each logit ends a chain of sums of
    a few hundred products, each rounded to 24 bits, so they agree to a few millionths of the
    largest logit. A ten-thousandth of it leaves room for any CPU's kernels; a real mistake (a wrong
    weight layout, a missing rotation) moves logits by percents."""
    return 1e-4 * logits.abs().max().item()


def recording_top_two_gaps(monkeypatch) -> list[float]:
    """Make generate() record, at every step, how far its best logit lies above the second best."""
    gaps = []

    def sample(logits, *args, **kwargs):
        top2 = logits.float().topk(2, dim=-1).values
        gaps.append((top2[:, 0] - top2[:, 1]).min().item())
        return real_sample(logits, *args, **kwargs)

    real_sample = model_py.sample
    monkeypatch.setattr(model_py, "sample", sample)
    return gaps


class RunsCode:
    """Unpickling this would run a shell command: exactly what weights_only loading must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- processes ------------------------------------------------------------------------------------
# torchrun runs each rank in a session of its own, so killing the launcher alone would leave its
# ranks running.
def descendants(pid: int) -> list[int]:
    """Every process below pid, from Linux's /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if parent == pid:
            children.append(int(stat.parent.name))
    return children + [d for c in children for d in descendants(c)]


def alive(pid: int) -> bool:
    """True while pid runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(pid: int):
    """SIGKILL pid and everything below it; the children are listed first, before they lose their
    parent."""
    for victim in [*descendants(pid), pid]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def communicate(proc, timeout: float) -> tuple[str, str]:
    """proc.communicate(), except that a process still running after `timeout` seconds (a hang) is
    killed, with every process it started, and fails the test."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"{shlex.join(map(str, proc.args))} was still running after {timeout} "
                             "s; killed "
                             f"it:\n{out}\n{err}") from None


def free_port() -> int:
    """A TCP port no process listens on now: the OS picks an unused one, and it stays free once
    released unless another process happens to bind that very port in the moment before the test's
    processes do."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
