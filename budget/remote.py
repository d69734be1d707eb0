"""A training service at a URL that speaks the reference "training-lab" protocol (`run --service-url URL`).

RemoteService answers the researcher as TrainingService does (agent/tools.py, TrainingClient), so any
researcher -- search, random, an LLM -- works against this project's `serve` on another machine or the
reference arena's service. The remote service runs and scores; this side keeps the session's record:

- its own ledger in the session folder mirrors every run the service accepted (charged here once the
  service answered 202), so `export`, `service status` and `run --resume` work as for a local session;
  runs/<id>/train.py, result.json and stderr.log are written beside it (the search agent, read_file and
  restore_run read them); remote_runs.json maps each local run id to the service's ("run-3");
- the budget the researcher sees is the service's own (runs_remaining, match_time_remaining_secs),
  capped by the session's own --budget and --hours;
- results are polled (GET /runs/{id}, every PGOLF_POLL_SECS, 10 s by default, as the reference asks);
- a service that does not report `verified` gives numbers this harness did not verify: such a run is
  recorded `unverified`, its number kept as reported_val_bpb only, with the reason;
- a service that stops answering is retried for RETRY_SECS (PGOLF_SERVICE_RETRY_SECS); then the run in
  flight is recorded with its outcome unknown (`interrupted`, charged), `ended` says why, and no run is
  left: the session ends as when its budget is spent (the researcher writes its conclusions) and its
  record is written from the local ledger.
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from budget.ledger import Ledger, LedgerWriteError, check_code
from budget.models import (Budget, BudgetExhausted, BudgetStatus, Refusal, RunProgress, RunRefused, RunRequest,
                           RunResult, RunStatus)
from budget.service import ServiceUnavailable, run_dir_of
from trainer.untrusted_files import write_atomic

POLL_SECS = 10.0          # the reference asks agents to poll a run every 10-15 s
RETRY_SECS = 120.0        # how long a service that stopped answering is retried before the session ends
REQUEST_TIMEOUT_SECS = 30.0
STATUS_SECS = 2.0         # the service's budget is asked at most this often (every tool result shows it)
TOKEN_ENV = "PGOLF_SERVICE_TOKEN"
MAPPING_FILE = "remote_runs.json"
REMOTE_STATUS = {"error": RunStatus.crashed, "failed": RunStatus.crashed}  # the reference's words for ours

log = logging.getLogger(__name__)


class ServiceLost(RuntimeError):
    """The remote service stopped answering and its retries ran out; the session's record is still written."""


class _NoAnswer(Exception):
    """One request got no usable answer (connection refused, timeout, 5xx)."""


