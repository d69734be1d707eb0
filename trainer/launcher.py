"""The training sandbox's entry point: `python -I -S launcher.py SPEC`, then train.py in the same process.

It confines itself (trainer/confine.py), imports torch and the fixed `prepare`
module, tells the trusted evaluator that the training clock starts now, and
runs train.py as `__main__`. So the clock starts at the first line of the
agent's code, and the start-up it does not pay for -- Python and torch -- is
spent before any of that code exists: it cannot be spent training.

SPEC adds to confine's: "run_dir" (the script's folder and cwd) and
"handoff_fd" (where the `start` frame goes: the pipe to the evaluator).
"""
import json
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, HERE)
    from confine import confine, enable_site_packages
    confine(spec)
    sys.path.remove(HERE)
    enable_site_packages()
    sys.path.insert(0, spec["run_dir"])
    import torch  # noqa: F401  (imported before the clock starts)
    import torch._dynamo  # noqa: F401  (what the first optimizer a script makes imports: about 1 s)
    import prepare
    prepare.send_frame(spec["handoff_fd"], {"op": "start"})
    sys.argv = ["train.py"]
    runpy.run_path(os.path.join(spec["run_dir"], "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
