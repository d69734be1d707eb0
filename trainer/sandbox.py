"""Run one train.py in a sandbox, score it with the trusted evaluator, return a RunResult.

The sandbox is bubblewrap. The script sees, read-only: the OS (/usr, /etc and
the /bin, /lib... links), the Python installation and its site-packages, and
`/data/train.bin`; writable: its run directory (its cwd) and small private
tmpfs mounts on /tmp and /dev/shm. Nothing else of the host file system exists
inside -- not val.bin, not the corpus cache, not $HOME, not /tmp/ray and its
tokens, not the project or session directories. It has no network, its own
PID namespace, and runs as uid 65534 with no capabilities. The environment is
built from scratch, so no API key or RAY_* variable reaches it.

Caps, set by a small launcher inside before it becomes `python train.py`:
- memory: RLIMIT_DATA = memory_mb per process (a hard allocation failure), and a
  watchdog that kills the run when the proportional set size (PSS) of all its
  processes together exceeds memory_mb (forked children cannot multiply the cap);
- processes: RLIMIT_NPROC = max_procs tasks (processes and threads);
- files: RLIMIT_FSIZE = MAX_FILE_MB per file (logs included), no core dumps.

How the uid and RLIMIT_NPROC work together: the kernel never applies
RLIMIT_NPROC to host uid 0, and a user namespace run by root maps the sandbox
uid to host uid 0. So when the harness is root, bwrap runs without a user
namespace and the launcher drops to host uid 65534 itself; otherwise bwrap
maps the harness's uid into a fresh user namespace, where RLIMIT_NPROC counts
only the sandbox's tasks.

The run ends when the script exits, at `timeout` seconds of wall clock
(training and evaluation), when `cancel_event` is set, or when a cap is hit;
every way ends with SIGKILL to every process of the run, then a check that
none survived.

sandbox=False keeps the scrubbed environment, the caps, the watchdog and the
clean-up, and loses the rest: the script sees the host's files and network,
RLIMIT_NPROC does not bind a root harness (the watchdog's count remains), and
a process that left the run's session survives a kill -9 of the harness.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from budget.models import RunResult, RunStatus, utcnow
from trainer import prepare
from trainer.contention import CLOCK_TICKS, CpuMeter
from trainer.corpus import TRAIN_FILE, VAL_FILE, cache_root
from trainer.evaluator import TrustedEvaluator, load_val

# The reference service gives a run 1 GiB. RLIMIT_DATA counts writable virtual
# memory, which runs above resident memory (allocator reserves, thread stacks),
# so the default doubles it: a script that fits in 1 GiB there fits here.
# The baseline peaks near 400 MiB (VmData and PSS alike).
DEFAULT_MEMORY_MB = 2048
# Tasks = processes + threads. torch starts about one thread per core; 256
# leaves room for big machines and DataLoader workers, and stops a fork bomb.
DEFAULT_MAX_PROCS = 256
MAX_FILE_MB = 1024          # largest file (or log) a run may write
SCRATCH_FRACTION = 4        # /tmp and /dev/shm are tmpfs of memory_mb / SCRATCH_FRACTION each
SANDBOX_UID = 65534         # "nobody"
SANDBOX_DATA_DIR = "/data"
TAIL_CHARS = 4000
WATCH_SECS = 0.25           # how often the watchdog checks the clock, the cancel flag and the caps
KILL_WAIT_SECS = 5.0        # how long to keep killing stragglers before reporting them
MARKER_ENV = "PGOLF_RUN_MARKER"
FIXED_MODULES = ("prepare.py", "subword.py")  # read-only modules copied beside train.py
SYSTEM_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
NEVER_EVALUATED = "the script never called evaluate_bpb; its printed val_bpb cannot be verified"

# Runs first, inside the sandbox (our code, not the agent's): sets the caps,
# closes every inherited fd but stdio and the evaluation pipes, drops to the
# sandbox uid when started as root, arranges to die with its parent (bwrap
# does that in the sandbox; this covers sandbox=False), then becomes
# `python train.py`.
_LAUNCHER = """
import ctypes, json, os, resource, signal, sys
spec = json.loads(sys.argv[1])
for name, value in spec["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
keep = {0, 1, 2, *spec["keep_fds"]}
for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
    if fd not in keep:
        try:
            os.close(fd)
        except OSError:
            pass
if spec["uid"] is not None:
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: after setuid, which clears it; kept by execv
os.execv(sys.argv[2], sys.argv[2:])
"""


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces; the message says what to do."""


def execute_run(run_id: int, code: str, run_dir: Path, *, data_dir: Path, time_budget: float = 180,
                timeout: float = 210, startup_grace: float = 10, cpus: int = os.cpu_count() or 1,
                gpus: int = 0, sandbox: bool = True, memory_mb: int = DEFAULT_MEMORY_MB,
                max_procs: int = DEFAULT_MAX_PROCS, seed: int | None = None,
                cancel_event: threading.Event | None = None) -> RunResult:
    """Run `code` as train.py in `run_dir` and return its verified result.

    data_dir holds train.bin and val.bin; only train.bin is shown to the run
    (as /data/train.bin, or a private copy without the sandbox). time_budget
    is the run's TIME_BUDGET; the training clock (from process start to the
    evaluate_bpb call) may exceed it by startup_grace. timeout bounds the
    whole run. memory_mb (default 2048) caps the memory of all the run's
    processes together, max_procs (default 256) its processes plus threads.
    sandbox=False runs without bubblewrap -- same environment, caps and
    clean-up, but no file-system, network or PID isolation -- and the result
    says sandboxed=False. Writes stdout.log, stderr.log and result.json to
    run_dir. Raises SandboxUnavailable when sandbox=True and bwrap cannot run.
    """
    if not 0 < time_budget <= prepare.DEFAULT_TIME_BUDGET:
        raise ValueError(f"time_budget={time_budget} must be in (0, {prepare.DEFAULT_TIME_BUDGET}]")
    if not timeout > 0 or cpus < 1 or gpus < 0 or memory_mb < 64 or max_procs < 8:
        raise ValueError(f"bad run limits: timeout={timeout} cpus={cpus} gpus={gpus} "
                         f"memory_mb={memory_mb} (>= 64) max_procs={max_procs} (>= 8)")
    bwrap = bwrap_path() if sandbox else None
    run_dir, data_dir = Path(run_dir).resolve(), Path(data_dir).resolve()
    train_bin = data_dir / TRAIN_FILE
    if not train_bin.is_file():
        raise FileNotFoundError(f"{train_bin} is missing: run `pgolf-agent data` to build the corpus cache")
    val = load_val(data_dir)

    run_dir.mkdir(parents=True, exist_ok=True)
    _keep_regular_files(run_dir)  # a run dir reused after a crash may hold a previous run's symlinks
    # the fixed modules a train.py may import, beside it in the run folder
    fixed = {name: (Path(prepare.__file__).parent / name).read_bytes() for name in FIXED_MODULES}
    _write_file(run_dir / "train.py", code.encode())
    for name, source in fixed.items():
        _write_file(run_dir / name, source)
    drop_uid = bwrap is not None and os.geteuid() == 0
    if drop_uid:
        os.chown(run_dir, SANDBOX_UID, SANDBOX_UID)  # the run's cwd is the one place it may write

    scratch = None if bwrap else Path(tempfile.mkdtemp(prefix=f"pgolf-run-{run_id}-"))
    if scratch is not None:  # without the sandbox, a private folder that holds only train.bin
        (scratch / "data").mkdir()
        (scratch / "home").mkdir()
        shutil.copyfile(train_bin, scratch / "data" / TRAIN_FILE)
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    marker = secrets.token_hex(16)
    env = _child_env(time_budget, cpus, gpus, seed, marker, f"{to_child_r},{from_child_w}",
                     data=SANDBOX_DATA_DIR if bwrap else str(scratch / "data"),
                     home="/tmp" if bwrap else str(scratch / "home"))
    # Without a fresh user namespace RLIMIT_NPROC counts every task of the uid, not only the run's
    counted_uid = SANDBOX_UID if drop_uid else (None if bwrap else os.geteuid())
    existing = _tasks_of_uid(counted_uid) if counted_uid is not None else 0
    spec = {"limits": {"RLIMIT_DATA": memory_mb << 20, "RLIMIT_NPROC": max_procs + existing,
                       "RLIMIT_FSIZE": MAX_FILE_MB << 20, "RLIMIT_CORE": 0},
            "keep_fds": [to_child_r, from_child_w], "uid": SANDBOX_UID if drop_uid else None}
    command = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(spec), sys.executable, "train.py"]
    if bwrap:
        hidden = [cache_root(), data_dir, (data_dir / VAL_FILE).resolve().parent]
        command = _bwrap_args(bwrap, run_dir, train_bin, hidden, memory_mb // SCRATCH_FRACTION, gpus,
                              privileged=drop_uid) + ["--", *command]

    started_at = utcnow()
    start = time.monotonic()
    meter = CpuMeter.start()
    deadline = start + timeout
    evaluator = TrustedEvaluator(val, from_child_r, to_child_w, deadline, audit_seed=secrets.randbits(63))
    thread = threading.Thread(target=evaluator.run, name=f"pgolf-eval-{run_id}", daemon=True)
    thread.start()  # before the child exists, so `ready` is timed the moment it is sent
    out_fd, err_fd = _open_log(run_dir / "stdout.log"), _open_log(run_dir / "stderr.log")
    try:
        try:
            proc = subprocess.Popen(command, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=out_fd,
                                    stderr=err_fd, pass_fds=(to_child_r, from_child_w), start_new_session=True)
        finally:  # the child holds its own copies; ours must go so its exit reads as end-of-file
            os.close(to_child_r)
            os.close(from_child_w)
        tree = _ProcessTree(proc.pid, marker)
        ended_by = _supervise(proc, tree, deadline, timeout, cancel_event, memory_mb, max_procs)
        survivors = _kill_all(proc, tree)
        cpu_others = meter.others_share(tree.cpu_secs())
        thread.join(KILL_WAIT_SECS)
        if thread.is_alive():  # a frame in flight when everything died; the deadline ends it anyway
            evaluator.stop()
            thread.join()
        finished = time.monotonic()
        stdout_tail, stderr_tail = _tail(out_fd), _tail(err_fd)
        report = _parse_report(_tail(out_fd, 64 * 1024))
    finally:
        os.close(out_fd)
        os.close(err_fd)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    result = RunResult(run_id=run_id, status=RunStatus.crashed, seed=seed, sandboxed=bwrap is not None,
                       code_sha256=hashlib.sha256(code.encode()).hexdigest(),
                       stdout_tail=stdout_tail, stderr_tail=stderr_tail,
                       started_at=started_at, finished_at=utcnow(), wall_secs=round(finished - start, 3),
                       cpu_others=cpu_others,
                       reported_val_bpb=_number(report.get("val_bpb")), train_loss=_number(report.get("train_loss")),
                       num_params_M=_number(report.get("num_params_M")), total_steps=_count(report.get("total_steps")))
    _judge(result, evaluator, ended_by, proc.returncode, start, time_budget, startup_grace, memory_mb,
           _number(report.get("training_time_secs")))
    if survivors:
        result.reasons.append(f"{len(survivors)} processes of the run could not be killed (pids {survivors[:10]})")
    # What the run left is read later by the harness: plain files only, and no longer writable by the sandbox uid
    _keep_regular_files(run_dir, owner=(os.geteuid(), os.getegid()) if drop_uid else None)
    _write_file(run_dir / "train.py", code.encode())
    for name, source in fixed.items():
        _write_file(run_dir / name, source)
    _write_file(run_dir / "result.json", result.model_dump_json(indent=2).encode())
    return result


