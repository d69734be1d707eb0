"""OpenAI models and OpenAI-compatible servers: what both wires share, and Chat Completions.

OpenAI's own models go through the Responses API (openai_responses.py), where function tools and
reasoning work together; compatible servers (vLLM, llama.cpp, Ollama) speak Chat Completions.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

import openai

from agent.providers.base import (PREFLIGHT_PROMPT, PREFLIGHT_TOKENS, AssistantMessage, Message, ModelReply,
                                  ProviderError, RetryCallback, RetryPolicy, ToolCall, ToolResult, ToolSpec,
                                  UserMessage, connection_failure, error_detail, http_failure, json_size, with_retries)
from agent.providers.options import ModelOptions

KEY_ENV = "OPENAI_API_KEY"
OPENAI_URL = "https://api.openai.com/v1"


class OpenAIBase:
    """Client, retries and error sorting; subclasses build the request and read the reply."""

    name = "openai"
    api = ""

    def __init__(self, model: str, api_key: str, base_url: str | None = None, *, options: ModelOptions | None = None,
                 timeout_s: float = 600.0, retry_budget_s: float = 120.0, retry_base_delay_s: float = 1.0,
                 retry_max_delay_s: float = 30.0, on_retry: RetryCallback | None = None):
        self.model = model
        self.options = options or ModelOptions()
        if self.options.thinking_budget:
            raise ProviderError("--thinking-budget is for Anthropic models; for OpenAI models use "
                                "--reasoning-effort", kind="config")
        self.on_retry = on_retry
        self.retry = RetryPolicy(retry_budget_s, retry_base_delay_s, retry_max_delay_s)
        self.endpoint = base_url or OPENAI_URL
        # max_retries=0: retries happen in with_retries, so their total time is bounded by our budget.
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)

    def complete(self, system: str, messages: list[Message], tools: list[ToolSpec]) -> ModelReply:
        return self._call(self.request(system, messages, tools))

    def check(self, tools: list[ToolSpec]) -> ModelReply:
        """The cheapest call with the session's settings and tools (a model may refuse tools with reasoning)."""
        return self._call(self.request("", [UserMessage(content=PREFLIGHT_PROMPT)], tools, PREFLIGHT_TOKENS),
                          first_call=True)

    def _call(self, params: dict[str, Any], first_call: bool = False) -> ModelReply:
        started = time.monotonic()
        response = with_retries(lambda: self._send(self._create, params), self.retry, self.on_retry, first_call)
        return self._reply(response, json_size(params), started)

    def _send(self, create: Callable[..., Any], params: dict[str, Any]) -> Any:
        try:
            return create(**params)
        except openai.APIStatusError as exc:
            message, codes = error_detail(exc.body, exc.message)
            if getattr(exc, "param", None):
                message += f" (param: {exc.param})"
            raise http_failure(exc.status_code, message, codes, exc.response.headers, key_env=KEY_ENV,
                               model=self.model, endpoint=f"{self.endpoint} ({self.api})") from exc
        except openai.APIConnectionError as exc:  # timeouts included
            raise connection_failure(exc, self.endpoint) from exc
        except openai.OpenAIError as exc:
            raise ProviderError(f"the request to {self.endpoint} failed: {exc}", kind="bad_response") from exc

    # --- per wire -------------------------------------------------------------------
    def request(self, system: str, messages: list[Message], tools: list[ToolSpec],
                max_tokens: int | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def _create(self, **params: Any) -> Any:
        raise NotImplementedError

    def _reply(self, response: Any, request_chars: int, started: float) -> ModelReply:
        raise NotImplementedError


class OpenAIChatProvider(OpenAIBase):
    """Chat Completions, for OpenAI-compatible servers (and OpenAI models when asked for)."""

    api = "chat completions"

    def request(self, system: str, messages: list[Message], tools: list[ToolSpec],
                max_tokens: int | None = None) -> dict[str, Any]:
        """The Chat Completions arguments (no sampling parameters: reasoning models reject them)."""
        params: dict[str, Any] = {"model": self.model, "messages": wire_messages(system, messages),
                                  "max_completion_tokens": max_tokens or self.options.output_tokens()}
        if tools:
            params["tools"] = [{"type": "function", "function": function_param(t)} for t in tools]
        if self.options.reasoning_effort is not None:
            params["reasoning_effort"] = self.options.reasoning_effort
        return params

    def _create(self, **params: Any) -> openai.types.chat.ChatCompletion:
        return self._client.chat.completions.create(**params)

    def _reply(self, response: openai.types.chat.ChatCompletion, request_chars: int, started: float) -> ModelReply:
        # Compatible servers may send no choices, no content or no usage; each reads as empty.
        choice = response.choices[0] if response.choices else None
        message = choice.message if choice is not None else None
        usage = response.usage
        details = usage.prompt_tokens_details if usage is not None else None
        return ModelReply(
            text=(message.content or message.refusal or "") if message is not None else "",
            tool_calls=[tool_call(c) for c in (message.tool_calls or [])] if message is not None else [],
            input_tokens=usage.prompt_tokens if usage is not None else 0,
            output_tokens=usage.completion_tokens if usage is not None else 0,
            cache_read_tokens=(details.cached_tokens or 0) if details is not None else 0,
            cache_write_tokens=(getattr(details, "cache_write_tokens", 0) or 0) if details is not None else 0,
            model=response.model or self.model, stop_reason=choice.finish_reason if choice is not None else None,
            duration_ms=int((time.monotonic() - started) * 1000), request_chars=request_chars)


def function_param(t: ToolSpec) -> dict[str, Any]:
    function = {"name": t.name, "description": t.description, "parameters": t.parameters}
    if getattr(t, "strict", False):
        function["strict"] = True
    return function


def tool_call(call: Any) -> ToolCall:
    function = getattr(call, "function", None)
    name = getattr(function, "name", None) or ""
    raw = getattr(function, "arguments", None) or ""
    return new_tool_call(getattr(call, "id", None), name, raw)


def new_tool_call(call_id: str | None, name: str, raw: str) -> ToolCall:
    arguments, error = parse_arguments(raw)
    # Some compatible servers leave the id out; the tool result must still name its call.
    return ToolCall(id=call_id or f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=arguments,
                    raw_arguments=raw, error=error)


def parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    if not raw.strip():  # some servers send "" for a call without arguments
        return {}, None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, f"the arguments are not valid JSON ({exc.msg} at character {exc.pos}): {raw[:200]}"
    if not isinstance(value, dict):
        return None, f"the arguments must be a JSON object, got {type(value).__name__}: {raw[:200]}"
    return value, None


def sent_arguments(c: ToolCall) -> str:
    # The model's own argument text goes back as it was, malformed or not, so it can see its mistake.
    return c.raw_arguments if c.arguments is None else json.dumps(c.arguments)


def wire_messages(system: str, messages: list[Message]) -> list[dict[str, Any]]:
    wire: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        if isinstance(m, UserMessage):
            wire.append({"role": "user", "content": m.content})
        elif isinstance(m, ToolResult):  # Chat Completions has no error flag: the content says it
            wire.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
        else:
            wire.append(assistant_message(m))
    return wire


def assistant_message(m: AssistantMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant", "content": m.text or (None if m.tool_calls else "")}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": sent_arguments(c)}} for c in m.tool_calls]
    return out
