"""Faults of the machine or of a second process: a full disk, damaged files, two runs in one
directory.

Each ends in one line naming the file or the process and what to do, never in a traceback, and never
costs a checkpoint that was already saved. A full disk is simulated without root in two ways: a
file-size limit (`ulimit -f`, with SIGXFSZ ignored) on a subprocess, so that the kernel itself
refuses the write and the real writers (torch.save's zip writer, numpy) raise what they raise on a
full disk; or, in this process, an `open` whose writes fail with ENOSPC once a given number of bytes
has gone to a given file name.
"""
import errno
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, TINY, assert_same_weights, communicate, final_weights, one_line, run

import checkpoint
import files
import prepare
import train
import training_log
from checkpoint import checkpoint_paths
from configurator import UserError
from tokenizer import load_tokenizer

FIX = ("free space on that disk (or lower --keep_ckpts), then resume with --load_ckpt=auto: the "
       "checkpoints saved before are intact")
REBUILD = ("rebuild the dataset with `python prepare.py --overwrite` and the options it was made "
           "with")
# a lock names its holder's machine: on a shared filesystem it may be another node
HOST = socket.gethostname()


def args(shakespeare_dir, ckpt_dir, *extra) -> list[str]:
    """Six updates, a checkpoint every two: ckpt_00000002.pt, ckpt_00000004.pt, ckpt_00000006.pt."""
    return [*TINY, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={ckpt_dir}",
            "--training_tokens=768",
            "--token_ckpt=256", "--keep_ckpts=5", "--load_ckpt=auto", *extra]


def first_checkpoint_of(tiny_run, tmp_path) -> Path:
    """A run directory holding only tiny_run's first checkpoint (and its whole log): as if the run
    had stopped after update 2."""
    ckpt = shutil.copytree(tiny_run, tmp_path / "run")
    for path in checkpoint_paths(ckpt)[1:]:
        path.unlink()
    return ckpt


def file_size_limit(limit: int):
    """For preexec_fn: the kernel refuses to grow any file past `limit` bytes, as a full disk
    would."""
    def apply():
        # else the process is killed instead of getting EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


