"""Fixtures shared by every test package."""

from collections.abc import Iterator

import pytest

from fabric.testing import MosquittoBroker, find_mosquitto


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoBroker]:
    """A real Mosquitto, started on a free port with its own generated config, for the session."""
    if find_mosquitto() is None:
        raise RuntimeError("mosquitto is not installed: run `make test`, which installs it with apt")
    with MosquittoBroker() as running:
        yield running
