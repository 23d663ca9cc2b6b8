"""Run the notebooks top to bottom, each in a fresh kernel, and store them with their outputs.

    python notebooks/execute.py                      # all of them
    python notebooks/execute.py 05_training_loop     # one (or several), by name

A notebook is stored executed so that it can be read, figures and printed numbers included, without
running it.
It records the hash of its code cells when it is executed (metadata "code_sha256"); the tests fail
when a notebook's code has changed since, so stored outputs always belong to the code beside them.
"""
import hashlib
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def code_hash(nb) -> str:
    """What the stored outputs depend on: the source of every code cell, in order."""
    code = "\n\0".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    return hashlib.sha256(code.encode()).hexdigest()


def execute(path: Path) -> float:
    """Execute one notebook in place (outputs replaced); returns the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    start = time.time()
    # The kernel starts in notebooks/, as Jupyter starts it; timestamps are not stored, so an
    # unchanged notebook executed again differs only where its outputs do.
    NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(HERE)}}).execute()
    nb.metadata["code_sha256"] = code_hash(nb)
    nbformat.write(nb, path)
    return time.time() - start


def main(names: list[str]):
    paths = [HERE / f"{name.removesuffix('.ipynb')}.ipynb"
             for name in names] or sorted(HERE.glob("*.ipynb"))
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        sys.exit(f"error: no notebook {', '.join(missing)} in {HERE}; the names are "
                 + ", ".join(p.stem for p in sorted(HERE.glob("*.ipynb"))))
    for path in paths:
        seconds = execute(path)
        print(f"{path.name}: {seconds:.1f} s, {path.stat().st_size / 1e3:,.0f} kB")


if __name__ == "__main__":
    main(sys.argv[1:])
