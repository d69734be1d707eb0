"""The training service: a Ray actor owns the session's ledger and runs each train.py as a Ray task.

    TrainingService (in the harness)            the facade the agent and the CLI use
      -> ServiceActor (one per session)         holds the ledger and its lock, on the harness's node
           -> run_in_sandbox (one task a run)   asks Ray for the run's CPUs/GPU, calls execute_run

Cancellation (Ctrl-C, `cancel_all`, `close`): the actor marks the run as stopping; the run task
polls that flag every POLL_SECS and sets execute_run's cancel_event, which kills the run's process
tree. A task that has not returned STOP_GRACE_SECS later is killed with ray.cancel(force=True).
Either way the run is recorded `interrupted` (and stays charged).

Crash safety: the ledger records a run before it starts and its outcome when it ends, each in one
SQLite transaction. If the harness is killed (even `kill -9`), its local Ray dies with it: the
processes it started directly share its fate through the kernel, the run task sees its actor gone
and cancels the run, and a small reaper process kills whatever of Ray's process tree is left (Ray's
agents otherwise linger for a minute or more). The next harness to open the session records the
run that was in flight as `interrupted`, exactly once.

A full disk, or any failed write of the ledger, stops nothing: the ledger first gives back its reserve
(see budget/ledger.py); an outcome it still cannot write is held by the actor, returned to the caller
with the reason "not yet recorded in the ledger: ...", and written at every later call of the actor
(submit, result, get, status, runs, close) until a write succeeds. Meanwhile new runs are refused
(507, not charged). If the harness stops first, the next one records the held outcome from the
ledger's note. A run folder's result.json is a copy of the ledger's record: failing to write it is
logged and changes nothing.

Joining a cluster (`ray_address` or RAY_ADDRESS): the harness must run on a node of that cluster,
every node needs pgolf-agent installed and the session directory at the same path (a shared
filesystem). Ray turns token auth on by default (local clusters since 2.59), and a client that
joins by address only sends the token when RAY_AUTH_MODE=token, so the service sets that unless
you set RAY_AUTH_MODE yourself (=disabled for a cluster started without auth). The token comes
from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token`). Before Ray tries an
address (it would retry for many minutes, printing warnings), the service checks within RAY_PROBE_SECS
that something answers there, and stops with an error saying so when nothing does.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray
from pydantic import BaseModel
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from trainer.untrusted_files import read_tail, write_atomic

from budget.ledger import Ledger, LedgerWriteError, pid_alive
from budget.models import (
    BudgetStatus,
    RunProgress,
    RunRequest,
    RunResult,
    RunStatus,
    ServiceSettings,
)

POLL_SECS = 1.0           # how often a run task asks whether its run should stop
STOP_GRACE_SECS = 20.0    # after this, a run that ignores its stop flag is killed with its worker
SUPERVISE_MARGIN_SECS = 120.0  # beyond the run timeout, for worker start-up and evaluation
PROGRESS_SECS = 1.0       # how often a waiting caller gets a RunProgress
RAY_PROBE_SECS = 5.0      # for a Ray cluster's address to accept a connection
RUNS_DIR = "runs"

log = logging.getLogger(__name__)


def run_dir_of(session_dir: Path, run_id: int) -> Path:
    return session_dir / RUNS_DIR / f"{run_id:03d}"


def tail_lines(path: Path, n: int = 5) -> list[str]:
    """The last n non-blank lines of a log that is still being written."""
    return [line for line in read_tail(path, 8192).splitlines() if line.strip()][-n:]


class ServiceUnavailable(RuntimeError):
    """The service cannot start as configured; the message says how to fix it."""


class RunSpec(BaseModel):
    """Everything a run task needs, sent from the actor to wherever Ray schedules the run."""

    run_id: int
    train_code: str
    run_dir: Path
    data_dir: Path
    time_budget: float
    timeout: float
    clock_grace: float | None
    cpus: int
    gpus: int
    sandbox: bool
    memory_mb: int | None
    disk_mb: int | None
    seed: int | None


def _stop_requested(service, run_id: int) -> bool:
    try:
        return ray.get(service.should_stop.remote(run_id), timeout=10)
    except ray.exceptions.GetTimeoutError:
        return False  # the actor is busy; ask again at the next poll
    except ray.exceptions.RayActorError:
        return True  # the actor died with its harness: nobody would record this run


@ray.remote(num_cpus=0)
def sandbox_problem() -> str | None:
    """Why runs cannot be sandboxed on this node, or None: checked before any run is charged."""
    from trainer.sandbox import SandboxUnavailable, bwrap_path

    try:
        bwrap_path()
    except SandboxUnavailable as exc:
        return str(exc)
    return None


@ray.remote(max_retries=0)
def run_in_sandbox(spec: RunSpec, service):
    """One run: execute_run in a thread while this thread polls the service's stop flag; its RunOutcome."""
    from trainer.sandbox import execute_run  # imported where the run executes, not in the harness

    if not spec.run_dir.is_dir():
        raise FileNotFoundError(f"the session's run directory {spec.run_dir} is not visible on this node; "
                                "put the session directory on a filesystem shared by every Ray node")
    options = {name: value for name in ("memory_mb", "disk_mb") if (value := getattr(spec, name)) is not None}
    cancel = threading.Event()
    outcome: dict = {}

    def execute():
        try:
            outcome["result"] = execute_run(
                spec.run_id, spec.train_code, spec.run_dir, data_dir=spec.data_dir, time_budget=spec.time_budget,
                timeout=spec.timeout, clock_grace=spec.clock_grace, cpus=spec.cpus, gpus=spec.gpus,
                sandbox=spec.sandbox, seed=spec.seed, cancel_event=cancel, **options)
        except BaseException as exc:  # re-raised below, in the task's own thread
            outcome["error"] = exc

    runner = threading.Thread(target=execute, name=f"run-{spec.run_id:03d}")
    runner.start()
    while runner.is_alive():
        runner.join(POLL_SECS)
        if runner.is_alive() and not cancel.is_set() and _stop_requested(service, spec.run_id):
            cancel.set()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


