"""The picture of a session and its table of runs: progress.png (matplotlib, an optional extra), a plain-text
chart in progress.txt when matplotlib is absent, and results.tsv beside them.

What the picture holds:
- every run's val_bpb at its run id: verified runs as dots, the claimed best configuration's runs as stars,
  unverified runs (flagged by the evaluator) as crosses at the number the harness measured (or the script
  printed), runs that shared their cores as hollow dots;
- runs with no score (crashed, timed out, interrupted) on a strip at the top, one marker each;
- the best verified val_bpb so far as a step line;
- the baseline's mean and the noise band around it (the noise any change had to beat);
- scores far from the rest (beyond 3 interquartile ranges) clipped to the edge, marked with a triangle and
  their value, so one diverged or cheating run does not squash the scale.
"""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from budget.models import RunResult, RunStatus
from logs.claim import Claim, not_evidence

PNG, TEXT, TSV = "progress.png", "progress.txt", "results.tsv"
TSV_COLUMNS = ("id", "status", "verified", "val_bpb", "steps", "seconds", "cpu_others", "description")
NO_SCORE = {RunStatus.crashed: ("crashed", "X", "#d62728"), RunStatus.timeout: ("timed out", "s", "#9467bd"),
            RunStatus.interrupted: ("interrupted", "D", "#7f7f7f"), RunStatus.running: ("running", "o", "#17becf")}
CLIP_IQRS = 3.0


def results_tsv(runs: list[RunResult]) -> str:
    """One line per run; `seconds` is the training clock (train.py's first line to evaluate_bpb)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(TSV_COLUMNS)
    number = lambda v, d: "" if v is None else f"{v:.{d}f}"
    for r in runs:
        writer.writerow([r.run_id, r.status.value, str(r.verified).lower(), number(r.val_bpb, 6),
                         "" if r.total_steps is None else r.total_steps, number(r.training_secs, 1),
                         number(r.cpu_others, 3), " ".join(r.description.split())])
    return buffer.getvalue()


def shown_value(r: RunResult) -> float | None:
    """The number a run is drawn at: the harness's, else (unverified) what the script printed."""
    if r.val_bpb is not None:
        return r.val_bpb
    return r.reported_val_bpb if r.status == RunStatus.unverified else None


def best_so_far(runs: list[RunResult]) -> list[tuple[int, float]]:
    """(run id, best verified val_bpb up to it) for each run from the first verified one on."""
    out, best = [], None
    for r in runs:
        if not_evidence(r) is None and (best is None or r.val_bpb < best):
            best = r.val_bpb
        if best is not None:
            out.append((r.run_id, best))
    return out


def scale(values: list[float], band: tuple[float, float] | None) -> tuple[float, float]:
    """The y range: every value but the far outliers (beyond CLIP_IQRS interquartile ranges), and the band."""
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")  # exclusive widens them at few points
        spread = max(q3 - q1, 0.01)
        kept = [v for v in values if q1 - CLIP_IQRS * spread <= v <= q3 + CLIP_IQRS * spread]
    else:
        kept = list(values)
    lo, hi = min(kept + list(band or ())), max(kept + list(band or ()))
    pad = max(hi - lo, 0.01) * 0.08
    return lo - pad, hi + pad


