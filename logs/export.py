"""The submission export: train_code, methodology and the reference service's metadata with replay_log."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, field_validator

from logs.trajectory import LLMCallEvent, SessionEvent, ToolCallEvent

MAX_STEPS = 1000
MAX_IO_CHARS = 5000
MAX_RESPONSE_CHARS = 50000
HARNESS_ID = "pgolf-agent"


def clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    marker = f"...[{len(text) - limit + 40} chars cut]..."
    keep = limit - len(marker)
    return text[: keep // 2] + marker + text[len(text) - (keep - keep // 2):]


class ToolCallStep(BaseModel):
    type: Literal["tool_call"] = "tool_call"
    ts: str
    tool: str
    input: str = Field(max_length=MAX_IO_CHARS)
    output: str | None = Field(None, max_length=MAX_IO_CHARS)
    duration_ms: int = Field(ge=0)
    error: str | None = None
    metadata: dict[str, Any] | None = None


class LLMCallStep(BaseModel):
    type: Literal["llm_call"] = "llm_call"
    ts: str
    model: str
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    duration_ms: int = Field(ge=0)
    response_text: str | None = Field(None, max_length=MAX_RESPONSE_CHARS)
    error: str | None = None
    metadata: dict[str, Any] | None = None


Step = Annotated[Union[ToolCallStep, LLMCallStep], Field(discriminator="type")]


class SubmissionMetadata(BaseModel):
    token_count: int
    tool_call_count: int
    model_id: str
    harness_id: str = HARNESS_ID
    wall_clock_secs: float
    replay_log: list[Step] = Field(max_length=MAX_STEPS)


class Submission(BaseModel):
    train_code: str
    methodology: str
    metadata: SubmissionMetadata

    @field_validator("train_code")
    @classmethod
    def _code_present(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("train_code is empty")
        return v


def _ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def replay_log(events, started: str, ended: str) -> list[Step]:
    """The trajectory as at most MAX_STEPS reference steps inside the session window.

    When there are more steps, the first and the last are kept and the middle
    is dropped, so the start of the method and its conclusion both remain.
    """
    lo, hi = _ts(started), _ts(ended)
    steps: list[Step] = []
    for e in events:
        if isinstance(e, SessionEvent) or not lo <= _ts(e.ts) <= hi:
            continue
        if isinstance(e, ToolCallEvent):
            steps.append(ToolCallStep(ts=e.ts, tool=e.tool, input=clip(e.input, MAX_IO_CHARS) or "",
                                      output=clip(e.output, MAX_IO_CHARS), duration_ms=max(0, e.duration_ms),
                                      error=e.error, metadata={k: v for k, v in e.metadata.items() if k != "full"}))
        elif isinstance(e, LLMCallEvent):
            meta = {k: v for k, v in e.metadata.items() if k in ("request_chars", "cache_read_tokens", "provider")}
            steps.append(LLMCallStep(ts=e.ts, model=e.model, input_tokens=e.input_tokens,
                                     output_tokens=e.output_tokens, duration_ms=max(0, e.duration_ms),
                                     response_text=clip(e.response_text, MAX_RESPONSE_CHARS), error=e.error,
                                     metadata=meta or None))
    if len(steps) > MAX_STEPS:
        head = MAX_STEPS // 2
        steps = steps[:head] + steps[len(steps) - (MAX_STEPS - head):]
    return steps


def build_submission(train_code: str, methodology: str, events, model_id: str,
                     started: str, ended: str) -> Submission:
    llm = [e for e in events if isinstance(e, LLMCallEvent)]
    tools = [e for e in events if isinstance(e, ToolCallEvent)]
    return Submission(
        train_code=train_code,
        methodology=methodology,
        metadata=SubmissionMetadata(
            token_count=sum(e.input_tokens + e.output_tokens for e in llm),
            tool_call_count=len(tools),
            model_id=model_id,
            wall_clock_secs=round((_ts(ended) - _ts(started)).total_seconds(), 3),
            replay_log=replay_log(events, started, ended),
        ),
    )
