"""One run on several machines, played by two torchrun agents on this one: each is started as a node
of its own would be (a session of its own, its own working directory and temporary directory), and
they meet through torchrun's c10d rendezvous. Their run computes what a one-machine run on as many
ranks computes, checkpoints and resumes; ranks that see different files stop before training with
one line; a node that never joins ends the job in the rendezvous timeout."""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time

import pytest
from helpers import (
    PEAK_LR,
    ROOT,
    TINY_384,
    assert_same_curve,
    assert_same_weights,
    final_weights,
    free_port,
    kill_tree,
    logged,
    torchrun,
)

import multinode
from checkpoint import checkpoint_paths
from configurator import UserError, run_cli
from preflight import drift_tolerance

HOST = socket.gethostname()
# A checkpoint every 4 updates of 384 tokens, a constant learning rate: a run resumed with more
# training_tokens follows the schedule of one that was given them from the start.
ARGS = [*TINY_384, "--schedule=constant", "--token_ckpt=1536"]
FOUR, EIGHT = "--training_tokens=1536", "--training_tokens=3072"
RENDEZVOUS_ERROR = "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError"


def agents(tmp_path, *per_node: list[str], nnodes: int = 2, join_timeout: int = 120,
           timeout: float = 300):
    """Start one torchrun agent per list of arguments, all at once, on the c10d rendezvous at a free
    port of this machine, and wait for all of them. Node n works in tmp_path/node<n>/work with
    TMPDIR tmp_path/node<n>/tmp.
    Returns each agent's (exit status, stdout, stderr) and the seconds until the last one ended;
    agents still running after `timeout` seconds are killed, with all they started, and fail the
    test."""
    rendezvous = ["--nnodes", str(nnodes), "--nproc_per_node=1", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint=127.0.0.1:{free_port()}", f"--rdzv_id={secrets.token_hex(4)}",
                  f"--rdzv_conf=join_timeout={join_timeout}"]
    procs, start = [], time.time()
    for node, args in enumerate(per_node):
        home = tmp_path / f"node{node}"
        for sub in ("work", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        # no pipe to fill up and block
        with open(home / "stdout", "w") as out, open(home / "stderr", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                                           *rendezvous,
                                           str(ROOT / "train.py"), *args], cwd=home / "work",
                                          stdout=out, stderr=err,
                                          env=os.environ | {"TMPDIR": str(home / "tmp")},
                                          start_new_session=True))
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, start + timeout - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                kill_tree(p.pid)
            logs = [(tmp_path / f"node{n}" / "stderr").read_text() for n in range(len(procs))]
            raise AssertionError(f"the agents were still running after {timeout} s; killed "
                                 f"them:\n{logs}") from None
    seconds = time.time() - start
    results = [(p.returncode,
                *((tmp_path / f"node{n}" / f).read_text() for f in ("stdout", "stderr")))
               for n, p in enumerate(procs)]
    print(f"{len(procs)} agents ended after {seconds:.1f} s")
    return results, seconds


def errors(results) -> list[str]:
    return [line for _, _,
            err in results for line in err.splitlines() if line.startswith("error: ")]


# --- a run on two nodes ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_nodes_train_checkpoint_and_resume_as_one_machine_with_two_ranks(
        shakespeare_dir, tmp_path, mode):
    args = [*ARGS, f"--dataset_dir={shakespeare_dir}", f"--fsdp={mode == 'fsdp'}"]
    one_machine, shared = tmp_path / "one_machine", tmp_path / "shared"
    # torchrun --standalone --nproc_per_node=2
    torchrun(2, *args, f"--ckpt_dir={one_machine}", EIGHT)
    started = time.time()
    # 4 updates, then 4 more from the checkpoint after update 4
    for extra in ([FOUR], [EIGHT, "--load_ckpt=True"]):
        results, _ = agents(tmp_path, *[[*args, f"--ckpt_dir={shared}", *extra]] * 2)
        assert [status for status, _, _ in results] == [0, 0], results
        printed = [out for _, out, _ in results if out]
        assert len(printed) == 1, results  # rank 0 alone prints, on whichever node it is
    print(f"two agents, two runs: {time.time() - started:.1f} s")
    assert "resumed from" in printed[0] and "at update 4" in printed[0]
    assert_same_curve(logged(one_machine), logged(shared), range(1, 9))
    assert_same_curve(logged(one_machine), logged(shared), range(1, 9), column="grad_norm")
    assert_same_curve(logged(one_machine), logged(shared), [4, 8], column="val_loss")
    assert_same_weights(final_weights(one_machine), final_weights(shared),
                        atol=drift_tolerance(PEAK_LR, 8))
    # the checkpoints, the log, the plot
    assert sorted(os.listdir(shared)) == sorted(os.listdir(one_machine))
    if mode == "fsdp":
        assert sorted(os.listdir(checkpoint_paths(shared)[-1])) == [".metadata", "__0_0.distcp",
                                                                    "__1_0.distcp",
                                                                   "train_state.pt"]
    for node in (0, 1):
        # nothing went to a node's own directory
        assert not os.listdir(tmp_path / f"node{node}" / "work")


