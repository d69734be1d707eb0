"""The evaluation sandbox's entry point: serves a frozen model's logits, one fresh process per frame.

`python -I -S eval_server.py SPEC` confines itself (trainer/confine.py, not
dumpable, so nothing it forks can read or patch it), imports torch and
cloudpickle, and waits. The trusted evaluator then sends, over the pipes in
SPEC ("request_fd", "reply_fd", "report_fd"; "pid_namespace": whether the sandbox has its own;
"scratch_dir"):

  snapshot  the model as the script handed it over (cloudpickle bytes), its device, its vocabulary
            size, and the batch size the script passed (a frame reaches the model in calls of that many rows)
  forward   windows [n, T] of ids (uint8 bytes, or int32 subword ids); answered with `logits`
            float32 [n, T, vocab] (or `error`)
  end

and, on a third pipe that only the server holds ("report_fd"), reports after every frame the CPU
time the frame's processes used (`frame` with "cpu_secs"): a frame could train the snapshot before
it answers, so that time counts on the run's training clock.

Every `forward` is served by a new child forked from this server, which has
never run model code: the child loads the snapshot, computes the logits,
sends them and exits; then the server kills whatever is left in the sandbox
before it reads the next request. Nothing a child does -- memory, threads,
processes -- reaches the next frame, and the sandbox has no writable file
and no IPC: the logits of a frame are a function of its windows and the
snapshot alone. (The one writable place, a small temporary folder that
libraries expect, is emptied between frames.)

The child's stdout and stderr are /dev/null: it holds validation windows, and
nothing of them may reach a log the researcher reads.
"""
import ctypes
import json
import os
import resource
import shutil
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_PR_SET_CHILD_SUBREAPER = 36


def main() -> None:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, HERE)
    from confine import confine, enable_site_packages
    confine({**spec, "dumpable": False})
    enable_site_packages()
    import cloudpickle
    import torch
    import torch._dynamo  # noqa: F401  (imported by the first optimizer a model makes: about 1 s per frame)

    import prepare  # from HERE: the same fixed module the run imported, as pickles refer to it
    rfd, wfd, report_fd = spec["request_fd"], spec["reply_fd"], spec["report_fd"]
    own_pid_namespace = spec["pid_namespace"]
    # Orphans of a frame become this process's children, so their CPU time is counted when reaped
    ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1)
    spent = _children_cpu()
    header, snapshot = prepare.recv_frame(rfd)
    device, batch = str(header.get("device") or "cpu"), int(header.get("batch") or 1)
    vocab = int(header.get("vocab") or prepare.VOCAB_SIZE)
    while True:
        header, payload = prepare.recv_frame(rfd)
        if header["op"] != "forward":
            return
        n, t = header["shape"]
        dtype = getattr(torch, header.get("dtype", "uint8"))
        child = os.fork()
        if child == 0:
            os.close(report_fd)  # the frame's report is this server's to write, never the child's
            _serve_frame(rfd, wfd, snapshot, payload, (n, t, dtype, vocab, batch), device, cloudpickle, torch, prepare)
        os.waitpid(child, 0)
        _kill_the_rest(child, own_pid_namespace)
        _empty(spec["scratch_dir"])
        before, spent = spent, _children_cpu()
        prepare.send_frame(report_fd, {"op": "frame", "cpu_secs": spent - before})


def _serve_frame(rfd, wfd, snapshot, payload, frame, device, cloudpickle, torch, prepare) -> None:
    code = 1
    try:
        os.close(rfd)  # the next request is not this child's to read
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.setpgid(0, 0)
        n, t, dtype, vocab, batch = frame
        x = torch.frombuffer(bytearray(payload), dtype=dtype).long().view(n, t)
        try:
            model = cloudpickle.loads(snapshot)
            if hasattr(model, "eval"):
                model.eval()
            with torch.no_grad():
                logits = torch.cat([prepare.logits_of(model, rows.to(device), vocab) for rows in x.split(batch)])
        except BaseException as exc:
            # Only the kind leaves the frame: its message could carry validation text (the evaluator
            # names the kind only when it is a built-in exception)
            prepare.send_frame(wfd, {"op": "error", "kind": type(exc).__name__[:60]})
        else:
            prepare.send_frame(wfd, {"op": "logits", "shape": list(logits.shape)}, logits.numpy())
            code = 0
    finally:
        os._exit(code)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _kill_the_rest(child: int, own_pid_namespace: bool) -> None:
    """Nothing a frame started may live on into the next one."""
    if own_pid_namespace:
        try:
            os.kill(-1, signal.SIGKILL)  # every process of the sandbox but this one (and its init)
        except ProcessLookupError:
            pass
    else:  # without the sandbox: the child's process group
        try:
            os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break


def _empty(folder: str) -> None:
    """The one writable folder (libraries want a temporary directory) starts every frame empty."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


if __name__ == "__main__":
    main()
