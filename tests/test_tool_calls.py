"""Tool calls as real models send them: every malformed call gets a tool error naming the field, and the session goes on.

The fast tests check the declarations and the validation; the slow ones drive whole sessions through
the real SDKs against the stub server, with the real training service and tiny runs.
"""
import json
from pathlib import Path

import pytest
from rich.console import Console

from agent.approval import ApprovalGate
from agent.providers.base import ToolCall
from agent.session import Session, SessionSettings
from agent.tools import TOOLS, BadCall, Toolbox, ToolFailure, Workspace
from budget.models import Budget
from logs.trajectory import SessionEvent, ToolCallEvent, read_events
from tests.stub_llm_server import StubLLMServer

BASELINE = (Path(__file__).resolve().parents[1] / "trainer" / "baseline_train.py").read_text()
TINY = Budget(max_runs=3, session_secs=1800, time_budget_secs=2, run_timeout_secs=40)

# one value of every JSON type, and a valid value of every argument
SAMPLES = {"string": "abc", "integer": 7, "number": 1.5, "boolean": True, "null": None, "array": [1], "object": {"a": 1}}
VALID = {"path": "train.py", "start_line": 1, "max_lines": 5, "old_text": "learning_rate = 3e-3",
         "new_text": "learning_rate = 3e-3", "content": BASELINE, "description": "d", "hypothesis": "h", "seed": 1,
         "run_id": 0, "kind": "plan", "text": "t", "summary": "s"}


def bad_calls():
    """(tool, arguments, field, what the error must quote) for every way a call can miss its declaration."""
    out = []
    for tool in TOOLS.values():
        props = tool.spec.parameters["properties"]
        good = {name: VALID[name] for name in props}
        for name, prop in props.items():
            types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
            for json_type, value in SAMPLES.items():
                if json_type not in types:
                    out.append((tool.name, {**good, name: value}, name, json.dumps(value)))
            if "enum" in prop or "minimum" in prop:  # the right type, a value outside the declaration
                wrong = "abc" if "enum" in prop else prop["minimum"] - 1
                out.append((tool.name, {**good, name: wrong}, name, json.dumps(wrong)))
            if name in tool.spec.parameters["required"] and "null" not in types:
                out.append((tool.name, {k: v for k, v in good.items() if k != name}, name, "missing"))
        out.append((tool.name, {**good, "verbose": True}, "verbose", "not an argument"))
    return out


BAD_CALLS = bad_calls()


# --- declarations ---------------------------------------------------------------------------

def test_every_schema_is_generated_strict_compatible():
    for tool in TOOLS.values():
        spec = tool.spec
        assert spec.strict, tool.name
        assert spec.parameters["additionalProperties"] is False
        assert spec.parameters["required"] == list(spec.parameters["properties"]) == list(tool.args.model_fields)
        for name, prop in spec.parameters["properties"].items():
            assert "title" not in prop and "default" not in prop, (tool.name, name)
            if not tool.args.model_fields[name].is_required():  # optional means nullable, as strict mode wants
                assert "null" in prop["type"], (tool.name, name)


@pytest.mark.parametrize("tool,arguments,field,quoted", BAD_CALLS)
def test_each_bad_call_is_refused_naming_the_field_expected_and_received(tool, arguments, field, quoted):
    with pytest.raises(BadCall) as info:
        TOOLS[tool].parse(arguments)
    text = str(info.value)
    assert f"bad arguments for {tool}: {field}" in text and quoted in text
    assert "expected" in text or "not an argument" in text
    assert text.endswith(f"Call it as {TOOLS[tool].signature()}.")


def test_the_issue_examples_name_field_expected_and_received():
    with pytest.raises(BadCall, match=r'run_id: expected an integer >= 0, received "abc" \(a string\)'):
        TOOLS["show_run"].parse({"run_id": "abc"})
    with pytest.raises(BadCall, match=r"hypothesis: expected a string, received null"):
        TOOLS["submit_run"].parse({"description": "d", "hypothesis": None})
    assert TOOLS["read_file"].parse({"path": "train.py"}).start_line is None  # optional may be left out


@pytest.fixture
def toolbox(tmp_path):
    ws = Workspace(tmp_path)
    ws.write(BASELINE)
    return Toolbox(ws, service=None)


