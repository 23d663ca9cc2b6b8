"""Every script answers --help (or -h) with each of its settings: type, default and the comment
beside it in the source, and exits 0."""
import dataclasses
import os
import subprocess
import sys

import pytest
from helpers import ROOT, run

import bench
import bench_nanogpt
import bench_prepare
import chat
import dpo
import export
import prepare
import sample
import sft
import train
from configurator import field_comments


@pytest.mark.parametrize("script, flag, shown", [
    ("train.py", "--help",
     "  --compile: bool | str = 'auto'  # torch.compile the model; auto: when the run is long"),
    ("train.py", "-h", "  --training_tokens: int = 2_000_000  # the run's length in tokens"),
    ("prepare.py", "--help", "  --vocab_size: int = 8192  # bpe only; counts <|endoftext|>"),
    ("sample.py", "--help", "  --top_p: float = 0.9  # 1.0 = no nucleus cut"),
    ("chat.py", "--help", "  --prompt: str = ''  # answer this one message and exit (for scripts)"),
    ("sft.py", "--help", "  --overlong: str = 'cut'  # a conversation longer than max_seq_len"),
    ("export.py", "--help",
     "  --format: str = 'hf'  # hf: a Hugging Face model directory; gguf: one file for"),
    # train.py's settings in dpo.py's, with the comments train.py gives them
    ("dpo.py", "--help", "  --grad_clip: float = 1.0  # clip the global gradient norm to this"),
])
def test_help_lists_every_setting_with_type_default_and_comment(script, flag, shown):
    result = run(script, "--n_layers=2", flag)  # --help wins over anything else on the command line
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(f"usage: python {script} ")
    assert shown in result.stdout
    assert "user_set" not in result.stdout  # filled in by the configurator, not a setting


def test_bench_help_shows_its_own_options_and_then_the_training_config():
    out = run("bench.py", "--help").stdout
    own, training = out.split("\nTrainConfig:")
    assert "BenchOptions: bench.py's own options" in own
    assert "  --steps: int = 10  # timed optimizer updates (the median is reported)" in own
    assert "  --batch_size: int = 16  # sequences per micro-step per rank" in training


@pytest.mark.parametrize("cls",
                         [train.TrainConfig, prepare.PrepareConfig, sample.SampleConfig,
                          export.ExportConfig, dpo.DPOConfig,
                                 bench.BenchOptions, bench_nanogpt.NanoGPTBenchConfig,
                                 bench_prepare.PrepareBenchConfig, sft.SFTOptions,
                                 chat.ChatConfig])
def test_every_setting_has_a_one_line_comment(cls):
    comments = field_comments(cls)
    assert set(comments) == {f.name for f in dataclasses.fields(cls)}
    assert [name for name, comment in comments.items() if not comment and name != "user_set"] == []


def test_help_read_in_part_ends_quietly():
    # `--help | head -3`: head closes the pipe after three lines. Here the pipe is closed before the
    # script writes at all, the earliest a reader can stop: the script still exits 0, with no
    # BrokenPipeError traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")
