"""The arena export: built from a recorded session, checked by `export --check` and by an independent validator."""
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.cli import main
from agent.outcome import ExitCode
from agent.session import SessionSettings
from budget.ledger import Ledger
from budget.models import Budget, RunRequest, RunResult, RunStatus
from logs.arena import MAX_STEPS, check_submission
from logs.export import build_submission
from logs.trajectory import LLMCallEvent, SessionEvent, ToolCallEvent, Trajectory, read_events

ROOT = Path(__file__).resolve().parents[1]
CODE = (ROOT / "trainer" / "baseline_train.py").read_text()


# --- an independent reading of the arena's step schema (ARCHITECTURE.md, "Submission"), plain dict checks ---

def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def step_problems(step: dict, lo: datetime, hi: datetime) -> list[str]:
    found = []
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if step.get("type") == "tool_call":
        required = {"tool": str, "input": str}
        texts = {"input": 5000, "output": 5000}
    elif step.get("type") == "llm_call":
        required = {"model": str, "input_tokens": "number", "output_tokens": "number"}
        texts = {"response_text": 50000}
    else:
        return [f"type {step.get('type')!r}"]
    for key, kind in {**required, "ts": str, "duration_ms": "number"}.items():
        if key not in step:
            found.append(f"{key} missing")
        elif kind == "number" and not is_number(step[key]) or kind is str and not isinstance(step[key], str):
            found.append(f"{key} has the wrong type")
    allowed = {"type", "ts", "duration_ms", "error", "metadata", *required, *texts}
    found += [f"{key} is not in the schema" for key in step if key not in allowed]
    found += [f"{key} is null" for key, value in step.items() if value is None]
    if "error" in step and not isinstance(step["error"], bool):
        found.append("error is not a boolean")
    if "metadata" in step and not isinstance(step["metadata"], dict):
        found.append("metadata is not an object")
    for key, cap in texts.items():
        if isinstance(step.get(key), str) and utf16_len(step[key]) > cap:
            found.append(f"{key} longer than {cap}")
    if isinstance(step.get("ts"), str):
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", step["ts"]):
            found.append(f"ts {step['ts']} is not ISO-8601 with a zone")
        elif not lo <= datetime.fromisoformat(step["ts"].replace("Z", "+00:00")) <= hi:
            found.append(f"ts {step['ts']} outside the session")
    return found


def independent_problems(body: dict, lo: datetime, hi: datetime) -> list[str]:
    found = []
    answer = body.get("answer")
    if not isinstance(answer, dict) or not isinstance(answer.get("train_code"), str) or not answer["train_code"].strip():
        found.append("answer.train_code missing")
    meta = body.get("metadata", {})
    for key, kind in (("token_count", (int, float)), ("tool_call_count", (int, float)), ("model_id", str),
                      ("harness_id", str), ("wall_clock_secs", (int, float)), ("replay_log", list)):
        if not isinstance(meta.get(key), kind):
            found.append(f"metadata.{key} missing or of the wrong type")
    log = meta.get("replay_log") or []
    if len(log) > 1000:
        found.append("more than 1000 steps")
    for i, step in enumerate(log):
        found += [f"step {i}: {p}" for p in step_problems(step, lo, hi)]
    return found


# --- a recorded session, without Ray: the ledger, run folders and trajectory a session leaves ------------

