"""The training service: harness overhead per run and memory of the idle service (Ray included).

    python benchmarks/service.py [TIME_BUDGET]

Overhead = wall time from submit to result minus the training seconds the
harness measured (script start to evaluate_bpb). Memory = RSS and PSS summed
over the driver and every process it started (Ray's included), right after
the service opens and again after the run.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tree(pid: int) -> set[int]:
    out, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                for c in map(int, children):
                    if c not in out:
                        out.add(c)
                        todo.append(c)
        except OSError:
            pass
    return out


def memory_mib() -> tuple[float, float, int]:
    rss = pss = 0
    pids = tree(os.getpid())
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024, len(pids)


def main(time_budget: float = 180) -> dict:
    from budget.models import Budget, RunRequest, ServiceSettings
    from budget.service import TrainingService
    from trainer.verdict import default_clock_grace

    code = (ROOT / "trainer" / "baseline_train.py").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        budget = Budget(time_budget_secs=time_budget, run_timeout_secs=time_budget + 30)
        with TrainingService(ServiceSettings(session_dir=Path(tmp) / "s", budget=budget)) as service:
            time.sleep(2)
            idle = memory_mib()
            t0, submitted = time.monotonic(), datetime.now(timezone.utc)
            r = service.submit(RunRequest(train_code=code, description="baseline"), wait=True)
            wall = time.monotonic() - t0
            received = datetime.now(timezone.utc)
            after = memory_mib()
    overhead = wall - r.training_secs
    print(f"baseline at {time_budget:g} s through the service: val_bpb {r.val_bpb:.4f} (verified {r.verified}), "
          f"{r.total_steps} steps, {r.total_steps * 8 * 256 / time_budget:.0f} tok/s, cpu_others {r.cpu_others:.2f}")
    print(f"harness overhead: {wall:.1f} s submit-to-result - {r.training_secs:.1f} s training clock = "
          f"{overhead:.1f} s, of which {r.startup_secs:.1f} s start-up before the clock (sandbox, Python, torch) "
          f"and {r.eval_secs:.1f} s trusted evaluation; submit-to-result - TIME_BUDGET = {wall - time_budget:.1f} s")
    # where the overhead goes: before the sandbox starts, inside the run but off the clock, after it
    before = (r.started_at - submitted).total_seconds()
    after_eval = r.wall_secs - r.startup_secs - r.training_secs - r.eval_secs
    recorded = (received - r.finished_at).total_seconds()
    print(f"overhead by phase: {before:.2f} s submit to sandbox start (Ray dispatch), {r.startup_secs:.2f} s start-up, "
          f"{r.eval_secs:.2f} s evaluation, {after_eval:.2f} s from the number to the outcome (script exit, "
          f"clean-up), {recorded:.2f} s outcome to result (recording, Ray)")
    grace = default_clock_grace(time_budget)
    used = r.training_secs + r.slowest_frame_secs - time_budget
    print(f"clock: {r.training_secs:.2f} s to evaluate_bpb + {r.slowest_frame_secs:.2f} s slowest frame = "
          f"{used:+.2f} s past TIME_BUDGET, of the {grace:g} s grace")
    print(f"idle service memory: RSS {idle[0]:.0f} MiB, PSS {idle[1]:.0f} MiB over {idle[2]} processes; "
          f"after one run: RSS {after[0]:.0f} MiB, PSS {after[1]:.0f} MiB")
    return {"val_bpb": r.val_bpb, "steps": r.total_steps, "overhead_secs": round(overhead, 1),
            "startup_secs": r.startup_secs, "dispatch_secs": round(before, 2), "after_eval_secs": round(after_eval, 2),
            "record_secs": round(recorded, 2), "eval_secs": r.eval_secs, "grace_used_secs": round(used, 2),
            "idle_rss_mib": round(idle[0]), "idle_pss_mib": round(idle[1])}


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 180)
