"""The arena's submission, as its API takes it: one schema that builds our export and checks any file.

The body the arena's `POST /matches/{id}/submit` accepts is `{"answer": {...}, "metadata": {...}}`; for
this challenge `answer` holds `train_code` and `methodology`. Its replay_log steps follow the arena's
ReplayTracker schema (a zod discriminated union on `type`):

    tool_call: ts, tool, input (<= 5000), output? (<= 5000), duration_ms, error?, metadata?
    llm_call:  ts, model, input_tokens, output_tokens, duration_ms, error?, response_text? (<= 50000), metadata?

zod's `optional()` means *absent*: an explicit `null` is rejected, so every optional field here is left
out of the JSON when it has no value. `error` is a boolean. String caps count UTF-16 code units, as
JavaScript's `length` does. Fields the schema does not name are dropped by the arena (warned about, not
fatal). The arena verifies a replay_log only when it is non-empty and every `ts` parses and falls inside
the match window (with 5 s of grace); a file alone does not say when its match began, so the check asks
that the steps span no more than `wall_clock_secs` (plus that grace) and that none lies in the future.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_serializer, model_validator)

MAX_STEPS = 1000
MAX_IO_CHARS = 5000
MAX_RESPONSE_CHARS = 50000
WINDOW_GRACE_SECS = 5.0  # the arena's tolerance at either end of the match window
SHORT_CODE_CHARS = 100   # below these the arena warns that the answer looks incomplete
SHORT_METHODOLOGY_CHARS = 50


def js_length(text: str) -> int:
    """The length JavaScript sees: UTF-16 code units (a character outside the BMP counts twice)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _not_null(value):
    if value is None:
        raise ValueError("null is not allowed: the arena takes this field with a value or not at all; leave it out")
    return value


def _json_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a JSON number, not {type(value).__name__} {value!r}"[:200])
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("must be a finite number")
    return value


def _json_string(value):
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    return value


def _capped(limit: int):
    def check(value: str) -> str:
        if js_length(value) > limit:
            raise ValueError(f"is {js_length(value):,} characters long (UTF-16 units, as the arena counts); "
                             f"the cap is {limit:,}")
        return value
    return check


def parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _iso_ts(value: str) -> str:
    try:
        when = parse_ts(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO-8601 time; the arena cannot place the step in the match "
                         "window, so it would not verify the log") from None
    if when.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone, so the arena would read it as its own local time; "
                         "write UTC with a trailing Z")
    return value


Number = Annotated[Union[int, float], BeforeValidator(_json_number)]
Str = Annotated[str, BeforeValidator(_json_string)]
Timestamp = Annotated[Str, AfterValidator(_iso_ts)]


def OrAbsent(kind):  # noqa: N802 - reads as a type: `kind`, or no field at all (never null)
    return Annotated[kind, BeforeValidator(_not_null)]


def Capped(limit: int):  # noqa: N802
    return Annotated[Str, AfterValidator(_capped(limit))]


