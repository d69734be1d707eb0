import pytest

from trainer.corpus import ensure_corpus


@pytest.fixture(scope="session")
def corpus():
    """The real, verified corpus (fetched once into the user cache by `make test`'s set-up)."""
    return ensure_corpus()
