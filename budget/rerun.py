"""`pgolf-agent rerun [SESSION] --best --seeds 3` / `--runs 3,7`: recorded code, run again through the service.

The evidence a claim needs: the same train.py with its recorded seeds (and new ones), measured again, printed
beside what was recorded with mean and spread. The runs are charged to a budget of their own, never the
session's: each rerun is a ledger of its own in `SESSION/reruns/<UTC timestamp>/` (its runs, results and
`rerun.json`, which pairs each new run with the recorded one), with as many runs as it needs and the
session's time budget and timeout, so the numbers are comparable.
"""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel
from rich.markup import escape

from agent.outcome import ExitCode
from budget.cli import ProgressPrinter, err, fail, out, print_table
from budget.models import Budget, RunRefused, RunRequest
from logs.claim import DEFAULT_SEED, make_claim, not_evidence, run_code
from logs.sessions import NoSession, read_session, resolve_session

RERUNS_DIR = "reruns"
SLACK_SECS = 600  # the rerun budget's match time beyond its runs' timeouts: Ray's start-up, the evaluations


def run_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: give run ids separated by commas, e.g. 3,7")
    return list(dict.fromkeys(ids))


def add_command(subparsers, session_help: str) -> None:
    p = subparsers.add_parser("rerun", help="run recorded code again (the claimed best with several seeds, or named "
                                            "runs) on a budget of its own, and print recorded and new val_bpb side by side")
    p.add_argument("session", nargs="?", help=session_help)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--best", action="store_true", help="the claimed best configuration (logs/claim.py)")
    which.add_argument("--runs", type=run_ids, metavar="ID,ID", help="these runs' code, e.g. 3,7")
    p.add_argument("--seeds", type=int, metavar="N", help="runs of each code: its recorded seeds first, then new ones "
                   "(default 3 with --best, 1 with --runs)")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--json", action="store_true", help="print the pairs and their summary as JSON")
    p.set_defaults(func=cmd_rerun)


class Pair(BaseModel):
    """One seed of one code: what was recorded, what the rerun measured."""

    source_runs: list[int]           # the recorded runs of this code
    seed: int
    recorded_run: int | None = None
    recorded_val_bpb: float | None = None  # only a score that counts (logs/claim.py: verified, quiet)
    recorded_status: str | None = None
    rerun: int | None = None
    new_val_bpb: float | None = None
    new_status: str | None = None  # "counts", or why the new score does not


class Plan(BaseModel):
    code: str
    source_runs: list[int]
    pairs: list[Pair]