# ---------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------

def _judge(result: RunResult, evaluator: TrustedEvaluator, ended_by: tuple[RunStatus, str] | None, rc: int,
           start: float, time_budget: float, startup_grace: float, memory_mb: int,
           reported_training: float | None) -> None:
    ev = evaluator.result
    result.val_bpb = ev.val_bpb
    result.training_secs = (round(ev.ready_at - start, 3) if ev.ready_at is not None else reported_training)
    if ended_by is not None:
        result.status, reason = ended_by
        result.reasons.append(reason)
    elif rc != 0:
        result.status = RunStatus.crashed
        result.reasons.append(_exit_reason(rc, result.sandboxed, result.stderr_tail, memory_mb))
    elif ev.ready_at is None:
        result.status = RunStatus.unverified
        result.reasons.append(NEVER_EVALUATED)
    else:
        over = ev.ready_at - start - (time_budget + startup_grace)
        if over > 0:
            result.reasons.append(
                f"training clock exceeded: evaluate_bpb was called {ev.ready_at - start:.1f} s after start, "
                f"{over:.1f} s over TIME_BUDGET {time_budget:g} s + {startup_grace:g} s start-up grace")
        if ev.val_bpb is None and not ev.reasons:
            result.reasons.append("the evaluation did not finish before the script exited")
        result.status = RunStatus.unverified if result.reasons or ev.reasons else RunStatus.completed
    result.reasons.extend(ev.reasons)
    result.verified = result.status == RunStatus.completed


