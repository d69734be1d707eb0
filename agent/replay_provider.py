"""Replay: feed a recorded session's model replies back in order, so the session runs again."""
from __future__ import annotations

import time
from pathlib import Path

from agent.providers.base import ModelReply, ProviderError, ToolCall
from logs.trajectory import LLMCallEvent, read_events


class ReplayProvider:
    name = "replay"

    def __init__(self, source_session: Path):
        path = Path(source_session) / "trajectory.jsonl"
        if not path.exists():
            raise ProviderError(f"{path} does not exist: pass the folder of a recorded session to replay")
        self.replies = [e for e in read_events(path) if isinstance(e, LLMCallEvent) and e.error is None]
        if not self.replies:
            raise ProviderError(f"{path} holds no model replies to replay")
        self.model = f"replay:{self.replies[0].model}"
        self.position = 0

    def complete(self, system, messages, tools) -> ModelReply:
        if self.position >= len(self.replies):
            raise ProviderError(f"the recorded session has no more replies (all {len(self.replies)} replayed)")
        e = self.replies[self.position]
        self.position += 1
        started = time.monotonic()
        calls = [ToolCall(**c) for c in e.metadata.get("tool_calls", [])]
        return ModelReply(text=e.response_text or "", tool_calls=calls, input_tokens=e.input_tokens,
                          output_tokens=e.output_tokens, model=self.model, stop_reason="replay",
                          duration_ms=int((time.monotonic() - started) * 1000),
                          request_chars=sum(len(getattr(m, "content", "") or "") for m in messages))