def draw_png(runs: list[RunResult], claim: Claim, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    try:
        _draw(ax, runs, claim)
        ax.set_title(title, fontsize=11)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _draw(ax, runs: list[RunResult], claim: Claim) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("run")
    ax.set_ylabel("val_bpb (bits per byte, lower is better)")
    ax.grid(True, alpha=0.25)
    base = claim.baseline.mean if claim.baseline and claim.baseline.scores else None
    band = (base - claim.noise, base + claim.noise) if base is not None else None
    valued = [(r, shown_value(r)) for r in runs if shown_value(r) is not None]
    lo, hi = scale([v for _, v in valued], band) if valued or band else (0.0, 1.0)
    unscored = [r for r in runs if shown_value(r) is None]
    top_strip = hi + (hi - lo) * 0.06  # where runs without a score are drawn
    ax.set_ylim(lo, top_strip + (hi - lo) * 0.06 if unscored else hi)
    ax.set_xlim(-0.7, max((r.run_id for r in runs), default=0) + 0.7)
    if band:
        noise = f"noise {claim.noise:.4f}" + ("" if claim.noise_measured else " (assumed: not measured)")
        ax.axhspan(*band, color="#2ca02c", alpha=0.12, label=f"baseline ± {noise}")
        ax.axhline(base, color="#2ca02c", lw=1, ls="--", label=f"baseline mean {base:.4f}")
    steps = best_so_far(runs)
    if steps:
        xs, ys = [x for x, _ in steps], [y for _, y in steps]
        ax.step(xs + [xs[-1] + 0.5], ys + [ys[-1]], where="post", color="#1f77b4", lw=2,
                label="best verified so far")
    best_runs = set(claim.best.scored_runs) if claim.best else set()
    groups: dict[str, tuple[list, list, dict]] = {}

    def put(label, x, y, **style):
        groups.setdefault(label, ([], [], style))[0].append(x)
        groups[label][1].append(y)

    clipped = []
    for r, v in valued:
        y = min(max(v, lo), hi)
        if y != v:
            clipped.append((r.run_id, v, y))
        reason = not_evidence(r)
        if r.run_id in best_runs:
            put("claimed best configuration", r.run_id, y, marker="*", s=170, color="#ff7f0e", edgecolors="black",
                linewidths=0.6, zorder=4)
        elif reason is None:
            put("verified", r.run_id, y, marker="o", s=36, color="#1f77b4", zorder=3)
        elif reason.startswith("contended"):
            put("verified, shared its cores (not evidence)", r.run_id, y, marker="o", s=36, facecolors="none",
                edgecolors="#1f77b4", zorder=3)
        else:
            put("unverified (flagged; its number)", r.run_id, y, marker="x", s=50, color="#e377c2", zorder=3)
    for r in unscored:
        name, marker, color = NO_SCORE.get(r.status, (r.status.value, "P", "#8c564b"))
        put(f"{name} (no score; top strip)", r.run_id, top_strip, marker=marker, s=50, color=color, zorder=3)
    for label, (xs, ys, style) in groups.items():
        ax.scatter(xs, ys, label=label, **style)
    for i, (x, v, y) in enumerate(clipped):
        ax.scatter([x], [y], marker="^" if v > y else "v", s=90, facecolors="none", edgecolors="black", zorder=5,
                   label="clipped: off the scale (value beside)" if i == 0 else None)
        ax.annotate(f"{v:.3f}", (x, y), textcoords="offset points", xytext=(6, -10 if v > y else 6), fontsize=7)
    if unscored:
        ax.axhline(hi, color="grey", lw=0.5)  # the scale ends here; above: runs without a score


def text_chart(runs: list[RunResult], claim: Claim, width: int = 40) -> str:
    """The plain-text picture: one line per run, a bar for its val_bpb, the best-so-far and its marks."""
    valued = [shown_value(r) for r in runs if shown_value(r) is not None]
    lo, hi = scale(valued, None) if valued else (0.0, 1.0)
    best = dict(best_so_far(runs))
    best_runs = set(claim.best.scored_runs) if claim.best else set()
    lines = [claim.sentence(), "", f"{'run':>4}  {'val_bpb':>8}  {'best':>8}  {'':<{width}}  mark"]
    for r in runs:
        v = shown_value(r)
        reason = not_evidence(r)
        mark = ("claimed best" if r.run_id in best_runs else "" if reason is None else reason)
        if v is None:
            bar = "?" * 3
        else:
            clipped = v > hi or v < lo
            bar = "#" * max(1, round((min(max(v, lo), hi) - lo) / (hi - lo) * width)) + (">" if v > hi else "")
            mark = (mark + ", " if mark else "") + ("clipped" if clipped else "")
        b = best.get(r.run_id)
        lines.append(f"{r.run_id:>4}  {'-' if v is None else f'{v:.4f}':>8}  {'' if b is None else f'{b:.4f}':>8}  "
                     f"{bar:<{width}}  {mark.strip(', ')}")
    lines.append(f"\nbars: val_bpb from {lo:.4f} (empty) to {hi:.4f} (full); lower is better")
    return "\n".join(lines) + "\n"


def draw_progress(session_dir: Path, runs: list[RunResult], claim: Claim) -> tuple[Path, str | None]:
    """Write results.tsv and progress.png (or progress.txt without matplotlib); (the picture's path, a note)."""
    session_dir = Path(session_dir)
    (session_dir / TSV).write_text(results_tsv(runs))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        (session_dir / TEXT).write_text(text_chart(runs, claim))
        return session_dir / TEXT, ("progress.png not drawn: matplotlib is not installed (pip install -e '.[plot]'); "
                                    f"a text chart is in {session_dir / TEXT}")
    draw_png(runs, claim, session_dir / PNG, f"session {session_dir.name}: val_bpb per run")
    return session_dir / PNG, None
