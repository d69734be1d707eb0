"""The provider protocol: conversation items, the model's reply, errors, and bounded retries.

Every model provider (Anthropic, OpenAI-compatible, the offline agents, replay) speaks this
protocol, so the loop never sees an SDK type and a conversation is plain JSON.
"""
from __future__ import annotations

import email.utils
import json
import random
import socket
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping, Protocol, TypeVar

from pydantic import BaseModel, Field, TypeAdapter


class ToolSpec(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    strict: bool = False  # the schema meets OpenAI's strict mode (every property required, closed, optionals nullable)


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: dict[str, Any] | None
    raw_arguments: str
    # Set when the arguments are not a JSON object; the loop answers the model with it.
    error: str | None = None


class NativeBlocks(BaseModel):
    """A reply's content blocks in the provider's own wire form, to be sent back verbatim.

    Anthropic's thinking models return signed thinking blocks that must come back unchanged
    with the rest of the turn when tools are used, and only to the model that wrote them.
    """

    provider: str
    model: str
    blocks: list[dict[str, Any]]


class UserMessage(BaseModel):
    role: Literal["user"] = "user"
    content: str
    # Rebuilt for every request (the compact state): providers keep it out of the cached prefix.
    volatile: bool = False


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    native: NativeBlocks | None = None


class ToolResult(BaseModel):
    role: Literal["tool"] = "tool"
    tool_call_id: str
    name: str
    content: str
    is_error: bool = False


Message = Annotated[UserMessage | AssistantMessage | ToolResult, Field(discriminator="role")]
# Conversation.dump_json(messages) / Conversation.validate_json(data)
Conversation = TypeAdapter(list[Message])


class ModelReply(BaseModel):
    text: str
    tool_calls: list[ToolCall]
    input_tokens: int  # every prompt token, cached ones included, the same way for all providers
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    model: str
    stop_reason: str | None  # the provider's own value ("end_turn", "tool_use", "stop", "length", ...)
    duration_ms: int  # wall time of complete(), retries and their waits included
    request_chars: int  # size of the JSON request body
    native: NativeBlocks | None = None

    def to_message(self) -> AssistantMessage:
        """The assistant turn to append to the conversation (keeps the provider's native blocks)."""
        return AssistantMessage(text=self.text, tool_calls=self.tool_calls, native=self.native)


class Provider(Protocol):
    name: str
    model: str

    def complete(self, system: str, messages: list[Message], tools: list[ToolSpec]) -> ModelReply: ...

    # Optional: one cheap real call with the session's settings (see PREFLIGHT_PROMPT); raises ProviderError.
    # def check(self, tools: list[ToolSpec]) -> ModelReply: ...


PREFLIGHT_PROMPT = "Reply with the single word: ready."
PREFLIGHT_TOKENS = 16  # the smallest reply every API accepts


def rejected_settings(exc: ProviderError, chosen: list[str]) -> ProviderError:
    """A preflight refusal, with the flag it is about when the server names it, else the flags chosen."""
    if exc.kind != "bad_request" or not chosen:
        return exc
    said = str(exc).lower()
    named = [flag for flag in chosen if any(word in said for word in _FLAG_WORDS[flag.split()[0]])]
    return ProviderError(f"the model refused {' and '.join(named or chosen)}: {exc}. Choose another value "
                         "or leave the flag out.", kind="rejected_setting", status=exc.status)


_FLAG_WORDS = {"--reasoning-effort": ("effort",), "--thinking-budget": ("thinking", "budget_tokens"),
               "--max-output-tokens": ("max_tokens", "max_output_tokens", "max_completion_tokens"),
               "--openai-api": ("/v1/", "responses", "chat/completions", "endpoint")}


class ProviderError(Exception):
    """A failure that retrying will not fix; the message names the cause and the fix.

    `kind` lets callers react without parsing text: "config", "auth", "permission", "not_found",
    "context_too_long", "quota", "bad_request", "bad_response", "retry_budget", "rejected_setting",
    "unreachable".
    """

    def __init__(self, message: str, *, kind: str = "bad_request", status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status


class RetryBudgetExhausted(ProviderError):
    pass


class TransientError(Exception):
    """A failure worth retrying (rate limit, server error, lost connection).

    `unreachable`: the host name did not resolve or nothing listens at the address. Mid-session that
    may be a passing network fault; at the first call it is a wrong --base-url or no network.
    """

    def __init__(self, text: str, retry_after_s: float | None = None, unreachable: bool = False):
        super().__init__(text)
        self.retry_after_s = retry_after_s
        self.unreachable = unreachable


def connection_failure(exc: BaseException, endpoint: str) -> TransientError:
    """A lost or refused connection (timeouts included), told apart from a host that cannot be reached."""
    causes, cause = [], exc
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    unreachable = any(isinstance(c, (socket.gaierror, ConnectionRefusedError)) for c in causes) or any(
        w in str(c).lower() for c in causes for w in ("name or service not known", "nodename nor servname",
                                                      "connection refused", "temporary failure in name resolution"))
    return TransientError(f"no answer from {endpoint}: {exc.__cause__ or exc}", unreachable=unreachable)


@dataclass(frozen=True)
class Retry:
    """One wait before another attempt: what failed, how long, attempt n of at most m."""

    attempt: int
    of: int
    delay_s: float
    error: str


RetryCallback = Callable[[Retry], None]
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    budget_s: float = 120.0  # total time of the waits and the attempts of one call
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    max_attempts: int = 8

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return retry_after_s
        # Exponential backoff with jitter, so parallel clients do not retry in lockstep.
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def with_retries(send: Callable[[], T], policy: RetryPolicy, on_retry: RetryCallback | None,
                 first_call: bool = False) -> T:
    """Call `send` until it succeeds, retrying TransientError while the next try fits in the budget.

    first_call: an unreachable host is not retried (a wrong address or no network does not pass with waiting)."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return send()
        except TransientError as exc:
            if first_call and exc.unreachable:
                raise ProviderError(f"{str(exc).rstrip('.')}: check the host name and port of the endpoint "
                                    "(--base-url) and the network", kind="unreachable") from exc
            attempt += 1
            delay = policy.delay(attempt, exc.retry_after_s)
            elapsed = time.monotonic() - start
            if elapsed + delay > policy.budget_s or attempt >= policy.max_attempts:
                raise RetryBudgetExhausted(
                    f"gave up after {attempt} attempt(s) in {elapsed:.1f}s (at most {policy.max_attempts} attempts "
                    f"in {policy.budget_s:g}s; next wait would be {delay:.1f}s): {str(exc).rstrip('.')}. "
                    "Try again later.", kind="retry_budget") from exc
            if on_retry is not None:
                on_retry(Retry(attempt, policy.max_attempts, delay, str(exc)))
            time.sleep(delay)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The server's requested wait: `retry-after-ms`, or `retry-after` in seconds or as an HTTP date."""
    try:
        return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except (KeyError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


_QUOTA_CODES = ("insufficient_quota", "spend_limit", "billing", "credit_balance")
_CONTEXT_WORDS = ("prompt is too long", "context_length", "context length", "context window", "context size",
                  "too many tokens", "maximum context")


def http_failure(status: int, message: str, codes: str, headers: Mapping[str, str], *,
                 key_env: str, model: str, endpoint: str) -> ProviderError | TransientError:
    """Sort an HTTP error answer into retryable or not, with a message that says what to do.

    `message` is the server's own explanation; `codes` its error type/code fields, for matching.
    """
    message = message.strip().rstrip(".")  # it is followed by our own sentence
    said = f"{message} {codes}".lower()
    if status == 402 or any(c in codes.lower() for c in _QUOTA_CODES):  # a 429 for money does not pass with waiting
        return ProviderError(f"{endpoint} refused the request for quota or spend limit ({status}): {message}. "
                             "Add credits or raise the limit, then run again.", kind="quota", status=status)
    hint = headers.get("x-should-retry")
    if hint == "true" or (hint != "false" and (status in (408, 409, 429) or status >= 500)):
        return TransientError(f"{endpoint} answered {status}: {message}", retry_after_s(headers))
    if status == 401:
        return ProviderError(f"{key_env} was rejected (401): check the key. Server said: {message}",
                             kind="auth", status=status)
    if status == 403:
        return ProviderError(f"{key_env} may not use model '{model}' (403): {message}. Check the key's "
                             "permissions or choose another --model.", kind="permission", status=status)
    if status == 413 or any(w in said for w in _CONTEXT_WORDS):
        return ProviderError(f"the conversation is too long for model '{model}' ({status}): {message}. "
                             "Shorten the context or choose a model with a larger window.",
                             kind="context_too_long", status=status)
    if status == 404:
        return ProviderError(f"model '{model}' was not found at {endpoint} (404): {message}. Check --model "
                             "and the base URL.", kind="not_found", status=status)
    return ProviderError(f"{endpoint} rejected the request ({status}): {message}", kind="bad_request",
                         status=status)


def json_size(value: object) -> int:
    """Characters of `value` as compact JSON: what a request body weighs."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def error_detail(body: object, fallback: str) -> tuple[str, str]:
    """(message, type/code text) from an SDK error body, whichever wire shape it has."""
    if not isinstance(body, dict):
        return (str(body) if body else fallback), ""
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    details = inner.get("details") if isinstance(inner.get("details"), dict) else {}
    codes = " ".join(str(v) for v in (inner.get("type"), inner.get("code"), details.get("error_code")) if v)
    return str(inner.get("message") or fallback), codes
