"""The session's budget ledger: one SQLite file that survives `kill -9` of any process.

Every state change is a single transaction (WAL journal, synchronous=FULL), so
a run exists exactly when its reservation has committed: a crash before the
commit leaves no run, a crash after it leaves a `running` row that the next
harness to open the session records as `interrupted` (and charged). Runs are
counted as rows, so none can be counted twice.

One harness drives a session at a time: it holds an exclusive flock on
`session_dir/.lock`. Readers (`pgolf-agent service status`) open the ledger
shared, without the lock, and see a consistent snapshot.

A full disk (or any other failed write) never loses a run's outcome and never leaves a false record:

- Space held in reserve: the harness keeps `session_dir/.ledger-reserve`, RESERVE_BYTES of real
  (random, so neither sparse nor compressible) bytes, made when the session opens and again after a
  successful write whenever the disk has room for it. When a write fails for want of space
  (SQLITE_FULL, a disk I/O error, ENOSPC), the ledger deletes the reserve and retries once, so the
  outcome of a run is recorded even when a run has filled the disk. A new run is refused (507, not
  charged) when the disk has no room for the reserve, or for the run's files beside it.
- Held outcomes: if the write still fails, `finish` raises LedgerWriteError (the message says what
  to free or fix) and keeps the outcome in memory; `get`, `runs` and `status` show it with the
  reason "not yet recorded in the ledger: ...", `flush_pending` (called by every `reserve`) retries
  it, and `reserve` refuses new runs (507, not charged) while any outcome is held. Nothing is
  written half-way: a failed transaction is rolled back whole.
- Held outcomes survive the harness: each is also written to `session_dir/.ledger-pending`, a
  PENDING_BYTES file made in advance and only ever overwritten in place, so writing it needs no new
  space on the usual file systems (ext4, xfs, tmpfs; not on copy-on-write ones such as btrfs or
  zfs). The next harness to open the session records such a run with its true outcome and the
  reason RECORDED_LATE, or, when the note could keep only the error, as `interrupted` with
  OUTCOME_UNKNOWN ("outcome unknown: the harness could not record it (...) before it stopped").
  A run the note does not name was still in flight when its harness stopped: INTERRUPTED_BY_CRASH.
  Only when neither the ledger nor the note could be written does the next open fall back to it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
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
RESERVE_FILE = ".ledger-reserve"
RESERVE_BYTES = 2 << 20       # given back to the disk when a write finds it full: room for many outcomes
RESERVE_SLACK = 512 << 10     # free beyond the reserve that a run needs to start; the reserve is made only then
PENDING_FILE = ".ledger-pending"
PENDING_BYTES = 256 << 10     # the note of outcomes not yet recorded, made in advance, overwritten in place

log = logging.getLogger(__name__)

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
OUTCOME_UNKNOWN = "outcome unknown: the harness could not record it ({problem}) before it stopped; the run is charged"
RECORDED_LATE = ("recorded when the session was next opened: the harness could not write this outcome to the "
                 "ledger ({problem}) before it stopped")
NOT_YET_RECORDED = ("not yet recorded in the ledger: {problem}; {advice}; it will be recorded as soon as the "
                    "write succeeds")


class SessionLocked(RuntimeError):
    """Another live harness drives this session."""


class SessionNotFound(FileNotFoundError):
    """No ledger in the session directory."""


class LedgerWriteError(RuntimeError):
    """The ledger could not be written (full disk, I/O error...); nothing was half-written.

    `problem` is what went wrong, `advice` what to do about it; the message says both.
    """

    def __init__(self, message: str, problem: str, advice: str):
        super().__init__(message)
        self.problem, self.advice = problem, advice

    def __reduce__(self):  # rebuilt as itself when it crosses a process boundary
        return type(self), (str(self), self.problem, self.advice)


def _short_of_space(exc: BaseException) -> bool:
    """A failed write that more free space may cure."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _problem(exc: BaseException) -> str:
    if isinstance(exc, (sqlite3.Error, OSError)):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _free_bytes(folder: Path) -> int | None:
    try:
        info = os.statvfs(folder)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


