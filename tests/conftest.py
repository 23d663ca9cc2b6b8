"""Shared fixtures: the default Shakespeare dataset, prepared once and reused read-only.

The suite runs in two worker processes (`pytest -n 2`, pytest-xdist); what they share is guarded here."""
import fcntl
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
