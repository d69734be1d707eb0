"""The methodology log: what was tried, why, what it gave, and what was concluded."""
from __future__ import annotations

import re

from budget.models import BudgetStatus, RunResult
from logs.claim import Claim

# "run 3: 2.4080", "run 3 (probe: lr=0.006): 2.4080", "Run 3 got 2.408", "run 3 val_bpb 2.4080"
RUN_SCORE = re.compile(r"\brun\s+#?(\d+)\b(?:\s*\([^()]*\))?(?:\s*[:=,]|\s+(?:got|gave|scored|measured|at|"
                       r"val_bpb|bpb|of|is|was))*\s*(\d+\.\d{3,})", re.I)


def _bpb(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def stale_numbers(text: str, runs: list[RunResult]) -> list[str]:
    """Scores a note gives for runs that the runs' records do not have (as written, to its decimals)."""
    by_id = {r.run_id: r for r in runs}
    found = []
    for m in RUN_SCORE.finditer(text):
        run = by_id.get(int(m[1]))
        decimals = len(m[2].split(".")[1])
        if run is None:
            found.append(f"run {m[1]} does not exist here")
        elif run.val_bpb is None or abs(round(run.val_bpb, decimals) - float(m[2])) > 0.6 * 10 ** -decimals:
            found.append(f"run {m[1]} measured {_bpb(run.val_bpb)} here, not {m[2]}")
    return found


def note_line(note, runs: list[RunResult], replayed: bool) -> str:
    after = f"(after run {note.after_run}) " if note.after_run is not None else ""
    stale = stale_numbers(note.text, runs)
    mark = ""
    if stale:
        origin = "written in the replayed session; " if replayed else ""
        mark = f" **[numbers do not match the runs: {origin}{'; '.join(stale)}]**"
    return f"- {after}{note.text}{mark}"


def write_methodology(runs: list[RunResult], notes, status: BudgetStatus, model_id: str, stop_reason: str,
                      claim: Claim, replayed: bool = False) -> str:
    lines = ["# Methodology", "",
             f"Researcher: `{model_id}`. Runs used: {status.runs_used} of {status.runs_used + status.runs_remaining}. "
             f"Stopped because: {stop_reason}.", "",
             "## Claim", "", claim.sentence(), "",
             "A configuration is one train.py, whatever its seed; a change counts only when its mean beats the "
             "incumbent's by more than the noise (the widest spread between seeds of one configuration). Every "
             "val_bpb here is the harness's own measurement on fixed val windows, with a causality audit.", ""]
    if replayed:
        lines += ["This session replays a recorded one: its notes were written about the recorded runs, and a note "
                  "whose numbers differ from the runs measured here is marked.", ""]
    plans = [n for n in notes if n.kind == "plan"]
    if plans:
        lines += ["## Plan", ""] + [note_line(n, runs, replayed) for n in plans] + [""]
    lines += ["## Runs", "", "Column `config`: the first run of the same code (another seed of it when not the run "
              "itself).", "", "| run | config | seed | status | val_bpb | reported | description | hypothesis |",
              "|---|---|---|---|---|---|---|---|"]
    best = set(claim.best.scored_runs) if claim.best else set()  # the runs its mean is made of
    for r in runs:
        cell = lambda s: (s or "").replace("|", "/").replace("\n", " ")[:160]
        status_cell = r.status.value + ("" if r.verified or r.status.value != "completed" else " (unverified)")
        config = claim.configuration_of.get(r.run_id, r.run_id)
        lines.append(f"| {r.run_id}{' (best)' if r.run_id in best else ''} | {config} | "
                     f"{claim.seed_of.get(r.run_id, '-')} | {status_cell} | {_bpb(r.val_bpb)} | "
                     f"{_bpb(r.reported_val_bpb)} | {cell(r.description)} | {cell(r.hypothesis)} |")
    insights = [n for n in notes if n.kind == "insight"]
    if insights:
        lines += ["", "## What was learned", ""] + [note_line(n, runs, replayed) for n in insights]
    conclusions = [n for n in notes if n.kind == "conclusion"]
    if conclusions:
        lines += ["", "## Conclusions", ""] + [note_line(n, runs, replayed) for n in conclusions]
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