def _exit_reason(rc: int, sandboxed: bool, stderr_tail: str, memory_mb: int) -> str:
    # bwrap reports a child killed by signal N as exit code 128 + N; Popen reports -N
    sig = -rc if rc < 0 else (rc - 128 if sandboxed and 128 < rc < 160 else 0)
    try:
        what = f"was killed by {signal.Signals(sig).name}" if sig else f"exited with code {rc}"
    except ValueError:
        what = f"exited with code {rc}"
    lines = [line for line in stderr_tail.splitlines() if line.strip()]
    reason = f"the script {what}" + (f": {lines[-1].strip()[:300]}" if lines else "")
    if sig == signal.SIGXFSZ or "File too large" in stderr_tail:  # Python ignores SIGXFSZ: writes fail instead
        reason += f" (a file or log reached the {MAX_FILE_MB} MiB size limit)"
    elif re.search(r"MemoryError|can't allocate memory|Cannot allocate memory|bad_alloc", stderr_tail):
        reason += f" (out of memory: a run may use {memory_mb} MiB; use a smaller model or batch)"
    return reason


def _parse_report(stdout_tail: str) -> dict:
    """The last JSON object on stdout that has val_bpb: what the script claims."""
    for line in reversed(stdout_tail.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "val_bpb" in obj:
                return obj
    return {}


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        return None
    return float(value)


def _count(value) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


# ---------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------

def bwrap_path() -> str:
    """The bwrap executable, checked once to be able to create the namespaces a run needs."""
    path = shutil.which("bwrap")
    if not path:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed, so runs cannot be sandboxed: `apt-get install bubblewrap`, "
            "or pass --unsafe-no-sandbox to run without isolation (every result will say sandboxed: false)")
    _probe(path)
    return path


