"""The verdict on one run: its status, whether its number is verified, and why not.

A plain outcome, built here and nowhere else in the sandbox; the training
service turns it into the run's record.
"""
from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the harness reads outcomes without importing torch (about 1 s and 300 MB)
    from trainer.evaluator import Evaluation

NEVER_EVALUATED = "the script never called evaluate_bpb; its printed val_bpb cannot be verified"
REPORTED_FIELDS = ("val_bpb", "train_loss", "total_steps", "num_params_M", "training_time_secs")


def default_clock_grace(time_budget: float) -> float:
    """Seconds the training clock may run past TIME_BUDGET: the last step's overshoot, the set-up before
    the script's own timer, the hand-off and the slowest evaluation frame (0.5-0.8 s for the baseline,
    more on a busy 2-core machine). Python and torch are imported before the clock starts, so no start-up
    hides in it; what honest work leaves unused (about 2.8 s at 180 s) is at most 1.6 % more training."""
    return round(2.0 + 0.01 * time_budget, 3)


@dataclass
class RunOutcome:
    """What happened to one run, as the sandbox saw it. `status` is a RunStatus value."""

    status: str
    verified: bool
    sandboxed: bool
    code_sha256: str
    started_at: datetime
    finished_at: datetime
    wall_secs: float
    val_bpb: float | None = None
    startup_secs: float | None = None
    training_secs: float | None = None
    slowest_frame_secs: float | None = None
    eval_secs: float | None = None
    cpu_others: float | None = None
    reported_val_bpb: float | None = None
    train_loss: float | None = None
    total_steps: int | None = None
    num_params_M: float | None = None
    reasons: list[str] = field(default_factory=list)
    stdout_tail: str = ""
    stderr_tail: str = ""


@dataclass
class Limits:
    """What the verdict measures a run against."""

    time_budget: float
    clock_grace: float
    memory_mb: int
    file_mb: int


def judge(ev: Evaluation, stopped: tuple[str, str] | None, rc: int | None, limits: Limits,
          sandboxed: bool, stderr_tail: str, carried: list[str]) -> tuple[str, list[str]]:
    """(status, reasons). `stopped` is (status, why) when the harness ended the run itself."""
    reasons: list[str] = []
    if stopped is not None:
        status, why = stopped
        reasons.append(why)
    elif rc:
        status = "crashed"
        reasons.append(exit_reason(rc, sandboxed, stderr_tail, limits))
    elif ev.ready_at is None:
        status = "unverified"
        reasons.append(NEVER_EVALUATED)
    else:
        clock = ev.ready_at - ev.started_at + ev.max_frame_secs
        over = clock - (limits.time_budget + limits.clock_grace)
        if over > 0:
            reasons.append(
                f"training clock exceeded: {ev.ready_at - ev.started_at:.2f} s from train.py's first line to "
                f"evaluate_bpb plus {ev.max_frame_secs:.2f} s for the slowest evaluation frame is {over:.2f} s "
                f"over TIME_BUDGET {limits.time_budget:g} s + {limits.clock_grace:g} s grace; stop training "
                "earlier, counting set-up from the top of train.py")
        if ev.val_bpb is None and not ev.reasons:
            reasons.append("the evaluation did not finish")
        status = "unverified" if reasons or ev.reasons or carried else "completed"
    reasons += ev.reasons + carried
    return status, reasons


def exit_reason(rc: int, sandboxed: bool, stderr_tail: str, limits: Limits) -> str:
    # bwrap reports a child killed by signal N as exit code 128 + N; Popen reports -N
    sig = -rc if rc < 0 else (rc - 128 if sandboxed and 128 < rc < 160 else 0)
    try:
        what = f"was killed by {signal.Signals(sig).name}" if sig else f"exited with code {rc}"
    except ValueError:
        what = f"exited with code {rc}"
    lines = [line for line in stderr_tail.splitlines() if line.strip()]
    reason = f"the script {what}" + (f": {lines[-1].strip()[:300]}" if lines else "")
    if sig == signal.SIGXFSZ or "File too large" in stderr_tail:  # Python ignores SIGXFSZ: writes fail instead
        reason += f" (a file or log reached the {limits.file_mb} MiB size limit)"
    elif re.search(r"MemoryError|can't allocate memory|Cannot allocate memory|bad_alloc", stderr_tail):
        reason += f" (out of memory: a run may use {limits.memory_mb} MiB; use a smaller model or batch)"
    return reason


def parse_report(stdout_tail: str) -> dict:
    """The numbers of the last JSON object on stdout that has val_bpb: what the script claims."""
    for line in reversed(stdout_tail.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "val_bpb" in obj:
                return {k: _number(obj.get(k)) for k in REPORTED_FIELDS}
    return {}


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        return None
    return float(value)


def count(value: float | None) -> int | None:
    return int(value) if value is not None and value.is_integer() else None
