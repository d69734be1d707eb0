"""The metric under attack: hostile train.py files run for real through the training service.

One test per way a script has fooled the metric before, each asserting that the run is unverified
or stopped with a reason that names the cause, beside an honest model at the same budget that is
still verified. Real Ray, real sandboxes, real processes; a 2 s training budget.
"""
import json
import os
import textwrap
from pathlib import Path

import pytest

from budget.models import Budget, RunRequest, RunStatus, ServiceSettings
from budget.service import TrainingService
from trainer.cgroup import MemoryCgroup
from trainer.evaluator import FRAME_ROWS

pytestmark = pytest.mark.slow

HONEST = """
import json, time, torch, torch.nn as nn
from prepare import TIME_BUDGET, evaluate_bpb, make_dataloader
torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(256, 32), nn.Linear(32, 256))
opt = torch.optim.Adam(model.parameters(), 1e-2)
loader = make_dataloader(8, 64)
start = time.time()
while time.time() - start < TIME_BUDGET:
    x, y = next(loader)
    loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
print(json.dumps({"val_bpb": evaluate_bpb(model, 8)}))
"""

# A bigram model that reads the next byte from its input at some positions. The rest of each script
# is the attack around it.
PEEK = """
import torch, torch.nn as nn, torch.nn.functional as F

class Peek(nn.Module):
    def __init__(self, every=1):
        super().__init__()
        self.every = every
    def honest(self, x):
        return torch.zeros(*x.shape, 256)
    def forward(self, x):
        logits = self.honest(x)
        nxt = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
        cheat = torch.arange(x.shape[1]) % self.every == 0
        logits[:, cheat] += 12 * F.one_hot(nxt[:, cheat], 256).float()
        return logits
"""


@pytest.fixture(scope="module")
def service(local_ray, tmp_path_factory):
    settings = ServiceSettings(session_dir=tmp_path_factory.mktemp("integrity"), memory_mb=768, disk_mb=64,
                               budget=Budget(max_runs=40, time_budget_secs=2, run_timeout_secs=40))
    with TrainingService(settings) as svc:
        yield svc


def submit(service, code: str, description: str):
    return service.submit(RunRequest(train_code=textwrap.dedent(code), description=description))


@pytest.fixture(scope="module")
def honest(service):
    result = submit(service, HONEST, "honest")
    assert result.status == RunStatus.completed and result.verified, result.reasons
    return result


def unverified(result, *words):
    assert not result.verified and result.status != RunStatus.completed, result
    text = " ".join(result.reasons)
    assert all(w in text for w in words), result.reasons
    return text


def test_an_honest_model_is_verified(honest):
    assert 3.0 < honest.val_bpb < 8.5 and honest.slowest_frame_secs < 1.0


def test_a_huge_logit_does_not_widen_the_audit(service, honest):
    # The tolerance used to scale with the largest |log-prob|; one -1e4 logit on an unused byte made it huge.
    code = PEEK + """
class Wide(Peek):
    def honest(self, x):
        logits = torch.zeros(*x.shape, 256)
        logits[..., 255] = -1e4
        return logits

from prepare import evaluate_bpb
print(evaluate_bpb(Wide(), 8))
"""
    unverified(submit(service, code, "peek behind a huge logit"), "causality audit failed", "looks ahead")


def test_state_kept_between_frames_cannot_answer_the_audit(service, honest):
    # Remembers every row it scored and answers any row that shares its first bytes from memory, so an
    # audit copy would get the remembered (peeking) logits; and tries to carry that memory in files too.
    code = PEEK + """
import os
MEMORY = {}
class Memo(Peek):
    def forward(self, x):
        out = super().forward(x)
        for i, row in enumerate(x):
            key = bytes(row[:16].tolist())
            if key in MEMORY:
                out[i] = MEMORY[key]
            MEMORY[key] = out[i].clone()
        for place in ("/tmp/memo", "/dev/shm/memo", os.path.expanduser("~/memo"), "memo"):
            try:
                with open(place, "ab") as f:
                    f.write(b"x")
            except OSError:
                pass
        return out

from prepare import evaluate_bpb
print(evaluate_bpb(Memo(), 8))
"""
    unverified(submit(service, code, "memory across frames"), "audit failed")


