"""The researcher's tools, each declared once: name, description, argument model, handler, approval.

Every tool's arguments are one pydantic model. The JSON schema both providers receive is generated
from it (strict-compatible: every property required, optional ones nullable, no other fields), and
every call is validated against it before its handler runs, so a wrong type, a missing or an extra
field comes back to the model as a tool error naming the field, what was expected and what was
received. A handler returns a `ToolOutput`: the text the model reads and the run records it touched,
typed. Failures the model can act on are `ToolFailure`; every result ends with the budget left.

Runs in the background (`Toolbox(background=True)`): `submit_run` returns as soon as the run has
started, or is queued behind the run that trains (the service starts it the moment a slot frees);
each result is reported once, appended to the next tool result ("run 7 finished: ..."), and
`wait_runs` waits for the next one. At most one submission per run slot waits in the queue; a
submission beyond that waits for the oldest run's result first.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.providers.base import ToolCall, ToolSpec
from budget.ledger import check_code
from budget.models import BudgetStatus, RunRefused, RunRequest, RunResult, RunStatus
from trainer.contention import CONTENDED
from trainer.untrusted_files import read_tail

READ_BYTES = 64 * 1024   # of a run's file: its end (a run's logs are as long as it made them)
READ_CHARS = 20_000      # what one read_file returns at most

PREPARE_SOURCE = Path(__file__).resolve().parents[1] / "trainer" / "prepare.py"
NoteKind = Literal["insight", "plan", "conclusion"]
START_WAIT_SECS = 5.0  # how long submit_run waits to say "started" rather than "queued"


class ToolFailure(Exception):
    """A tool call that did nothing; the message says why and what to do instead."""


class BadCall(ToolFailure):
    """A call that does not fit any tool's declaration (unknown name, unreadable or invalid arguments)."""


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


# --- declaration -------------------------------------------------------------------

class ToolArgs(BaseModel):
    """Arguments of one tool: no field beyond the declared ones, no silent type conversion."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ReadFileArgs(ToolArgs):
    path: str = Field(description="'train.py', 'prepare.py', 'runs/<id>/train.py', 'runs/<id>/stdout.log' "
                                  "or 'runs/<id>/stderr.log'")
    start_line: int | None = Field(None, ge=1, description="first line to show (null: 1)")
    max_lines: int | None = Field(None, ge=1, description="lines to show at most (null: 400)")


class EditFileArgs(ToolArgs):
    old_text: str = Field(description="text that occurs exactly once in train.py, whitespace included")
    new_text: str = Field(description="what replaces it")


class WriteFileArgs(ToolArgs):
    content: str = Field(description="the whole new train.py")


class SubmitRunArgs(ToolArgs):
    description: str = Field(description="one line: what this run changes")
    hypothesis: str = Field(description="what you expect and why")
    seed: int | None = Field(None, description="TORCH_SEED for this run (null: 42)")


class RunIdArgs(ToolArgs):
    run_id: int = Field(ge=0, description="a run id from the run table")


class NoArgs(ToolArgs):
    pass


class WriteNoteArgs(ToolArgs):
    kind: NoteKind
    text: str = Field(description="what you learned, plan or conclude, and why")


class FinishArgs(ToolArgs):
    summary: str = Field(description="what worked, in a few sentences")


class ToolOutput(BaseModel):
    """What a tool returns: the text the model reads and the run records the call touched."""

    text: str
    runs: list[RunResult] = Field(default_factory=list)


# JSON-schema keywords OpenAI's strict mode accepts inside a property
STRICT_KEYWORDS = {"type", "description", "enum", "const", "minimum", "maximum", "exclusiveMinimum",
                   "exclusiveMaximum", "multipleOf", "pattern", "format", "items", "minItems", "maxItems"}


def _property_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A pydantic property schema as a provider wants it: no titles or defaults, `X | None` as a nullable type."""
    prop = {k: v for k, v in prop.items() if k not in ("title", "default")}
    branches = prop.pop("anyOf", None)
    if branches is not None:
        others = [b for b in branches if b != {"type": "null"}]
        if len(others) == 1 and len(branches) == 2 and "type" in others[0]:
            inner = _property_schema(others[0])
            prop = {**inner, **prop, "type": [inner["type"], "null"]}
            if "enum" in prop:
                prop["enum"] = [*prop["enum"], None]
        else:
            prop["anyOf"] = [_property_schema(b) for b in branches]
    return prop