@dataclass
class _Held:
    """An outcome the ledger could not write yet."""

    result: RunResult
    problem: str
    advice: str
    finished_at: float


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
        self._held_lock = threading.RLock()  # the outcomes held in memory (below)
        self._held: dict[int, _Held] = {}
        self._note_fd: int | None = None
        self.recovered_run_ids: list[int] = []

    @classmethod
    def open(cls, session_dir: str | Path, budget: Budget | None = None, *, exclusive: bool = True,
             harness_pid: int | None = None, lock_wait_secs: float = 15.0) -> Ledger:
        """Create or resume a session.

        exclusive (the harness): takes the session lock, stores the start time on first open, applies
        the budget fields the caller set explicitly (the stored budget wins for the rest), records
        runs left `running` by a dead harness (as interrupted, or with the outcome it could not write),
        and makes the reserve. Shared (readers): no lock, the ledger must exist, the budget cannot change.
        Raises LedgerWriteError when the ledger cannot be opened or written (full disk...).
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
        conn = None
        try:
            try:
                conn = sqlite3.connect(session_dir / LEDGER_FILE, timeout=60, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before reserve/finish return
            except sqlite3.Error as exc:
                problem, advice = _problem(exc), cls._advice_for(session_dir, exc)
                raise LedgerWriteError(f"cannot open the ledger in {session_dir}: {problem}; {advice}",
                                       problem, advice) from exc
            ledger = cls(session_dir, conn, lock_fd)
            if exclusive:
                ledger._start_or_resume(budget)
                ledger.recovered_run_ids = ledger.recover()
                ledger._open_note()
                ledger._ensure_reserve()
        except BaseException:
            if conn is not None:
                conn.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return ledger

    def close(self) -> None:
        """Release the session. Outcomes still held stay in the note, for the next open to record."""
        if self._held and self._lock_fd is not None:
            self.flush_pending()
        with self._mutex:
            self._conn.close()
            if self._note_fd is not None:
                os.close(self._note_fd)
                self._note_fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transactions ------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, write: bool):
        """One atomic step; a write transaction takes SQLite's write lock at once (BEGIN IMMEDIATE).

        Whatever fails -- the step, or the COMMIT on a full disk -- rolls the whole step back.
        """
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL does)
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    @staticmethod
    def _advice_for(session_dir: Path, exc: BaseException) -> str:
        if _disk_full(exc):
            return f"free disk space in {session_dir}"
        return f"check that {session_dir} is writable and that its disk has free space and no errors"

    def _write(self, step, what: str):
        """step(db) in one write transaction; on a full disk, give back the reserve and try once more.

        Refusals and KeyError raised by step pass through; any other failure becomes LedgerWriteError
        (nothing written).
        """
        for attempt in (1, 2):
            try:
                with self._transaction(write=True) as db:
                    answer = step(db)
            except (RunRefused, KeyError):
                raise
            except Exception as exc:
                if attempt == 1 and _short_of_space(exc) and self._release_reserve():
                    log.warning("%s: %s; gave back the ledger's reserve in %s and retrying", what, _problem(exc),
                                self.session_dir)
                    continue
                problem, advice = _problem(exc), self._advice_for(self.session_dir, exc)
                raise LedgerWriteError(f"{what}: {problem}; {advice}", problem, advice) from exc
            self._ensure_reserve()
            return answer

    # --- the reserve and the note ------------------------------------------------------------------

    def _release_reserve(self) -> bool:
        try:
            (self.session_dir / RESERVE_FILE).unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot delete %s: %s", self.session_dir / RESERVE_FILE, exc)
            return False
        return True

    @staticmethod
    def _make_file(path: Path, data: bytes) -> None:
        """Write the whole of `path` or nothing (a temporary file renamed into place); raises OSError."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _ensure_reserve(self) -> bool:
        """The harness keeps RESERVE_BYTES of real bytes aside; True when they are there."""
        path = self.session_dir / RESERVE_FILE
        if self._lock_fd is None:
            return path.exists()
        try:
            if path.stat().st_size == RESERVE_BYTES:
                return True
        except FileNotFoundError:
            pass
        except OSError:
            return False
        free = _free_bytes(self.session_dir)
        if free is not None and free < RESERVE_BYTES + RESERVE_SLACK:
            return False
        try:
            self._make_file(path, os.urandom(RESERVE_BYTES))  # real bytes: a sparse or compressed file holds no space
        except OSError as exc:
            log.info("no room for the ledger's reserve in %s yet: %s", self.session_dir, exc)
            return False
        return True

    def _open_note(self) -> None:
        """Open the note of held outcomes (made in advance, full size); empty it once recovery has used it."""
        path = self.session_dir / PENDING_FILE
        try:
            made = path.stat().st_size == PENDING_BYTES
        except OSError:
            made = False
        try:
            if not made:
                self._make_file(path, bytes(PENDING_BYTES))
            self._note_fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            log.warning("cannot make %s (%s): an outcome the ledger cannot write would be lost if the harness "
                        "stopped", path, exc)
            return
        if made and os.pread(self._note_fd, 1, 0) != b"\0":  # what a stopped harness left; recover() has used it
            self._save_note()

    def _note_bytes(self) -> bytes:
        """The held outcomes as JSON that fits the note: long logs, then whole results, give way first."""
        held = sorted(self._held.items())
        results = {run_id: h.result.model_dump(mode="json") for run_id, h in held}

        def encode() -> bytes:
            return json.dumps({"pending": [{"run_id": run_id, "problem": h.problem[:2000], "finished_at": h.finished_at,
                                            "result": results[run_id]} for run_id, h in held]}).encode()

        data = encode()
        for run_id in sorted(results, key=lambda r: -len(json.dumps(results[r]))):
            if len(data) < PENDING_BYTES:
                break
            if results[run_id] is not None and (results[run_id]["stdout_tail"] or results[run_id]["stderr_tail"]):
                results[run_id] = {**results[run_id], "stdout_tail": "", "stderr_tail": ""}
                data = encode()
            if len(data) >= PENDING_BYTES:
                results[run_id] = None  # the error alone: the next open records the outcome as unknown
                data = encode()
        while len(data) >= PENDING_BYTES and held:
            held.pop()
            data = encode()
        return data

    def _save_note(self) -> bool:
        """Overwrite the note with the outcomes held now (in place: no new space needed)."""
        if self._note_fd is None:
            return False
        with self._held_lock:
            data = self._note_bytes() if self._held else b""
        try:
            os.pwrite(self._note_fd, data.ljust(PENDING_BYTES, b"\0"), 0)
            os.fsync(self._note_fd)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.session_dir / PENDING_FILE, exc)
            return False
        return True

    def _read_note(self) -> dict[int, tuple[str, RunResult | None, float]]:
        """What a stopped harness left in the note: run id -> (why it was not recorded, outcome or None, when)."""
        try:
            with open(self.session_dir / PENDING_FILE, "rb") as f:
                raw = f.read(PENDING_BYTES).split(b"\0", 1)[0].strip()
        except OSError:
            return {}
        if not raw:
            return {}
        notes = {}
        try:
            for entry in json.loads(raw)["pending"]:
                try:
                    result = RunResult.model_validate(entry["result"]) if entry.get("result") else None
                except ValidationError:
                    result = None
                notes[int(entry["run_id"])] = (str(entry["problem"]), result, float(entry["finished_at"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring an unreadable %s: %s", self.session_dir / PENDING_FILE, exc)
        return notes

    # --- the session -------------------------------------------------------------------------------

    def _start_or_resume(self, budget: Budget | None) -> None:
        def step(db):
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

        self._write(step, f"cannot open the session in {self.session_dir}")

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

    def _remaining_now(self) -> dict:
        try:
            with self._transaction(write=False) as db:
                return self._remaining(db)
        except sqlite3.Error:
            return {}

    # --- runs --------------------------------------------------------------------------------------

    def reserve(self, request: RunRequest, *, max_active: int = 1, sandboxed: bool = True) -> int:
        """Charge one run and return its id, or raise RunRefused/BudgetExhausted (nothing charged)."""
        try:
            check_code(request.train_code)
        except RunRefused as exc:
            raise RunRefused(exc.refusal.model_copy(update=self._remaining_now())) from None
        self.flush_pending()
        with self._held_lock:
            held = dict(self._held)
        if held:
            first = held[min(held)]
            ids = ", ".join(map(str, sorted(held)))
            raise RunRefused(Refusal(
                code=507, **self._remaining_now(),
                message=f"the outcome of run {ids} is not yet recorded in the ledger ({first.problem}); "
                        f"{first.advice}, then submit again (this cost no run)"))
        if self._lock_fd is not None:  # the harness: room for the run's files, and the reserve for its outcome
            has_reserve = self._ensure_reserve()
            needed = RESERVE_SLACK + (0 if has_reserve else RESERVE_BYTES)
            free = _free_bytes(self.session_dir)
            if free is not None and free < needed:
                raise RunRefused(Refusal(
                    code=507, **self._remaining_now(),
                    message=f"the disk holding {self.session_dir} is nearly full: {free / 2**20:.1f} MiB free, less "
                            f"than the {needed / 2**20:.1f} MiB a run needs to start"
                            + ("" if has_reserve else f" (with the {RESERVE_BYTES >> 20} MiB the ledger keeps in "
                                                      "reserve to be sure to record its outcome)")
                            + f"; free disk space in {self.session_dir}, then submit again (this cost no run)"))
        code_sha256 = hashlib.sha256(request.train_code.encode("utf-8", "surrogatepass")).hexdigest()

        def step(db):
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

        try:
            return self._write(step, "the ledger cannot record a new run")
        except LedgerWriteError as exc:
            raise RunRefused(Refusal(code=507, **self._remaining_now(),
                                     message=f"{exc}, then submit again (this cost no run)")) from None

    @staticmethod
    def _outcome(stored: RunResult, result: RunResult, finished_at: float, *reasons: str) -> RunResult:
        """A run's record: its outcome, with what only the reservation knows."""
        return result.model_copy(update={
            "run_id": stored.run_id, "description": stored.description, "hypothesis": stored.hypothesis,
            "seed": stored.seed if result.seed is None else result.seed,
            "code_sha256": result.code_sha256 or stored.code_sha256, "started_at": stored.started_at,
            "finished_at": _utc(finished_at), "reasons": [*result.reasons, *reasons],
            "runs_remaining": None, "match_time_remaining_secs": None})

    def _record(self, db: sqlite3.Connection, run_id: int, result: RunResult, finished_at: float,
                *reasons: str) -> RunResult:
        row = db.execute("SELECT status, result_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"run {run_id} was never reserved in {self.session_dir}")
        stored = RunResult.model_validate_json(row[1])
        if row[0] == RunStatus.running.value:
            stored = self._outcome(stored, result, finished_at, *reasons)
            db.execute("UPDATE runs SET status = ?, finished_at = ?, result_json = ? WHERE run_id = ? AND status = ?",
                       (stored.status.value, finished_at, stored.model_dump_json(), run_id, RunStatus.running.value))
        return stored.model_copy(update=self._remaining(db))

    def finish(self, run_id: int, result: RunResult) -> RunResult:
        """Record a run's outcome once; a run already final keeps its first record.

        When the ledger cannot be written, raises LedgerWriteError and holds the outcome (in memory and
        in the note) until `flush_pending` or a later open records it.
        """
        if result.status in (RunStatus.running, RunStatus.refused):
            raise ValueError(f"run {run_id}: {result.status.value!r} is not an outcome")
        now = time.time()
        try:
            final = self._write(lambda db: self._record(db, run_id, result, now),
                                f"the outcome of run {run_id} could not be recorded in the ledger")
        except LedgerWriteError as exc:
            with self._held_lock:
                self._held[run_id] = _Held(result, exc.problem, exc.advice, now)
            kept = "kept in memory and in " + str(self.session_dir / PENDING_FILE) if self._save_note() else \
                "kept in memory only"
            raise LedgerWriteError(f"the outcome of run {run_id} ({result.status.value}) could not be recorded in "
                                   f"the ledger: {exc.problem}; {exc.advice}; it is {kept} and will be recorded "
                                   "as soon as a write succeeds", exc.problem, exc.advice) from exc.__cause__
        with self._held_lock:
            dropped = self._held.pop(run_id, None)
        if dropped is not None:
            self._save_note()
        return final

    @property
    def pending(self) -> dict[int, str]:
        """Outcomes held because the ledger could not write them: run id -> why."""
        with self._held_lock:
            return {run_id: h.problem for run_id, h in sorted(self._held.items())}

    def flush_pending(self) -> list[int]:
        """Try again to record every held outcome; returns the runs recorded now."""
        recorded = []
        with self._held_lock:
            for run_id, held in sorted(self._held.items()):
                try:
                    self._write(lambda db: self._record(db, run_id, held.result, held.finished_at),
                                f"the outcome of run {run_id} could not be recorded in the ledger")
                except LedgerWriteError as exc:
                    held.problem, held.advice = exc.problem, exc.advice
                    break
                del self._held[run_id]
                recorded.append(run_id)
            if recorded:
                self._save_note()
        for run_id in recorded:
            log.warning("run %d's outcome is now recorded in the ledger", run_id)
        return recorded

    def recover(self) -> list[int]:
        """Record every run a dead harness left `running` (charged): with the outcome its note kept, as
        outcome unknown when the note kept only the error, else as interrupted. Lock holder only."""
        if self._lock_fd is None:
            raise RuntimeError("recover() needs the session lock: open the ledger with exclusive=True")
        notes = self._read_note()

        def step(db):
            recovered = []
            now = time.time()
            rows = db.execute("SELECT run_id, result_json FROM runs WHERE status = ?",
                              (RunStatus.running.value,)).fetchall()
            for run_id, result_json in rows:
                if run_id in self._held:
                    continue  # held by this harness, which is alive
                stale = RunResult.model_validate_json(result_json)
                problem, outcome, finished_at = notes.get(run_id, (None, None, now))
                if outcome is not None:
                    self._record(db, run_id, outcome, finished_at, RECORDED_LATE.format(problem=problem))
                else:
                    reason = INTERRUPTED_BY_CRASH if problem is None else OUTCOME_UNKNOWN.format(problem=problem)
                    record = stale.model_copy(update={"status": RunStatus.interrupted, "finished_at": _utc(now),
                                                      "reasons": [*stale.reasons, reason]})
                    db.execute("UPDATE runs SET status = ?, finished_at = ?, result_json = ? "
                               "WHERE run_id = ? AND status = ?",
                               (record.status.value, now, record.model_dump_json(), run_id, RunStatus.running.value))
                recovered.append(run_id)
            return recovered

        return self._write(step, f"cannot record the runs the last harness left in {self.session_dir}")

    # --- reading -----------------------------------------------------------------------------------

    def _shown(self, stored: RunResult) -> RunResult:
        """A run as this process knows it: a held outcome is shown, with why it is not recorded yet."""
        held = self._held.get(stored.run_id)
        if held is None or stored.status != RunStatus.running:
            return stored
        return self._outcome(stored, held.result, held.finished_at,
                             NOT_YET_RECORDED.format(problem=held.problem, advice=held.advice))

    def status(self) -> BudgetStatus:
        with self._transaction(write=False) as db:
            budget, started_at = self._session(db)
            remaining = self._remaining(db)
            (used,) = db.execute("SELECT COUNT(*) FROM runs").fetchone()
            active = [r for (r,) in db.execute("SELECT run_id FROM runs WHERE status = ? ORDER BY run_id",
                                               (RunStatus.running.value,))]
            completed = [RunResult.model_validate_json(j) for (j,) in db.execute(
                "SELECT result_json FROM runs WHERE status = ?", (RunStatus.completed.value,))]
            running = [RunResult.model_validate_json(j) for (j,) in db.execute(
                "SELECT result_json FROM runs WHERE status = ?", (RunStatus.running.value,))]
        with self._held_lock:  # never taken inside a transaction: flush_pending takes them the other way round
            unrecorded = [r for r in active if r in self._held]
            completed += [self._shown(r) for r in running if r.run_id in self._held]
        active = [r for r in active if r not in unrecorded]
        best = min((r for r in completed if r.counts_as_best), key=lambda r: (r.val_bpb, r.run_id), default=None)
        return BudgetStatus(
            runs_used=used,
            runs_remaining=remaining["runs_remaining"],
            match_time_remaining_secs=remaining["match_time_remaining_secs"],
            session_started_at=_utc(started_at),
            active_run_id=active[0] if active else None,
            active_run_ids=active,
            unrecorded_run_ids=unrecorded,
            best_run_id=best.run_id if best else None,
            best_val_bpb=best.val_bpb if best else None,
            budget=budget,
        )

    def runs(self) -> list[RunResult]:
        with self._transaction(write=False) as db:
            remaining = self._remaining(db)
            rows = db.execute("SELECT result_json FROM runs ORDER BY run_id").fetchall()
        with self._held_lock:
            return [self._shown(RunResult.model_validate_json(j)).model_copy(update=remaining) for (j,) in rows]

    def get(self, run_id: int) -> RunResult | None:
        with self._transaction(write=False) as db:
            row = db.execute("SELECT result_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            remaining = self._remaining(db)
        if row is None:
            return None
        with self._held_lock:
            return self._shown(RunResult.model_validate_json(row[0])).model_copy(update=remaining)
