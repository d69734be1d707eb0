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


DECISIONS = {"approve": "approved", "reject": "rejected", "edit": "edited, then ran",
             "approve_all": "approved all from here", "stop": "stopped the session"}


def person_section(events) -> str:
    """What a person decided at the approval prompt (with each wait) and the guidance they wrote; "" if nothing."""
    session = [e for e in events if e.type == "session" and e.event in ("approval", "guidance")]
    if not session:
        return ""
    started, waiting = {}, {}  # approval event -> the run its call started; call id -> approval awaiting its call
    for e in events:
        if e.type == "session" and e.event == "approval":
            waiting[e.detail.get("tool_call_id")] = e
        elif e.type == "tool_call" and (decided := waiting.pop(e.metadata.get("tool_call_id"), None)) is not None:
            started[id(decided)] = e.metadata.get("run_started")
    cell = lambda s: (s or "").replace("|", "/").replace("\n", " ")[:160]
    approvals = [e for e in session if e.event == "approval"]
    guidance = [e for e in session if e.event == "guidance"]
    lines = ["", "## A person in the loop", ""]
    if approvals:
        waited = sum(e.detail.get("wait_secs", 0) for e in approvals)
        lines += [f"{len(approvals)} decision(s) at the approval prompt; calls waited {waited:.0f} s for them in all.",
                  "", "| at (UTC) | call | decision | waited | detail |", "|---|---|---|---|---|"]
        for e in approvals:
            d = e.detail
            run = started.get(id(e))
            call = d["tool"] + (f" '{cell(d['description'])[:80]}'" if d.get("description") else "")
            call += f" (run {run})" if run is not None else ""
            detail = {"reject": f"reason: {cell(d.get('reason')) or '(none given)'}",
                      "edit": f"{_changed(d.get('diff', ''))}; proposal `{d.get('proposed_file')}`, "
                              f"edit `{d.get('edited_file')}`"}.get(d["decision"], "")
            lines.append(f"| {e.ts[11:19]} | {call} | {DECISIONS.get(d['decision'], d['decision'])} | "
                         f"{d.get('wait_secs', 0):.1f} s | {detail} |")
    for e in guidance:
        lines += ["", f"Guidance delivered at {e.ts[11:19]} UTC to `{e.detail.get('to')}` "
                      f"(`{e.detail.get('file')}`):", "", *(f"> {line}" for line in e.detail["text"].splitlines())]
    return "\n".join(lines) + "\n"


def _changed(diff: str) -> str:
    lines = diff.splitlines()
    added = sum(1 for l in lines if l.startswith("+") and not l.startswith("+++"))
    removed = sum(1 for l in lines if l.startswith("-") and not l.startswith("---"))
    return f"{added} line(s) added, {removed} removed by the person"