def test_unknown_tool_and_unreadable_arguments(toolbox):
    with pytest.raises(BadCall, match="unknown tool 'rm_rf'; the tools are: read_file, edit_file"):
        toolbox.parse(ToolCall(id="a", name="rm_rf", arguments={}, raw_arguments="{}"))
    with pytest.raises(BadCall, match=r"could not be read: cut\. Send the arguments as one JSON object: read_file\("):
        toolbox.parse(ToolCall(id="a", name="read_file", arguments=None, raw_arguments='{"pa', error="cut"))


@pytest.mark.parametrize("mode,asks", [
    ("none", set()), ("runs", {"submit_run"}),
    ("edits", {"submit_run", "edit_file", "write_file", "restore_run"}), ("all", set(TOOLS))])
def test_approval_reads_the_declaration(toolbox, mode, asks):
    asked = []

    def refuse(prompt):
        asked.append(prompt)
        return "n too big"

    console = Console(file=open("/dev/null", "w"))
    gate = ApprovalGate(mode, console, ask=refuse, best_code=lambda: BASELINE) if mode != "none" else None
    refused = set()
    for tool in TOOLS.values():
        if gate is None:
            continue
        try:
            gate.check(tool, tool.parse({n: VALID[n] for n in tool.spec.parameters["properties"]}), toolbox)
        except ToolFailure as exc:
            assert f"a person refused this {tool.name}: too big" in str(exc)
            refused.add(tool.name)
    assert refused == asks and len(asked) == len(asks)


# --- whole sessions through the real SDKs -----------------------------------------------------

def call(name, arguments, call_id):
    return {"id": call_id, "name": name, "arguments": arguments}


def matrix_script():
    """Every bad call, each after a good one in the same reply (so the malformed-reply limit is never hit),
    then the other misbehaviours, a background run, and finish."""
    steps, expect = [], {}
    for i, (tool, arguments, field, quoted) in enumerate(BAD_CALLS):
        steps.append({"tool_calls": [call("list_runs", {}, f"ok{i}"), call(tool, arguments, f"bad{i}")]})
        expect[f"bad{i}"] = [f"bad arguments for {tool}: {field}", quoted]
    steps += [
        {"tool_calls": [call("rm_rf", {"path": "/"}, "unknown")]},
        {"tool_calls": [call("list_runs", {}, "ok-t"), call("read_file", '{"path": "trai', "truncated")]},
        {"tool_calls": [call("list_runs", {}, "ok-n"), call("read_file", '["train.py"]', "notobject")]},
        {"text": "I will think about it first."},  # text only
        {"tool_calls": [call("list_runs", {}, "ok-m"), call("write_file", '{"content": "import torch\\nprint(',
                                                            "maxtok")], "stop_reason": "MAXTOK"},
        {"tool_calls": [call("edit_file", {"old_text": "no such line", "new_text": "x"}, "failing"),
                        call("submit_run", {"description": "skipped", "hypothesis": "h"}, "skipped")]},
        {"tool_calls": [call("restore_run", {"run_id": 99}, "harness-fault")]},
        {"tool_calls": [call("edit_file", {"old_text": "learning_rate = 3e-3", "new_text": "learning_rate = 5e-3"}, "e1"),
                        call("submit_run", {"description": "lr 5e-3", "hypothesis": "faster", "seed": None}, "s1"),
                        call("finish", {"summary": "too early"}, "early-finish")]},
        {"tool_calls": [call("wait_runs", {}, "w1")]},
        {"tool_calls": [call("finish", {"summary": "done"}, "end")]},
    ]
    expect |= {
        "unknown": ["unknown tool 'rm_rf'; the tools are: read_file"],
        "truncated": ["your call to read_file could not be read", "read_file(path: a string"],
        "notobject": ["your call to read_file could not be read"],
        "maxtok": ["output-token limit in the middle of this call"],
        "failing": ["old_text was not found"],
        "skipped": ["not run: the earlier call to edit_file in this reply failed"],
        "harness-fault": ["restore_run failed inside the harness (IsADirectoryError", "not a fault of your arguments"],
        "s1": ["run 1 started"],
        "early-finish": ["not finished: run 1 must end first", "call wait_runs"],
        "w1": ['run 1 finished: {"run_id": 1, "status": '],  # completed, or unverified on a busy machine
    }
    return steps, expect


