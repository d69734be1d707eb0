"""Tool behaviour on a real workspace, and the bounded context."""
from pathlib import Path

import pytest

from agent.context import Context
from agent.providers.base import AssistantMessage, ToolCall, ToolResult, UserMessage
from agent.tools import Toolbox, ToolFailure, Workspace, run_line
from budget.models import RunResult, RunStatus

BASELINE = (Path(__file__).resolve().parents[1] / "trainer" / "baseline_train.py").read_text()


@pytest.fixture
def toolbox(tmp_path):
    ws = Workspace(tmp_path)
    ws.write(BASELINE)
    run0 = tmp_path / "runs" / "000"
    run0.mkdir(parents=True)
    (run0 / "train.py").write_text(BASELINE)
    (run0 / "stderr.log").write_text("step 100 | loss 2.1\n")
    return Toolbox(ws, service=None)


def test_edit_replaces_one_exact_unique_occurrence(toolbox):
    out = toolbox.execute("edit_file", {"old_text": "learning_rate = 3e-3", "new_text": "learning_rate = 6e-3"}).text
    assert "+learning_rate = 6e-3" in out and "learning_rate = 6e-3" in toolbox.ws.code()


def test_edit_that_does_not_match_shows_the_nearest_lines(toolbox):
    with pytest.raises(ToolFailure) as info:
        toolbox.execute("edit_file", {"old_text": "learning_rate = 3e-4", "new_text": "x"})
    assert "not found" in str(info.value) and "learning_rate = 3e-3" in str(info.value)
    assert toolbox.ws.code() == BASELINE


def test_edit_that_matches_twice_is_refused(toolbox):
    with pytest.raises(ToolFailure, match="occurs"):
        toolbox.execute("edit_file", {"old_text": "import ", "new_text": "import  "})


def test_read_files_and_restore(toolbox):
    assert "evaluate_bpb" in toolbox.execute("read_file", {"path": "prepare.py"}).text
    assert "loss 2.1" in toolbox.execute("read_file", {"path": "runs/0/stderr.log"}).text
    with pytest.raises(ToolFailure, match="readable files"):
        toolbox.execute("read_file", {"path": "/etc/passwd"})
    toolbox.execute("write_file", {"content": "print('x')\n"})
    toolbox.execute("restore_run", {"run_id": 0})
    assert toolbox.ws.code() == BASELINE


def test_unknown_tool_and_bad_arguments_are_actionable(toolbox):
    with pytest.raises(ToolFailure, match="unknown tool"):
        toolbox.execute("rm_rf", {})
    with pytest.raises(ToolFailure, match="bad arguments"):
        toolbox.execute("read_file", {"file": "train.py"})


def test_context_stays_bounded_and_keeps_the_latest_turns():
    ctx = Context(lambda: "run table", max_chars=5_000)
    for i in range(200):
        call = ToolCall(id=f"c{i}", name="read_file", arguments={"path": "train.py"}, raw_arguments="{}")
        ctx.add(AssistantMessage(text=f"turn {i}", tool_calls=[call]))
        ctx.add(ToolResult(tool_call_id=f"c{i}", name="read_file", content="x" * 900))
    msgs = ctx.messages()
    size = sum(len(getattr(m, "content", "") or getattr(m, "text", "")) for m in msgs)
    assert size < 6_000
    assert isinstance(msgs[0], UserMessage) and isinstance(msgs[1], AssistantMessage)
    assert msgs[-1].volatile and "earlier turns are summarised" in msgs[-1].content  # the state comes last
    assert msgs[-3].text == "turn 199"


def test_context_folds_in_steps_so_the_prefix_stays_put():
    ctx = Context(lambda: "run table", max_chars=10_000)
    prefixes = []
    for i in range(60):
        call = ToolCall(id=f"c{i}", name="read_file", arguments={"path": "train.py"}, raw_arguments="{}")
        ctx.add(AssistantMessage(text=f"turn {i}", tool_calls=[call]))
        ctx.add(ToolResult(tool_call_id=f"c{i}", name="read_file", content="x" * 900))
        prefixes.append(ctx.messages()[1].text)  # the first kept turn
    shifts = sum(a != b for a, b in zip(prefixes, prefixes[1:]))
    assert 1 <= shifts <= 15  # the oldest turns go a half window at a time, not one per call


def test_notice_joins_the_last_tool_result_to_keep_alternation():
    ctx = Context(lambda: "s")
    ctx.add(AssistantMessage(text="", tool_calls=[ToolCall(id="a", name="list_runs", arguments={}, raw_arguments="{}")]))
    ctx.add(ToolResult(tool_call_id="a", name="list_runs", content="no runs yet"))
    ctx.notice("The budget is spent")
    assert len(ctx.history) == 2 and ctx.history[-1].content.endswith("The budget is spent")


def test_run_table_shows_steps_and_marks_runs_that_shared_the_cores():
    quiet = RunResult(run_id=3, status=RunStatus.completed, val_bpb=2.5, verified=True, total_steps=2500,
                      cpu_others=0.02, description="d_model 80 -> 112")
    busy = quiet.model_copy(update={"run_id": 4, "total_steps": 1300, "cpu_others": 0.48})
    assert "2500 steps" in run_line(quiet) and "other work" not in run_line(quiet)
    assert "1300 steps [other work took 48% of the cores]" in run_line(busy)


def test_with_a_brief_the_snapshot_holds_until_a_fold_and_the_brief_goes_last():
    calls = []
    ctx = Context(lambda: f"full state {len(calls)}", max_chars=10_000, brief=lambda: "run table now")
    openings = []
    for i in range(30):
        calls.append(i)
        call = ToolCall(id=f"c{i}", name="read_file", arguments={"path": "train.py"}, raw_arguments="{}")
        ctx.add(AssistantMessage(text=f"turn {i}", tool_calls=[call]))
        ctx.add(ToolResult(tool_call_id=f"c{i}", name="read_file", content="x" * 900))
        msgs = ctx.messages()
        openings.append(msgs[0].content)
        assert msgs[-1].volatile and msgs[-1].content == "# Current state\nrun table now"
        assert not msgs[0].volatile and "# State when the turns below began\nfull state" in msgs[0].content
    changes = [i for i in range(1, 30) if openings[i] != openings[i - 1]]
    assert changes and all(b - a >= 3 for a, b in zip(changes, changes[1:]))  # a new snapshot only at a fold
