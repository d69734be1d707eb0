"""Clock use: the share of a session's wall clock during which a run trains, with and without
thinking while training.

A stub model over the real OpenAI SDK answers every call after a fixed delay (a model's thinking
time); the runs are the baseline train.py with a short TIME_BUDGET, trained and evaluated by the
real service. Every model call does the same thing in both modes: note the last result, write the
next train.py, submit it. With `--wait-for-runs` submit_run returns with the result, so the run slot
sits idle while the model thinks; in the background the next run is queued while one trains.

    python benchmarks/clock_use.py [--runs 5] [--model-secs 20] [--time-budget 30]

The clock counted is the loop's: from the end of run 0 (the harness's baseline) to the session's end.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from agent.session import Session, SessionSettings  # noqa: E402
from budget.models import Budget  # noqa: E402
from logs.trajectory import LLMCallEvent, read_events  # noqa: E402
from tests.stub_llm_server import StubLLMServer  # noqa: E402

BASELINE = (ROOT / "trainer" / "baseline_train.py").read_text()


def researcher(model_secs: float):
    lrs = itertools.cycle(["2e-3", "4e-3", "3e-3", "5e-3"])

    def answer(request):
        time.sleep(model_secs)  # the model thinks
        last = request.last_tool_result() or ""
        if "The budget is spent" in last:
            return {"tool_calls": [{"name": "finish", "arguments": {"summary": "benchmark done"}}]}
        lr = next(lrs)
        return {"text": f"Next: learning rate {lr}.", "tool_calls": [
            {"name": "write_note", "arguments": {"kind": "insight", "text": f"last result read; trying lr {lr}"}},
            {"name": "write_file", "arguments": {"content": BASELINE.replace("learning_rate = 3e-3",
                                                                             f"learning_rate = {lr}")}},
            {"name": "submit_run", "arguments": {"description": f"lr {lr}", "hypothesis": "clock use",
                                                 "seed": None}}]}
    return answer


def covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] inside at least one interval."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def session(background: bool, runs: int, model_secs: float, time_budget: float) -> dict:
    os.environ.setdefault("OPENAI_API_KEY", "benchmark")
    with tempfile.TemporaryDirectory() as tmp, StubLLMServer(handler=researcher(model_secs)) as stub:
        d = Path(tmp) / "s"
        settings = SessionSettings(session_dir=d, agent="openai", base_url=stub.openai_base_url,
                                   background_runs=background,
                                   budget=Budget(max_runs=runs + 1, time_budget_secs=time_budget,
                                                 run_timeout_secs=time_budget + 90))
        s = Session(settings, Console(quiet=True))
        reason = s.run()
        end = time.time()
        results = s.service.runs()
        llm = [e for e in read_events(d / "trajectory.jsonl") if isinstance(e, LLMCallEvent)]
    run0, later = results[0], results[1:]
    start = run0.finished_at.timestamp()
    busy = covered([(r.started_at.timestamp(), r.finished_at.timestamp()) for r in later], start, end)
    model = covered([(datetime.fromisoformat(e.ts).timestamp() - e.duration_ms / 1000,
                      datetime.fromisoformat(e.ts).timestamp()) for e in llm], start, end)
    others = [r.cpu_others for r in later if r.cpu_others is not None]
    return {"mode": "thinking while training" if background else "waiting for each run (--wait-for-runs)",
            "wall": end - start, "busy": busy, "model": model, "calls": len(llm), "runs": len(later),
            "run_secs": sum(r.wall_secs or 0 for r in later) / max(1, len(later)),
            "cpu_others": max(others, default=0.0), "reason": reason}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5, help="runs after the baseline")
    p.add_argument("--model-secs", type=float, default=20.0, help="each model call's fixed duration")
    p.add_argument("--time-budget", type=float, default=30.0, help="TIME_BUDGET of every run")
    a = p.parse_args()
    print(f"{a.runs} runs of TIME_BUDGET {a.time_budget:g} s, every model call {a.model_secs:g} s; clock from the end "
          "of run 0 to the session's end")
    for background in (False, True):
        r = session(background, a.runs, a.model_secs, a.time_budget)
        print(f"{r['mode']:<40} {r['runs']} runs in {r['wall']:.0f} s: a run in flight {r['busy'] / r['wall']:.0%} "
              f"of the clock, the model {r['model'] / r['wall']:.0%} ({r['calls']} calls); a run's wall "
              f"{r['run_secs']:.0f} s; max cpu_others {r['cpu_others']:.0%}")


if __name__ == "__main__":
    main()
