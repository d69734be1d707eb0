"""A run's processes: finding every one of them, measuring them, freezing them and killing them all."""
from __future__ import annotations

import os
import signal
import time

import psutil

KILL_WAIT_SECS = 5.0  # how long to keep killing stragglers before reporting them


class ProcessTree:
    """Every process of one run.

    Members are the leader's descendants plus every process seen in the tree
    before (a double-forked orphan is re-parented away but stays tracked) and,
    once a member has been seen in a PID namespace of its own, everything
    else in that namespace.
    """

    def __init__(self, leader: int, marker: str = ""):
        self.leader = leader
        self.marker = marker  # an environment entry every process of the run inherits
        self.seen: dict[int, psutil.Process] = {}
        self.cpu: dict[tuple[int, float], float] = {}  # (pid, create_time) -> CPU seconds at its last sighting
        self.own_ns = _pid_ns(os.getpid())
        self.namespaces: set[int] = set()

    def members(self) -> list[psutil.Process]:
        """The run's live processes: the leader's descendants and every process seen among them before.

        One pass over /proc's parent links; a run's PID namespaces are searched only when killing.
        """
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            children.setdefault(proc.info["ppid"], []).append(proc.pid)
        stack, found = [self.leader, *self.seen], set()
        while stack:
            pid = stack.pop()
            if pid not in found:
                found.add(pid)
                stack.extend(children.get(pid, ()))
        return self._sample(found)

    def _sample(self, pids) -> list[psutil.Process]:
        alive = []
        for pid in pids:
            try:
                proc = self.seen.get(pid) or psutil.Process(pid)
                if not proc.is_running() or _zombie(proc):
                    continue
                times = proc.cpu_times()
                self.cpu[pid, proc.create_time()] = times.user + times.system
            except psutil.NoSuchProcess:
                continue
            if pid not in self.seen:
                self.seen[pid] = proc
                ns = _pid_ns(pid)
                if ns is not None and ns != self.own_ns:
                    self.namespaces.add(ns)
            alive.append(proc)
        return alive

    def in_namespaces(self) -> list[psutil.Process]:
        """Processes in the run's PID namespaces that left its tree (orphans of a double fork)."""
        if not self.namespaces:
            return []
        return [p for p in psutil.process_iter() if p.pid != os.getpid() and _pid_ns(p.pid) in self.namespaces]

    def cpu_secs(self) -> float:
        """CPU time of the run's processes as last sampled (a watchdog period short at most)."""
        return sum(self.cpu.values())

    def signal_all(self, sig: int) -> None:
        for proc in self.members():
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def marked(self) -> list[psutil.Process]:
        """Processes carrying the run's marker: the ones that escaped the tree without a namespace."""
        found = []
        if self.marker:
            key, _, value = self.marker.partition("=")
            for proc in psutil.process_iter():
                try:
                    if proc.pid != os.getpid() and proc.environ().get(key) == value:
                        found.append(proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
        return found

    def kill_all(self, reap=lambda: None) -> list[int]:
        """SIGKILL every process of the run until none is left; return the pids of any that survived.

        `reap` collects the leader's exit status (its Popen's poll), so it does not linger as a zombie.
        """
        give_up = time.monotonic() + KILL_WAIT_SECS
        while True:
            # a zombie is dead already; one whose parent left waits for the host's init to reap it
            victims = [p for p in {p.pid: p for p in self.members() + self.in_namespaces() + self.marked()}.values()
                       if not _zombie(p)]
            for proc in victims:
                try:
                    proc.send_signal(signal.SIGKILL)
                    proc.resume()  # a stopped process dies at once only when it runs again
                except psutil.NoSuchProcess:
                    pass
            reap()
            if not victims or time.monotonic() > give_up:
                return [p.pid for p in victims]
            time.sleep(0.05)


def memory_bytes(procs: list[psutil.Process], cap: int) -> int:
    """Memory of the processes together, as proportional set size once it could matter.

    The resident sizes add up shared pages once per process, so their sum is never below the PSS
    sum; only when that sum passes `cap` is the PSS read (from smaps_rollup, whose page-table walk
    slowed training by a fifth when done four times a second).
    """
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if total <= cap:
        return total
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def task_count(procs: list[psutil.Process]) -> int:
    total = 0
    for proc in procs:
        try:
            total += proc.num_threads()
        except psutil.NoSuchProcess:
            continue
    return total


def _zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _pid_ns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None
