"""Whole sessions on the real service: the offline researcher, a stub LLM over the real SDK, and resume after kill -9."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.outcome import ExitCode, StopKind
from agent.session import Session, SessionSettings
from budget.models import Budget
from logs.arena import Submission
from logs.trajectory import LLMCallEvent, SessionEvent, ToolCallEvent, read_events
from tests.stub_llm_server import StubLLMServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY = Budget(max_runs=3, session_secs=1800, time_budget_secs=2, run_timeout_secs=40)


def check_record(session_dir: Path, runs_expected: int):
    settings = SessionSettings.model_validate_json((session_dir / "settings.json").read_text())
    assert settings.session_dir == session_dir
    results = [json.loads(p.read_text()) for p in sorted(session_dir.glob("runs/*/result.json"))]
    assert len(results) == runs_expected
    events = read_events(session_dir / "trajectory.jsonl")
    submits = [e for e in events if isinstance(e, ToolCallEvent) and e.tool == "submit_run" and not e.error]
    assert len(submits) == runs_expected - 1  # run 0 is the harness's
    sub = Submission.model_validate_json((session_dir / "submission.json").read_text())
    assert sub.metadata.tool_call_count == sum(isinstance(e, ToolCallEvent) for e in events)
    assert "| run |" in (session_dir / "methodology.md").read_text()
    assert (session_dir / "best_train.py").read_text().strip()
    assert (session_dir / "progress.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert len((session_dir / "results.tsv").read_text().splitlines()) == runs_expected + 1
    return results, events


def test_search_session_spends_the_budget_exactly(tmp_path, corpus):
    d = tmp_path / "s"
    end = Session(SessionSettings(session_dir=d, agent="search", budget=TINY)).run()
    assert end.kind == StopKind.finished and end.reason.startswith("budget spent")  # it concluded with finish
    results, events = check_record(d, 3)
    assert results[0]["description"].startswith("baseline") and results[0]["verified"]
    assert results[1]["seed"] == 43  # noise measurement first
    assert any(isinstance(e, ToolCallEvent) and e.tool == "finish" for e in events)
    assert "conclusion" in (d / "notes.jsonl").read_text()


def stub_researcher(request):
    """Edits the learning rate, runs, sends one malformed call, then concludes when told the budget is spent."""
    last = request.last_tool_result()
    if last is None:
        return {"text": "raise the learning rate", "tool_calls": [
            {"name": "edit_file", "arguments": {"old_text": "learning_rate = 3e-3", "new_text": "learning_rate = 5e-3"}},
            {"name": "submit_run", "arguments": {"description": "lr 5e-3", "hypothesis": "faster progress"}}]}
    if "The budget is spent" in last:
        return {"tool_calls": [{"name": "write_note", "arguments": {"kind": "conclusion", "text": "lr helps"}},
                               {"name": "finish", "arguments": {"summary": "done"}}]}
    if "malformed" not in json.dumps(request.body):
        return {"text": "malformed on purpose", "tool_calls": [{"name": "list_runs", "arguments": "{not json"}]}
    return {"tool_calls": [{"name": "submit_run", "arguments": {"description": "lr 5e-3 seed 7", "hypothesis": "noise", "seed": 7}}]}


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_stub_llm_session_over_the_real_sdk(tmp_path, corpus, api, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY" if api == "anthropic" else "OPENAI_API_KEY", "dummy")
    with StubLLMServer(handler=stub_researcher) as stub:
        d = tmp_path / "s"
        settings = SessionSettings(session_dir=d, agent=api, base_url=stub.base_url(api), budget=TINY)
        end = Session(settings).run()
        assert not stub.errors
    assert end.kind == StopKind.finished and "finished: done" in end.reason
    results, events = check_record(d, 3)
    assert "learning_rate = 5e-3" in (d / "runs" / "001" / "train.py").read_text()
    llm = [e for e in events if isinstance(e, LLMCallEvent)]
    assert len(llm) == len(stub.requests) and all(e.input_tokens > 0 for e in llm)
    assert any(isinstance(e, ToolCallEvent) and e.error and "could not be read" in e.error for e in events)


def test_kill_9_mid_run_then_resume(tmp_path, corpus):
    d = tmp_path / "s"
    cmd = [sys.executable, "-m", "agent.cli", "run", "--agent", "search", "--budget", "4",
           "--time-budget", "8", "--timeout", "60", "--session", str(d)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while not (d / "runs" / "001" / "train.py").exists():  # run 1 is in flight
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    exported = subprocess.run([sys.executable, "-m", "agent.cli", "export", str(d)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)  # what the killed session had, checked on the way
    run0 = json.loads((d / "runs" / "000" / "result.json").read_text())
    assert exported.returncode == (ExitCode.OK if run0["verified"] else ExitCode.INVALID), exported.stdout
    assert re.search(r"\| 1 \| 0 \| 43 \| running \|", (d / "methodology.md").read_text())  # baseline, seed 43
    resumed = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--resume", str(d)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ledger_runs = json.loads(subprocess.run(
        [sys.executable, "-m", "agent.cli", "service", "status", "--session", str(d), "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    statuses = [r["status"] for r in ledger_runs["runs"]]
    assert len(statuses) == 4 and statuses[1] == "interrupted" and ledger_runs["status"]["runs_remaining"] == 0
    events = read_events(d / "trajectory.jsonl")
    assert any(isinstance(e, SessionEvent) and e.event == "resume" for e in events)
    assert not subprocess.run(["pgrep", "-f", str(d / "runs")], capture_output=True).stdout  # no leftover trainer


def as_in_a_terminal():
    """Ctrl-C's signal as a terminal's foreground process gets it: not ignored, not blocked (whatever the
    test process inherited or was left with by the tests before this one)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_cancels_the_run_and_writes_the_record(tmp_path, corpus):
    d = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--agent", "search", "--budget", "3",
                             "--time-budget", "20", "--timeout", "60", "--session", str(d)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=as_in_a_terminal)
    deadline = time.time() + 180
    while not (d / "runs" / "001" / "train.py").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED, out[-2000:]
    assert "interrupted by the user" in out
    run0 = json.loads((d / "runs" / "000" / "result.json").read_text())
    assert f"run 0 seed 42: {run0['val_bpb']:.4f}" in out  # the claim: the baseline, measured once
    run1 = json.loads((d / "runs" / "001" / "result.json").read_text())
    assert run1["status"] == "interrupted"
    assert re.search(r"\| 1 \| 0 \| 43 \| interrupted \|", (d / "methodology.md").read_text())
    assert not subprocess.run(["pgrep", "-f", str(d / "runs")], capture_output=True).stdout


