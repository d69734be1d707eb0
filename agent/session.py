"""One research session, start to finish: settings, baseline, loop, and the session record."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.markup import escape

from agent.approval import ApprovalGate
from agent.context import Context
from agent.loop import AgentLoop, LimitReached, PersonStopped
from agent.model_calls import call_event, preflight, retry_line, totals_line
from agent.outcome import SessionEnd, StopKind
from agent.prices import Price, price_for
from agent.providers.base import ProviderError, Retry
from agent.providers.options import ModelOptions
from agent.tools import TOOL_SPECS, Toolbox, Workspace, run_line
from budget.cli import ProgressPrinter
from budget.models import Budget, RunRequest
from logs.export import build_submission, session_window
from logs.claim import claim_of
from logs.methodology import person_section, write_methodology
from logs.plot import draw_progress
from logs.trajectory import SessionEvent, Trajectory

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "prompts"
BASELINE = ROOT / "trainer" / "baseline_train.py"
AgentKind = Literal["auto", "anthropic", "openai", "search", "random", "replay"]


class SessionSettings(BaseModel):
    """Everything a session needs; saved in the session folder so --resume reuses it."""

    session_dir: Path
    agent: AgentKind = "auto"
    model: str | None = None
    base_url: str | None = None
    replay_from: Path | None = None
    budget: Budget = Field(default_factory=Budget)
    concurrency: int = Field(1, ge=1)
    ray_address: str | None = None
    sandbox: bool = True
    approve: Literal["none", "runs", "edits", "all"] = "none"
    max_llm_calls: int | None = Field(None, ge=1)
    max_cost_usd: float | None = Field(None, gt=0)
    price_per_mtok: Price | None = Field(None, description="overrides the price table (agent/prices.py)")
    model_options: ModelOptions = Field(default_factory=ModelOptions)
    context_chars: int = Field(200_000, ge=4_000, description="kept turns; cached, so a wide window is cheap")
    search_seed: int = 0
    background_runs: bool = Field(True, description="an LLM's submit_run returns at once; results follow (--wait-for-runs: off)")
    service_url: str | None = Field(None, description="a remote training service speaking the reference protocol")
    service_token: str | None = Field(None, exclude=True, description="its token; never saved")

    @classmethod
    def load(cls, folder: Path) -> "SessionSettings":
        """A session's settings, for the folder named: a copied or moved session reads and writes only there."""
        saved = Path(folder) / "settings.json"
        if not saved.is_file():
            raise NotASession(f"{folder} is not a session folder (no settings.json); pass the folder a previous "
                              "`pgolf-agent run` printed")
        return cls.model_validate_json(saved.read_text()).model_copy(update={"session_dir": Path(folder)})


class NotASession(FileNotFoundError):
    """The folder holds no session."""


def pick_agent(settings: SessionSettings) -> str:
    """`auto`: Anthropic with a key, else OpenAI with a key or base URL, else the offline search agent."""
    if settings.agent != "auto":
        return settings.agent
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "anthropic"
    if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL") or settings.base_url:
        return "openai"
    return "search"


def make_researcher(kind: str, settings: SessionSettings, on_retry=None):
    if kind in ("search", "random"):
        from agent.search_agent import SearchResearcher
        return SearchResearcher(settings.session_dir, "random" if kind == "random" else "plan",
                                rng_seed=settings.search_seed)
    if kind == "replay":
        from agent.replay_provider import ReplayProvider
        if not settings.replay_from:
            raise ProviderError("--agent replay needs the recorded session folder (pgolf-agent replay SESSION)")
        return ReplayProvider(settings.replay_from)
    from agent.providers import make_provider
    return make_provider(kind, settings.model, settings.base_url, options=settings.model_options, on_retry=on_retry)


def hardware(service) -> str:
    gpus = getattr(service, "gpus_per_run", 0)
    cpus = getattr(service, "cpus_per_run", None) or os.cpu_count()
    return f"{cpus} CPU cores" + (f" and {gpus} GPU" if gpus else ", no GPU")


