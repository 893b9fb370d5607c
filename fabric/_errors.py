"""Errors of the fabric, under the shared root.

::

    FlowloomError
    └── FabricError               the message could not be moved; the message itself may be fine
        ├── TransportError        the connection to the broker or hub failed or is closed
        ├── DeadlineExceeded      no answer before the deadline (also a `TimeoutError`)
        ├── PeerUnreachable       the destination is not present, or died while we waited
        └── FabricClosed          the endpoint or transport was used after it was closed

Errors of paho-mqtt and of sockets are translated into these in `fabric._transports.mqtt`.
"""

from __future__ import annotations

from protocol import FlowloomError

__all__ = ["DeadlineExceeded", "FabricClosed", "FabricError", "PeerUnreachable", "TransportError"]


class FabricError(FlowloomError):
    """A message could not be moved; sending it again later may work."""


class TransportError(FabricError):
    """The connection to the broker (or in-process hub) failed or is closed."""


class DeadlineExceeded(FabricError, TimeoutError):
    """No answer arrived before the deadline."""


class PeerUnreachable(FabricError):
    """The destination node is not present, or was declared dead while we waited for it."""

    def __init__(self, node: str, why: str) -> None:
        super().__init__(f"node {node!r} is unreachable: {why}")
        self.node = node
        self.why = why


class FabricClosed(FabricError):
    """The endpoint or transport was used after it was closed."""
