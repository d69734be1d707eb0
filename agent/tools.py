"""The researcher's tools: the same JSON-schema'd set for every provider.

Each tool takes a dict of arguments and returns text; errors are returned as
`ToolFailure` with a message the model can act on. Every result ends with the
budget left, so the model never has to ask.
"""
from __future__ import annotations

import difflib
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.providers.base import ToolSpec
from budget.models import RunRefused, RunRequest, RunResult
from trainer.contention import CONTENDED
from trainer.untrusted_files import read_tail

READ_BYTES = 64 * 1024   # of a run's file: its end (a run's logs are as long as it made them)
READ_CHARS = 20_000      # what one read_file returns at most

PREPARE_SOURCE = Path(__file__).resolve().parents[1] / "trainer" / "prepare.py"
NOTE_KINDS = ("insight", "plan", "conclusion")


class ToolFailure(Exception):
    """A tool call that did nothing; the message says why and what to do instead."""


class Finished(Exception):
    """The agent called `finish`."""

    def __init__(self, summary: str):
        super().__init__(summary)
        self.summary = summary


@dataclass
class Note:
    kind: str
    text: str
    after_run: int | None


@dataclass
class Workspace:
    """The agent's editable train.py and its notes, inside the session directory."""

    session_dir: Path
    notes: list[Note] = field(default_factory=list)

    @property
    def train_path(self) -> Path:
        return self.session_dir / "work" / "train.py"

    @property
    def notes_path(self) -> Path:
        return self.session_dir / "notes.jsonl"

    def code(self) -> str:
        return self.train_path.read_text()

    def write(self, code: str) -> None:
        self.train_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.train_path.with_suffix(".tmp")
        tmp.write_text(code)
        tmp.replace(self.train_path)

    def add_note(self, note: Note) -> None:
        self.notes.append(note)
        with open(self.notes_path, "a") as f:
            f.write(json.dumps(note.__dict__) + "\n")

    def load_notes(self) -> None:
        if self.notes_path.exists():
            self.notes = [Note(**json.loads(line)) for line in self.notes_path.read_text().splitlines() if line]


