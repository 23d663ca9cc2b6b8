"""Writing files safely: a full disk, a damaged file or a second process in the same directory ends
in one line that names the fix, never in a traceback or a half-written file.

Every script writes through these: prepare.py its dataset, train.py its checkpoints and log,
export.py and eval.py their outputs. A new file is written under a temporary name and renamed into
place when complete (write_file, publish), so a reader never sees half of it and an existing one is
replaced only by a whole one.
"""
import contextlib
import errno
import fcntl
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

from configurator import UserError

# No space left, a file larger than the file system or `ulimit -f` allows, a disk quota used up.
FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
REBUILD = ("rebuild the dataset with `python prepare.py --overwrite` and the options it was made "
           "with")


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def is_full_disk(e: Exception) -> bool:
    """A full disk surfaces as an errno, as numpy's short-write OSError (no errno) or as a
    RuntimeError from the zip writer inside torch.save, which notices only that the file is shorter
    than what it wrote."""
    if isinstance(e, OSError):
        return e.errno in FULL_DISK or (e.errno is None and " requested and " in str(e))
    return isinstance(e,
                      RuntimeError) and ("unexpected pos" in str(e)
                                         or "file write failed" in str(e))


@contextlib.contextmanager
def space_for(path, needed: int, fix: str):
    """Write `path` (about `needed` bytes) inside this block. Too little free space, seen before
    writing or while writing, becomes one line naming the file, the space it needs, the space free
    and `fix`. The partial write is undone (a new file removed, an appended one cut back), so it
    does not go on holding the space that ran out."""
    path = Path(path)
    check_space(path, needed, fix)
    size_before = path.stat().st_size if path.exists() else None
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_full_disk(e):
            raise
        if size_before is None:
            path.unlink(missing_ok=True)
        else:
            os.truncate(path, size_before)
        raise full_disk_error(path, needed, e, fix) from None


def check_space(path: Path, needed: int, fix: str):
    """Stop before writing `path` (about `needed` bytes) when its disk has less than that free."""
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise UserError(f"could not write {path} (not enough free space, checked before writing): "
                        "it needs about "
                        f"{human_size(needed)} and {human_size(free)} is free; {fix}")


def full_disk_error(path: Path, needed: int, e: Exception, fix: str) -> UserError:
    """The one line for a write of `path` that failed with is_full_disk(e)."""
    reason = os.strerror(e.errno) if getattr(e, "errno", None) else "disk full"
    free = shutil.disk_usage(path.parent).free
    return UserError(f"could not write {path} ({reason}): it needs about {human_size(needed)} and "
                     f"{human_size(free)} is free; {fix}")


def write_file(path: Path, data: bytes, fix: str):
    """A whole file, written under a temporary name and renamed, so that nobody ever reads half of
    it."""
    tmp = path.with_name(path.name + ".tmp")
    with space_for(tmp, len(data), fix), open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


LOCKS = {}  # lock file -> the open file holding its lock, for every lock this process has taken


def lock_directory(lock_path: Path, what: str, fix: str):
    """Take an exclusive OS lock (flock) on lock_path, or stop with one line naming the process that
    holds it.

    The kernel drops the lock when its holder exits, however it dies (kill -9, a crash), so a stale
    lock never blocks a restart (a network filesystem drops a lost node's lock when the server
    notices: docs/reliability.md).
    The lock lasts while the returned file stays open; the caller closes it when done. A second call
    for the same lock in this process (a notebook or a test running again after an error) takes it
    over from the first. Where the filesystem keeps no locks (Lustre mounted without -o flock, NFS
    without its lock service) the work goes on unguarded after a warning: the lock guards against a
    second run started by mistake, and refusing to run at all would leave no way to train there."""
    lock_path = Path(lock_path).resolve()
    if lock_path in LOCKS:
        LOCKS.pop(lock_path).close()
    f = open(lock_path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{what} is in use by {holder}; {fix}") from None
    except OSError as e:  # ENOSYS, ENOLCK, EOPNOTSUPP: this filesystem keeps no locks
        print(f"warning: {what} is on a filesystem without file locks ({e.strerror}); nothing "
              "stops a second run from using it at the same time", file=sys.stderr)
    f.truncate(0)  # who holds it, for the message a second process prints
    f.write(f"process {os.getpid()} on {socket.gethostname()} "
            f"({shlex.join([Path(sys.executable).name, *sys.argv])})")
    f.flush()
    LOCKS[lock_path] = f
    return f


def damaged(path: Path, e: Exception) -> UserError:
    reason = (str(e).splitlines() or [""])[0]
    return UserError(f"{path} is damaged or unreadable ({type(e).__name__}: {reason}); {REBUILD}")


def refuse_existing(path: Path, overwrite: bool, option: str):
    """Stop before any work when `path` exists and the user did not ask to replace it (`option` is
    the setting that chose it: --out_dir, --out)."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it or choose another "
                        f"{option}")


def publish(tmp: Path, out: Path, overwrite: bool, option: str = "--out_dir"):
    """Move a finished file or directory into place; an old one (with --overwrite) is removed only
    after the swap, so that at every moment `out` is either the old one or the new one, whole."""
    # again: another process may have made it in the meantime
    refuse_existing(out, overwrite, option)
    if not out.exists():
        tmp.rename(out)
        return
    old = tmp.with_name(tmp.name + ".old")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old) if old.is_dir() else old.unlink()