async def _result_of(ref):
    return await ref


@ray.remote(num_cpus=0, max_restarts=0)
class ServiceActor:
    """Owns the ledger of one session and the runs in flight. All methods run on one event loop."""

    def __init__(self, settings: ServiceSettings, harness_pid: int, data_dir: Path, cpus: int, gpus: int):
        self.settings = settings
        self.harness_pid = harness_pid
        self.data_dir = data_dir
        self.cpus, self.gpus = cpus, gpus
        self.ledger: Ledger | None = None
        self.in_flight: dict[int, ray.ObjectRef] = {}
        self.finished: dict[int, asyncio.Event] = {}
        self.stopping: set[int] = set()
        self.supervisors: set[asyncio.Task] = set()
        self.queue: list[asyncio.Future] = []  # submissions waiting for a run slot, oldest first
        self.admitted = 0  # submissions let through the queue and not yet in flight

    async def open(self) -> list[int]:
        """Open (or resume) the session; returns the runs a dead harness left unrecorded, recorded now."""
        self.ledger = Ledger.open(self.settings.session_dir, self.settings.budget, harness_pid=self.harness_pid)
        return self.ledger.recovered_run_ids

    def _flush(self) -> None:
        """Write the outcomes the ledger holds, if it can now; their result.json follows."""
        if self.ledger is None or not self.ledger.pending:
            return
        for run_id in self.ledger.flush_pending():
            self._write_result_json(run_id)

    def _write_result_json(self, run_id: int) -> None:
        """The run folder's copy of the ledger's record (description, hypothesis and seed included)."""
        path = run_dir_of(self.settings.session_dir, run_id) / "result.json"
        try:
            write_atomic(path, self.ledger.get(run_id).model_dump_json(indent=1))
        except OSError as exc:
            log.warning("run %d: %s not written (%s); the ledger holds the run's record", run_id, path, exc)

    async def submit(self, request: RunRequest) -> RunResult:
        self._flush()
        run_id = self.ledger.reserve(request, max_active=self.settings.concurrency, sandboxed=self.settings.sandbox)
        budget = self.ledger.status().budget
        run_dir = run_dir_of(self.settings.session_dir, run_id)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_dir / "train.py", request.train_code)  # kept even if the harness dies right now
            spec = RunSpec(run_id=run_id, train_code=request.train_code, run_dir=run_dir, data_dir=self.data_dir,
                           time_budget=min(request.time_budget_secs or budget.time_budget_secs, budget.time_budget_secs),
                           timeout=budget.run_timeout_secs,
                           clock_grace=budget.clock_grace_secs, cpus=self.cpus, gpus=self.gpus,
                           sandbox=self.settings.sandbox, memory_mb=self.settings.memory_mb,
                           disk_mb=self.settings.disk_mb, seed=request.seed)
            ref = run_in_sandbox.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(
                spec, ray.get_runtime_context().current_actor)
        except Exception as exc:  # charged at start, so it needs an outcome
            try:
                self.ledger.finish(run_id, self._failure(run_id, RunStatus.crashed, f"the run could not start: {exc}"))
            except LedgerWriteError as unrecorded:  # held by the ledger, written at a later call
                log.warning("%s", unrecorded)
            raise
        self.in_flight[run_id] = ref
        self.finished[run_id] = asyncio.Event()
        supervisor = asyncio.create_task(self._supervise(run_id, ref, budget.run_timeout_secs + SUPERVISE_MARGIN_SECS))
        self.supervisors.add(supervisor)  # the loop keeps only weak references to tasks
        supervisor.add_done_callback(self.supervisors.discard)
        return self.ledger.get(run_id)

    async def submit_queued(self, request: RunRequest) -> RunResult | None:
        """Start `request` the moment a run slot is free (at once if one is), in the order submitted.

        Charged only when it starts, so a queued submission that is dropped (`drop_queued`, cancel,
        close) or refused at its start (budget spent meanwhile) costs nothing; dropped returns None.
        """
        turn = asyncio.get_running_loop().create_future()
        self.queue.append(turn)
        self._admit()
        if not await turn:
            return None
        try:
            return await self.submit(request)
        finally:
            self.admitted -= 1
            self._admit()

    def _admit(self) -> None:
        while self.queue and len(self.in_flight) + self.admitted < self.settings.concurrency:
            self.admitted += 1
            self.queue.pop(0).set_result(True)

    async def drop_queued(self) -> int:
        """Drop every submission still waiting for a slot (none was charged); returns how many."""
        dropped, self.queue = self.queue, []
        for turn in dropped:
            turn.set_result(False)
        return len(dropped)

    def _failure(self, run_id: int, status: RunStatus, reason: str) -> RunResult:
        run_dir = run_dir_of(self.settings.session_dir, run_id)
        return RunResult(run_id=run_id, status=status, reasons=[reason], sandboxed=self.settings.sandbox,
                         stdout_tail=read_tail(run_dir / "stdout.log", 4000),
                         stderr_tail=read_tail(run_dir / "stderr.log", 4000))

    async def _supervise(self, run_id: int, ref: ray.ObjectRef, deadline: float) -> None:
        """Wait for a run task and record its outcome in the ledger, whatever happens to the task."""
        try:
            result = RunResult.from_outcome(run_id, await asyncio.wait_for(_result_of(ref), deadline))
        except asyncio.TimeoutError:
            ray.cancel(ref, force=True)
            result = self._failure(run_id, RunStatus.timeout,
                                   f"the run task did not return within {deadline:g} s; its worker was killed")
        except ray.exceptions.RayTaskError as exc:
            reason = f"the run task failed: {exc.cause!r}"
            if isinstance(exc.cause, OSError) and exc.cause.errno in (errno.ENOSPC, errno.EDQUOT):
                reason += f"; the disk holding {self.settings.session_dir} is full: free space there"
            result = self._failure(run_id, RunStatus.crashed, reason)
        except ray.exceptions.RayError as exc:
            result = self._failure(run_id, RunStatus.crashed, f"the run's Ray worker died: {type(exc).__name__}")
        finished_anyway = (RunStatus.completed, RunStatus.unverified, RunStatus.interrupted)
        if run_id in self.stopping and result.status not in finished_anyway:
            result = result.model_copy(update={
                "status": RunStatus.interrupted,
                "reasons": [*result.reasons, "stopped by the harness (Ctrl-C, cancel or close); the run is charged"]})
        try:
            if not pid_alive(self.harness_pid):
                # kill -9 of the harness takes Ray down around this actor, so "worker died" would be wrong.
                # Left `running`, the run is recorded interrupted, once, when the session is next opened.
                return
            try:
                try:
                    self.ledger.finish(run_id, result)
                except ValueError as exc:  # the sandbox returned no outcome; the run still needs one
                    self.ledger.finish(run_id, self._failure(run_id, RunStatus.crashed, f"unusable run result: {exc}"))
            except LedgerWriteError as exc:
                # Held by the ledger (and in its note, should the harness stop): `result` answers with the
                # outcome and why it is not recorded yet; every later call of this actor tries again.
                log.warning("%s", exc)
            else:
                self._write_result_json(run_id)
        finally:
            del self.in_flight[run_id]
            self.finished[run_id].set()
            self._admit()  # a queued submission starts the moment this run ends

    async def result(self, run_id: int) -> RunResult | None:
        """The run's record once it has finished (at once if it already has)."""
        if run_id in self.finished:
            await self.finished[run_id].wait()
        self._flush()
        return self.ledger.get(run_id)

    async def get(self, run_id: int) -> RunResult | None:
        self._flush()
        return self.ledger.get(run_id)

    async def should_stop(self, run_id: int) -> bool:
        return run_id in self.stopping

    async def cancel_all(self) -> list[int]:
        """Drop the queued submissions, stop every run in flight and wait until each is recorded; their ids."""
        await self.drop_queued()
        run_ids = sorted(self.in_flight)
        self.stopping.update(run_ids)
        waits = [self.finished[r].wait() for r in run_ids]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), STOP_GRACE_SECS)
        except asyncio.TimeoutError:
            for run_id in run_ids:
                if run_id in self.in_flight:
                    ray.cancel(self.in_flight[run_id], force=True)
            await asyncio.gather(*(self.finished[r].wait() for r in run_ids))
        return run_ids

    async def status(self) -> BudgetStatus:
        self._flush()
        return self.ledger.status()

    async def runs(self) -> list[RunResult]:
        self._flush()
        return self.ledger.runs()

    async def close(self) -> dict[int, str]:
        """Stop the runs in flight and release the session; returns the outcomes still not recorded."""
        await self.cancel_all()
        if self.ledger is None:
            return {}
        self._flush()
        unrecorded = self.ledger.pending
        self.ledger.close()  # what it still holds stays in its note; the next open records it
        return unrecorded


