"""A person in the loop, in parts: each approval choice, the editor, guidance.md delivered once, the record.

The whole thing in a real terminal, over the real SDKs and the real service, is tests/test_person_terminal.py.
"""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from agent.approval import ApprovalGate
from agent.context import Context
from agent.guidance import GUIDANCE_FILE, LABEL, guidance_in, take_guidance
from agent.loop import PersonStopped
from agent.outcome import ExitCode, SessionEnd, StopKind
from agent.providers.base import UserMessage
from agent.search_agent import SearchResearcher
from agent.tools import TOOLS, Toolbox, ToolFailure, Workspace
from logs.methodology import person_section
from logs.trajectory import SessionEvent, ToolCallEvent

ROOT = Path(__file__).resolve().parents[1]
BASELINE = (ROOT / "trainer" / "baseline_train.py").read_text()
SUBMIT = TOOLS["submit_run"]
RUN_ARGS = SUBMIT.parse({"description": "lr 5e-3", "hypothesis": "faster", "seed": None})


@pytest.fixture
def toolbox(tmp_path):
    ws = Workspace(tmp_path)
    ws.write(BASELINE)
    return Toolbox(ws, service=None)


def gate(answers, mode="runs"):
    """A gate that answers from a list and keeps what it recorded and what it asked."""
    asked, events = [], []

    def ask(prompt):
        asked.append(prompt)
        return answers.pop(0)

    g = ApprovalGate(mode, Console(file=open(os.devnull, "w")), ask=ask, best_code=lambda: BASELINE,
                     record=events.append)
    return g, asked, events


def editor(tmp_path, body: str) -> str:
    """A scripted $EDITOR: a shell script that rewrites the file it is given."""
    script = tmp_path / "editor.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_reject_with_a_reason_inline_or_asked_for(toolbox):
    g, asked, events = gate(["n too big a step", "no", "keep the width"])
    with pytest.raises(ToolFailure, match="a person refused this submit_run: too big a step"):
        g.check(SUBMIT, RUN_ARGS, toolbox, "call-1")
    with pytest.raises(ToolFailure, match="a person refused this submit_run: keep the width"):
        g.check(SUBMIT, RUN_ARGS, toolbox, "call-2")
    assert "reason" in asked[-1]
    assert [(e.event, e.detail["decision"], e.detail["reason"], e.detail["tool_call_id"]) for e in events] == [
        ("approval", "reject", "too big a step", "call-1"), ("approval", "reject", "keep the width", "call-2")]
    assert all(e.detail["wait_secs"] >= 0 and e.detail["description"] == "lr 5e-3" for e in events)


def test_approve_all_stops_asking_and_stop_ends_the_session(toolbox):
    g, asked, events = gate(["what?", "y", "a"], mode="all")
    assert g.check(SUBMIT, RUN_ARGS, toolbox) is None  # an unknown answer is asked again
    assert len(asked) == 2 and "[e]dit" in asked[0]
    note = TOOLS["write_note"]
    assert g.check(note, note.parse({"kind": "plan", "text": "t"}), toolbox) is None
    assert "[e]dit" not in asked[-1]  # only a run has a train.py to edit
    for tool in TOOLS.values():  # never asked again
        g.check(tool, RUN_ARGS if tool is SUBMIT else None, toolbox)
    assert len(asked) == 3 and [e.detail["decision"] for e in events] == ["approve", "approve_all"]
    g, asked, events = gate(["s"])
    with pytest.raises(PersonStopped, match="a person stopped the session"):
        g.check(SUBMIT, RUN_ARGS, toolbox)
    assert events[0].detail["decision"] == "stop"
    assert SessionEnd(StopKind.stopped, "").exit_code == ExitCode.OK


def test_end_of_input_stops_rather_than_approves(toolbox):
    def closed(prompt):
        raise EOFError

    g = ApprovalGate("runs", Console(file=open(os.devnull, "w")), ask=closed, best_code=lambda: BASELINE)
    with pytest.raises(PersonStopped):
        g.check(SUBMIT, RUN_ARGS, toolbox)


def test_edit_in_the_editor_runs_the_edit_and_keeps_both(toolbox, tmp_path, monkeypatch):
    monkeypatch.delenv("VISUAL", raising=False)
    # the first edit breaks the code (refused, asked again); the second continues the same file and fixes it
    monkeypatch.setenv("EDITOR", editor(tmp_path, """if [ -f "$0.once" ]; then
  sed -i '$d' "$1"; sed -i 's/^learning_rate = 3e-3/learning_rate = 4e-3/' "$1"
else
  touch "$0.once"; echo "this is not python(" >> "$1"
fi"""))
    g, asked, events = gate(["e", "e"])
    note = g.check(SUBMIT, RUN_ARGS, toolbox, "c1")
    assert len(asked) == 2  # the broken edit was refused and asked again
    edited = toolbox.ws.code()
    assert "learning_rate = 4e-3" in edited and "not python" not in edited
    assert "A person edited train.py" in note and "+learning_rate = 4e-3" in note
    d = events[0].detail
    assert d["decision"] == "edit" and d["proposed_code"] == BASELINE and d["edited_code"] == edited
    assert (toolbox.ws.session_dir / d["proposed_file"]).read_text() == BASELINE
    assert (toolbox.ws.session_dir / d["edited_file"]).read_text() == edited
    assert d["proposed_file"] == "approvals/001-proposed.py"


