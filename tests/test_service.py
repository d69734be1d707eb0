"""The training service end to end: real Ray, real sandboxed runs, real processes killed for real."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import fill

from budget.ledger import RESERVE_BYTES, RESERVE_FILE, Ledger, SessionLocked
from budget.models import Budget, RunRefused, RunRequest, RunStatus, ServiceSettings
from budget.service import TrainingService

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# A tiny model that trains for TIME_BUDGET and hands itself to evaluate_bpb. It names its process
# after MARKER (visible in /proc/<pid>/comm) so a test can tell whether it is still alive.
TINY_TRAIN = '''\
import ctypes
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import TIME_BUDGET, VOCAB_SIZE, evaluate_bpb, make_dataloader

ctypes.CDLL(None).prctl(15, b"MARKER", 0, 0, 0)  # PR_SET_NAME
torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(VOCAB_SIZE, 32), nn.Linear(32, VOCAB_SIZE))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
batches = make_dataloader(8, 64)
start, steps = time.time(), 0
while time.time() - start < TIME_BUDGET:
    x, y = next(batches)
    loss = F.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    steps += 1
    if steps % 200 == 0:
        print(f"step {steps} loss {loss.item():.3f}", file=sys.stderr, flush=True)
val_bpb = evaluate_bpb(model, 64)
print(json.dumps({"val_bpb": val_bpb, "train_loss": loss.item(), "total_steps": steps,
                  "num_params_M": sum(p.numel() for p in model.parameters()) / 1e6}))
'''


def tiny_train(marker: str = "pgolf-tiny") -> str:
    return TINY_TRAIN.replace("MARKER", marker[:15])


def new_marker() -> str:
    return "pgt-" + uuid.uuid4().hex[:10]


def marked_pids(marker: str) -> list[int]:
    """Live (not zombie) processes named `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == marker \
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def process_tree(root: int) -> dict[int, str]:
    """pid -> start time of root and every process below it."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(entry.name)] = (int(fields[1]), fields[19])
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in procs:
            found[pid] = procs[pid][1]
            frontier.extend(p for p, (ppid, _) in procs.items() if ppid == pid)
    return found


def alive(tree: dict[int, str]) -> dict[int, str]:
    still = {}
    for pid, start in tree.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            still[pid] = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:120]
    return still


def tiny_budget(**changes) -> Budget:
    return Budget(**{"max_runs": 3, "time_budget_secs": 2, "run_timeout_secs": 30, **changes})


def test_a_run_end_to_end(corpus, local_ray, tmp_path):
    progress = []
    with TrainingService(ServiceSettings(session_dir=tmp_path, budget=tiny_budget())) as service:
        result = service.submit(RunRequest(train_code=tiny_train(), description="tiny", hypothesis="it learns"),
                                on_progress=progress.append)
        assert result.status == RunStatus.completed, result.reasons
        assert result.verified and result.sandboxed and result.counts_as_best
        assert 0 < result.val_bpb < 8 and result.reported_val_bpb == pytest.approx(result.val_bpb, abs=1e-3)
        assert result.runs_remaining == 2 and 0 < result.match_time_remaining_secs < 10_800
        assert result.description == "tiny" and result.total_steps > 0
        assert progress and progress[-1].run_id == 0 and progress[-1].elapsed_secs > 0
        run_dir = tmp_path / "runs" / "000"
        assert sorted(p.name for p in run_dir.iterdir()) == ["result.json", "stderr.log", "stdout.log", "train.py"]
        assert (run_dir / "train.py").read_text() == tiny_train()

        with pytest.raises(RunRefused) as refused:
            service.submit(RunRequest(train_code="def broken(:\n"))
        assert refused.value.code == 422 and refused.value.refusal.runs_remaining == 2
        status = service.status()
        assert (status.runs_used, status.runs_remaining, status.best_run_id) == (1, 2, 0)
        assert [r.run_id for r in service.runs()] == [0] and service.get(0).val_bpb == result.val_bpb

        with pytest.raises(SessionLocked, match=f"pid {os.getpid()}"):
            TrainingService(ServiceSettings(session_dir=tmp_path))


def test_cancel_all_kills_the_run_and_records_it_interrupted(corpus, local_ray, tmp_path):
    marker = new_marker()
    with TrainingService(ServiceSettings(session_dir=tmp_path, budget=tiny_budget(time_budget_secs=120,
                                                                                  run_timeout_secs=150))) as service:
        run_id = service.submit_async(RunRequest(train_code=tiny_train(marker), description="cancelled"))
        wait_until(lambda: marked_pids(marker), 60, "the run's training process")
        began = time.monotonic()
        [cancelled] = service.cancel_all()
        took = time.monotonic() - began
        assert cancelled.run_id == run_id and cancelled.status == RunStatus.interrupted
        assert any("stopped by the harness" in reason for reason in cancelled.reasons)
        assert not marked_pids(marker)
        assert took < 10, f"cancel took {took:.1f} s"
        assert service.status().runs_used == 1 and service.status().active_run_ids == []


def test_concurrent_runs_share_the_slots(corpus, local_ray, tmp_path):
    settings = ServiceSettings(session_dir=tmp_path, budget=tiny_budget(time_budget_secs=1), concurrency=2,
                               cpus_per_run=1)
    with TrainingService(settings) as service:
        first = service.submit_async(RunRequest(train_code=tiny_train(), description="a"))
        second = service.submit_async(RunRequest(train_code=tiny_train(), description="b"))
        with pytest.raises(RunRefused) as busy:
            service.submit_async(RunRequest(train_code=tiny_train()))
        assert busy.value.code == 409
        results = service.wait()
        assert [r.run_id for r in results] == [first, second]
        assert all(r.status == RunStatus.completed for r in results), [r.reasons for r in results]
        assert service.status().runs_remaining == 1


HARNESS = """
import sys
from pathlib import Path
from budget.models import Budget, RunRequest, ServiceSettings
from budget.service import TrainingService

settings = ServiceSettings(session_dir=sys.argv[1], budget=Budget(max_runs=3, time_budget_secs=120, run_timeout_secs=150))
with TrainingService(settings) as service:
    service.submit(RunRequest(train_code=Path(sys.argv[2]).read_text(), description="in flight"))
"""


def test_kill_9_of_the_harness_loses_nothing_and_leaves_nothing(corpus, local_ray, tmp_path):
    marker = new_marker()
    train_file = tmp_path / "train.py"
    train_file.write_text(tiny_train(marker))
    session = tmp_path / "session"
    harness = subprocess.Popen([sys.executable, "-c", HARNESS, str(session), str(train_file)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: marked_pids(marker) or harness.poll() is not None, 90, "the run's training process")
        assert harness.poll() is None, harness.stderr.read()
        time.sleep(1.5)  # let the reaper take a snapshot that includes the training process
        tree = process_tree(harness.pid)
        harness.send_signal(signal.SIGKILL)
        harness.wait()
        wait_until(lambda: not marked_pids(marker), 15, "the training process to die")
        wait_until(lambda: not alive(tree), 30, f"the harness's processes to exit: {alive(tree)}")
    finally:
        harness.kill()
        harness.wait()

    with TrainingService(ServiceSettings(session_dir=session)) as service:
        assert service.recovered_run_ids == [0]
        run = service.get(0)
        assert run.status == RunStatus.interrupted and run.description == "in flight"
        assert sum("harness stopped" in reason for reason in run.reasons) == 1
        status = service.status()
        assert (status.runs_used, status.runs_remaining, status.active_run_ids) == (1, 2, [])
    with TrainingService(ServiceSettings(session_dir=session)) as service:
        assert service.recovered_run_ids == [] and service.status().runs_used == 1


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


def test_cli_submit_and_service_status(corpus, local_ray, tmp_path):
    session = tmp_path / "session"
    train_file = tmp_path / "train.py"
    train_file.write_text(tiny_train())
    done = cli("submit", str(train_file), "--session", str(session), "--time-budget", "1", "--budget", "3",
               "--description", "from the CLI", "--unsafe-no-sandbox", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and result["verified"] and result["runs_remaining"] == 2
    assert result["sandboxed"] is False and "--unsafe-no-sandbox" in done.stderr

    broken = tmp_path / "broken.py"
    broken.write_text("import torch\n\nfor x in range(3)\n    pass\n")
    refused = cli("submit", str(broken), "--session", str(session))
    assert refused.returncode == 2 and "line 3" in refused.stderr and "cost no run" in refused.stderr
    missing = cli("submit", str(tmp_path / "nope.py"), "--session", str(session))
    assert missing.returncode == 2 and "not found" in missing.stderr

    shown = cli("service", "status", "--session", str(session))
    assert shown.returncode == 0, shown.stderr
    assert "runs: 1 used, 2 remaining of 3" in shown.stdout
    header, row = shown.stdout.splitlines()[-2:]
    assert header.split("\t")[:3] == ["id", "status", "val_bpb"]
    assert row.split("\t")[:2] == ["0", "completed"] and row.endswith("from the CLI")
    assert "without the sandbox" in shown.stderr
    as_json = json.loads(cli("service", "status", "--session", str(session), "--json").stdout)
    assert as_json["status"]["runs_used"] == 1 and as_json["runs"][0]["description"] == "from the CLI"
    nothing = cli("service", "status", "--session", str(tmp_path / "none"))
    assert nothing.returncode == 2 and "no session" in nothing.stderr

    with TrainingService(ServiceSettings(session_dir=session)) as _:  # this process now drives the session
        locked = cli("submit", str(train_file), "--session", str(session))
    assert locked.returncode == 2 and f"in use by pid {os.getpid()}" in locked.stderr


# A tiny model as above, after PRELUDE, that keeps working on a full disk: no progress lines, and its
# report goes straight to stdout.log, which may have no room (the evaluator has the score anyway).
# TINY_TRAIN after PRELUDE; its last line may meet a full disk.
DISK_TRAIN = ("import os\n" + TINY_TRAIN).replace(
    'ctypes.CDLL(None).prctl(15, b"MARKER", 0, 0, 0)  # PR_SET_NAME\n', "PRELUDE\n").replace(
    "print(json.dumps(", "try:\n    print(json.dumps(").replace(
    "/ 1e6}))\n", "/ 1e6}), flush=True)\nexcept OSError:\n    pass\n").replace(
    '        print(f"step {steps} loss {loss.item():.3f}", file=sys.stderr, flush=True)\n', "        pass\n")

FILL_CWD = '''\
try:  # fill the disk the run folder is on
    with open("fill.bin", "wb", buffering=0) as f:
        while True:
            f.write(b"x" * (1 << 20))
except OSError:
    pass
'''

WAIT_FOR_FULL_DISK = '''\
ctypes.CDLL(None).prctl(15, b"MARKER", 0, 0, 0)  # PR_SET_NAME: the test fills the disk once it sees this
deadline = time.time() + 60
while os.statvfs(".").f_bavail > 0 and time.time() < deadline:
    time.sleep(0.05)
'''


def disk_train(prelude: str) -> str:
    return DISK_TRAIN.replace("PRELUDE", prelude)


@contextlib.contextmanager
def keep_full(path: Path):
    """Fill the disk, and keep it full until the block ends: take back every page anything frees."""
    fill(path)
    stop = threading.Event()

    def refill():
        while not stop.is_set():
            try:
                with open(path, "ab", buffering=0) as f:
                    f.write(b"x" * 4096)
            except OSError:
                time.sleep(0.001)

    thread = threading.Thread(target=refill, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()


def on_disk(session: Path, run_id: int):
    """The run as the ledger file holds it, read by another connection (no outcome held in memory)."""
    with Ledger.open(session, exclusive=False) as reader:
        return reader.get(run_id)


@pytest.mark.slow
def test_a_full_disk_loses_no_outcome_and_the_session_recovers(corpus, local_ray, small_disk):
    session = small_disk / "session"
    reserve = session / RESERVE_FILE
    with TrainingService(ServiceSettings(session_dir=session, budget=tiny_budget(max_runs=4))) as service:
        assert reserve.stat().st_size == RESERVE_BYTES

        # 1. The run itself fills the disk: its outcome is recorded all the same (the reserve makes room).
        filled = service.submit(RunRequest(train_code=disk_train(FILL_CWD), description="fills the disk"))
        assert filled.status not in (RunStatus.running, RunStatus.refused)
        assert not any("not yet recorded" in reason for reason in filled.reasons), filled.reasons
        recorded = on_disk(session, 0)
        assert (recorded.status, recorded.val_bpb, recorded.reasons) == (filled.status, filled.val_bpb, filled.reasons)
        fill_file = session / "runs" / "000" / "fill.bin"
        if fill_file.exists():  # the sandbox left what the run wrote: the disk is still full
            if filled.status != RunStatus.completed:
                assert any("No space left on device" in reason and "free space" in reason
                           for reason in filled.reasons), filled.reasons
            with pytest.raises(RunRefused) as full:  # no room to be sure of recording another outcome
                service.submit(RunRequest(train_code=tiny_train()))
            assert full.value.code == 507 and f"free disk space in {session}" in str(full.value)
            assert "cost no run" in str(full.value) and service.status().runs_used == 1
            fill_file.unlink()

        # 2. Space is back, and then the disk fills up (reserve gone) while the next run trains:
        #    its outcome is held, shown with why, and written as soon as there is room again.
        marker = new_marker()
        run_id = service.submit_async(RunRequest(train_code=disk_train(WAIT_FOR_FULL_DISK.replace("MARKER", marker)),
                                                 description="ends on a full disk"))
        assert run_id == 1 and reserve.exists()
        wait_until(lambda: marked_pids(marker), 90, "the run's training process")
        reserve.unlink()
        with keep_full(small_disk / "filler") as filler:  # also the little the run's clean-up frees
            [held] = service.wait([run_id])
        assert held.status not in (RunStatus.running, RunStatus.refused)
        assert held.reasons[-1].startswith("not yet recorded in the ledger: database or disk is full; "
                                           f"free disk space in {session}; it will be recorded as soon"), held.reasons
        assert on_disk(session, run_id).status == RunStatus.running  # on disk: not recorded, never a false outcome
        status = service.status()
        assert (status.unrecorded_run_ids, status.active_run_ids, status.runs_used) == ([run_id], [], 2)
        with pytest.raises(RunRefused) as waiting:
            service.submit(RunRequest(train_code=tiny_train()))
        assert waiting.value.code == 507 and f"the outcome of run {run_id} is not yet recorded" in str(waiting.value)
        assert f"free disk space in {session}" in str(waiting.value) and service.status().runs_used == 2

        filler.unlink()
        final = service.get(run_id)  # any call of the service writes what it holds
        assert (final.status, final.val_bpb, final.reasons) == (held.status, held.val_bpb, held.reasons[:-1])
        assert service.status().unrecorded_run_ids == []
        assert on_disk(session, run_id).status == held.status
        assert json.loads((session / "runs" / "001" / "result.json").read_text())["status"] == held.status.value

        # 3. The session works as before.
        again = service.submit(RunRequest(train_code=tiny_train(), description="after the disk was freed"))
        assert again.status == RunStatus.completed, again.reasons
        assert reserve.stat().st_size == RESERVE_BYTES
        assert service.status().runs_used == 3
