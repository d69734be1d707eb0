"""OpenAI models through the Responses API: function tools together with reasoning.

Stateless by choice (`store=False`, reasoning returned encrypted): every request carries the
conversation it needs, as on the other wires, so the bounded context (agent/context.py) decides what
the model sees, a resumed session needs nothing kept on OpenAI's side, and accounts under zero data
retention work. `previous_response_id` would chain the whole history on the server instead, and
fold nothing. A reply's output items (reasoning with its encrypted content, messages, function calls)
go back verbatim in the next request's input, as the API requires of reasoning items before calls.
"""
from __future__ import annotations

import time
from typing import Any

import openai

from agent.providers.base import (AssistantMessage, Message, ModelReply, NativeBlocks, ToolResult, ToolSpec,
                                  UserMessage)
from agent.providers.openai_provider import OpenAIBase, new_tool_call, sent_arguments

NATIVE = "openai-responses"  # NativeBlocks.provider of output items from this wire


class OpenAIResponsesProvider(OpenAIBase):
    api = "responses"

    def request(self, system: str, messages: list[Message], tools: list[ToolSpec],
                max_tokens: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "input": wire_items(messages, self.model),
                                  "max_output_tokens": max_tokens or self.options.output_tokens(),
                                  "store": False, "include": ["reasoning.encrypted_content"]}
        if system:
            params["instructions"] = system
        if tools:
            # strict defaults to true on this wire; a schema written for it says so itself.
            params["tools"] = [{"type": "function", "name": t.name, "description": t.description,
                                "parameters": t.parameters, "strict": bool(getattr(t, "strict", False))}
                               for t in tools]
        if self.options.reasoning_effort is not None:
            params["reasoning"] = {"effort": self.options.reasoning_effort}
        return params

    def _create(self, **params: Any) -> openai.types.responses.Response:
        return self._client.responses.create(**params)

    def _reply(self, response: openai.types.responses.Response, request_chars: int, started: float) -> ModelReply:
        texts, calls, items = [], [], []
        for item in response.output or []:
            items.append(item.model_dump(mode="json", exclude_none=True))
            if item.type == "message":
                texts += [getattr(part, "text", None) or getattr(part, "refusal", "") for part in item.content]
            elif item.type == "function_call":
                calls.append(new_tool_call(item.call_id, item.name, item.arguments))
        usage = response.usage
        details = usage.input_tokens_details if usage is not None else None
        incomplete = response.incomplete_details.reason if response.incomplete_details else None
        return ModelReply(
            text="\n".join(t for t in texts if t), tool_calls=calls,
            input_tokens=usage.input_tokens if usage is not None else 0,
            output_tokens=usage.output_tokens if usage is not None else 0,
            cache_read_tokens=(getattr(details, "cached_tokens", 0) or 0),
            cache_write_tokens=(getattr(details, "cache_write_tokens", 0) or 0),
            model=response.model or self.model, stop_reason=incomplete or response.status,
            duration_ms=int((time.monotonic() - started) * 1000), request_chars=request_chars,
            native=NativeBlocks(provider=NATIVE, model=self.model, blocks=items))


def wire_items(messages: list[Message], model: str) -> list[dict[str, Any]]:
    """Provider-neutral messages as Responses input items."""
    items: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, UserMessage):
            items.append({"role": "user", "content": m.content})
        elif isinstance(m, ToolResult):
            items.append({"type": "function_call_output", "call_id": m.tool_call_id, "output": m.content})
        elif m.native is not None and m.native.provider == NATIVE and m.native.model == model:
            items += [dict(b) for b in m.native.blocks]  # reasoning items only count for the model that wrote them
        else:
            items += assistant_items(m)
    return items


def assistant_items(m: AssistantMessage) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"role": "assistant", "content": m.text}] if m.text else []
    items += [{"type": "function_call", "call_id": c.id, "name": c.name, "arguments": sent_arguments(c)}
              for c in m.tool_calls]
    return items
