"""Request size over a 50-run session driven by a stub model over the real OpenAI SDK.

The stub reads files, edits train.py and submits a run every turn, so the
conversation grows as a real one would. Prints the largest request (in
estimated tokens, chars / 4) per block of 10 runs: bounded means flat.
"""
from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from agent.session import Session, SessionSettings  # noqa: E402
from budget.models import Budget  # noqa: E402
from tests.stub_llm_server import StubLLMServer  # noqa: E402

LRS = itertools.cycle(["2e-3", "4e-3", "3e-3"])


def researcher(request):
    last = request.last_tool_result() or ""
    if "The budget is spent" in last:
        return {"tool_calls": [{"name": "finish", "arguments": {"summary": "benchmark done"}}]}
    lr = next(LRS)
    return {"text": "Reading the code, then trying another learning rate. " * 20, "tool_calls": [
        {"name": "read_file", "arguments": {"path": "train.py"}},
        {"name": "write_file", "arguments": {"content": (ROOT / "trainer" / "baseline_train.py").read_text()
                                             .replace("learning_rate = 3e-3", f"learning_rate = {lr}")}},
        {"name": "submit_run", "arguments": {"description": f"lr {lr}", "hypothesis": "benchmark turn"}},
        {"name": "write_note", "arguments": {"kind": "insight", "text": f"tried lr {lr}; " + "details " * 30}}]}


def main(runs: int = 50, time_budget: float = 1.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp, StubLLMServer(handler=researcher) as stub:
        settings = SessionSettings(session_dir=Path(tmp) / "s", agent="openai", base_url=stub.openai_base_url,
                                   budget=Budget(max_runs=runs, time_budget_secs=time_budget, run_timeout_secs=60))
        import os
        os.environ.setdefault("OPENAI_API_KEY", "benchmark")
        Session(settings, Console(quiet=True)).run()
        sizes = [r.size for r in stub.requests]
    per_block = {}
    for i, size in enumerate(sizes):  # request i is sent after run i (run 0 is the baseline)
        block = min(i // 10 * 10, runs - 10)
        per_block[block] = max(per_block.get(block, 0), size // 4)
    for block, tokens in sorted(per_block.items()):
        print(f"runs {block:2d}-{block + 9:2d}: largest request ~{tokens:,} tokens")
    print(f"largest request overall ~{max(sizes) // 4:,} tokens over {len(sizes)} requests")
    return {"largest_tokens": max(sizes) // 4, "per_10_runs": per_block, "requests": len(sizes)}


if __name__ == "__main__":
    main()
