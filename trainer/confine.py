"""What every process the harness starts in a sandbox does first, before any code it does not trust runs.

Standard library only: it runs under `python -I -S`, before site-packages exist for it.
The spec is a JSON object:
  limits     {"RLIMIT_...": value} set as both soft and hard limit
  keep_fds   file descriptors to keep open besides stdio
  uid        drop to this uid and gid (a root harness, see trainer/bubblewrap.py), or null
  dumpable   false makes the process unreadable to ptrace and /proc/PID/mem of its own uid
"""
import ctypes
import os
import resource
import signal

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4


def confine(spec: dict) -> None:
    for name, value in spec["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    keep = {0, 1, 2, *spec["keep_fds"]}
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    if spec.get("uid") is not None:
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it; kept across exec
    if not spec.get("dumpable", True):
        libc.prctl(_PR_SET_DUMPABLE, 0)
    import seccomp  # beside this file
    seccomp.install()


def enable_site_packages() -> None:
    """The Python installation's site-packages, once the process is confined."""
    import site
    site.main()
