"""Who is on the fabric: the peer table and the heartbeat failure detector."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from protocol import Capabilities

__all__ = ["Peer", "PeerEvent", "PeerTable"]


@dataclass
class Peer:
    """A node this endpoint has heard of."""

    node: str
    capabilities: Capabilities | None = None
    versions: tuple[int, ...] = ()
    bulk: str | None = None
    """Where the node accepts direct bulk streams, from its `hello`; None: it accepts none."""
    alive: bool = True
    last_seen: float = 0.0
    """`time.monotonic()` when anything from the node last arrived."""


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A node joined, left on purpose (bye, or its presence withdrawn), or was declared dead."""

    node: str
    kind: Literal["joined", "left", "dead"]
    capabilities: Capabilities | None = None


class PeerTable:
    """Tracks peers from presence and traffic; declares a peer dead after `dead_after_s` of silence.

    A peer that was declared dead and is heard from again joins again.
    """

    def __init__(
        self,
        on_event: Callable[[PeerEvent], None],
        *,
        dead_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._peers: dict[str, Peer] = {}
        self._on_event = on_event
        self.dead_after_s = dead_after_s
        self._clock = clock
        self._last_sweep: float | None = None

    def __contains__(self, node: str) -> bool:
        peer = self._peers.get(node)
        return peer is not None and peer.alive

    def get(self, node: str) -> Peer | None:
        """The peer, alive or not, if known."""
        return self._peers.get(node)

    def alive(self) -> list[Peer]:
        """Peers currently believed alive."""
        return [p for p in self._peers.values() if p.alive]

    def seen(
        self,
        node: str,
        capabilities: Capabilities | None = None,
        versions: tuple[int, ...] = (),
        bulk: str | None = None,
    ) -> None:
        """Something arrived from `node`: it is alive (and joins if it was not).

        `capabilities` (with `versions` and `bulk`) come from its `hello`; they replace what was known.
        """
        peer = self._peers.get(node)
        now = self._clock()
        if peer is None:
            peer = self._peers[node] = Peer(node, capabilities, versions, alive=False)
        if capabilities is not None:
            peer.capabilities, peer.versions, peer.bulk = capabilities, versions, bulk
        peer.last_seen = now
        if not peer.alive:
            peer.alive = True
            self._on_event(PeerEvent(node, "joined", peer.capabilities))

    def describe(
        self, node: str, capabilities: Capabilities, versions: tuple[int, ...] = (), bulk: str | None = None
    ) -> None:
        """Record what `node` is (from a hello passed on by a relay) without taking it as alive."""
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = Peer(node, alive=False)
        peer.capabilities, peer.versions, peer.bulk = capabilities, versions, bulk

    def gone(self, node: str, kind: Literal["left", "dead"]) -> None:
        """The node said bye, its presence was withdrawn, or it went silent."""
        peer = self._peers.get(node)
        if peer is None or not peer.alive:
            return
        peer.alive = False
        self._on_event(PeerEvent(node, kind, peer.capabilities))

    def sweep(self, interval: float | None = None) -> list[str]:
        """Declare dead every alive peer silent for longer than `dead_after_s`; return them.

        With `interval` (the period the sweep is meant to run at), a sweep that runs late counts
        the delay as our own pause, not the peers' silence: a process stalled by a long import or
        a busy CPU heard nothing while it stalled, and must not declare everyone dead for it.
        """
        now = self._clock()
        if interval is not None and self._last_sweep is not None:
            paused = now - self._last_sweep - interval
            if paused > 0:
                for peer in self._peers.values():
                    peer.last_seen += paused
        self._last_sweep = now
        dead = [p.node for p in self._peers.values() if p.alive and now - p.last_seen > self.dead_after_s]
        for node in dead:
            self.gone(node, "dead")
        return dead
