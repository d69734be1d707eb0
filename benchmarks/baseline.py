"""The baseline trainer at the default budget, and the cost of evaluate_bpb on its model.

Prints steps, tokens/s and val_bpb of one baseline run (in-process evaluation,
no sandbox), and the seconds `prepare.evaluate_bpb` takes for the 131,072
eval bytes on the baseline architecture (eval time does not depend on the weights).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))  # so baseline_train's `from prepare import ...` resolves


def eval_seconds(repeats: int = 3) -> float:
    import prepare
    spec = importlib.util.spec_from_file_location("baseline_train", ROOT / "trainer" / "baseline_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.GPT()
    prepare.evaluate_bpb(model, 8)  # warm-up: loads val, first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prepare.evaluate_bpb(model, 8)
        times.append(time.perf_counter() - t0)
    return min(times)


def baseline_run(budget: float) -> dict:
    env = {**os.environ, "PGOLF_TIME_BUDGET": str(budget)}
    proc = subprocess.run([sys.executable, str(ROOT / "trainer" / "baseline_train.py")], env=env,
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["tokens_per_sec"] = round(out["total_steps"] * 8 * 256 / out["training_time_secs"])
    return out


def main(budget: float = 180) -> dict:
    result = {"evaluate_bpb_secs": round(eval_seconds(), 3)}
    print(f"evaluate_bpb on the baseline model: {result['evaluate_bpb_secs']:.2f} s for 131,072 bytes")
    run = baseline_run(budget)
    print(f"baseline at {budget:g} s: {run['total_steps']} steps, {run['tokens_per_sec']} tok/s, "
          f"val_bpb {run['val_bpb']:.4f}")
    result["baseline"] = run
    return result


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 180)