def spread_text(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    return f"mean {sum(got) / len(got):.4f}, spread {max(got) - min(got):.4f} over {len(got)}"


def plan(folder: Path, best: bool, ids: list[int] | None, seeds: int | None) -> list[Plan]:
    """What to run: each code with its seeds, paired with the recorded runs. ValueError says what is wrong."""
    _, runs = read_session(folder)
    by_id = {r.run_id: r for r in runs}
    claim = make_claim(runs, folder)
    if best:
        if claim.best is None:
            raise ValueError(f"{folder} has no verified run, so no claimed best configuration to rerun; "
                             "name runs with --runs")
        groups = [(claim.best_run_id, claim.best.runs)]
    else:
        missing = [i for i in ids if i not in by_id or run_code(folder, i) is None]
        if missing:
            raise ValueError(f"run {', '.join(map(str, missing))} is not in {folder} (or has no train.py); it has runs "
                             f"0 to {len(runs) - 1}: `pgolf-agent report` lists them")
        groups = [(i, [i]) for i in ids]
    wanted = seeds or (3 if best else 1)
    plans = []
    for first, members in groups:
        recorded = {}
        for r in members:  # the first run of each seed, scored or not
            recorded.setdefault(claim.seed_of[r], by_id[r])
        chosen = list(recorded)[:wanted]
        candidate = DEFAULT_SEED
        while len(chosen) < wanted:
            if candidate not in chosen and candidate not in recorded:
                chosen.append(candidate)
            candidate += 1
        plans.append(Plan(code=run_code(folder, first), source_runs=members, pairs=[
            Pair(source_runs=members, seed=s, **({"recorded_run": recorded[s].run_id,
                                                  "recorded_status": not_evidence(recorded[s]) or "counts",
                                                  "recorded_val_bpb": recorded[s].val_bpb
                                                  if not_evidence(recorded[s]) is None else None}
                                                 if s in recorded else {})) for s in chosen]))
    return plans


def cmd_rerun(args) -> int:
    from budget.ledger import SessionLocked
    from budget.models import ServiceSettings
    from budget.service import ServiceUnavailable, TrainingService
    from trainer.corpus import CorpusError

    if args.seeds is not None and args.seeds < 1:
        return fail("--seeds: give at least 1")
    try:
        folder = resolve_session(args.session)
        status, _ = read_session(folder)
        plans = plan(folder, args.best, args.runs, args.seeds)
    except (NoSession, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    pairs = [p for pl in plans for p in pl.pairs]
    session_budget = status.budget or Budget()
    budget = Budget(max_runs=len(pairs), time_budget_secs=session_budget.time_budget_secs,
                    run_timeout_secs=session_budget.run_timeout_secs, clock_grace_secs=session_budget.clock_grace_secs,
                    session_secs=len(pairs) * session_budget.run_timeout_secs + SLACK_SECS)
    rerun_dir = folder / RERUNS_DIR / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    err.print(f"rerun: {len(pairs)} run(s) on a budget of their own in {rerun_dir} (the session's budget is not "
              f"touched); {budget.time_budget_secs:g} s of training each, as the session's runs had", highlight=False)
    try:
        with TrainingService(ServiceSettings(session_dir=rerun_dir, budget=budget, ray_address=args.ray_address)) as service:
            for pl in plans:
                for pair in pl.pairs:
                    source = f"run {pair.recorded_run}" if pair.recorded_run is not None else \
                        f"the code of run {pl.source_runs[0]}"
                    with ProgressPrinter() as progress:
                        result = service.submit(RunRequest(
                            train_code=pl.code, seed=pair.seed, description=f"rerun of {source}, seed {pair.seed}",
                            hypothesis=f"reproduces {folder.name} runs {', '.join(map(str, pl.source_runs))}"),
                            wait=True, on_progress=progress)
                    pair.rerun, pair.new_status = result.run_id, not_evidence(result) or "counts"
                    pair.new_val_bpb = result.val_bpb if not_evidence(result) is None else None
                    (rerun_dir / "rerun.json").write_text(json.dumps(
                        {"session": str(folder), "pairs": [p.model_dump() for p in pairs]}, indent=1))
    except RunRefused as exc:
        return fail(f"refused ({exc.code}): {exc}")
    except (SessionLocked, CorpusError, ServiceUnavailable) as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps({"rerun_dir": str(rerun_dir), "pairs": [p.model_dump() for p in pairs]}, indent=2))
    else:
        show(plans, rerun_dir)
    return ExitCode.OK if any(p.new_val_bpb is not None for p in pairs) else ExitCode.NOT_VERIFIED


def show(plans: list[Plan], rerun_dir: Path) -> None:
    bpb = lambda v: "-" if v is None else f"{v:.4f}"
    rows = []
    for pl in plans:
        code = "runs " + ", ".join(map(str, pl.source_runs))
        for p in pl.pairs:
            recorded = (bpb(p.recorded_val_bpb) if p.recorded_val_bpb is not None or p.recorded_run is None
                        else f"- ({p.recorded_status})")
            rows.append((code, str(p.seed), "-" if p.recorded_run is None else str(p.recorded_run), recorded,
                         str(p.rerun), bpb(p.new_val_bpb) if p.new_val_bpb is not None else f"- ({p.new_status})"))
        rows.append((code, "all", "", spread_text([p.recorded_val_bpb for p in pl.pairs]), "",
                     spread_text([p.new_val_bpb for p in pl.pairs])))
    print_table("recorded and new val_bpb", ("code", "seed", "recorded run", "recorded val_bpb", "rerun",
                                              "new val_bpb"), rows)
    out.print(f"reruns recorded in {escape(str(rerun_dir))} (report it with `pgolf-agent report {escape(str(rerun_dir))}`)",
              highlight=False)