class Session:
    def __init__(self, settings: SessionSettings, console: Console | None = None, service=None):
        self.settings = settings
        self.console = console or Console()
        self.dir = Path(settings.session_dir)
        self.trajectory = Trajectory(self.dir / "trajectory.jsonl")
        self.workspace = Workspace(self.dir)
        self.service = service
        self.end = SessionEnd(StopKind.error, "the harness stopped without finishing")
        self.opened = False  # retries are recorded once the trajectory belongs to a started session
        self.researcher = None

    # --- set-up ----------------------------------------------------------------
    def _open(self):
        settings_file = self.dir / "settings.json"
        resumed = settings_file.exists()
        if self.service is None and self.settings.service_url:
            from budget.remote import RemoteService
            self.service = RemoteService(self.settings.service_url, self.dir, self.settings.budget,
                                         token=self.settings.service_token,
                                         on_retry=lambda line: self.console.print(f"[yellow]{escape(line)}[/yellow]"))
        if self.service is None:
            from budget.service import ServiceSettings, TrainingService
            self.service = TrainingService(ServiceSettings(
                session_dir=self.dir, budget=self.settings.budget, concurrency=self.settings.concurrency,
                ray_address=self.settings.ray_address, sandbox=self.settings.sandbox))
        self.dir.mkdir(parents=True, exist_ok=True)
        if not resumed:  # only once the service runs: a session that could not start does not block a retry
            settings_file.write_text(self.settings.model_dump_json(indent=1))
        if not self.workspace.train_path.exists():
            self.workspace.write(BASELINE.read_text())
        self.workspace.load_notes()
        return resumed

    def _baseline(self):
        if self.service.runs():
            return
        self.console.print("[bold]run 0[/bold]: the unmodified baseline")
        with ProgressPrinter() as progress:
            result = self.service.submit(RunRequest(train_code=BASELINE.read_text(), description="baseline (unmodified)",
                                       hypothesis="reference point for every later run"),
                            wait=True, on_progress=progress)
        self.console.print(run_line(result))

    def brief(self) -> str:
        """The fresh part of every request: the run table (code and notes are in the snapshot and the turns)."""
        return "\n".join(["## Runs", *(run_line(r) for r in self.service.runs())])

    def state(self) -> str:
        """The compact state always present in a request: run table, notes, best and working code."""
        runs = self.service.runs()
        best = min((r for r in runs if r.counts_as_best), key=lambda r: r.val_bpb, default=None)
        parts = ["## Runs", *(run_line(r) for r in runs)]
        if self.workspace.notes:
            parts += ["", "## Your notes so far", *(f"- [{n.kind}] {n.text}" for n in self.workspace.notes[-30:])]
        working = self.workspace.code()
        if best is not None:
            best_code = (self.dir / "runs" / f"{best.run_id:03d}" / "train.py").read_text()
            parts += ["", f"## Best verified run: {best.run_id} (val_bpb {best.val_bpb:.4f})"]
            if best_code == working:
                parts.append("The working train.py is identical to the best run's code.")
            else:
                parts += [f"Best run's code:\n```python\n{best_code}\n```"]
        parts += ["", f"## Working train.py\n```python\n{working}\n```"]
        return "\n".join(parts)

    def _task(self, background: bool) -> str:
        b = self.settings.budget
        runs = self.service.runs()
        baseline = json.dumps({k: getattr(runs[0], k) for k in ("val_bpb", "total_steps", "num_params_M",
                                                                 "training_secs")}) if runs else "(not run)"
        task = (PROMPTS / "task.txt").read_text().format(
            max_runs=b.max_runs, session_hours=b.session_secs / 3600, time_budget=b.time_budget_secs,
            timeout=b.run_timeout_secs, hardware=hardware(self.service), baseline=baseline,
            runs=(PROMPTS / ("runs_background.txt" if background else "runs_waiting.txt")).read_text())
        return task + "\n\n" + (PROMPTS / "habits.txt").read_text()

    # --- the session -------------------------------------------------------------
    def run(self) -> SessionEnd:
        kind = pick_agent(self.settings)
        researcher = self.researcher = make_researcher(kind, self.settings, self._retry)  # a missing key fails here
        try:  # nothing is started, and nothing charged, before the model is known to answer
            price = price_for(researcher.model, self.settings.price_per_mtok,
                              needed=self.settings.max_cost_usd is not None and kind in ("anthropic", "openai"))
            checked = preflight(researcher, TOOL_SPECS, self.settings.model_options.chosen(), self.console)
        except ProviderError:
            try:  # leave no folder behind to block a retry (rmdir removes only an empty one)
                self.dir.rmdir()
            except OSError:
                pass
            raise
        resumed = self._open()
        self.opened = True
        self.console.print(f"researcher: [bold]{kind}[/bold] ({researcher.model})"
                           + (" — no API key found, so the offline search agent runs" if
                              self.settings.agent == "auto" and kind == "search" else ""))
        remote = getattr(self.service, "description", None)  # a remote service says where it is and what it verifies
        if remote:
            self.console.print(remote)
        self.trajectory.append(SessionEvent(event="resume" if resumed else "start", detail={
            "agent": kind, "model": researcher.model, "settings": json.loads(self.settings.model_dump_json()),
            **({"service": remote} if remote else {})}))
        if checked is not None:
            self.trajectory.append(call_event(checked, researcher.name, price, preflight=True))
        try:
            self._baseline()
            toolbox = Toolbox(self.workspace, self.service, progress=ProgressPrinter,  # the search agent reads results
                              background=self.settings.background_runs and kind in ("anthropic", "openai"))
            approval = None
            if self.settings.approve != "none":
                approval = ApprovalGate(self.settings.approve, self.console, best_code=self._best_code,
                                        record=self.trajectory.append)
            loop = AgentLoop(researcher, toolbox, self.trajectory,
                             Context(self.state, max_chars=self.settings.context_chars, brief=self.brief),
                             (PROMPTS / "system.txt").read_text() + "\n" + self._task(toolbox.background), approval=approval,
                             max_llm_calls=self.settings.max_llm_calls, max_cost_usd=self.settings.max_cost_usd,
                             price=price,
                             run_timeout=self.settings.budget.run_timeout_secs, console=self.console)
            # --max-cost counts what the session already spent: the preflight, and the calls before a resume
            loop.cost_usd = sum(e.metadata.get("cost_usd") or 0 for e in self.trajectory.events()
                                if e.type == "llm_call")
            reason = loop.run()
            self.end = SessionEnd(StopKind.finished if loop.summary else StopKind.budget_spent, reason)
        except PersonStopped as exc:
            self.end = SessionEnd(StopKind.stopped, str(exc))
        except LimitReached as exc:
            self.end = SessionEnd(StopKind.limit, str(exc))
        except ProviderError as exc:
            self.end = SessionEnd(StopKind.api_failure, f"model provider error: {exc}")
            self.console.print(f"[red]{exc}[/red]")
        except KeyboardInterrupt:
            self.end = SessionEnd(StopKind.interrupted, "interrupted by the user (Ctrl-C); the run in flight was cancelled")
            self.service.cancel_all()
        except Exception as exc:
            self.end = SessionEnd(StopKind.error, f"harness error: {type(exc).__name__}: {exc}")
            self.console.print_exception()
        finally:
            self.trajectory.append(SessionEvent(event="end", detail={"reason": self.end.reason,
                                                                     "kind": self.end.kind.value}))
            self.finish(researcher.model)
        return self.end

    def _retry(self, retry: Retry) -> None:
        self.console.print(retry_line(retry))
        if self.opened:
            self.trajectory.append(SessionEvent(event="retry", detail={
                "attempt": retry.attempt, "of": retry.of, "delay_s": round(retry.delay_s, 2), "error": retry.error}))

    def _best_code(self) -> str:
        """The claimed best configuration's train.py (the baseline before any verified run)."""
        return claim_of(self.dir, self.service.runs())[1] or BASELINE.read_text()

    def finish(self, model_id: str, submission_path: Path | None = None) -> Path | None:
        """Write the session record: methodology, best code, picture, results.tsv, and the submission (where there
        is verified code to submit); returns the submission's path, or None."""
        runs = self.service.runs()
        status = self.service.status()
        claim, best_code = claim_of(self.dir, runs)
        methodology = write_methodology(runs, self.workspace.notes, status, model_id, self.end.reason, claim,
                                        replayed=self.settings.agent == "replay")
        methodology += person_section(self.trajectory.events())
        (self.dir / "methodology.md").write_text(methodology)
        picture, missing = draw_progress(self.dir, runs, claim)
        table = "\n".join(run_line(r) for r in runs)
        self.console.print(f"\n{table}\n\nstopped: {self.end.reason}\n{totals_line(self.trajectory.events(), runs)}")
        self.console.print(claim.sentence(), markup=False, highlight=False)
        if missing:
            self.console.print(f"[yellow]{missing}[/yellow]")
        if best_code is None:
            self.console.print("[yellow]no run was verified[/yellow], so there is no code this session can vouch "
                               f"for: no submission written (methodology and trajectory are in {self.dir})")
            return None
        (self.dir / "best_train.py").write_text(best_code)
        events = self.trajectory.events()
        submission = build_submission(best_code, methodology, events, model_id, *session_window(events))
        path = submission_path or self.dir / "submission.json"
        path.write_text(submission.to_json())
        self.console.print(f"session record: {self.dir} (picture: {picture.name})\nsubmission: {path} "
                           f"(train_code of run {claim.best_run_id}, {len(submission.metadata.replay_log)} replay steps)")
        return path


def new_session_dir(root: Path = Path("sessions")) -> Path:
    return root / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
