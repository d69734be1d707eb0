"""A seccomp-BPF deny-list for the untrusted train.py, installed by the sandbox launcher.

A run must leave nothing behind and must not reach other processes, and a few
system calls defeat both however the run is contained: a kernel keyring
outlives the process that made it (the user's keyrings belong to the host uid
when the sandbox has no user namespace of its own), System V IPC objects
outlive it too, fallocate reserves gigabytes of disk in microseconds without
writing a byte, and ptrace and friends read or write another process's memory.
`install()` makes those calls -- and some rarely used, bug-prone kernel
interfaces no training script needs -- fail with EPERM (fallocate with
EOPNOTSUPP, so that callers fall back to writing), and allows everything
else. The filter applies to the calling process, to all of its threads (also
the ones that already exist), to every child and every program it execs, and
can never be removed.

Standard library only (ctypes and struct) and no project imports: the
launcher runs as `python -I -S`, where no site-packages can be imported.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

__all__ = ["DENIED", "SeccompError", "install"]

# The calls denied by default, grouped by why.
DENIED: dict[str, tuple[str, ...]] = {
    # keys outlive the process: the user keyring stays with the uid until logout or reboot
    "kernel keyrings": ("keyctl", "add_key", "request_key"),
    # segments, queues and semaphore sets persist after their creator exits
    "System V and POSIX IPC": (
        "shmget", "shmat", "shmdt", "shmctl",
        "msgget", "msgsnd", "msgrcv", "msgctl",
        "semget", "semop", "semctl", "semtimedop",
        "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
    ),
    "reaching other processes' memory": (
        "ptrace", "process_vm_readv", "process_vm_writev",
        "kcmp",  # compares another process's memory map, files... (an address-space oracle)
        "pidfd_getfd",  # copies a file descriptor out of another process
        "process_madvise",  # gives memory advice on another process's pages
    ),
    # reserves disk space instantly without writing, and with FALLOC_FL_KEEP_SIZE past RLIMIT_FSIZE
    "disk reservations": ("fallocate",),
    # large, often-exploited kernel interfaces a training script never uses
    "kernel attack surface": (
        "bpf", "perf_event_open", "userfaultfd",
        "io_uring_setup", "io_uring_enter", "io_uring_register",
        "modify_ldt",  # x86 only: custom segment descriptors, for 16-bit code and Wine
        "uselib",  # x86 only: obsolete a.out shared-library loader
    ),
    # root-only administration; denied so that a flaw in their permission checks cannot matter
    "system administration": (
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "reboot", "swapon", "swapoff", "acct",
        "open_by_handle_at",  # opens any file by its handle, escaping the mount namespace
    ),
}

# Calls answered with their own errno, whatever install() is given. fallocate says "not supported by this
# file system", which callers handle: glibc's posix_fallocate then writes the blocks for real (paced, and
# within RLIMIT_FSIZE), as PyTorch needs for the shared memory of DataLoader workers; EPERM breaks that.
_OWN_ERRNO = {"fallocate": errno.EOPNOTSUPP}

# Syscall numbers: x86_64 from arch/x86/entry/syscalls/syscall_64.tbl, aarch64
# from include/uapi/asm-generic/unistd.h (which has no modify_ldt or uselib).
_X86_64 = {
    "keyctl": 250, "add_key": 248, "request_key": 249,
    "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67,
    "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
    "semget": 64, "semop": 65, "semctl": 66, "semtimedop": 220,
    "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243,
    "mq_notify": 244, "mq_getsetattr": 245,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "pidfd_getfd": 438, "process_madvise": 440,
    "fallocate": 285,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "modify_ldt": 154, "uselib": 134,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163,
    "open_by_handle_at": 304,
}
_AARCH64 = {
    "keyctl": 219, "add_key": 217, "request_key": 218,
    "shmget": 194, "shmctl": 195, "shmat": 196, "shmdt": 197,
    "msgget": 186, "msgctl": 187, "msgrcv": 188, "msgsnd": 189,
    "semget": 190, "semctl": 191, "semtimedop": 192, "semop": 193,
    "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182, "mq_timedreceive": 183,
    "mq_notify": 184, "mq_getsetattr": 185,
    "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
    "pidfd_getfd": 438, "process_madvise": 440,
    "fallocate": 47,
    "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
    "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89,
    "open_by_handle_at": 265,
}

# arch -> (AUDIT_ARCH_* value seen in seccomp_data.arch, syscall table, number of seccomp(2), has x32 ABI)
_ARCHES = {
    "x86_64": (0xC000003E, _X86_64, 317, True),  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
    "aarch64": (0xC00000B7, _AARCH64, 277, False),  # EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
}
_X32_SYSCALL_BIT = 0x40000000

# classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h)
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = 32-bit word of seccomp_data at offset k
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_OFFSET_NR, _OFFSET_ARCH = 0, 4  # struct seccomp_data {int nr; __u32 arch; ...}
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000

_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
# Without it the kernel turns on its speculative-store-bypass mitigation for the process, which slows
# training and evaluation by about 10 % (measured on the baseline's forward); the sandbox has no secret
# of its own to protect from itself.
_SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4


class SeccompError(OSError):
    """The filter could not be installed: unsupported architecture, or the kernel refused (the message says why)."""


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def install(groups=None, errno_value: int = errno.EPERM) -> None:
    """Make the calls of `groups` (names of DENIED; all by default) fail with `errno_value`, for good.

    fallocate fails with EOPNOTSUPP whatever errno_value is, so that glibc's
    posix_fallocate writes the blocks instead (see _OWN_ERRNO). Covers this
    process, its existing and future threads and children, and whatever
    they exec. Also sets no_new_privs (so setuid binaries no longer
    gain privileges), kills the process on a system call made through another
    ABI (i386 `int 0x80`, arm32), and on x86_64 denies every x32-ABI call.
    Raises ValueError for an unknown group or an errno outside 1..4095, and
    SeccompError when the architecture is unsupported or the kernel refuses.
    """
    arch = _native_arch()
    program = _program(arch, groups, errno_value)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    filters = (_SockFilter * len(program))(*program)
    fprog = _SockFprog(len(program), filters)
    zero = ctypes.c_ulong(0)

    # without CAP_SYS_ADMIN the kernel takes a filter only from a process that can never gain privileges
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) != 0:
        raise _refused("prctl(PR_SET_NO_NEW_PRIVS)", ctypes.get_errno())

    # seccomp(2) with TSYNC puts the filter on every thread at once (threads a library may already have started)
    for flags in (_SECCOMP_FILTER_FLAG_TSYNC | _SECCOMP_FILTER_FLAG_SPEC_ALLOW, _SECCOMP_FILTER_FLAG_TSYNC):
        result = libc.syscall(ctypes.c_long(_ARCHES[arch][2]), ctypes.c_ulong(_SECCOMP_SET_MODE_FILTER),
                              ctypes.c_ulong(flags), ctypes.byref(fprog))
        if result == 0:
            return
        if result < 0 and ctypes.get_errno() != errno.EINVAL:
            break  # EINVAL: a kernel before 4.17 knows no SPEC_ALLOW; try without it
    if result > 0:  # nothing was installed
        raise SeccompError(errno.EBUSY, f"seccomp filter: thread {result} could not take the filter "
                                        "(it has a different seccomp filter or mode); nothing was installed")
    code = ctypes.get_errno()
    if code not in (errno.ENOSYS, errno.EINVAL):
        raise _refused("seccomp(SECCOMP_SET_MODE_FILTER, TSYNC)", code)

    # no seccomp(2) or no TSYNC (kernels before 3.17): prctl filters only the calling thread
    threads = _thread_count()
    if threads != 1:
        raise SeccompError(code, f"seccomp filter: seccomp(SECCOMP_SET_MODE_FILTER, TSYNC) failed "
                                 f"({os.strerror(code)}: no TSYNC on this kernel?) and prctl cannot filter "
                                 f"the {threads - 1} other threads of this process")
    if libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog), zero, zero) != 0:
        raise _refused("prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)", ctypes.get_errno())


def _program(arch: str, groups=None, errno_value: int = errno.EPERM) -> list[tuple[int, int, int, int]]:
    """The filter for `arch` as (code, jt, jf, k) instructions."""
    if groups is None:
        groups = list(DENIED)
    elif isinstance(groups, str):
        groups = [groups]
    unknown = [group for group in groups if group not in DENIED]
    if unknown:
        raise ValueError(f"unknown seccomp groups {unknown}; known: {list(DENIED)}")
    if not (isinstance(errno_value, int) and 1 <= errno_value <= 4095):
        raise ValueError(f"errno_value={errno_value!r} must be an int in 1..4095")
    audit_arch, table, _, has_x32 = _ARCHES[arch]
    # a name missing from the table is a legacy call this architecture never had
    answers = {table[name]: _OWN_ERRNO.get(name, errno_value)
               for group in groups for name in DENIED[group] if name in table}

    program = [
        (_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        # numbers mean different calls under another ABI (i386, arm32): kill rather than guess
        (_JEQ_K, 1, 0, audit_arch),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _OFFSET_NR),
    ]
    # x32 calls arrive with arch x86_64 and nr | 0x40000000, and alias the same kernel functions: deny them all
    checks = ([(_JSET_K, _X32_SYSCALL_BIT, errno_value)] if has_x32 else [])
    checks += [(_JEQ_K, nr, answers[nr]) for nr in sorted(answers)]
    # after the checks: ALLOW, then one ERRNO return per distinct errno, which matching checks jump to
    returns = sorted({answer for _, _, answer in checks}, key=lambda e: e != errno_value)
    if len(checks) + len(returns) > 256:  # jump offsets are 8 bits
        raise ValueError(f"too many denied calls for one filter: {len(checks)}")
    for i, (code, k, answer) in enumerate(checks):
        program.append((code, len(checks) - i + returns.index(answer), 0, k))
    program.append((_RET_K, 0, 0, _RET_ALLOW))
    program += [(_RET_K, 0, 0, _RET_ERRNO | answer) for answer in returns]
    return program


def _native_arch() -> str:
    """The ABI of this Python process, if the module has tables for it."""
    machine = os.uname().machine
    bits = 8 * struct.calcsize("P")
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine)
    if arch is None or bits != 64 or sys.byteorder != "little":
        raise SeccompError(errno.ENOSYS, f"seccomp filter: unsupported architecture {machine} "
                                         f"({bits}-bit {sys.byteorder}-endian process); "
                                         f"supported: 64-bit little-endian {', '.join(_ARCHES)}")
    return arch


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading
        return threading.active_count()


def _refused(call: str, code: int) -> SeccompError:
    why = {
        errno.EACCES: "no_new_privs is not set and the process lacks CAP_SYS_ADMIN",
        errno.EINVAL: "the kernel has no seccomp filter support (CONFIG_SECCOMP_FILTER) or rejected the program",
        errno.ENOSYS: "the kernel has no seccomp support",
        errno.EFAULT: "bad filter address",
        errno.ENOMEM: "out of memory, or too many filters stacked already",
    }.get(code, os.strerror(code) if code else "unknown error")
    return SeccompError(code, f"seccomp filter: {call} failed: {why}")