def test_the_evaluation_sandbox_keeps_nothing_between_frames(service, honest):
    # Counts the rows it is shown in every place state could live; a process serves one frame, so a count
    # past one frame's rows means a frame saw another's work.
    code = """
import torch, torch.nn as nn
from prepare import evaluate_bpb
from trainer_limits import FRAME_ROWS
SEEN = [0]
class Counter(nn.Module):
    def forward(self, x):
        SEEN[0] += x.shape[0]
        seen = SEEN[0]
        for place in ("/tmp/n", "/dev/shm/n", "/pgolf/n", "n"):
            try:
                with open(place, "a+") as f:
                    f.seek(0); seen = max(seen, len(f.read()) + x.shape[0]); f.write("x" * x.shape[0])
            except OSError:
                pass
        if seen > FRAME_ROWS:
            raise RuntimeError(f"state survived: {seen} rows seen")
        return torch.zeros(*x.shape, 256)
print(evaluate_bpb(Counter(), 8))
""".replace("from trainer_limits import FRAME_ROWS", f"FRAME_ROWS = {FRAME_ROWS}")
    result = submit(service, code, "count rows")
    assert result.verified and result.status == RunStatus.completed, result.reasons
    assert result.val_bpb == pytest.approx(8.0)  # uniform logits: exactly 8 bits per byte


def test_val_never_reaches_the_run_folder_or_its_logs(service, honest, corpus):
    # The model prints, logs and saves the windows it is sent; none of it may survive the run.
    code = """
import os, sys, torch, torch.nn as nn
from prepare import evaluate_bpb
class Leak(nn.Module):
    def forward(self, x):
        text = bytes(x.flatten().tolist())
        sys.stdout.buffer.write(text); sys.stderr.buffer.write(text)
        for place in ("leak.bin", "/tmp/leak.bin"):
            try:
                with open(place, "ab") as f:
                    f.write(text)
            except OSError:
                pass
        raise RuntimeError(text[1:200].decode("latin-1"))
print(evaluate_bpb(Leak(), 8))
print("after", flush=True)
"""
    result = submit(service, code, "leak windows")
    run_dir = Path(service.settings.session_dir) / "runs" / f"{result.run_id:03d}"
    val = (corpus.directory / "val.bin").read_bytes()[:2 * 65536]
    kept = b"".join(p.read_bytes() for p in run_dir.iterdir() if p.name != "train.py")
    kept += json.dumps(result.model_dump(mode="json")).encode()
    kept += "\n".join(result.reasons + [result.stdout_tail, result.stderr_tail]).encode("latin-1", "replace")  # unescaped
    pieces = {val[i:i + 48] for i in range(0, len(val) - 48, 16)}
    assert not any(kept[i:i + 48] in pieces for i in range(len(kept) - 48)), "val text reached the researcher"
    assert sorted(p.name for p in run_dir.iterdir()) == ["result.json", "stderr.log", "stdout.log", "train.py"]


def test_code_carrying_val_text_is_flagged(service, honest, corpus):
    stretch = (corpus.directory / "val.bin").read_bytes()[70_000:72_000].decode("utf-8", "replace")
    code = HONEST + f"\nKNOWN_BY_HEART = {stretch!r}\n"
    unverified(submit(service, code, "pasted text"), "validation text")


def test_a_run_leaves_nothing_for_the_next_in_keyrings_or_ipc(service, honest):
    probe = """
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_ADD_KEY, SYS_KEYCTL, SYS_SHMGET = 248, 250, 29   # x86_64
KEY_SPEC_USER_KEYRING, KEYCTL_SEARCH, IPC_CREAT = -4, 10, 0o1000
def call(*args):
    r = libc.syscall(*args)
    return r if r >= 0 else -ctypes.get_errno()
found = call(SYS_KEYCTL, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, b"user", b"pgolf-stash", 0)
stored = call(SYS_ADD_KEY, b"user", b"pgolf-stash", b"val windows", 11, KEY_SPEC_USER_KEYRING)
shm = call(SYS_SHMGET, 0x5EED, 4096, IPC_CREAT | 0o600)
print(json.dumps({"found": found, "stored": stored, "shm": shm}), file=sys.stderr)
""" + HONEST
    if os.uname().machine != "x86_64":
        pytest.skip("the probe uses x86_64 syscall numbers")
    first, second = submit(service, probe, "stash"), submit(service, probe, "find")
    for result in (first, second):
        assert result.verified, result.reasons
        seen = json.loads(next(line for line in result.stderr_tail.splitlines() if line.startswith("{")))
        assert seen["stored"] < 0 and seen["found"] < 0 and seen["shm"] < 0, seen  # EPERM: nothing to keep


