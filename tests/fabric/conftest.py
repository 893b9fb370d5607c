"""The conformance suite runs every test against every transport.

The MQTT side uses the real Mosquitto of `tests/conftest.py`; each test gets its own fabric
namespace, so tests never see each other's messages.
"""

from collections.abc import AsyncIterator

import pytest

from tests.fabric.harness import Harness

TRANSPORTS = ["inproc", "mqtt"]


@pytest.fixture(params=TRANSPORTS)
async def fabric(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    broker = request.getfixturevalue("broker") if request.param == "mqtt" else None
    harness = Harness(request.param, broker)
    try:
        yield harness
    finally:
        await harness.close()
