"""Atomic outputs: a temporary sibling directory renamed into place, one writer per destination at a time, the
leftovers of killed runs found and removed, and the machine's refusals (disk full, read-only folder, file-size
limit) told apart from bad input and from bugs.

Names beside a destination ``OUT`` (all hidden, all starting ``.OUT.weightsmith-``):

- ``.OUT.weightsmith-<pid>-<hex>``: the directory being written by process ``pid``; renamed to ``OUT`` at the end.
- ``.OUT.weightsmith-old-<pid>-<hex>``: a replaced output (``force``), removed right after the rename.
- ``.OUT.weightsmith-recipe-<pid>-<hex>``: a recipe's intermediate results.
- ``.OUT.weightsmith-lock``: held with ``flock`` while a run writes ``OUT``; the kernel releases it when the run
  dies, however it dies.

A run that is killed (SIGKILL, power loss) leaves its temporary directory behind. The next run writing the same
destination removes every leftover whose process is gone, and warns about any it cannot attribute.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from weightsmith.errors import DestinationError, StorageError

TAG = ".weightsmith-"
# errno → (what happened, what to do). These are the machine's answers, not faults of the input or of weightsmith.
_STORAGE_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    errno.EDQUOT: ("the disk quota is exhausted", "free some space within the quota or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "choose an output on a writable file system"),
    errno.EACCES: ("permission denied", "choose an output folder you may write to"),
    errno.EPERM: ("operation not permitted", "choose an output folder you may write to"),
    errno.EFBIG: ("the file-size limit was reached", "raise the limit (ulimit -f) or use a smaller shard size"),
}


class LeftoverWarning(UserWarning):
    """A temporary folder beside a destination that weightsmith did not remove (its owner may still run)."""


def storage_error(exc: OSError, out: Path) -> StorageError | None:
    """The one-line StorageError for an OSError the machine raised while writing ``out``; None for other errors."""
    known = _STORAGE_ERRNOS.get(exc.errno or 0)
    if known is None:
        return None
    what, todo = known
    where = f" ({exc.filename})" if exc.filename and Path(str(exc.filename)).name != Path(out).name else ""
    return StorageError(f"{out}: cannot write: {what}{where}; {todo}. Nothing was left at the destination")


@contextmanager
def storage_errors(out: Path) -> Iterator[None]:
    """Turn the machine's refusals (disk full, read-only, permission, file-size limit) into StorageError."""
    try:
        yield
    except OSError as exc:
        err = storage_error(exc, out)
        if err is None:
            raise
        raise err from None


def staging_dir(out: Path, kind: str = "") -> Path:
    """A fresh temporary directory beside ``out`` (same parent, so same file system: the final rename is atomic)."""
    prefix = f"{kind}-" if kind else ""
    tmp = out.parent / f".{out.name}{TAG}{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    if tmp.stat().st_dev != out.parent.stat().st_dev:  # a mount point appeared at the name itself: refuse
        shutil.rmtree(tmp, ignore_errors=True)
        raise DestinationError(f"{out}: the temporary folder {tmp} is on another file system")
    return tmp


def leftovers(out: Path) -> list[tuple[Path, int | None]]:
    """Temporary folders of earlier runs beside ``out``: (path, owner pid or None when the name carries none)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}{re.escape(TAG)}(?:(?:old|recipe)-)?(?:(\d+)-)?[0-9a-f]{{8}}$")
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = pattern.match(entry.name)
        if match:
            found.append((entry, int(match[1]) if match[1] else None))
    return found


def sweep(out: Path) -> list[Path]:
    """Remove the leftovers of dead runs beside ``out`` (their pid no longer runs); warn about the others that are
    not this process's. Returns the paths removed."""
    removed = []
    for path, pid in leftovers(out):
        if pid == os.getpid():
            continue
        if pid is not None and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
        else:
            owner = f"process {pid} still runs" if pid is not None else "no owner recorded"
            warnings.warn(f"{path}: left by another weightsmith run ({owner}); not removed", LeftoverWarning, 2)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class DestinationLock:
    """An exclusive ``flock`` on ``.OUT.weightsmith-lock`` beside ``out``, held while a run writes ``out``.

    A second run for the same destination is refused at once with one line naming the holder's pid. The lock file is
    removed on release; a killed holder leaves it behind, harmlessly (the kernel has released the lock)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}{TAG}lock"
        self.fd: int | None = None

    def acquire(self) -> DestinationLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise DestinationError(
                    f"{self.out}: another weightsmith run (pid {holder}) is writing this output; "
                    f"wait for it to finish or choose another output"
                ) from None
            # The previous holder may have unlinked the file between our open and our lock: lock the file that is
            # at the path now, or two runs would each hold a lock on a different file.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            mine = os.fstat(fd)
            if (mine.st_dev, mine.st_ino) != (current.st_dev, current.st_ino):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter re-checks the inode and retries
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out``. An existing ``out`` is refused unless ``force`` (then swapped out and removed). If
    another process put something at ``out`` after our checks, the rename fails rather than mix two results."""
    from weightsmith.checkpoint.writer import check_destination

    check_destination(out, force)  # again: something may have appeared while we worked
    appeared = DestinationError(f"{out}: something else wrote this output while this run worked; it was left as it is")
    trash = None
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        elif force:
            trash = out.parent / f".{out.name}{TAG}old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
        else:  # filled after the check above
            raise appeared
    try:
        tmp.rename(out)  # a directory rename onto a non-empty directory fails (ENOTEMPTY/EEXIST): never a mix
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise appeared from None
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)
