"""Human-in-the-loop approval: a person sees each costly call (with its diff) and allows or refuses it."""
from __future__ import annotations

import difflib
from typing import Callable

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax

from agent.tools import Tool, ToolArgs, ToolFailure

MODES = ("none", "runs", "edits", "all")


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

    def check(self, tool: Tool, args: ToolArgs, toolbox) -> None:
        """Ask when the tool's declaration says this mode asks; a refusal is a ToolFailure with the reason."""
        if not tool.needs_approval(self.mode):
            return
        body = args.model_dump_json(indent=1)[:3000]
        if tool.starts_run:
            base = self.best_code() if self.best_code else ""
            diff = "".join(difflib.unified_diff(base.splitlines(True), toolbox.ws.code().splitlines(True),
                                                "best run", "train.py", n=2))
            body = (f"{getattr(args, 'description', '')}\nhypothesis: {getattr(args, 'hypothesis', '')}\n\n"
                    f"{diff or '(no change from the best run)'}")
        self.console.print(Panel(Syntax(body, "diff", word_wrap=True), title=f"approve {tool.name}?"))
        answer = self.ask("[y]es / [n]o (a reason may follow, e.g. 'n too big'): ").strip()
        if answer.lower() in ("", "y", "yes"):
            return
        reason = answer[1:].strip(" :-") if answer[:1].lower() == "n" else answer
        raise ToolFailure(f"a person refused this {tool.name}" + (f": {reason}" if reason else "")
                          + ". Adjust the plan and try something else.")
