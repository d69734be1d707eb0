import logging
import os

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
