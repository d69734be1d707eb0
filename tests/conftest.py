import errno
import logging
import os
import subprocess
from pathlib import Path

import pytest
import ray

from trainer.corpus import ensure_corpus


@pytest.fixture(scope="session")
def corpus():
    """The real, verified corpus (fetched once into the user cache by `make test`'s set-up)."""
    return ensure_corpus()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the module's training services (they use a Ray that is already running)."""
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def small_disk(tmp_path, request) -> Path:
    """A size-limited tmpfs of its own (the module's SMALL_DISK_MIB, else 16 MiB) to fill for real."""
    mib = getattr(request.module, "SMALL_DISK_MIB", 16)
    if os.geteuid() != 0:
        pytest.skip("filling a real disk needs a size-limited tmpfs, and mounting one needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {mib} MiB tmpfs on {disk}: {mounted.stderr.strip() or mounted.returncode}")
    request.addfinalizer(lambda: subprocess.run(["umount", "--lazy", str(disk)], check=False))
    return disk


def fill(path: Path) -> Path:
    """Write `path` until its disk is full (ENOSPC); returns the path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = os.urandom(1 << 16)
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return path
