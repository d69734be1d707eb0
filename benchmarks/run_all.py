"""Run the benchmarks one after another (never side by side: 2 cores) and record their figures.

    python benchmarks/run_all.py                   # everything (about 1.5 hours on 2 cores)
    python benchmarks/run_all.py compressors service

Each benchmark's printed lines go to benchmarks/RESULTS.md under its own
heading, with the date and the machine.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {
    "compressors": ["benchmarks/compressors.py"],
    "evaluation": ["benchmarks/evaluation.py"],
    "service": ["benchmarks/service.py", "180"],
    "request_size": ["benchmarks/request_size.py"],
    "clock_use": ["benchmarks/clock_use.py", "--runs", "5", "--model-secs", "20", "--time-budget", "30"],
    "caching": ["benchmarks/caching.py"],
    "research_12x30": ["benchmarks/research.py", "--runs", "12", "--time-budget", "30", "--seeds", "0", "1", "2"],
    "research_50x60": ["benchmarks/research.py", "--runs", "50", "--time-budget", "60", "--seeds", "0",
                       "--strategies", "search"],
}


def machine() -> str:
    import torch
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
    return (f"{os.cpu_count()} cores ({cpu}), {mem / 2**20:.0f} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}")


def main(names: list[str]) -> None:
    out = ROOT / "benchmarks" / "RESULTS.md"
    for name in names or list(BENCHMARKS):
        started = time.time()
        proc = subprocess.run([sys.executable, *BENCHMARKS[name]], cwd=ROOT, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if not l.startswith(("[", "{"))]
        section = (f"\n## {name}\n\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}; "
                   f"took {(time.time() - started) / 60:.1f} min; exit {proc.returncode}\n\n```\n"
                   + "\n".join(lines + ([proc.stderr.strip()[-1500:]] if proc.returncode else [])) + "\n```\n")
        with open(out, "a") as f:
            f.write(section)
        print(section, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
