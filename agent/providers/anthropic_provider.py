"""Claude through the Anthropic Messages API: tools, prompt caching that hits, thinking blocks kept."""
from __future__ import annotations

import json
import time
from typing import Any

import anthropic

from agent.providers.base import (PREFLIGHT_PROMPT, PREFLIGHT_TOKENS, AssistantMessage, Message, ModelReply,
                                  NativeBlocks, ProviderError, RetryCallback, RetryPolicy, ToolCall, ToolResult,
                                  ToolSpec, UserMessage, connection_failure, error_detail, http_failure, json_size,
                                  with_retries)
from agent.providers.options import ModelOptions

KEY_ENV = "ANTHROPIC_API_KEY"
# A breakpoint caches everything up to and including its block. A request carries at most four:
# the tools, the system prompt (with the task), the end of the history, and the end of the history
# the previous request cached, so each request reads its predecessor's prefix however many blocks
# the last turn added (the API looks back only 20 blocks from a breakpoint on its own).
CACHE = {"type": "ephemeral"}


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, model: str, api_key: str, base_url: str | None = None, *, options: ModelOptions | None = None,
                 timeout_s: float = 600.0, retry_budget_s: float = 120.0, retry_base_delay_s: float = 1.0,
                 retry_max_delay_s: float = 30.0, on_retry: RetryCallback | None = None):
        self.model = model
        self.options = options or ModelOptions()
        if self.options.reasoning_effort in ("none", "minimal"):
            raise ProviderError(f"--reasoning-effort {self.options.reasoning_effort} is not an Anthropic effort: "
                                "choose low, medium, high, xhigh or max, or leave the flag out", kind="config")
        self.on_retry = on_retry
        self.retry = RetryPolicy(retry_budget_s, retry_base_delay_s, retry_max_delay_s)
        self.endpoint = base_url or "https://api.anthropic.com"
        # max_retries=0: retries happen in with_retries, so their total time is bounded by our budget.
        self._client = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)

    def complete(self, system: str, messages: list[Message], tools: list[ToolSpec]) -> ModelReply:
        return self._call(self.request(system, messages, tools))

    def check(self, tools: list[ToolSpec]) -> ModelReply:
        """The cheapest call with the session's settings: a thinking model needs room beyond its budget."""
        params = self.request("", [UserMessage(content=PREFLIGHT_PROMPT)], tools)
        params["max_tokens"] = (self.options.thinking_budget or 0) + PREFLIGHT_TOKENS
        return self._call(params, first_call=True)

    def _call(self, params: dict[str, Any], first_call: bool = False) -> ModelReply:
        started = time.monotonic()
        response = with_retries(lambda: self._send(params), self.retry, self.on_retry, first_call)
        return self._reply(response, json_size(params), started)

    def request(self, system: str, messages: list[Message], tools: list[ToolSpec]) -> dict[str, Any]:
        """The Messages API arguments (sampling parameters are left out: current models reject them)."""
        params: dict[str, Any] = {"model": self.model, "max_tokens": self.options.output_tokens(),
                                  "messages": wire_messages(messages, self.model)}
        if system:
            params["system"] = [{"type": "text", "text": system, "cache_control": CACHE}]
        if tools:
            params["tools"] = [tool_param(t) for t in tools]
            params["tools"][-1]["cache_control"] = CACHE
        if self.options.thinking_budget:
            params["thinking"] = {"type": "enabled", "budget_tokens": self.options.thinking_budget}
        if self.options.reasoning_effort:
            params["output_config"] = {"effort": self.options.reasoning_effort}
        return params

    def _send(self, params: dict[str, Any]) -> anthropic.types.Message:
        try:
            return self._client.messages.create(**params)
        except anthropic.APIStatusError as exc:
            message, codes = error_detail(exc.body, exc.message)
            raise http_failure(exc.status_code, message, codes, exc.response.headers, key_env=KEY_ENV,
                               model=self.model, endpoint=self.endpoint) from exc
        except anthropic.APIConnectionError as exc:  # timeouts included
            raise connection_failure(exc, self.endpoint) from exc
        except anthropic.APIError as exc:
            raise ProviderError(f"the request to {self.endpoint} failed: {exc}", kind="bad_response") from exc

    def _reply(self, response: anthropic.types.Message, request_chars: int, started: float) -> ModelReply:
        texts: list[str] = []
        calls: list[ToolCall] = []
        blocks: list[dict[str, Any]] = []
        for block in response.content:
            if block.type == "text":
                texts.append(block.text)
                blocks.append({"type": "text", "text": block.text})
            elif block.type == "tool_use":
                call = tool_call(block.id, block.name, block.input)
                calls.append(call)
                blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments or {}})
            elif block.type == "thinking":
                blocks.append({"type": "thinking", "thinking": block.thinking, "signature": block.signature})
            elif block.type == "redacted_thinking":
                blocks.append({"type": "redacted_thinking", "data": block.data})
        thinks = any(b["type"] in ("thinking", "redacted_thinking") for b in blocks)
        usage = response.usage
        read = usage.cache_read_input_tokens or 0
        written = usage.cache_creation_input_tokens or 0
        return ModelReply(
            text="\n".join(texts), tool_calls=calls,
            input_tokens=usage.input_tokens + read + written,  # Anthropic counts cached tokens apart
            output_tokens=usage.output_tokens, cache_read_tokens=read, cache_write_tokens=written,
            model=response.model or self.model, stop_reason=response.stop_reason,
            duration_ms=int((time.monotonic() - started) * 1000), request_chars=request_chars,
            native=NativeBlocks(provider=self.name, model=self.model, blocks=blocks) if thinks else None)


