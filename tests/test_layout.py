"""The repository's shape: model.py stands alone, no module imports one that imports it, and
train.py's default schedule is the guide's warm-up + cosine."""
import ast
import json
import subprocess
import sys

import pytest
from helpers import ROOT

from train import Scheduler, TrainConfig

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def imports_of(module: str) -> set[str]:
    """The repository's modules that `module` imports anywhere in its file (inside functions
    too)."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {module}


def loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after `statement`."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out))


def test_model_py_loads_nothing_of_this_repository_and_no_tokenizer():
    added = loaded_by("import model") - loaded_by("import torch, torch.nn.functional")
    assert {name.split(".")[0] for name in added} <= {"model", "dataclasses", "math"}, added
    assert imports_of("model") == set()


def test_no_module_imports_one_that_imports_it():
    graph = {module: imports_of(module) for module in MODULES}
    print(json.dumps({m: sorted(i) for m, i in graph.items()}, indent=1))

    def cycle_from(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        for imported in sorted(graph[module]):
            if found := cycle_from(imported, path + [module]):
                return found
        return None

    for module in MODULES:
        assert cycle_from(module, []) is None, " -> ".join(cycle_from(module, []))
    readers = graph["sample"] | graph["export"]
    assert "train" not in readers, "readers of checkpoints do not load the training code"


SCRIPTS = {"prepare", "export", "sample", "bench", "eval", "bench_nanogpt", "bench_prepare", "sft",
           "chat", "dpo"}


def test_scripts_are_leaves():
    """What scripts share lives in library modules named for what they hold (tokenizer.py,
    dataset.py, files.py, huggingface.py, checkpoint.py, ...): no module imports a script. The one
    exception is bench_prepare.py, a benchmark of prepare.py's own pipeline."""
    importers = {module: imports_of(module) & SCRIPTS for module in MODULES}
    importers = {module: found for module, found in importers.items() if found}
    assert importers == {"bench_prepare": {"prepare"}}


def test_the_default_schedule_is_the_guides_warm_up_then_cosine():
    cfg = TrainConfig()
    assert (cfg.schedule, cfg.warmup_iterations) == ("cosine", 20)
    lr = Scheduler(None, cfg.schedule, 121, cfg.warmup_iterations, cfg.max_lr, cfg.min_lr).lr_at
    # a straight line up
    assert [lr(s) for s in (0, 19)] == pytest.approx([cfg.max_lr / 20, cfg.max_lr])
    # a quarter down
    assert lr(45) == pytest.approx(cfg.min_lr + (cfg.max_lr - cfg.min_lr) * (1 + 2**-0.5) / 2)
    # halfway through the decay: the mean
    assert lr(70) == pytest.approx((cfg.max_lr + cfg.min_lr) / 2)
    assert lr(120) == pytest.approx(cfg.min_lr)