_probed: set[str] = set()


def _probe(path: str) -> None:
    if path in _probed:
        return
    flags = [] if os.geteuid() == 0 else ["--unshare-user"]
    probe = subprocess.run([path, "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", *flags, "true"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise SandboxUnavailable(
            f"bwrap cannot create the sandbox's namespaces ({probe.stderr.strip()[:200]}): allow unprivileged "
            "user namespaces (sysctl kernel.unprivileged_userns_clone=1 or user.max_user_namespaces > 0), "
            "or pass --unsafe-no-sandbox")
    _probed.add(path)


def _bwrap_args(bwrap: str, run_dir: Path, train_bin: Path, hidden: list[Path], scratch_mb: int, gpus: int,
                privileged: bool) -> list[str]:
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "pgolf-sandbox", "--die-with-parent", "--new-session"]
    if privileged:  # no user namespace (see the module docstring); the launcher needs only these two
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    for path in ("/tmp", "/dev/shm"):
        args += ["--perms", "1777", "--size", str(scratch_mb << 20), "--tmpfs", path]
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    python = _python_paths()
    made: set[str] = set()
    for path in python:
        args += _make_parents(path, made) + ["--ro-bind", path, path]
    bound = [p for p in SYSTEM_PATHS if os.path.isdir(p)] + python
    for path in {str(Path(h).resolve()) for h in hidden}:
        if any(_under(path, b) for b in bound):  # e.g. a corpus cache inside a bound folder: mask it
            args += ["--tmpfs", path]
            args += [a for p in python if _under(p, path) for a in ("--ro-bind", p, p)]
    if gpus > 0:  # CUDA needs the device nodes and the driver's view of /sys
        for dev in sorted(Path("/dev").glob("nvidia*")):
            args += ["--dev-bind", str(dev), str(dev)]
        args += ["--ro-bind", "/sys", "/sys"]
    args += ["--dir", SANDBOX_DATA_DIR, "--ro-bind", str(train_bin.resolve()), f"{SANDBOX_DATA_DIR}/{TRAIN_FILE}"]
    args += _make_parents(str(run_dir), made) + ["--bind", str(run_dir), str(run_dir)]
    return args + ["--remount-ro", "/", "--chdir", str(run_dir)]


def _python_paths() -> list[str]:
    """Folders of the running Python that are not already under a system path, outermost first."""
    paths = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        paths |= {os.path.abspath(p), os.path.realpath(p)}
    paths |= {os.path.realpath(p) for p in sys.path
              if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)}
    paths = {p for p in paths if not any(_under(p, s) for s in SYSTEM_PATHS)}
    return sorted(p for p in paths if not any(q != p and _under(p, q) for q in paths))


