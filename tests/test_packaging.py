"""The project as a user installs it: a wheel in a fresh virtualenv, a session run from an unrelated folder,
and that session's folder copied and moved, then exported and resumed where it now is."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from datetime import datetime
from pathlib import Path

import pytest

from agent.outcome import ExitCode
from tests.test_export import independent_problems
from trainer import bubblewrap

ROOT = Path(__file__).resolve().parents[1]
READ_AT_RUN_TIME = ("prompts/*.txt", "trainer/*.py")  # files the code opens by path, beside its modules


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the source tree, so nothing outside it (the checkout's venv, sessions) can leak in."""
    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "sessions", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(work / "dist")], check=True)
    return next((work / "dist").glob("pgolf_agent-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel) -> Path:
    """A new virtualenv holding the wheel; its dependencies (torch, ray, ...) are this interpreter's, listed
    after the venv's own site-packages, so the installed pgolf-agent is the one imported (offline, no download).
    Outside /tmp, which every sandbox replaces with an empty one of its own."""
    venv = ROOT / "build" / f"test-venv-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(purelib, "pgolf-test-dependencies.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True)
    where = subprocess.run([python, "-c", "import agent, prompts; print(agent.__file__)"], cwd=venv,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where
    yield venv
    shutil.rmtree(venv)


def cli(venv: Path, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PGOLF_SESSIONS_DIR")}
    return subprocess.run([str(venv / "bin" / "pgolf-agent"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recorded(installed, tmp_path_factory) -> Path:
    """A tiny session of the installed package, run from a folder that has nothing of the project."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    done = cli(installed, "run", "--agent", "search", "--budget", "2", "--time-budget", "2", "--hours", "0.2",
               cwd=elsewhere)
    assert done.returncode == ExitCode.OK, done.stdout[-2000:] + done.stderr[-3000:]
    (session,) = (elsewhere / "sessions").iterdir()
    return session


@pytest.mark.slow
def test_the_wheel_holds_every_file_a_session_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {str(p.relative_to(ROOT)) for pattern in READ_AT_RUN_TIME for p in ROOT.glob(pattern)}
    assert wanted and wanted <= names, sorted(wanted - names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "sessions/"))]


@pytest.mark.slow
def test_installed_package_runs_a_session_and_writes_its_record(recorded):
    for name in ("settings.json", "trajectory.jsonl", "methodology.md", "ledger.sqlite", "work/train.py",
                 "runs/000/result.json"):
        assert (recorded / name).is_file(), name
    run0 = json.loads((recorded / "runs" / "000" / "result.json").read_text())
    assert run0["description"].startswith("baseline")
    assert run0["status"] in ("completed", "unverified") and run0["total_steps"], run0  # it trained


def test_a_python_under_tmp_is_refused_before_any_run(monkeypatch):
    monkeypatch.setattr(sys, "prefix", "/tmp/somewhere/venv")
    with pytest.raises(bubblewrap.SandboxUnavailable, match="installed under /tmp/somewhere/venv.*outside those"):
        bubblewrap.bwrap_path()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_moved_or_copied_session_is_exported_and_resumed_where_it_is(installed, recorded, tmp_path):
    before = snapshot(recorded)
    copied = tmp_path / "copied"
    shutil.copytree(recorded, copied)
    moved = tmp_path / "moved"
    shutil.copytree(recorded, tmp_path / "to-move")
    (tmp_path / "to-move").rename(moved)
    # Both still name the original folder in settings.json, relative to the folder the session ran in; run
    # from there, a command that followed settings.json would write into the original.
    ran_in = recorded.parent.parent
    assert (ran_in / json.loads((moved / "settings.json").read_text())["session_dir"]).resolve() == recorded.resolve()
    for folder in (copied, moved):
        exported = cli(installed, "export", str(folder), cwd=ran_in)
        if any(json.loads(p.read_text())["verified"] for p in folder.glob("runs/*/result.json")):
            assert exported.returncode == ExitCode.OK, exported.stdout + exported.stderr
            body = json.loads((folder / "submission.json").read_text())
            times = [datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00"))
                     for line in (folder / "trajectory.jsonl").read_text().splitlines()]
            assert independent_problems(body, min(times), max(times)) == []
            checked = cli(installed, "export", "--check", str(folder / "submission.json"), cwd=ran_in)
            assert checked.returncode == ExitCode.OK, checked.stdout + checked.stderr
        else:  # a 2 s run on a busy machine can miss its clock: then there is no code to submit, and it says so
            assert exported.returncode == ExitCode.INVALID and "no run was verified" in exported.stdout
        resumed = cli(installed, "run", "--resume", str(folder), cwd=ran_in)
        assert resumed.returncode == ExitCode.OK, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        events = [json.loads(line) for line in (folder / "trajectory.jsonl").read_text().splitlines()]
        assert [e for e in events if e.get("event") == "resume"]
    assert snapshot(recorded) == before  # the original was neither read for writing nor touched
