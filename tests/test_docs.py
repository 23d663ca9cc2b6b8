"""The commands README.md and docs/ show are commands the scripts accept: every --key they pass is
an option of the script they run, so the documentation cannot drift away from the code."""
import dataclasses
import re

import pytest
from helpers import ROOT

from bench import BenchOptions
from bench_prepare import PrepareBenchConfig
from chat import ChatConfig
from dpo import DPOConfig
from eval import EvalConfig
from export import ExportConfig
from prepare import PrepareConfig
from sample import SampleConfig
from sft import SFTOptions
from train import TrainConfig

OPTIONS = {"train.py": [TrainConfig], "prepare.py": [PrepareConfig], "sample.py": [SampleConfig],
           "export.py": [ExportConfig], "bench.py": [BenchOptions, TrainConfig],
           "bench_prepare.py": [PrepareBenchConfig], "eval.py": [EvalConfig],
           "sft.py": [SFTOptions, TrainConfig], "chat.py": [ChatConfig], "dpo.py": [DPOConfig]}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, script, the --key names it is given) for every `python x.py ...` or `torchrun ... x.py
    ...` shown."""
    commands = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")  # a command continued on the next line
        for match in re.finditer(r"\b(?:python|torchrun)\b[^\n`|]*", text):
            words = match.group(0).split()
            scripts = [i for i, word in enumerate(words) if word.endswith(".py")]
            # not tests/ or notebooks/ helpers, which take no --key=value
            if scripts and words[scripts[0]] in OPTIONS:
                options = [w[2:].split("=")[0] for w in words[scripts[0] + 1:]
                           if w.startswith("--")]
                commands.append((page.name, words[scripts[0]], options))
    return commands


def test_the_documentation_shows_every_script():
    shown = {script for _, script, _ in documented_commands()}
    assert {"train.py", "prepare.py", "sample.py", "export.py", "bench.py", "eval.py", "sft.py",
            "chat.py"} <= shown


@pytest.mark.parametrize("page, script, options", documented_commands())
def test_every_documented_option_is_one_the_script_accepts(page, script, options):
    accepted = {f.name for cls in OPTIONS[script]
                for f in dataclasses.fields(cls)} - {"user_set"} | {"help"}
    assert set(
        options) <= accepted, f"{page}: {script} has no option {sorted(set(options) - accepted)}"
