"""The failure detector: silence declares a peer dead, our own pauses do not."""

from __future__ import annotations

from fabric import PeerEvent, PeerTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def table() -> tuple[PeerTable, Clock, list[PeerEvent]]:
    clock, events = Clock(), []
    peers = PeerTable(events.append, dead_after_s=1.0, clock=clock)
    peers.seen("edge-1")
    return peers, clock, events


def test_a_silent_peer_is_declared_dead() -> None:
    peers, clock, events = table()
    for _ in range(5):  # sweeps on time, no word from edge-1 for 1.25 s
        clock.now += 0.25
        peers.sweep(0.25)
    assert "edge-1" not in peers
    assert [e.kind for e in events] == ["joined", "dead"]


def test_a_late_sweep_counts_the_delay_as_our_own_pause() -> None:
    """A process stalled 3 s (a long import, a busy CPU) heard nothing; that is not the peer's fault."""
    peers, clock, _ = table()
    peers.sweep(0.25)
    clock.now += 3.0  # the sweep meant to run after 0.25 s runs after 3 s
    assert peers.sweep(0.25) == []
    assert "edge-1" in peers
    for _ in range(3):  # but silence after the pause still counts: 1 s of it is allowed ...
        clock.now += 0.25
        peers.sweep(0.25)
    assert "edge-1" in peers
    clock.now += 0.25  # ... and no more
    assert peers.sweep(0.25) == ["edge-1"]
