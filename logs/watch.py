"""`pgolf-agent watch [SESSION]`: a running session, live, from another terminal.

It only reads: the ledger (shared, as `service status` does), the run folder of the run in flight (its
stderr.log, where train.py prints `step N | loss X | ...` while it trains), the notes and the claim.
"""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from budget.cli import clock, fail, out
from budget.models import BudgetStatus, RunResult
from logs.claim import make_claim
from logs.sessions import NoSession, is_running, read_session, resolve_session
from trainer.untrusted_files import read_tail

STEP_LINE = re.compile(r"step\s+(\d+)\s*\|\s*loss\s+([0-9.]+)")
REFRESH_SECS = 1.0
RECENT = 8


def add_command(subparsers, session_help: str) -> None:
    p = subparsers.add_parser("watch", help="a running session live: budget, the run in flight, recent runs, the "
                                            "latest note (Ctrl-C to stop watching; the session goes on)")
    p.add_argument("session", nargs="?", help=session_help)
    p.add_argument("--once", action="store_true", help="print one frame and exit (the default when not on a terminal)")
    p.set_defaults(func=cmd_watch)


def run_in_flight(folder: Path, run: RunResult) -> dict:
    """What a running run's folder shows: its clock, the last step and loss it printed, its last line."""
    lines = [line for line in read_tail(folder / "runs" / f"{run.run_id:03d}" / "stderr.log", 16384).splitlines()
             if line.strip()]
    step = next((m for m in map(STEP_LINE.search, reversed(lines)) if m), None)
    started = run.started_at or datetime.now(timezone.utc)
    return {"run": run.run_id, "description": run.description,
            "elapsed": (datetime.now(timezone.utc) - started).total_seconds(),
            "step": int(step[1]) if step else None, "loss": float(step[2]) if step else None,
            "last_line": lines[-1] if lines else ""}


def latest_note(folder: Path) -> str | None:
    lines = [line for line in read_tail(folder / "notes.jsonl", 65536).splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            note = json.loads(line)
            return f"[{note.get('kind')}] {note.get('text')}"
        except json.JSONDecodeError:
            continue  # a note being written
    return None


def bar(done: float, total: float, label: str) -> Table:
    row = Table.grid(padding=(0, 1))
    row.add_row(f"{label:<12}", ProgressBar(total=max(total, 1e-9), completed=min(done, total), width=40),
                f"{done:g} of {total:g}" if label == "runs" else f"{clock(done)} of {clock(total)}")
    return row


def frame(folder: Path, status: BudgetStatus, runs: list[RunResult]) -> Group:
    """One picture of the session: what `watch` redraws every second."""
    b = status.budget
    state = "running" if is_running(folder) else "not running (no live harness holds it)"
    parts = [f"[bold]session {escape(str(folder))}[/bold]: {state}"]
    if b:
        parts += [bar(status.runs_used, b.max_runs, "runs"),
                  bar(b.session_secs - status.match_time_remaining_secs, b.session_secs, "match time")]
    for run in (r for r in runs if r.run_id in status.active_run_ids):
        live = run_in_flight(folder, run)
        limit = f" of {b.run_timeout_secs:g} s timeout" if b else ""
        step = (f"step {live['step']}, loss {live['loss']:.4f}" if live["step"] is not None
                else "no step printed yet")
        parts.append(Panel(f"{live['elapsed']:.0f} s{limit}; {step}\n[dim]{escape(live['last_line'][:160])}[/dim]",
                           title=f"run {run.run_id} in flight: {escape(run.description[:80])}", expand=False))
    if not status.active_run_ids:
        parts.append("no run in flight")
    table = Table(title=f"recent runs ({min(RECENT, len(runs))} of {len(runs)})")
    for column in ("id", "status", "val_bpb", "steps", "description"):
        table.add_column(column, overflow="fold")
    for r in runs[-RECENT:]:
        table.add_row(str(r.run_id), r.status.value, "-" if r.val_bpb is None else f"{r.val_bpb:.4f}",
                      "" if r.total_steps is None else str(r.total_steps), escape(r.description[:70]))
    parts.append(table)
    note = latest_note(folder)
    parts.append(f"latest note: {escape(note) if note else '(none yet)'}")
    parts.append(f"claim so far: {escape(make_claim(runs, folder).sentence())}")
    return Group(*parts)


def cmd_watch(args) -> int:
    from rich.live import Live

    try:
        folder = resolve_session(args.session)
        snapshot = read_session(folder)
    except (NoSession, FileNotFoundError) as exc:
        return fail(str(exc))
    if args.once or not out.is_terminal:
        out.print(frame(folder, *snapshot))
        return 0
    try:
        with Live(frame(folder, *snapshot), console=out, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(REFRESH_SECS)
                live.update(frame(folder, *read_session(folder)))
    except KeyboardInterrupt:
        pass  # stop watching; the session is not touched
    return 0
