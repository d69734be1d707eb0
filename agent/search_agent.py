"""The offline researcher: no model, no network, the same tools an LLM uses.

It plans its runs from everything measured so far (agent/planner.py) and keeps
a change only when it beats the incumbent by more than the measured run-to-run
noise. It is stateless: every decision is recomputed from the runs on disk, so
a resumed session continues where it stopped.

Method:
1. Run 0 (the baseline) is repeated with another seed to measure noise; the
   noise is the widest spread between seeds seen so far, so every later
   confirmation can raise it.
2. Structural probes (planner.PROBES: data order, schedule, depth for width,
   optimiser, activation, output head, normalisation), one run each on the
   incumbent, so what helped accumulates.
3. The probes that looked better by less than the noise, together.
4. Optuna's TPE, fitted to every measured run, proposes the next
   configuration: it models which values go with good scores, jointly, so it
   combines what helped and explores where the evidence is thin.
5. An improvement smaller than twice the noise is confirmed with another
   seed, and the last run confirms an incumbent measured once: the claimed
   best is a configuration with its seeds, mean and spread.
6. If TPE finds nothing new, the runs left go to the moves the noise hid.
A configuration is never run twice with the same seed, nor proposed again
once measured. A run that shared its cores with other work
(trainer/contention.py) got fewer steps than its code deserves; it counts as
failed, so it neither sets the noise nor wins. `strategy="random"` samples
the same space uniformly instead: the control for the benchmark.
"""
from __future__ import annotations

import ast
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.planner import PROBES, SPACE, tpe_proposal, valid
from agent.providers.base import AssistantMessage, ModelReply, ToolCall
from trainer.contention import CONTENDED

