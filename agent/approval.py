"""Human-in-the-loop approval: a person sees each costly call (with its diff) and allows or refuses it."""
from __future__ import annotations

import difflib
import json
from typing import Callable

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax

from agent.providers.base import ToolCall
from agent.tools import ToolFailure

MODES = ("none", "runs", "edits", "all")
EDIT_TOOLS = {"edit_file", "write_file", "restore_run", "submit_run"}


class ApprovalGate:
    """`runs`: approve each submit_run; `edits`: also every change to train.py; `all`: every call.

    A refusal reaches the model as a tool error carrying the person's reason,
    and is recorded in the trajectory like any other result.
    """

    def __init__(self, mode: str, console: Console, ask: Callable[[str], str] | None = None, best_code=None):
        if mode not in MODES:
            raise ValueError(f"--approve {mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self.console = console
        self.ask = ask or (lambda prompt: console.input(prompt))
        self.best_code = best_code  # () -> code of the best run, for the diff shown before a run

    def needs(self, name: str) -> bool:
        return (self.mode == "all" or (self.mode == "edits" and name in EDIT_TOOLS)
                or (self.mode == "runs" and name == "submit_run"))

    def check(self, call: ToolCall, toolbox) -> None:
        if not self.needs(call.name):
            return
        args = call.arguments or {}
        body = json.dumps(args, indent=1)[:3000]
        if call.name == "submit_run":
            base = self.best_code() if self.best_code else ""
            diff = "".join(difflib.unified_diff(base.splitlines(True), toolbox.ws.code().splitlines(True),
                                                "best run", "train.py", n=2))
            body = f"{args.get('description', '')}\nhypothesis: {args.get('hypothesis', '')}\n\n{diff or '(no change from the best run)'}"
        self.console.print(Panel(Syntax(body, "diff", word_wrap=True), title=f"approve {call.name}?"))
        answer = self.ask("[y]es / [n]o (a reason may follow, e.g. 'n too big'): ").strip()
        if answer.lower() in ("", "y", "yes"):
            return
        reason = answer[1:].strip(" :-") if answer[:1].lower() == "n" else answer
        raise ToolFailure(f"a person refused this {call.name}" + (f": {reason}" if reason else "")
                          + ". Adjust the plan and try something else.")
