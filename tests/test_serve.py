"""`pgolf-agent serve` and `run --service-url`: the reference HTTP protocol both ways, over a real socket.

The server is the real command in a subprocess (real Ray, real sandboxed runs); the client side is a
plain HTTP client (urllib), or this project's researcher running against it as another process.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_service import tiny_train
from test_session import TINY, check_record, stub_researcher

from agent.outcome import ExitCode, StopKind
from agent.session import Session, SessionSettings
from tests.stub_llm_server import StubLLMServer

from budget.http_api import MAX_BODY_BYTES, is_loopback, parse_submission, run_number
from budget.ledger import Ledger
from budget.models import RunRequest, RunStatus
from budget.remote import RemoteService, result_from
from budget.service import ServiceUnavailable
from trainer.contention import CONTENDED
from logs.trajectory import SessionEvent, ToolCallEvent, read_events

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str = "GET", body: bytes | dict | None = None, token: str | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    """One request with the standard library; (status, JSON answer) whatever the status."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": content_type} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers),
                                    timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start_server(session: Path, port: int, *flags: str, token: str | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--port", str(port), "--session",
                             str(session), *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "serve did not answer within 180 s"
        try:
            if call(f"http://127.0.0.1:{port}/health", token=token)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, sig=signal.SIGINT) -> str:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    return out


def poll(url: str, token: str | None = None, limit: float = 300) -> dict:
    deadline = time.time() + limit
    while True:
        code, answer = call(url, token=token)
        assert code == 200, answer
        if answer["status"] != "running":
            return answer
        assert time.time() < deadline, f"still running after {limit} s"
        time.sleep(1)


