"""Research outcome: the planning researcher against random search over the same space, at the same budget.

    python benchmarks/research.py --runs 12 --time-budget 30 --seeds 0 1 2
    python benchmarks/research.py --runs 50 --time-budget 60 --seeds 0 --strategies search
    python benchmarks/research.py --switches --time-budget 3      # each train.py switch once, through the service
    python benchmarks/research.py --retrain --time-budget 180     # baseline beside the strongest known configuration

Each (strategy, seed) is a whole session; the figures are its best verified
val_bpb against its own baseline (run 0), and the mean over seeds of the
configuration it kept (a change kept only beyond the measured noise).
`--switches` runs the baseline and each structural setting of train.py once
and prints val_bpb, steps, start-up, trusted evaluation time and the harness
overhead (submit to result, minus the training clock) of each, to show a
setting costs nothing outside training. `--retrain` runs the baseline and
STRONGEST, same seed.
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

from agent.search_agent import read_knowledge, replace_value, setting_line  # noqa: E402
from agent.session import BASELINE, Session, SessionSettings  # noqa: E402
from budget.models import Budget, RunRequest, ServiceSettings  # noqa: E402
from rich.console import Console  # noqa: E402

# One run per structural switch of train.py (the baseline's value is the reference).
SWITCHES: dict[str, dict] = {
    "baseline": {},
    "random windows": {"data_order": "random"},
    "rmsnorm": {"norm": "rmsnorm"},
    "relu2": {"activation": "relu2"},
    "swiglu": {"activation": "swiglu"},
    "untied head": {"tie_embeddings": False},
    "muon": {"optimizer": "muon"},
    "warmdown": {"lr_schedule": "warmdown"},
}
# The strongest configuration known before a session: random windows, linear decay, and the depth and
# width the earlier 50 x 60 s sessions kept (1 layer, d_model 96-112).
STRONGEST = {"data_order": "random", "lr_schedule": "linear", "n_layers": 1, "d_model": 112}


def with_settings(code: str, changes: dict) -> str:
    for name, value in changes.items():
        line = setting_line(code, name)
        code = code.replace(line, replace_value(line, value))
    return code


def one_session(strategy: str, seed: int, runs: int, time_budget: float, keep: Path | None) -> dict:
    directory = (keep or Path(tempfile.mkdtemp())) / f"{strategy}-seed{seed}"
    settings = SessionSettings(session_dir=directory, agent=strategy, search_seed=seed,
                               budget=Budget(max_runs=runs, time_budget_secs=time_budget,
                                             run_timeout_secs=time_budget + 60))
    started = time.time()
    Session(settings, Console(quiet=True)).run()
    results = [json.loads(p.read_text()) for p in sorted(directory.glob("runs/*/result.json"))]
    k = read_knowledge(directory)  # scores of runs that were verified and not contended
    base = k.scores(k.trials[0].cfg) if k.trials else []
    scored = [t.val_bpb for t in k.trials if t.val_bpb is not None]
    return {"strategy": strategy, "seed": seed, "baseline": sum(base) / len(base) if base else None,
            "best": min(scored) if scored else None,
            "kept_mean": k.incumbent_mean, "noise": k.noise, "runs": len(results),
            "cpu_others_max": max((r.get("cpu_others") or 0) for r in results),
            "minutes": round((time.time() - started) / 60, 1), "session": str(directory)}


def run_each(variants: dict[str, dict], time_budget: float, seed: int | None) -> list[dict]:
    """Each variant of the baseline once through the training service; the figures of each run."""
    from budget.service import TrainingService

    rows = []
    base = BASELINE.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        budget = Budget(max_runs=len(variants), time_budget_secs=time_budget, run_timeout_secs=time_budget + 60)
        with TrainingService(ServiceSettings(session_dir=Path(tmp) / "s", budget=budget)) as service:
            for name, changes in variants.items():
                t0 = time.monotonic()
                r = service.submit(RunRequest(train_code=with_settings(base, changes), description=name, seed=seed),
                                   wait=True)
                wall = time.monotonic() - t0
                row = {"variant": name, "val_bpb": r.val_bpb, "verified": r.verified, "status": r.status.value,
                       "steps": r.total_steps, "startup_secs": r.startup_secs, "eval_secs": r.eval_secs,
                       "overhead_secs": round(wall - (r.training_secs or 0), 1), "cpu_others": r.cpu_others,
                       "reasons": r.reasons}
                rows.append(row)
                print(f"{name:15s} val_bpb {r.val_bpb or float('nan'):.4f} verified {r.verified} "
                      f"steps {r.total_steps} start-up {r.startup_secs or 0:.1f} s eval {r.eval_secs or 0:.1f} s "
                      f"overhead {row['overhead_secs']:.1f} s cpu_others {r.cpu_others or 0:.2f}"
                      + (f" reasons {r.reasons}" if r.reasons else ""), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--time-budget", type=float, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=["search", "random"])
    p.add_argument("--keep", type=Path, help="keep the session folders here")
    p.add_argument("--switches", action="store_true", help="each structural setting once, through the service")
    p.add_argument("--retrain", action="store_true", help="the baseline beside STRONGEST, same seed")
    args = p.parse_args()
    if args.switches or args.retrain:
        variants = SWITCHES if args.switches else {"baseline": {}, "strongest": STRONGEST}
        print(json.dumps(run_each(variants, args.time_budget, seed=42)))
        return
    rows = []
    for seed in args.seeds:
        for strategy in args.strategies:
            row = one_session(strategy, seed, args.runs, args.time_budget, args.keep)
            rows.append(row)
            if row["baseline"] is None:
                print(f"{strategy:7s} seed {seed}: no fair baseline (every run 0 was contended or failed); "
                      f"left out of the means: {row['session']}", flush=True)
                continue
            print(f"{strategy:7s} seed {seed}: baseline {row['baseline']:.4f} -> best {row['best']:.4f}, kept "
                  f"{row['kept_mean']:.4f} (noise {row['noise'] or 0:.4f}) max cpu_others {row['cpu_others_max']:.2f} "
                  f"({row['runs']} runs, {row['minutes']} min) {row['session']}", flush=True)
    for strategy in args.strategies:
        mine = [r for r in rows if r["strategy"] == strategy and r["baseline"] is not None]
        if not mine:
            continue
        best = sum(r["baseline"] - r["best"] for r in mine) / len(mine)
        kept = sum(r["baseline"] - r["kept_mean"] for r in mine) / len(mine)
        print(f"{strategy:7s} mean gain over its baseline: best run {best:.4f}, kept configuration {kept:.4f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
