"""A person in the loop: each costly call (with its diff) waits for a person's decision.

The choices: approve; reject with a reason (it reaches the model as the tool's result); edit the proposed
train.py in $EDITOR and run the edited version; approve this and every later call; stop the session
cleanly. Every decision is recorded in the trajectory (an `approval` event) with the time the call waited
for it, and an edit keeps both versions: the proposal and the edit, in the event and in
`approvals/<n>-proposed.py` / `approvals/<n>-edited.py` of the session folder.
"""
from __future__ import annotations

import difflib
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax
from rich.text import Text

from agent.loop import PersonStopped
from agent.tools import Tool, ToolArgs, ToolFailure
from budget.ledger import check_code
from budget.models import RunRefused
from logs.trajectory import SessionEvent

MODES = ("none", "runs", "edits", "all")
# what a person types (its first word: a letter or the word) -> the decision
ANSWERS = {"y": "approve", "yes": "approve", "n": "reject", "no": "reject", "e": "edit", "edit": "edit",
           "a": "approve_all", "all": "approve_all", "s": "stop", "stop": "stop"}


def editor_command() -> list[str]:
    """$EDITOR, else $VISUAL, else vi; a value may carry arguments (`code --wait`)."""
    return shlex.split(os.environ.get("EDITOR") or os.environ.get("VISUAL") or "vi")


def code_diff(before: str, after: str, a: str, b: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), a, b, n=2))


@dataclass
class Edit:
    """A person's edit of a proposed train.py, both versions kept as files."""

    proposed: str
    edited: str
    proposed_file: Path
    edited_file: Path
    ready: bool = False  # changed, and it compiles: it may run