def test_an_unchanged_or_abandoned_edit_runs_the_proposal(toolbox, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITOR", editor(tmp_path, "true"))  # saves nothing
    g, asked, events = gate(["e", "y"])
    assert g.check(SUBMIT, RUN_ARGS, toolbox) is None
    assert toolbox.ws.code() == BASELINE and events[0].detail["decision"] == "approve"
    assert not list((toolbox.ws.session_dir / "approvals").iterdir())  # what did not run is not kept as an edit
    monkeypatch.setenv("EDITOR", "/nonexistent/editor")
    g, asked, events = gate(["e", "n not now"])
    with pytest.raises(ToolFailure, match="not now"):
        g.check(SUBMIT, RUN_ARGS, toolbox)


def test_editor_falls_back_to_visual_then_vi(monkeypatch):
    from agent.approval import editor_command
    monkeypatch.delenv("EDITOR", raising=False)
    monkeypatch.delenv("VISUAL", raising=False)
    assert editor_command() == ["vi"]
    monkeypatch.setenv("VISUAL", "code --wait")
    assert editor_command() == ["code", "--wait"]
    monkeypatch.setenv("EDITOR", "nano")
    assert editor_command() == ["nano"]


def test_guidance_is_delivered_once_and_kept(tmp_path):
    assert take_guidance(tmp_path) is None
    (tmp_path / GUIDANCE_FILE).write_text("  \n")
    assert take_guidance(tmp_path) is None and (tmp_path / GUIDANCE_FILE).exists()  # empty: left for the person
    (tmp_path / GUIDANCE_FILE).write_text("try a cosine schedule\n")
    first = take_guidance(tmp_path)
    assert first.text == "try a cosine schedule" and first.file.name == "guidance-1.md"
    assert take_guidance(tmp_path) is None  # once
    (tmp_path / GUIDANCE_FILE).write_text("now try muon")
    second = take_guidance(tmp_path)
    assert second.file.name == "guidance-2.md" and (tmp_path / "guidance-1.md").read_text() == "try a cosine schedule\n"
    message = second.message()
    assert LABEL in message and guidance_in(message) == "now try muon"
    assert guidance_in("a tool result") is None


def test_guidance_before_the_first_reply_is_kept_in_the_request():
    context = Context(lambda: "state", brief=lambda: "runs")
    context.add(UserMessage(content="## " + LABEL + "\n\nfocus on the optimiser"))
    assert any("focus on the optimiser" in m.content for m in context.messages())


def test_the_search_agent_records_that_it_cannot_read_guidance(tmp_path):
    researcher = SearchResearcher(tmp_path)
    message = UserMessage(content=f"## {LABEL} (written to guidance.md; delivered once)\n\nuse muon\n\n"
                                  "Take it into account from now on.")
    reply = researcher.complete("system", [message], [])
    first = reply.tool_calls[0]
    assert first.name == "write_note" and "\"use muon\"" in first.arguments["text"]
    assert "cannot read prose" in first.arguments["text"]


def test_the_methodology_lists_every_decision_and_the_guidance():
    events = [
        SessionEvent(event="approval", detail={"decision": "reject", "tool": "submit_run", "tool_call_id": "a",
                                               "wait_secs": 3.2, "description": "lr 5e-3", "reason": "too big"}),
        SessionEvent(event="approval", detail={"decision": "edit", "tool": "submit_run", "tool_call_id": "b",
                                               "wait_secs": 20.0, "description": "wider",
                                               "diff": "--- a\n+++ b\n-x\n+y\n",
                                               "proposed_file": "approvals/001-proposed.py",
                                               "edited_file": "approvals/001-edited.py"}),
        ToolCallEvent(tool="submit_run", input="{}", output="run 2 started", metadata={"tool_call_id": "b",
                                                                                      "run_started": 2}),
        SessionEvent(event="guidance", detail={"file": "guidance-1.md", "text": "try muon\nand rmsnorm",
                                               "to": "gpt-x"}),
    ]
    text = person_section(events)
    assert "## A person in the loop" in text and "2 decision(s)" in text and "23 s" in text
    assert "| submit_run 'lr 5e-3' | rejected | 3.2 s | reason: too big |" in text
    assert "submit_run 'wider' (run 2) | edited, then ran | 20.0 s | 1 line(s) added, 1 removed" in text
    assert "`approvals/001-edited.py`" in text and "> try muon\n> and rmsnorm" in text
    assert person_section([ToolCallEvent(tool="list_runs", input="{}")]) == ""


def test_approve_without_a_terminal_refuses_to_start(tmp_path):
    session = tmp_path / "s"
    for extra, env in (([], {"PGOLF_APPROVE": "runs"}), (["--approve", "edits"], {})):
        proc = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--agent", "search", "--session",
                               str(session), *extra], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60, env={**os.environ, **env})
        assert proc.returncode == ExitCode.SETUP, proc.stderr
        assert "stdin is not one. To run unattended, pass --approve none" in " ".join(proc.stderr.split())
        assert not session.exists()  # nothing started, nothing to clean up
