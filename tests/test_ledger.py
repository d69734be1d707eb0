"""The budget ledger: real SQLite, real processes, real full disks, no Ray."""
import inspect
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import fill

from budget.ledger import (
    INTERRUPTED_BY_CRASH,
    PENDING_FILE,
    RESERVE_BYTES,
    RESERVE_FILE,
    Ledger,
    LedgerWriteError,
    SessionLocked,
    SessionNotFound,
    check_code,
)
from budget.models import MAX_CODE_BYTES, Budget, BudgetExhausted, RunRefused, RunRequest, RunResult, RunStatus

ROOT = Path(__file__).resolve().parents[1]
CODE = "print('hello')\n"


def done(run_id: int, val_bpb: float = 2.0, verified: bool = True) -> RunResult:
    return RunResult(run_id=run_id, status=RunStatus.completed if verified else RunStatus.unverified,
                     val_bpb=val_bpb, reported_val_bpb=val_bpb, verified=verified)


def python(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_a_run_is_charged_when_it_starts(tmp_path):
    with Ledger.open(tmp_path, Budget(max_runs=5)) as ledger:
        run_id = ledger.reserve(RunRequest(train_code=CODE, description="first", hypothesis="it runs"))
        assert run_id == 0
        status = ledger.status()
        assert (status.runs_used, status.runs_remaining, status.active_run_ids) == (1, 4, [0])
        running = ledger.get(0)
        assert running.status == RunStatus.running and running.description == "first"
        assert running.runs_remaining == 4 and running.match_time_remaining_secs > 10_000
        final = ledger.finish(0, done(0, 1.9))
        assert final.status == RunStatus.completed and final.description == "first"
        assert final.finished_at is not None and final.runs_remaining == 4
        assert ledger.status().active_run_ids == []


def test_refused_code_costs_nothing_and_says_why(tmp_path):
    with Ledger.open(tmp_path) as ledger:
        with pytest.raises(RunRefused) as syntax:
            ledger.reserve(RunRequest(train_code="import torch\n\ndef f(:\n    pass\n"))
        assert syntax.value.code == 422 and "line 3" in str(syntax.value) and "cost no run" in str(syntax.value)
        assert syntax.value.refusal.runs_remaining == 50
        with pytest.raises(RunRefused) as empty:
            ledger.reserve(RunRequest(train_code="  \n"))
        assert empty.value.code == 400 and "empty" in str(empty.value)
        too_big = "x = 1\n" + "#" * MAX_CODE_BYTES
        with pytest.raises(RunRefused) as big:
            ledger.reserve(RunRequest(train_code=too_big))
        assert big.value.code == 400 and "100,000-byte" in str(big.value) and "cost no run" in str(big.value)
        assert ledger.status().runs_used == 0 and ledger.runs() == []
    check_code("x = 1\n" + "#" * (MAX_CODE_BYTES - 7))  # exactly at the limit is fine


def test_the_51st_run_is_refused_with_exact_counts(tmp_path):
    with Ledger.open(tmp_path) as ledger:
        for i in range(50):
            ledger.finish(ledger.reserve(RunRequest(train_code=CODE)), done(i))
        with pytest.raises(BudgetExhausted) as info:
            ledger.reserve(RunRequest(train_code=CODE))
        assert info.value.code == 429 and "all 50 runs" in str(info.value)
        assert info.value.refusal.runs_remaining == 0
        status = ledger.status()
        assert (status.runs_used, status.runs_remaining) == (50, 0)
        assert [r.run_id for r in ledger.runs()] == list(range(50))


def test_a_run_that_may_outlast_the_session_is_not_started(tmp_path):
    with Ledger.open(tmp_path, Budget(session_secs=2.0, run_timeout_secs=1.5)) as ledger:
        ledger.finish(ledger.reserve(RunRequest(train_code=CODE)), done(0))
        time.sleep(0.6)
        with pytest.raises(BudgetExhausted) as info:
            ledger.reserve(RunRequest(train_code=CODE))
        assert info.value.code == 429 and "less than one run's 1.5 s timeout" in str(info.value)
        assert info.value.refusal.match_time_remaining_secs < 1.5
        assert ledger.status().runs_used == 1


def test_only_one_run_at_a_time_by_default(tmp_path):
    with Ledger.open(tmp_path) as ledger:
        ledger.reserve(RunRequest(train_code=CODE))
        with pytest.raises(RunRefused) as info:
            ledger.reserve(RunRequest(train_code=CODE))
        assert info.value.code == 409 and not isinstance(info.value, BudgetExhausted)
        assert "run 0 still running" in str(info.value)
        assert ledger.reserve(RunRequest(train_code=CODE), max_active=2) == 1
        assert ledger.status().runs_used == 2


def test_the_clock_keeps_running_and_the_stored_budget_wins(tmp_path):
    with Ledger.open(tmp_path, Budget(max_runs=7)) as ledger:
        first = ledger.status()
    time.sleep(0.3)
    with Ledger.open(tmp_path, Budget()) as ledger:  # no field set explicitly: the stored budget stays
        again = ledger.status()
    assert again.session_started_at == first.session_started_at
    assert again.match_time_remaining_secs <= first.match_time_remaining_secs - 0.3
    assert again.budget.max_runs == 7
    with Ledger.open(tmp_path, Budget(session_secs=3600)) as ledger:  # an explicit change is applied
        changed = ledger.status()
    assert changed.budget.max_runs == 7 and changed.budget.session_secs == 3600
    assert changed.session_started_at == first.session_started_at


def test_a_finished_run_is_recorded_once_and_best_counts_verified_only(tmp_path):
    with Ledger.open(tmp_path) as ledger:
        ledger.finish(ledger.reserve(RunRequest(train_code=CODE)), done(0, 2.0))
        ledger.finish(ledger.reserve(RunRequest(train_code=CODE)), done(1, 1.5, verified=False))
        again = ledger.finish(0, done(0, 0.1))
        assert again.val_bpb == 2.0
        status = ledger.status()
        assert (status.best_run_id, status.best_val_bpb, status.runs_used) == (0, 2.0, 2)


def test_recover_marks_an_in_flight_run_interrupted_exactly_once(tmp_path):
    harness = python(
        "import sys, time\n"
        "from budget.ledger import Ledger\n"
        "from budget.models import RunRequest\n"
        "ledger = Ledger.open(sys.argv[1])\n"
        "print(ledger.reserve(RunRequest(train_code='x = 1', description='in flight')), flush=True)\n"
        "time.sleep(60)\n", str(tmp_path))
    run_id = int(harness.stdout.readline())
    harness.send_signal(signal.SIGKILL)
    harness.wait()
    with Ledger.open(tmp_path) as ledger:
        assert ledger.recovered_run_ids == [run_id]
        run = ledger.get(run_id)
        assert run.status == RunStatus.interrupted and run.description == "in flight"
        assert len(run.reasons) == 1 and "harness stopped" in run.reasons[0]
    with Ledger.open(tmp_path) as ledger:
        assert ledger.recovered_run_ids == []
        assert len(ledger.get(run_id).reasons) == 1
        assert ledger.status().runs_used == 1


def test_one_harness_per_session(tmp_path):
    holder = python(
        "import sys, time\n"
        "from budget.ledger import Ledger\n"
        "ledger = Ledger.open(sys.argv[1])\n"
        "print('open', flush=True)\n"
        "time.sleep(60)\n", str(tmp_path))
    assert holder.stdout.readline().strip() == "open"
    try:
        with pytest.raises(SessionLocked) as info:
            Ledger.open(tmp_path)
        assert f"pid {holder.pid}" in str(info.value) and "--session" in str(info.value)
        with Ledger.open(tmp_path, exclusive=False) as reader:  # readers need no lock
            assert reader.status().runs_used == 0
    finally:
        holder.kill()
        holder.wait()
    Ledger.open(tmp_path).close()  # the lock died with its holder


def test_readers_need_an_existing_session_and_cannot_recover(tmp_path):
    with pytest.raises(SessionNotFound, match="pgolf-agent submit"):
        Ledger.open(tmp_path / "none", exclusive=False)
    Ledger.open(tmp_path).close()
    with Ledger.open(tmp_path, exclusive=False) as reader, pytest.raises(RuntimeError, match="exclusive"):
        reader.recover()


def test_racing_processes_never_overspend(tmp_path):
    with Ledger.open(tmp_path, Budget(max_runs=10)) as ledger:
        for i in range(7):
            ledger.finish(ledger.reserve(RunRequest(train_code=CODE)), done(i))
    start_at = str(time.time() + 3)  # every racer imports first, then all reserve at the same instant
    racers = [python(
        "import json, sys, time\n"
        "from budget.ledger import Ledger\n"
        "from budget.models import RunRefused, RunRequest\n"
        "ledger = Ledger.open(sys.argv[1], exclusive=False)\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "try:\n"
        "    print(json.dumps({'run_id': ledger.reserve(RunRequest(train_code='x = 1'), max_active=99)}))\n"
        "except RunRefused as exc:\n"
        "    print(json.dumps({'code': exc.code}))\n", str(tmp_path), start_at) for _ in range(8)]
    answers = [json.loads(racer.communicate(timeout=60)[0]) for racer in racers]
    won = sorted(a["run_id"] for a in answers if "run_id" in a)
    assert won == [7, 8, 9]
    assert sorted(a.get("code") for a in answers if "code" in a) == [429] * 5
    with Ledger.open(tmp_path, exclusive=False) as reader:
        assert (reader.status().runs_used, reader.status().runs_remaining) == (10, 0)


def test_racing_threads_never_overspend(tmp_path):
    with Ledger.open(tmp_path, Budget(max_runs=4)) as ledger:
        won, refused = [], []
        gate = threading.Barrier(8)

        def racer():
            gate.wait()
            try:
                won.append(ledger.reserve(RunRequest(train_code=CODE), max_active=99))
            except BudgetExhausted as exc:
                refused.append(exc.code)

        threads = [threading.Thread(target=racer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(won) == [0, 1, 2, 3] and refused == [429] * 4
        assert ledger.status().runs_used == 4


def test_the_lock_file_names_the_harness(tmp_path):
    with Ledger.open(tmp_path, harness_pid=os.getppid()):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["harness_pid"] == os.getppid()


# --- a full disk ------------------------------------------------------------------------------------

SMALL_DISK_MIB = 4  # the ledger alone: a few MiB fill quickly


def integrity(session: Path) -> str:
    with sqlite3.connect(session / "ledger.sqlite") as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def test_a_full_disk_never_loses_an_outcome(small_disk):
    session = small_disk / "session"
    reserve = session / RESERVE_FILE
    ledger = Ledger.open(session, Budget(max_runs=5))
    try:
        assert reserve.stat().st_size == RESERVE_BYTES
        assert reserve.stat().st_blocks * 512 >= RESERVE_BYTES  # real bytes, not a sparse file
        first = ledger.reserve(RunRequest(train_code=CODE, description="first"))
        second = ledger.reserve(RunRequest(train_code=CODE, description="second"), max_active=2)

        filler = fill(small_disk / "filler")  # e.g. a run that wrote until the disk was full
        recorded = ledger.finish(first, done(first, 1.9))  # the reserve makes room for the outcome
        assert recorded.status == RunStatus.completed and recorded.description == "first"
        assert not reserve.exists()  # given back to the disk, not re-made: no room for it
        assert ledger.get(first).val_bpb == 1.9 and ledger.pending == {}
        with pytest.raises(RunRefused) as full:  # no room to be sure of the next outcome: refused, not charged
            ledger.reserve(RunRequest(train_code=CODE), max_active=5)
        assert full.value.code == 507 and "nearly full" in str(full.value) and "2 MiB" in str(full.value)
        assert f"free disk space in {session}" in str(full.value) and "cost no run" in str(full.value)
        assert ledger.status().runs_used == 2

        filler2 = fill(small_disk / "filler2")  # and now even the reserve's space is used up
        before = time.time()
        with pytest.raises(LedgerWriteError) as info:
            ledger.finish(second, done(second, 1.8))
        message = str(info.value)
        assert f"the outcome of run {second} (completed) could not be recorded" in message
        assert "database or disk is full" in message and f"free disk space in {session}" in message
        assert str(session / PENDING_FILE) in message and "recorded as soon as a write succeeds" in message
        # nothing is corrupt, the outcome is held and shown for what it is
        assert integrity(session) == "ok"
        assert ledger.get(first).val_bpb == 1.9
        held = ledger.get(second)
        assert held.status == RunStatus.completed and held.val_bpb == 1.8 and held.description == "second"
        assert held.reasons[-1].startswith("not yet recorded in the ledger: database or disk is full; "
                                           f"free disk space in {session}; it will be recorded as soon")
        status = ledger.status()
        assert (status.unrecorded_run_ids, status.active_run_ids, status.runs_used) == ([second], [], 2)
        assert status.best_run_id == second  # 1.8, held: the truth, not yet on disk
        with Ledger.open(session, exclusive=False) as reader:  # on disk: not recorded, not a false outcome
            assert reader.get(second).status == RunStatus.running and reader.get(first).val_bpb == 1.9
        # no new run while an outcome waits: refused, not charged, and says why and what to do
        with pytest.raises(RunRefused) as refused:
            ledger.reserve(RunRequest(train_code=CODE), max_active=5)
        assert refused.value.code == 507 and not isinstance(refused.value, BudgetExhausted)
        assert f"the outcome of run {second} is not yet recorded" in str(refused.value)
        assert f"free disk space in {session}" in str(refused.value) and "cost no run" in str(refused.value)
        assert refused.value.refusal.runs_remaining == 3 and ledger.status().runs_used == 2

        filler.unlink()  # the cause is gone: the held outcome is written at the next attempt
        filler2.unlink()
        assert ledger.flush_pending() == [second] and ledger.pending == {}
        again = ledger.get(second)
        assert again.status == RunStatus.completed and again.val_bpb == 1.8
        assert not any("not yet recorded" in reason for reason in again.reasons)
        assert before <= again.finished_at.timestamp() <= before + 5  # when the run ended, not when it was written
        assert reserve.stat().st_size == RESERVE_BYTES  # made again once there was room
        assert (session / PENDING_FILE).read_bytes().strip(b"\0") == b""
        assert ledger.reserve(RunRequest(train_code=CODE), max_active=5) == 2
    finally:
        ledger.close()
    assert integrity(session) == "ok"
    with Ledger.open(session) as ledger:
        assert ledger.recovered_run_ids == [2]  # left running on purpose above
        assert [r.status for r in ledger.runs()] == [RunStatus.completed, RunStatus.completed, RunStatus.interrupted]


HOLDING_HARNESS = """
import errno, os, sys, time
from budget.ledger import Ledger, LedgerWriteError
from budget.models import RunRequest, RunResult, RunStatus

disk = sys.argv[1]
ledger = Ledger.open(disk + "/session")
for i in range(4):
    ledger.reserve(RunRequest(train_code="x = 1", description=f"run {i}"), max_active=4)
fill(disk + "/filler")
ledger.finish(0, RunResult(run_id=0, status=RunStatus.completed, val_bpb=2.0, verified=True))  # uses the reserve
fill(disk + "/filler2")
for result in (RunResult(run_id=1, status=RunStatus.completed, val_bpb=1.5, verified=True, stdout_tail="log " * 900),
               RunResult(run_id=2, status=RunStatus.crashed, reasons=["x" * 300_000])):  # too big for the note
    try:
        ledger.finish(result.run_id, result)
    except LedgerWriteError as exc:
        print(exc, flush=True)
time.sleep(60)  # run 3 is still in flight when this harness is killed
"""


def test_outcomes_held_when_the_harness_dies_are_recorded_truthfully(small_disk):
    session = small_disk / "session"
    harness = python("import errno, os\nfrom pathlib import Path\n" + inspect.getsource(fill) + HOLDING_HARNESS,
                     str(small_disk))
    held = [harness.stdout.readline() for _ in range(2)]
    harness.send_signal(signal.SIGKILL)
    harness.wait()
    assert all("could not be recorded in the ledger: database or disk is full" in line for line in held), held

    with pytest.raises(LedgerWriteError) as info:  # still full: a clear error, and nothing is lost
        Ledger.open(session)
    assert "database or disk is full" in str(info.value) and f"free disk space in {session}" in str(info.value)
    assert integrity(session) == "ok"

    (small_disk / "filler").unlink()
    (small_disk / "filler2").unlink()
    with Ledger.open(session) as ledger:
        assert ledger.recovered_run_ids == [1, 2, 3]
        late, unknown, in_flight = ledger.get(1), ledger.get(2), ledger.get(3)
    assert late.status == RunStatus.completed and late.val_bpb == 1.5 and late.counts_as_best
    assert late.description == "run 1" and late.stdout_tail.startswith("log log")
    assert late.reasons == ["recorded when the session was next opened: the harness could not write this outcome "
                            "to the ledger (database or disk is full) before it stopped"]
    assert unknown.status == RunStatus.interrupted and unknown.description == "run 2"
    assert unknown.reasons == ["outcome unknown: the harness could not record it (database or disk is full) "
                               "before it stopped; the run is charged"]
    assert in_flight.status == RunStatus.interrupted and in_flight.reasons == [INTERRUPTED_BY_CRASH]
    with Ledger.open(session) as ledger:  # recorded once
        assert ledger.recovered_run_ids == []
        assert [len(r.reasons) for r in ledger.runs()] == [0, 1, 1, 1]
        assert ledger.status().runs_used == 4 and ledger.status().best_run_id == 1
    assert (session / PENDING_FILE).read_bytes().strip(b"\0") == b""