def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_session(folder: Path, verified: bool = True, extra_steps: int = 0) -> tuple[datetime, datetime]:
    """A session of two runs: the baseline and one edit (crashed unless `verified`). Returns its window."""
    start = datetime.now(timezone.utc) - timedelta(minutes=30)
    with Ledger.open(folder, Budget(max_runs=3)) as ledger:
        for run_id, bpb in ((0, 2.1), (1, 2.0)):
            ledger.reserve(RunRequest(train_code=CODE, description=f"run {run_id}"))
            (folder / "runs" / f"{run_id:03d}").mkdir(parents=True)
            edit = CODE if run_id == 0 else CODE.replace("learning_rate = 3e-3", "learning_rate = 5e-3")
            (folder / "runs" / f"{run_id:03d}" / "train.py").write_text(edit + f"# run {run_id}\n")
            ok = verified or run_id == 1  # without `verified`, only a crash and an unverified baseline
            ledger.finish(run_id, RunResult(run_id=run_id, status=RunStatus.completed if ok and verified else
                                            RunStatus.crashed, verified=ok and verified, val_bpb=bpb if verified else None))
    (folder / "settings.json").write_text(SessionSettings(session_dir=folder, agent="search").model_dump_json())
    t = Trajectory(folder / "trajectory.jsonl")
    at = lambda secs: iso(start + timedelta(seconds=secs))
    t.append(SessionEvent(ts=at(0), event="start", detail={"agent": "search", "model": "search:coordinate"}))
    t.append(LLMCallEvent(ts=at(1), model="search:coordinate", input_tokens=10, output_tokens=5, response_text="😀" * 30000))
    t.append(ToolCallEvent(ts=at(2), tool="edit_file", input='{"old_text": "a", "new_text": "b"}', output="edited"))
    for i in range(extra_steps):
        t.append(ToolCallEvent(ts=at(3 + i / 1000), tool="list_runs", input="{}", output="#0 completed"))
    t.append(ToolCallEvent(ts=at(10), tool="submit_run", input='{"description": "b"}', output=json.dumps(
        {"run_id": 1, "status": "completed", "val_bpb": 2.0, "verified": True})))
    t.append(ToolCallEvent(ts=at(11), tool="show_run", input='{"run_id": "x"}', error="run_id: expected an integer"))
    t.append(SessionEvent(ts=at(20), event="end", detail={"reason": "budget spent", "kind": "budget_spent"}))
    return start, start + timedelta(seconds=20)


def test_export_of_a_recorded_session_passes_check_and_an_independent_validator(tmp_path, capsys):
    lo, hi = record_session(tmp_path)
    assert main(["export", str(tmp_path)]) == ExitCode.OK
    body = json.loads((tmp_path / "submission.json").read_text())
    assert independent_problems(body, lo, hi) == []
    steps = body["metadata"]["replay_log"]
    assert [s.get("tool") or s["type"] for s in steps] == ["llm_call", "edit_file", "submit_run", "show_run"]
    assert steps[3]["error"] is True and "expected an integer" in steps[3]["output"]
    assert steps[1]["error"] is False and "null" not in json.dumps(steps)
    assert utf16_len(steps[0]["response_text"]) <= 50000 < utf16_len("😀" * 30000)  # cut in UTF-16 units
    assert body["answer"]["train_code"].endswith("# run 1\n")  # the claimed best configuration's code
    assert "| run |" in body["answer"]["methodology"]
    assert main(["export", "--check", str(tmp_path / "submission.json")]) == ExitCode.OK
    assert "a valid submission" in capsys.readouterr().out


def test_export_writes_where_told_and_condenses_keeping_every_run_step(tmp_path):
    lo, hi = record_session(tmp_path / "s", extra_steps=1500)
    out = tmp_path / "elsewhere.json"
    assert main(["export", str(tmp_path / "s"), "-o", str(out)]) == ExitCode.OK
    assert not (tmp_path / "s" / "submission.json").exists()
    body = json.loads(out.read_text())
    steps = body["metadata"]["replay_log"]
    assert len(steps) == MAX_STEPS and independent_problems(body, lo, hi) == []
    assert [s["tool"] for s in steps if s.get("tool") == "submit_run"] == ["submit_run"]
    assert any("steps_omitted_before" in s.get("metadata", {}) for s in steps)
    assert steps[-1]["tool"] == "show_run" and steps[0]["type"] == "llm_call"  # the start and the end remain
    assert body["metadata"]["tool_call_count"] == 1503  # counts every call, not only the exported ones


def test_no_verified_run_no_train_code(tmp_path, capsys):
    record_session(tmp_path, verified=False)
    assert main(["export", str(tmp_path)]) == ExitCode.INVALID
    assert "no run was verified" in capsys.readouterr().out
    assert not (tmp_path / "submission.json").exists() and not (tmp_path / "best_train.py").exists()
    assert "| 1 | 1 | 42 | crashed |" in (tmp_path / "methodology.md").read_text()  # the rest of the record is written


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("recorded")
    record_session(folder)
    assert main(["export", str(folder)]) == ExitCode.OK
    return (folder / "submission.json").read_text()