def test_training_inside_the_evaluation_is_on_the_clock(service, honest):
    # The first forward call in each process trains the same number of steps (about 5 s, measured on
    # this machine before the hand-off) on train text the model carries, so every frame gives the same
    # logits: only the clock can catch it.
    code = """
import json, time, torch, torch.nn as nn
from prepare import evaluate_bpb, make_dataloader
x, y = next(make_dataloader(8, 64))
TRAINED = []
class Late(nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(256, 32), nn.Linear(32, 256))
        self.x, self.y, self.steps = x, y, steps
    def train_steps(self, steps):
        torch.manual_seed(0)
        opt = torch.optim.Adam(self.net.parameters(), 1e-2)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(self.net(self.x).reshape(-1, 256), self.y.reshape(-1))
            opt.zero_grad(); loss.backward(); opt.step()
    def forward(self, inp):
        while not TRAINED:
            TRAINED.append(1)
            with torch.enable_grad():
                self.train_steps(self.steps)
        return self.net(inp)
Late(0).train_steps(50)  # warm up, then time 200 steps
start = time.time()
Late(0).train_steps(200)
steps = int(200 * 5.0 / (time.time() - start))
print(json.dumps({"val_bpb": evaluate_bpb(Late(steps), 8)}))
"""
    text = unverified(submit(service, code, "train in forward"), "training clock exceeded", "slowest evaluation frame")
    assert "audit" not in text  # the frames agree: it is the clock that stops it


def test_time_past_the_budget_is_not_a_grace_to_spend(service, honest):
    code = HONEST.replace("< TIME_BUDGET", "< TIME_BUDGET + 2.5")  # past the 2.02 s grace
    unverified(submit(service, code, "overtime"), "training clock exceeded")


def test_disk_use_has_a_total_and_nothing_is_left(service, honest):
    code = """
import os, time
for i in range(4):  # 4 x 30 MiB, each under the per-file cap, together over the 64 MiB of this service
    with open(f"blob{i}", "wb") as f:
        f.write(os.urandom(30 << 20))
try:
    fd = os.open("reserved", os.O_CREAT | os.O_WRONLY)
    os.posix_fallocate(fd, 0, 1 << 40)  # instant reservations are refused: this would write 1 TiB
except OSError:
    pass
time.sleep(30)
"""
    result = submit(service, code, "fill the disk")
    unverified(result, "MiB of disk", "64 MiB cap")
    run_dir = Path(service.settings.session_dir) / "runs" / f"{result.run_id:03d}"
    assert sorted(p.name for p in run_dir.iterdir()) == ["result.json", "stderr.log", "stdout.log", "train.py"]


def test_tmpfs_counts_as_memory(service, honest):
    code = """
import time
for place in ("/tmp", "/dev/shm"):  # 2 x 180 MiB of files, in tmpfs mounts of 192 MiB each
    for i in range(3):
        with open(f"{place}/{i}", "wb") as f:
            f.write(b"x" * (60 << 20))
hog = b"y" * (300 << 20)  # with torch, under the per-process limit; with the files, over the run's 768 MiB
time.sleep(30)
"""
    unverified(submit(service, code, "hide memory in tmpfs"), "/tmp and /dev/shm", "768 MiB cap")


@pytest.mark.skipif(not MemoryCgroup.available(), reason="no memory cgroup can be made here")
def test_memory_spike_between_two_checks_is_stopped(service, honest):
    # Four children take 300 MiB each at once and are gone within a tenth of a second, faster than the
    # watchdog looks; then the script trains honestly. The kernel's cap holds between the looks.
    code = """
import os
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(300 << 20)
        block[::4096] = b"x" * len(block[::4096])
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
""" + HONEST
    # Stopped either way: by the kernel, or by the watchdog when one of its looks falls inside the spike
    unverified(submit(service, code, "memory spike between checks"), "killed", "memory", "768 MiB")
