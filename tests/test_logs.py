"""Trajectory, export and methodology: the session record."""
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from logs.arena import MAX_IO_CHARS, MAX_STEPS, Answer, Submission
from logs.export import build_submission
from logs.trajectory import LLMCallEvent, SessionEvent, ToolCallEvent, Trajectory, read_events


def iso(dt):
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_trajectory_survives_a_torn_last_line(tmp_path):
    t = Trajectory(tmp_path / "trajectory.jsonl")
    t.append(SessionEvent(event="start"))
    t.append(LLMCallEvent(model="m", input_tokens=3, output_tokens=4, response_text="hi"))
    with open(t.path, "a") as f:
        f.write('{"type": "tool_call", "ts": "2026')  # killed mid-write
    events = read_events(t.path)
    assert [e.type for e in events] == ["session", "llm_call"]


def test_export_validates_against_the_reference_limits(tmp_path):
    start = datetime.now(timezone.utc) - timedelta(hours=1)  # a past session: no step may lie in the future
    events = [SessionEvent(event="start", ts=iso(start))]
    for i in range(1200):  # more steps than the reference accepts
        ts = iso(start + timedelta(milliseconds=10 * (i + 1)))
        events.append(LLMCallEvent(ts=ts, model="m", input_tokens=10, output_tokens=5, response_text="x" * 60000))
        events.append(ToolCallEvent(ts=ts, tool="read_file", input="y" * 9000, output="z" * 9000, duration_ms=3))
    events.append(ToolCallEvent(ts=iso(start + timedelta(days=1)), tool="late", input="{}"))  # outside the window
    end = iso(start + timedelta(seconds=30))
    sub = build_submission("print(1)\n", "# m", events, "m", iso(start), end)
    steps = sub.metadata.replay_log
    assert len(steps) == MAX_STEPS
    assert all(len(s.input) <= MAX_IO_CHARS for s in steps if s.type == "tool_call")
    assert all(s.tool != "late" for s in steps if s.type == "tool_call")
    assert sub.metadata.token_count == 1200 * 15 and sub.metadata.tool_call_count == 1201
    again = Submission.model_validate_json(sub.to_json())  # round trip validates the limits
    assert again.metadata.harness_id == "pgolf-agent"
    with pytest.raises(ValidationError, match="blank"):
        Answer(train_code="  ", methodology="")
