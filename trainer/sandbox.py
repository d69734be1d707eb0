"""Run one train.py: train it in a sandbox, score its frozen model in another, return a plain outcome.

    execute_run
      training sandbox   trainer/launcher.py, then train.py (trainer/bubblewrap.py)
      trusted evaluator  a thread here (trainer/evaluator.py)
      evaluation sandbox trainer/eval_server.py, started beside training, used after the hand-off

Caps, set by the launcher before train.py's first line:
- memory: RLIMIT_DATA = memory_mb per process (a hard allocation failure), and a watchdog that stops
  the run when the proportional set size (PSS) of all its processes plus what its private /tmp and
  /dev/shm hold exceeds memory_mb (forked children cannot multiply the cap, tmpfs cannot hide from it),
  and, where one can be made, a memory cgroup per sandbox at CGROUP_HEADROOM x memory_mb that holds
  the cap between two looks (trainer/cgroup.py);
- disk: everything in the run's folder together at most disk_mb (the watchdog; RLIMIT_FSIZE for a
  single file), and nothing but the recorded outputs is kept after the run;
- processes: RLIMIT_NPROC = max_procs tasks (processes and threads), and the watchdog's count;
- the seccomp filter of trainer/seccomp.py.

The run ends when the script exits, at `timeout` seconds of wall clock (training and evaluation),
when `cancel_event` is set, or when a cap is hit; every way ends with SIGKILL to every process of
both sandboxes, then a check that none survived.

Output after the hand-off is not kept: the logs are cut where they stood when the model was handed
over; only the numbers of the script's final JSON line are read from what followed.

sandbox=False keeps the scrubbed environment, the caps, the seccomp filter, the watchdog and the
clean-up, and loses the rest: the script sees the host's files and network, RLIMIT_NPROC does not
bind a root harness (the watchdog's count remains), and a process that left the run's session
survives a kill -9 of the harness.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from trainer import bubblewrap, prepare
from trainer.bubblewrap import SANDBOX_UID, SandboxUnavailable, bwrap_path  # noqa: F401  (re-exported)
from trainer.cgroup import MemoryCgroup
from trainer.carried_data import index_for
from trainer.contention import CpuMeter
from trainer.corpus import TRAIN_FILE, VAL_FILE, cache_root
from trainer.evaluator import FramePipe, TrustedEvaluator, load_val
from trainer.processes import ProcessTree, memory_bytes, task_count
from trainer.untrusted_files import keep_recorded_outputs, open_log, tail_of_fd, truncate, usage, write_atomic
from trainer.verdict import (NEVER_EVALUATED, Limits, RunOutcome, count, default_clock_grace,  # noqa: F401
                            judge, parse_report)

# The reference service gives a run 1 GiB. RLIMIT_DATA counts writable virtual memory, which runs
# above resident memory (allocator reserves, thread stacks), so the default doubles it: a script that
# fits in 1 GiB there fits here. The baseline peaks near 400 MiB (VmData and PSS alike).
DEFAULT_MEMORY_MB = 2048
DEFAULT_DISK_MB = 1024      # everything a run writes into its folder, together
MAX_ENTRIES = 10_000        # files and folders a run may create in its folder
# Tasks = processes + threads. torch starts about one thread per core; 256 leaves room for big
# machines and DataLoader workers, and stops a fork bomb.
DEFAULT_MAX_PROCS = 256
SCRATCH_FRACTION = 4        # /tmp and /dev/shm are tmpfs of memory_mb / SCRATCH_FRACTION each
EVAL_SCRATCH_MB = 64        # the evaluation sandbox's /tmp, emptied between frames
# A frame's process lives for one frame: let glibc keep what it freed for the next batch instead of
# giving it back and faulting it in again (about 20 % of a frame's forward on the baseline).
EVAL_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
# The kernel's cap (a memory cgroup, where one can be made) sits this far above the watchdog's: the
# watchdog stops a run at memory_mb; the kernel stops whatever passes it between two looks.
CGROUP_HEADROOM = 1.25
TAIL_CHARS = 4000
REPORT_CHARS = 64 * 1024    # how much of the end of stdout is searched for the script's JSON line
WATCH_SECS = 0.25           # how often the watchdog checks the clock, the cancel flag and the caps
HARNESS_FILES = ("launcher.py", "confine.py", "seccomp.py", "eval_server.py", "prepare.py", "subword.py")
FIXED_MODULES = ("prepare.py", "subword.py")  # read-only modules copied beside train.py
HERE = Path(__file__).resolve().parent


def execute_run(run_id: int, code: str, run_dir: Path, *, data_dir: Path, time_budget: float = 180,
                timeout: float = 210, clock_grace: float | None = None, cpus: int = os.cpu_count() or 1,
                gpus: int = 0, sandbox: bool = True, memory_mb: int = DEFAULT_MEMORY_MB,
                disk_mb: int = DEFAULT_DISK_MB, max_procs: int = DEFAULT_MAX_PROCS, seed: int | None = None,
                cancel_event: threading.Event | None = None) -> RunOutcome:
    """Run `code` as train.py in `run_dir` and return its outcome, verified or with the reasons why not.

    data_dir holds train.bin and val.bin; only train.bin is shown to the run (as /data/train.bin, or
    a private copy without the sandbox). time_budget is the run's TIME_BUDGET; the training clock --
    from train.py's first line to evaluate_bpb, plus the slowest evaluation frame -- may exceed it by
    clock_grace (default: `default_clock_grace(time_budget)`). timeout bounds the whole run. sandbox=False runs without bubblewrap (see the module
    docstring) and the outcome says sandboxed=False. Leaves train.py, stdout.log and stderr.log in
    run_dir. Raises SandboxUnavailable when sandbox=True and bwrap cannot run.
    """
    if not 0 < time_budget <= prepare.DEFAULT_TIME_BUDGET:
        raise ValueError(f"time_budget={time_budget} must be in (0, {prepare.DEFAULT_TIME_BUDGET}]")
    if not timeout > 0 or cpus < 1 or gpus < 0 or memory_mb < 64 or max_procs < 8 or disk_mb < 1:
        raise ValueError(f"bad run limits: timeout={timeout} cpus={cpus} gpus={gpus} memory_mb={memory_mb} "
                         f"(>= 64) disk_mb={disk_mb} (>= 1) max_procs={max_procs} (>= 8)")
    bwrap = bwrap_path() if sandbox else None
    run_dir, data_dir = Path(run_dir).resolve(), Path(data_dir).resolve()
    train_bin = data_dir / TRAIN_FILE
    if not train_bin.is_file():
        raise FileNotFoundError(f"{train_bin} is missing: run `pgolf-agent data` to build the corpus cache")
    val = load_val(data_dir)
    carried = index_for(val.numpy().tobytes()).find(code)

    run_dir.mkdir(parents=True, exist_ok=True)
    keep_recorded_outputs(run_dir)  # a folder reused after a crash may hold a previous run's files
    write_atomic(run_dir / "train.py", code)
    for name in FIXED_MODULES:
        write_atomic(run_dir / name, (HERE / name).read_bytes())
    drop_uid = bwrap is not None and bubblewrap.privileged()
    if drop_uid:
        os.chown(run_dir, SANDBOX_UID, SANDBOX_UID)  # the run's cwd is the one place it may write

    scratch = None if bwrap else Path(tempfile.mkdtemp(prefix=f"pgolf-run-{run_id}-"))
    if scratch is not None:  # without the sandbox, a private folder that holds only train.bin
        (scratch / "data").mkdir()
        (scratch / "home").mkdir()
        (scratch / "eval").mkdir()
        shutil.copyfile(train_bin, scratch / "data" / TRAIN_FILE)
    files = {name: HERE / name for name in HARNESS_FILES}
    home = bubblewrap.HARNESS_DIR if bwrap else str(HERE)
    hidden = [cache_root(), data_dir, (data_dir / VAL_FILE).resolve().parent]
    # Without a fresh user namespace RLIMIT_NPROC counts every task of the uid, not only the run's
    counted_uid = SANDBOX_UID if drop_uid else (None if bwrap else os.geteuid())
    existing = _tasks_of_uid(counted_uid) if counted_uid is not None else 0
    confine = {"uid": SANDBOX_UID if drop_uid else None,
               "limits": {"RLIMIT_DATA": memory_mb << 20, "RLIMIT_NPROC": max_procs + existing, "RLIMIT_CORE": 0}}
    markers = {name: f"PGOLF_RUN_MARKER={secrets.token_hex(16)}" for name in ("train", "server")}
    env = _child_env(time_budget, cpus, gpus)

    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    launcher = {**confine, "limits": {**confine["limits"], "RLIMIT_FSIZE": disk_mb << 20},
                "keep_fds": [to_child_r, from_child_w], "handoff_fd": from_child_w, "run_dir": str(run_dir)}
    train_cmd = [sys.executable, "-I", "-S", f"{home}/launcher.py", json.dumps(launcher)]
    train_env = {**env, prepare.HANDOFF_ENV: f"{to_child_r},{from_child_w}",
                 prepare.DATA_DIR_ENV: bubblewrap.SANDBOX_DATA_DIR if bwrap else str(scratch / "data"),
                 "HOME": "/tmp" if bwrap else str(scratch / "home"), "TMPDIR": "/tmp" if bwrap else str(scratch / "home")}
    if seed is not None:
        train_env["TORCH_SEED"] = str(seed)
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    report_r, report_w = os.pipe()
    server_scratch = "/tmp" if bwrap else str(scratch / "eval")
    server_spec = {**confine, "limits": {**confine["limits"], "RLIMIT_FSIZE": EVAL_SCRATCH_MB << 20},
                   "keep_fds": [request_r, reply_w, report_w], "request_fd": request_r, "reply_fd": reply_w,
                   "report_fd": report_w,
                   "pid_namespace": bwrap is not None, "scratch_dir": server_scratch}
    server_cmd = [sys.executable, "-I", "-S", f"{home}/eval_server.py", json.dumps(server_spec)]
    if bwrap:
        train_cmd = bubblewrap.training_args(bwrap, run_dir, train_bin, files, hidden,
                                             memory_mb // SCRATCH_FRACTION, gpus) + ["--", *train_cmd]
        server_cmd = bubblewrap.evaluation_args(bwrap, files, hidden, EVAL_SCRATCH_MB, gpus) + ["--", *server_cmd]

    started_at = datetime.now(timezone.utc)
    start = time.monotonic()
    deadline = start + timeout
    meter = CpuMeter.start()
    stop = threading.Event()
    out_fd, err_fd = open_log(run_dir / "stdout.log"), open_log(run_dir / "stderr.log")
    cut: dict[str, int] = {}  # the logs' sizes at the hand-off
    procs: dict[str, subprocess.Popen] = {}
    trees: dict[str, ProcessTree] = {}
    cgroups = {name: MemoryCgroup.create(int(CGROUP_HEADROOM * (memory_mb << 20)), f"{name}-{run_id}")
               for name in ("train", "server")}
    try:
        try:
            procs["server"] = subprocess.Popen(
                server_cmd, cwd="/", env={**env, **_marker_env(markers["server"]), **EVAL_MALLOC,
                                           "HOME": server_scratch, "TMPDIR": server_scratch}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(request_r, reply_w, report_w),
                start_new_session=True, preexec_fn=_joiner(cgroups["server"]))
            trees["server"] = ProcessTree(procs["server"].pid, markers["server"])
            procs["train"] = subprocess.Popen(
                train_cmd, cwd=run_dir, env={**train_env, **_marker_env(markers["train"])}, stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd,
                pass_fds=(to_child_r, from_child_w), start_new_session=True, preexec_fn=_joiner(cgroups["train"]))
            trees["train"] = ProcessTree(procs["train"].pid, markers["train"])
        finally:  # the children hold their own copies; ours must go so their exit reads as end-of-file
            for fd in (to_child_r, from_child_w, request_r, reply_w, report_w):
                os.close(fd)
        server_pipe = FramePipe(reply_r, request_w, deadline, stop, "evaluation sandbox", report_fd=report_r)

        frozen = threading.Event()  # the training processes are stopped: nothing of theirs can grow

        def freeze():
            trees["train"].signal_all(signal.SIGSTOP)
            frozen.set()
            cut.update(stdout=os.fstat(out_fd).st_size, stderr=os.fstat(err_fd).st_size)

        def thaw():
            frozen.clear()
            trees["train"].signal_all(signal.SIGCONT)

        evaluator = TrustedEvaluator(
            val, train_bin.read_bytes, FramePipe(from_child_r, to_child_w, deadline, stop, "script"),
            start_server=lambda: server_pipe,
            freeze=freeze, thaw=thaw,
            stop_server=lambda: (trees["server"].kill_all(procs["server"].poll), server_pipe.close()),
            seed=secrets.randbits(63), gpu=gpus > 0, max_snapshot_bytes=memory_mb << 20)
        thread = threading.Thread(target=evaluator.run, name=f"pgolf-eval-{run_id}", daemon=True)
        thread.start()
        stopped = _supervise(procs["train"], trees, frozen, run_dir, scratch, deadline, timeout, cancel_event,
                             memory_mb, disk_mb, max_procs)
        stop.set()
        survivors = trees["train"].kill_all(procs["train"].poll) + trees["server"].kill_all(procs["server"].poll)
        stopped = stopped or _over_kernel_cap(cgroups, memory_mb)
        server_pipe.close()
        cpu_others = meter.others_share(trees["train"].cpu_secs() + trees["server"].cpu_secs())
        thread.join()
        finished = time.monotonic()
        report = parse_report(tail_of_fd(out_fd, REPORT_CHARS))
        for name, fd in (("stdout", out_fd), ("stderr", err_fd)):
            if name in cut:  # what was written after the hand-off is not kept
                truncate(fd, cut[name])
        stdout_tail, stderr_tail = tail_of_fd(out_fd, TAIL_CHARS), tail_of_fd(err_fd, TAIL_CHARS)
    finally:
        os.close(out_fd)
        os.close(err_fd)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        for proc in procs.values():
            proc.poll()
        for group in cgroups.values():
            if group is not None:
                group.remove()

    ev = evaluator.result
    limits = Limits(time_budget=time_budget,
                    clock_grace=default_clock_grace(time_budget) if clock_grace is None else clock_grace, memory_mb=memory_mb, file_mb=disk_mb)
    status, reasons = judge(ev, stopped, procs["train"].returncode, limits, bwrap is not None, stderr_tail, carried)
    if survivors:
        reasons.append(f"{len(survivors)} processes of the run could not be killed (pids {survivors[:10]})")
    # What the run left is read later by the harness: its recorded outputs only, no longer the sandbox uid's
    keep_recorded_outputs(run_dir, owner=(os.geteuid(), os.getegid()) if drop_uid else None)
    write_atomic(run_dir / "train.py", code)
    return RunOutcome(
        status=status, verified=status == "completed", sandboxed=bwrap is not None,
        code_sha256=hashlib.sha256(code.encode()).hexdigest(), started_at=started_at,
        finished_at=datetime.now(timezone.utc), wall_secs=round(finished - start, 3),
        val_bpb=ev.val_bpb if status in ("completed", "unverified") else None,
        startup_secs=round(ev.started_at - start, 3) if ev.started_at is not None else None,
        training_secs=round(ev.ready_at - ev.started_at, 3) if ev.ready_at is not None else report.get("training_time_secs"),
        slowest_frame_secs=round(ev.max_frame_secs, 3) if ev.frames else None, cpu_others=cpu_others,
        eval_secs=round(ev.done_at - ev.ready_at, 3) if ev.done_at is not None else None,
        reported_val_bpb=report.get("val_bpb"), train_loss=report.get("train_loss"),
        total_steps=count(report.get("total_steps")), num_params_M=report.get("num_params_M"),
        reasons=reasons, stdout_tail=stdout_tail, stderr_tail=stderr_tail)


def _supervise(proc: subprocess.Popen, trees: dict[str, ProcessTree], frozen: threading.Event, run_dir: Path,
               scratch: Path | None, deadline: float, timeout: float, cancel_event: threading.Event | None,
               memory_mb: int, disk_mb: int, max_procs: int) -> tuple[str, str] | None:
    """Wait for the script to end; return (status, why) when the harness stopped it, None when it exited."""
    while True:
        try:
            proc.wait(timeout=WATCH_SECS)
            return None
        except subprocess.TimeoutExpired:
            pass
        if cancel_event is not None and cancel_event.is_set():
            return "interrupted", "stopped by the harness before it finished (cancelled)"
        if time.monotonic() >= deadline:
            return "timeout", (f"killed after the {timeout:g} s wall-clock limit of a run "
                               "(training + evaluation); stop training at TIME_BUDGET")
        for name in ("server",) if frozen.is_set() else ("train", "server"):
            members = trees[name].members()
            files = _scratch_bytes(members, scratch) if name == "train" else 0
            used = memory_bytes(members, (memory_mb << 20) - files) + files
            if used > memory_mb << 20:
                what = ("its processes and the files in its /tmp and /dev/shm" if name == "train"
                        else "the evaluation of its model")
                return "crashed", (f"killed: {what} used {used / 2**20:.0f} MiB of memory together, over the "
                                   f"{memory_mb} MiB cap; use a smaller model or batch, and keep /tmp small")
            tasks = task_count(members)
            if tasks > max_procs + 2:  # + bwrap's two processes
                return "crashed", f"killed: the run had {tasks} processes and threads, over the cap of {max_procs}"
        if frozen.is_set():
            continue
        size, entries = usage(run_dir, MAX_ENTRIES + 1)
        if size > disk_mb << 20:
            return "crashed", (f"killed: the files in the run's folder took {size / 2**20:.0f} MiB of disk, "
                               f"over the {disk_mb} MiB cap of a run; write less (nothing but the logs is kept)")
        if entries > MAX_ENTRIES:
            return "crashed", f"killed: the run created over {MAX_ENTRIES} files and folders in its folder"


def _joiner(group: MemoryCgroup | None):
    return group.join if group is not None else None


def _over_kernel_cap(cgroups: dict[str, MemoryCgroup | None], memory_mb: int) -> tuple[str, str] | None:
    for name, group in cgroups.items():
        if group is not None and group.oom_kills():
            what = "the run's processes and its /tmp and /dev/shm" if name == "train" else "the evaluation of its model"
            return "crashed", (f"killed by the kernel: {what} went past the {memory_mb} MiB memory cap between "
                               "two checks; use a smaller model or batch, and keep /tmp small")
    return None


def _scratch_bytes(members, scratch: Path | None) -> int:
    """What the run's private /tmp and /dev/shm hold: tmpfs pages are memory no process's PSS shows."""
    if scratch is not None:
        return usage(scratch)[0]
    host = {os.stat(p).st_dev for p in ("/tmp", "/dev/shm") if os.path.exists(p)}
    for proc in members:
        try:
            total, devices = 0, set()
            for path in ("tmp", "dev/shm"):
                inside = f"/proc/{proc.pid}/root/{path}"
                dev = os.stat(inside).st_dev
                if dev in host or dev in devices:
                    raise OSError  # not inside the sandbox's mount namespace (bwrap's outer process)
                devices.add(dev)
                st = os.statvfs(inside)
                total += (st.f_blocks - st.f_bfree) * st.f_frsize
            return total
        except OSError:
            continue
    return 0


def _marker_env(marker: str) -> dict[str, str]:
    key, _, value = marker.partition("=")
    return {key: value}


def _child_env(time_budget: float, cpus: int, gpus: int) -> dict[str, str]:
    """A sandboxed process's whole environment, built from nothing: no key or RAY_* variable can leak in."""
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", prepare.TIME_BUDGET_ENV: f"{time_budget:g}",
        # Ray sets OMP_NUM_THREADS from a task's num_cpus; a run gets exactly the cores it was given
        "OMP_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus),
    }
    if gpus > 0 and "CUDA_VISIBLE_DEVICES" in os.environ:  # the GPUs the scheduler assigned
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return env


def _tasks_of_uid(uid: int) -> int:
    """Tasks the uid runs already: RLIMIT_NPROC counts them too, outside a user namespace."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["uids", "num_threads"]):
        uids = proc.info["uids"]
        if uids is not None and uids.real == uid:
            total += proc.info["num_threads"] or 0
    return total
