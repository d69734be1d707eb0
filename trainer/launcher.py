"""The training sandbox's entry point: `python -I -S launcher.py SPEC`, then train.py in the same process.

It confines itself (trainer/confine.py), imports torch and the fixed `prepare`
module, tells the trusted evaluator that the training clock starts now, and
runs train.py as `__main__`. So the clock starts at the first line of the
agent's code, and the start-up it does not pay for -- Python and torch -- is
spent before any of that code exists: it cannot be spent training.

SPEC adds to confine's: "run_dir" (the script's folder and cwd) and
"handoff_fd" (where the `start` frame goes: the pipe to the evaluator).
"""
import atexit
import json
import os
import runpy
import sys
import traceback

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
    status = 0
    try:
        runpy.run_path(os.path.join(spec["run_dir"], "train.py"), run_name="__main__")
    except SystemExit as exc:  # sys.exit(n) or sys.exit("why"), reported as Python itself would
        if isinstance(exc.code, int) or exc.code is None:
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    # Exit without tearing the interpreter down (torch's modules take about 0.6 s to unload): the
    # run is over, and its atexit handlers and buffered output are all that teardown would add.
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