class ArenaModel(BaseModel):
    """Unknown fields are kept (to be reported: the arena drops them); a field without a value is left out."""

    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _absent_not_null(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ToolCallStep(ArenaModel):
    type: Literal["tool_call"] = "tool_call"
    ts: Timestamp
    tool: Str
    input: Capped(MAX_IO_CHARS)
    output: OrAbsent(Capped(MAX_IO_CHARS)) = None
    duration_ms: Number
    error: OrAbsent(bool) = Field(None, strict=True)
    metadata: OrAbsent(dict[str, Any]) = None


class LLMCallStep(ArenaModel):
    type: Literal["llm_call"] = "llm_call"
    ts: Timestamp
    model: Str
    input_tokens: Number
    output_tokens: Number
    duration_ms: Number
    error: OrAbsent(bool) = Field(None, strict=True)
    response_text: OrAbsent(Capped(MAX_RESPONSE_CHARS)) = None
    metadata: OrAbsent(dict[str, Any]) = None


Step = Annotated[Union[ToolCallStep, LLMCallStep], Field(discriminator="type")]


class Metadata(ArenaModel):
    token_count: OrAbsent(Number) = None
    tool_call_count: OrAbsent(Number) = None
    model_id: OrAbsent(Str) = None
    harness_id: OrAbsent(Str) = None
    wall_clock_secs: OrAbsent(Number) = None
    replay_log: OrAbsent(list[Step]) = None

    @field_validator("replay_log", mode="before")
    @classmethod
    def _at_most_max_steps(cls, steps):
        if isinstance(steps, list) and len(steps) > MAX_STEPS:
            raise ValueError(f"has {len(steps):,} steps; the arena takes at most {MAX_STEPS:,}")
        return steps

    @model_validator(mode="after")
    def _steps_fit_the_session(self):
        times = [parse_ts(s.ts) for s in self.replay_log or []]
        if not times:
            return self
        late = max(times) - datetime.now(timezone.utc)
        if late > timedelta(seconds=WINDOW_GRACE_SECS):
            raise ValueError(f"a step is dated {late.total_seconds():.0f} s in the future ({max(times).isoformat()}); "
                             "the arena would reject the log as outside the match window")
        span = (max(times) - min(times)).total_seconds()
        if self.wall_clock_secs is not None and span > self.wall_clock_secs + 2 * WINDOW_GRACE_SECS:
            raise ValueError(f"the steps span {span:,.0f} s ({min(times).isoformat()} to {max(times).isoformat()}) "
                             f"but wall_clock_secs is {self.wall_clock_secs:,.0f}: some step lies outside the session")
        return self


class Answer(ArenaModel):
    train_code: Str = Field(min_length=1)
    methodology: OrAbsent(Str) = None

    @field_validator("train_code")
    @classmethod
    def _code_present(cls, code: str) -> str:
        if not code.strip():
            raise ValueError("is blank; the arena needs the full source of the training script")
        return code


class Submission(ArenaModel):
    answer: Answer
    metadata: OrAbsent(Metadata) = None

    @model_validator(mode="before")
    @classmethod
    def _answer_nested(cls, data):
        if isinstance(data, dict) and "answer" not in data and "train_code" in data:
            raise ValueError("train_code and methodology belong inside `answer`: the arena's body is "
                             '{"answer": {"train_code": ..., "methodology": ...}, "metadata": {...}}')
        return data

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


# --- checking a file ----------------------------------------------------------------------------------

def _where(loc: tuple, data: Any) -> str:
    """`metadata.replay_log[12] (tool_call submit_run at ...).error` from a pydantic error location."""
    path, node = "", data
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and "type" in node:
                what = node.get("tool") or node.get("model") or ""
                path += f" ({node.get('type')} {what} at {node.get('ts')})".replace("  ", " ")
        elif part in ("tool_call", "llm_call"):  # the union's tag, already named above
            continue
        else:
            path += f".{part}" if path else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return path or "the file"


def _message(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return "is missing"
    if error["type"] == "union_tag_invalid":
        return f"type must be 'tool_call' or 'llm_call', not {error['input'].get('type')!r}"
    if error["type"] == "union_tag_not_found":
        return "has no `type` ('tool_call' or 'llm_call')"
    if error["type"] == "bool_type":
        return f"must be true or false, not {error['input']!r}"
    if error["type"] in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a JSON object, not {type(error['input']).__name__}"
    if error["type"] == "list_type":
        return f"must be a JSON array, not {type(error['input']).__name__}"
    return msg


def check_submission(text: str) -> tuple[list[str], list[str], Submission | None]:
    """Problems (the arena rejects the file or will not verify its log) and warnings, each naming its place."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"not JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"], [], None
    try:
        submission = Submission.model_validate(data)
    except ValidationError as exc:
        return [f"{_where(e['loc'], data)}: {_message(e)}" for e in exc.errors()], [], None
    return [], _warnings(submission), submission


def _warnings(s: Submission) -> list[str]:
    found = []

    def extra(model: ArenaModel, where: str):
        found.extend(f"{where}.{key}: not in the arena's schema; the arena drops it" for key in model.model_extra or {})

    extra(s, "the file")
    extra(s.answer, "answer")
    if js_length(s.answer.train_code) < SHORT_CODE_CHARS:
        found.append(f"answer.train_code: only {len(s.answer.train_code)} characters; the arena warns that the "
                     "script looks incomplete")
    if s.answer.methodology is None or len(s.answer.methodology) < SHORT_METHODOLOGY_CHARS:
        found.append("answer.methodology: missing or shorter than 50 characters; the arena scores it (20 %)")
    if s.metadata is None or not s.metadata.replay_log:
        found.append("metadata.replay_log: missing or empty; the arena accepts the answer but does not verify it")
        return found
    extra(s.metadata, "metadata")
    for i, step in enumerate(s.metadata.replay_log):
        extra(step, f"metadata.replay_log[{i}]")
    return found
