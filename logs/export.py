"""The submission export: the best verified code, the methodology, and the trajectory as the arena's replay_log.

Each trajectory step becomes one arena step: a tool call keeps its input and output (a failed call
carries `error: true` and its error message as the output), a model call its tokens, duration and reply.
Texts over the arena's caps are cut in the middle, with a marker saying how long they were.

Condensing, when the session made more than 1000 steps (documented in the README):
1. every run step is kept: each call of `submit_run` (`POST /run` in a served session) and each step
   whose output holds a run's result record (the JSON with its `run_id` and `val_bpb` that a run's
   tools and the HTTP answers return);
2. the slots left go to the other steps, half to the earliest and half to the latest, so the start of
   the method and its conclusion both remain;
3. a step that follows dropped steps says how many in its metadata (`steps_omitted_before`).
Steps stay in their order, and only steps inside the session window are exported.
"""
from __future__ import annotations

import re

from logs.arena import (MAX_IO_CHARS, MAX_RESPONSE_CHARS, MAX_STEPS, Answer, LLMCallStep, Metadata, Submission,
                        ToolCallStep, js_length, parse_ts)
from logs.trajectory import LLMCallEvent, ToolCallEvent, now_iso

HARNESS_ID = "pgolf-agent"
RUN_SUBMISSION_TOOLS = ("submit_run", "POST /run")  # the researcher's tool; the HTTP call of a served session
RUN_RECORD = re.compile(r'"run_id":\s*"?(?:run-)?\d+"?.*?"val_bpb":', re.S)  # 3 here, "run-3" over HTTP
LLM_METADATA = ("provider", "request_chars", "cache_read_tokens", "cache_write_tokens", "stop_reason")


def _prefix(text: str, units: int) -> str:
    """The longest start of text that is at most `units` UTF-16 code units long (a pair cut in two is dropped)."""
    return text.encode("utf-16-le", "surrogatepass")[: 2 * units].decode("utf-16-le", "ignore")


def clip(text: str | None, limit: int) -> str | None:
    """Text within `limit` (as the arena counts), its middle cut out and marked."""
    if text is None or js_length(text) <= limit:
        return text
    marker = f"\n...[cut: {js_length(text):,} characters in all, {limit:,} kept]...\n"
    keep = limit - len(marker)
    return _prefix(text, keep // 2) + marker + _prefix(text[::-1], keep - keep // 2)[::-1]


def present(**fields) -> dict:
    """The fields that have a value: the arena takes an optional field absent, never null."""
    return {key: value for key, value in fields.items() if value is not None}


def to_step(event: ToolCallEvent | LLMCallEvent) -> ToolCallStep | LLMCallStep:
    if isinstance(event, ToolCallEvent):
        meta = {k: v for k, v in event.metadata.items() if k != "full"}
        return ToolCallStep(**present(
            ts=event.ts, tool=event.tool, input=clip(event.input, MAX_IO_CHARS),
            output=clip(event.error if event.error else event.output, MAX_IO_CHARS),
            duration_ms=max(0, event.duration_ms), error=event.error is not None, metadata=meta or None))
    meta = {k: event.metadata[k] for k in LLM_METADATA if event.metadata.get(k) is not None}
    if event.error:
        meta["error_message"] = clip(event.error, MAX_IO_CHARS)
    return LLMCallStep(**present(
        ts=event.ts, model=event.model, input_tokens=event.input_tokens, output_tokens=event.output_tokens,
        duration_ms=max(0, event.duration_ms), error=event.error is not None,
        response_text=clip(event.response_text, MAX_RESPONSE_CHARS), metadata=meta or None))


def is_run_step(step: ToolCallStep | LLMCallStep) -> bool:
    """A run submitted, or a run's result handed back."""
    return step.type == "tool_call" and (step.tool in RUN_SUBMISSION_TOOLS or bool(RUN_RECORD.search(step.output or "")))


def condense(steps: list, limit: int = MAX_STEPS) -> list:
    """At most `limit` steps by the rule in this module's docstring."""
    if len(steps) <= limit:
        return steps
    runs = [i for i, s in enumerate(steps) if is_run_step(s)]
    if len(runs) > limit:  # more run steps than the arena takes: the earliest and the latest of them
        runs = runs[: limit // 2] + runs[len(runs) - (limit - limit // 2):]
    others = [i for i, s in enumerate(steps) if not is_run_step(s)]
    room = limit - len(runs)
    head = room - room // 2
    kept = sorted(runs + others[:head] + others[len(others) - (room - head):] if room else runs)
    out, previous = [], -1
    for i in kept:
        step = steps[i]
        if i > previous + 1:
            step = step.model_copy(update={"metadata": {**(step.metadata or {}), "steps_omitted_before": i - previous - 1}})
        out.append(step)
        previous = i
    return out


def replay_log(events, started: str, ended: str) -> list[ToolCallStep | LLMCallStep]:
    """The trajectory's model and tool calls inside the session window, as at most MAX_STEPS arena steps."""
    lo, hi = parse_ts(started), parse_ts(ended)
    steps = [to_step(e) for e in events
             if isinstance(e, (ToolCallEvent, LLMCallEvent)) and lo <= parse_ts(e.ts) <= hi]
    return condense(steps)


def session_window(events) -> tuple[str, str]:
    """From the first recorded event to the last (a killed session's window ends where its record does)."""
    if not events:
        return now_iso(), now_iso()
    times = sorted((e.ts for e in events), key=parse_ts)
    return times[0], times[-1]


def build_submission(train_code: str, methodology: str, events, model_id: str, started: str, ended: str) -> Submission:
    llm = [e for e in events if isinstance(e, LLMCallEvent)]
    return Submission(
        answer=Answer(train_code=train_code, methodology=methodology),
        metadata=Metadata(
            token_count=sum(e.input_tokens + e.output_tokens for e in llm),
            tool_call_count=sum(isinstance(e, ToolCallEvent) for e in events),
            model_id=model_id,
            harness_id=HARNESS_ID,
            wall_clock_secs=round((parse_ts(ended) - parse_ts(started)).total_seconds(), 3),
            replay_log=replay_log(events, started, ended),
        ),
    )
