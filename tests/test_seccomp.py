"""The seccomp deny-list, for real: every test installs it in a fresh subprocess and makes the system calls."""
import errno
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "trainer" / "seccomp.py"
ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(platform.machine())

pytestmark = pytest.mark.skipif(sys.platform != "linux" or ARCH is None, reason="seccomp filter: Linux x86_64/aarch64")

# The probes' syscall numbers, written down independently of the module's tables
NR = {
    "x86_64": {"keyctl": 250, "add_key": 248, "request_key": 249, "shmget": 29, "msgget": 68, "semget": 64,
               "mq_open": 240, "ptrace": 101, "process_vm_readv": 310, "kcmp": 312, "fallocate": 285,
               "getpid": 39},
    "aarch64": {"keyctl": 219, "add_key": 217, "request_key": 218, "shmget": 194, "msgget": 186, "semget": 190,
                "mq_open": 180, "ptrace": 117, "process_vm_readv": 270, "kcmp": 272, "fallocate": 47,
                "getpid": 172},
}[ARCH]

# Imports the module by path, as the launcher does under `python -I -S`, and calls syscalls through ctypes.
PRELUDE = f"""
import ctypes, errno, importlib.util, json, os, sys, threading, time
spec = importlib.util.spec_from_file_location("seccomp", {str(MODULE)!r})
seccomp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seccomp)
NR = {NR!r}
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    if isinstance(nr, str):
        nr = NR[nr]
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *args)
    return ret, (ctypes.get_errno() if ret == -1 else 0)

def denied(nr, *args, code=errno.EPERM):
    return call(nr, *args) == (-1, code)

def keyctl_denied():  # KEYCTL_GET_KEYRING_ID of the process keyring, without creating it
    return denied("keyctl", 0, -2, 0)

def seccomp_mode():
    return [line.split()[1] for line in open("/proc/thread-self/status") if line.startswith("Seccomp:")][0]
"""


