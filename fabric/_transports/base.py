"""The transport seam: what every way of moving frames between nodes must provide.

A transport moves opaque frames (bytes) to addresses and tells about presence. It knows nothing
of envelopes: `Endpoint` does the protocol above it, identically for every transport.

Addresses are the protocol's: a node id, ``group:<name>`` or ``*``. Delivery to a node inbox is
at-least-once (QoS 1 on MQTT): a frame may arrive twice, and the endpoint drops the duplicate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["FrameHandler", "PresenceEvent", "PresenceHandler", "Transport"]


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A node appeared (with the frame it announced) or went away (`frame` is empty)."""

    node: str
    state: Literal["online", "offline"]
    frame: bytes = b""


FrameHandler = Callable[[bytes], Awaitable[None]]
"""Receives each inbound frame; awaiting it is how backpressure reaches the transport."""

PresenceHandler = Callable[[PresenceEvent], None]
"""Receives presence changes; must not block."""


class Transport(Protocol):
    """Moves frames between nodes of one fabric namespace.

    Lifecycle: `start` once, then `send`/`announce`, then `close` (idempotent). Inbound frames are
    passed to `on_frame` one at a time, in arrival order per sender; while `on_frame` is awaiting,
    the transport reads no further frames (bounded memory, backpressure toward the sender).
    """

    node_id: str

    async def start(self, on_frame: FrameHandler, on_presence: PresenceHandler, groups: list[str]) -> None:
        """Connect, subscribe to this node's inbox, its groups and the broadcast address."""
        ...

    async def send(self, address: str, frame: bytes) -> None:
        """Deliver `frame` at least once to `address`; waits while the outgoing window is full."""
        ...

    async def announce(self, frame: bytes) -> None:
        """Publish this node's presence (retained); it is withdrawn when the node leaves or dies."""
        ...

    async def close(self) -> None:
        """Withdraw presence (unless crashed), disconnect, and release everything."""
        ...
