"""The conformance suite runs every test against every transport.

The MQTT side uses a real Mosquitto that the fixture starts on a free port with its own config;
each test gets its own fabric namespace, so tests never see each other's messages.
"""

from collections.abc import AsyncIterator, Iterator

import pytest

from fabric.testing import MosquittoBroker, find_mosquitto
from tests.fabric.harness import Harness

TRANSPORTS = ["inproc", "mqtt"]


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None:
        raise RuntimeError("mosquitto is not installed: run `make test`, which installs it with apt")
    with MosquittoBroker() as running:
        yield running


@pytest.fixture(params=TRANSPORTS)
async def fabric(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    broker = request.getfixturevalue("broker") if request.param == "mqtt" else None
    harness = Harness(request.param, broker)
    try:
        yield harness
    finally:
        await harness.close()
