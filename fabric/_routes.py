"""Routes to nodes this endpoint cannot reach directly: through relays, by measured link cost.

A node reaches directly the peers whose presence it sees on one of its transports: on MQTT the
nodes on a broker it is connected to, in-process those the hub's segment rules let it reach (its
own segments' nodes and public nodes). A relay joins several segments, and in every heartbeat it
lists the nodes it reaches directly with the measured one-way delay of each link (`links`).

From those lists every endpoint computes, with networkx, the cheapest path to each node. A node
reached directly is always sent to directly; otherwise a message goes to the first relay of the
cheapest path, which picks its own next hop the same way (hop by hop, so a relay that learns of a
change first acts on it first).

Link cost: the smallest of the last `SAMPLES` delays measured on the link (arrival time minus the
sender's timestamp, over heartbeats that came without relays) plus `HOP_MS`, so that of paths
alike the one with fewer relays wins. Between machines a sample also holds the clock offset of its
two ends; along a path those offsets telescope to the offset between the path's two ends, the same
for every path to one destination, so paths compare by their true delay. That is why the
search is Bellman-Ford, which allows the negative weights an offset can give, and not Dijkstra.
(A cycle's offsets sum to zero, so there is no negative cycle.) The delay is measured in the
direction toward the measuring node: links are taken as symmetric.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping

import networkx as nx

__all__ = ["HOP_MS", "MAX_LINKS", "SAMPLES", "Routes"]

HOP_MS = 1.0
"""Cost added per hop, in milliseconds: of paths with like delays, the one with fewer relays wins."""

SAMPLES = 8
"""Delay samples kept per link; the smallest counts (queueing only ever adds delay)."""

MAX_LINKS = 1024
"""Most links a relay reports in one heartbeat (the protocol's bound)."""

_REWEIGH_S = 1.0  # small changes of delay re-rank routes at most this often; a new topology at once


def _moved(before: float, now: float) -> bool:
    """A delay changed enough to re-rank routes at once: by 2 ms and by a fifth."""
    return abs(now - before) > max(2.0, 0.2 * before)


class Routes:
    """Which peers one endpoint reaches directly, what relays report, and the path to every node.

    `alive` says whether a node is believed alive (the endpoint's failure detector); a dead relay
    carries nothing, and a dead peer is not reached directly.
    """

    def __init__(self, me: str, alive: Callable[[str], bool], *, clock: Callable[[], float] = time.monotonic):
        self.me = me
        self._alive = alive
        self._clock = clock
        self._visible: dict[str, set[int]] = {}
        """node -> the transports (by index) on which its presence is seen."""
        self._delays: dict[str, deque[float]] = {}
        self._links: dict[str, dict[str, float]] = {}
        """relay -> the links it last reported: node -> one-way delay in ms."""
        self._far: set[str] = set()
        """Nodes heard of only through relays: without a route they are unreachable."""
        self._came_via: dict[str, str] = {}
        """far node -> the relay that last handed us something from it (a way back to it)."""
        self._paths: dict[str, list[str]] | None = None  # cached; None: recompute on next use
        self.active = False
        """True once a relay has reported links or a node was heard through one (else all is direct)."""
        self._computed_at = 0.0

    # what the endpoint tells us -------------------------------------------------------------

    def visible(self, node: str, transport: int, online: bool) -> None:
        """`node`'s presence appeared (or went away) on transport number `transport`."""
        where = self._visible.setdefault(node, set())
        before = bool(where)
        if online:
            where.add(transport)
            self._far.discard(node)
        else:
            where.discard(transport)
        if bool(where) != before:
            self.invalidate()

    def heard_through_relay(self, node: str, last_relay: str) -> None:
        """Something from `node` arrived through relays, handed to us by `last_relay`."""
        self._came_via[node] = last_relay
        self.active = True
        if node not in self._far and not self._visible.get(node):
            self._far.add(node)
            self.invalidate()

    def sample(self, node: str, delay_s: float) -> None:
        """A heartbeat of `node` arrived directly, `delay_s` after its sender's timestamp."""
        samples = self._delays.get(node)
        if samples is None:
            samples = self._delays[node] = deque(maxlen=SAMPLES)
        before = min(samples) if samples else None
        samples.append(delay_s * 1e3)
        if before is None or _moved(before, min(samples)):
            self.invalidate()

    def learn(self, relay: str, links: Mapping[str, float]) -> None:
        """`relay` reported the nodes it reaches directly and each link's delay (ms)."""
        before = self._links.get(relay)
        self._links[relay] = dict(links)
        self.active = True
        if (
            before is None
            or before.keys() != links.keys()
            or any(_moved(before[n], ms) for n, ms in links.items())
            or self._clock() - self._computed_at > _REWEIGH_S
        ):
            self.invalidate()

    def invalidate(self) -> None:
        """Recompute the paths on next use (a peer joined or died, a relay's links changed)."""
        self._paths = None

    # what the endpoint asks -----------------------------------------------------------------

    def delay_ms(self, node: str) -> float:
        """The measured one-way delay of the direct link with `node` (0 until measured)."""
        samples = self._delays.get(node)
        return min(samples) if samples else 0.0

    def is_direct(self, node: str) -> bool:
        """True when `node`'s presence is seen on one of our transports (and it is not dead)."""
        return bool(self._visible.get(node)) and self._alive(node)

    def is_visible(self, node: str) -> bool:
        """True when `node`'s presence is seen on at least one transport, alive or not."""
        return bool(self._visible.get(node))

    def is_far(self, node: str) -> bool:
        """True when `node` was heard of only through relays: it needs a route."""
        return node in self._far

    def transport_for(self, node: str) -> int:
        """The transport to send to a direct peer on (the first it is seen on)."""
        where = self._visible.get(node)
        return min(where) if where else 0

    def advertise(self) -> dict[str, float]:
        """What this node, as a relay, reports: each alive direct peer it has heard, and the delay (ms).

        A peer not heard from directly yet is left out: its link is not known to work. A delay may
        be negative (clock offsets; see the module docstring). At most `MAX_LINKS` peers, the
        closest.
        """
        links = {
            node: round(self.delay_ms(node), 3)
            for node, where in self._visible.items()
            if where and node in self._delays and self._alive(node)
        }
        if len(links) > MAX_LINKS:
            links = dict(sorted(links.items(), key=lambda item: item[1])[:MAX_LINKS])
        return links

    def path(self, dst: str) -> list[str] | None:
        """The nodes a message to `dst` passes, from this node to `dst`; None without a route."""
        if self.is_direct(dst):
            return [self.me, dst]  # direct always wins
        if self._paths is None:
            self._paths = self._compute()
            self._computed_at = self._clock()
        return self._paths.get(dst)

    def way_back(self, dst: str) -> str | None:
        """The relay that last handed us something from `dst`, if it is still a direct peer.

        For when no relay has reported a link toward `dst` yet (a reply can outrun the reports):
        going back the way its last message came, that relay routes on.
        """
        back = self._came_via.get(dst)
        return back if back is not None and self.is_direct(back) else None

    def next_hop(self, dst: str) -> str | None:
        """Where to send a message for `dst`: `dst` itself, a relay, or None without a route."""
        path = self.path(dst)
        return path[1] if path is not None and len(path) > 1 else None

    def reported(self, relay: str) -> dict[str, float]:
        """The links `relay` last reported (node -> one-way delay in ms); empty if none."""
        return dict(self._links.get(relay, {}))

    def relays(self) -> list[str]:
        """Alive relays that reported their links."""
        return sorted(r for r in self._links if r != self.me and self._alive(r))

    def _compute(self) -> dict[str, list[str]]:
        graph: nx.DiGraph[str] = nx.DiGraph()
        graph.add_node(self.me)
        for node, where in self._visible.items():
            if where and node != self.me and self._alive(node):
                graph.add_edge(self.me, node, weight=self.delay_ms(node) + HOP_MS)
        for relay, links in self._links.items():
            if relay == self.me or not self._alive(relay):
                continue
            for node, ms in links.items():
                if node != relay:
                    graph.add_edge(relay, node, weight=ms + HOP_MS)
        paths: dict[str, list[str]]
        try:
            paths = nx.single_source_bellman_ford(graph, self.me)[1]  # type: ignore[assignment]
        except nx.NetworkXUnbounded:  # samples from a clock that stepped: rank by hops instead
            paths = dict(nx.single_source_shortest_path(graph, self.me))
        return {node: list(path) for node, path in paths.items() if node != self.me}
