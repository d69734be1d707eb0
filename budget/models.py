"""Pydantic models that cross the service boundary: budgets, run requests and run results."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, Field

MAX_CODE_BYTES = 100_000  # the reference service's limit on train_code


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Budget(BaseModel):
    """What a session may spend. Defaults are the reference service's."""

    max_runs: int = Field(50, ge=1, description="runs per session")
    session_secs: float = Field(10_800, gt=0, description="wall-clock seconds per session")
    time_budget_secs: float = Field(180, gt=0, le=180, description="training seconds per run (TIME_BUDGET)")
    run_timeout_secs: float = Field(210, gt=0, description="hard wall-clock limit of one run, eval included")
    clock_grace_secs: float | None = Field(None, ge=0, le=30, description=(
        "seconds the training clock (train.py's first line to evaluate_bpb, plus the slowest evaluation "
        "frame) may run past TIME_BUDGET; default 2 s + 1 % of it. Python and torch are imported before "
        "the clock starts"))


class RunStatus(str, Enum):
    running = "running"
    completed = "completed"      # ran, evaluated, verified
    unverified = "unverified"    # ran, but the evaluator's checks failed (see reasons)
    crashed = "crashed"          # non-zero exit or no evaluation
    timeout = "timeout"          # killed at run_timeout_secs
    interrupted = "interrupted"  # the harness died or was stopped while it ran
    refused = "refused"          # never started (syntax error, too large, no budget); not charged


class RunRequest(BaseModel):
    train_code: str
    description: str = ""
    hypothesis: str = ""
    seed: int | None = None
    time_budget_secs: float | None = Field(None, gt=0, description="TIME_BUDGET of this run, at most the session's "
                                           "(the reference's per-run time_budget); None: the session's")


class RunResult(BaseModel):
    run_id: int
    status: RunStatus
    description: str = ""
    hypothesis: str = ""
    seed: int | None = Field(None, description="TORCH_SEED of the run; None means the script's default (42)")
    val_bpb: float | None = Field(None, description="the trusted evaluator's number")
    reported_val_bpb: float | None = Field(None, description="what the script printed")
    verified: bool = False
    reasons: list[str] = Field(default_factory=list, description="why a run is not verified, or what went wrong")
    startup_secs: float | None = Field(None, description="sandbox, Python and torch start-up, before the clock")
    training_secs: float | None = Field(None, description="the harness's clock: train.py's first line to evaluate_bpb")
    slowest_frame_secs: float | None = Field(None, description="the slowest evaluation frame; counted on the clock")
    eval_secs: float | None = Field(None, description="the trusted evaluation, from the hand-off to the number")
    wall_secs: float | None = None
    cpu_others: float | None = Field(None, description="share of the run's cores other processes used while it ran; "
                                     "a wall-clock budget makes a contended run's score worse than its code")
    total_steps: int | None = None
    num_params_M: float | None = None
    train_loss: float | None = None
    code_sha256: str = ""
    sandboxed: bool = True
    stdout_tail: str = ""
    stderr_tail: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    runs_remaining: int | None = None
    match_time_remaining_secs: float | None = None

    @classmethod
    def from_outcome(cls, run_id: int, outcome) -> "RunResult":
        """The record of a run from the sandbox's plain outcome (trainer.verdict.RunOutcome)."""
        return cls(run_id=run_id, **dataclasses.asdict(outcome))

    @property
    def counts_as_best(self) -> bool:
        return self.status == RunStatus.completed and self.verified and self.val_bpb is not None


class BudgetStatus(BaseModel):
    runs_used: int
    runs_remaining: int
    match_time_remaining_secs: float
    session_started_at: datetime
    active_run_id: int | None = None
    best_run_id: int | None = None
    best_val_bpb: float | None = None
    active_run_ids: list[int] = Field(default_factory=list, description="every run in flight, oldest first")
    unrecorded_run_ids: list[int] = Field(default_factory=list, description="runs that ended but whose outcome the "
                                          "ledger could not write yet (full disk?); held until a write succeeds")
    budget: Budget | None = Field(None, description="the session's budget as stored in the ledger")


class Refusal(BaseModel):
    """Why a submission was not run; `code` mirrors the reference service's HTTP status."""

    code: int = Field(description="400 bad code, 409 every run slot busy, 422 syntax error, 429 budget spent, "
                                  "507 the ledger cannot record a run now (disk full or failing: a run's outcome "
                                  "waits to be written, or no room is left for it; free space, then submit again)")
    message: str
    runs_remaining: int | None = None
    match_time_remaining_secs: float | None = None


class RunRefused(Exception):
    """A submission the service did not run. Never charged."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.message)
        self.refusal = refusal

    def __reduce__(self):  # rebuilt from the Refusal when it crosses a process boundary
        return type(self), (self.refusal,)

    @property
    def code(self) -> int:
        return self.refusal.code


class BudgetExhausted(RunRefused):
    """The session has no run or not enough match time left for one more run (429)."""


class RunProgress(BaseModel):
    """What a waiting caller is told about a run in flight."""

    run_id: int
    elapsed_secs: float
    stderr_tail: list[str] = Field(default_factory=list, description="last lines the script wrote to stderr")


class ServiceSettings(BaseModel):
    """How the training service runs. Budget fields set explicitly replace the stored ones on resume."""

    session_dir: Path
    budget: Budget = Field(default_factory=Budget, description="fields left unset keep the session's stored value")
    concurrency: int = Field(1, ge=1, description="runs in flight at once")
    ray_address: str | None = Field(None, description="join this Ray cluster (else RAY_ADDRESS, else a local Ray)")
    sandbox: bool = Field(True, description="False runs train.py unconfined; every result then says sandboxed=false")
    cpus_per_run: int | None = Field(None, ge=1, description="default: the cluster's CPUs divided by concurrency")
    memory_mb: int | None = Field(None, ge=64, description="memory limit of one run (default: the sandbox's)")
    disk_mb: int | None = Field(None, ge=1, description="disk a run may fill in its folder (default: the sandbox's)")
    data_dir: Path | None = Field(None, description="folder with train.bin/val.bin (default: the verified corpus cache)")
