"""In-process transport: many nodes in one event loop, no broker.

`InprocHub` plays the broker with the same semantics as the MQTT transport: every node id has a
mailbox that outlives its connection (a persistent session), presence is retained and replayed to
newcomers, a node that crashes has its presence withdrawn for it (the Last Will), a frame to a
group reaches every member, and ``*`` reaches every connected node, the sender included.

Segments are emulated with the rules of NAT: a node joins one or more segments and is public or
not; a frame (broadcasts included) reaches a node only when the two share a segment or the
receiver is public, and a node sees the presence only of nodes it can reach. Frames the rules
stop are dropped and counted in `InprocHub.unreachable`, as a network would drop them. Nodes made
without segments are public in segment ``default``, so by default every node reaches every other.

Overflow policy: a mailbox holds `mailbox_size` frames. A sender to a connected node waits for
room (backpressure). Frames for a node that is not connected are kept up to the same bound; past
it the oldest are dropped and counted in `InprocHub.dropped`, as a broker drops for a session
that is gone. Nothing is dropped silently: each drop is counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from fabric._errors import FabricClosed, TransportError
from fabric._transports.base import FrameHandler, PresenceEvent, PresenceHandler

__all__ = ["InprocHub", "InprocTransport"]

log = logging.getLogger("fabric.inproc")


@dataclass
class _Mailbox:
    queue: asyncio.Queue[bytes]
    owner: InprocTransport | None = None
    groups: set[str] = field(default_factory=set)
    # Held while a frame is handed to the owner, so frames are handled one at a time, in order.
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)


class InprocHub:
    """The in-process 'broker' shared by every `InprocTransport` of one fabric."""

    def __init__(self, *, mailbox_size: int = 1024) -> None:
        self.mailbox_size = mailbox_size
        self._boxes: dict[str, _Mailbox] = {}
        self._presence: dict[str, bytes] = {}
        self._members: defaultdict[str, set[str]] = defaultdict(set)
        self.dropped = 0
        """Frames dropped for nodes that were not connected and whose mailbox was full."""
        self._cut: set[tuple[str, str]] = set()
        self.partitioned = 0
        """Frames dropped because a partition separates their sender from a receiver."""
        self._where: dict[str, tuple[frozenset[str], bool]] = {}
        self._segmented = False  # until a node is made outside the public default segment
        self.unreachable = 0
        """Frames dropped because the receiver is in no segment of the sender's and is not public."""

    def transport(
        self, node_id: str, *, segments: Sequence[str] = ("default",), public: bool = True
    ) -> InprocTransport:
        """A transport for `node_id` on this hub, joined to `segments` (public, or behind NAT)."""
        if isinstance(segments, str) or not segments:
            raise ValueError(f"{node_id}: segments must be a non-empty list of names, got {segments!r}")
        self._where[node_id] = (frozenset(segments), public)
        self._segmented = self._segmented or not public or list(segments) != ["default"]
        return InprocTransport(self, node_id)

    def reaches(self, src: str, dst: str) -> bool:
        """True when a frame from node `src` can reach node `dst` (shared segment, or `dst` public)."""
        if not self._segmented:
            return True
        a, b = self._where.get(src), self._where.get(dst)
        if a is None or b is None or b[1]:
            return True
        return not a[0].isdisjoint(b[0])

    def partition(self, a: str, b: str) -> None:
        """Drop every frame between nodes `a` and `b`, both ways, broadcasts included, until `heal`.

        Presence is untouched, as a broker still sees both sides of a network partition: each side
        learns of the other's silence from missed heartbeats.
        """
        self._cut |= {(a, b), (b, a)}

    def heal(self, a: str, b: str) -> None:
        """End the partition between `a` and `b`."""
        self._cut -= {(a, b), (b, a)}

    def _box(self, node: str) -> _Mailbox:
        box = self._boxes.get(node)
        if box is None:
            box = self._boxes[node] = _Mailbox(asyncio.Queue(self.mailbox_size))
        return box

    def _connected(self) -> list[InprocTransport]:
        return [b.owner for b in self._boxes.values() if b.owner is not None]

    async def _deliver(self, node: str, frame: bytes) -> None:
        box = self._box(node)
        owner = box.owner
        if owner is not None:
            if box.queue.empty() and not box.busy.locked():
                # The receiver is idle: hand the frame over in the sender's task, saving the two
                # event-loop hops of the mailbox. Cancelling the sender meanwhile is cancelling a
                # send that has not completed, as it would be on any transport.
                async with box.busy:
                    await owner.handle(frame)
                return
            await box.queue.put(frame)
            return
        if box.queue.full():
            box.queue.get_nowait()
            self.dropped += 1
            log.warning("mailbox of disconnected node %s is full: dropped its oldest frame", node)
        box.queue.put_nowait(frame)

    async def _route(self, sender: str, address: str, frame: bytes) -> None:
        if address == "*":
            targets = [t.node_id for t in self._connected()]
        elif address.startswith("group:"):
            targets = sorted(self._members[address.removeprefix("group:")])
        else:
            targets = [address]
        cut = self._cut
        for node in targets:
            if cut and (sender, node) in cut:
                self.partitioned += 1
                continue
            if self._segmented and not self.reaches(sender, node):
                self.unreachable += 1
                continue
            await self._deliver(node, frame)

    def _attach(self, transport: InprocTransport, groups: list[str]) -> _Mailbox:
        box = self._box(transport.node_id)
        if box.owner is not None:
            raise TransportError(f"node id {transport.node_id!r} is already connected to this hub")
        box.owner = transport
        box.groups = set(groups)
        for group in groups:
            self._members[group].add(transport.node_id)
        for node, frame in self._presence.items():  # retained presence, replayed to a newcomer
            if self.reaches(transport.node_id, node):
                transport.presence(PresenceEvent(node, "online", frame))
        return box

    def _detach(self, transport: InprocTransport) -> None:
        box = self._boxes.get(transport.node_id)
        if box is None or box.owner is not transport:
            return
        box.owner = None
        for group in box.groups:
            self._members[group].discard(transport.node_id)
        self._withdraw(transport.node_id)

    def _announce(self, node: str, frame: bytes) -> None:
        self._presence[node] = frame
        for t in self._connected():
            if self.reaches(t.node_id, node):
                t.presence(PresenceEvent(node, "online", frame))

    def _withdraw(self, node: str) -> None:
        if self._presence.pop(node, None) is None:
            return
        for t in self._connected():
            if self.reaches(t.node_id, node):
                t.presence(PresenceEvent(node, "offline"))


