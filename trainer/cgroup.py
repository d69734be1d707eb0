"""A hard memory cap for a sandbox's processes, where the kernel lets us make one: a memory cgroup.

The watchdog (trainer/sandbox.py) measures PSS plus the sandbox's tmpfs every WATCH_SECS and stops a
run over its cap; a cgroup makes the same cap hold between two looks, tmpfs pages included (the
kernel charges shared memory to the cgroup that touched it first), and the kernel itself stops the
run. It is made under the harness's own cgroup (v1's memory controller) or beside it (v2), with swap
forbidden, and removed after the run. A harness that may not make one (a normal user without a
delegated cgroup) keeps the watchdog alone, with the same limits.

Processes join before they run anything: `join` is the child's pre-exec hook, so bwrap and all it
starts are inside from their first instruction.
"""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class MemoryCgroup:
    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version
        self._procs = str(path / "cgroup.procs")  # computed here: the pre-exec hook should only make syscalls

    @classmethod
    def create(cls, limit_bytes: int, label: str) -> MemoryCgroup | None:
        """A new cgroup capped at limit_bytes (no swap), or None where none can be made."""
        for version, parent in _parents():
            _sweep(parent)
            path = parent / f"pgolf-{label}-{secrets.token_hex(4)}"
            try:
                path.mkdir()
            except OSError:
                continue
            group = cls(path, version)
            try:
                if version == 2:
                    group._write("memory.max", limit_bytes)
                    group._write("memory.swap.max", 0, optional=True)
                else:
                    group._write("memory.limit_in_bytes", limit_bytes)
                    group._write("memory.memsw.limit_in_bytes", limit_bytes, optional=True)
            except OSError:
                group.remove()
                continue
            return group
        return None

    @classmethod
    def available(cls) -> bool:
        group = cls.create(1 << 30, "probe")
        if group is not None:
            group.remove()
        return group is not None

    def join(self) -> None:
        """Move the calling process in (a pre-exec hook: only async-signal-safe work)."""
        fd = os.open(self._procs, os.O_WRONLY)
        try:
            os.write(fd, b"0" if self.version == 2 else b"%d" % os.getpid())
        finally:
            os.close(fd)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for going over the cap."""
        name, key = ("memory.events", "oom_kill") if self.version == 2 else ("memory.oom_control", "oom_kill")
        try:
            for line in (self.path / name).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        """Remove the cgroup once its processes are gone (they are killed before this is called)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # a killed process may take a moment to leave
                time.sleep(0.02)

    def _write(self, name: str, value: int, optional: bool = False) -> None:
        try:
            (self.path / name).write_text(str(value))
        except (FileNotFoundError, PermissionError):
            if not optional:
                raise


def _parents() -> list[tuple[int, Path]]:
    """Where a run's cgroup may go: beside this process's own cgroup (v2 first, then v1 memory)."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (ROOT / "cgroup.controllers").exists():
            if "memory" in (ROOT / "cgroup.controllers").read_text().split():
                # v2 allows processes only in leaves: a sibling of our own cgroup, under its parent
                here = ROOT / path.lstrip("/")
                out.append((2, here.parent if path != "/" else here))
        elif "memory" in controllers.split(","):
            out.append((1, ROOT / "memory" / path.lstrip("/")))
    return sorted(out, key=lambda p: -p[0])


def _sweep(parent: Path, min_age_secs: float = 600) -> None:
    """Remove the empty cgroups of runs whose harness died before it could (kill -9): the kernel refuses
    to remove one that still holds a process, and a young one may be about to receive its first."""
    try:
        stale = [p for p in parent.glob("pgolf-*") if time.time() - p.stat().st_mtime > min_age_secs]
    except OSError:
        return
    for path in stale:
        try:
            path.rmdir()
        except OSError:
            pass
