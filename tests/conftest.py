"""Shared fixtures: the default Shakespeare dataset, prepared once and reused read-only."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# GPT-2's vocabulary ships beside the repository so the gpt2 paths work offline.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """data/shakespeare as `python prepare.py` builds it (built here if it is missing).

    Tests must treat it as read-only: notebooks and users share it."""
    out = ROOT / "data" / "shakespeare"
    if not (out / "meta.json").exists():
        import prepare

        prepare.main([f"--out_dir={out}"])
    return out