def test_replay_drives_a_recorded_session_again(tmp_path, corpus):
    source = tmp_path / "recorded"
    Session(SessionSettings(session_dir=source, agent="search", budget=TINY)).run()
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "replay", str(source), "--session", str(again)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    codes = lambda d: [p.read_text() for p in sorted(d.glob("runs/*/train.py"))]
    assert codes(again) == codes(source)  # the same edits, in the same order
    recorded = [e.tool for e in read_events(source / "trajectory.jsonl") if isinstance(e, ToolCallEvent)]
    replayed = [e.tool for e in read_events(again / "trajectory.jsonl") if isinstance(e, ToolCallEvent)]
    assert replayed == recorded


def test_max_cost_needs_prices_and_stops_the_session(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    with StubLLMServer(handler=stub_researcher) as stub:
        settings = SessionSettings(session_dir=tmp_path / "s", agent="openai", base_url=stub.openai_base_url,
                                   budget=TINY, max_cost_usd=0.001, price_per_mtok=(1000.0, 1000.0))
        end = Session(settings).run()
    assert end.kind == StopKind.limit and end.exit_code == ExitCode.LIMIT
    assert "--max-cost $0.00 exceeded" in end.reason and len(stub.requests) == 2  # the preflight, then one turn


def test_retries_usage_and_the_preflight_are_recorded(tmp_path, corpus, monkeypatch):
    """An overloaded server is waited out with a line and a `retry` event; each call's tokens by kind and cost."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "dummy")
    overloaded = []

    def flaky(request):
        if len(overloaded) == 0 and request.last_tool_result() is not None:
            overloaded.append(request)
            return {"status": 529, "retry_after": "0.2"}
        return stub_researcher(request)

    with StubLLMServer(handler=flaky) as stub:
        settings = SessionSettings(session_dir=tmp_path / "s", agent="anthropic", base_url=stub.anthropic_base_url,
                                   budget=TINY)
        Session(settings).run()
    events = read_events(tmp_path / "s" / "trajectory.jsonl")
    retries = [e for e in events if isinstance(e, SessionEvent) and e.event == "retry"]
    assert len(retries) == 1 and retries[0].detail["attempt"] == 1 and "529" in retries[0].detail["error"]
    calls = [e for e in events if isinstance(e, LLMCallEvent)]
    assert calls[0].metadata["preflight"] and len(calls) == len(stub.requests) - 1  # the 529 is no call
    assert all(c.metadata["cost_usd"] > 0 for c in calls)  # claude-sonnet-5-5 is in the price table
    assert sum(c.metadata["cache_read_tokens"] for c in calls[2:]) > 0 < calls[1].metadata["cache_write_tokens"]