class ApprovalGate:
    """`runs`: approve each submit_run; `edits`: also every change to train.py; `all`: every call."""

    def __init__(self, mode: str, console: Console, ask: Callable[[str], str] | None = None, best_code=None,
                 record: Callable[[SessionEvent], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"--approve {mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self.console = console
        self.ask = ask or (lambda prompt: console.input(Text(prompt)))  # Text: no markup, no highlighting
        self.best_code = best_code  # () -> code of the best run, for the diff shown before a run
        self.record = record or (lambda event: None)  # the trajectory's append
        self.approve_all = False

    def check(self, tool: Tool, args: ToolArgs, toolbox, call_id: str = "") -> str | None:
        """Ask when the tool's declaration says this mode asks.

        Returns a note for the model when the person edited the code (None otherwise); a refusal is a
        ToolFailure with the person's reason, a stop is PersonStopped.
        """
        if self.approve_all or not tool.needs_approval(self.mode):
            return None
        self._show(tool, args, toolbox)
        choices = "[y]es / [n]o + reason / " + ("[e]dit train.py / " if tool.starts_run else "") + \
                  "[a]ll: approve this and every later one / [s]top the session: "
        started = time.monotonic()
        edit: Edit | None = None  # once the person has opened the editor
        while True:
            answer = self._ask(choices)
            word, _, rest = answer.strip().partition(" ")
            decision = ANSWERS.get(word.lower().rstrip(":"))
            if decision is None or (decision == "edit" and not tool.starts_run):
                self.console.print(f"answer one of: {escape(choices.rstrip(': '))}")
                continue
            if decision != "edit":
                break
            edit = self._edit(toolbox, edit)
            if edit.ready:
                break
        reason = rest.strip(" :-")
        if decision == "reject" and not reason:
            reason = self._ask("reason, sent to the researcher (Enter for none): ").strip()
        detail = {"decision": decision, "tool": tool.name, "tool_call_id": call_id, "mode": self.mode,
                  "wait_secs": round(time.monotonic() - started, 1)}
        if getattr(args, "description", None):
            detail["description"] = args.description
        if decision == "reject":
            detail["reason"] = reason
        if edit is not None and decision != "edit":  # an edit abandoned for another answer: not what ran
            edit.proposed_file.unlink(missing_ok=True)
            edit.edited_file.unlink(missing_ok=True)
        if decision == "edit":
            detail |= {"proposed_file": str(edit.proposed_file.relative_to(toolbox.ws.session_dir)),
                       "edited_file": str(edit.edited_file.relative_to(toolbox.ws.session_dir)),
                       "diff": code_diff(edit.proposed, edit.edited, "proposed", "edited"),
                       "proposed_code": edit.proposed, "edited_code": edit.edited}
        self.record(SessionEvent(event="approval", detail=detail))
        return self._act(decision, tool, detail, toolbox)

    def _act(self, decision: str, tool: Tool, detail: dict, toolbox) -> str | None:
        if decision == "approve_all":
            self.approve_all = True
            self.console.print("approved: this call and every later one in this session")
        elif decision == "reject":
            reason = detail["reason"]
            raise ToolFailure(f"a person refused this {tool.name}" + (f": {reason}" if reason else "")
                              + ". Adjust the plan and try something else.")
        elif decision == "stop":
            raise PersonStopped("a person stopped the session at the approval prompt")
        elif decision == "edit":
            toolbox.ws.write(detail["edited_code"])
            return ("A person edited train.py before this run: the run trains their version, and the working "
                    f"train.py is now that version. Their changes to your proposal:\n```diff\n{detail['diff']}```")
        return None

    def _ask(self, prompt: str) -> str:
        try:
            return self.ask(prompt)
        except EOFError:  # Ctrl-D, or stdin closed: no one can answer any more
            self.console.print("no answer can come (end of input): stopping the session")
            return "s"

    def _show(self, tool: Tool, args: ToolArgs, toolbox) -> None:
        body = args.model_dump_json(indent=1)[:3000]
        if tool.starts_run:
            base = self.best_code() if self.best_code else ""
            diff = code_diff(base, toolbox.ws.code(), "best run", "train.py")
            body = (f"{getattr(args, 'description', '')}\nhypothesis: {getattr(args, 'hypothesis', '')}\n\n"
                    f"{diff or '(no change from the best run)'}")
        self.console.print(Panel(Syntax(body, "diff", word_wrap=True), title=f"approve {tool.name}?"))

    def _edit(self, toolbox, earlier: Edit | None) -> Edit:
        """Open the proposal in the editor; a second edit of the same call continues the first one's file."""
        if earlier is None:
            folder = toolbox.ws.session_dir / "approvals"
            folder.mkdir(parents=True, exist_ok=True)
            n = 1 + sum(1 for _ in folder.glob("*-proposed.py"))
            earlier = Edit(toolbox.ws.code(), "", folder / f"{n:03d}-proposed.py", folder / f"{n:03d}-edited.py")
            earlier.proposed_file.write_text(earlier.proposed)
            earlier.edited_file.write_text(earlier.proposed)
        edit = Edit(earlier.proposed, "", earlier.proposed_file, earlier.edited_file)
        command = editor_command() + [str(edit.edited_file)]
        try:
            returncode = subprocess.run(command).returncode
        except OSError as exc:
            self.console.print(f"[red]cannot start the editor {escape(command[0])!r}[/red] ({escape(str(exc))}); set "
                               "EDITOR to one that is installed")
            return edit
        edit.edited = edit.edited_file.read_text()
        if returncode != 0:
            self.console.print(f"the editor exited with code {returncode}; e edits again, or choose another answer")
        elif edit.edited == edit.proposed:
            self.console.print("train.py is unchanged: y runs the proposal as it is, e edits it again")
        else:
            try:
                check_code(edit.edited)
                edit.ready = True
            except RunRefused as exc:
                self.console.print(f"[red]the edited train.py cannot run[/red]: {escape(str(exc))}\ne edits it "
                                   f"again ({edit.edited_file}), y runs the proposal as it is")
        if edit.ready:
            self.console.print(code_diff(edit.proposed, edit.edited, "proposed", "edited"), markup=False,
                               highlight=False)
        return edit
