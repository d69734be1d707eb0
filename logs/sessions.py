"""Where sessions live, which is the latest, and what each one is at a glance.

Sessions are folders under the sessions root (PGOLF_SESSIONS_DIR, default ./sessions): each `run` makes
`<root>/<UTC timestamp>/`, `submit` uses `<root>/manual/`. A folder is a session when it holds a ledger
or a settings.json; the latest is the one whose ledger started last (a session that never reached its
ledger counts from its settings.json). `sessions`, `report`, `compare`, `watch`, `rerun` and
`service status` all find sessions here.
"""
from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from budget.ledger import LEDGER_FILE, LOCK_FILE, Ledger, _read_holder, pid_alive
from budget.models import BudgetStatus, RunResult, RunStatus
from logs.claim import Claim, make_claim
from logs.trajectory import LLMCallEvent, SessionEvent, read_events

SESSIONS_ENV = "PGOLF_SESSIONS_DIR"
SETTINGS_FILE = "settings.json"
FAILED = (RunStatus.crashed, RunStatus.timeout, RunStatus.interrupted)


class NoSession(FileNotFoundError):
    """No session where one was looked for; the message says where and what to do."""


def sessions_root() -> Path:
    return Path(os.environ.get(SESSIONS_ENV) or "sessions")


def is_session(folder: Path) -> bool:
    return (folder / LEDGER_FILE).is_file() or (folder / SETTINGS_FILE).is_file()


def started_at(folder: Path) -> datetime:
    try:
        with Ledger.open(folder, exclusive=False) as ledger:
            return ledger.status().session_started_at
    except Exception:  # no ledger yet, or one being created: the settings file's time
        path = folder / SETTINGS_FILE if (folder / SETTINGS_FILE).exists() else folder
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def find_sessions(root: Path | None = None) -> list[Path]:
    """Every session under the root, oldest first."""
    root = Path(root) if root else sessions_root()
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and is_session(d)]
    return sorted(found, key=lambda d: (started_at(d), d.name))


def resolve_session(name: str | Path | None, root: Path | None = None) -> Path:
    """The folder named, or the latest session; NoSession says what to do when there is none."""
    if name:
        folder = Path(name)
        if not folder.is_dir() and (sessions_root() / str(name)).is_dir():
            folder = sessions_root() / str(name)  # an id under the root
        if not is_session(folder):
            raise NoSession(f"no session in {folder} (no {LEDGER_FILE} or {SETTINGS_FILE}); "
                            "`pgolf-agent sessions` lists the sessions")
        return folder
    found = find_sessions(root)
    if not found:
        where = Path(root) if root else sessions_root()
        raise NoSession(f"no session under {where}/; start one with `pgolf-agent run`, name a session folder, or set "
                        f"{SESSIONS_ENV}")
    return found[-1]


class SessionSummary(BaseModel):
    """A session at a glance: what `sessions` lists and `compare` puts side by side."""

    id: str
    path: Path
    researcher: str
    model: str
    started: datetime
    state: str                          # running / finished / stopped: reason
    runs_used: int
    max_runs: int | None
    best_val_bpb: float | None          # the claimed best configuration's mean
    best_runs: list[int]                # its runs whose scores make that mean
    beat_noise: bool
    noise: float
    runs_to_best: int | None            # runs used when the best configuration was first measured
    secs_to_best: float | None          # wall clock from the session's start to that run's end
    wall_secs: float | None             # the session's wall clock so far
    tokens: int
    cost_usd: float | None
    failed: int
    unverified: int
    claim: str

    @property
    def best_text(self) -> str:
        if self.best_val_bpb is None:
            return "none"
        if len(self.best_runs) == 1:
            return f"{self.best_val_bpb:.4f} (run {self.best_runs[0]})"
        return f"{self.best_val_bpb:.4f} (mean of runs {', '.join(map(str, self.best_runs))})"


def is_running(folder: Path) -> bool:
    """A harness holds the session's lock now. Read from the kernel's table of locks, so looking never takes the
    lock (which could make a harness starting at that moment fail); without that table, whether the harness the
    lock file names is alive."""
    try:
        info = (folder / LOCK_FILE).stat()
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        holder = _read_holder(folder / LOCK_FILE)
        return holder is not None and holder.host == socket.gethostname() and pid_alive(holder.harness_pid)
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(line.split()[1:2] == ["FLOCK"] and where in line.split() for line in table.splitlines()
               if "->" not in line)  # "->" lines wait for the lock


def read_session(folder: Path) -> tuple[BudgetStatus, list[RunResult]]:
    with Ledger.open(folder, exclusive=False) as ledger:
        return ledger.status(), ledger.runs()


def summarize(folder: Path) -> SessionSummary:
    folder = Path(folder)
    status, runs = read_session(folder) if (folder / LEDGER_FILE).exists() else (None, [])
    events = read_events(folder / "trajectory.jsonl")
    session_events = [e for e in events if isinstance(e, SessionEvent)]
    start = next((e for e in session_events if e.event == "start"), None)
    researcher = start.detail.get("agent", "?") if start else ("submit" if runs else "?")
    model = start.detail.get("model", "") if start else ""
    if is_running(folder):
        state = "running"
    elif session_events and session_events[-1].event == "end":
        state = session_events[-1].detail.get("kind", "finished")
    elif start:
        state = "stopped without finishing"
    else:
        state = "manual runs"
    claim: Claim = make_claim(runs, folder)
    calls = [e for e in events if isinstance(e, LLMCallEvent) and e.error is None]
    costs = [e.metadata.get("cost_usd") for e in calls]
    first_best = next((r for r in runs if claim.best and r.run_id == claim.best_run_id), None)
    begun = status.session_started_at if status else started_at(folder)
    ends = [r.finished_at for r in runs if r.finished_at] + [datetime.fromisoformat(e.ts.replace("Z", "+00:00"))
                                                             for e in events[-1:]]
    return SessionSummary(
        id=folder.name, path=folder, researcher=researcher, model=model, started=begun, state=state,
        runs_used=status.runs_used if status else 0, max_runs=status.budget.max_runs if status and status.budget else None,
        best_val_bpb=claim.best.mean if claim.best else None, best_runs=claim.best.scored_runs if claim.best else [],
        beat_noise=claim.beat_noise, noise=claim.noise,
        runs_to_best=first_best.run_id + 1 if first_best else None,
        secs_to_best=(first_best.finished_at - begun).total_seconds() if first_best and first_best.finished_at else None,
        wall_secs=(max(ends) - begun).total_seconds() if ends else None,
        tokens=sum(e.input_tokens + e.output_tokens for e in calls),
        cost_usd=None if any(c is None and e.input_tokens + e.output_tokens for c, e in zip(costs, calls))
        else sum(c or 0 for c in costs),
        failed=sum(r.status in FAILED for r in runs), unverified=sum(r.status == RunStatus.unverified for r in runs),
        claim=claim.sentence())