def export(session: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "export", str(session)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# --- fast -------------------------------------------------------------------------------------------

def test_bad_bodies_are_named():
    cases = {b"{": "not JSON (line 1", b"[1]": "a JSON array, not an object", b"{}": '"train_code" is missing',
             b'{"train_code": 5}': '"train_code" must be a valid string (received a JSON number)',
             b'{"train_code": "x", "seed": "7"}': '"seed" must be a valid integer (received a JSON string)',
             b'{"train_code": "x", "time_budget": 0}': '"time_budget" must be greater than 0'}
    for body, words in cases.items():
        with pytest.raises(Exception) as caught:
            parse_submission(body)
        assert caught.value.code == 400 and words in caught.value.body.error, (body, caught.value.body.error)
    # the reference's optional per-run time budget; fields nobody declared are ignored
    assert parse_submission(b'{"train_code": "print(1)", "time_budget": 30, "x": 1}').time_budget == 30


def test_run_ids_and_loopback():
    assert run_number("run-3") == 3 and run_number("3") == 3 and run_number("run-x") is None
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_a_public_bind_without_token_refuses_to_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--host", "0.0.0.0", "--session",
                           str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PGOLF_SERVE_TOKEN"})
    assert proc.returncode == 2 and "--token" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


def test_a_port_in_use_refuses_to_start(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--port", str(busy.getsockname()[1]),
                               "--session", str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Address already in use" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


def test_numbers_a_service_does_not_verify_are_marked_so():
    # the reference's documented answer for a finished run: no `verified`, so its number is only reported
    reference = {"run_id": "run-0", "status": "completed", "val_bpb": 1.0823, "train_loss": 2.41, "total_steps": 487,
                 "training_time_secs": 178.3, "num_params_M": 0.52, "error": None, "runs_remaining": 14}
    r = result_from(reference, 0, "http://arena")
    assert r.status == RunStatus.unverified and not r.verified and not r.counts_as_best
    assert r.val_bpb is None and r.reported_val_bpb == 1.0823 and r.total_steps == 487
    assert "not verified by this harness" in r.reasons[-1] and "http://arena" in r.reasons[-1]
    failed = result_from({"run_id": "run-1", "status": "error", "val_bpb": None, "error": "Training failed (exit 1)"},
                         1, "http://arena")
    assert failed.status == RunStatus.crashed and failed.reasons[0] == "Training failed (exit 1)"
    ours = result_from({"status": "completed", "val_bpb": 2.1, "reported_val_bpb": 2.0, "verified": True,
                        "reasons": [], "sandboxed": True}, 2, "http://ours")
    assert ours.counts_as_best and ours.val_bpb == 2.1 and ours.reported_val_bpb == 2.0 and ours.sandboxed


def test_a_service_that_does_not_answer_stops_before_anything(tmp_path):
    with pytest.raises(ServiceUnavailable, match="nothing answers at http://127.0.0.1"):
        RemoteService(f"http://127.0.0.1:{free_port()}", tmp_path / "s")
    assert not (tmp_path / "s").exists()


# --- slow: real Ray and real runs behind the socket ---------------------------------------------------

@pytest.mark.slow
def test_a_whole_session_over_http(tmp_path, corpus):
    session, port = tmp_path / "served", free_port()
    proc = start_server(session, port, "--host", "0.0.0.0", "--budget", "1", "--time-budget", "2",
                        "--token", TOKEN, token=TOKEN)
    url = f"http://127.0.0.1:{port}"
    try:
        for token in (None, "wrong"):
            code, answer = call(f"{url}/health", token=token)
            assert code == 401 and "Authorization: Bearer" in answer["error"]
        code, health = call(f"{url}/health", token=TOKEN)
        assert code == 200 and health["runs_remaining"] == 1 and health["match_time_remaining_secs"] > 10_000
        code, baseline = call(f"{url}/baseline", token=TOKEN)
        assert code == 200 and "evaluate_bpb" in baseline["train_code"] and baseline["baseline_val_bpb"] is None
        code, prepare = call(f"{url}/prepare", token=TOKEN)
        assert code == 200 and "def evaluate_bpb" in prepare["source"]

        # bad bodies: the reference's codes, an error naming the problem, nothing charged
        bad = {b"{not json": (400, "not JSON"), b'{"code": "x"}': (400, '"train_code" is missing'),
               b'{"train_code": 42}': (400, "must be a valid string"),
               json.dumps({"train_code": "x" * (MAX_BODY_BYTES + 10)}).encode(): (413, "limit"),
               json.dumps({"train_code": "x" * 100_001}).encode(): (400, "100,000-byte limit"),
               json.dumps({"train_code": "def broken(:\n"}).encode(): (422, "syntax error in train.py line 1")}
        for body, (status, words) in bad.items():
            code, answer = call(f"{url}/run", "POST", body, token=TOKEN)
            assert code == status and words in answer["error"], (code, answer)
        assert call(f"{url}/health", token=TOKEN)[1]["runs_remaining"] == 1  # no run charged by any of them

        code, started = call(f"{url}/run", "POST", {"train_code": tiny_train()}, token=TOKEN)
        assert code == 202, started
        assert started["run_id"] == "run-0" and started["status"] == "running" and started["runs_remaining"] == 0
        assert started["time_budget"] == 2
        assert isinstance(started["match_time_remaining_secs"], float)
        code, busy = call(f"{url}/run", "POST", {"train_code": tiny_train()}, token=TOKEN)
        assert code in (409, 429) and busy["error"], busy  # one run at a time (the budget is spent too)
        code, missing = call(f"{url}/runs/run-99", token=TOKEN)
        assert code == 404 and "run-99" in missing["error"]
        code, listed = call(f"{url}/runs", token=TOKEN)
        assert code == 200 and listed["active_run"]["run_id"] == "run-0" and listed["total_runs"] == 1

        run = poll(f"{url}/runs/run-0", token=TOKEN)
        assert run["status"] == "completed" and run["verified"] is True and run["error"] is None, run
        assert run["val_bpb"] > 0 and run["reported_val_bpb"] > 0 and "cpu_others" in run and run["sandboxed"]
        code, spent = call(f"{url}/run", "POST", {"train_code": tiny_train()}, token=TOKEN)
        assert code == 429 and "runs of this session are used" in spent["error"] and spent["runs_remaining"] == 0
        code, listed = call(f"{url}/runs", token=TOKEN)
        assert listed["best_val_bpb"] == run["val_bpb"] and listed["active_run"] is None
    finally:
        stop_server(proc)

    # the served session is a session: its ledger, its trajectory of HTTP calls, an export that checks
    events = read_events(session / "trajectory.jsonl")
    steps = [e for e in events if isinstance(e, ToolCallEvent)]
    assert {"GET /health", "GET /baseline", "GET /prepare", "POST /run", "GET /runs", "GET /runs/run-0"} <= {
        e.tool for e in steps}
    assert any(e.metadata["http_status"] == 401 and e.error for e in steps)
    assert [e.event for e in events if isinstance(e, SessionEvent)] == ["start", "end"]
    exported = export(session)
    assert exported.returncode == 0 and "a valid submission" in exported.stdout, exported.stdout + exported.stderr
    submission = json.loads((session / "submission.json").read_text())
    assert submission["answer"]["train_code"] == tiny_train()
    assert any(s["tool"] == "POST /run" for s in submission["metadata"]["replay_log"])


@pytest.mark.slow
def test_the_researcher_runs_against_a_served_session(tmp_path, corpus):
    served, port = tmp_path / "served", free_port()
    proc = start_server(served, port, "--budget", "3")  # 180 s runs, unless a submission asks for less
    client = tmp_path / "client"
    try:
        run = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--service-url", f"http://127.0.0.1:{port}",
                              "--agent", "random", "--budget", "3", "--time-budget", "2", "--session", str(client)],
                             cwd=ROOT, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "PGOLF_POLL_SECS": "1"})
    finally:
        stop_server(proc)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "training service: http://127.0.0.1" in run.stdout
    # the client's own record mirrors the service's runs, with the service's numbers
    mapping = json.loads((client / "remote_runs.json").read_text())
    served_runs = sorted((served / "runs").glob("[0-9]*"))
    assert mapping == {str(i): f"run-{i}" for i in range(len(served_runs))} and len(served_runs) >= 1
    theirs = [json.loads((d / "result.json").read_text()) for d in served_runs]
    if not any(r["verified"] for r in theirs):
        # No baseline the harness vouches for: the researcher has nothing to build on and there is no submission.
        # That happens only when other work took the cores (a contended run's clock runs over); say so, loudly.
        assert all(r["cpu_others"] > CONTENDED for r in theirs), theirs
        assert export(client).returncode == ExitCode.INVALID
        pytest.skip(f"every run shared its cores with other work ({[r['cpu_others'] for r in theirs]}): none verified")
    assert len(served_runs) == 3
    for local_id in range(3):
        mine = json.loads((client / "runs" / f"{local_id:03d}" / "result.json").read_text())
        theirs = json.loads((served / "runs" / f"{local_id:03d}" / "result.json").read_text())
        assert (mine["status"], mine["val_bpb"], mine["verified"]) == (theirs["status"], theirs["val_bpb"],
                                                                       theirs["verified"])
        assert theirs["training_secs"] < 10  # the client's --time-budget 2, not the service's 180
        assert (client / "runs" / f"{local_id:03d}" / "train.py").read_text() == \
            (served / "runs" / f"{local_id:03d}" / "train.py").read_text()
    exported = export(client)
    assert exported.returncode == 0 and "a valid submission" in exported.stdout, exported.stdout + exported.stderr
    checked = subprocess.run([sys.executable, "-m", "agent.cli", "export", "--check", str(client / "submission.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout
    assert export(served).returncode == 0  # and the served side's own record exports too


@pytest.mark.slow
def test_a_service_that_stops_answering_leaves_the_run_unknown_and_the_record_whole(tmp_path, corpus):
    served, port = tmp_path / "served", free_port()
    proc = start_server(served, port, "--budget", "3", "--time-budget", "20")
    client = RemoteService(f"http://127.0.0.1:{port}", tmp_path / "client", poll_secs=0.5, retry_secs=3)
    try:
        started = client.submit(RunRequest(train_code=tiny_train(), description="in flight when the service dies"),
                                wait=False)
        assert started.status == RunStatus.running and client.remote_ids == {0: "run-0"}
        os.killpg(proc.pid, signal.SIGKILL)  # the service and its run, gone without a word
        proc.wait()
        began = time.monotonic()
        [lost] = client.wait([started.run_id])
        assert time.monotonic() - began < 30  # bounded retries
        assert lost.status == RunStatus.interrupted and "outcome unknown" in lost.reasons[-1], lost.reasons
        assert "stopped answering" in client.ended and client.status().runs_remaining == 0
        assert client.submit_queued(RunRequest(train_code=tiny_train())).started(timeout=None) is None  # dropped
    finally:
        client.close()
    with Ledger.open(tmp_path / "client", exclusive=False) as ledger:  # the record, charged once
        assert [r.status for r in ledger.runs()] == [RunStatus.interrupted] and ledger.status().runs_used == 1
    result = json.loads((tmp_path / "client" / "runs" / "000" / "result.json").read_text())
    assert result["status"] == "interrupted"


@pytest.mark.slow
def test_an_llm_thinks_while_a_remote_run_trains(tmp_path, corpus, monkeypatch):
    """The LLM's background runs: submit_run returns at once, results are polled and appended to later results."""
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    monkeypatch.setenv("PGOLF_POLL_SECS", "1")
    served, port = tmp_path / "served", free_port()
    proc = start_server(served, port, "--budget", "3")
    try:
        with StubLLMServer(handler=stub_researcher) as stub:
            d = tmp_path / "client"
            end = Session(SessionSettings(session_dir=d, agent="openai", base_url=stub.base_url("openai"), budget=TINY,
                                          service_url=f"http://127.0.0.1:{port}")).run()
            assert not stub.errors
    finally:
        stop_server(proc)
    assert end.kind == StopKind.finished and "finished: done" in end.reason, end
    results, events = check_record(d, 3)
    assert "learning_rate = 5e-3" in (served / "runs" / "001" / "train.py").read_text()
    assert any(isinstance(e, ToolCallEvent) and e.tool == "submit_run" and "started" in (e.output or "")
               for e in events)  # it returned before the run ended
