"""`pgolf-agent serve`: the training service over the reference "training-lab" service's HTTP protocol.

The endpoints, status codes and JSON fields are the reference's (docs: ARCHITECTURE.md, "The contract
with the outside world"), so an agent that knows that service -- curl, another harness, the arena's
own agents -- trains against this one unchanged:

    GET  /health                      status, runs_remaining, match_time_remaining_secs
    GET  /baseline                    train_code, baseline_val_bpb
    GET  /prepare                     source
    POST /run {"train_code": "..."}   202 {run_id, status: "running", runs_remaining, match_time_remaining_secs}
                                      400 bad body, 409 a run is active, 413 body over MAX_BODY_BYTES,
                                      422 syntax error (no run charged), 429 runs or match time spent
    GET  /runs                        every run, the active one, best_val_bpb
    GET  /runs/{run_id}               one run (404 when unknown); poll it until status is not "running"

Every answer carries runs_remaining and match_time_remaining_secs, every error is {"error": "..."}
naming what was wrong, and run records add this project's fields (verified, reported_val_bpb, reasons,
cpu_others, sandboxed) to the reference's. Run ids are the reference's form, "run-3" ("3" is accepted).

Behind it is the session's TrainingService, so a served session lands in the same ledger and session
folder as a CLI session (export, resume and `service status` work on it), and every request with its
answer is one step of the session's trajectory, so its export carries a replay_log of the HTTP calls.
A non-loopback bind needs a token, which every request must then carry (`Authorization: Bearer T`).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from budget.models import RunRefused, RunRequest, RunResult, RunStatus

MAX_BODY_BYTES = 1 << 20  # a request body; train_code itself is capped at MAX_CODE_BYTES (400 beyond)
DRAIN_BYTES = 16 << 20    # read (and drop) this much of an oversized body, so the client gets its 413
TOKEN_ENV = "PGOLF_SERVE_TOKEN"


def run_name(run_id: int) -> str:
    return f"run-{run_id}"


def run_number(name: str) -> int | None:
    """3 for "run-3" or "3"; None for anything else."""
    digits = name.removeprefix("run-")
    return int(digits) if digits.isdigit() else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the protocol's bodies ------------------------------------------------------------------------

class Remaining(BaseModel):
    runs_remaining: int
    match_time_remaining_secs: float


class Health(Remaining):
    status: Literal["ok"] = "ok"
    active_run_id: str | None = None
    verified: bool = Field(True, description="this service measures val_bpb itself (the run records say per run)")


class Baseline(Remaining):
    train_code: str
    baseline_val_bpb: float | None = Field(description="this session's first verified run of the unmodified "
                                                       "baseline; null until one has run")


class Prepare(Remaining):
    source: str


class RunSubmission(BaseModel):
    """The body of POST /run. Fields beyond these are ignored."""

    model_config = ConfigDict(strict=True, extra="allow")

    train_code: str = Field(description="the whole train.py")
    time_budget: float | None = Field(None, gt=0, description="training seconds of this run; at most the session's "
                                                               "time budget, which is also the default")
    description: str = Field("", description="one line: what this run changes (this project's field)")
    hypothesis: str = Field("", description="what the run tests (this project's field)")
    seed: int | None = Field(None, description="TORCH_SEED of the run (this project's field)")


class RunAccepted(Remaining):
    run_id: str
    status: Literal["running"] = "running"
    time_budget: float = Field(description="training seconds of this run")
    message: str = "Training started. Poll GET /runs/{run_id} for results."


class RunInFlight(Remaining):
    run_id: str
    status: Literal["running"] = "running"
    elapsed_secs: float | None = None
    timeout_secs: float | None = None
    description: str = ""


class RunSummary(BaseModel):
    run_id: str
    status: str = Field(description="completed (and verified), unverified, crashed, timeout or interrupted")
    val_bpb: float | None = Field(description="measured by the harness's trusted evaluator")
    reported_val_bpb: float | None = Field(description="what the script printed")
    verified: bool
    reasons: list[str]
    training_time_secs: float | None
    num_params_M: float | None
    total_steps: int | None
    cpu_others: float | None = Field(description="share of the run's cores other processes used while it ran")
    error: str | None = Field(description="why the run has no verified number; null when it has one")
    description: str = ""


class RunView(RunSummary, Remaining):
    train_loss: float | None
    hypothesis: str = ""
    seed: int | None = None
    sandboxed: bool
    logs: str = Field("", description="the end of the script's stderr")


class RunList(Remaining):
    runs: list[RunSummary]
    active_run: RunInFlight | None
    total_runs: int
    best_val_bpb: float | None = Field(description="the best verified val_bpb")


class ApiError(BaseModel):
    error: str
    runs_remaining: int | None = None
    match_time_remaining_secs: float | None = None


class ApiProblem(Exception):
    def __init__(self, code: int, error: str, **remaining):
        super().__init__(error)
        self.code, self.body = code, ApiError(error=error, **remaining)


ERRORS = {code: {"model": ApiError, "description": text} for code, text in {
    400: "a bad body: not JSON, not an object, no train_code, or train_code not a string, empty or too large",
    401: "the token is missing or wrong", 409: "a run is active", 413: f"the body is over {MAX_BODY_BYTES} bytes",
    422: "train_code has a syntax error (no run charged)", 429: "the runs or the match time are spent",
    507: "the ledger cannot record a run now"}.items()}


def summary_fields(r: RunResult) -> dict:
    failed = not (r.status == RunStatus.completed and r.verified)
    return dict(run_id=run_name(r.run_id), status=r.status.value, val_bpb=r.val_bpb, reported_val_bpb=r.reported_val_bpb,
                verified=r.verified, reasons=r.reasons, training_time_secs=r.training_secs or r.wall_secs,
                num_params_M=r.num_params_M, total_steps=r.total_steps, cpu_others=r.cpu_others,
                error=("; ".join(r.reasons) or r.status.value) if failed else None, description=r.description)


def parse_submission(body: bytes) -> RunSubmission:
    """The body of POST /run, or ApiProblem(400) saying what is wrong with it."""
    usage = 'send {"train_code": "<the whole train.py>"} as JSON'
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiProblem(400, f"the body is not JSON{where}; {usage}") from None
    if not isinstance(data, dict):
        raise ApiProblem(400, f"the body is a JSON {json_type(data)}, not an object; {usage}")
    try:
        return RunSubmission.model_validate(data)
    except ValidationError as exc:
        problems = [f'"{e["loc"][0]}" is missing' if e["type"] == "missing" else
                    f'"{e["loc"][0]}" {e["msg"].replace("Input should be", "must be")} '
                    f'(received a JSON {json_type(e["input"])})' for e in exc.errors()]
        raise ApiProblem(400, "; ".join(problems) + f"; {usage}") from None


def json_type(value) -> str:
    return {str: "string", bool: "boolean", int: "number", float: "number", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


# --- the app ----------------------------------------------------------------------------------------

def make_app(service, *, token: str | None = None, record: Callable[..., None] | None = None,
             max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The HTTP face of a TrainingService. `record(method, path, body, status, answer, secs)` hears every request."""
    from agent.session import BASELINE
    from agent.tools import PREPARE_SOURCE

    app = FastAPI(title="pgolf-agent training service", version="1",
                  description="The reference training-lab protocol, with the harness's own verified val_bpb.")

    def remaining() -> dict:
        s = service.status()
        return {"runs_remaining": s.runs_remaining, "match_time_remaining_secs": s.match_time_remaining_secs}

    def in_flight(r: RunResult) -> RunInFlight:
        started = r.started_at.timestamp() if r.started_at else None
        budget = service.status().budget
        return RunInFlight(run_id=run_name(r.run_id), description=r.description, **remaining(),
                           elapsed_secs=round(time.time() - started, 1) if started else None,
                           timeout_secs=budget.run_timeout_secs if budget else None)

    @app.exception_handler(ApiProblem)
    async def problem(_request, exc: ApiProblem):
        return JSONResponse(exc.body.model_dump(exclude_none=True), status_code=exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request, exc: StarletteHTTPException):
        known = "GET /health, /baseline, /prepare, /runs, /runs/{run_id}; POST /run"
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}; the endpoints are {known}"},
                            status_code=exc.status_code)

    @app.get("/health", response_model=Health, responses=ERRORS)
    def health() -> Health:
        active = service.status().active_run_ids
        return Health(active_run_id=run_name(active[0]) if active else None, **remaining())

    @app.get("/baseline", response_model=Baseline, responses=ERRORS)
    def baseline() -> Baseline:
        code = BASELINE.read_text()
        digest = hashlib.sha256(code.encode()).hexdigest()
        measured = next((r.val_bpb for r in service.runs() if r.code_sha256 == digest and r.counts_as_best), None)
        return Baseline(train_code=code, baseline_val_bpb=measured, **remaining())

    @app.get("/prepare", response_model=Prepare, responses=ERRORS)
    def prepare() -> Prepare:
        return Prepare(source=PREPARE_SOURCE.read_text(), **remaining())

    @app.post("/run", status_code=202, response_model=RunAccepted, responses=ERRORS, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": RunSubmission.model_json_schema()}}}})
    async def run(request: Request) -> RunAccepted:
        # The body is parsed here, not by FastAPI, so that every bad body is a 400 naming its problem
        # (whatever its content type: the reference reads JSON regardless); the schema above documents it.
        submission = parse_submission(await request.body())
        session_budget = (await run_in_threadpool(service.status)).budget.time_budget_secs
        time_budget = min(submission.time_budget or session_budget, session_budget)
        try:
            started = await run_in_threadpool(service.submit, RunRequest(
                train_code=submission.train_code, description=submission.description, hypothesis=submission.hypothesis,
                seed=submission.seed, time_budget_secs=time_budget), wait=False)
        except RunRefused as exc:
            r = exc.refusal
            raise ApiProblem(r.code, r.message, **({"runs_remaining": r.runs_remaining,
                                                    "match_time_remaining_secs": r.match_time_remaining_secs}
                                                   if r.runs_remaining is not None else remaining())) from None
        return RunAccepted(run_id=run_name(started.run_id), time_budget=time_budget, **remaining())

    @app.get("/runs", response_model=RunList, responses=ERRORS)
    def runs() -> RunList:
        records = service.runs()
        done = [RunSummary(**summary_fields(r)) for r in records if r.status != RunStatus.running]
        active = next((in_flight(r) for r in records if r.status == RunStatus.running), None)
        best = min((r.val_bpb for r in records if r.counts_as_best), default=None)
        return RunList(runs=done, active_run=active, total_runs=len(records), best_val_bpb=best, **remaining())

    @app.get("/runs/{run_id}", response_model=RunView | RunInFlight, responses=ERRORS)
    def one_run(run_id: str) -> RunView | RunInFlight:
        number = run_number(run_id)
        r = service.get(number) if number is not None else None
        if r is None:
            raise ApiProblem(404, f"Run '{run_id}' not found; GET /runs lists the run ids", **remaining())
        if r.status == RunStatus.running:
            return in_flight(r)
        return RunView(**summary_fields(r), **remaining(), train_loss=r.train_loss, hypothesis=r.hypothesis,
                       seed=r.seed, sandboxed=r.sandboxed, logs=r.stderr_tail)

    return Gate(app, token=token, record=record, max_body=max_body)


class Gate:
    """Before the app, for every request: the token (401) and the body's size (413); after it, the record.

    A plain ASGI wrapper, so that also a refused request and an unknown path are answered in the
    protocol's form and recorded. The app gets the body already read.
    """

    def __init__(self, app: FastAPI, *, token: str | None, record: Callable[..., None] | None, max_body: int):
        self.app, self.token, self.record, self.max_body = app, token, record, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        outcome = {"status": 500, "answer": bytearray()}

        async def capture(message):
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
            elif message["type"] == "http.response.body":
                outcome["answer"].extend(message.get("body", b""))
            await send(message)

        body = b""
        if self.token is not None and not self._authorized(headers.get("authorization", "")):
            await self._answer(capture, 401, "missing or wrong token: send the header 'Authorization: Bearer <token>' "
                                             "with the token this service was started with", bearer=True)
        else:
            body, too_big = await self._read_body(receive, headers)
            if too_big:
                await self._answer(capture, 413, f"the body is over the {self.max_body:,}-byte limit; a train.py "
                                                 "may be at most 100,000 bytes")
            else:
                delivered = False

                async def replay():
                    nonlocal delivered
                    if delivered:
                        return await receive()
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}

                await self.app(scope, replay, capture)
        if self.record is not None:
            self.record(scope["method"], scope["path"], body, outcome["status"], bytes(outcome["answer"]),
                        time.monotonic() - started)

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    async def _read_body(self, receive, headers) -> tuple[bytes, bool]:
        """The whole body, or (what was read, True) when it is over the limit (the rest is drained, not kept)."""
        declared = headers.get("content-length", "")
        chunks, size, more = [], 0, True
        too_big = declared.isdigit() and int(declared) > self.max_body
        while more and size <= DRAIN_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            too_big = too_big or size > self.max_body
            if not too_big:
                chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), too_big

    @staticmethod
    async def _answer(send, code: int, error: str, bearer: bool = False) -> None:
        payload = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if bearer:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


