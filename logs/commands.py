"""`pgolf-agent sessions`, `report`, `compare`, `watch` and `rerun`: browsing session records.

Each command that takes a session defaults to the latest (logs/sessions.py). Tables on a terminal,
tab-separated lines otherwise.
"""
from __future__ import annotations

from budget.cli import clock, fail, out, print_runs, print_status, print_table
from logs.sessions import NoSession, find_sessions, resolve_session, summarize

SESSION_HELP = "session folder or id under the sessions folder (default: the latest session)"


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("sessions", help="list the sessions: researcher, runs used, best configuration, state")
    p.add_argument("--root", metavar="DIR", help="the sessions folder (default: PGOLF_SESSIONS_DIR or ./sessions)")
    p.set_defaults(func=cmd_sessions)

    p = subparsers.add_parser("report", help="a session's budget, run table and claim")
    p.add_argument("session", nargs="?", help=SESSION_HELP)
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("compare", help="sessions side by side: best val_bpb, runs and time to reach it, "
                                              "tokens and cost, failed and unverified runs")
    p.add_argument("sessions", nargs="+", metavar="SESSION", help="session folders or ids")
    p.set_defaults(func=cmd_compare)

    from logs.watch import add_command as add_watch
    add_watch(subparsers, SESSION_HELP)
    from budget.rerun import add_command as add_rerun
    add_rerun(subparsers, SESSION_HELP)


def cmd_sessions(args) -> int:
    from pathlib import Path

    found = find_sessions(Path(args.root) if args.root else None)
    if not found:
        out.print("no sessions yet: start one with `pgolf-agent run`")
        return 0
    rows = []
    for folder in found:
        s = summarize(folder)
        rows.append((s.id, f"{s.researcher} ({s.model})" if s.model else s.researcher,
                     f"{s.runs_used}" + (f"/{s.max_runs}" if s.max_runs else ""), s.best_text,
                     "yes" if s.beat_noise else "no", s.state, f"{s.started:%Y-%m-%d %H:%M} UTC", str(s.path)))
    print_table("sessions (oldest first)", ("id", "researcher", "runs", "best configuration val_bpb",
                                            "beat noise", "state", "started", "folder"), rows)
    return 0


def cmd_report(args) -> int:
    from logs.claim import make_claim
    from logs.sessions import read_session

    try:
        folder = resolve_session(args.session)
        status, runs = read_session(folder)
    except (NoSession, FileNotFoundError) as exc:
        return fail(str(exc))
    claim = make_claim(runs, folder)
    print_status(folder, status)
    print_runs(runs, claim.configuration_of)
    out.print(f"\nclaim: {claim.sentence()}", highlight=False, markup=False)
    return 0


COMPARE_ROWS = (
    ("researcher", lambda s: f"{s.researcher} ({s.model})" if s.model else s.researcher),
    ("state", lambda s: s.state),
    ("best val_bpb (mean of the claimed configuration)", lambda s: s.best_text),
    ("beat the noise", lambda s: f"{'yes' if s.beat_noise else 'no'} (noise {s.noise:.4f})"),
    ("runs to reach it", lambda s: "-" if s.runs_to_best is None else str(s.runs_to_best)),
    ("wall clock to reach it", lambda s: clock(s.secs_to_best) or "-"),
    ("runs used", lambda s: f"{s.runs_used}" + (f" of {s.max_runs}" if s.max_runs else "")),
    ("wall clock", lambda s: clock(s.wall_secs) or "-"),
    ("tokens", lambda s: f"{s.tokens:,}"),
    ("cost", lambda s: "unknown" if s.cost_usd is None else f"${s.cost_usd:.2f}"),
    ("failed runs (crashed, timed out, interrupted)", lambda s: str(s.failed)),
    ("unverified runs", lambda s: str(s.unverified)),
)


def cmd_compare(args) -> int:
    try:
        summaries = [summarize(resolve_session(name)) for name in args.sessions]
    except (NoSession, FileNotFoundError) as exc:
        return fail(str(exc))
    rows = [(label, *(value(s) for s in summaries)) for label, value in COMPARE_ROWS]
    print_table("sessions side by side", ("", *(s.id for s in summaries)), rows)
    for s in summaries:
        out.print(f"{s.id}: {s.claim}", highlight=False, markup=False)
    return 0
