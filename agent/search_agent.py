"""The offline researcher: no model, no network, the same tools an LLM uses.

It edits one setting line of train.py per run and keeps a change only when it
beats the incumbent by more than the measured run-to-run noise. It is
stateless: every decision is recomputed from the runs on disk, so a resumed
session continues where it stopped.

Method:
1. Run 0 (the baseline) is repeated with another seed to measure noise; the
   noise is the widest spread between seeds seen so far, so every later
   confirmation can raise it.
2. Coarse moves, one setting at a time in order of expected effect
   (schedule, depth, width, learning rate, batch, ...): a step each way.
   An accepted move becomes the incumbent and the same setting is pushed
   further in that direction before moving on.
3. Fine moves (x1.41, x0.71) around the incumbent, then finer (x1.19, x0.84).
4. An improvement smaller than twice the noise is confirmed with another seed.
5. When every move is tried, the runs left go to the moves the noise hid
   (better than the incumbent, but by less than the noise): first all of them
   together, then each with more seeds, best first.
A configuration (settings + seed) is never run twice. A run that shared its
cores with other work (trainer/contention.py) got fewer steps than its code
deserves; it counts as failed, so it neither sets the noise nor wins.
`strategy="random"` samples settings uniformly instead: the control for the
benchmark.
"""
from __future__ import annotations

import ast
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.providers.base import ModelReply, ToolCall
from trainer.contention import CONTENDED

