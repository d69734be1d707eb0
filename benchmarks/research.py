"""Research outcome: the search agent against random search over the same settings, at the same budget.

    python benchmarks/research.py --runs 12 --time-budget 30 --seeds 0 1 2
    python benchmarks/research.py --runs 50 --time-budget 60 --seeds 0 --strategies search

Each (strategy, seed) is a whole session; the figures are its best verified
val_bpb against its own baseline (run 0), and the mean over seeds of the
configuration it kept (a change kept only beyond the measured noise).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.search_agent import read_knowledge  # noqa: E402
from agent.session import Session, SessionSettings  # noqa: E402
from budget.models import Budget  # noqa: E402
from rich.console import Console  # noqa: E402


def one_session(strategy: str, seed: int, runs: int, time_budget: float, keep: Path | None) -> dict:
    directory = (keep or Path(tempfile.mkdtemp())) / f"{strategy}-seed{seed}"
    settings = SessionSettings(session_dir=directory, agent=strategy, search_seed=seed,
                               budget=Budget(max_runs=runs, time_budget_secs=time_budget,
                                             run_timeout_secs=time_budget + 60))
    started = time.time()
    Session(settings, Console(quiet=True)).run()
    results = [json.loads(p.read_text()) for p in sorted(directory.glob("runs/*/result.json"))]
    verified = [r["val_bpb"] for r in results if r.get("verified")]
    k = read_knowledge(directory)
    return {"strategy": strategy, "seed": seed, "baseline": results[0]["val_bpb"], "best": min(verified),
            "kept_mean": k.incumbent_mean, "noise": k.noise,
            "runs": len(results), "minutes": round((time.time() - started) / 60, 1), "session": str(directory)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--time-budget", type=float, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=["search", "random"])
    p.add_argument("--keep", type=Path, help="keep the session folders here")
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        for strategy in args.strategies:
            row = one_session(strategy, seed, args.runs, args.time_budget, args.keep)
            rows.append(row)
            print(f"{strategy:7s} seed {seed}: baseline {row['baseline']:.4f} -> best {row['best']:.4f}, kept "
                  f"{row['kept_mean']:.4f} (noise {row['noise'] or 0:.4f}) "
                  f"({row['runs']} runs, {row['minutes']} min) {row['session']}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
