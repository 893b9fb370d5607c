"""Builds endpoints on a given transport kind, so one suite checks every transport."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from fabric import Endpoint, InprocHub, LinkTable, PeerEvent
from protocol import Capabilities


class Harness:
    """Makes started endpoints of one fabric; closes them all at the end."""

    def __init__(self, kind: str, broker: Any = None) -> None:
        self.kind = kind
        self.broker = broker
        self.namespace = f"t{uuid.uuid4().hex[:12]}"  # each test its own fabric: no cross-talk
        self.hub = InprocHub() if kind == "inproc" else None
        self._endpoints: list[Endpoint] = []

    def transport(self, node: str) -> Any:
        if self.hub is not None:
            return self.hub.transport(node)
        from fabric import MqttTransport

        return MqttTransport(self.broker.url, node, namespace=self.namespace)

    async def endpoint(self, node: str, *, links: LinkTable | None = None, **kwargs: Any) -> Endpoint:
        kwargs.setdefault("heartbeat_s", 0.2)
        kwargs.setdefault("capabilities", Capabilities(tier="edge", cores=1, memory_mb=64))
        ep = Endpoint(node, self.transport(node), links=links, **kwargs)
        await ep.start()
        self._endpoints.append(ep)
        return ep

    async def close(self) -> None:
        for ep in reversed(self._endpoints):
            await ep.close()


def recorder(ep: Endpoint) -> list[PeerEvent]:
    events: list[PeerEvent] = []
    ep.add_peer_listener(events.append)
    return events


async def eventually(check: Callable[[], bool], *, within: float = 30.0, what: str = "condition") -> None:
    """Wait until `check()` holds; a generous bound only so a broken build fails instead of hanging."""
    import asyncio
    import time

    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within}s")
        await asyncio.sleep(0.01)