class InprocTransport:
    """One node's connection to an `InprocHub`."""

    def __init__(self, hub: InprocHub, node_id: str) -> None:
        self.hub = hub
        self.node_id = node_id
        self._box: _Mailbox | None = None
        self._reader: asyncio.Task[None] | None = None
        self._on_presence: PresenceHandler | None = None
        self._on_frame: FrameHandler | None = None
        self._closed = False

    async def start(self, on_frame: FrameHandler, on_presence: PresenceHandler, groups: list[str]) -> None:
        """Attach to the hub and start passing mailbox frames to `on_frame`, one at a time."""
        if self._closed:
            raise FabricClosed(f"transport of {self.node_id!r} is closed")
        self._on_presence = on_presence
        self._on_frame = on_frame
        self._box = self.hub._attach(self, groups)
        self._reader = asyncio.create_task(self._read(self._box), name=f"inproc-read:{self.node_id}")

    async def _read(self, box: _Mailbox) -> None:
        while True:
            frame = await box.queue.get()
            async with box.busy:
                await self.handle(frame)

    async def handle(self, frame: bytes) -> None:
        """Pass one frame to this node's handler; a failing handler is logged, never the sender's problem."""
        if self._on_frame is None:
            return
        try:
            await self._on_frame(frame)
        except Exception:
            log.exception("inproc: the frame handler of %s failed", self.node_id)

    def presence(self, event: PresenceEvent) -> None:
        """Called by the hub."""
        if self._on_presence is not None:
            self._on_presence(event)

    async def send(self, address: str, frame: bytes) -> None:
        """Deliver to `address` through the hub; waits while a connected receiver's mailbox is full."""
        if self._closed or self._box is None:
            raise FabricClosed(f"transport of {self.node_id!r} is not running")
        await self.hub._route(self.node_id, address, frame)

    async def announce(self, frame: bytes) -> None:
        """Publish this node's retained presence."""
        if self._closed or self._box is None:
            raise FabricClosed(f"transport of {self.node_id!r} is not running")
        self.hub._announce(self.node_id, frame)

    async def close(self) -> None:
        """Withdraw presence and detach; frames sent to this node later wait in its mailbox."""
        await self._stop()

    async def crash(self) -> None:
        """Die without goodbye: the hub withdraws presence for us, as a broker fires a Last Will."""
        await self._stop()

    async def _stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_presence = None
        self._on_frame = None
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.hub._detach(self)