class QueuedRemoteSubmission:
    """A submission that starts at the service once no run of this session is in flight (TrainingService's queue)."""

    def __init__(self, service: RemoteService, request: RunRequest):
        self.service, self.request = service, request
        self.dropped = False
        self.run: RunResult | None = None

    def started(self, timeout: float | None = 0) -> RunResult | None:
        """The run's first record once it has started; None while it waits (after `timeout` s) or if dropped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.run is None and not self.dropped:
            self.service._fresh()
            if self.service.ended:
                self.dropped = True  # never started, so never charged
                break
            if not self.service.active_run_ids():
                try:
                    self.run = self.service.submit(self.request, wait=False)
                    break
                except ServiceLost:
                    continue  # dropped at the next turn
                except RunRefused as exc:
                    if exc.code != 409:  # 409: a run the service started for someone else; wait for it
                        self.service.queue.remove(self)
                        raise
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(self.service.poll_secs if deadline is None else
                       max(0.0, min(self.service.poll_secs, deadline - time.monotonic())))
        if self in self.service.queue:
            self.service.queue.remove(self)
        return self.run


class RemoteService:
    """The training service at `url`, with the session's record kept in `session_dir`. Use it as a context manager."""

    concurrency = 1  # the protocol runs one run at a time

    def __init__(self, url: str, session_dir: Path, budget: Budget | None = None, token: str | None = None,
                 poll_secs: float | None = None, retry_secs: float | None = None,
                 on_retry: Callable[[str], None] | None = None):
        self.url = url.rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.poll_secs = float(os.environ.get("PGOLF_POLL_SECS", POLL_SECS)) if poll_secs is None else poll_secs
        self.retry_secs = (float(os.environ.get("PGOLF_SERVICE_RETRY_SECS", RETRY_SECS)) if retry_secs is None
                           else retry_secs)
        self.time_budget = (budget or Budget()).time_budget_secs
        self.on_retry = on_retry or (lambda line: log.warning("%s", line))
        self.ended: str | None = None  # why no run can start any more beyond the budget: the service was lost
        self._asked = 0.0  # when the service's budget was last asked for
        self._polled = 0.0  # when the runs in flight were last asked about
        self.queue: list[QueuedRemoteSubmission] = []
        self._remaining: dict = {}
        try:
            code, health = self._call("GET", "/health", retry=False)
        except _NoAnswer as exc:
            raise ServiceUnavailable(f"nothing answers at {self.url} ({exc}): start the service there "
                                     "(`pgolf-agent serve`), or check --service-url") from None
        if code == 401:
            raise ServiceUnavailable(f"{self.url} refused the token ({health.get('error', 'HTTP 401')}): pass the "
                                     f"service's token with --service-token or {TOKEN_ENV}")
        if code != 200:
            raise ServiceUnavailable(f"{self.url}/health answered HTTP {code}: {health.get('error', health)}; is "
                                     "this a training service that speaks the reference protocol?")
        self._note_remaining(health)
        self.description = f"training service: {self.url}" + (
            "" if health.get("verified") is True else " -- it does not report `verified`, so its numbers are "
            "marked not verified by this harness (and none can be the session's best)")
        self.ledger = Ledger.open(session_dir, budget)
        self.session_dir = self.ledger.session_dir
        self.recovered_run_ids = self.ledger.recovered_run_ids
        mapping = self.session_dir / MAPPING_FILE
        self.remote_ids: dict[int, str] = ({int(k): v for k, v in json.loads(mapping.read_text()).items()}
                                           if mapping.exists() else {})

    def __enter__(self) -> RemoteService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the wire -----------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict | None = None, retry: bool = True) -> tuple[int, dict]:
        """(HTTP status, JSON answer). A service that does not answer is retried for retry_secs (a POST only
        when its connection was refused, so a run is never started twice), then ServiceLost."""
        if self.ended:
            raise ServiceLost(self.ended)
        deadline, delay, attempt = time.monotonic() + self.retry_secs, 1.0, 1
        while True:
            try:
                return self._once(method, path, body)
            except _NoAnswer as exc:
                refused = isinstance(exc.__cause__, ConnectionRefusedError)
                if not retry:
                    raise
                if (method != "GET" and not refused) or time.monotonic() + delay > deadline:
                    self.ended = (f"the training service at {self.url} stopped answering ({exc}; retried for "
                                  f"{self.retry_secs:g} s)")
                    raise ServiceLost(self.ended) from None
                self.on_retry(f"{method} {self.url}{path}: {exc}; retrying in {delay:.0f} s (attempt {attempt}, "
                              f"for up to {self.retry_secs:g} s)")
                time.sleep(delay)
                delay, attempt = min(delay * 2, 10.0), attempt + 1

    def _once(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECS) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as exc:
            answer = _json(exc.read())
            if exc.code >= 500 and exc.code != 507:  # 507: the ledger's answer, a refusal
                raise _NoAnswer(f"HTTP {exc.code}: {answer.get('error', '')}".rstrip(": ")) from None
            return exc.code, answer
        except urllib.error.URLError as exc:
            reason = exc.reason if isinstance(exc.reason, BaseException) else OSError(str(exc.reason))
            raise _NoAnswer(str(reason)) from reason
        except (TimeoutError, OSError) as exc:
            raise _NoAnswer(str(exc) or type(exc).__name__) from exc

    def _note_remaining(self, answer: dict) -> None:
        for key in ("runs_remaining", "match_time_remaining_secs"):
            if isinstance(answer.get(key), (int, float)):
                self._remaining[key] = answer[key]

    # --- runs ---------------------------------------------------------------------------------------

    def submit(self, request: RunRequest, wait: bool = True,
               on_progress: Callable[[RunProgress], None] | None = None) -> RunResult:
        """Start one run at the service (RunRefused with the service's code when it refuses); with wait, its result."""
        check_code(request.train_code)  # free here, as at the service (422)
        # what the ledger would refuse after the service said yes (a run charged there but not here): asked first
        local = self.ledger.status()
        left = {"runs_remaining": local.runs_remaining, "match_time_remaining_secs": local.match_time_remaining_secs}
        if local.active_run_ids:
            raise RunRefused(Refusal(code=409, message=f"run {local.active_run_ids[0]} is still running; wait for its "
                                     "result, then submit again", **left))
        if local.runs_remaining <= 0 or local.match_time_remaining_secs < local.budget.run_timeout_secs:
            raise BudgetExhausted(Refusal(code=429, message="this session's own --budget or --hours is spent; start "
                                          "a new session to run more", **left))
        body = {"train_code": request.train_code, "description": request.description, "hypothesis": request.hypothesis,
                "time_budget": self.time_budget}  # the reference's per-run field; a service may shorten or clamp it
        if request.seed is not None:
            body["seed"] = request.seed
        code, answer = self._call("POST", "/run", body)
        self._note_remaining(answer)
        if code not in (200, 202) or "run_id" not in answer:
            refusal = Refusal(code=code, message=f"the service refused the run (HTTP {code}): "
                              f"{answer.get('error') or answer}", runs_remaining=answer.get("runs_remaining"),
                              match_time_remaining_secs=answer.get("match_time_remaining_secs"))
            raise (BudgetExhausted if code == 429 else RunRefused)(refusal)
        run_id = self.ledger.reserve(request, max_active=1, sandboxed=False)  # the service's record says
        self.remote_ids[run_id] = str(answer["run_id"])
        write_atomic(self.session_dir / MAPPING_FILE, json.dumps(self.remote_ids, indent=1))
        run_dir = run_dir_of(self.session_dir, run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "train.py", request.train_code)
        if answer.get("status") not in (None, "running"):  # a service that answers only when the run is done
            self._record(run_id, answer)
        return self.wait([run_id], on_progress=on_progress)[0] if wait else self.get(run_id)

    def submit_async(self, request: RunRequest) -> int:
        return self.submit(request, wait=False).run_id

    def submit_queued(self, request: RunRequest) -> QueuedRemoteSubmission:
        ticket = QueuedRemoteSubmission(self, request)
        self.queue.append(ticket)
        return ticket

    def drop_queued(self) -> int:
        dropped, self.queue = self.queue, []
        for ticket in dropped:
            ticket.dropped = True
        return len(dropped)

    def wait(self, run_ids: list[int] | None = None, timeout: float | None = None,
             on_progress: Callable[[RunProgress], None] | None = None) -> list[RunResult]:
        """Poll the service until the runs finish or `timeout` s pass (a run still in flight comes back `running`)."""
        run_ids = self.active_run_ids() if run_ids is None else list(run_ids)
        began = time.monotonic()
        deadline = None if timeout is None else began + timeout
        while True:
            self._refresh_in_flight()
            pending = [r for r in run_ids if r in self.active_run_ids()]
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            if on_progress:
                on_progress(RunProgress(run_id=pending[0], elapsed_secs=round(time.monotonic() - began, 1)))
            time.sleep(self.poll_secs if deadline is None else max(0.0, min(self.poll_secs, deadline - time.monotonic())))
        results = [self.get(r) for r in run_ids]
        unknown = [r for r, result in zip(run_ids, results) if result is None]
        if unknown:
            raise KeyError(f"no run {', '.join(map(str, unknown))} in session {self.session_dir}")
        return results

    def active_run_ids(self) -> list[int]:
        return self.ledger.status().active_run_ids

    def _refresh_in_flight(self) -> None:
        """Ask the service about every run in flight; record the ones that ended. A lost service: outcome unknown."""
        self._polled = time.monotonic()
        for run_id in self.active_run_ids():
            remote_id = self.remote_ids.get(run_id)
            try:
                if remote_id is None:
                    raise ServiceLost(f"run {run_id} has no run id at the service (the harness stopped before it "
                                      f"could note one)")
                code, answer = self._call("GET", f"/runs/{urllib.parse.quote(remote_id, safe='')}")
            except ServiceLost as exc:
                self._finish(run_id, RunResult(run_id=run_id, status=RunStatus.interrupted, sandboxed=False,
                                               reasons=[f"outcome unknown: {exc}; the run is charged"]))
                continue
            self._note_remaining(answer)
            if code == 404:
                self._finish(run_id, RunResult(run_id=run_id, status=RunStatus.interrupted, sandboxed=False, reasons=[
                    f"outcome unknown: the service at {self.url} no longer knows run {remote_id} ({answer.get('error')})"
                    "; the run is charged"]))
            elif code == 200 and answer.get("status") not in (None, "running"):
                self._record(run_id, answer)

    def _record(self, run_id: int, answer: dict) -> None:
        self._finish(run_id, result_from(answer, run_id, self.url))

    def _finish(self, run_id: int, result: RunResult) -> None:
        run_dir = run_dir_of(self.session_dir, run_id)
        try:
            record = self.ledger.finish(run_id, result)
        except LedgerWriteError as exc:  # held by the ledger and written at its next write, as in the local service
            log.warning("%s", exc)
            return
        try:
            write_atomic(run_dir / "stderr.log", result.stderr_tail)
            write_atomic(run_dir / "result.json", record.model_copy(
                update={"runs_remaining": None, "match_time_remaining_secs": None}).model_dump_json(indent=1))
        except OSError as exc:
            log.warning("run %d: its files were not written (%s); the ledger holds the run's record", run_id, exc)

    # --- the budget and the records ---------------------------------------------------------------------

    def status(self) -> BudgetStatus:
        """The session's ledger, with the budget the service reports (the smaller of the two counts)."""
        if not self.ended and time.monotonic() - self._asked > STATUS_SECS:
            try:
                self._note_remaining(self._call("GET", "/health")[1])
                self._asked = time.monotonic()
            except ServiceLost:
                pass  # the ledger's numbers are what is left to say
        s = self.ledger.status()
        runs = min(s.runs_remaining, self._remaining.get("runs_remaining", s.runs_remaining))
        secs = min(s.match_time_remaining_secs,
                   self._remaining.get("match_time_remaining_secs", s.match_time_remaining_secs))
        return s.model_copy(update={"runs_remaining": 0 if self.ended else runs, "match_time_remaining_secs": secs})

    def _fresh(self) -> None:
        """Runs in flight asked about again once poll_secs have passed, so a reader sees a run end (the LLM's
        background runs are read this way)."""
        if time.monotonic() - self._polled >= self.poll_secs and self.active_run_ids():
            self._refresh_in_flight()

    def runs(self) -> list[RunResult]:
        self._fresh()
        return self.ledger.runs()

    def get(self, run_id: int) -> RunResult | None:
        self._fresh()
        return self.ledger.get(run_id)

    def cancel_all(self) -> list[RunResult]:
        """Stop waiting for the runs in flight (Ctrl-C): the protocol cannot stop a run at the service, so each is
        recorded here as interrupted (charged), saying that the service may still finish it."""
        self.drop_queued()
        in_flight = self.active_run_ids()
        for run_id in in_flight:
            self._finish(run_id, RunResult(run_id=run_id, status=RunStatus.interrupted, sandboxed=False, reasons=[
                f"stopped waiting (the harness was stopped); the service at {self.url} may still finish it as "
                f"{self.remote_ids.get(run_id, 'its run')}; the run is charged"]))
        return [self.get(r) for r in in_flight]

    def close(self) -> None:
        """Release the session; a run still in flight stays `running` and is recorded as interrupted on resume."""
        self.ledger.close()


