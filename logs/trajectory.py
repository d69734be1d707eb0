"""The session's trajectory: one JSON line per model call, tool call or session event.

It is the single source of truth for what was tried. Every event is appended
and fsync'd before the next step, so a killed harness loses at most the step
it was in. Fields follow the reference service's replay_log steps; the full
(untruncated) texts are kept here and truncated only on export.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LLMCallEvent(BaseModel):
    type: Literal["llm_call"] = "llm_call"
    ts: str = Field(default_factory=now_iso)
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    duration_ms: int = 0
    response_text: str | None = None
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)  # tool_calls, request_chars, cache tokens


class ToolCallEvent(BaseModel):
    type: Literal["tool_call"] = "tool_call"
    ts: str = Field(default_factory=now_iso)
    tool: str
    input: str
    output: str | None = None
    duration_ms: int = 0
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)  # tool_call_id, budget left, run_id


class SessionEvent(BaseModel):
    type: Literal["session"] = "session"
    ts: str = Field(default_factory=now_iso)
    event: str  # start, resume, retry, approval, limit, end
    detail: dict[str, Any] = Field(default_factory=dict)


Event = Annotated[Union[LLMCallEvent, ToolCallEvent, SessionEvent], Field(discriminator="type")]
_event_adapter = TypeAdapter(Event)


class Trajectory:
    """Append-only JSON-lines file of events."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, event: LLMCallEvent | ToolCallEvent | SessionEvent) -> None:
        line = event.model_dump_json() + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)  # not before: a session that never starts leaves no folder
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> list[LLMCallEvent | ToolCallEvent | SessionEvent]:
        return read_events(self.path)


def read_events(path: Path) -> list[LLMCallEvent | ToolCallEvent | SessionEvent]:
    """All complete events; a torn last line (the harness was killed mid-write) is skipped."""
    if not Path(path).exists():
        return []
    events = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(_event_adapter.validate_python(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as exc:
            if number == len(lines):
                break  # torn final write
            raise ValueError(f"{path}:{number} is not a trajectory event: {exc}") from None
    return events
