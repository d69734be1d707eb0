"""The claim a session makes: its best configuration, with seeds, mean and spread, against the noise.

One rule, used by the offline researcher while it decides and by everything that reports a session
(methodology.md, the end-of-session line, the export, `report`, `compare`, `rerun --best`):

- A configuration is a train.py, seed aside: runs share one when their code is the same program
  (comments, docstrings and layout aside) once a top-level `seed = ...` line is set aside. A run's seed is
  a literal `seed = N` in its code, else its TORCH_SEED, else the scripts' default, 42.
- Evidence: runs that completed, verified, and did not share their cores with other work
  (trainer/contention.py). Only when no run is such evidence do contended verified runs count, and the
  claim says so.
- The noise: the widest spread between the seeds of one configuration, never under MIN_NOISE; before any
  configuration ran twice it is not measured, MIN_NOISE is assumed, and the claim says so.
- Acceptance, in run order: the first measured configuration is the incumbent; another replaces it only
  when its mean beats the incumbent's by more than the noise. The claimed best is the last incumbent.
  So a reseeded baseline is never an improvement: it is the baseline's configuration.
"""
from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from budget.models import RunResult, RunStatus
from trainer.contention import CONTENDED

DEFAULT_SEED = 42  # baseline_train.py: seed = int(os.environ.get("TORCH_SEED", "42"))
MIN_NOISE = 0.003  # bpb: the least noise assumed between two seeds


# --- the rule, on any keys (the offline researcher groups by its parsed settings, reports by code) --------

@dataclass
class Measure:
    run_id: int
    key: str
    seed: int
    score: float | None  # None: not evidence


@dataclass
class Verdict:
    """What a list of measures says: the noise and the incumbent."""

    measures: list[Measure]
    noise: float | None = None         # measured noise (None before any configuration ran twice)
    incumbent: Measure | None = None   # the run that made the claimed best configuration the incumbent
    last_gain: float | None = None     # how much the incumbent beat its predecessor when accepted

    def scores(self, key: str) -> list[float]:
        return [m.score for m in self.measures if m.key == key and m.score is not None]

    def mean(self, key: str) -> float | None:
        scores = self.scores(key)
        return sum(scores) / len(scores) if scores else None

    @property
    def bar(self) -> float:
        """The noise a configuration must beat."""
        return self.noise or MIN_NOISE


def judge(measures: list[Measure]) -> Verdict:
    verdict = Verdict(measures)
    keys = list(dict.fromkeys(m.key for m in measures))
    spreads = [max(s) - min(s) for s in (verdict.scores(k) for k in keys) if len(s) >= 2]
    if spreads:
        verdict.noise = max(MIN_NOISE, *spreads)
    for m in measures:
        if m.score is None:
            continue
        if verdict.incumbent is None:
            verdict.incumbent = m
            continue
        gain = verdict.mean(verdict.incumbent.key) - verdict.mean(m.key)
        if m.key != verdict.incumbent.key and gain > verdict.bar:
            verdict.incumbent, verdict.last_gain = m, gain
    return verdict


# --- configurations of a session's runs ----------------------------------------------------------------

class _Plain(ast.NodeTransformer):
    """Drops docstrings (bare string statements), which say nothing about what the code runs."""

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return node


def code_key(code: str) -> tuple[str, int | None]:
    """(the configuration's key, the literal seed its code sets or None)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()[:16], None
    seed, body = None, []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "seed"):
            if isinstance(node.value, ast.Constant) and type(node.value.value) is int:
                seed = node.value.value
            continue
        body.append(node)
    tree.body = body
    return hashlib.sha256(ast.dump(_Plain().visit(tree)).encode()).hexdigest()[:16], seed


def not_evidence(r: RunResult) -> str | None:
    """Why a run's score is not evidence, or None when it is."""
    # Other work stole steps (and stretched the clock): neither a score nor a failure of the code
    if r.status in (RunStatus.completed, RunStatus.unverified, RunStatus.timeout) and (r.cpu_others or 0) > CONTENDED:
        return f"contended: other work took {r.cpu_others:.0%} of the cores"
    if not r.counts_as_best:
        return r.status.value if r.status != RunStatus.completed else "unverified"
    return None


def run_code(session_dir: Path, run_id: int) -> str | None:
    path = Path(session_dir) / "runs" / f"{run_id:03d}" / "train.py"
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