@pytest.mark.parametrize("change, message", [
    (lambda b: b["metadata"]["replay_log"][2].update(error=None),
     r"metadata\.replay_log\[2\] \(tool_call submit_run at .*Z\)\.error: null is not allowed"),
    (lambda b: b["metadata"]["replay_log"][1].update(input="x" * 5001),
     r"replay_log\[1\] \(tool_call edit_file .*\)\.input: is 5,001 characters long .* the cap is 5,000"),
    (lambda b: b["metadata"]["replay_log"][0].update(ts="yesterday"),
     r"replay_log\[0\] \(llm_call .*\)\.ts: 'yesterday' is not an ISO-8601 time"),
    (lambda b: b["metadata"]["replay_log"][0].update(input_tokens="10"),
     r"replay_log\[0\] .*\.input_tokens: must be a JSON number, not str"),
    (lambda b: b["metadata"]["replay_log"].extend(b["metadata"]["replay_log"][:1] * 1000),
     r"metadata\.replay_log: has 1,004 steps; the arena takes at most 1,000"),
    (lambda b: b["metadata"]["replay_log"][3].update(ts="2020-01-01T00:00:00Z"),
     r"metadata: the steps span .* but wall_clock_secs is 20"),
    (lambda b: b["answer"].pop("train_code"), r"answer\.train_code: is missing"),
    (lambda b: b.update(b.pop("answer")), r"train_code and methodology belong inside `answer`"),
])
def test_a_hand_broken_export_fails_check_saying_what_is_wrong(exported, tmp_path, capsys, change, message):
    body = json.loads(exported)
    change(body)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(body))
    capsys.readouterr()
    assert main(["export", "--check", str(path)]) == ExitCode.INVALID
    out = capsys.readouterr()
    assert re.search(message, out.out.replace("\n", "")), out.out
    assert "not a valid submission" in out.err


@pytest.mark.parametrize("text, message", [
    ("[]", "the file: must be a JSON object, not list"),
    ('{"answer": {"train_code": "x"}, "metadata": []}', "metadata: must be a JSON object, not list"),
    ('{"answer": {"train_code": "x"}, "metadata": {"replay_log": {}}}', "metadata.replay_log: must be a JSON array"),
    ('{"answer": {"train_code": "x"}, "metadata": {"replay_log": [7]}}', "metadata.replay_log[0]: must be a JSON object"),
    ('{"answer": {"train_code": "x"}, "metadata": {"replay_log": [{"type": "tool_call", "ts": 1, "tool": 2, '
     '"input": null, "duration_ms": true}]}}', "replay_log[0] (tool_call 2 at 1).ts: must be a string, not int"),
])
def test_check_reads_any_shape_without_failing_itself(text, message):
    problems, _, _ = check_submission(text)
    assert any(message in p for p in problems), problems


def test_check_warns_about_what_the_arena_drops_or_scores_low():
    body = {"answer": {"train_code": "print(1)"}, "metadata": {"harness": "x"}, "extra": 1}
    problems, warnings, _ = check_submission(json.dumps(body))
    assert problems == []
    assert any(w.startswith("the file.extra: not in the arena's schema") for w in warnings)
    assert any(w.startswith("metadata.replay_log: missing or empty") for w in warnings)
    assert any("answer.methodology" in w for w in warnings) and any("answer.train_code: only 8" in w for w in warnings)


def test_steps_outside_the_window_are_left_out():
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    events = [ToolCallEvent(ts=iso(start + timedelta(seconds=s)), tool="t", input="{}") for s in (-10, 1, 2, 4000)]
    sub = build_submission(CODE, "# m", events, "m", iso(start), iso(start + timedelta(seconds=3)))
    assert [s.ts for s in sub.metadata.replay_log] == [events[1].ts, events[2].ts]
    assert sub.metadata.wall_clock_secs == 3 and sub.metadata.tool_call_count == 4


def test_a_killed_session_exports_what_it_had(tmp_path):
    record_session(tmp_path)
    lines = (tmp_path / "trajectory.jsonl").read_text().splitlines()
    (tmp_path / "trajectory.jsonl").write_text("\n".join(lines[:-2]) + '\n{"type": "tool_call", "ts": "20')  # killed
    assert main(["export", str(tmp_path)]) == ExitCode.OK
    body = json.loads((tmp_path / "submission.json").read_text())
    assert [s["tool"] for s in body["metadata"]["replay_log"][1:]] == ["edit_file", "submit_run"]
    assert "stopped without finishing" in (tmp_path / "methodology.md").read_text()
    assert len(read_events(tmp_path / "trajectory.jsonl")) == 4  # the export appended nothing