@pytest.mark.slow
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_every_bad_call_gets_a_tool_error_and_the_session_goes_on(tmp_path, corpus, api, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY" if api == "anthropic" else "OPENAI_API_KEY", "dummy")
    steps, expect = matrix_script()
    cut = "max_tokens" if api == "anthropic" else "length"
    steps = [{**s, "stop_reason": cut} if s.get("stop_reason") == "MAXTOK" else s for s in steps]
    d = tmp_path / "s"
    (d / "runs" / "099" / "train.py").mkdir(parents=True)  # a real fault inside a handler: code that is a folder
    steps = [{"text": "ready"}] + steps  # the preflight call before run 0
    with StubLLMServer(steps) as stub:
        end = Session(SessionSettings(session_dir=d, agent=api, base_url=stub.base_url(api), budget=TINY)).run()
        assert not stub.errors
    assert end.reason == "finished: done"
    assert len(stub.requests) == len(steps)  # every step was answered, none was lost to a crash
    results = {call_id: text for r in stub.requests for call_id, text in r.tool_results()}
    text_of = lambda c: c if isinstance(c, str) else " ".join(b.get("text", "") for b in c)  # noqa: E731
    for call_id, wanted in expect.items():
        for fragment in wanted:
            assert fragment in text_of(results[call_id]), (call_id, fragment, text_of(results[call_id])[:500])
    assert all(text_of(results[f"ok{i}"]).startswith("#0") for i in range(len(BAD_CALLS)))
    assert any("Your reply had no tool call" in json.dumps(r.body) for r in stub.requests)  # text only
    events = read_events(d / "trajectory.jsonl")
    errors = {e.metadata["tool_call_id"]: e for e in events if isinstance(e, ToolCallEvent) and e.error}
    assert {f"bad{i}" for i in range(len(BAD_CALLS))} <= errors.keys()
    assert "Traceback" in errors["harness-fault"].metadata["traceback"]
    assert "learning_rate = 5e-3" in (d / "runs" / "001" / "train.py").read_text()
    assert not (d / "runs" / "002").exists()  # the skipped submit_run did not run
    assert not any(isinstance(e, SessionEvent) and e.event == "settled" for e in events)  # nothing left to wait for


def pipelining_researcher(request):
    """Submits a run, queues the next behind it, waits, and concludes when told the budget is spent."""
    last = request.last_tool_result() or ""
    last = last if isinstance(last, str) else " ".join(b.get("text", "") for b in last)
    n = len(request.tool_results())
    if "The budget is spent" in last:
        return {"tool_calls": [call("finish", {"summary": "done"}, "end")]}
    if n == 0:
        return {"tool_calls": [
            call("edit_file", {"old_text": "learning_rate = 3e-3", "new_text": "learning_rate = 5e-3"}, "e1"),
            call("submit_run", {"description": "lr 5e-3", "hypothesis": "faster", "seed": None}, "s1")]}
    if n == 2:  # edits the next run while run 1 trains, and queues it
        return {"tool_calls": [
            call("edit_file", {"old_text": "learning_rate = 5e-3", "new_text": "learning_rate = 4e-3"}, "e2"),
            call("submit_run", {"description": "lr 4e-3", "hypothesis": "between", "seed": None}, "s2")]}
    return {"tool_calls": [call("wait_runs", {}, f"w{n}")]}


@pytest.mark.slow
def test_a_queued_run_starts_the_moment_the_previous_one_ends(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    d = tmp_path / "s"
    with StubLLMServer(handler=pipelining_researcher) as stub:
        end = Session(SessionSettings(session_dir=d, agent="openai", base_url=stub.openai_base_url,
                                      budget=TINY)).run()
        assert not stub.errors
    assert end.reason == "budget spent (all runs are used); finished: done"
    results = {call_id: text for r in stub.requests for call_id, text in r.tool_results()}
    assert results["s1"].startswith("run 1 started") and results["s2"].startswith("queued: starts the moment run 1 ends")
    everything = json.dumps(stub.requests[-1].body) + "".join(results.values())
    assert "run 1 finished: {" in everything and "run 2 finished: {" in everything
    assert "your queued submission 'lr 4e-3' started as run 2" in everything
    run1, run2 = (json.loads((d / "runs" / f"00{i}" / "result.json").read_text()) for i in (1, 2))
    # the session waited for run 2 before it ended (a 2 s run on a busy machine may be unverified)
    assert {run1["status"], run2["status"]} <= {"completed", "unverified"}
    assert "learning_rate = 4e-3" in (d / "runs" / "002" / "train.py").read_text()
    from datetime import datetime
    gap = (datetime.fromisoformat(run2["started_at"]) - datetime.fromisoformat(run1["finished_at"])).total_seconds()
    assert 0 <= gap < 3, gap  # one run at a time, and no idle slot between them
