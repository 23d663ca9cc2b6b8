"""Nothing is lost on a crash or preemption, and every mistake a user can make is one clear
error."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    ROOT,
    TINY,
    RunsCode,
    alive,
    assert_same_weights,
    communicate,
    descendants,
    final_weights,
    kill_tree,
    run,
)

import train
from checkpoint import checkpoint_paths
from configurator import UserError


def tiny(shakespeare_dir, ckpt_dir, *extra) -> list[str]:
    return [*TINY, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={ckpt_dir}", *extra]


# --- user errors: exit status 2, one line, nothing overwritten ------------------------------------
def test_a_user_error_is_one_line_on_stderr_with_exit_status_2(tmp_path):
    result = run("train.py", "--n_layer=2", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown config key 'n_layer' in the "
                                                  "command line; did you mean n_layers or min_lr?"]


@pytest.mark.parametrize("extra, message", [
    (["--n_embd=30", "--n_heads=4"], "not divisible by n_heads"),
    (["--n_embd=36", "--n_heads=4"], "must be even"),
    (["--n_heads=2", "--n_kv_heads=3", "--n_embd=32"], "not a multiple of n_kv_heads"),
    (["--tokens_per_update=100"], "not a multiple of batch_size"),
    (["--max_seq_len=1048576", "--tokens_per_update=2097152", "--training_tokens=2097152"],
     "lower batch_size or max_seq_len"),
    (["--device=cuda"], "sees no CUDA GPU"),
])
def test_impossible_settings_are_refused_before_anything_is_written(
        shakespeare_dir, tmp_path, extra, message):
    argv = tiny(shakespeare_dir, tmp_path / "out", *extra)
    if torch.cuda.is_available() and extra == ["--device=cuda"]:
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match=message):
        train.main(argv)
    assert not (tmp_path / "out").exists()


def test_missing_or_empty_dataset_dir_points_at_prepare(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(UserError, match="prepare.py"):
            train.main([*TINY, f"--dataset_dir={path}", f"--ckpt_dir={tmp_path / 'out'}"])


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints(shakespeare_dir, tiny_run):
    before = {p: p.stat().st_mtime_ns for p in checkpoint_paths(tiny_run)}
    with pytest.raises(UserError, match="already holds checkpoints"):
        train.main(tiny(shakespeare_dir, tiny_run))
    assert {p: p.stat().st_mtime_ns for p in checkpoint_paths(tiny_run)} == before


def test_resuming_with_another_architecture_is_refused(shakespeare_dir, tiny_run, tmp_path):
    ckpt = shutil.copytree(tiny_run, tmp_path / "copy")
    with pytest.raises(UserError, match="n_layers=1 but the config says 2"):
        train.main(tiny(shakespeare_dir, ckpt, "--n_layers=2", "--load_ckpt=True"))


def test_resuming_with_another_optimizer_is_refused(shakespeare_dir, tiny_run, tmp_path):
    ckpt = shutil.copytree(tiny_run, tmp_path / "copy")  # tiny_run with the default, Muon
    with pytest.raises(UserError, match="does not fit --optimizer=adamw"):
        train.main(tiny(shakespeare_dir, ckpt, "--optimizer=adamw", "--load_ckpt=True"))


def test_resuming_on_another_tokenizers_data_is_refused(tiny_run, tmp_path):
    import prepare

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of another corpus, with words\n" for i in range(3000)))
    prepare.main([f"--input={corpus}", f"--out_dir={tmp_path / 'other'}", "--vocab_size=300"])
    ckpt = shutil.copytree(tiny_run, tmp_path / "copy")
    with pytest.raises(UserError, match="another tokenizer"):
        train.main([*TINY, f"--dataset_dir={tmp_path / 'other'}", f"--ckpt_dir={ckpt}",
                    "--load_ckpt=True"])


def test_resume_without_a_checkpoint_and_sample_without_one(shakespeare_dir, tmp_path):
    with pytest.raises(UserError, match="holds no checkpoint"):
        train.main(tiny(shakespeare_dir, tmp_path, "--load_ckpt=True"))
    result = run("sample.py", f"--ckpt_dir={tmp_path}", check=False)
    assert result.returncode == 2 and "no checkpoint in" in result.stderr


def test_a_checkpoint_carrying_code_is_refused_and_never_run(shakespeare_dir, tmp_path):
    marker = tmp_path / "pwned"
    ckpt_dir = tmp_path / "out"
    ckpt_dir.mkdir()
    torch.save({"model": RunsCode(marker)}, ckpt_dir / "ckpt_00000001.pt")
    with pytest.raises(UserError, match="arbitrary Python objects"):
        train.main(tiny(shakespeare_dir, ckpt_dir, "--load_ckpt=True"))
    assert not marker.exists()


# --- torch.compile where it cannot build ----------------------------------------------------------
# the C++ compiler inductor builds with on a CPU: a program not there
NO_COMPILER = {"CXX": "/nonexistent/g++"}


def test_an_explicit_compile_that_cannot_build_is_one_line_naming_compile_false(
        shakespeare_dir, tmp_path):
    result = run("train.py", *tiny(shakespeare_dir, tmp_path, "--compile=True"), check=False,
                 env=os.environ | NO_COMPILER)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: --compile=True but torch.compile cannot build code on this "
                           "machine (InvalidCxxCompiler: No working C++ compiler found in "
                           "torch._inductor.config.cpp.cxx: (None, '/nonexistent/g++')); ")
    assert line.endswith("or pass --compile=False") and not checkpoint_paths(tmp_path)


def test_compile_auto_that_cannot_build_trains_eager_and_says_why(shakespeare_dir, tmp_path):
    # 200,000 updates would take minutes eager, so compile=auto wants to compile. Stopped after a
    # few updates.
    argv = tiny(shakespeare_dir, tmp_path, "--training_tokens=25_600_000", "--compile=auto")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | NO_COMPILER)
    start_up = proc.stdout.readline()
    for line in proc.stdout:
        if line.startswith("update 1/"):  # the loop has begun: SIGTERM stops it
            proc.send_signal(signal.SIGTERM)
            break
    out, err = communicate(proc, timeout=120)
    assert proc.returncode == 0 and "stopped by signal" in out, err
    assert start_up.rstrip().endswith("| cpu float32 | auto: compile: no, torch.compile cannot "
                                      "build code here "
                                      "(InvalidCxxCompiler: No working C++ compiler found in "
                                      "torch._inductor.config.cpp.cxx: (None, '/nonexistent/g++'))")
    assert torch.load(checkpoint_paths(tmp_path)[-1],
                      weights_only=True)["config"]["compile"] is False


# --- crashes, preemption, divergence --------------------------------------------------------------
def test_a_diverging_run_stops_naming_the_update_and_saves_nothing_bad(shakespeare_dir, tmp_path):
    result = run("train.py",
                 *tiny(shakespeare_dir, tmp_path, "--max_lr=1e30", "--warmup_iterations=1",
                                   "--training_tokens=2560", "--token_ckpt=128"), check=False)
    assert result.returncode == 1
    assert "non-finite loss" in result.stderr and "at update" in result.stderr
    for path in checkpoint_paths(tmp_path):
        weights = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values()), path


@pytest.mark.parametrize("launcher",
                         [[],
                          ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]],
                         ids=["python", "torchrun"])
def test_sigterm_finishes_the_update_saves_and_exits_cleanly(shakespeare_dir, tmp_path, launcher):
    argv = tiny(shakespeare_dir, tmp_path, "--training_tokens=10_000_000")
    # A new session makes the job its own process group, which is what a cluster scheduler or Ctrl-C
    # signals.
    proc = subprocess.Popen([sys.executable, *launcher, "train.py", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("update 3/"):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    out, err = communicate(proc, timeout=60)
    assert "stopped by signal" in out, err
    if not launcher:
        assert proc.returncode == 0, err
    else:  # torchrun reports the signal it got with a traceback of its own; the ranks must not fail
        assert "train.py" not in err and "ChildFailedError" not in err, err
    step = torch.load(checkpoint_paths(tmp_path)[-1], weights_only=True)["step"]
    assert step >= 3


def test_when_torchrun_returns_every_rank_has_exited(shakespeare_dir, tmp_path):
    # A rank that hangs while tearing down its process group keeps torchrun waiting forever; a hang
    # here fails the test after the timeout, with every process killed.
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2",
                                 "train.py",
                                 *tiny(shakespeare_dir, tmp_path / "run", "--training_tokens=768")],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    ranks, deadline = set(), time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        ranks.update(descendants(proc.pid))  # collected while they run: an orphan loses its parent
        time.sleep(0.1)
    if proc.poll() is None:
        kill_tree(proc.pid)
        raise AssertionError("torchrun was still running after 180 "
                             f"s:\n{(tmp_path / 'out.txt').read_text()}")
    assert proc.returncode == 0, (tmp_path / "out.txt").read_text()
    assert len(ranks) >= 2 and not [pid for pid in ranks if alive(pid)]


def test_kill_9_at_random_moments_then_auto_resume_matches_an_uninterrupted_run(
        shakespeare_dir, tmp_path):
    args = [*TINY, f"--dataset_dir={shakespeare_dir}", "--training_tokens=3840",
            # 30 updates, a checkpoint every 3
            "--token_ckpt=384", "--keep_ckpts=2", "--load_ckpt=auto"]
    run("train.py", *args, f"--ckpt_dir={tmp_path / 'straight'}")
    rng = random.Random(0)
    for _kill in range(2):  # two runs killed at random moments, then one left to finish
        proc = subprocess.Popen([sys.executable, "train.py", *args,
                                 f"--ckpt_dir={tmp_path / 'killed'}"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 8.0))
        # SIGKILL: no handler runs, whatever the process was doing (maybe writing a checkpoint)
        proc.kill()
        proc.wait()
    run("train.py", *args, f"--ckpt_dir={tmp_path / 'killed'}")
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"))
    # a torn temp file is rewritten when its update returns
    assert not list((tmp_path / "killed").glob("*.tmp"))
