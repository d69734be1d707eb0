"""The session's budget ledger: one SQLite file that survives `kill -9` of any process.

Every state change is a single transaction (WAL journal, synchronous=FULL), so
a run exists exactly when its reservation has committed: a crash before the
commit leaves no run, a crash after it leaves a `running` row that the next
harness to open the session records as `interrupted` (and charged). Runs are
counted as rows, so none can be counted twice.

One harness drives a session at a time: it holds an exclusive flock on
`session_dir/.lock`. Readers (`pgolf-agent service status`) open the ledger
shared, without the lock, and see a consistent snapshot.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ValidationError

from budget.models import (
    MAX_CODE_BYTES,
    Budget,
    BudgetExhausted,
    BudgetStatus,
    Refusal,
    RunRefused,
    RunRequest,
    RunResult,
    RunStatus,
)

LEDGER_FILE = "ledger.sqlite"
LOCK_FILE = ".lock"

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS session (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        started_at REAL NOT NULL,
        budget_json TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id INTEGER PRIMARY KEY,
        status TEXT NOT NULL,
        description TEXT NOT NULL,
        hypothesis TEXT NOT NULL,
        code_sha256 TEXT NOT NULL,
        reserved_at REAL NOT NULL,
        finished_at REAL,
        result_json TEXT NOT NULL
    )""",
)

INTERRUPTED_BY_CRASH = ("the harness stopped while this run was in flight (recorded when the session "
                        "was next opened); the run is charged")


class SessionLocked(RuntimeError):
    """Another live harness drives this session."""


class SessionNotFound(FileNotFoundError):
    """No ledger in the session directory."""


class LockHolder(BaseModel):
    """Who holds a session's lock, as written in `session_dir/.lock`."""

    pid: int
    harness_pid: int
    host: str
    since: datetime


def check_code(code: str) -> None:
    """Refuse code that can never be a run (empty, too large, not Python), before anything is charged."""
    if not code.strip():
        raise RunRefused(Refusal(code=400, message="train_code is empty; submit the whole train.py "
                                                   "(this cost no run)"))
    size = len(code.encode("utf-8", "surrogatepass"))
    if size > MAX_CODE_BYTES:
        raise RunRefused(Refusal(code=400, message=f"train_code is {size:,} bytes, over the {MAX_CODE_BYTES:,}-byte "
                                                   "limit; shorten it and submit again (this cost no run)"))
    try:
        compile(code, "train.py", "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise RunRefused(Refusal(code=422, message=f"syntax error in train.py line {exc.lineno}: {exc.msg}; "
                                                   "fix it and submit again (this cost no run)")) from None
    except ValueError as exc:  # null bytes, unencodable characters
        raise RunRefused(Refusal(code=422, message=f"train.py cannot be compiled: {exc}; "
                                                   "fix it and submit again (this cost no run)")) from None


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")  # a killed child not yet reaped by its parent is a zombie


def _read_holder(path: Path) -> LockHolder | None:
    try:
        return LockHolder.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return None


def _acquire_lock(session_dir: Path, harness_pid: int, wait_secs: float) -> int:
    """Take the session's exclusive lock; wait a little when its last holder has just died."""
    path = session_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_secs
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _read_holder(path)
            holder_gone = (holder is not None and holder.host == socket.gethostname()
                           and not pid_alive(holder.harness_pid))
            if holder_gone and time.monotonic() < deadline:
                time.sleep(0.2)  # the dead harness's processes are still exiting and will release it
                continue
            os.close(fd)
            if holder is None:
                raise SessionLocked(f"session {session_dir} is locked by another process; stop it, "
                                    "or pass another --session DIR") from None
            if holder_gone:
                raise SessionLocked(f"session {session_dir} is still locked although its harness "
                                    f"(pid {holder.harness_pid}) has exited; its processes are shutting "
                                    "down, retry in a few seconds") from None
            raise SessionLocked(f"session {session_dir} is in use by pid {holder.harness_pid} on "
                                f"{holder.host} (since {holder.since:%Y-%m-%d %H:%M:%S} UTC); stop that "
                                "harness, or pass another --session DIR") from None
    holder = LockHolder(pid=os.getpid(), harness_pid=harness_pid, host=socket.gethostname(),
                        since=datetime.now(timezone.utc))
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.model_dump_json().encode(), 0)
    return fd


