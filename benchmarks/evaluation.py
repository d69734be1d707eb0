"""Trusted evaluation against in-process evaluate_bpb on the same (baseline) model, side by side.

In-process: prepare.evaluate_bpb(model, 8) in this process.
Trusted: a sandboxed run whose script builds the same model and hands it over;
the harness records the evaluation from the hand-off to the number (freezing
the model, a fresh process per frame in the evaluation sandbox, scoring, the
audit). Eval time does not depend on the weights.
"""
from __future__ import annotations

import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "trainer"))

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.argv = ["baseline"]
    import baseline_train as b
    from prepare import evaluate_bpb
    print(json.dumps({"val_bpb": evaluate_bpb(b.GPT(), 8)}))
""")


def main(repeats: int = 3) -> dict:
    from benchmarks.baseline import eval_seconds
    from trainer.corpus import ensure_corpus
    from trainer.evaluator import AUDIT_SHARE
    from trainer.sandbox import execute_run

    in_process = eval_seconds(repeats)
    corpus = ensure_corpus()
    trusted = []
    with tempfile.TemporaryDirectory() as tmp:
        code = (ROOT / "trainer" / "baseline_train.py").read_text().replace('if __name__ == "__main__":\n    main()', "")
        for i in range(repeats):
            run_dir = Path(tmp) / f"r{i}"
            run_dir.mkdir()
            # the model module travels as part of train.py: baseline settings and classes, then the timing script
            result = execute_run(i, code + "\n" + SCRIPT.replace("import baseline_train as b", "b = sys.modules[__name__]"),
                                 run_dir, data_dir=corpus.directory, time_budget=30, timeout=120)
            assert result.verified, result.reasons
            trusted.append(result.eval_secs)
    ratio = min(trusted) / in_process
    print(f"in-process evaluate_bpb: {in_process:.2f} s; trusted (hand-off, fresh process per frame, scoring + "
          f"audit of {AUDIT_SHARE:.0%} of the windows): "
          f"{min(trusted):.2f} s; ratio {ratio:.2f}x (target <= 2x)")
    return {"in_process_secs": round(in_process, 3), "trusted_secs": round(min(trusted), 3), "ratio": round(ratio, 2)}


if __name__ == "__main__":
    main()