class FullDisk:
    """A file on a disk with `room` bytes left: a write that does not fit writes what fits, then
    fails."""

    def __init__(self, file, disk):
        self.file, self.disk = file, disk

    def write(self, data):
        fits = data[:self.disk["room"]]
        self.file.write(fits)
        self.disk["room"] -= len(fits)
        if len(fits) < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(name, room): writes to files called `name` (through the open of files.py,
    prepare.py, train.py, training_log.py and checkpoint.py) fail with ENOSPC once `room` bytes in
    all have gone to them."""
    def fill(name: str, room: int):
        disk = {"room": room}

        def open_on_full_disk(path, mode="r", *args, **kwargs):
            file = open(path, mode, *args, **kwargs)
            full = Path(path).name == name and set(mode) & set("wax")
            return FullDisk(file, disk) if full else file

        for module in (files, prepare, train, training_log, checkpoint):
            monkeypatch.setattr(module, "open", open_on_full_disk, raising=False)
    return fill


# --- a full disk ----------------------------------------------------------------------------------
def test_disk_full_while_saving_a_checkpoint_keeps_the_earlier_ones_and_resumes_bitwise(
        shakespeare_dir, tiny_run, tmp_path):
    ckpt = first_checkpoint_of(tiny_run, tmp_path)
    before = (ckpt / "ckpt_00000002.pt").read_bytes()
    # A checkpoint of the tiny model is 6.4 MB (weights, AdamW's two moments for the embedding and
    # head, Muon's one momentum for the block's matrices): at update 4, resumed from update 2, it no
    # longer fits.
    result = subprocess.run([sys.executable, "train.py", *args(shakespeare_dir, ckpt)], cwd=ROOT,
                            capture_output=True,
                            text=True, preexec_fn=file_size_limit(1_000_000))
    assert result.returncode == 2
    assert re.fullmatch(rf"error: could not write {ckpt}/ckpt_00000004\.pt\.tmp \(disk full\): it "
                        r"needs about "
                        rf"6\.4 MB and [0-9.]+ [kMGT]?B is free; {re.escape(FIX)}",
                        one_line(result.stderr))
    assert sorted(
        p.name
        for p in ckpt.glob("ckpt_*")) == ["ckpt_00000002.pt"], "no partial .tmp holds the space"
    assert (ckpt / "ckpt_00000002.pt").read_bytes() == before
    run("train.py", *args(shakespeare_dir, ckpt))
    assert_same_weights(final_weights(tiny_run), final_weights(ckpt))


def test_disk_full_while_saving_a_sharded_checkpoint_is_one_line_and_leaves_no_partial_shards(
        shakespeare_dir, tmp_path):
    # Each of the two FSDP ranks writes its half of the 6.4 MB checkpoint; neither half fits under
    # the limit.
    result = run("-m torch.distributed.run --standalone --nproc_per_node=2 train.py",
                 *args(shakespeare_dir, tmp_path, "--fsdp=True"), check=False, timeout=300,
                 preexec_fn=file_size_limit(1_000_000))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # torchrun adds only its exit report
    assert len(errors) == 1 and "[rank" not in result.stderr, result.stderr
    assert re.fullmatch(rf"error: could not write {tmp_path}/ckpt_00000002\.tmp \(disk full\): it "
                        r"needs about "
                        rf"6\.4 MB and [0-9.]+ [kMGT]?B is free; {re.escape(FIX)}", errors[0])
    assert "exitcode  : 2" in result.stderr and not list(
        tmp_path.glob("ckpt_*")), "no partial shards hold the space"


def test_disk_full_while_logging_cuts_the_log_back_to_whole_rows(
        shakespeare_dir, tiny_run, tmp_path, full_disk):
    ckpt = first_checkpoint_of(tiny_run, tmp_path)
    header_and_two_rows = (ckpt / "log.csv").read_text().splitlines()[:3]
    full_disk("log.csv", room=100)  # update 3's row fits, update 4's does not
    with pytest.raises(UserError) as error:
        train.main(args(shakespeare_dir, ckpt))
    assert re.fullmatch(rf"could not write {ckpt}/log\.csv \(No space left on device\): it needs "
                        r"about \d+ B and "
                        rf"[0-9.]+ [kMGT]?B is free; {re.escape(FIX)}", str(error.value))
    rows = (ckpt / "log.csv").read_text().splitlines()
    assert rows[:3] == header_and_two_rows and [row.split(",")[0] for row in rows[1:]] == ["1", "2",
                                                                                           "3"]
    # the save at 4 never came
    assert [p.name for p in checkpoint_paths(ckpt)] == ["ckpt_00000002.pt"]
    full_disk("log.csv", room=10**9)
    train.main(args(shakespeare_dir, ckpt))
    assert_same_weights(final_weights(tiny_run), final_weights(ckpt))
    assert [row.split(",")[0]
            for row in (ckpt / "log.csv").read_text().splitlines()[1:]] == list("123456")


def test_disk_full_while_drawing_the_plot_leaves_no_partial_png(tiny_run, tmp_path, full_disk):
    full_disk("loss.png.tmp", room=1000)
    with pytest.raises(UserError, match=rf"could not write {tmp_path}/loss\.png\.tmp \(No space "
                       r"left on device\): "
                                        r"it needs about [0-9.]+ kB and [0-9.]+ [kMGT]?B is free; "
                       rf"{re.escape(FIX)}"):
        # what the end of a run does
        training_log.plot_log(tiny_run / "log.csv", tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(free=3000))
    # 4,000 bytes of tensor, 512 of zip records
    state = {"model": {"w": torch.zeros(1000)}, "step": 1}
    with pytest.raises(UserError,
                       match=re.escape("could not write "
                                       f"{tmp_path}/ckpt_00000001.pt.tmp (not enough free "
                                                  "space, checked before writing): it needs about "
                                                  "4.5 kB and 3.0 kB "
                                                  "is free; free space")):
        checkpoint.save_checkpoint(str(tmp_path), 1, state, keep=1)
    assert list(tmp_path.iterdir()) == []


def write_corpus(path: Path) -> Path:
    path.write_text("".join(list(prepare.shakespeare_documents())[:4]))
    return path


def test_disk_full_while_prepare_writes_shards_keeps_the_old_dataset(shakespeare_dir, tmp_path):
    corpus = write_corpus(tmp_path / "plays.txt")
    out = tmp_path / "data"
    prepare.main([f"--input={corpus}", f"--out_dir={out}", f"--tokenizer={shakespeare_dir}",
                  "--val_fraction=0.5"])
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    # The training shard is 113k tokens (226 kB as uint16); the tokenizer file (116 kB) still fits.
    # The shard is written through Python's file, which reports the kernel's EFBIG as it is: "File
    # too large". The space it needs is an estimate made before writing (see
    # prepare.tokens_to_come): 251 kB, counting the validation tokens to come.
    result = subprocess.run([sys.executable, str(ROOT / "prepare.py"), f"--input={corpus}",
                             f"--out_dir={out}",
                             f"--tokenizer={shakespeare_dir}", "--overwrite"], cwd=tmp_path,
                            capture_output=True,
                            text=True, preexec_fn=file_size_limit(200_000))
    assert result.returncode == 2
    assert re.fullmatch(rf"error: could not write {tmp_path}/\.data\.\w+\.tmp/train_000000\.npy "
                        r"\(File too large\): "
                        r"it needs about 2\d\d\.\d kB and [0-9.]+ [kMGT]?B is free; free space on "
                        r"that disk or choose "
                        r"an --out_dir on another; no dataset was changed", one_line(result.stderr))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", "data",
                                                          "plays.txt"], "no temporary dirs"


@pytest.mark.parametrize("name", ["train_000000.npy", "tokenizer.tiktoken.tmp", "meta.json.tmp"])
def test_disk_full_while_prepare_writes_a_shard_the_tokenizer_or_meta(
        shakespeare_dir, tmp_path, full_disk, name):
    corpus = write_corpus(tmp_path / "plays.txt")
    full_disk(name, room=50)
    with pytest.raises(UserError, match=r"could not write "
                       rf"{tmp_path}/\.data\.\w+\.tmp/{re.escape(name)} \(No space "
                                        r"left on device\): it needs about [0-9.]+ [kB]+ and"):
        prepare.main([f"--input={corpus}", f"--out_dir={tmp_path / 'data'}",
                      f"--tokenizer={shakespeare_dir}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", "plays.txt"]


# --- damaged files --------------------------------------------------------------------------------
@pytest.fixture
def dataset_copy(shakespeare_dir, tmp_path) -> Path:
    return Path(shutil.copytree(shakespeare_dir, tmp_path / "data"))


def test_a_truncated_shard_is_named_with_the_fix(dataset_copy, tmp_path):
    shard = dataset_copy / "train_000000.npy"
    os.truncate(shard, shard.stat().st_size // 2)  # an interrupted copy
    result = run("train.py", *TINY, f"--dataset_dir={dataset_copy}",
                 f"--ckpt_dir={tmp_path / 'out'}", check=False)
    assert result.returncode == 2
    assert one_line(result.stderr) == (f"error: {shard} is damaged or unreadable (ValueError: mmap "
                                       f"length is greater than file size); {REBUILD}")


@pytest.mark.parametrize("text, reason", [
    ('{"vocab_size": 8192, "tokeni',
     "JSONDecodeError: Unterminated string starting at: line 1 column 22 (char 21)"),
    # meta.json is read whole, once: every field the format has is checked
    ('{"vocab_size": 8192}', "ValueError: no tokenizer, pattern, special_tokens, dtype, "
                             "train_tokens, val_tokens, train_bytes, val_bytes, shards"),
    ("", "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"),
])
def test_a_damaged_meta_json_is_not_called_unprepared(dataset_copy, tmp_path, text, reason):
    corpus = write_corpus(tmp_path / "plays.txt")
    (dataset_copy / "meta.json").write_text(text)
    message = f"{dataset_copy}/meta.json is damaged or unreadable ({reason}); {REBUILD}"
    with pytest.raises(UserError, match=re.escape(message)):
        train.main([*TINY, f"--dataset_dir={dataset_copy}", f"--ckpt_dir={tmp_path / 'out'}"])
    # prepare.py --tokenizer=DIR reads it the same way
    with pytest.raises(UserError, match=re.escape(message)):
        prepare.main([f"--input={corpus}", f"--out_dir={tmp_path / 'new'}",
                      f"--tokenizer={dataset_copy}"])


@pytest.mark.parametrize("cut, reason", [
    (lambda data: b"".join(data.splitlines(keepends=True)[:100]),
     "ValueError: 105 tokens, meta.json says 8192"),
    # cut inside a line
    (lambda data: data[:50_000], "ValueError: 3865 tokens, meta.json says 8192"),
    (lambda data: b"\x00\xff garbage \x01\n" + data,
     "ValueError: too many values to unpack (expected 2)"),
])
def test_an_unreadable_tokenizer_file_is_named_with_the_fix(dataset_copy, cut, reason):
    ranks = dataset_copy / "tokenizer.tiktoken"
    ranks.write_bytes(cut(ranks.read_bytes()))
    with pytest.raises(UserError,
                       match=re.escape(f"{ranks} is damaged or unreadable ({reason}); {REBUILD}")):
        load_tokenizer(dataset_copy)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(
        shakespeare_dir, tiny_run, tmp_path, capsys):
    ckpt = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (ckpt / "ckpt_00000006.pt").unlink()
    newest = ckpt / "ckpt_00000004.pt"
    # renamed into place, then cut short by a disk fault
    os.truncate(newest, newest.stat().st_size - 100)
    train.main(args(shakespeare_dir, ckpt))
    err = capsys.readouterr().err
    assert err.splitlines() == [f"warning: {newest} cannot be loaded (damaged or unsafe), renamed "
                                "it to ckpt_00000004.pt.damaged; resuming from the previous "
                                f"checkpoint {ckpt}/ckpt_00000002.pt"]
    assert_same_weights(final_weights(tiny_run), final_weights(ckpt))
    assert (ckpt / "ckpt_00000004.pt.damaged").exists()  # kept for a look, but no longer the newest


def test_sample_py_skips_a_damaged_newest_checkpoint_and_leaves_it_in_place(tiny_run, tmp_path):
    ckpt = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    newest = ckpt / "ckpt_00000006.pt"
    os.truncate(newest, newest.stat().st_size - 100)
    result = run("sample.py", f"--ckpt_dir={ckpt}", "--max_new_tokens=5")
    assert result.stderr.splitlines() == [f"warning: {newest} cannot be loaded (damaged or "
                                          f"unsafe); sampling from {ckpt}/ckpt_00000004.pt"]
    assert result.stdout.startswith(f"# {ckpt}/ckpt_00000004.pt (update 4,")
    assert checkpoint_paths(
        ckpt)[-1] == newest, "sampling only reads: training renames a damaged checkpoint"


# --- two processes in one directory ---------------------------------------------------------------
def test_two_runs_started_on_one_ckpt_dir_exactly_one_runs(shakespeare_dir, tmp_path):
    argv = [sys.executable, "train.py", *TINY, f"--dataset_dir={shakespeare_dir}",
            f"--ckpt_dir={tmp_path}",
            "--training_tokens=10_000_000"]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for _ in range(2)]
    deadline = time.time() + 60
    while all(proc.poll() is None for proc in procs) and time.time() < deadline:
        # the one that cannot take the lock exits at once; the other trains on until stopped
        time.sleep(0.2)
    refused = next(proc for proc in procs if proc.poll() is not None)
    running = next(proc for proc in procs if proc is not refused)
    _, err = refused.communicate()
    assert refused.returncode == 2 and running.poll() is None
    assert re.fullmatch(rf"error: {tmp_path} is in use by process {running.pid} on {HOST} "
                        r"\(python[0-9.]* train\.py "
                        r".*\); wait for that run to end or stop it, or pass another --ckpt_dir",
                        one_line(err))
    seen = ""
    # the run is in its loop, where a SIGTERM stops it cleanly, once it reports an update
    for line in running.stdout:
        seen += line
        if line.startswith("update "):
            break
    running.send_signal(signal.SIGTERM)
    out, err = communicate(running, timeout=60)
    assert running.returncode == 0 and "stopped by signal" in seen + out, err
    # the report card says where it stopped
    last = (tmp_path / "log.csv").read_text().splitlines()[-1].split(",")[0]
    card = (tmp_path / "report.md").read_text()
    assert f"the run stopped by a signal after update {last}." in card


def test_under_torchrun_every_rank_stops_when_the_ckpt_dir_is_taken(shakespeare_dir, tmp_path):
    # this test process plays the first run
    lock = files.lock_directory(tmp_path / ".lock", "x", "")
    try:
        result = run("-m torch.distributed.run --standalone --nproc_per_node=2 train.py", *TINY,
                     f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}", check=False,
                     timeout=120)
    finally:
        lock.close()
    assert result.returncode != 0 and not list(tmp_path.glob("ckpt_*"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr  # rank 0 says why; rank 1 stops without a word
    assert errors[0].startswith(f"error: {tmp_path} is in use by process {os.getpid()} on {HOST} (")
    assert errors[0].endswith("); wait for that run to end or stop it, or pass another --ckpt_dir")


def test_on_a_filesystem_without_locks_a_run_warns_once_and_trains(
        shakespeare_dir, tmp_path, monkeypatch, capsys):
    def no_locks(file, operation):  # what flock answers on Lustre mounted without -o flock
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    train.main([*TINY, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}",
                "--training_tokens=256"])
    assert capsys.readouterr().err == (f"warning: {tmp_path} is on a filesystem without file locks "
                                       "(Function not implemented); nothing stops a second run "
                                       "from using it at the same time\n")
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt_00000002.pt"]


def test_a_second_prepare_on_one_out_dir_stops_naming_the_first(shakespeare_dir, tmp_path):
    corpus = write_corpus(tmp_path / "plays.txt")
    # this test process plays the first prepare
    lock = files.lock_directory(tmp_path / ".data.lock", "x", "")
    command = [sys.executable, str(ROOT / "prepare.py"), f"--input={corpus}",
               f"--out_dir={tmp_path / 'data'}",
               f"--tokenizer={shakespeare_dir}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"error: {tmp_path / 'data'} is in use by process "
                                              f"{os.getpid()} on {HOST} (")
    assert not (tmp_path / "data").exists()
    lock.close()  # the first one finished: now the second one runs
    subprocess.run(command, cwd=tmp_path, capture_output=True, check=True)
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["vocab_size"] == 8192
