"""The processes a test starts, found and stopped (torchrun runs each rank in a session of its own, so killing the
launcher alone would leave its ranks running), and a port for them to meet on."""
import os
import shlex
import signal
import socket
import subprocess
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below pid, from Linux's /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if parent == pid:
            children.append(int(stat.parent.name))
    return children + [d for c in children for d in descendants(c)]


def alive(pid: int) -> bool:
    """True while pid runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(pid: int):
    """SIGKILL pid and everything below it; the children are listed first, before they lose their parent."""
    for victim in [*descendants(pid), pid]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def communicate(proc, timeout: float) -> tuple[str, str]:
    """proc.communicate(), except that a process still running after `timeout` seconds (a hang) is killed, with every
    process it started, and fails the test."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"{shlex.join(map(str, proc.args))} was still running after {timeout} s; killed it:\n"
                             f"{out}\n{err}") from None


def free_port() -> int:
    """A TCP port no process listens on now: the OS picks an unused one, and it stays free once released unless
    another process happens to bind that very port in the moment before the test's processes do."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