def arguments_schema(model: type[ToolArgs]) -> tuple[dict[str, Any], bool]:
    """The JSON schema of a tool's arguments, and whether it meets OpenAI's strict mode.

    Every property is listed as required: an optional argument is declared `X | None = None`, so a
    strict provider sends null for it, and a lenient one may leave it out.
    """
    schema = model.model_json_schema()
    props = {name: _property_schema(p) for name, p in schema.get("properties", {}).items()}
    optional_not_null = [name for name, f in model.model_fields.items()
                         if not f.is_required() and "null" not in props[name].get("type", [])]
    strict = "$defs" not in schema and not optional_not_null and all(set(p) <= STRICT_KEYWORDS for p in props.values())
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}, strict


@dataclass(frozen=True)
class Tool:
    """One tool, declared once; the schema, the validation, the approval gate and the loop read it."""

    name: str
    description: str
    args: type[ToolArgs]
    handler: Callable[[Toolbox, Any], ToolOutput]
    edits_code: bool = False   # changes the working train.py
    starts_run: bool = False   # spends a run

    @cached_property
    def spec(self) -> ToolSpec:
        parameters, strict = arguments_schema(self.args)
        return ToolSpec(name=self.name, description=self.description, parameters=parameters, strict=strict)

    def needs_approval(self, mode: str) -> bool:
        """Whether `--approve MODE` asks a person before this tool runs."""
        return (mode == "all" or (mode == "edits" and (self.edits_code or self.starts_run))
                or (mode == "runs" and self.starts_run))

    def parse(self, arguments: dict[str, Any] | None) -> ToolArgs:
        """The call's arguments as this tool's model, or BadCall naming each field that is wrong."""
        try:
            return self.args.model_validate(arguments if arguments is not None else {})
        except ValidationError as exc:
            problems = "; ".join(self._problem(e) for e in exc.errors())
            raise BadCall(f"bad arguments for {self.name}: {problems}. Call it as {self.signature()}.") from None

    def _problem(self, e: dict) -> str:
        name = ".".join(str(p) for p in e["loc"]) or "arguments"
        props = self.spec.parameters["properties"]
        if e["type"] == "missing":
            return f"{name} is missing (expected {expected(props[name])})"
        if e["type"] == "extra_forbidden":
            return f"{name} is not an argument of {self.name} (received {received(e['input'])})"
        if name not in props:  # the arguments as a whole
            return f"expected a JSON object of arguments, received {received(e['input'])}"
        return f"{name}: expected {expected(props[name])}, received {received(e['input'])} ({e['msg'].lower()})"

    def signature(self) -> str:
        props = self.spec.parameters["properties"]
        return f"{self.name}({', '.join(f'{n}: {expected(p)}' for n, p in props.items())})"


JSON_TYPES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
              "array": "a list", "object": "an object", "null": "null"}


def expected(prop: dict[str, Any]) -> str:
    """A property's schema in words: 'an integer >= 1 or null', "one of 'plan', 'conclusion'"."""
    if "enum" in prop:
        return "one of " + ", ".join(json.dumps(v) for v in prop["enum"])
    types = prop.get("type", [])
    words = [JSON_TYPES.get(t, t) for t in ([types] if isinstance(types, str) else types)]
    if "minimum" in prop:
        words[0] += f" >= {prop['minimum']}"
    return " or ".join(words) or "a value"


def received(value: Any) -> str:
    """A value the model sent, short, with its JSON type."""
    text = json.dumps(value, default=str)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    return text if value is None else f"{text} ({kind})"


# --- execution ---------------------------------------------------------------------

class QueuedRun(Protocol):
    def started(self, timeout: float | None = 0) -> RunResult | None: ...