# The reaper runs as `python -c REAPER_SOURCE ROOT_PID...` beside the harness. While the harness lives
# it snapshots the process trees under the Ray processes the harness started; when the harness is gone
# (its end of the stdin pipe closes, by exit or by kill -9) it SIGKILLs whatever of them is left, so no
# Ray agent, worker or training process outlives the harness. Start times guard against reused pids.
REAPER_SOURCE = r"""
import os, select, signal, sys

roots = {int(pid) for pid in sys.argv[1:]}

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]  # parent pid, start time

def trees():
    procs = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := stat(int(p)))}
    children = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, frontier = {}, [p for p in roots if p in procs]
    while frontier:
        pid = frontier.pop()
        found[pid] = procs[pid][1]
        frontier.extend(children.get(pid, []))
    return found

known = {}
while True:
    ready, _, _ = select.select([0], [], [], 1.0)
    if ready and not os.read(0, 1):
        break
    known = {pid: start for pid, start in known.items() if (s := stat(pid)) and s[1] == start}
    known.update(trees())
for pid, start in {**known, **trees()}.items():
    s = stat(pid)
    if s and s[1] == start:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def _children(pid: int) -> set[int]:
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
        except (OSError, IndexError):
            pass  # gone meanwhile
    return found


# A gRPC server (Ray's GCS, and its client server behind ray://) answers HTTP/2's connection preface
# with a SETTINGS frame: byte 3 of the frame header is its type, 4.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def probe_ray_address(address: str) -> None:
    """Raise ServiceUnavailable unless a gRPC server answers at a `host:port` (or `ray://host:port`)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray finds the address itself
    leave = ("or leave out --ray-address and RAY_ADDRESS to let the session start a Ray of its own")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_PROBE_SECS) as conn:
            conn.sendall(HTTP2_PREFACE)
            reply = b""
            while len(reply) < 9 and (chunk := conn.recv(9 - len(reply))):
                reply += chunk
    except ConnectionRefusedError as exc:
        raise ServiceUnavailable(
            f"nothing answers at the Ray address {address} ({exc.strerror or exc}): start a cluster there "
            f"(`ray start --head --port {port}`), {leave}") from None
    except OSError as exc:
        if not isinstance(exc, (TimeoutError, ConnectionResetError)):
            raise ServiceUnavailable(f"nothing answers at the Ray address {address} ({exc.strerror or exc}): "
                                     f"check the address, {leave}") from None
        reply = b""
    if len(reply) < 9 or reply[3] != 4:
        raise ServiceUnavailable(
            f"something listens at the Ray address {address}, but it is not a Ray cluster (it does not answer "
            f"gRPC): check the port (a head's address is what `ray start --head` printed, port 6379 by "
            f"default), {leave}")


