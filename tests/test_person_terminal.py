"""A person in the loop, for real: `pgolf-agent run --approve` in a pseudo-terminal (pexpect), a model served by
the stub over a real socket through the real SDKs, the real training service with tiny runs.

Answers are typed at the prompt as a person would; the editor is a shell script given as $EDITOR; guidance is
written into the session folder while the session waits. What the model is told is read on the wire.
"""
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.guidance import LABEL
from agent.outcome import ExitCode
from logs.trajectory import SessionEvent, ToolCallEvent, read_events
from tests.stub_llm_server import StubLLMServer

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "[s]top the session: "
TINY = ["--time-budget", "2", "--timeout", "40", "--hours", "0.5"]


def submit(description, seed=None):
    return {"name": "submit_run", "arguments": {"description": description, "hypothesis": "h", "seed": seed}}


def lr(old, new):
    return {"name": "edit_file", "arguments": {"old_text": f"learning_rate = {old}", "new_text": f"learning_rate = {new}"}}


def spawn(args, session, env):
    child = pexpect.spawn(sys.executable, ["-m", "agent.cli", "run", "--session", str(session), *TINY, *args],
                          cwd=str(ROOT), env={**os.environ, "TERM": "xterm", **env}, encoding="utf-8",
                          timeout=300, dimensions=(50, 220))
    child.logfile_read = io.StringIO()  # everything the person saw
    return child


def expect(child, what, timeout=300):
    try:
        child.expect_exact(what, timeout=timeout)
    except (pexpect.EOF, pexpect.TIMEOUT) as exc:
        child.terminate(force=True)
        raise AssertionError(f"{what!r} never came ({type(exc).__name__}); the terminal showed:\n"
                             f"{child.logfile_read.getvalue()[-4000:]}") from None


def answer(child, text):
    expect(child, PROMPT)
    child.sendline(text)


def finish(child) -> str:
    expect(child, pexpect.EOF, timeout=600)
    child.close()
    return child.logfile_read.getvalue()


def decisions(session: Path) -> list[dict]:
    return [e.detail for e in read_events(session / "trajectory.jsonl")
            if isinstance(e, SessionEvent) and e.event == "approval"]


def test_approve_reject_edit_approve_all_and_guidance(tmp_path, corpus):
    """--approve edits over Chat Completions: approve an edit, reject a run with a reason, edit the next one in
    $EDITOR, approve one, approve all (the last edit is then not asked); guidance written while the session
    waits reaches the model with its next request, once."""
    editor = tmp_path / "editor.sh"  # what a person would do in vi: change one line
    editor.write_text("#!/bin/sh\nsed -i 's/^learning_rate = 5e-3/learning_rate = 4e-3/' \"$1\"\n")
    editor.chmod(editor.stat().st_mode | stat.S_IEXEC)
    guidance = "Try a cosine schedule before anything wider."

    def researcher(request):
        last = request.last_tool_result() or ""
        if "The budget is spent" in last:
            return {"tool_calls": [
                lr("4e-3", "3e-3"),
                {"name": "write_note", "arguments": {"kind": "conclusion", "text": "4e-3 is fine"}},
                {"name": "finish", "arguments": {"summary": "done"}}]}
        step = {0: {"tool_calls": [
                    lr("3e-3", "5e-3"),
                    submit("lr 5e-3")]},
                2: {"tool_calls": [submit("lr 5e-3, asked again")]},
                3: {"tool_calls": [submit("seed 7", 7)]},
                4: {"tool_calls": [submit("seed 8", 8)]}}
        return step[len(request.tool_results())]

    session = tmp_path / "s"
    with StubLLMServer(handler=researcher) as stub:
        child = spawn(["--agent", "openai", "--base-url", stub.openai_base_url, "--approve", "edits",
                       "--budget", "4", "--wait-for-runs"], session,
                      {"OPENAI_API_KEY": "dummy", "EDITOR": str(editor), "VISUAL": ""})
        answer(child, "y")                     # the edit_file
        answer(child, "n too big a step")      # its run
        expect(child, PROMPT)                  # the run asked again: the person writes guidance, then edits
        (session / "guidance.md").write_text(guidance + "\n")
        child.sendline("e")
        answer(child, "y")                     # seed 7
        answer(child, "a")                     # seed 8, and all later calls
        seen = finish(child)
        assert not stub.errors, stub.errors
    assert child.exitstatus == ExitCode.OK, seen[-3000:]
    assert seen.count(PROMPT) == 5  # after 'a' the final edit_file was not asked

    # the reason reached the model as the tool's result, on the wire
    after_reject = next(r for r in stub.requests if len(r.tool_results()) == 2)
    assert after_reject.last_tool_result().startswith("a person refused this submit_run: too big a step")
    # the edit ran, both versions kept, and the model was told
    run1 = (session / "runs" / "001" / "train.py").read_text()
    assert "learning_rate = 4e-3" in run1
    assert "learning_rate = 5e-3" in (session / "approvals" / "001-proposed.py").read_text()
    assert (session / "approvals" / "001-edited.py").read_text() == run1
    after_edit = next(r for r in stub.requests if len(r.tool_results()) == 3)
    assert after_edit.last_tool_result().startswith("A person edited train.py before this run")
    assert "+learning_rate = 4e-3" in after_edit.last_tool_result()
    # the guidance: in the request after the edit and in every later one, once each; the file renamed
    wire = [json.dumps(r.body) for r in stub.requests]
    first = next(i for i, body in enumerate(wire) if guidance in body)
    assert stub.requests[first] is after_edit
    assert all(body.count(guidance) == 1 and body.count(LABEL) == 1 for body in wire[first:])
    assert not (session / "guidance.md").exists() and (session / "guidance-1.md").read_text() == guidance + "\n"

    got = decisions(session)
    assert [d["decision"] for d in got] == ["approve", "reject", "edit", "approve", "approve_all"]
    assert [d["tool"] for d in got] == ["edit_file"] + ["submit_run"] * 4
    assert all(d["wait_secs"] >= 0 for d in got) and got[1]["reason"] == "too big a step"
    events = read_events(session / "trajectory.jsonl")
    assert any(isinstance(e, SessionEvent) and e.event == "guidance" and e.detail["text"] == guidance for e in events)
    last_edit = [e for e in events if isinstance(e, ToolCallEvent) and e.tool == "edit_file"][-1]
    assert last_edit.error is None  # approved by 'a', without asking
    methodology = (session / "methodology.md").read_text()
    assert "## A person in the loop" in methodology and "5 decision(s)" in methodology
    assert "reason: too big a step" in methodology and "(run 1) | edited, then ran" in methodology
    assert f"> {guidance}" in methodology