def tool_param(t: ToolSpec) -> dict[str, Any]:
    tool = {"name": t.name, "description": t.description, "input_schema": t.parameters}
    if getattr(t, "strict", False):
        tool["strict"] = True
    return tool


def tool_call(call_id: str, name: str, arguments: object) -> ToolCall:
    if isinstance(arguments, dict):
        return ToolCall(id=call_id, name=name, arguments=arguments, raw_arguments=json.dumps(arguments))
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(id=call_id, name=name, arguments=None, raw_arguments=raw,
                    error=f"the tool input must be a JSON object, got {type(arguments).__name__}: {raw[:200]}")


def wire_messages(messages: list[Message], model: str) -> list[dict[str, Any]]:
    """Provider-neutral messages as Messages API turns, with the history's cache breakpoints.

    Consecutive items of one role share a turn, so the tool results answering one assistant turn
    (and the state after them) go back as a single user message. Breakpoints go on the last stable
    block of the last user turn (this request's history) and of the user turn before it (the
    previous request's history); a volatile message, rebuilt for each request, is never cached.
    """
    wire: list[dict[str, Any]] = []
    stable_ends: list[dict[str, Any]] = []  # per user turn, its last block that is not volatile
    for m in messages:
        if isinstance(m, UserMessage):
            role, blocks = "user", [{"type": "text", "text": m.content}] if m.content else []
        elif isinstance(m, ToolResult):
            role, blocks = "user", [{"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content,
                                     "is_error": m.is_error}]
        else:
            role, blocks = "assistant", assistant_blocks(m, model)
        if not blocks:  # the API rejects empty text blocks and empty turns
            continue
        if wire and wire[-1]["role"] == role:
            wire[-1]["content"].extend(blocks)
        else:
            wire.append({"role": role, "content": blocks})
            if role == "user":
                stable_ends.append({})
        if role == "user" and not getattr(m, "volatile", False):
            stable_ends[-1] = blocks[-1]
    for block in stable_ends[-2:]:
        if block:
            block["cache_control"] = CACHE
    return wire


def assistant_blocks(m: AssistantMessage, model: str) -> list[dict[str, Any]]:
    # Thinking blocks are only valid for the model that wrote them; another model gets the plain turn.
    if m.native is not None and m.native.provider == AnthropicProvider.name and m.native.model == model:
        return [dict(b) for b in m.native.blocks]
    blocks: list[dict[str, Any]] = [{"type": "text", "text": m.text}] if m.text else []
    blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments or {}} for c in m.tool_calls]
    return blocks