def _unwrap(ref):
    """ray.get, raising the service's own exceptions (RunRefused, SessionLocked, ...) as themselves."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, Exception):
            raise exc.cause from None
        raise


class QueuedSubmission:
    """A submission handed to the service that starts when a run slot is free."""

    def __init__(self, ref: ray.ObjectRef):
        self._ref = ref

    def started(self, timeout: float | None = 0) -> RunResult | None:
        """The run's first record once it has started; None while it waits (after `timeout` s) or if dropped.

        Raises RunRefused when the service refused it at its start (nothing charged).
        """
        if not ray.wait([self._ref], timeout=timeout)[0]:
            return None
        return _unwrap(self._ref)


class TrainingService:
    """The training service of one session, for the agent and the CLI. Use it as a context manager.

    Starts a local Ray (or joins `ray_address` / RAY_ADDRESS, or uses a Ray this process already
    initialised), opens the session's ledger in a Ray actor, and runs submissions as Ray tasks.
    Refused submissions raise RunRefused / BudgetExhausted and cost nothing; a session driven by
    another live harness raises SessionLocked.
    """

    def __init__(self, settings: ServiceSettings):
        from trainer.corpus import ensure_corpus

        self.settings = settings.model_copy(update={"session_dir": settings.session_dir.expanduser().absolute()})
        data_dir = (settings.data_dir or ensure_corpus().directory).absolute()  # fail before Ray, not in a run
        self._owns_ray = False
        self._reaper: subprocess.Popen | None = None
        self._closed = False
        self._actor = None
        try:
            self._start_ray()
            cluster = ray.cluster_resources()
            cluster_cpus = int(cluster.get("CPU", 0))
            cpus = settings.cpus_per_run or max(1, cluster_cpus // settings.concurrency)
            if cpus > cluster_cpus:
                raise ServiceUnavailable(f"cpus_per_run={cpus} but the Ray cluster has {cluster_cpus} CPUs; "
                                         "ask for fewer CPUs per run, or join a bigger cluster")
            gpus = 1 if cluster.get("GPU", 0) >= 1 else 0
            if settings.sandbox and (problem := _unwrap(sandbox_problem.remote())):
                raise ServiceUnavailable(problem)
            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
            self._actor = ServiceActor.options(scheduling_strategy=here).remote(
                self.settings, os.getpid(), data_dir, cpus, gpus)
            try:
                self.recovered_run_ids: list[int] = _unwrap(self._actor.open.remote())
            except LedgerWriteError as exc:
                raise ServiceUnavailable(str(exc)) from None
            self.cpus_per_run, self.gpus_per_run = cpus, gpus
            self.concurrency = settings.concurrency
        except BaseException:
            self.close()
            raise

    def _start_ray(self) -> None:
        if ray.is_initialized():
            return
        address = self.settings.ray_address or os.environ.get("RAY_ADDRESS")
        if "RAY_AUTH_MODE" not in os.environ:
            # Token auth: Ray's default for a local cluster, and what a client joining one by address needs.
            os.environ["RAY_AUTH_MODE"] = "token"
            ray._raylet.Config.initialize("")  # Ray reads its config once, at import; re-read it as ray.init does
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            probe_ray_address(address)
            try:
                ray.init(address=address, **quiet)
            except ConnectionError as exc:
                raise ServiceUnavailable(f"cannot join the Ray cluster at {address}: {exc}") from None
        else:
            before = _children(os.getpid())
            # "local": a new Ray of our own, even when another cluster runs on this machine
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
            ray_roots = _children(os.getpid()) - before
            self._reaper = subprocess.Popen([sys.executable, "-c", REAPER_SOURCE, *map(str, sorted(ray_roots))],
                                            stdin=subprocess.PIPE, start_new_session=True)
        self._owns_ray = True

    def __enter__(self) -> TrainingService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, request: RunRequest, wait: bool = True,
               on_progress: Callable[[RunProgress], None] | None = None) -> RunResult:
        """Run one train.py. With wait, block until its result (Ctrl-C cancels the run and re-raises)."""
        started = _unwrap(self._actor.submit.remote(request))
        if not wait:
            return started
        pending = self._actor.result.remote(started.run_id)
        run_dir = run_dir_of(self.settings.session_dir, started.run_id)
        began = time.monotonic()
        try:
            while not ray.wait([pending], timeout=PROGRESS_SECS)[0]:
                if on_progress:
                    on_progress(RunProgress(run_id=started.run_id, elapsed_secs=round(time.monotonic() - began, 1),
                                            stderr_tail=tail_lines(run_dir / "stderr.log")))
        except KeyboardInterrupt:
            self.cancel_all()
            raise
        return _unwrap(pending)

    def submit_async(self, request: RunRequest) -> int:
        """Start one run and return its id at once (for concurrency > 1); collect it with `wait`."""
        return self.submit(request, wait=False).run_id

    def submit_queued(self, request: RunRequest) -> QueuedSubmission:
        """Start one run the moment a run slot is free (at once if one is), without waiting here.

        Whether it started (and as which run) is asked of the returned QueuedSubmission; its result is
        collected with `wait`. A syntax error or a spent budget is reported when it would start.
        """
        return QueuedSubmission(self._actor.submit_queued.remote(request))

    def drop_queued(self) -> int:
        """Drop every submission still waiting for a run slot (none was charged); returns how many."""
        return _unwrap(self._actor.drop_queued.remote())

    def wait(self, run_ids: list[int] | None = None, timeout: float | None = None,
             on_progress: Callable[[RunProgress], None] | None = None) -> list[RunResult]:
        """Block until the given runs (default: every run in flight) finish or `timeout` seconds pass.

        Returns one record per run, in the order asked; a run still in flight at the timeout comes back
        with status `running`. `on_progress` hears about the first run asked for while it trains.
        """
        run_ids = self.status().active_run_ids if run_ids is None else list(run_ids)
        if not run_ids:
            return []
        pending = [self._actor.result.remote(r) for r in run_ids]
        first, began = pending[0], time.monotonic()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while pending:
                step = PROGRESS_SECS if deadline is None else min(PROGRESS_SECS, deadline - time.monotonic())
                if step <= 0:
                    break
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=step)
                if on_progress and first in pending:
                    on_progress(RunProgress(run_id=run_ids[0], elapsed_secs=round(time.monotonic() - began, 1),
                                            stderr_tail=tail_lines(run_dir_of(self.settings.session_dir,
                                                                              run_ids[0]) / "stderr.log")))
        except KeyboardInterrupt:
            self.cancel_all()
            raise
        results = [self.get(r) for r in run_ids]
        unknown = [r for r, result in zip(run_ids, results) if result is None]
        if unknown:
            raise KeyError(f"no run {', '.join(map(str, unknown))} in session {self.settings.session_dir}")
        return results

    def status(self) -> BudgetStatus:
        return _unwrap(self._actor.status.remote())

    def runs(self) -> list[RunResult]:
        return _unwrap(self._actor.runs.remote())

    def get(self, run_id: int) -> RunResult | None:
        """The run's record now (status `running` while in flight), or None for an unknown id."""
        return _unwrap(self._actor.get.remote(run_id))

    def cancel_all(self) -> list[RunResult]:
        """Stop every run in flight; each is recorded `interrupted` (and stays charged)."""
        return [self.get(r) for r in _unwrap(self._actor.cancel_all.remote())]

    def close(self) -> None:
        """Stop runs in flight, release the session, and stop Ray if this service started it."""
        if self._closed:
            return
        self._closed = True
        if self._actor is not None:
            try:
                unrecorded = _unwrap(self._actor.close.remote())
            except ray.exceptions.RayActorError:
                unrecorded = {}  # never opened, or already gone: nothing left to record
            for run_id, problem in unrecorded.items():
                log.warning("run %d's outcome is not recorded in the ledger (%s); it is kept in %s and will be "
                            "recorded when the session is next opened, once the disk has room", run_id, problem,
                            self.settings.session_dir)
            ray.kill(self._actor)
        if self._owns_ray:
            ray.shutdown()
        if self._reaper is not None:
            self._reaper.stdin.close()  # the reaper kills what Ray left behind, then exits
            self._reaper.wait(timeout=30)