def _make_parents(path: str, made: set[str]) -> list[str]:
    # bwrap creates missing parents as 0700 when run as root; the sandbox uid must be able to walk them
    args = []
    for parent in reversed(Path(path).parents[:-1]):
        p = str(parent)
        if p not in made and not any(_under(p, s) for s in SYSTEM_PATHS):
            made.add(p)
            args += ["--dir", p]
    return args


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _child_env(time_budget: float, cpus: int, gpus: int, seed: int | None, marker: str, fds: str, *,
               data: str, home: str) -> dict[str, str]:
    """The run's whole environment, built from nothing: no key or RAY_* variable can leak in."""
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
        prepare.TIME_BUDGET_ENV: f"{time_budget:g}", prepare.DATA_DIR_ENV: data, prepare.HANDOFF_ENV: fds,
        # Ray sets OMP_NUM_THREADS from a task's num_cpus; a run gets exactly the cores it was given
        "OMP_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus),
        MARKER_ENV: marker,
    }
    if seed is not None:
        env["TORCH_SEED"] = str(seed)
    if gpus > 0 and "CUDA_VISIBLE_DEVICES" in os.environ:  # the GPUs the scheduler assigned
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return env


# ---------------------------------------------------------------------------
# The run's processes
# ---------------------------------------------------------------------------

@dataclass
class _Stat:
    ppid: int
    start: int     # start time in clock ticks since boot: tells a pid from its reuse
    threads: int
    state: str
    cpu_ticks: int  # user + system time so far


def _proc_table() -> dict[int, _Stat]:
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        table[int(name)] = _Stat(int(fields[1]), int(fields[19]), int(fields[17]), fields[0].decode(),
                                 int(fields[11]) + int(fields[12]))
    return table


class _ProcessTree:
    """Every process of one run, found through /proc.

    Members are the leader's descendants plus everything seen in the tree
    before (a double-forked orphan is re-parented away but stays tracked);
    after the leader is gone, also anything left in the run's PID namespaces
    or carrying its environment marker.
    """

    def __init__(self, leader: int, marker: str):
        self.leader = leader
        self.marker = f"{MARKER_ENV}={marker}".encode()
        self.seen: dict[int, int] = {}
        self.cpu_ticks: dict[tuple[int, int], int] = {}  # (pid, start) -> CPU time at its last sighting
        self.own_ns = os.stat("/proc/self/ns/pid").st_ino
        self.namespaces: set[int] = set()

    def members(self) -> dict[int, _Stat]:
        table = _proc_table()
        children = defaultdict(list)
        for pid, st in table.items():
            children[st.ppid].append(pid)
        stack = [self.leader] + [pid for pid, start in self.seen.items() if pid in table and table[pid].start == start]
        found: dict[int, _Stat] = {}
        while stack:
            pid = stack.pop()
            if pid in found or pid not in table:
                continue
            found[pid] = table[pid]
            stack.extend(children[pid])
        for pid, st in found.items():
            if pid not in self.seen:
                self.seen[pid] = st.start
                try:
                    ns = os.stat(f"/proc/{pid}/ns/pid").st_ino
                except OSError:
                    continue
                if ns != self.own_ns:
                    self.namespaces.add(ns)
        for pid, st in found.items():
            self.cpu_ticks[pid, st.start] = st.cpu_ticks
        return {pid: st for pid, st in found.items() if st.state not in "ZX"}

    def cpu_secs(self) -> float:
        """CPU time of the run's processes as last sampled (a watchdog period short at most)."""
        return sum(self.cpu_ticks.values()) / CLOCK_TICKS

    def stragglers(self) -> list[int]:
        pids = set(self.members())
        me = os.getpid()
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in pids or int(name) == me:
                continue
            try:
                in_ns = self.namespaces and os.stat(f"/proc/{name}/ns/pid").st_ino in self.namespaces
                if in_ns or self.marker in Path(f"/proc/{name}/environ").read_bytes():
                    with open(f"/proc/{name}/stat", "rb") as f:
                        if f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                            pids.add(int(name))
            except (OSError, IndexError):
                continue
        return sorted(pids)