SETTING_LINE = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*) = (?P<value>[^#\n]+?)(?P<comment>\s+#.*)?$", re.M)
MIN_NOISE = 0.003
MAX_SEEDS = 3  # seeds a configuration the noise hid gets before it is left unresolved
SEED_BASE = 42

def parse_settings(code: str) -> dict[str, object]:
    """The literal `name = value` lines of the settings block."""
    out = {}
    for m in SETTING_LINE.finditer(code):
        try:
            out[m["name"]] = ast.literal_eval(m["value"].strip())
        except (ValueError, SyntaxError):
            continue
    return out


def setting_line(code: str, name: str) -> str:
    m = re.search(rf"^{name} = [^\n]*$", code, re.M)
    if not m:
        raise KeyError(name)
    return m.group(0)


def replace_value(line: str, value) -> str:
    m = SETTING_LINE.match(line)
    literal = repr(float(f"{value:.6g}")) if isinstance(value, float) else repr(value)
    if isinstance(value, str):
        literal = json.dumps(value)  # double quotes, as the file writes them
    head = f"{m['name']} = {literal}"
    if not m["comment"]:
        return head
    comment = m["comment"].lstrip()
    return head + " " * max(2, m.start("comment") + len(m["comment"]) - len(comment) - len(head)) + comment


def changes_text(changes: dict) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in changes.items())


@dataclass
class Trial:
    run_id: int
    cfg: dict
    seed: int
    val_bpb: float | None
    status: str
    description: str


@dataclass
class Knowledge:
    """What the runs on disk say: trials, noise and the incumbent."""

    trials: list[Trial] = field(default_factory=list)
    noise: float | None = None
    incumbent: Trial | None = None
    incumbent_mean: float | None = None
    last_gain: float | None = None  # how much the incumbent beat its predecessor when accepted

    def key(self, cfg: dict, seed: int) -> str:
        return json.dumps({**cfg, "__seed": seed}, sort_keys=True, default=str)

    def attempted(self) -> set[str]:
        return {self.key(t.cfg, t.seed) for t in self.trials}

    def free_seed(self, cfg: dict, seed: int) -> int:
        """The first seed from `seed` on that `cfg` has not been run with."""
        attempted = self.attempted()
        while self.key(cfg, seed) in attempted:
            seed += 1
        return seed

    def unresolved(self, limit: int | None = 3) -> list[tuple[dict, float, int]]:
        """Configurations whose mean lies within the noise of the incumbent's: the moves the noise hid."""
        if not self.incumbent or self.incumbent_mean is None:
            return []
        noise = self.noise or MIN_NOISE
        rows = []
        for cfg in _distinct(t.cfg for t in self.trials):
            scores = self.scores(cfg)
            if cfg == self.incumbent.cfg or not scores:
                continue
            mean = sum(scores) / len(scores)
            if abs(mean - self.incumbent_mean) <= noise:
                rows.append(({n: v for n, v in cfg.items() if v != self.incumbent.cfg.get(n)}, mean, len(scores)))
        return sorted(rows, key=lambda r: r[1])[:limit]

    def scores(self, cfg: dict) -> list[float]:
        return [t.val_bpb for t in self.trials if t.cfg == cfg and t.val_bpb is not None]

    def is_new(self, cfg: dict) -> bool:
        """No run has tried this configuration, with any seed."""
        return all(t.cfg != cfg for t in self.trials)

    def best_text(self) -> str:
        """The incumbent as a claim: its seeds, mean and spread."""
        runs = [t for t in self.trials if t.cfg == self.incumbent.cfg and t.val_bpb is not None]
        scores = [t.val_bpb for t in runs]
        return (f"mean {self.incumbent_mean:.4f} over {len(runs)} seed(s) "
                f"({', '.join(f'{t.seed}: {t.val_bpb:.4f}' for t in runs)}; spread {max(scores) - min(scores):.4f})")


def read_knowledge(session_dir: Path) -> Knowledge:
    k = Knowledge()
    for run_dir in sorted((session_dir / "runs").glob("[0-9]*")):
        code_file, result_file = run_dir / "train.py", run_dir / "result.json"
        if not code_file.exists():
            continue
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        ok = result.get("verified") and result.get("status") == "completed"
        status = result.get("status", "interrupted")
        # Other work stole steps (and stretched the clock): neither a score nor a failure of the code
        if status in ("completed", "unverified", "timeout") and (result.get("cpu_others") or 0) > CONTENDED:
            ok, status = False, f"contended: other work took {result['cpu_others']:.0%} of the cores"
        k.trials.append(Trial(int(run_dir.name), parse_settings(code_file.read_text()),
                              result.get("seed") or SEED_BASE, result.get("val_bpb") if ok else None,
                              status, result.get("description", "")))
    if not k.trials:
        return k
    # Noise: the widest spread between seeds of any configuration measured more than once
    # (the baseline pair first, then every confirmation), so it only grows as evidence comes in.
    spreads = [max(sc) - min(sc) for sc in (k.scores(c) for c in _distinct(t.cfg for t in k.trials)) if len(sc) >= 2]
    if spreads:
        k.noise = max(MIN_NOISE, *spreads)
    # Replay acceptance in run order: a trial replaces the incumbent only if it beats it by the noise.
    noise = k.noise or MIN_NOISE
    for t in k.trials:
        if t.val_bpb is None:
            continue
        if k.incumbent is None:
            k.incumbent = t
            continue
        mean = sum(k.scores(t.cfg)) / len(k.scores(t.cfg))
        inc_mean = sum(k.scores(k.incumbent.cfg)) / len(k.scores(k.incumbent.cfg))
        if t.cfg != k.incumbent.cfg and mean < inc_mean - noise:
            k.incumbent, k.last_gain = t, inc_mean - mean
    if k.incumbent:
        scores = k.scores(k.incumbent.cfg)
        k.incumbent_mean = sum(scores) / len(scores)
    return k


def _distinct(cfgs) -> list[dict]:
    out: list[dict] = []
    for cfg in cfgs:
        if cfg not in out:
            out.append(cfg)
    return out


class SearchResearcher:
    """A Provider that decides tool calls by reading the session's runs."""

    name = "search"
    STRATEGIES = ("plan", "random")

    def __init__(self, session_dir: Path, strategy: str = "plan", rng_seed: int = 0):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"unknown search strategy {strategy!r}: use one of {', '.join(self.STRATEGIES)}")
        self.session_dir = Path(session_dir)
        self.strategy = strategy
        self.model = f"search-{strategy}"
        self.rng_seed = rng_seed
        self.rng = random.Random(rng_seed)
        self.calls = 0
        self.reported: set[int] = set()

    # --- Provider protocol -----------------------------------------------------
    def complete(self, system, messages, tools) -> ModelReply:
        started = time.monotonic()
        # what came since its last reply: tool results, the harness's notices, the fresh state
        since = []
        for m in reversed(messages):
            if isinstance(m, AssistantMessage):
                break
            since.append(getattr(m, "content", "") or "")
        last = "\n".join(reversed(since))
        k = read_knowledge(self.session_dir)
        calls: list[tuple[str, dict]] = []
        text = ""
        if "The budget is spent" in last:
            calls = [("write_note", {"kind": "conclusion", "text": self.conclusion(k)}),
                     ("finish", {"summary": self.summary(k)})]
        else:
            calls += self.notes_on_new_runs(k)
            proposal = self.propose(k)
            if proposal is None:
                calls += [("write_note", {"kind": "conclusion", "text": self.conclusion(k)}),
                          ("finish", {"summary": "no untried configurations left. " + self.summary(k)})]
            else:
                text, more = proposal
                calls += more
        self.calls += 1
        tool_calls = [ToolCall(id=f"s{self.calls}_{i}", name=n, arguments=a, raw_arguments=json.dumps(a), error=None)
                      for i, (n, a) in enumerate(calls)]
        return ModelReply(text=text, tool_calls=tool_calls, input_tokens=0, output_tokens=0, model=self.model,
                          stop_reason="tool_use", duration_ms=int((time.monotonic() - started) * 1000),
                          request_chars=sum(len(getattr(m, "content", "") or "") for m in messages))

    def best_code(self) -> str | None:
        """train.py of the claimed best configuration (kept by its mean over seeds), for best_train.py."""
        k = read_knowledge(self.session_dir)
        if k.incumbent is None:
            return None
        return (self.session_dir / "runs" / f"{k.incumbent.run_id:03d}" / "train.py").read_text()

    # --- decisions -------------------------------------------------------------
    def notes_on_new_runs(self, k: Knowledge) -> list[tuple[str, dict]]:
        out = []
        for t in k.trials:
            if t.run_id in self.reported or t.run_id == 0:
                self.reported.add(t.run_id)
                continue
            self.reported.add(t.run_id)
            score = f"{t.val_bpb:.4f}" if t.val_bpb is not None else f"no verified score ({t.status})"
            if k.incumbent and k.incumbent.run_id == t.run_id:
                verdict = "kept: new incumbent"
            elif t.val_bpb is None:
                verdict = "failed"
            elif k.incumbent and t.cfg == k.incumbent.cfg:
                verdict = "another seed of the incumbent's configuration"
            else:
                verdict = "discarded"
            inc = f"{k.incumbent_mean:.4f}" if k.incumbent_mean else "-"
            noise = f"{k.noise:.4f}" if k.noise else "not yet measured"
            out.append(("write_note", {"kind": "insight", "text":
                        f"run {t.run_id} ({t.description}): {score}; {verdict}. Incumbent mean {inc}, noise {noise}."}))
        return out

    def runs_left(self, k: Knowledge) -> int | None:
        """Runs the session may still start, from its saved settings (None when unknown)."""
        settings = self.session_dir / "settings.json"
        if not settings.exists():
            return None
        max_runs = json.loads(settings.read_text()).get("budget", {}).get("max_runs")
        return None if max_runs is None else max_runs - len(k.trials)

    def propose(self, k: Knowledge):
        """(thought, tool calls) for the next run, or None when nothing is left to try."""
        if k.incumbent is None:  # nothing measured yet: only a contended baseline is worth running again
            base = k.trials[0] if k.trials else None
            if base is None or not base.status.startswith("contended"):
                return None
            return self._run(base.run_id, {}, "baseline again: run 0 shared its cores with other work",
                             "a fair reference point", k.free_seed(base.cfg, SEED_BASE + 1))
        base, inc = k.trials[0], k.incumbent
        if k.noise is None:  # measure noise first: the baseline with another seed
            return self._run(inc.run_id, {}, "baseline repeated with another seed",
                             "measures run-to-run noise: the two scores differ only by the seed",
                             k.free_seed(inc.cfg, SEED_BASE + 1))
        if self.strategy == "random":
            return self._random(k)
        return (self._confirm(k) or self._probe(k) or self._combine_hidden(k) or self._tpe(k)
                or self._settle(k))

    def _keep_rule(self, k: Knowledge) -> str:
        return f"kept only if it beats the incumbent's mean {k.incumbent_mean:.4f} by more than the noise {k.noise:.4f}"

    def _confirm(self, k: Knowledge):
        """Another seed of an incumbent measured once, when its gain is small or the last run has come."""
        inc = k.incumbent
        if inc.run_id == k.trials[0].run_id or len(k.scores(inc.cfg)) > 1:
            return None
        if k.last_gain is not None and k.last_gain < 2 * k.noise:
            why = f"run {inc.run_id}'s gain is under twice the noise ({k.noise:.4f}); a second seed confirms it"
        elif self.runs_left(k) == 1:
            why = "the last run: the claimed best should be a mean over seeds, not one lucky run"
        else:
            return None
        return self._run(inc.run_id, {}, f"confirm run {inc.run_id} with another seed", why,
                         k.free_seed(inc.cfg, inc.seed + 1))

    def _probe(self, k: Knowledge):
        """The first structural probe no run has tried yet, on the incumbent."""
        inc = k.incumbent
        for changes, why in PROBES:
            if any(all(t.cfg.get(n) == v for n, v in changes.items()) for t in k.trials):
                continue  # tried already (or the incumbent has it)
            if not all(n in inc.cfg for n in changes) or not valid({**inc.cfg, **changes}):
                continue
            return self._run(inc.run_id, changes, "probe: " + changes_text(changes), f"{why}; {self._keep_rule(k)}")
        return None

    def _hidden(self, k: Knowledge) -> list[tuple[dict, float, int]]:
        """Configurations better than the incumbent by less than the noise, best first."""
        return [row for row in k.unresolved(limit=None) if row[1] < k.incumbent_mean]

    def _combine_hidden(self, k: Knowledge):
        """The moves the noise hid, all together, once."""
        combined: dict = {}
        for diff, _, _ in self._hidden(k):
            for name, value in diff.items():  # best first, so each setting keeps its best-looking value
                combined.setdefault(name, value)
        if len(combined) < 2 or not valid({**k.incumbent.cfg, **combined}) or not k.is_new({**k.incumbent.cfg,
                                                                                         **combined}):
            return None
        return self._run(k.incumbent.run_id, combined, "combine " + changes_text(combined),
                         "each looked better than the incumbent by less than the noise; together they may clear "
                         f"it; {self._keep_rule(k)}")

    def _tpe(self, k: Knowledge):
        """Optuna's TPE, fitted to every run so far, proposes a configuration not measured yet."""
        inc = k.incumbent
        cfg = tpe_proposal([(t.cfg, t.val_bpb) for t in k.trials], inc.cfg, seed=self.rng_seed * 1000 + len(k.trials),
                           is_new=k.is_new)
        if cfg is None:
            return None
        changes = {n: v for n, v in cfg.items() if v != inc.cfg.get(n)}
        measured = sorted((t for t in k.trials if t.val_bpb is not None), key=lambda t: t.val_bpb)
        return self._run(inc.run_id, changes, "TPE: " + changes_text(changes),
                         f"Optuna's TPE, fitted to {len(measured)} measured runs, ranks this first of its candidates: "
                         f"likely under the best runs ({', '.join(str(t.run_id) for t in measured[:3])}), unlikely "
                         f"under the rest; {self._keep_rule(k)}")

    def _settle(self, k: Knowledge):
        """Nothing new to propose: spend what is left on the moves the noise hid, seed by seed."""
        for diff, mean, seeds in self._hidden(k):
            if seeds < MAX_SEEDS:
                seed = k.free_seed({**k.incumbent.cfg, **diff}, SEED_BASE + 1)
                return self._run(k.incumbent.run_id, diff, f"{changes_text(diff)} again with seed {seed}",
                                 f"its mean {mean:.4f} over {seeds} seed(s) is within the noise of the incumbent's "
                                 f"{k.incumbent_mean:.4f}; another seed tells whether it is better", seed)
        return None

    def _random(self, k: Knowledge):
        base = k.trials[0]
        for _ in range(200):
            cfg = {**base.cfg, **{n: self.rng.choice(values) for n, values in SPACE.items() if n in base.cfg}}
            if valid(cfg) and k.is_new(cfg):
                changes = {n: v for n, v in cfg.items() if v != base.cfg.get(n)}
                return self._run(base.run_id, changes, "random configuration: " + changes_text(changes),
                                 "random search control")
        return None

    def _run(self, from_run: int, changes: dict, description: str, hypothesis: str, seed: int = SEED_BASE):
        code = (self.session_dir / "runs" / f"{from_run:03d}" / "train.py").read_text()
        calls: list[tuple[str, dict]] = [("restore_run", {"run_id": from_run})]
        for name, value in changes.items():
            line = setting_line(code, name)
            calls.append(("edit_file", {"old_text": line, "new_text": replace_value(line, value)}))
        args = {"description": description, "hypothesis": hypothesis}
        if seed != SEED_BASE:
            args["seed"] = seed
        calls.append(("submit_run", args))
        return f"Next: {description}. {hypothesis}.", calls

    # --- conclusions -------------------------------------------------------------
    def summary(self, k: Knowledge) -> str:
        if not k.incumbent or k.trials[0].val_bpb is None:
            return "no verified result"
        base_scores = k.scores(k.trials[0].cfg)
        base = sum(base_scores) / len(base_scores)
        if k.incumbent.cfg == k.trials[0].cfg:
            return (f"no change beat the baseline (mean {base:.4f} over {len(base_scores)} seed(s)) by more than "
                    f"the noise")
        changed = {name: v for name, v in k.incumbent.cfg.items() if v != k.trials[0].cfg.get(name)}
        return (f"best configuration (run {k.incumbent.run_id}): {k.best_text()} against the baseline's mean "
                f"{base:.4f}; changes: " + changes_text(changed))

    def conclusion(self, k: Knowledge) -> str:
        noise = k.noise or MIN_NOISE
        text = self.summary(k) + f". Noise between seeds: {noise:.4f} bpb."
        close = k.unresolved()
        if close:
            text += (" Within that noise of the best, so neither kept nor ruled out: "
                     + "; ".join(f"{changes_text(diff)} (mean {mean:.4f} over {n_seeds} seed(s))"
                                 for diff, mean, n_seeds in close)
                     + ". More seeds per move or longer runs would settle them.")
        return text + (" Limits of this method: it turns only the settings at the top of train.py, over the values "
                       "listed in agent/planner.py, so it cannot invent a new architecture or loss; each structural "
                       "probe is tried once, on the incumbent of its time, so an idea that helps only in another "
                       "context is left to TPE, whose model of interactions rests on as few points as there were "
                       "runs; a change smaller than the seed noise of one run cannot be told from luck.")