def test_reject_with_the_reason_asked_for_then_stop(tmp_path, corpus):
    """--approve runs over the Messages API, runs in the background: approve run 1, reject the next with a
    reason typed at the follow-up question, stop at the third while run 1 trains. The session waits for run 1,
    writes its whole record and exits 0."""
    def researcher(request):
        step = {0: {"tool_calls": [submit("seed 7", 7)]},
                1: {"tool_calls": [submit("wider")]},
                2: {"tool_calls": [submit("deeper")]}}
        return step[len(request.tool_results())]

    session = tmp_path / "s"
    with StubLLMServer(handler=researcher) as stub:
        child = spawn(["--agent", "anthropic", "--base-url", stub.anthropic_base_url, "--approve", "runs",
                       "--budget", "3"], session, {"ANTHROPIC_API_KEY": "dummy"})
        answer(child, "y")
        answer(child, "n")
        expect(child, "reason, sent to the researcher")
        child.sendline("no wider models today")
        answer(child, "s")
        seen = finish(child)
        assert not stub.errors, stub.errors
    assert child.exitstatus == ExitCode.OK, seen[-3000:]
    assert "stopped: a person stopped the session at the approval prompt" in " ".join(seen.split())
    assert stub.requests[-1].last_tool_result().startswith("a person refused this submit_run: no wider models today")
    assert len(stub.requests) == 4  # the preflight and three turns: nothing after the stop
    assert [d["decision"] for d in decisions(session)] == ["approve", "reject", "stop"]
    assert json.loads((session / "runs" / "001" / "result.json").read_text())["status"] != "interrupted"
    events = read_events(session / "trajectory.jsonl")
    assert events[-1].event == "end" and events[-1].detail["kind"] == "stopped"
    stopped = [e for e in events if isinstance(e, ToolCallEvent) and e.tool == "submit_run"][-1]
    assert stopped.error == "not run: a person stopped the session"
    assert "stopped the session" in (session / "methodology.md").read_text()
    check = subprocess.run([sys.executable, "-m", "agent.cli", "export", "--check", str(session / "submission.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == ExitCode.OK, check.stdout + check.stderr


def test_the_search_agent_records_guidance_it_cannot_follow(tmp_path, corpus):
    """The offline researcher gets guidance written before its first call, and says in its notes what it did."""
    session = tmp_path / "s"
    session.mkdir()
    (session / "guidance.md").write_text("Please try Muon first.")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--agent", "search", "--budget", "2",
                           "--session", str(session), *TINY], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == ExitCode.OK, proc.stderr[-2000:]
    notes = [json.loads(line) for line in (session / "notes.jsonl").read_text().splitlines()]
    assert notes[0]["kind"] == "plan" and "Please try Muon first." in notes[0]["text"]
    assert "cannot read prose" in notes[0]["text"]
    methodology = (session / "methodology.md").read_text()
    assert "> Please try Muon first." in methodology and "cannot read prose" in methodology
    assert (session / "guidance-1.md").exists() and not (session / "guidance.md").exists()