def _supervise(proc: subprocess.Popen, tree: _ProcessTree, deadline: float, timeout: float,
               cancel_event: threading.Event | None, memory_mb: int, max_procs: int) -> tuple[RunStatus, str] | None:
    """Wait for the run to end; return why it was stopped, or None when it exited by itself."""
    while True:
        try:
            proc.wait(timeout=WATCH_SECS)
            return None
        except subprocess.TimeoutExpired:
            pass
        if cancel_event is not None and cancel_event.is_set():
            return RunStatus.interrupted, "stopped by the harness before it finished (cancelled)"
        if time.monotonic() >= deadline:
            return RunStatus.timeout, (f"killed after the {timeout:g} s wall-clock limit of a run "
                                       "(training + evaluation); stop training at TIME_BUDGET")
        members = tree.members()
        used = sum(_pss_kib(pid) for pid in members) / 1024
        if used > memory_mb:
            return RunStatus.crashed, (f"killed: the run's processes used {used:.0f} MiB of memory together, "
                                       f"over the {memory_mb} MiB cap; use a smaller model or batch")
        tasks = sum(st.threads for st in members.values())
        if tasks > max_procs + 2:  # + bwrap's two processes
            return RunStatus.crashed, f"killed: the run had {tasks} processes and threads, over the cap of {max_procs}"


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _kill_all(proc: subprocess.Popen, tree: _ProcessTree) -> list[int]:
    """SIGKILL every process of the run until none is left; return any that survived."""
    give_up = time.monotonic() + KILL_WAIT_SECS
    while True:
        if proc.poll() is None:  # the group id is still ours only while the leader is unreaped
            _kill(-proc.pid)
        victims = tree.stragglers()
        for pid in victims:
            _kill(pid)
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
        if (not victims and proc.returncode is not None) or time.monotonic() > give_up:
            return victims


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tasks_of_uid(uid: int) -> int:
    """Tasks the uid runs already: RLIMIT_NPROC counts them too, outside a user namespace."""
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                st = os.stat(f"/proc/{name}")
                if st.st_uid == uid:
                    total += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                continue
    return total


# ---------------------------------------------------------------------------
# Files the harness writes next to code it does not trust
# ---------------------------------------------------------------------------

def _write_file(path: Path, data: bytes) -> None:
    """Atomic, and never through a symlink the run may have planted."""
    _clear(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _open_log(path: Path) -> int:
    _clear(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def _clear(path: Path) -> None:
    """Remove whatever the run left at one of our paths (a directory named result.json, a symlink...)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _tail(fd: int, chars: int = TAIL_CHARS) -> str:
    size = os.fstat(fd).st_size
    data = os.pread(fd, min(size, 4 * chars), max(0, size - 4 * chars))
    return data.decode("utf-8", errors="replace")[-chars:]


def _keep_regular_files(run_dir: Path, owner: tuple[int, int] | None = None) -> None:
    """Remove symlinks, FIFOs, sockets and devices a run left; optionally hand the rest to `owner`."""
    if owner:
        os.chown(run_dir, *owner)
    for root, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                os.unlink(path)
            elif owner:
                os.chown(path, *owner, follow_symlinks=False)