class Ledger:
    """Runs and budget of one session. Open it with `Ledger.open`."""

    def __init__(self, session_dir: Path, conn: sqlite3.Connection, lock_fd: int | None):
        self.session_dir = session_dir
        self._conn = conn
        self._lock_fd = lock_fd
        self._mutex = threading.Lock()  # one connection, shared by the threads of this process
        self.recovered_run_ids: list[int] = []

    @classmethod
    def open(cls, session_dir: str | Path, budget: Budget | None = None, *, exclusive: bool = True,
             harness_pid: int | None = None, lock_wait_secs: float = 15.0) -> Ledger:
        """Create or resume a session.

        exclusive (the harness): takes the session lock, stores the start time on first open, applies
        the budget fields the caller set explicitly (the stored budget wins for the rest), and records
        runs left `running` by a dead harness as interrupted. Shared (readers): no lock, the ledger
        must exist, the budget cannot change.
        """
        session_dir = Path(session_dir).expanduser().absolute()
        lock_fd = None
        if exclusive:
            session_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = _acquire_lock(session_dir, harness_pid or os.getpid(), lock_wait_secs)
        elif budget is not None:
            raise ValueError("only the harness holding a session (exclusive=True) may change its budget")
        elif not (session_dir / LEDGER_FILE).exists():
            raise SessionNotFound(f"no session in {session_dir} (no {LEDGER_FILE}); start one with "
                                  f"`pgolf-agent submit FILE --session {session_dir}`")
        try:
            conn = sqlite3.connect(session_dir / LEDGER_FILE, timeout=60, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before reserve/finish return
            ledger = cls(session_dir, conn, lock_fd)
            if exclusive:
                ledger._start_or_resume(budget)
                ledger.recovered_run_ids = ledger.recover()
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return ledger

    def close(self) -> None:
        with self._mutex:
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self, write: bool):
        """One atomic step; a write transaction takes SQLite's write lock at once (BEGIN IMMEDIATE)."""
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _start_or_resume(self, budget: Budget | None) -> None:
        with self._transaction(write=True) as db:
            for statement in SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT budget_json FROM session").fetchone()
            if row is None:
                db.execute("INSERT INTO session (id, started_at, budget_json) VALUES (1, ?, ?)",
                           (time.time(), (budget or Budget()).model_dump_json()))
            elif budget is not None and budget.model_fields_set:
                stored = Budget.model_validate_json(row[0])
                changed = Budget.model_validate({**stored.model_dump(),
                                                 **budget.model_dump(include=budget.model_fields_set)})
                if changed != stored:
                    db.execute("UPDATE session SET budget_json = ?", (changed.model_dump_json(),))

    @staticmethod
    def _session(db: sqlite3.Connection) -> tuple[Budget, float]:
        budget_json, started_at = db.execute("SELECT budget_json, started_at FROM session").fetchone()
        return Budget.model_validate_json(budget_json), started_at

    @staticmethod
    def _remaining(db: sqlite3.Connection) -> dict:
        """runs_remaining and match_time_remaining_secs right now: the fields every answer carries."""
        budget, started_at = Ledger._session(db)
        (used,) = db.execute("SELECT COUNT(*) FROM runs").fetchone()
        # Wall clock, not monotonic: the session clock must keep running across processes and crashes.
        elapsed = time.time() - started_at
        return {"runs_remaining": max(0, budget.max_runs - used),
                "match_time_remaining_secs": round(max(0.0, budget.session_secs - elapsed), 3)}

    def reserve(self, request: RunRequest, *, max_active: int = 1, sandboxed: bool = True) -> int:
        """Charge one run and return its id, or raise RunRefused/BudgetExhausted (nothing charged)."""
        try:
            check_code(request.train_code)
        except RunRefused as exc:
            with self._transaction(write=False) as db:
                raise RunRefused(exc.refusal.model_copy(update=self._remaining(db))) from None
        code_sha256 = hashlib.sha256(request.train_code.encode("utf-8", "surrogatepass")).hexdigest()
        with self._transaction(write=True) as db:
            budget, _ = self._session(db)
            remaining = self._remaining(db)
            time_left = remaining["match_time_remaining_secs"]
            if remaining["runs_remaining"] == 0:
                raise BudgetExhausted(Refusal(
                    code=429, **remaining,
                    message=f"all {budget.max_runs} runs of this session are used; start a new session "
                            "(--session DIR) to run more"))
            if time_left < budget.run_timeout_secs:
                raise BudgetExhausted(Refusal(
                    code=429, **remaining,
                    message=f"{time_left:.1f} s of the session's {budget.session_secs:g} s remain, less than "
                            f"one run's {budget.run_timeout_secs:g} s timeout; start a new session "
                            "(--session DIR) to run more"))
            active = [r for (r,) in db.execute("SELECT run_id FROM runs WHERE status = ? ORDER BY run_id",
                                               (RunStatus.running.value,))]
            if len(active) >= max_active:
                raise RunRefused(Refusal(
                    code=409, **remaining,
                    message=f"run {', '.join(map(str, active))} still running ({len(active)} of {max_active} "
                            "run slots busy); wait for its result, then submit again"))
            (run_id,) = db.execute("SELECT COALESCE(MAX(run_id), -1) + 1 FROM runs").fetchone()
            now = time.time()
            placeholder = RunResult(run_id=run_id, status=RunStatus.running, description=request.description,
                                    hypothesis=request.hypothesis, seed=request.seed, code_sha256=code_sha256,
                                    sandboxed=sandboxed, started_at=_utc(now))
            db.execute("INSERT INTO runs (run_id, status, description, hypothesis, code_sha256, reserved_at, "
                       "result_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (run_id, RunStatus.running.value, request.description, request.hypothesis, code_sha256,
                        now, placeholder.model_dump_json()))
        return run_id

    def finish(self, run_id: int, result: RunResult) -> RunResult:
        """Record a run's outcome once; a run already final keeps its first record."""
        if result.status in (RunStatus.running, RunStatus.refused):
            raise ValueError(f"run {run_id}: {result.status.value!r} is not an outcome")
        with self._transaction(write=True) as db:
            row = db.execute("SELECT status, result_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"run {run_id} was never reserved in {self.session_dir}")
            stored = RunResult.model_validate_json(row[1])
            if row[0] == RunStatus.running.value:
                now = time.time()
                stored = result.model_copy(update={
                    "run_id": run_id, "description": stored.description, "hypothesis": stored.hypothesis,
                    "seed": stored.seed if result.seed is None else result.seed,
                    "code_sha256": result.code_sha256 or stored.code_sha256, "started_at": stored.started_at,
                    "finished_at": _utc(now), "runs_remaining": None, "match_time_remaining_secs": None})
                db.execute("UPDATE runs SET status = ?, finished_at = ?, result_json = ? "
                           "WHERE run_id = ? AND status = ?",
                           (stored.status.value, now, stored.model_dump_json(), run_id, RunStatus.running.value))
            return stored.model_copy(update=self._remaining(db))

    def recover(self) -> list[int]:
        """Record every run a dead harness left `running` as interrupted (charged). Lock holder only."""
        if self._lock_fd is None:
            raise RuntimeError("recover() needs the session lock: open the ledger with exclusive=True")
        recovered = []
        with self._transaction(write=True) as db:
            now = time.time()
            rows = db.execute("SELECT run_id, result_json FROM runs WHERE status = ?",
                              (RunStatus.running.value,)).fetchall()
            for run_id, result_json in rows:
                stale = RunResult.model_validate_json(result_json)
                record = stale.model_copy(update={"status": RunStatus.interrupted, "finished_at": _utc(now),
                                                  "reasons": [*stale.reasons, INTERRUPTED_BY_CRASH]})
                db.execute("UPDATE runs SET status = ?, finished_at = ?, result_json = ? "
                           "WHERE run_id = ? AND status = ?",
                           (record.status.value, now, record.model_dump_json(), run_id, RunStatus.running.value))
                recovered.append(run_id)
        return recovered

    def status(self) -> BudgetStatus:
        with self._transaction(write=False) as db:
            budget, started_at = self._session(db)
            remaining = self._remaining(db)
            (used,) = db.execute("SELECT COUNT(*) FROM runs").fetchone()
            active = [r for (r,) in db.execute("SELECT run_id FROM runs WHERE status = ? ORDER BY run_id",
                                               (RunStatus.running.value,))]
            completed = [RunResult.model_validate_json(j) for (j,) in db.execute(
                "SELECT result_json FROM runs WHERE status = ?", (RunStatus.completed.value,))]
        best = min((r for r in completed if r.counts_as_best), key=lambda r: (r.val_bpb, r.run_id), default=None)
        return BudgetStatus(
            runs_used=used,
            runs_remaining=remaining["runs_remaining"],
            match_time_remaining_secs=remaining["match_time_remaining_secs"],
            session_started_at=_utc(started_at),
            active_run_id=active[0] if active else None,
            active_run_ids=active,
            best_run_id=best.run_id if best else None,
            best_val_bpb=best.val_bpb if best else None,
            budget=budget,
        )

    def runs(self) -> list[RunResult]:
        with self._transaction(write=False) as db:
            remaining = self._remaining(db)
            rows = db.execute("SELECT result_json FROM runs ORDER BY run_id").fetchall()
        return [RunResult.model_validate_json(j).model_copy(update=remaining) for (j,) in rows]

    def get(self, run_id: int) -> RunResult | None:
        with self._transaction(write=False) as db:
            row = db.execute("SELECT result_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            remaining = self._remaining(db)
        return None if row is None else RunResult.model_validate_json(row[0]).model_copy(update=remaining)
