"""The command line's promises: exit codes declared once and documented, and a Ray address that does not answer."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.outcome import EXIT_CODES, ExitCode, StopKind, exit_codes_table
from tests.stub_llm_server import StubLLMServer

ROOT = Path(__file__).resolve().parents[1]


def test_exit_codes_are_distinct_and_documented_in_help_and_readme():
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert set(EXIT_CODES) == set(StopKind)
    stopped_early = {EXIT_CODES[k] for k in (StopKind.limit, StopKind.api_failure, StopKind.interrupted, StopKind.error)}
    assert len(stopped_early) == 4 and ExitCode.OK not in stopped_early
    assert EXIT_CODES[StopKind.finished] == EXIT_CODES[StopKind.budget_spent] == ExitCode.OK
    run_help = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--help"], capture_output=True, text=True,
                              cwd=ROOT).stdout
    for text in (build_parser().format_help(), run_help):
        flat = " ".join(text.split())
        assert all(f"{c.value} {c.doc}" in flat for c in ExitCode), text
    assert exit_codes_table() in (ROOT / "README.md").read_text()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


class NotRay:
    """A TCP listener on loopback that is not a Ray cluster: it answers like an HTTP/1.1 server, or not at all."""

    def __init__(self, reply: bytes):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.reply = reply
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                if self.reply:
                    conn.sendall(self.reply)
                else:
                    time.sleep(6)  # silent past the probe's 5 s


def ray_run(session: Path, address: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "run", "--agent", "search", "--budget", "2",
                           "--time-budget", "2", "--session", str(session), "--ray-address", address],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_ray_address_where_nothing_answers_fails_fast_and_blocks_no_retry(tmp_path):
    session = tmp_path / "s"
    address = f"127.0.0.1:{closed_port()}"
    for attempt in (1, 2):  # the second try with the same --session meets the same clear error
        began = time.monotonic()
        done = ray_run(session, address)
        assert time.monotonic() - began < 30
        assert done.returncode == ExitCode.SETUP, done.stderr
        assert f"nothing answers at the Ray address {address}" in " ".join(done.stderr.split())
        assert "rpc_client" not in done.stderr and "gcs_client" not in done.stderr and "Traceback" not in done.stderr
        assert not session.exists(), f"attempt {attempt} left {list(session.rglob('*'))}"


@pytest.mark.parametrize("reply", [b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", b""])
def test_a_ray_address_where_something_else_listens_fails_fast(tmp_path, reply):
    listener = NotRay(reply)
    began = time.monotonic()
    done = ray_run(tmp_path / "s", f"127.0.0.1:{listener.port}")
    assert time.monotonic() - began < 30  # Ray itself would retry such an address for minutes
    assert done.returncode == ExitCode.SETUP, done.stderr
    assert "it is not a Ray cluster" in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert not (tmp_path / "s").exists()


def list_runs_then(step_after_a_tool_result: dict):
    """A model that lists the runs, then answers `step_after_a_tool_result` once it has seen a tool's result."""
    def handler(request):
        if request.last_tool_result() is None:
            return {"tool_calls": [{"name": "list_runs", "arguments": {}}]}
        return step_after_a_tool_result
    return handler


@pytest.mark.slow
@pytest.mark.parametrize("flags, step, kind, said", [
    (["--max-llm-calls", "1"], {"tool_calls": [{"name": "list_runs", "arguments": {}}]}, StopKind.limit,
     "--max-llm-calls 1 reached"),
    ([], {"status": 401, "message": "key revoked"}, StopKind.api_failure, "key revoked"),
])
def test_a_session_stopped_early_exits_with_its_own_code(tmp_path, corpus, flags, step, kind, said):
    with StubLLMServer(handler=list_runs_then(step)) as stub:
        done = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--agent", "openai", "--base-url",
                               stub.openai_base_url, "--budget", "2", "--time-budget", "2", "--hours", "0.2",
                               "--session", str(tmp_path / "s"), *flags], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OPENAI_API_KEY": "dummy"})
    assert done.returncode == EXIT_CODES[kind], done.stdout[-2000:] + done.stderr[-2000:]
    assert said in " ".join(done.stdout.split())
    end = [json.loads(line) for line in (tmp_path / "s" / "trajectory.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["detail"]["kind"] == kind.value
    assert (tmp_path / "s" / "methodology.md").is_file()  # the record is written however it stopped