class TrainingClient(Protocol):
    """What the researcher asks of a training service. Two implementations: budget.service.TrainingService (runs
    here, on Ray) and budget.remote.RemoteService (a service at a URL that speaks the reference HTTP protocol)."""

    concurrency: int

    def submit(self, request: RunRequest, wait: bool = True, on_progress: Callable | None = None) -> RunResult: ...
    def submit_queued(self, request: RunRequest) -> QueuedRun: ...
    def drop_queued(self) -> int: ...
    def wait(self, run_ids: list[int] | None = None, timeout: float | None = None,
             on_progress: Callable | None = None) -> list[RunResult]: ...
    def status(self) -> BudgetStatus: ...
    def runs(self) -> list[RunResult]: ...
    def get(self, run_id: int) -> RunResult | None: ...
    def cancel_all(self) -> list[RunResult]: ...
    def close(self) -> None: ...


def service_ended(service: TrainingClient) -> str | None:
    """Why a service can start no more runs beyond its budget (a remote one that stopped answering), or None."""
    return getattr(service, "ended", None)


class Toolbox:
    """Executes tool calls against the workspace and the training service."""

    def __init__(self, workspace: Workspace, service: TrainingClient, progress: Callable | None = None,
                 background: bool = False):
        self.ws = workspace
        self.service = service
        self.progress = progress or nullcontext  # () -> context manager yielding an on_progress callback
        self.background = background
        self.slots = getattr(service, "concurrency", 1)
        self.in_flight: list[int] = []  # runs started here whose result the model has not been given
        self.queued: list[tuple[str, Any]] = []  # (description, budget.service.QueuedSubmission), oldest first
        self._news: list[str] = []
        self._news_runs: list[RunResult] = []

    def parse(self, call: ToolCall) -> tuple[Tool, ToolArgs]:
        """The tool a call names and its validated arguments, or BadCall saying what is wrong."""
        tool = TOOLS.get(call.name)
        if tool is None:
            raise BadCall(f"unknown tool {call.name!r}; the tools are: {', '.join(TOOLS)}")
        if call.error:
            raise BadCall(f"your call to {call.name} could not be read: {call.error}. Send the arguments as one "
                          f"JSON object: {tool.signature()}")
        return tool, tool.parse(call.arguments)

    def execute(self, name: str, arguments: dict[str, Any] | None) -> ToolOutput:
        """Validate and run one call (the loop does the same in two steps, with the approval gate between)."""
        tool, args = self.parse(ToolCall(id="", name=name, arguments=arguments, raw_arguments=""))
        return tool.handler(self, args)

    def budget_line(self) -> str:
        s = self.service.status()
        busy = ", ".join([*(f"run {r} training" for r in self.in_flight),
                          *(["1 submission queued"] if len(self.queued) == 1 else
                            [f"{len(self.queued)} submissions queued"] if self.queued else [])])
        return (f"[budget] runs remaining {s.runs_remaining}, match time remaining "
                f"{s.match_time_remaining_secs / 60:.1f} min"
                + (f", best verified val_bpb {s.best_val_bpb:.4f} (run {s.best_run_id})" if s.best_val_bpb else "")
                + (f"; in flight: {busy}" if busy else ""))

    # --- files -------------------------------------------------------------
    def read_file(self, a: ReadFileArgs) -> ToolOutput:
        path = a.path.strip().lstrip("./")
        start_line, max_lines = a.start_line or 1, a.max_lines or 400
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
        return ToolOutput(text=body + (f"\n... {more} more lines (use start_line)" if more > 0 else ""))

    def edit_file(self, a: EditFileArgs) -> ToolOutput:
        code = self.ws.code()
        count = code.count(a.old_text) if a.old_text else 0
        if count == 0:
            raise ToolFailure("old_text was not found in train.py. Nearest lines:\n" + nearest_lines(code, a.old_text)
                              + "\nCopy the exact text (whitespace included), or read_file first.")
        if count > 1:
            raise ToolFailure(f"old_text occurs {count} times in train.py; include more surrounding lines "
                              "so it matches exactly once")
        self.ws.write(code.replace(a.old_text, a.new_text, 1))
        return ToolOutput(text="edited train.py:\n" + "".join(difflib.unified_diff(
            code.splitlines(True), self.ws.code().splitlines(True), "train.py", "train.py", n=1)))

    def write_file(self, a: WriteFileArgs) -> ToolOutput:
        if not a.content.strip():
            raise ToolFailure("content is empty; write the whole train.py")
        self.ws.write(a.content)
        return ToolOutput(text=f"wrote train.py ({len(a.content.splitlines())} lines)")

    def restore_run(self, a: RunIdArgs) -> ToolOutput:
        file = self.ws.session_dir / "runs" / f"{a.run_id:03d}" / "train.py"
        if not file.exists():
            raise ToolFailure(f"run {a.run_id} has no code; list_runs shows the run ids")
        self.ws.write(file.read_text())
        return ToolOutput(text=f"train.py restored to the code of run {a.run_id}")

    # --- runs --------------------------------------------------------------
    def submit_run(self, a: SubmitRunArgs) -> ToolOutput:
        request = RunRequest(train_code=self.ws.code(), description=a.description, hypothesis=a.hypothesis, seed=a.seed)
        try:
            if self.background:
                return self._submit_in_background(request)
            with self.progress() as on_progress:
                result = self.service.submit(request, wait=True, on_progress=on_progress)
        except RunRefused as exc:
            raise ToolFailure(f"refused, no run charged: {exc}") from None
        return ToolOutput(text=json.dumps(result_summary(result)), runs=[result])

    def _submit_in_background(self, request: RunRequest) -> ToolOutput:
        check_code(request.train_code)  # a syntax error is answered now, also when the run would queue
        if self.service.status().runs_remaining - len(self.queued) <= 0:
            raise ToolFailure("no run is left to start: the last one is already "
                              + ("queued" if self.queued else "charged") + "; wait_runs collects the results")
        while len(self.queued) >= self.slots:  # the queue is full: the oldest run's result first
            self._wait_next()
        ticket = self.service.submit_queued(request)
        started = ticket.started(timeout=START_WAIT_SECS)  # RunRefused if the service refused it
        if started is None:
            self.queued.append((request.description, ticket))
            behind = f"run {', '.join(map(str, self.in_flight))} ends" if self.in_flight else "a run slot is free"
            return ToolOutput(text=f"queued: starts the moment {behind}. "
                                   "Its result will be appended to a later tool result; meanwhile read, plan and "
                                   "prepare the next edit (wait_runs waits for the next result).")
        self.in_flight.append(started.run_id)
        return ToolOutput(text=f"run {started.run_id} started; its result will be appended to a later tool result. "
                               "Meanwhile read, plan and prepare the next edit (wait_runs waits for the next result).",
                          runs=[started])

    def _poll(self, queue_timeout: float | None = 0) -> None:
        """Move started submissions to in_flight and finished runs to the news."""
        for entry in list(self.queued):
            description, ticket = entry
            try:
                started = ticket.started(timeout=queue_timeout)
            except RunRefused as exc:
                self.queued.remove(entry)
                self._news.append(f"your queued submission '{description}' was refused, no run charged: {exc}")
                continue
            if started is not None:
                self.queued.remove(entry)
                self.in_flight.append(started.run_id)
                self._news.append(f"your queued submission '{description}' started as run {started.run_id}")
            elif queue_timeout is None:  # dropped before it could start
                self.queued.remove(entry)
                self._news.append(f"your queued submission '{description}' was dropped, no run charged")
        for run_id in list(self.in_flight):
            r = self.service.get(run_id)
            if r is not None and r.status != RunStatus.running:
                self.in_flight.remove(run_id)
                self._news.append(f"run {run_id} finished: {json.dumps(result_summary(r))}")
                self._news_runs.append(r)

    def _wait_next(self) -> None:
        """Block until the oldest run in flight has finished (or, with none in flight, a queued one started)."""
        self._poll()
        if not self.in_flight and self.queued:
            self._poll(queue_timeout=None)
        if self.in_flight:
            with self.progress() as on_progress:
                self.service.wait(self.in_flight[:1], on_progress=on_progress)
            self._poll()

    def news(self) -> ToolOutput | None:
        """What happened to the background runs since the last report, once; None when nothing did."""
        if self.in_flight or self.queued:
            self._poll()
        if not self._news:
            return None
        out = ToolOutput(text="\n".join(self._news), runs=self._news_runs)
        self._news, self._news_runs = [], []
        return out

    def settle(self) -> ToolOutput | None:
        """Before the session ends: drop queued submissions (not charged), wait for every run in flight."""
        if self.queued:
            self.service.drop_queued()
            self._poll(queue_timeout=None)
        while self.in_flight:
            self._wait_next()
        return self.news()

    def wait_runs(self, a: NoArgs) -> ToolOutput:
        if not (self.in_flight or self.queued or self._news):
            raise ToolFailure("no runs are in flight and every result has been reported; list_runs shows them all")
        if not self._news:
            self._wait_next()
        return self.news() or ToolOutput(text="no result yet")

    def list_runs(self, a: NoArgs) -> ToolOutput:
        runs = self.service.runs()
        return ToolOutput(text="\n".join(run_line(r) for r in runs) or "no runs yet")

    def show_run(self, a: RunIdArgs) -> ToolOutput:
        r = self.service.get(a.run_id)
        if r is None:
            raise ToolFailure(f"there is no run {a.run_id}; list_runs shows the run ids")
        return ToolOutput(text=json.dumps({**result_summary(r), "description": r.description, "hypothesis": r.hypothesis,
                                           "stdout_tail": r.stdout_tail[-1500:], "stderr_tail": r.stderr_tail[-1500:]},
                                          indent=1), runs=[r])

    # --- record ------------------------------------------------------------
    def write_note(self, a: WriteNoteArgs) -> ToolOutput:
        runs = self.service.runs()
        self.ws.add_note(Note(a.kind, a.text.strip(), runs[-1].run_id if runs else None))
        return ToolOutput(text=f"noted ({a.kind})")

    def finish(self, a: FinishArgs) -> ToolOutput:
        if self.in_flight or self.queued:
            busy = ", ".join(f"run {r}" for r in self.in_flight) + (" and a queued submission" if self.queued else "")
            raise ToolFailure(f"not finished: {busy} must end first (it is charged); call wait_runs for the "
                              "result, then finish")
        raise Finished(a.summary)


