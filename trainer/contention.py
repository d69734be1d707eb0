"""How much of a run's cores other work took while it trained.

A run trains for a wall-clock budget, so a busy machine buys it fewer steps
and a worse val_bpb that says nothing about its code. The meter compares the
busy time of the cores this process may use (from /proc/stat, hypervisor
steal included) with the CPU time of the run's processes (sampled by the
sandbox's watchdog: rusage of children does not survive bubblewrap's PID
namespace) and of this process (the trusted evaluator). The rest was someone
else's.

Limits: a container capped by a CPU quota rather than a cpuset sees the
host's cores, so there the share also counts work on cores it could not use.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CONTENDED = 0.2  # above this share of the cores, the run's score is not comparable with a quiet run's


def _busy_secs(cpus: set[int]) -> float | None:
    """Non-idle seconds of the given cores since boot: user, nice, system, irq, softirq and steal."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
            total += user + nice + system + irq + softirq + steal
    return total / CLOCK_TICKS


def _self_secs() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class CpuMeter:
    """Start it before the run's first process; read `others_share` when the run is over."""

    cpus: set[int]
    started: float
    busy: float | None
    own: float

    @classmethod
    def start(cls) -> "CpuMeter":
        cpus = os.sched_getaffinity(0)
        return cls(cpus, time.monotonic(), _busy_secs(cpus), _self_secs())

    def others_share(self, run_cpu_secs: float) -> float | None:
        """Share of the cores' capacity others used since start (0 = a quiet machine), or None if unknown."""
        busy = _busy_secs(self.cpus)
        wall = time.monotonic() - self.started
        if busy is None or self.busy is None or wall <= 0:
            return None
        others = (busy - self.busy) - run_cpu_secs - (_self_secs() - self.own)
        return round(min(1.0, max(0.0, others / (wall * len(self.cpus)))), 3)