# --- a served session -------------------------------------------------------------------------------

def trajectory_recorder(trajectory) -> Callable[..., None]:
    """Each request as a tool_call step: the tool is "METHOD /path", the input its body, the output its answer."""
    from logs.trajectory import ToolCallEvent

    def record(method: str, path: str, body: bytes, status: int, answer: bytes, secs: float) -> None:
        text = answer.decode("utf-8", "replace")
        trajectory.append(ToolCallEvent(
            tool=f"{method} {path}", input=body.decode("utf-8", "replace") or f"{method} {path}",
            output=None if status >= 400 else text, error=text if status >= 400 else None,
            duration_ms=int(secs * 1000), metadata={"http_status": status}))
    return record


class ServeRefused(RuntimeError):
    """The server was not started; the message says why and what to do."""


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ServeRefused(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --port, or "
                               "stop what listens there") from None


def serve_session(settings, *, host: str, port: int, token: str | None, console) -> None:
    """Serve one session (new or resumed) until Ctrl-C or SIGTERM; runs in flight are then stopped and recorded.

    `settings` is the session's agent.session.SessionSettings; it is saved like a CLI session's, so
    `run --resume`, `export` and `service status` read the folder the same way.
    """
    import uvicorn

    from budget.models import ServiceSettings
    from budget.service import TrainingService
    from logs.trajectory import SessionEvent, Trajectory

    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        raise ServeRefused(f"--host {host} is reachable from other machines: give a token (--token T or {TOKEN_ENV}) "
                           "that every request must carry, or serve on 127.0.0.1")
    check_port(host, port)  # before Ray starts and the session folder is made
    session_dir = Path(settings.session_dir)
    resumed = (session_dir / "settings.json").exists()
    with TrainingService(ServiceSettings(session_dir=session_dir, budget=settings.budget,
                                         concurrency=settings.concurrency, ray_address=settings.ray_address,
                                         sandbox=settings.sandbox)) as service:
        if not resumed:
            (session_dir / "settings.json").write_text(settings.model_dump_json(indent=1))
        trajectory = Trajectory(session_dir / "trajectory.jsonl")
        trajectory.append(SessionEvent(event="resume" if resumed else "start", detail={
            "agent": "http", "model": "http-client", "served_on": f"{host}:{port}", "token": token is not None,
            "settings": json.loads(settings.model_dump_json())}))
        server = uvicorn.Server(uvicorn.Config(make_app(service, token=token, record=trajectory_recorder(trajectory)),
                                               host=host, port=port, log_level="warning", access_log=False))
        # uvicorn re-raises the signal that stopped it once it has shut down: both end here, as Ctrl-C
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        reason, kind = "the server was stopped (Ctrl-C or SIGTERM)", "finished"
        console.print(f"serving session {session_dir} on http://{host}:{port}"
                      + (" (token required)" if token else "") + "; Ctrl-C stops it")
        try:
            server.run()  # returns (or raises KeyboardInterrupt) once a signal has stopped it
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            stopped = service.cancel_all()  # recorded interrupted, charged, as on Ctrl-C in a CLI session
            if stopped:
                reason += f"; run {', '.join(str(r.run_id) for r in stopped)} in flight was stopped (charged)"
                kind = "interrupted"
            trajectory.append(SessionEvent(event="end", detail={"reason": reason, "kind": kind}))
        console.print(f"{reason}; the session is in {session_dir} (`pgolf-agent export {session_dir}` writes its "
                      "submission)")