def _obj(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


TOOL_SPECS = [
    ToolSpec(name="read_file", description=(
        "Read a file: 'train.py' (your working copy), 'prepare.py' (fixed, read-only), or a past run's "
        "'runs/<id>/train.py', 'runs/<id>/stdout.log', 'runs/<id>/stderr.log'. Lines are numbered."),
        parameters=_obj({"path": {"type": "string"},
                         "start_line": {"type": "integer", "minimum": 1},
                         "max_lines": {"type": "integer", "minimum": 1}}, ["path"])),
    ToolSpec(name="edit_file", description=(
        "Edit the working train.py by replacing one exact, unique occurrence of old_text with new_text."),
        parameters=_obj({"old_text": {"type": "string"}, "new_text": {"type": "string"}}, ["old_text", "new_text"])),
    ToolSpec(name="write_file", description="Replace the whole working train.py with content.",
             parameters=_obj({"content": {"type": "string"}}, ["content"])),
    ToolSpec(name="submit_run", description=(
        "Train the working train.py as one run (charged when it starts; a syntax error is free). "
        "Give a one-line description of the change and the hypothesis it tests. Returns the verified val_bpb."),
        parameters=_obj({"description": {"type": "string"}, "hypothesis": {"type": "string"},
                         "seed": {"type": "integer", "description": "TORCH_SEED for this run (default 42)"}},
                        ["description", "hypothesis"])),
    ToolSpec(name="wait_runs", description="Wait for runs submitted while others were running and return their results.",
             parameters=_obj({}, [])),
    ToolSpec(name="list_runs", description="The table of all runs: id, status, val_bpb, verified, description.",
             parameters=_obj({}, [])),
    ToolSpec(name="show_run", description="One run in full: result, reasons, hypothesis, log tails.",
             parameters=_obj({"run_id": {"type": "integer"}}, ["run_id"])),
    ToolSpec(name="restore_run", description="Set the working train.py back to the code of a past run.",
             parameters=_obj({"run_id": {"type": "integer"}}, ["run_id"])),
    ToolSpec(name="write_note", description=(
        "Record an insight, plan or conclusion for the methodology log (what you learned and why)."),
        parameters=_obj({"kind": {"type": "string", "enum": list(NOTE_KINDS)}, "text": {"type": "string"}},
                        ["kind", "text"])),
    ToolSpec(name="finish", description="End the session with a short summary of what worked.",
             parameters=_obj({"summary": {"type": "string"}}, ["summary"])),
]
TOOL_NAMES = {spec.name for spec in TOOL_SPECS}


def run_line(r: RunResult) -> str:
    bpb = f"{r.val_bpb:.4f}" if r.val_bpb is not None else "-"
    mark = "" if r.verified else " (unverified)" if r.status.value == "unverified" else ""
    steps = f"  {r.total_steps} steps" if r.total_steps is not None else ""
    if r.cpu_others is not None and r.cpu_others > CONTENDED:  # fewer steps than the code would get alone
        steps += f" [other work took {r.cpu_others:.0%} of the cores]"
    return f"#{r.run_id:<3} {r.status.value:<11} val_bpb {bpb}{mark}{steps}  {r.description[:90]}"


def result_summary(r: RunResult) -> dict:
    out = {"run_id": r.run_id, "status": r.status.value, "val_bpb": r.val_bpb,
           "reported_val_bpb": r.reported_val_bpb, "verified": r.verified,
           "training_secs": r.training_secs, "total_steps": r.total_steps, "num_params_M": r.num_params_M,
           "cpu_others": r.cpu_others}
    if r.reasons:
        out["reasons"] = r.reasons
    if r.status.value in ("crashed", "timeout", "unverified"):
        out["stderr_tail"] = r.stderr_tail[-1500:]
    return out


def nearest_lines(code: str, wanted: str, n: int = 3) -> str:
    first = wanted.strip().splitlines()[0] if wanted.strip() else ""
    lines = code.splitlines()
    close = difflib.get_close_matches(first, lines, n=n, cutoff=0.4)
    return "\n".join(f"{lines.index(c) + 1:4d}| {c}" for c in close) or "(no similar line)"


class Toolbox:
    """Executes tool calls against the workspace and the training service."""

    def __init__(self, workspace: Workspace, service, progress: Callable | None = None):
        self.ws = workspace
        self.service = service
        self.progress = progress or nullcontext  # () -> context manager yielding an on_progress callback
        self.pending: list[int] = []

    def budget_line(self) -> str:
        s = self.service.status()
        return (f"[budget] runs remaining {s.runs_remaining}, match time remaining "
                f"{s.match_time_remaining_secs / 60:.1f} min"
                + (f", best verified val_bpb {s.best_val_bpb:.4f} (run {s.best_run_id})" if s.best_val_bpb else ""))

    def execute(self, name: str, args: dict) -> str:
        handler = getattr(self, f"tool_{name}", None)
        if name not in TOOL_NAMES or handler is None:
            raise ToolFailure(f"unknown tool {name!r}; the tools are: {', '.join(sorted(TOOL_NAMES))}")
        try:
            return handler(**args)
        except TypeError as exc:
            raise ToolFailure(f"bad arguments for {name}: {exc}; see the tool's schema") from None

    # --- files -------------------------------------------------------------
    def tool_read_file(self, path: str, start_line: int = 1, max_lines: int = 400) -> str:
        path = path.strip().lstrip("./")
        if path == "train.py":
            text = self.ws.code()
        elif path == "prepare.py":
            text = PREPARE_SOURCE.read_text()
        elif path.startswith("runs/"):
            parts = path.split("/")
            if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in ("train.py", "stdout.log", "stderr.log"):
                raise ToolFailure(f"{path!r}: use runs/<id>/train.py, runs/<id>/stdout.log or runs/<id>/stderr.log")
            file = self.ws.session_dir / "runs" / f"{int(parts[1]):03d}" / parts[2]
            if not file.exists():
                raise ToolFailure(f"{path} does not exist; list_runs shows the run ids")
            text = read_tail(file, READ_BYTES)
            if file.stat().st_size > READ_BYTES:
                text = f"[only the last {READ_BYTES // 1024} KiB of {path} are readable]\n" + text.split("\n", 1)[-1]
        else:
            raise ToolFailure(f"cannot read {path!r}: readable files are train.py, prepare.py and runs/<id>/...")
        lines = text.splitlines()
        chosen = lines[start_line - 1: start_line - 1 + max_lines]
        body = "\n".join(f"{i:4d}| {line}" for i, line in enumerate(chosen, start_line))
        if len(body) > READ_CHARS:
            body = body[:READ_CHARS] + f"\n... cut at {READ_CHARS} characters (use start_line and max_lines)"
        more = len(lines) - (start_line - 1 + len(chosen))
        return body + (f"\n... {more} more lines (use start_line)" if more > 0 else "")

    def tool_edit_file(self, old_text: str, new_text: str) -> str:
        code = self.ws.code()
        count = code.count(old_text) if old_text else 0
        if count == 0:
            raise ToolFailure("old_text was not found in train.py. Nearest lines:\n" + nearest_lines(code, old_text)
                              + "\nCopy the exact text (whitespace included), or read_file first.")
        if count > 1:
            raise ToolFailure(f"old_text occurs {count} times in train.py; include more surrounding lines "
                              "so it matches exactly once")
        self.ws.write(code.replace(old_text, new_text, 1))
        return "edited train.py:\n" + "".join(difflib.unified_diff(
            code.splitlines(True), self.ws.code().splitlines(True), "train.py", "train.py", n=1))

    def tool_write_file(self, content: str) -> str:
        if not content.strip():
            raise ToolFailure("content is empty; write the whole train.py")
        self.ws.write(content)
        return f"wrote train.py ({len(content.splitlines())} lines)"

    def tool_restore_run(self, run_id: int) -> str:
        file = self.ws.session_dir / "runs" / f"{int(run_id):03d}" / "train.py"
        if not file.exists():
            raise ToolFailure(f"run {run_id} has no code; list_runs shows the run ids")
        self.ws.write(file.read_text())
        return f"train.py restored to the code of run {run_id}"

    # --- runs --------------------------------------------------------------
    def tool_submit_run(self, description: str, hypothesis: str, seed: int | None = None) -> str:
        request = RunRequest(train_code=self.ws.code(), description=description, hypothesis=hypothesis, seed=seed)
        try:
            if getattr(self.service, "concurrency", 1) > 1:
                run_id = self.service.submit_async(request)
                self.pending.append(run_id)
                return f"run {run_id} started; call wait_runs to collect its result"
            with self.progress() as on_progress:
                result = self.service.submit(request, wait=True, on_progress=on_progress)
        except RunRefused as exc:
            raise ToolFailure(f"refused, no run charged: {exc}") from None
        return json.dumps(result_summary(result))

    def tool_wait_runs(self) -> str:
        if not self.pending:
            raise ToolFailure("no runs are pending")
        results = self.service.wait(self.pending)
        self.pending = [p for p in self.pending if p not in {r.run_id for r in results}]
        return "\n".join(json.dumps(result_summary(r)) for r in results)

    def tool_list_runs(self) -> str:
        runs = self.service.runs()
        return "\n".join(run_line(r) for r in runs) or "no runs yet"

    def tool_show_run(self, run_id: int) -> str:
        r = self.service.get(int(run_id))
        if r is None:
            raise ToolFailure(f"there is no run {run_id}; list_runs shows the run ids")
        return json.dumps({**result_summary(r), "description": r.description, "hypothesis": r.hypothesis,
                           "stdout_tail": r.stdout_tail[-1500:], "stderr_tail": r.stderr_tail[-1500:]}, indent=1)

    # --- record ------------------------------------------------------------
    def tool_write_note(self, kind: str, text: str) -> str:
        if kind not in NOTE_KINDS:
            raise ToolFailure(f"kind must be one of {', '.join(NOTE_KINDS)}")
        runs = self.service.runs()
        self.ws.add_note(Note(kind, text.strip(), runs[-1].run_id if runs else None))
        return f"noted ({kind})"

    def tool_finish(self, summary: str) -> str:
        raise Finished(summary)
