"""Files the harness reads or writes, above all in a run's folder, where code it does not trust writes too.

Every helper here refuses to follow a link the run planted, and every read is bounded.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

# What a run's folder holds once the run is over; anything else the run wrote is removed.
RECORDED_OUTPUTS = ("train.py", "stdout.log", "stderr.log", "result.json")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace the file itself (never what a planted link points to), all at once, on disk before it returns."""
    path = Path(path)
    clear(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def open_log(path: Path) -> int:
    """A fresh log file for the run to write to (stdout or stderr)."""
    clear(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def clear(path: Path) -> None:
    """Remove whatever the run left at one of our paths (a directory named result.json, a symlink...)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def read_tail(path: Path, max_bytes: int) -> str:
    """The last max_bytes of a plain file (empty if it is missing or not a plain file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        return tail_of_fd(fd, max_bytes) if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    finally:
        os.close(fd)


def tail_of_fd(fd: int, max_bytes: int, end: int | None = None) -> str:
    """Up to max_bytes ending at `end` (default: the end of the file), decoded leniently."""
    end = os.fstat(fd).st_size if end is None else end
    data = os.pread(fd, min(end, max_bytes), max(0, end - max_bytes))
    return data.decode("utf-8", errors="replace")


def usage(folder: Path, max_entries: int = 100_000) -> tuple[int, int]:
    """(bytes of disk the folder's files occupy, number of entries), counting at most max_entries."""
    total, entries = 0, 0
    stack = [str(folder)]
    while stack and entries < max_entries:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += info.st_blocks * 512  # allocated blocks: a sparse file costs what it holds
                    if stat.S_ISDIR(info.st_mode):
                        stack.append(entry.path)
        except OSError:
            continue
    return total, entries


def keep_recorded_outputs(run_dir: Path, owner: tuple[int, int] | None = None) -> None:
    """Remove everything the run left but its recorded outputs; hand those to `owner`.

    Nothing but the recorded outputs survives a run: no stray files, links, FIFOs or sockets,
    and no disk the next run or the ledger would miss.
    """
    if owner:
        os.chown(run_dir, *owner)
    with os.scandir(run_dir) as it:
        entries = list(it)
    for entry in entries:
        path = Path(entry.path)
        if entry.name in RECORDED_OUTPUTS and entry.is_file(follow_symlinks=False):
            if owner:
                os.chown(path, *owner, follow_symlinks=False)
        else:
            clear(path)


def truncate(fd: int, size: int) -> None:
    if os.fstat(fd).st_size > size:
        os.ftruncate(fd, size)
