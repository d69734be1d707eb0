"""`pgolf-agent submit FILE` and `pgolf-agent service status`: one run through the training service,
and a session's budget and runs. Tables on a terminal, plain `key: value` / tab-separated lines otherwise.

Exit codes: agent/outcome.py (OK, NOT_VERIFIED, SETUP, INTERRUPTED for `submit`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.outcome import ExitCode, exit_codes_help
from budget.models import Budget, BudgetStatus, RunProgress, RunRefused, RunRequest, RunResult, RunStatus, ServiceSettings

DEFAULT_SESSION = Path("sessions") / "manual"
BUDGET_FLAGS = {"max_runs": "--budget", "session_secs": "--hours", "time_budget_secs": "--time-budget",
                "run_timeout_secs": "--timeout"}
PLAIN_PROGRESS_SECS = 15  # how often progress is printed when stderr is not a terminal
STATUS_STYLE = {RunStatus.completed: "green", RunStatus.running: "cyan", RunStatus.unverified: "yellow"}

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def add_commands(subparsers) -> None:
    """Add `submit` and `service status` to the `pgolf-agent` sub-command parsers."""
    p = subparsers.add_parser("submit", help="run one train.py through the training service and print its result",
                              epilog=exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="the train.py to run")
    p.add_argument("--session", default=str(DEFAULT_SESSION), metavar="DIR",
                   help=f"session folder: its ledger, budget and runs (default ./{DEFAULT_SESSION})")
    p.add_argument("--description", default="", metavar="TEXT", help="what this run tries")
    p.add_argument("--time-budget", type=float, metavar="S", help="training seconds per run, at most 180 "
                   "(default: the session's, 180 for a new one)")
    p.add_argument("--timeout", type=float, metavar="S", help="hard limit of one run, eval included "
                   "(default: the session's, 210 for a new one; time budget + 30 when only --time-budget is given)")
    p.add_argument("--budget", type=int, metavar="N", help="runs in the session (default: the session's, 50 for a new one)")
    p.add_argument("--hours", type=float, metavar="H", help="wall-clock hours of the session (default: the session's, 3)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="runs in flight at once (default 1)")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: RAY_ADDRESS, else a "
                   "local Ray); sets RAY_AUTH_MODE=token unless it is set")
    p.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="run train.py without bubblewrap, with your user's rights; results say sandboxed=false")
    p.add_argument("--seed", type=int, metavar="N", help="TORCH_SEED for the run")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_submit)

    service = subparsers.add_parser("service", help="the training service: a session's budget and runs")
    commands = service.add_subparsers(dest="service_command", metavar="COMMAND", required=True)
    p = commands.add_parser("status", help="show a session's budget and runs (also while a harness drives it)")
    p.add_argument("--session", metavar="DIR", help="session folder (default: the latest session)")
    p.add_argument("--json", action="store_true", help="print the status and every run as JSON")
    p.set_defaults(func=cmd_service_status)


def fail(message: str, code: ExitCode = ExitCode.SETUP) -> ExitCode:
    err.print(f"[red]error:[/red] {escape(message)}")
    return code


def budget_from_flags(args) -> Budget:
    """Only the flags given are set, so a resumed session keeps its stored values for the rest."""
    explicit = {"max_runs": args.budget, "session_secs": args.hours * 3600 if args.hours else None,
                "time_budget_secs": args.time_budget, "run_timeout_secs": args.timeout}
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if "time_budget_secs" in explicit and "run_timeout_secs" not in explicit:
        explicit["run_timeout_secs"] = explicit["time_budget_secs"] + 30  # start-up and evaluation
    return Budget(**explicit)


def refusal_answer(exc: RunRefused, session_dir: Path) -> RunRefused:
    """Fill in the budget left, so a refusal answers like every other answer."""
    from budget.ledger import Ledger, SessionNotFound

    if exc.refusal.runs_remaining is not None:
        return exc
    try:
        with Ledger.open(session_dir, exclusive=False) as ledger:
            status = ledger.status()
    except SessionNotFound:
        return exc
    return type(exc)(exc.refusal.model_copy(update={"runs_remaining": status.runs_remaining,
                                                     "match_time_remaining_secs": status.match_time_remaining_secs}))


def print_refusal(exc: RunRefused, as_json: bool) -> int:
    if as_json:
        out.print_json(json.dumps({"refused": exc.refusal.model_dump()}))
    else:
        err.print(f"[red]refused ({exc.code}):[/red] {escape(str(exc))}")
    return ExitCode.SETUP


def clock(secs: float | None) -> str:
    if secs is None:
        return ""
    secs = int(round(secs))
    return f"{secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}"


def number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def result_rows(r: RunResult, run_dir: Path) -> list[tuple[str, str]]:
    return [
        ("run", str(r.run_id)), ("status", r.status.value), ("val_bpb", number(r.val_bpb)),
        ("reported_val_bpb", number(r.reported_val_bpb)), ("verified", str(r.verified).lower()),
        ("reasons", "; ".join(r.reasons)), ("training_secs", number(r.training_secs, 1)),
        ("wall_secs", number(r.wall_secs, 1)), ("cpu_others", number(r.cpu_others, 2)),
        ("total_steps", "" if r.total_steps is None else str(r.total_steps)),
        ("num_params_M", number(r.num_params_M, 3)), ("train_loss", number(r.train_loss)),
        ("sandboxed", str(r.sandboxed).lower()), ("runs_remaining", str(r.runs_remaining)),
        ("match_time_remaining", clock(r.match_time_remaining_secs)), ("run_dir", str(run_dir)),
    ]


def print_result(r: RunResult, run_dir: Path) -> None:
    rows = result_rows(r, run_dir)
    if not out.is_terminal:
        for key, value in rows:
            print(f"{key}: {value}")
        return
    table = Table(title=f"run {r.run_id}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    style = STATUS_STYLE.get(r.status, "red")
    for key, value in rows:
        table.add_row(key, f"[{style}]{value}[/{style}]" if key == "status" else escape(value))
    out.print(table)
    if r.status != RunStatus.completed and r.stderr_tail:
        out.print("[dim]stderr tail:[/dim]")
        out.print(escape(r.stderr_tail[-1500:]), highlight=False)


class ProgressPrinter:
    """Live progress of one run: a spinner line on a terminal, a line every few seconds otherwise."""

    def __init__(self):
        self.spinner = err.status("starting the run ...") if err.is_terminal else None
        self.last_plain = time.monotonic()

    def __enter__(self):
        if self.spinner:
            self.spinner.start()
        return self

    def __exit__(self, *exc):
        if self.spinner:
            self.spinner.stop()

    def __call__(self, p: RunProgress) -> None:
        last = p.stderr_tail[-1] if p.stderr_tail else ""
        if self.spinner:
            self.spinner.update(f"run {p.run_id}: {p.elapsed_secs:.0f} s  [dim]{escape(last[:100])}[/dim]")
        elif time.monotonic() - self.last_plain >= PLAIN_PROGRESS_SECS:
            self.last_plain = time.monotonic()
            err.print(f"run {p.run_id}: {p.elapsed_secs:.0f} s  {last[:100]}", markup=False, highlight=False)


def cmd_submit(args) -> int:
    from budget.ledger import SessionLocked, check_code
    from budget.service import ServiceUnavailable, TrainingService, run_dir_of
    from trainer.corpus import CorpusError

    path = Path(args.file)
    if not path.is_file():
        return fail(f"{path} not found; pass the path of a train.py")
    try:
        code = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return fail(f"{path} is not UTF-8 text; pass a Python source file")
    session_dir = Path(args.session)
    try:
        check_code(code)  # before Ray starts: a refused file costs nothing, not even start-up time
    except RunRefused as exc:
        return print_refusal(refusal_answer(exc, session_dir), args.json)
    try:
        settings = ServiceSettings(session_dir=session_dir, budget=budget_from_flags(args), concurrency=args.concurrency,
                                   ray_address=args.ray_address, sandbox=not args.unsafe_no_sandbox)
    except ValidationError as exc:
        problem = exc.errors()[0]
        flag = BUDGET_FLAGS.get(str(problem["loc"][-1]), "--" + str(problem["loc"][-1]).replace("_", "-"))
        return fail(f"{flag}: {problem['msg']}")
    if args.unsafe_no_sandbox:
        err.print("[yellow]warning:[/yellow] --unsafe-no-sandbox: train.py runs unconfined with your user's "
                  "rights and can read the val split; its result is marked sandboxed=false")
    request = RunRequest(train_code=code, description=args.description, seed=args.seed)
    try:
        with TrainingService(settings) as service:
            for run_id in service.recovered_run_ids:
                run = service.get(run_id)
                err.print(f"[yellow]note:[/yellow] run {run_id} was not recorded when the last harness stopped; "
                          f"it is now recorded as {run.status.value}: {escape(run.reasons[-1] if run.reasons else '')}")
            with ProgressPrinter() as progress:
                result = service.submit(request, wait=True, on_progress=progress)
    except RunRefused as exc:
        return print_refusal(exc, args.json)
    except (SessionLocked, CorpusError, ServiceUnavailable) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted: a run in flight was stopped and recorded as interrupted (charged)")
        return ExitCode.INTERRUPTED
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print_result(result, run_dir_of(settings.session_dir.expanduser().absolute(), result.run_id))
    if not result.sandboxed:
        err.print("[yellow]warning:[/yellow] this run was not sandboxed")
    return ExitCode.OK if result.counts_as_best else ExitCode.NOT_VERIFIED


def status_lines(s: BudgetStatus) -> list[tuple[str, str]]:
    b = s.budget
    return [
        ("runs", f"{s.runs_used} used, {s.runs_remaining} remaining" + (f" of {b.max_runs}" if b else "")),
        ("match_time_remaining", clock(s.match_time_remaining_secs) + (f" of {clock(b.session_secs)}" if b else "")),
        ("session_started_at", f"{s.session_started_at:%Y-%m-%d %H:%M:%S} UTC"),
        ("per_run", f"time budget {b.time_budget_secs:g} s, timeout {b.run_timeout_secs:g} s" if b else ""),
        ("running", ", ".join(map(str, s.active_run_ids)) or "none"),
        ("best single run", f"run {s.best_run_id}: val_bpb {s.best_val_bpb:.4f} (one seed; `pgolf-agent report` "
                            "gives the claimed best configuration)" if s.best_run_id is not None else "none yet"),
    ]


RUN_COLUMNS = ("id", "status", "val_bpb", "reported", "verified", "reasons", "training s", "description")


def run_row(r: RunResult) -> tuple[str, ...]:
    return (str(r.run_id), r.status.value, number(r.val_bpb), number(r.reported_val_bpb),
            "yes" if r.verified else "no", "; ".join(r.reasons), number(r.training_secs, 1), r.description)


def print_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], styles: dict[int, str] | None = None):
    """A rich table on a terminal; tab-separated lines under a header otherwise. `styles`: row index -> style of
    its second cell (a status)."""
    if out.is_terminal:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, overflow="fold")
        for i, row in enumerate(rows):
            cells = [escape(v) for v in row]
            if styles and i in styles:
                cells[1] = f"[{styles[i]}]{cells[1]}[/{styles[i]}]"
            table.add_row(*cells)
        out.print(table)
        return
    print("\t".join(columns))
    for row in rows:
        print("\t".join(v.replace("\t", " ").replace("\n", " ") for v in row))


def print_runs(runs: list[RunResult], configuration_of: dict[int, int] | None = None) -> None:
    """The run table; with `configuration_of`, a column naming each run's configuration (its first run)."""
    columns = RUN_COLUMNS if configuration_of is None else (RUN_COLUMNS[0], "config", *RUN_COLUMNS[1:])
    rows = [run_row(r) if configuration_of is None else
            (str(r.run_id), str(configuration_of.get(r.run_id, r.run_id)), *run_row(r)[1:]) for r in runs]
    print_table("runs", columns, rows, {i: STATUS_STYLE.get(r.status, "red") for i, r in enumerate(runs)})


def print_status(session_dir: Path, status: BudgetStatus) -> None:
    if out.is_terminal:
        summary = Table(title=f"session {session_dir}", show_header=False)
        for key, value in status_lines(status):
            summary.add_row(key, value)
        out.print(summary)
    else:
        print(f"session: {session_dir}")
        for key, value in status_lines(status):
            print(f"{key}: {value}")


def cmd_service_status(args) -> int:
    from budget.ledger import Ledger, SessionNotFound
    from logs.sessions import NoSession, resolve_session

    try:
        session_dir = resolve_session(args.session)
        with Ledger.open(session_dir, exclusive=False) as ledger:
            status, runs = ledger.status(), ledger.runs()
    except (SessionNotFound, NoSession) as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps({"status": status.model_dump(mode="json"), "runs": [r.model_dump(mode="json") for r in runs]},
                         indent=2))
        return 0
    print_status(ledger.session_dir, status)
    print_runs(runs)
    unsandboxed = [str(r.run_id) for r in runs if not r.sandboxed]
    if unsandboxed:
        err.print(f"[yellow]warning:[/yellow] run {', '.join(unsandboxed)} ran without the sandbox")
    return 0
