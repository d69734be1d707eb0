"""The budget ledger: real SQLite, real processes, no Ray."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from budget.ledger import Ledger, SessionLocked, SessionNotFound, check_code
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