class Configuration(BaseModel):
    """One train.py, its runs and what they measured."""

    runs: list[int]                  # every run of this code, evidence or not
    scored_runs: list[int]           # the runs whose score is evidence
    seeds: list[int]                 # of the scored runs
    scores: list[float]

    @property
    def mean(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    @property
    def spread(self) -> float | None:
        return max(self.scores) - min(self.scores) if self.scores else None

    def text(self) -> str:
        if not self.scores:
            return f"run{'s' if len(self.runs) > 1 else ''} {_ids(self.runs)}, no score that counts"
        seeds = ", ".join(f"run {r} seed {s}: {v:.4f}" for r, s, v in zip(self.scored_runs, self.seeds, self.scores))
        if len(self.scores) == 1:
            return f"{self.mean:.4f} from a single seed, so no spread ({seeds})"
        distinct = len(set(self.seeds))
        over = f"{len(self.scores)} seed(s)" if distinct == len(self.scores) else f"{len(self.scores)} runs, {distinct} seed(s)"
        return f"mean {self.mean:.4f} over {over}, spread {self.spread:.4f} ({seeds})"


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


class Claim(BaseModel):
    """What a session can claim, and how strongly."""

    best: Configuration | None = None
    baseline: Configuration | None = None
    noise: float = MIN_NOISE            # the noise the best had to beat
    noise_measured: bool = False
    gain: float | None = None           # baseline mean minus best mean
    beat_noise: bool = False
    contended_only: bool = False        # no quiet run was verified: contended runs stood in
    configuration_of: dict[int, int] = {}  # run id -> the first run of its configuration
    seed_of: dict[int, int] = {}           # run id -> its seed
    measured_configurations: int = 0       # configurations with a score that counts

    @property
    def best_is_baseline(self) -> bool:
        return self.best is not None and self.baseline is not None and self.best.runs == self.baseline.runs

    def sentence(self) -> str:
        """The claim in one paragraph: what people read at the end of a session and in methodology.md."""
        if self.best is None:
            return "No verified run, so no claim: nothing was measured that this session can vouch for."
        noise = (f"the noise between seeds is {self.noise:.4f} bpb" if self.noise_measured else
                 f"the noise between seeds was not measured (no configuration ran with two seeds), so "
                 f"{self.noise:.4f} bpb is assumed; `pgolf-agent rerun SESSION --best --seeds 3` measures it")
        caveat = (" Every verified run shared its cores with other work, so it trained fewer steps than on a quiet "
                  "machine and these scores understate its code." if self.contended_only else "")
        if self.best_is_baseline and self.measured_configurations == 1:
            return (f"Only the baseline's configuration was measured (run{'s' if len(self.best.runs) > 1 else ''} "
                    f"{_ids(self.best.runs)}; "
                    f"{self.best.text()}); {noise}.{caveat}")
        if self.best_is_baseline:
            return (f"Nothing beat the noise: the best configuration is the baseline's own (runs "
                    f"{_ids(self.best.runs)}; {self.best.text()}); {noise}.{caveat}")
        base = (f"the baseline's mean {self.baseline.mean:.4f} over {len(self.baseline.scores)} seed(s)"
                if self.baseline and self.baseline.scores else "the baseline (never measured)")
        gain = f"{self.gain:.4f} better than {base}" if self.gain is not None else f"against {base}"
        verdict = "more than the noise" if self.beat_noise else "not more than the noise"
        return (f"Best configuration: run{'s' if len(self.best.runs) > 1 else ''} {_ids(self.best.runs)}; {self.best.text()}; {gain}, {verdict} "
                f"({noise}).{caveat}")

    @property
    def best_run_id(self) -> int | None:
        """The first scored run of the best configuration: whose train.py is the claimed code."""
        return self.best.scored_runs[0] if self.best else None


def _measures(runs: list[RunResult], session_dir: Path, contended_ok: bool) -> list[Measure]:
    out = []
    for r in sorted(runs, key=lambda r: r.run_id):
        code = run_code(session_dir, r.run_id)
        key, literal_seed = code_key(code) if code is not None else (r.code_sha256 or f"run{r.run_id}", None)
        reason = not_evidence(r)
        counts = reason is None or (contended_ok and reason.startswith("contended"))
        out.append(Measure(r.run_id, key, literal_seed if literal_seed is not None else
                           (r.seed if r.seed is not None else DEFAULT_SEED), r.val_bpb if counts else None))
    return out


def _configuration(verdict: Verdict, key: str) -> Configuration:
    ms = [m for m in verdict.measures if m.key == key]
    scored = [m for m in ms if m.score is not None]
    return Configuration(runs=[m.run_id for m in ms], scored_runs=[m.run_id for m in scored],
                         seeds=[m.seed for m in scored], scores=[m.score for m in scored])


def make_claim(runs: list[RunResult], session_dir: Path) -> Claim:
    """The claim of a session's runs (the ledger's records; the code is read from the run folders)."""
    contended_only = not any(not_evidence(r) is None for r in runs) and any(r.counts_as_best for r in runs)
    verdict = judge(_measures(runs, session_dir, contended_ok=contended_only))
    first = {}
    for m in verdict.measures:
        first.setdefault(m.key, m.run_id)
    claim = Claim(noise=verdict.bar, noise_measured=verdict.noise is not None, contended_only=contended_only,
                  configuration_of={m.run_id: first[m.key] for m in verdict.measures},
                  seed_of={m.run_id: m.seed for m in verdict.measures},
                  measured_configurations=len({m.key for m in verdict.measures if m.score is not None}))
    if not verdict.measures:
        return claim
    claim.baseline = _configuration(verdict, verdict.measures[0].key)
    if verdict.incumbent is None:
        return claim
    claim.best = _configuration(verdict, verdict.incumbent.key)
    if claim.baseline.scores:
        claim.gain = claim.baseline.mean - claim.best.mean
        claim.beat_noise = not claim.best_is_baseline and claim.gain > claim.noise
    return claim


def claim_of(session_dir: Path, runs: list[RunResult]) -> tuple[Claim, str | None]:
    """The claim and the claimed code (None without a verified run)."""
    claim = make_claim(runs, session_dir)
    return claim, run_code(session_dir, claim.best_run_id) if claim.best else None
