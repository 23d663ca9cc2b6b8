"""The notebooks in notebooks/ run top to bottom, headless, and draw their figures; every code cell
can be run twice in a row; and the outputs stored with them belong to their code.

Each notebook walks one section of the training guide and asserts the guide's numbers as it goes, so
executing it is the test: any failing cell fails it. They read the default Shakespeare dataset,
which the `shakespeare_dir` fixture builds if it is missing.
"""
import copy
import sys
import time

import nbformat
import pytest
from execute import code_hash  # notebooks/execute.py, which stores them executed
from helpers import ROOT
from nbclient import NotebookClient

# Each notebook and the number of figures it draws (loss curves, schedules, batch layouts,
# probability bars, token frequencies).
NOTEBOOKS = {
    "01_introduction": 3,
    "02_model_configuration": 3,
    "03_dataset_and_batching": 4,
    "04_lr_scheduler": 4,
    "05_training_loop": 3,
    "06_a_run_of_train_py": 1,
    "07_learning_per_minute": 4,
    "08_supervised_fine_tuning": 2,
    "09_preference_optimization": 1,
}


def test_there_is_one_notebook_per_guide_section():
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(NOTEBOOKS)


def execute(nb, name: str) -> int:
    """Run `nb` in a fresh kernel started in notebooks/, as Jupyter would; return the number of
    figures drawn."""
    # A kernel can take a while to start when the other test worker keeps the cores busy: wait up to
    # 5 minutes.
    client = NotebookClient(nb, timeout=600, startup_timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    # The kernel must be this interpreter (the venv's), not whatever `python` is first on PATH. The
    # client keeps owning the kernel manager it creates here, so it also shuts the kernel down.
    assert client.create_kernel_manager().format_kernel_cmd()[0] == sys.executable
    start = time.time()
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    print(f"{name}: {time.time() - start:.1f} s")
    return figures(nb)


def figures(nb) -> int:
    return sum("image/png" in output.get("data", {}) for cell in nb.cells
               if cell.cell_type == "code"
               for output in cell.outputs)


def read(name: str):
    """The notebook as stored, its outputs cleared: what a test executes."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_stored_outputs_belong_to_the_code(name):
    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("code_sha256") == code_hash(nb), \
        f"{name}'s code changed since its outputs were stored: run python notebooks/execute.py " \
        f"{name}"
    assert figures(nb) == NOTEBOOKS[name] and all(cell.execution_count for cell in nb.cells
                                                  if cell.cell_type == "code")
    # figures at a modest resolution keep a notebook small enough to read online
    assert path.stat().st_size < 1_500_000


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_every_cell_twice_and_draws_its_figures(name, shakespeare_dir):
    # A learner runs a cell, changes something, runs it again. Each code cell is followed by a copy
    # of itself, so every cell runs a second time in the state its own first run left behind; run
    # top to bottom in a fresh kernel, this is also the run a reader makes (the stored outputs are
    # one: execute.py's).
    nb = read(name)
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        if cell.cell_type == "code":
            again = copy.deepcopy(cell)
            again.id = f"{cell.id}-again"
            cells.append(again)
    nb.cells = cells
    assert execute(nb, f"{name} (every cell twice)") == 2 * NOTEBOOKS[name]


def code_and_output(name: str) -> tuple[str, str]:
    """A stored notebook's code cells and their printed output, each joined into one text."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    printed = "".join(out.get("text", "") for cell in cells for out in cell.outputs
                      if out.output_type == "stream")
    return "\n".join(cell.source for cell in cells), printed


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_notebook_switches_autograd_off_for_the_whole_kernel(name):
    # A learner who adds a backward() below torch.set_grad_enabled(False) gets an error far from its
    # cause;
    # a notebook that needs no gradients says so locally, with `with torch.no_grad():`.
    code, _ = code_and_output(name)
    assert "set_grad_enabled(False)" not in code.replace(" ", "")


def test_notebook_05_checks_a_gradient_against_a_finite_difference():
    code, printed = code_and_output("05_training_loop")
    assert "assert math.isclose(finite_difference, autograd_slope" in code
    assert "finite-difference check passed" in printed  # the check ran when the notebook was stored
    assert "assert torch.allclose(twice, 2 * once)" in code  # backward() without zero_grad adds up


def test_notebook_04_shows_the_loss_jumping_at_the_start_without_warm_up():
    code, printed = code_and_output("04_lr_scheduler")
    # The same function trains both runs of each seed; only warmup_iterations differs.
    assert "short_run(w, seed) for label, w in zip(LABELS, (RUN_WARMUP, 0), strict=True)" in code
    # on every seed the start without warm-up is worse, by a margin
    assert "assert min(gaps) > " in code
    assert 'assert max(start_peak["with warm-up", s] for s in SEEDS) < math.log(VOCAB)' in code
    # ran when stored
    assert "highest loss in updates 1-10, without warm-up minus with it, per seed:" in printed


def test_notebook_02_walks_one_batch_through_the_model_asserting_every_stage_shape():
    code, printed = code_and_output("02_model_configuration")
    assert "assert tuple(tensor.shape) == expected" in code  # stage() asserts each shape it prints
    # and the stages add up to model(idx)
    assert "assert torch.allclose(by_hand, tiny(idx)[0]" in code
    assert "stage by stage equals model(idx)" in printed
    for stage in ("tok_embeddings(idx): one vector per token      (2, 8, 32)",
                  "output(x): logits, one score per vocabulary id (2, 8, 8192)",
                  "queries: wq, split into heads                  (2, 4, 8, 8)",
                  "keys: wk, split into kv heads                  (2, 2, 8, 8)"):
        assert stage in printed