def result_from(answer: dict, run_id: int, source: str) -> RunResult:
    """A run's record from a service's answer; numbers a service does not say it verified are not verified."""
    status = answer.get("status")
    status = REMOTE_STATUS.get(status) or (RunStatus(status) if status in RunStatus._value2member_map_
                                           else RunStatus.crashed)
    reasons = [str(r) for r in answer.get("reasons") or []]
    if not reasons and answer.get("error"):
        reasons.append(str(answer["error"]))
    number = lambda key: answer.get(key) if isinstance(answer.get(key), (int, float)) else None  # noqa: E731
    verifies = isinstance(answer.get("verified"), bool)
    val_bpb, reported = number("val_bpb"), number("reported_val_bpb")
    if not verifies:
        reported, val_bpb = val_bpb, None
        if status == RunStatus.completed:
            status = RunStatus.unverified
        reasons.append(f"not verified by this harness: the service at {source} does not report `verified`, so its "
                       "val_bpb is the number the script printed")
    return RunResult(
        run_id=run_id, status=status, val_bpb=val_bpb, reported_val_bpb=reported,
        verified=verifies and answer["verified"] and status == RunStatus.completed, reasons=reasons,
        training_secs=number("training_time_secs"), cpu_others=number("cpu_others"),
        total_steps=number("total_steps"), num_params_M=number("num_params_M"), train_loss=number("train_loss"),
        sandboxed=answer.get("sandboxed") is True, stderr_tail=str(answer.get("logs") or "")[-4000:])


def _json(raw: bytes) -> dict:
    try:
        value = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"error": raw[:500].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"error": f"not a JSON object: {str(value)[:200]}"}