TOOLS: dict[str, Tool] = {t.name: t for t in [
    Tool("read_file", "Read a file: 'train.py' (your working copy), 'prepare.py' (fixed, read-only), or a past "
         "run's 'runs/<id>/train.py', 'runs/<id>/stdout.log', 'runs/<id>/stderr.log'. Lines are numbered.",
         ReadFileArgs, Toolbox.read_file),
    Tool("edit_file", "Edit the working train.py by replacing one exact, unique occurrence of old_text with new_text.",
         EditFileArgs, Toolbox.edit_file, edits_code=True),
    Tool("write_file", "Replace the whole working train.py with content.", WriteFileArgs, Toolbox.write_file,
         edits_code=True),
    Tool("submit_run", "Train the working train.py as one run (charged when it starts; a syntax error is free). "
         "Give a one-line description of the change and the hypothesis it tests. Returns the verified val_bpb, or, "
         "when runs train in the background, the run id at once (the result follows with a later tool result).",
         SubmitRunArgs, Toolbox.submit_run, starts_run=True),
    Tool("wait_runs", "Wait for the next result of a run training in the background, and return every result "
         "not yet reported.", NoArgs, Toolbox.wait_runs),
    Tool("list_runs", "The table of all runs: id, status, val_bpb, verified, description.", NoArgs, Toolbox.list_runs),
    Tool("show_run", "One run in full: result, reasons, hypothesis, log tails.", RunIdArgs, Toolbox.show_run),
    Tool("restore_run", "Set the working train.py back to the code of a past run.", RunIdArgs, Toolbox.restore_run,
         edits_code=True),
    Tool("write_note", "Record an insight, plan or conclusion for the methodology log (what you learned and why).",
         WriteNoteArgs, Toolbox.write_note),
    Tool("finish", "End the session with a short summary of what worked.", FinishArgs, Toolbox.finish),
]}
TOOL_SPECS = [t.spec for t in TOOLS.values()]
