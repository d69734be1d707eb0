"""Prompt caching over a 50-run session: the real Session, AgentLoop, Context and Anthropic provider,
the real training service, and a stub model over the real anthropic SDK (the researcher of
request_size.py).

The stub computes cache reads from the breakpoints it receives (the longest prefix an earlier
request cached), so the share below is earned by the request layout, not asserted. Each turn reads
train.py, rewrites it, submits a run and writes a note, so the conversation grows as a real one
would. Prints the share of input tokens read from cache, the cost at claude-sonnet-5-5 prices with
and without caching, and the largest request per block of 10 runs (bounded means flat).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from agent.prices import PRICES  # noqa: E402
from agent.session import Session, SessionSettings  # noqa: E402
from budget.models import Budget  # noqa: E402
from logs.trajectory import LLMCallEvent, read_events  # noqa: E402
from benchmarks.request_size import researcher  # noqa: E402  the same turns as the request-size figure
from tests.stub_llm_server import StubLLMServer  # noqa: E402

def main(runs: int = 50, time_budget: float = 1.0) -> dict:
    os.environ.setdefault("ANTHROPIC_API_KEY", "benchmark")
    with tempfile.TemporaryDirectory() as tmp, StubLLMServer(handler=researcher) as stub:
        session_dir = Path(tmp) / "s"
        settings = SessionSettings(session_dir=session_dir, agent="anthropic", base_url=stub.anthropic_base_url,
                                   budget=Budget(max_runs=runs, time_budget_secs=time_budget, run_timeout_secs=60))
        Session(settings, Console(quiet=True)).run()
        calls = [e for e in read_events(session_dir / "trajectory.jsonl") if isinstance(e, LLMCallEvent)]
        sizes = [r.size for r in stub.requests]
    total = sum(c.input_tokens for c in calls)
    read = sum(c.metadata["cache_read_tokens"] for c in calls)
    written = sum(c.metadata["cache_write_tokens"] for c in calls)
    price = PRICES["claude-sonnet-5-5"]
    cost = sum(c.metadata["cost_usd"] for c in calls)
    uncached = sum(price.cost(c.input_tokens, 0, 0, c.output_tokens) for c in calls)
    print(f"{len(calls)} model calls (preflight included), {total:,} input tokens: {read / total:.1%} read from "
          f"cache, {written / total:.1%} written to it, {(total - read - written) / total:.1%} uncached")
    print(f"cost at claude-sonnet-5-5 prices: ${cost:.2f} with caching, ${uncached:.2f} without")
    per_block: dict[int, int] = {}
    for i, size in enumerate(sizes):  # request i+1 is sent after run i (request 0 is the preflight)
        block = min(max(i - 1, 0) // 10 * 10, runs - 10)
        per_block[block] = max(per_block.get(block, 0), size // 4)
    for block, tokens in sorted(per_block.items()):
        print(f"runs {block:2d}-{block + 9:2d}: largest request ~{tokens:,} tokens")
    print(f"largest request overall ~{max(sizes) // 4:,} tokens over {len(sizes)} requests")
    return {"cache_read_share": read / total, "largest_tokens": max(sizes) // 4, "requests": len(sizes)}


if __name__ == "__main__":
    main()
