"""The two bubblewrap sandboxes of a run: training, and the evaluation of its frozen model.

Both see, read-only: the OS (/usr, /etc and the /bin, /lib... links), the
Python installation and its site-packages, and the harness's own files they
need (the launcher, the seccomp filter, the fixed modules) under /pgolf.
Nothing else of the host exists inside -- not val.bin, not the corpus cache,
not $HOME, not /tmp/ray and its tokens, not the project or session folders.
Both have no network and their own PID, IPC, UTS and cgroup namespaces.

Training also sees `/data/train.bin`, and may write its run folder (its cwd)
and small private tmpfs mounts on /tmp and /dev/shm. Evaluation may write
only a small /tmp, which is emptied between frames: no file it could leave
for the next frame.

The uid: the kernel never applies RLIMIT_NPROC to host uid 0, and a user
namespace made by root maps the sandbox uid to host uid 0. So when the
harness is root, bwrap runs without a user namespace and the launcher drops
to host uid 65534 itself; otherwise bwrap maps the harness's uid into a fresh
user namespace. Either way the sandbox has no capabilities, and the seccomp
filter the launcher installs denies what a namespace does not contain
(keyrings above all).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SANDBOX_UID = 65534       # "nobody"
SANDBOX_DATA_DIR = "/data"
HARNESS_DIR = "/pgolf"    # the harness files a sandbox needs, read-only
SYSTEM_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
PRIVATE_TMPFS = ("/tmp", "/dev/shm")  # empty in every sandbox: nothing of the host's there is seen


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces; the message says what to do."""


def bwrap_path() -> str:
    """The bwrap executable, checked once to be able to create the namespaces a run needs."""
    path = shutil.which("bwrap")
    if not path:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed, so runs cannot be sandboxed: `apt-get install bubblewrap`, "
            "or pass --unsafe-no-sandbox to run without isolation (every result will say sandboxed: false)")
    _probe(path)
    hidden = [p for p in _python_paths() if any(_under(p, tmpfs) for tmpfs in PRIVATE_TMPFS)]
    if hidden:
        raise SandboxUnavailable(
            f"the Python running pgolf-agent is installed under {hidden[0]}, and every sandbox mounts a private, "
            f"empty {' and '.join(PRIVATE_TMPFS)}, so runs could not start it: install pgolf-agent into a "
            "virtualenv outside those folders (or pass --unsafe-no-sandbox)")
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


def privileged() -> bool:
    """Root harness: no user namespace, the launcher drops to SANDBOX_UID (see the module docstring)."""
    return os.geteuid() == 0


def training_args(bwrap: str, run_dir: Path, train_bin: Path, harness_files: dict[str, Path],
                  hidden: list[Path], scratch_mb: int, gpus: int) -> list[str]:
    args, made = _common(bwrap, harness_files, hidden, gpus)
    args += ["--dev", "/dev"]
    for path in PRIVATE_TMPFS:
        args += ["--perms", "1777", "--size", str(scratch_mb << 20), "--tmpfs", path]
    args += ["--dir", SANDBOX_DATA_DIR, "--ro-bind", str(train_bin.resolve()), f"{SANDBOX_DATA_DIR}/{train_bin.name}"]
    args += _make_parents(str(run_dir), made) + ["--bind", str(run_dir), str(run_dir)]
    return args + ["--remount-ro", "/", "--chdir", str(run_dir)]


def evaluation_args(bwrap: str, harness_files: dict[str, Path], hidden: list[Path], scratch_mb: int,
                    gpus: int) -> list[str]:
    # /dev is a tmpfs bwrap fills with device nodes: read-only here, or a frame could leave a file in it.
    # /tmp is the one writable place (libraries want one); the server empties it between frames.
    args, _ = _common(bwrap, harness_files, hidden, gpus)
    args += ["--dev", "/dev", "--remount-ro", "/dev", "--perms", "1777", "--size", str(scratch_mb << 20),
             "--tmpfs", "/tmp"]
    return args + ["--remount-ro", "/", "--chdir", HARNESS_DIR]


def _common(bwrap: str, harness_files: dict[str, Path], hidden: list[Path], gpus: int) -> tuple[list[str], set[str]]:
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "pgolf-sandbox", "--die-with-parent", "--new-session"]
    if privileged():  # the launcher needs only these two, to drop to SANDBOX_UID
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns"]
    args += ["--proc", "/proc"]
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
    args += ["--dir", HARNESS_DIR]
    for name, source in harness_files.items():
        args += ["--ro-bind", str(source), f"{HARNESS_DIR}/{name}"]
    return args, made


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
