"""The methodology log: what was tried, why, what it gave, and what was concluded."""
from __future__ import annotations

from budget.models import BudgetStatus, RunResult


def _bpb(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def write_methodology(runs: list[RunResult], notes, status: BudgetStatus, model_id: str, stop_reason: str) -> str:
    baseline = runs[0] if runs else None
    best = min((r for r in runs if r.counts_as_best), key=lambda r: r.val_bpb, default=None)
    lines = ["# Methodology", "",
             f"Researcher: `{model_id}`. Runs used: {status.runs_used} of {status.runs_used + status.runs_remaining}. "
             f"Stopped because: {stop_reason}.", ""]
    if baseline and best:
        lines += [f"Baseline (run {baseline.run_id}): val_bpb {_bpb(baseline.val_bpb)}. "
                  f"Best verified (run {best.run_id}): val_bpb {_bpb(best.val_bpb)} "
                  f"({_bpb((baseline.val_bpb or best.val_bpb) - best.val_bpb)} better). "
                  f"Every val_bpb here is the harness's own measurement on fixed val windows, with a causality audit.", ""]
    plans = [n for n in notes if n.kind == "plan"]
    conclusions = [n for n in notes if n.kind == "conclusion"]
    if plans:
        lines += ["## Plan", ""] + [f"- {n.text}" for n in plans] + [""]
    lines += ["## Runs", "", "| run | status | val_bpb | reported | description | hypothesis |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        cell = lambda s: (s or "").replace("|", "/").replace("\n", " ")[:160]
        status_cell = r.status.value + ("" if r.verified or r.status.value != "completed" else " (unverified)")
        lines.append(f"| {r.run_id} | {status_cell} | {_bpb(r.val_bpb)} | {_bpb(r.reported_val_bpb)} | "
                     f"{cell(r.description)} | {cell(r.hypothesis)} |")
    insights = [n for n in notes if n.kind == "insight"]
    if insights:
        lines += ["", "## What was learned", ""] + [
            f"- {'(after run %s) ' % n.after_run if n.after_run is not None else ''}{n.text}" for n in insights]
    if conclusions:
        lines += ["", "## Conclusions", ""] + [f"- {n.text}" for n in conclusions]
    return "\n".join(lines) + "\n"