def run(code: str, *args: str, isolated: bool = True, timeout: float = 60) -> str:
    """Run PRELUDE + code in a fresh Python; return its stdout (it must exit 0)."""
    flags = ["-I", "-S"] if isolated else []
    done = subprocess.run([sys.executable, *flags, "-c", PRELUDE + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def load_module():
    spec = importlib.util.spec_from_file_location("seccomp_under_test", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROBES = """
KEY = 0x70676f6c  # an IPC key nobody uses; no IPC_CREAT, so nothing is ever created
path = sys.argv[1]
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
buffer = ctypes.create_string_buffer(b"pgolf", 8)  # at the same address in the forked child
iov = (ctypes.c_void_p * 2)(ctypes.addressof(buffer), 8)
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

def probes():
    return {
        "keyctl": call("keyctl", 0, -2, 0),
        "add_key": call("add_key", b"pgolf_no_such_type", b"d", None, 0, -2),
        "request_key": call("request_key", b"pgolf_no_such_type", b"d", None, 0),
        "shmget": call("shmget", KEY, 4096, 0),
        "msgget": call("msgget", KEY, 0),
        "semget": call("semget", KEY, 1, 0),
        "mq_open": call("mq_open", b"pgolf-no-such-queue", os.O_RDONLY, 0, None),
        "ptrace": call("ptrace", 16, child, 0, 0),  # PTRACE_ATTACH to our own child
        "process_vm_readv": call("process_vm_readv", child, iov, 1, iov, 1, 0),
        "kcmp": call("kcmp", os.getpid(), child, 0, 0, 0),  # KCMP_FILE 0 vs 0
        "fallocate": call("fallocate", fd, 0, 0, 4096),
    }

before = probes()
seccomp.install()
after = probes()
os.kill(child, 9)
os.waitpid(child, 0)
print(json.dumps({"before": before, "after": after}))
"""


def test_denied_calls_fail_with_eperm_and_worked_before(tmp_path):
    result = json.loads(run(PROBES, str(tmp_path / "reserved")))
    for name, (ret, code) in result["after"].items():
        expected = errno.EOPNOTSUPP if name == "fallocate" else errno.EPERM
        assert (ret, code) == (-1, expected), f"{name} after install: {ret}, {errno.errorcode.get(code)}"
    # the same calls were not refused before, so the EPERM above is the filter's
    for name, (ret, code) in result["before"].items():
        if name in ("ptrace", "process_vm_readv") and os.geteuid() != 0:
            continue  # a non-root tester may be stopped by Yama's ptrace_scope
        assert (ret, code) != (-1, errno.EPERM), f"{name} before install: already EPERM"


def test_fallocate_reserves_nothing_while_writing_files_works(tmp_path):
    out = run("""
    seccomp.install()
    path = sys.argv[1]
    with open(path, "w+b") as f:  # readable too: glibc's fallback reads before it writes
        f.write(os.urandom(1 << 20))
        fd = f.fileno()
        print(call("fallocate", fd, 0, 0, 1 << 30) == (-1, errno.EOPNOTSUPP))
        print(call("fallocate", fd, 1, 0, 1 << 30) == (-1, errno.EOPNOTSUPP))  # FALLOC_FL_KEEP_SIZE
        os.ftruncate(fd, 1 << 21)  # a sparse extension reserves nothing and stays allowed
        os.posix_fallocate(fd, 0, 3 << 20)  # glibc falls back to writing the blocks, as without fallocate
        os.fsync(fd)
    print(os.path.getsize(path), os.stat(path).st_blocks * 512 >= 3 << 20)
    """, str(tmp_path / "data.bin"))
    assert out.split() == ["True", "True", str(3 << 20), "True"]


def test_groups_and_errno_select_what_is_denied():
    out = run("""
    seccomp.install(groups=["kernel keyrings"], errno_value=errno.ENOSPC)
    print(json.dumps([denied("keyctl", 0, -2, 0, code=errno.ENOSPC),
                      call("fallocate", -1, 0, 0, 1), call("shmget", 0x70676f6c, 1, 0)]))
    """)
    assert json.loads(out) == [True, [-1, errno.EBADF], [-1, errno.ENOENT]]  # the other groups stay allowed


def test_bad_arguments_install_nothing():
    out = run("""
    for kwargs in ({"groups": ["no such group"]}, {"errno_value": 0}, {"errno_value": 4096}):
        try:
            seccomp.install(**kwargs)
        except ValueError:
            print("ValueError")
    print(seccomp_mode())
    """)
    assert out.split() == ["ValueError"] * 3 + ["0"]


def test_children_threads_and_exec_inherit_the_filter():
    out = run("""
    seccomp.install()
    results = []
    thread = threading.Thread(target=lambda: results.append(keyctl_denied()))
    thread.start(); thread.join()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if keyctl_denied() else 1)
    forked = os.waitpid(pid, 0)[1] == 0
    # a new program (as the launcher execs train.py)
    probe = "import ctypes; print(ctypes.CDLL(None, use_errno=True).syscall(%d, 0, -2, 0), ctypes.get_errno())"
    exec_child = __import__("subprocess").run([sys.executable, "-I", "-S", "-c", probe % NR["keyctl"]],
                                              capture_output=True, text=True)
    print(results[0], forked, exec_child.stdout.strip() == "-1 %d" % errno.EPERM)
    """)
    assert out.split() == ["True", "True", "True"]


def test_threads_started_before_install_are_covered():
    out = run("""
    go, results = threading.Event(), []
    def worker():
        go.wait()
        results.append((keyctl_denied(), seccomp_mode()))
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    seccomp.install()
    go.set()
    for t in threads:
        t.join()
    print(json.dumps(results))
    """)
    assert json.loads(out) == [[True, "2"]] * 3


def test_filter_cannot_be_removed():
    out = run("""
    seccomp.install()
    # no_new_privs cannot be cleared
    zero = ctypes.c_ulong(0)
    print(libc.prctl(38, zero, zero, zero, zero) == -1 and ctypes.get_errno() == errno.EINVAL)
    # another filter, even one that allows everything, only stacks: the most restrictive answer wins
    Filter = seccomp._SockFilter * 1
    allow_all = Filter((0x06, 0, 0, 0x7FFF0000))
    prog = seccomp._SockFprog(1, allow_all)
    print(libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(prog), zero, zero) == 0)
    print(keyctl_denied(), flush=True)
    # and it survives exec
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", "import ctypes; "
             "print(ctypes.CDLL(None, use_errno=True).syscall(%d, 0, -2, 0), ctypes.get_errno()); "
             "print(open('/proc/self/status').read().count('NoNewPrivs:\\t1'))" % NR["keyctl"]])
    """)
    assert out.split() == ["True", "True", "True", "-1", str(errno.EPERM), "1"]


def test_every_listed_call_and_the_x32_abi_are_denied():
    # A distinctive errno proves the filter answered; unprivileged, so a call the filter missed does nothing
    out = run("""
    if os.geteuid() == 0:
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    seccomp.install(errno_value=4000)
    table = seccomp._ARCHES[seccomp._native_arch()][1]
    names = [name for group in seccomp.DENIED.values() for name in group if name in table]
    print(json.dumps({
        "not denied": [name for name in names if not denied(table[name], 0, 0, 0, 0, 0, 0,
                                                             code=errno.EOPNOTSUPP if name == "fallocate" else 4000)],
        "x32 denied": NR["getpid"] != 39 or denied(0x40000000 | NR["getpid"], code=4000),
        "getpid works": call("getpid")[0] == os.getpid(),
    }))
    """)
    assert json.loads(out) == {"not denied": [], "x32 denied": True, "getpid works": True}


INT80_GETPID = """
import mmap
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20 (i386 getpid); int 0x80; ret
int80_getpid = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
"""


@pytest.mark.skipif(ARCH != "x86_64", reason="the i386 ABI exists on x86_64 only")
def test_calls_through_another_abi_kill_the_process():
    def attempt(code):
        return subprocess.run([sys.executable, "-I", "-S", "-c", PRELUDE + INT80_GETPID + code],
                              capture_output=True, text=True, timeout=30)
    control = attempt("print(int80_getpid() == os.getpid())")
    if control.stdout.strip() != "True":
        pytest.skip(f"this kernel runs no i386 system calls (exit {control.returncode})")
    done = attempt("seccomp.install(); print('installed', flush=True); int80_getpid(); print('survived')")
    assert (done.returncode, done.stdout.split()) == (-31, ["installed"])  # SIGSYS


def test_torch_training_still_works():
    out = run("""
    seccomp.install()
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 32)
    for _ in range(3):
        loss = (model(x) @ torch.randn(32, 32)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    data = torch.utils.data.TensorDataset(torch.arange(8.0))
    batches = list(torch.utils.data.DataLoader(data, batch_size=4, num_workers=1))  # fork + shared memory
    pid = os.fork()
    if pid == 0:
        os._exit(0 if (torch.ones(4, 4) @ torch.ones(4, 4)).sum().item() == 64 else 1)
    print(torch.isfinite(loss).item(), len(batches), os.waitpid(pid, 0)[1] == 0, keyctl_denied())
    """, isolated=False, timeout=120)
    assert out.split()[-4:] == ["True", "2", "True", "True"]


def test_program_logic_for_both_architectures():
    """The generated BPF, run by a tiny interpreter: covers aarch64 without aarch64 hardware."""
    seccomp = load_module()

    def evaluate(program, nr, arch):
        data = (nr & 0xFFFFFFFF).to_bytes(4, sys.byteorder) + arch.to_bytes(4, sys.byteorder)
        acc, pc = 0, 0
        while True:
            code, jt, jf, k = program[pc]
            pc += 1
            if code == 0x20:
                acc = int.from_bytes(data[k:k + 4], sys.byteorder)
            elif code == 0x15:
                pc += jt if acc == k else jf
            elif code == 0x45:
                pc += jt if acc & k else jf
            elif code == 0x06:
                return k
            else:
                raise AssertionError(f"unexpected opcode {code:#x}")

    allow, kill, eperm, unsupported = 0x7FFF0000, 0x80000000, 0x00050000 | errno.EPERM, 0x00050000 | errno.EOPNOTSUPP
    for arch, other in (("x86_64", "aarch64"), ("aarch64", "x86_64")):
        audit_arch, table, _, has_x32 = seccomp._ARCHES[arch]
        program = seccomp._program(arch)
        denied = {table[n] for group in seccomp.DENIED.values() for n in group if n in table}
        for nr in range(0, 600):
            expected = unsupported if nr == table["fallocate"] else eperm if nr in denied else allow
            assert evaluate(program, nr, audit_arch) == expected, (arch, nr)
        assert evaluate(program, 0x40000000 | 39, audit_arch) == (eperm if has_x32 else allow)
        assert evaluate(program, 39, seccomp._ARCHES[other][0]) == kill
        assert evaluate(program, 39, 0x40000003) == kill  # AUDIT_ARCH_I386
        only_keys = seccomp._program(arch, ["kernel keyrings"], errno.ENOSYS)
        assert evaluate(only_keys, table["keyctl"], audit_arch) == 0x00050000 | errno.ENOSYS
        assert evaluate(only_keys, table["fallocate"], audit_arch) == allow


def _header_numbers(path: Path) -> dict[str, int]:
    return {name: int(nr) for name, nr in re.findall(r"#define\s+__NR_(\w+)\s+(\d+)\b", path.read_text())}


@pytest.mark.parametrize("arch, header", [("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
                                          ("aarch64", "/usr/include/asm-generic/unistd.h")])
def test_syscall_numbers_match_the_kernel_headers(arch, header):
    if not Path(header).is_file():
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    seccomp = load_module()
    kernel = _header_numbers(Path(header))
    audit_arch, table, seccomp_nr, _ = seccomp._ARCHES[arch]
    names = {name for group in seccomp.DENIED.values() for name in group}
    assert set(table) <= names
    assert {name: table.get(name) for name in names} == {name: kernel.get(name) for name in names}
    assert seccomp_nr == kernel["seccomp"]