# --- ranks that see different files ---------------------------------------------------------------
def test_nodes_with_a_ckpt_dir_each_stop_before_training_with_one_line(shakespeare_dir, tmp_path):
    # A relative ckpt_dir from each node's own working directory: a directory on each node's own
    # disk.
    args = [*ARGS, f"--dataset_dir={shakespeare_dir}", "--fsdp=True", "--ckpt_dir=out", FOUR]
    results, seconds = agents(tmp_path, args, args)
    # torchrun's status when a rank failed
    assert [status for status, _, _ in results] == [1, 1], results
    assert errors(results) == [f"error: rank 1 (on {HOST}) cannot see the files rank 0 (on {HOST}) "
                               "writes in out; "
                               "put ckpt_dir on a filesystem every node mounts"], results
    assert not any("update 1/" in out for _, out, _ in results)
    # Rank 0's ckpt_dir was made, and holds nothing: the file every rank had to read back is
    # removed.
    made = [os.listdir(d) for d in (tmp_path / "node0/work/out", tmp_path / "node1/work/out")
            if d.exists()]
    assert made == [[]]
    print(f"ckpt_dir on each node: ended after {seconds:.1f} s")


def test_nodes_with_different_copies_of_the_dataset_stop_before_training_with_one_line(
        shakespeare_dir, tmp_path):
    # Each node holds a copy in its own directory; node 1's copy of the training shard was cut
    # short.
    for node in (0, 1):
        shutil.copytree(shakespeare_dir, tmp_path / f"node{node}/work/data")
    shard = tmp_path / "node1/work/data/train_000000.npy"
    os.truncate(shard, shard.stat().st_size // 2)
    args = [*ARGS, "--dataset_dir=data", f"--ckpt_dir={tmp_path / 'shared'}", FOUR]
    results, seconds = agents(tmp_path, args, args)
    assert [status for status, _, _ in results] == [1, 1], results
    assert errors(results) == [f"error: data holds another dataset for rank 1 (on {HOST}) than for "
                               f"rank 0 (on {HOST}) (meta.json, the tokenizer or a shard's size "
                               f"differ); {multinode.DATASET_FIX}"]
    assert not (tmp_path / "shared").exists()  # refused before ckpt_dir was made
    print(f"datasets differ: ended after {seconds:.1f} s")


def test_which_ranks_see_otherwise_is_named_once_with_the_fix():
    hosts = ["a", "a", "b", "b"]
    fine = [("shared", ["ckpt_00000004.pt"])] * 4
    assert multinode.ckpt_dir_problem(fine, hosts, "out") == ""
    # A node whose network filesystem's cache hides the newest checkpoint from it would resume from
    # another one.
    stale = fine[:2] + [("shared", [])] * 2
    assert multinode.ckpt_dir_problem(stale, hosts, "out") == (
        "out lists other checkpoints for rank 2 (on b) and 1 more of the 4 ranks than for rank 0 "
                                                               "(on a); put ckpt_dir "
        "on a filesystem every node mounts")
    missing = [("dataset", "1f2e"), ("none", "data is not a prepared dataset ...")]
    assert multinode.dataset_problem(missing, ["a", "b"], "data") == (
        "rank 1 (on b) cannot find a prepared dataset at data, which rank 0 (on a) reads; "
                                                                      f"{multinode.DATASET_FIX}")
    assert multinode.dataset_problem(missing[::-1], ["b", "a"], "data").startswith(
        "rank 0 (on b) cannot find a prepared dataset at data, which rank 1 (on a) can read;")


@pytest.mark.parametrize("rank, local_rank, printed",
                         [("0", "0", True), ("1", "0", False), ("1", "1", False)])
def test_an_error_every_rank_agreed_on_is_printed_once_by_rank_0_not_once_per_node(
        monkeypatch, capsys, rank, local_rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)

    def main(argv):
        raise UserError("the ranks agreed", every_rank=True)

    with pytest.raises(SystemExit) as exit:
        run_cli(main)
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("error: the ranks agreed\n" if printed else "")


# --- a node that never joins ----------------------------------------------------------------------
def test_a_node_that_never_joins_ends_the_job_in_the_rendezvous_timeout(shakespeare_dir, tmp_path):
    # One agent of two: torchrun waits join_timeout seconds for the other, then ends with a
    # traceback of its own whose last line names the timeout. train.py never starts.
    args = [*ARGS, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path / 'shared'}", FOUR]
    results, seconds = agents(tmp_path, args, join_timeout=5, timeout=120)
    [(status, out, err)] = results
    assert status == 1 and out == "" and err.strip().splitlines()[-1] == RENDEZVOUS_ERROR, results
    assert not (tmp_path / "shared").exists()
    assert seconds < 5 + 60  # the timeout, plus starting Python and torch on a loaded machine
    print(f"a node that never joins: ended after {seconds:.1f} s")
