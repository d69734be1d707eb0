"""A dependency-free SVG plot of val_bpb per run, with the best-so-far line."""
from __future__ import annotations

from budget.models import RunResult


def plot_svg(runs: list[RunResult], width: int = 720, height: int = 360) -> str:
    points = [(r.run_id, r.val_bpb, r.counts_as_best) for r in runs if r.val_bpb is not None]
    pad_l, pad_r, pad_t, pad_b = 60, 20, 30, 40
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="18" text-anchor="middle">val_bpb per run (green: best verified so far)</text>']
    if not points:
        svg.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no scored runs</text></svg>')
        return "\n".join(svg)
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-3)
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
    sx = lambda x: pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)
    sy = lambda y: height - pad_b - (y - y0) / (y1 - y0) * (height - pad_t - pad_b)
    svg.append(f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="black"/>')
    svg.append(f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="black"/>')
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        svg.append(f'<text x="{pad_l - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3f}</text>')
    svg.append(f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">run</text>')
    best, path = None, []
    for x, y, ok in points:
        if ok and (best is None or y < best):
            best = y
        if best is not None:
            path.append(f"{sx(x):.1f},{sy(best):.1f}")
        color = "#1f77b4" if ok else "#d62728"
        svg.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"><title>run {x}: {y:.4f}</title></circle>')
    if path:
        svg.append(f'<polyline points="{" ".join(path)}" fill="none" stroke="green" stroke-width="2"/>')
    svg.append("</svg>")
    return "\n".join(svg)