SETTING_LINE = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*) = (?P<value>[^#\n]+?)(?P<comment>\s+#.*)?$", re.M)
MIN_NOISE = 0.003
MAX_SEEDS = 3  # seeds a configuration the noise hid gets before it is left unresolved
SEED_BASE = 42

# setting -> (kind, coarse moves, fine moves); "mul" multiplies, "add" adds, "set" picks values.
MOVES: dict[str, tuple[str, list, list]] = {
    "lr_schedule": ("set", ["linear", "cosine"], []),
    "n_layers": ("add", [-1, 1], [-2, 2]),  # depth first: at short budgets fewer, wider layers train faster
    "d_model": ("add", [32, -16], [16, -8]),
    "learning_rate": ("mul", [2.0, 0.5], [1.41, 0.71, 1.19, 0.84]),
    "batch_size": ("mul", [2.0, 0.5], [1.5, 0.75]),
    "d_ff": ("mul", [2.0, 0.5], [1.5, 0.75]),
    "n_history": ("add", [2, -2], [1, -1]),
    "warmup_steps": ("mul", [4.0, 0.25], [2.0, 0.5]),
    "rope_theta": ("mul", [10.0, 0.1], [3.0, 0.33]),
    "weight_decay": ("mul", [0.0, 2.0], [0.5]),
    "beta2": ("set", [0.99, 0.9], []),
    "n_heads": ("set", [2, 8], []),
    "grad_clip": ("set", [0.5, 0.0], []),
}
# Values random search samples from: the same neighbourhood the moves reach.
RANDOM_SPACE: dict[str, list] = {
    "lr_schedule": ["constant", "linear", "cosine"],
    "learning_rate": [1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3, 6e-3, 8e-3, 1.2e-2],
    "batch_size": [4, 6, 8, 12, 16, 24, 32],
    "d_model": [48, 64, 80, 96, 112, 128],
    "n_layers": [1, 2, 3, 4, 5],
    "d_ff": [128, 192, 256, 384, 512],
    "n_history": [0, 1, 2, 3, 4, 5],
    "warmup_steps": [5, 10, 20, 40, 80],
    "rope_theta": [10.0, 30.0, 100.0, 300.0, 1000.0, 10000.0],
    "weight_decay": [0.0, 0.05, 0.1, 0.2],
    "beta2": [0.9, 0.95, 0.99],
    "n_heads": [2, 4, 8],
    "grad_clip": [0.0, 0.5, 1.0],
}


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
    return f"{m['name']} = {literal}{m['comment'] or ''}"


def changes_text(changes: dict) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in changes.items())


def valid(cfg: dict) -> bool:
    d, h = cfg.get("d_model", 80), cfg.get("n_heads", 4)
    return (d % h == 0 and (d // h) % 2 == 0 and cfg.get("n_layers", 1) >= 1 and cfg.get("batch_size", 1) >= 1
            and cfg.get("d_ff", 1) >= 8 and cfg.get("n_history", 0) >= 0 and cfg.get("warmup_steps", 0) >= 1
            and cfg.get("learning_rate", 1) > 0)


def moved(cfg: dict, name: str, kind: str, move):
    value = cfg[name]
    if kind == "set":
        return move
    if kind == "add":
        return value + move
    new = value * move
    return int(round(new)) if isinstance(value, int) else round(new, 8)


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


def read_knowledge(session_dir: Path) -> Knowledge:
    k = Knowledge()
    for run_dir in sorted((session_dir / "runs").glob("[0-9]*")):
        code_file, result_file = run_dir / "train.py", run_dir / "result.json"
        if not code_file.exists():
            continue
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        ok = result.get("verified") and result.get("status") == "completed"
        status = result.get("status", "interrupted")
        if ok and (result.get("cpu_others") or 0) > CONTENDED:  # other work stole steps: not a fair measurement
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

    def __init__(self, session_dir: Path, strategy: str = "coordinate", rng_seed: int = 0):
        if strategy not in ("coordinate", "random"):
            raise ValueError(f"unknown search strategy {strategy!r}: use 'coordinate' or 'random'")
        self.session_dir = Path(session_dir)
        self.strategy = strategy
        self.model = f"search-{strategy}"
        self.rng = random.Random(rng_seed)
        self.calls = 0
        self.reported: set[int] = set()

    # --- Provider protocol -----------------------------------------------------
    def complete(self, system, messages, tools) -> ModelReply:
        started = time.monotonic()
        last = messages[-1].content if messages and hasattr(messages[-1], "content") else ""
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
                          ("finish", {"summary": "no untried moves left. " + self.summary(k)})]
            else:
                text, more = proposal
                calls += more
        self.calls += 1
        tool_calls = [ToolCall(id=f"s{self.calls}_{i}", name=n, arguments=a, raw_arguments=json.dumps(a), error=None)
                      for i, (n, a) in enumerate(calls)]
        return ModelReply(text=text, tool_calls=tool_calls, input_tokens=0, output_tokens=0, model=self.model,
                          stop_reason="tool_use", duration_ms=int((time.monotonic() - started) * 1000),
                          request_chars=sum(len(getattr(m, "content", "") or "") for m in messages))

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

    def propose(self, k: Knowledge):
        """(thought, tool calls) for the next run, or None when nothing is left to try."""
        if k.incumbent is None:  # nothing measured yet: only a contended baseline is worth running again
            base = k.trials[0] if k.trials else None
            if base is None or not base.status.startswith("contended"):
                return None
            return self._run(base.run_id, None, None, k.free_seed(base.cfg, SEED_BASE + 1),
                             "baseline again: run 0 shared its cores with other work", "a fair reference point")
        base, inc = k.trials[0], k.incumbent
        if k.noise is None:  # measure noise first: the baseline with another seed
            seed = k.free_seed(inc.cfg, SEED_BASE + 1)
            return self._run(inc.run_id, None, None, seed, "baseline repeated with another seed",
                             "measures run-to-run noise: the two scores differ only by the seed")
        scores = k.scores(inc.cfg)
        if (self.strategy != "random" and inc.run_id != base.run_id and len(scores) == 1
                and k.last_gain is not None and k.last_gain < 2 * k.noise):
            seed = k.free_seed(inc.cfg, inc.seed + 1)
            return self._run(inc.run_id, None, None, seed, f"confirm run {inc.run_id} with another seed",
                             f"run {inc.run_id}'s gain is under twice the noise ({k.noise:.4f}); a second seed confirms it")
        attempted = k.attempted()
        if self.strategy == "random":
            return self._random(k, attempted)
        tried_values = {(name, json.dumps(t.cfg.get(name), default=str)) for t in k.trials for name in MOVES}
        for phase in (1, 2):
            for name, (kind, coarse, fine) in MOVES.items():
                if name not in inc.cfg:
                    continue
                for move in (coarse if phase == 1 else fine):
                    value = moved(inc.cfg, name, kind, move)
                    cfg = {**inc.cfg, name: value}
                    if value == inc.cfg[name] or not valid(cfg) or (name, json.dumps(value, default=str)) in tried_values:
                        continue
                    if k.key(cfg, SEED_BASE) in attempted:
                        continue
                    return self._run(inc.run_id, name, value, SEED_BASE,
                                     f"{name} {inc.cfg[name]!r} -> {value!r}",
                                     f"{'coarse' if phase == 1 else 'fine'} move of {name} from the incumbent "
                                     f"(run {inc.run_id}); kept only if it beats {k.incumbent_mean:.4f} by more "
                                     f"than the noise {k.noise:.4f}")
        return self._settle(k)

    def _settle(self, k: Knowledge):
        """Every move is tried: spend what is left on the moves the noise hid, together, then seed by seed."""
        inc = k.incumbent
        hidden = [row for row in k.unresolved(limit=None) if row[1] < k.incumbent_mean]
        combined: dict = {}
        for diff, _, _ in hidden:  # best first, so each setting keeps its best-looking value
            if len(diff) == 1:
                name, value = next(iter(diff.items()))
                combined.setdefault(name, value)
        cfg = {**inc.cfg, **combined}
        if len(combined) >= 2 and valid(cfg) and k.key(cfg, SEED_BASE) not in k.attempted():
            return self._run_many(inc.run_id, combined, "combine " + changes_text(combined),
                                  "each looked better than the incumbent by less than the noise; together they "
                                  "may clear it")
        for diff, mean, seeds in hidden:
            if seeds < MAX_SEEDS:
                seed = k.free_seed({**inc.cfg, **diff}, SEED_BASE + 1)
                return self._run_many(inc.run_id, diff, f"{changes_text(diff)} again with seed {seed}",
                                      f"its mean {mean:.4f} over {seeds} seed(s) is within the noise of the incumbent's "
                                      f"{k.incumbent_mean:.4f}; another seed tells whether it is better", seed)
        return None

    def _random(self, k: Knowledge, attempted: set[str]):
        base = k.trials[0]
        for _ in range(200):
            cfg = dict(base.cfg)
            for name, values in RANDOM_SPACE.items():
                if name in cfg:
                    cfg[name] = self.rng.choice(values)
            if valid(cfg) and k.key(cfg, SEED_BASE) not in attempted:
                changes = {n: v for n, v in cfg.items() if v != base.cfg.get(n)}
                return self._run_many(base.run_id, changes, "random configuration: " + changes_text(changes),
                                      "random search control")
        return None

    def _run(self, from_run: int, name: str | None, value, seed: int, description: str, hypothesis: str):
        changes = {name: value} if name else {}
        return self._run_many(from_run, changes, description, hypothesis, seed)

    def _run_many(self, from_run: int, changes: dict, description: str, hypothesis: str, seed: int = SEED_BASE):
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
        n = len(k.scores(k.incumbent.cfg))
        if k.incumbent.cfg == k.trials[0].cfg:
            return (f"no change beat the baseline (mean {base:.4f} over {len(base_scores)} seed(s)) by more than "
                    f"the noise")
        changed = {name: v for name, v in k.incumbent.cfg.items() if v != k.trials[0].cfg.get(name)}
        return (f"best configuration (run {k.incumbent.run_id}, mean {k.incumbent_mean:.4f} over {n} seed(s)) "
                f"against the baseline's mean {base:.4f}; changes: "
                + changes_text(changed))

    def conclusion(self, k: Knowledge) -> str:
        noise = k.noise or MIN_NOISE
        text = self.summary(k) + f". Noise between seeds: {noise:.4f} bpb."
        close = k.unresolved()
        if close:
            text += (" Within that noise of the best, so neither kept nor ruled out: "
                     + "; ".join(f"{changes_text(diff)} (mean {mean:.4f} over {n_seeds} seed(s))"
                                 for diff, mean, n_seeds in close)
                     + ". More seeds per move or longer runs would settle them.")
        return text + (" Limits of this method: it only moves the numbered settings at the top of train.py, one at a "
                       "time (and the hidden moves together once all are tried), so it cannot change the architecture "
                       "(attention variant, normalisation, optimiser) and sees few interactions between settings; each "
                       "accepted move costs runs that an informed researcher would skip.")

