"""The notebooks in notebooks/ run top to bottom, headless, and draw their figures.

Each notebook walks one section of the training guide and asserts the guide's numbers as it goes, so executing it
is the test: any failing cell fails it. They read the default Shakespeare dataset, which the `shakespeare_dir`
fixture builds if it is missing.
"""
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
# Each notebook and the number of figures it draws (loss curves, schedules, batch layouts, probability bars).
NOTEBOOKS = {
    "01_introduction": 3,
    "02_model_configuration": 2,
    "03_dataset_and_batching": 2,
    "04_lr_scheduler": 3,
    "05_training_loop": 1,
}


def test_there_is_one_notebook_per_guide_section():
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_draws_its_figures(name, shakespeare_dir, monkeypatch):
    # Spinning OpenMP threads crawl (~8x slower) when other processes share the cores; waiting passively costs
    # nothing on an idle machine. The kernel inherits this environment.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert not any(cell.outputs for cell in code_cells), f"{name} must be stored with its outputs cleared"

    # Started in notebooks/, as Jupyter would: the first cell has to find the repository root by itself.
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    # The kernel must be this interpreter (the venv's), not whatever `python` is first on PATH. The client keeps
    # owning the kernel manager it creates here, so it also shuts the kernel down.
    assert client.create_kernel_manager().format_kernel_cmd()[0] == sys.executable
    start = time.time()
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    print(f"{name}: {time.time() - start:.1f} s")

    figures = sum("image/png" in output.get("data", {}) for cell in code_cells for output in cell.outputs)
    assert figures == NOTEBOOKS[name]
