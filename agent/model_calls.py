"""Model calls as the session sees them: the preflight, the trajectory event of each call, and what a
person sees (a spinner with the call's elapsed time on a terminal, a line of tokens per turn, a line
per retry, the session's totals)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner

from agent.prices import Price
from agent.providers.base import ModelReply, ProviderError, Retry, ToolSpec, rejected_settings
from logs.trajectory import LLMCallEvent


def preflight(researcher, tools: list[ToolSpec], chosen: list[str], console: Console) -> ModelReply | None:
    """One cheap real call before anything is charged: the key, the model id, the server, the settings."""
    check = getattr(researcher, "check", None)
    if check is None:  # offline agents and replay answer without a server
        return None
    console.print(f"checking {researcher.model} at {researcher.endpoint} ...")
    try:
        reply = check(tools)
    except ProviderError as exc:
        raise rejected_settings(exc, chosen) from exc
    console.print(f"{researcher.model} answered in {reply.duration_ms / 1000:.1f}s")
    return reply


def call_event(reply: ModelReply, provider: str, price: Price | None, **metadata) -> LLMCallEvent:
    """The trajectory's record of one call: tokens by kind (fresh, cache read, cache written) and cost."""
    cost = price.cost(reply.input_tokens, reply.cache_read_tokens, reply.cache_write_tokens,
                      reply.output_tokens) if price else None
    return LLMCallEvent(
        model=reply.model, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens,
        duration_ms=reply.duration_ms, response_text=reply.text,
        metadata={"provider": provider, "request_chars": reply.request_chars,
                  "cache_read_tokens": reply.cache_read_tokens, "cache_write_tokens": reply.cache_write_tokens,
                  "cost_usd": cost, "stop_reason": reply.stop_reason, **metadata})


class _Elapsed:
    """A spinner whose text counts the seconds since the call began."""

    def __init__(self, label: str):
        self.label = label
        self.started = time.monotonic()
        self.spinner = Spinner("dots")

    def __rich__(self) -> Spinner:
        self.spinner.update(text=f"{self.label} {time.monotonic() - self.started:.0f}s")
        return self.spinner


@contextmanager
def waiting_for(console: Console | None, model: str) -> Iterator[None]:
    if console is None or not console.is_terminal:
        yield
        return
    with Live(_Elapsed(f"{model} is thinking"), console=console, transient=True, refresh_per_second=4):
        yield


def turn_line(reply: ModelReply, cost_usd: float | None) -> str:
    cost = f", ${cost_usd:.4f}" if cost_usd is not None else ""
    return (f"  [dim]model {reply.duration_ms / 1000:.1f}s: {reply.input_tokens:,} in "
            f"({reply.cache_read_tokens:,} cached, {reply.cache_write_tokens:,} written), "
            f"{reply.output_tokens:,} out{cost}[/dim]")


def retry_line(retry: Retry) -> str:
    return (f"[yellow]model call: attempt {retry.attempt} of {retry.of} failed ({retry.error}); "
            f"retrying in {retry.delay_s:.1f}s[/yellow]")


def totals_line(events: list, runs: list) -> str:
    """Model calls, tokens, cost, and model time against training time, over the whole trajectory."""
    calls = [e for e in events if getattr(e, "type", "") == "llm_call" and e.error is None]
    if not calls:
        return ""
    tokens = lambda key: sum(e.metadata.get(key) or 0 for e in calls)
    inputs = sum(e.input_tokens for e in calls)
    costs = [e.metadata.get("cost_usd") for e in calls]
    cost = f"${sum(costs):.2f}" if all(c is not None for c in costs) else "unknown (no price for the model)"
    model_s = sum(e.duration_ms for e in calls) / 1000
    train_s = sum(r.wall_secs or r.training_secs or 0 for r in runs)
    cached = f" ({tokens('cache_read_tokens') / inputs:.0%})" if inputs else ""
    return (f"model: {len(calls)} calls, {inputs:,} input tokens, {tokens('cache_read_tokens'):,} read from "
            f"cache{cached}, {tokens('cache_write_tokens'):,} written to it, "
            f"{sum(e.output_tokens for e in calls):,} output tokens, cost {cost}; "
            f"model time {model_s / 60:.1f} min against training time {train_s / 60:.1f} min")
