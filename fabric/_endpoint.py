"""A node's handle on the fabric: typed envelopes over any transport.

Everything above the transport seam lives here, so both transports behave identically:
request/reply with deadlines, streamed replies, broadcast, presence and failure detection,
dedupe of redelivered ids, transparent chunking of large envelopes, and link emulation.

Queues and their overflow policy:

- inbox (`inbox_size` envelopes): when full, the endpoint stops taking frames from the transport,
  which stops reading from its connection, so senders and the broker hold the rest
  (backpressure; nothing is dropped).
- replies of one request or stream (`inbox_size`): the same backpressure.
- dedupe memory (`dedupe_size` ids): the oldest ids are forgotten first.
- reassembly: bounded by the `Reassembler`'s byte limits; a transfer that would exceed them is
  refused and counted in `stats.blob_errors`. The bulk listener (below) has the same limits.

Large envelopes (above the chunk size) to one node travel on a direct bulk stream when that node
announced a `bulk` address and no link is emulated toward it (`fabric._bulk`): the frame goes
over TCP first, then a small `blob.ref` goes through the transport, so the envelope keeps its place
in the sender's order. Whenever the stream fails or is refused, the envelope goes as chunks through
the transport instead (`stats.bulk_fallbacks`); after a failed connection that address is not
tried again for `BULK_RETRY_S`.

Segments and relays (`fabric._routes`): an endpoint may hold several transports, one per segment
(on MQTT, one per broker). A message for a node it cannot reach directly goes, wrapped in a
`relay` envelope, to the first relay of the cheapest route; each relay forwards it hop by hop,
adding itself to the wrapper's `hops`, until the last one hands it to its destination, which
unwraps it. The inner frame is never altered, so its origin's signature is checked at the end. A
relay refuses a frame that has passed it already or `MAX_HOPS` relays, and answers an
unforwardable request with an ``unreachable`` error that names the destination. Relays also
flood broadcasts (heartbeats, hellos, byes) into every segment they join, so nodes learn of one
another and of each other's liveness across segments; duplicates die at the receivers' dedupe.
Large envelopes to a relayed node always go as chunks (a bulk stream would have to dial it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fabric._bulk import TRANSFER_MIN_RATE, BulkListener, BulkRefused, BulkSender
from fabric._errors import DeadlineExceeded, FabricClosed, FabricError, PeerUnreachable, TransportError
from fabric._links import LinkTable
from fabric._outbox import Outbox
from fabric._peers import PeerEvent, PeerTable
from fabric._routes import Routes
from fabric._transports.base import PresenceEvent, Transport
from protocol import (
    CHUNK_SIZE,
    DEFAULT_MAX_FRAME,
    MAX_HOPS,
    SUPPORTED_VERSIONS,
    BlobChunk,
    BlobRef,
    BulkStatus,
    Bye,
    Capabilities,
    Envelope,
    Error,
    Heartbeat,
    Hello,
    ProtocolError,
    Reassembler,
    Relay,
    Signer,
    Verifier,
    decode,
    encode,
    encode_parts,
    node_digest,
    split_blob,
)

__all__ = ["BULK_RETRY_S", "TERMINAL_KINDS", "Endpoint", "EndpointStats"]

log = logging.getLogger("fabric.endpoint")

TERMINAL_KINDS = frozenset({"task.result", "task.failed", "call.result", "error"})
"""Kinds that end a stream of replies."""

_FRAME_SLACK = 4096  # an envelope whose frame is at most chunk_size + this travels unchunked

BULK_RETRY_S = 30.0
"""After a bulk connection to an address fails, send chunks there for this long before trying again."""


@dataclass
class EndpointStats:
    """Counters of one endpoint, for reports and tests."""

    sent: int = 0
    received: int = 0
    duplicates: int = 0
    malformed: int = 0
    expired: int = 0
    """Envelopes dropped because their deadline passed: on arrival, or before a bulk send ended."""
    blobs_sent: int = 0
    blobs_received: int = 0
    chunks_sent: int = 0
    blob_errors: int = 0
    bulk_sent: int = 0
    """Large envelopes sent on a direct bulk stream (also counted in `blobs_sent`)."""
    bulk_received: int = 0
    """Large envelopes received from a bulk stream (also counted in `blobs_received`)."""
    bulk_fallbacks: int = 0
    """Large envelopes sent as chunks after their bulk stream failed or was refused."""
    relayed_sent: int = 0
    """Frames of ours (whole envelopes or chunks) that left wrapped for a relay."""
    relayed_received: int = 0
    """Envelopes (whole or chunks) that reached us through relays."""
    relayed_blobs_sent: int = 0
    """Large envelopes we sent as chunks through relays (also counted in `blobs_sent`)."""
    relayed_blobs_received: int = 0
    """Large envelopes whose chunks reached us through relays (also counted in `blobs_received`)."""
    forwarded: int = 0
    """Frames this node forwarded as a relay (floods included)."""
    relay_refused: int = 0
    """Frames this node could not forward: no route, a loop, or the hop limit."""
    rerouted: int = 0
    """Frames sent again on a new route because the relay they went through died (`_resend`)."""


class _End:
    """Queue marker: nothing more will come; readers raise (`_Stream.error`, or `FabricClosed`)."""


_END = _End()


class _Request:
    """The one reply awaited for a request id (later replies to it go to the inbox)."""

    def __init__(self, dst: str) -> None:
        self.dst = dst
        self.via: str | None = None  # the relay it went to, when it did not go direct
        self.future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()

    async def put(self, env: Envelope) -> bool:
        if self.future.done():
            return False
        self.future.set_result(env)
        return True

    def fail(self, error: FabricError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    async def next(self) -> Envelope:
        return await self.future


class _Stream:
    """Replies awaited for one streamed request id, in order, bounded (backpressure when full)."""

    def __init__(self, dst: str, size: int) -> None:
        self.dst = dst
        self.via: str | None = None
        self.queue: asyncio.Queue[Envelope | _End] = asyncio.Queue(size)
        self.error: FabricError | None = None
        self.closed = False

    async def put(self, env: Envelope) -> bool:
        """Queue a reply; False when the reader has gone (the caller then delivers it elsewhere)."""
        if self.closed:
            return False
        await self.queue.put(env)
        return not self.closed

    def close(self) -> None:
        """The reader is gone: free the queue, which also wakes a dispatcher waiting for room."""
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()

    def fail(self, error: FabricError) -> None:
        self.error = error
        # When the queue is full nobody is waiting on it: the reader drains it and then sees `error`.
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(_END)

    async def next(self) -> Envelope:
        if self.error is not None and self.queue.empty():
            raise self.error
        item = await self.queue.get()
        if isinstance(item, _End):
            assert self.error is not None
            raise self.error
        return item


class _Dedupe:
    def __init__(self, size: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def __contains__(self, envelope_id: str) -> bool:
        return envelope_id in self._ids

    def seen(self, envelope_id: str) -> bool:
        """True if the id was seen before; otherwise remember it."""
        if envelope_id in self._ids:
            return True
        self._ids[envelope_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return False


class Endpoint:
    """A node on the fabric: send, request, stream, broadcast, receive; know who is alive.

    >>> async with Endpoint("edge-1", hub.transport("edge-1")) as ep:  # doctest: +SKIP
    ...     reply = await ep.request("cloud-1", TaskCancel(job="j", task="t"), timeout=2.0)

    Lifecycle: new -> running (`start` or ``async with``) -> closed (`close`, `crash`).

    `bulk` (``"host:port"``, port 0 for any free one) makes the endpoint listen for direct bulk
    streams there and announce it; `bulk_advertise` is the address peers should dial when it
    differs (a listener on ``0.0.0.0`` must name one).

    `transport` may be several transports, one per segment (e.g. one per MQTT broker); with
    `relay` the endpoint forwards other nodes' envelopes between them (and announces
    ``relay: true`` in its capabilities).
    """

    def __init__(
        self,
        node_id: str,
        transport: Transport | Sequence[Transport],
        *,
        capabilities: Capabilities | None = None,
        groups: Sequence[str] = (),
        signer: Signer | None = None,
        verifier: Verifier | None = None,
        heartbeat_s: float = 1.0,
        dead_after_s: float | None = None,
        inbox_size: int = 1024,
        links: LinkTable | None = None,
        chunk_size: int = CHUNK_SIZE,
        max_frame: int = DEFAULT_MAX_FRAME,
        dedupe_size: int = 100_000,
        reassembler: Reassembler | None = None,
        heartbeat: Callable[[int], Heartbeat] | None = None,
        bulk: str | None = None,
        bulk_advertise: str | None = None,
        relay: bool = False,
    ) -> None:
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be > 0")
        self.node_id = node_id
        self.transports: list[Transport] = (
            list(transport) if isinstance(transport, list | tuple) else [transport]  # type: ignore[list-item]
        )
        if not self.transports:
            raise ValueError("an endpoint needs at least one transport")
        self.transport = self.transports[0]
        self.relay = relay
        self._plain = links is None and len(self.transports) == 1  # one transport, no link emulation
        if relay and capabilities is not None and not capabilities.relay:
            capabilities = capabilities.model_copy(update={"relay": True})
        self.capabilities = capabilities
        self.groups = list(groups)
        self.links = links
        self.stats = EndpointStats()
        self.heartbeat_s = heartbeat_s
        self.peers = PeerTable(self._on_peer_event, dead_after_s=dead_after_s or 3 * heartbeat_s)
        self.routes = Routes(node_id, self.peers.__contains__)
        self._outbox = Outbox(keep_s=2 * self.peers.dead_after_s + heartbeat_s)
        self._hellos: dict[str, bytes] = {}  # a relay's copy of every node's hello frame
        self._signer = signer
        self._verifier = verifier
        self._inbox_size = inbox_size
        self._inbox: asyncio.Queue[Envelope | _End] = asyncio.Queue(inbox_size)
        self._pending: dict[str, _Request | _Stream] = {}
        self._dedupe = _Dedupe(dedupe_size)
        self._reassembler = reassembler or Reassembler()
        self._bulk_listener = (
            None
            if bulk is None
            else BulkListener(
                bulk,
                node_id=node_id,
                advertise=bulk_advertise,
                max_frame_bytes=self._reassembler.max_transfer_bytes,
                # one budget for chunked and bulk transfers together
                max_stored_bytes=self._reassembler.max_buffered_bytes,
                also_held=lambda: self._reassembler.buffered_bytes,
                idle_timeout_s=self._reassembler.idle_timeout_s,
            )
        )
        if self._bulk_listener is not None:
            listener = self._bulk_listener
            self._reassembler.also_held = lambda: listener.held_bytes
        self._bulk_sender = BulkSender(node_id)
        self._bulk_down: dict[str, float] = {}  # address -> monotonic time until which it is not tried
        self._chunk_size = chunk_size
        self._max_frame = max_frame
        self._make_heartbeat = heartbeat or (lambda seq: Heartbeat(seq=seq))
        self._listeners: list[Callable[[PeerEvent], None]] = []
        self._state: Literal["new", "running", "closed"] = "new"
        self._background: asyncio.Task[None] | None = None
        self._strays: set[asyncio.Task[None]] = set()
        self._joined = asyncio.Event()  # set once every transport is connected and announced

    @property
    def bulk_listener(self) -> BulkListener | None:
        """The listener for direct bulk streams (its address, stats, held bytes), if any."""
        return self._bulk_listener

    # lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Endpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, announce presence and start heartbeats and failure detection."""
        if self._state != "new":
            raise FabricClosed(f"endpoint {self.node_id!r} was already started")
        self._state = "running"
        try:
            if self._bulk_listener is not None:
                try:
                    await self._bulk_listener.start()
                except OSError as exc:
                    raise TransportError(f"{self.node_id}: cannot listen for bulk streams: {exc}") from exc
            for index, transport in enumerate(self.transports):
                presence = functools.partial(self._on_presence, index)
                await transport.start(self._on_frame, presence, self.groups)
            default = Capabilities(tier="edge", cores=1, memory_mb=0, relay=self.relay)
            hello = Hello(
                versions=sorted(SUPPORTED_VERSIONS),
                capabilities=self.capabilities or default,
                bulk=self._bulk_listener.address if self._bulk_listener is not None else None,
            )
            announcement = encode(Envelope.new(src=self.node_id, dst="*", body=hello), signer=self._signer)
            if self.relay:
                self._hellos[self.node_id] = announcement
            for transport in self.transports:
                await transport.announce(announcement)
            self._joined.set()
        except BaseException:
            await self._shutdown(graceful=False)
            raise
        # The background loops live in a task group of their own supervisor task: a failure there
        # is logged and ends the loops, and never cancels the application's task.
        self._background = asyncio.create_task(self._run_background(), name=f"endpoint:{self.node_id}")

    async def _run_background(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._heartbeats(), name=f"heartbeat:{self.node_id}")
                tg.create_task(self._detect_failures(), name=f"failure-detector:{self.node_id}")
        except Exception:
            log.exception(
                "%s: background work failed; heartbeats and failure detection stopped", self.node_id
            )

    async def close(self) -> None:
        """Say bye, stop background work, fail pending requests, disconnect. Idempotent."""
        await self._shutdown(graceful=True)

    async def crash(self) -> None:
        """Stop as if the process died: no bye; peers learn of it from the Last Will or silence."""
        await self._shutdown(graceful=False)

    async def _shutdown(self, *, graceful: bool) -> None:
        if self._state == "closed":
            return
        try:
            if self._background is not None:  # no heartbeat may follow the bye
                self._background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._background
            for stray in list(self._strays):  # introductions, resends: nothing outlives the endpoint
                stray.cancel()
            await asyncio.gather(*self._strays, return_exceptions=True)
            if graceful and self._state == "running":
                with contextlib.suppress(FabricError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._send_envelope(
                            Envelope.new(src=self.node_id, dst="*", body=Bye(reason="closing"))
                        )
                if self.links is not None:  # what is still on an emulated link is delivered first
                    await self.links.drain(timeout=2.0)
            self._state = "closed"
            for pending in self._pending.values():
                pending.fail(FabricClosed(f"endpoint {self.node_id!r} closed while waiting for a reply"))
            with contextlib.suppress(asyncio.QueueFull):
                self._inbox.put_nowait(_END)  # wakes recv() and `async for` waiters
        finally:
            self._state = "closed"
            try:
                await self._bulk_sender.close()
                if self._bulk_listener is not None:
                    await self._bulk_listener.close()
                if self.links is not None:
                    await self.links.close()
            finally:
                for transport in self.transports:
                    crash = getattr(transport, "crash", None)
                    try:
                        if not graceful and crash is not None:
                            await crash()
                        else:
                            await transport.close()
                    except Exception:  # the others must close all the same
                        log.exception("%s: closing a transport failed", self.node_id)

    def _check_running(self) -> None:
        if self._state != "running":
            raise FabricClosed(f"endpoint {self.node_id!r} is {self._state}")

    # sending ---------------------------------------------------------------------------------

    async def send(
        self,
        dst: str,
        body: Any,
        *,
        corr: str | None = None,
        deadline: float | None = None,
        trace: str | None = None,
    ) -> Envelope:
        """Send `body` to `dst` (node, ``group:<name>`` or ``*``); returns the envelope sent."""
        env = Envelope.new(src=self.node_id, dst=dst, body=body, corr=corr, deadline=deadline, trace=trace)
        await self._send_envelope(env)
        return env

    async def broadcast(self, body: Any) -> Envelope:
        """Send `body` to every node of the fabric."""
        return await self.send("*", body)

    async def reply(self, request: Envelope, body: Any) -> Envelope:
        """Answer `request`: to its sender, correlated to its id, within its deadline."""
        env = request.reply(body, src=self.node_id)
        await self._send_envelope(env)
        return env

    async def _send_envelope(self, env: Envelope) -> None:
        if self._state == "closed":
            raise FabricClosed(f"endpoint {self.node_id!r} is closed")
        # (no relay known: everything goes direct, without a call; this path is hot)
        hop = self._hop(env.dst, reply=env.corr is not None) if self.routes.active else env.dst
        parts = encode_parts(env, signer=self._signer)
        single = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else None
        size = len(single) if single is not None else sum(memoryview(p).nbytes for p in parts)
        if size <= self._chunk_size + _FRAME_SLACK:
            frame = single if single is not None else b"".join(parts)
            await self._transmit(env.dst, frame, hop, env.deadline)
        elif hop != env.dst or not await self._send_bulk(env, parts, size):
            if env.deadline is not None and env.deadline < time.time():
                self.stats.expired += 1  # it would be dropped on arrival anyway
                log.warning(
                    "%s: %s to %s expired before it could be sent; dropped", self.node_id, env.kind, env.dst
                )
                return
            # Chunks are made lazily and each waits for room downstream: bounded memory at any size.
            for chunk in split_blob(parts, chunk_size=self._chunk_size):
                chunk_env = Envelope.new(
                    src=self.node_id, dst=env.dst, body=chunk, trace=env.trace, deadline=env.deadline
                )
                await self._transmit(env.dst, encode(chunk_env, signer=self._signer), hop, env.deadline)
                self.stats.chunks_sent += 1
            self.stats.blobs_sent += 1
            if hop != env.dst:
                self.stats.relayed_blobs_sent += 1
        self.stats.sent += 1

    def _hop(self, dst: str, *, reply: bool = False) -> str:
        """Where a frame for `dst` goes first: `dst` itself, or the first relay of its route.

        A node known only through relays, with no relay left that reaches it, is unreachable. A
        node not known at all is sent to directly, as before anyone knew of segments (the
        transport keeps it for the node, or the network drops it). A `reply` with no route yet
        goes back the way its request came (see `Routes.way_back`).
        """
        routes = self.routes
        if not routes.active or dst == "*" or dst.startswith("group:") or routes.is_direct(dst):
            return dst  # (no relay and no far node known: the common case costs one check)
        path = routes.path(dst)
        if path is not None:
            return path[1]
        back = routes.way_back(dst) if reply else None
        if back is not None:
            return back
        if self.routes.is_far(dst):
            relays = self.routes.relays()
            raise PeerUnreachable(
                dst,
                "it is in another segment and no relay reaches it"
                + (f" (alive relays: {', '.join(relays)})" if relays else " (no relay is alive)"),
            )
        return dst

    def reachable(self, dst: str) -> bool:
        """False when `dst` is known to need a relay and none reaches it now; else True."""
        try:
            self._hop(dst)
        except PeerUnreachable:
            return False
        return True

    def route(self, dst: str) -> list[str]:
        """The nodes a message to `dst` passes now, from this node to `dst`.

        Raises `PeerUnreachable` when `dst` is known to need a relay and none reaches it. Before
        any relay has reported a way to `dst`, a message goes back the way `dst`'s last one came:
        then only the first relay is known (``[me, relay, dst]``).
        """
        hop = self._hop(dst)
        if hop == dst:
            return [self.node_id, dst]
        path = self.routes.path(dst)
        return path if path is not None else [self.node_id, hop, dst]

    async def _send_bulk(self, env: Envelope, parts: Sequence[Any], size: int) -> bool:
        """Send a large envelope on a direct bulk stream; False when it must go as chunks instead.

        An address is skipped for `BULK_RETRY_S` after it could not be dialled, broke a stream or
        turned out to be another node's; a refusal for want of room, or a slow transfer, says
        nothing about the address.
        """
        peer = self.peers.get(env.dst)
        address = peer.bulk if peer is not None and peer.alive else None
        if address is None or (self.links is not None and self.links.spec(env.dst) is not None):
            return False  # an emulated link shapes chunks; a bulk stream would bypass it
        if self._bulk_down.get(address, 0.0) > time.monotonic():
            self.stats.bulk_fallbacks += 1
            return False
        # Enough for a slow link (5 s plus 10 MB/s), and never past the envelope's own deadline.
        timeout = 5.0 + size / 10e6
        if env.deadline is not None:
            timeout = max(0.001, min(timeout, env.deadline - time.time()))
        transfer = secrets.token_hex(16)  # unguessable: only our blob.ref can claim these bytes
        try:
            size, crc = await self._bulk_sender.push(address, env.dst, transfer, parts, timeout)
        except (TransportError, DeadlineExceeded) as exc:
            broken = not isinstance(exc, (BulkRefused, DeadlineExceeded))
            if broken or (isinstance(exc, BulkRefused) and exc.status == BulkStatus.WRONG_NODE):
                self._bulk_down[address] = time.monotonic() + BULK_RETRY_S
            self.stats.bulk_fallbacks += 1
            log.warning("%s: sending %s to %s as chunks instead: %s", self.node_id, env.kind, env.dst, exc)
            return False
        ref = Envelope.new(
            src=self.node_id,
            dst=env.dst,
            body=BlobRef(transfer=transfer, size=size, crc32c=crc),
            trace=env.trace,
            deadline=env.deadline,
        )
        try:
            await self._transmit(env.dst, encode(ref, signer=self._signer), env.dst, env.deadline)
        except BaseException:  # cancelled or failed: the stored frame would wait for a ref in vain
            self._withdraw_bulk(ref)
            raise
        self.stats.bulk_sent += 1
        self.stats.blobs_sent += 1
        return True

    def _withdraw_bulk(self, ref: Envelope) -> None:
        """Send, in the background, a copy of `ref` that arrives expired: the receiver frees the frame."""
        late = Envelope.new(src=self.node_id, dst=ref.dst, body=ref.body, deadline=time.time() - 1.0)

        async def withdraw() -> None:
            with contextlib.suppress(FabricError, TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._transmit(late.dst, encode(late, signer=self._signer), late.dst, None)

        self._spawn(withdraw(), "bulk-withdraw")

    async def _transmit(self, dst: str, frame: bytes, hop: str, deadline: float | None) -> None:
        """Send one encoded frame for `dst` to `hop`: as is when that is `dst`, else wrapped for the relay."""
        if hop != dst:
            self._outbox.keep(hop, dst, frame, deadline)  # to send again if the relay dies holding it
            frame = self._wrap(hop, Relay(target=dst, frame=frame), deadline=deadline)
            self.stats.relayed_sent += 1
        elif self._plain:
            await self.transport.send(hop, frame)  # the common case, without two more layers
            return
        await self._put(hop, frame)

    def _wrap(
        self,
        hop: str,
        relay: Relay,
        *,
        hops: list[str] | None = None,
        deadline: float | None = None,
        trace: str | None = None,
    ) -> bytes:
        """The encoded, signed envelope that carries `relay` one hop, to `hop`; `hops`: relays passed."""
        wrapper = Envelope.new(
            src=self.node_id, dst=hop, body=relay, deadline=deadline, hops=hops, trace=trace
        )
        return encode(wrapper, signer=self._signer)

    async def _put(self, address: str, frame: bytes) -> None:
        """Send a frame one hop, through the emulated link toward `address` if there is one."""
        if self.links is not None:
            await self.links.send(address, frame, self._deliver)
        else:
            await self._deliver(address, frame)

    async def _deliver(self, address: str, frame: bytes) -> None:
        """Hand a frame to the transport(s): a node's, or every segment's for ``*`` and groups."""
        transports = self.transports
        if len(transports) == 1:
            await transports[0].send(address, frame)
        elif address == "*" or address.startswith("group:"):
            failed: FabricError | None = None
            for transport in transports:  # a broker that is down must not silence the others
                try:
                    await transport.send(address, frame)
                except FabricError as exc:
                    failed = failed or exc
            if failed is not None:
                raise failed
        else:
            await transports[self.routes.transport_for(address)].send(address, frame)

    # requests and streams --------------------------------------------------------------------

    def _open(self, env: Envelope, pending: _Request | _Stream) -> None:
        peer = self.peers.get(env.dst)
        if peer is not None and not peer.alive:
            raise PeerUnreachable(env.dst, "it left or was declared dead")
        if self.routes.active:
            hop = self._hop(env.dst)
            pending.via = hop if hop != env.dst else None
        self._pending[env.id] = pending

    async def request(self, dst: str, body: Any, *, timeout: float, trace: str | None = None) -> Envelope:
        """Send `body` to node `dst` and return its first reply.

        Raises `DeadlineExceeded` when no reply comes within `timeout` seconds, and
        `PeerUnreachable` when `dst` is known to be gone or dies while we wait.
        """
        self._check_running()
        env = Envelope.new(src=self.node_id, dst=dst, body=body, deadline=time.time() + timeout, trace=trace)
        pending = _Request(dst)
        self._open(env, pending)
        try:
            async with asyncio.timeout(timeout):
                await self._send_envelope(env)
                return await pending.next()
        except TimeoutError:
            raise DeadlineExceeded(
                f"no reply from {dst!r} to {env.kind} {env.id} within {timeout:g}s"
            ) from None
        finally:
            self._pending.pop(env.id, None)

    async def stream(
        self, dst: str, body: Any, *, timeout: float, trace: str | None = None
    ) -> AsyncIterator[Envelope]:
        """Send `body` to `dst` and yield its replies until one of `TERMINAL_KINDS` (included).

        `timeout` bounds the wait for each reply, not the whole stream.
        """
        self._check_running()
        env = Envelope.new(src=self.node_id, dst=dst, body=body, trace=trace)
        pending = _Stream(dst, self._inbox_size)
        self._open(env, pending)
        try:
            try:
                async with asyncio.timeout(timeout):
                    await self._send_envelope(env)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"stream to {dst!r}: {env.kind} not sent within {timeout:g}s"
                ) from None
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        reply = await pending.next()
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"stream from {dst!r} for {env.kind} {env.id}: no reply within {timeout:g}s"
                    ) from None
                yield reply
                if reply.kind in TERMINAL_KINDS:
                    return
        finally:
            self._pending.pop(env.id, None)
            pending.close()  # an abandoned stream must not leave the dispatcher waiting for room

    # receiving -------------------------------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> Envelope:
        """The next envelope that is not a reply to one of our requests.

        Envelopes received before `close` are still handed out; then `FabricClosed` is raised.
        """
        if self._state == "closed" and self._inbox.empty():
            raise FabricClosed(f"endpoint {self.node_id!r} is closed")
        if timeout is None:  # the common case of a serving loop: no timer to arm (~2 us a message)
            item = await self._inbox.get()
        else:
            try:
                async with asyncio.timeout(timeout):
                    item = await self._inbox.get()
            except TimeoutError:
                raise DeadlineExceeded(f"{self.node_id}: nothing received within {timeout:g}s") from None
        if isinstance(item, _End):  # closed: pass the marker on to the next waiter
            self._inbox.put_nowait(item)
            raise FabricClosed(f"endpoint {self.node_id!r} is closed")
        return item

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Envelope]:
        while True:
            try:
                yield await self.recv()
            except FabricClosed:
                return

    async def _on_frame(self, frame: bytes) -> None:
        try:
            env = decode(frame, max_size=self._max_frame)
            if self._verifier is not None:
                if env.id in self._dedupe:  # a second copy (another broker, or a relay's): no replay
                    self.stats.duplicates += 1
                    return
                self._verifier.check(env, frame)
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.warning("%s: dropped a frame of %d bytes: %s", self.node_id, len(frame), exc)
            return
        if isinstance(env.body, Heartbeat) and env.dst == self.node_id:  # a probe of the link's delay
            self.routes.sample(env.src, time.time() - env.ts)
        if self.relay and env.src != self.node_id and env.id not in self._dedupe:
            dst = env.dst
            # A broadcast goes on into the segments its sender may not reach (a wrapped one is
            # passed on, hops and all, when it is unwrapped).
            if (dst == "*" or dst.startswith("group:")) and not isinstance(env.body, Relay):
                await self._flood(frame, dst, [])
        await self._dispatch(env)

    async def _dispatch(self, env: Envelope) -> None:
        if env.src == self.node_id:
            return  # our own broadcast or group message, echoed back
        if self._dedupe.seen(env.id):
            self.stats.duplicates += 1
            return
        if env.hops and isinstance(env.body, Hello):  # a node of another segment, via a relay:
            hello = env.body  # what it is, but no sign that it is alive now (its heartbeats are)
            self.peers.describe(env.src, hello.capabilities, tuple(hello.versions), hello.bulk)
            return
        self.peers.seen(env.src)
        if env.deadline is not None and env.deadline < time.time():
            self.stats.expired += 1
            if isinstance(env.body, BlobRef) and self._bulk_listener is not None:
                self._bulk_listener.discard(env.body.transfer)  # nobody else will claim it
            return
        body = env.body
        if isinstance(body, Heartbeat):
            if body.links is not None:
                self.routes.learn(env.src, body.links)
            return
        if isinstance(body, Relay):
            await self._on_relay(env, body)
            return
        if isinstance(body, Bye):
            self.peers.gone(env.src, "left")
            return
        if isinstance(body, BlobChunk):
            await self._on_chunk(env, body)
            return
        if isinstance(body, BlobRef):
            await self._on_blob_ref(env, body)
            return
        pending = self._pending.get(env.corr) if env.corr is not None else None
        self.stats.received += 1
        if (
            pending is not None
            and isinstance(body, Error)
            and body.code == "unreachable"
            and env.src != pending.dst
            and isinstance(pending, _Request)
        ):  # a relay on the way could not forward the request: fail it, naming the destination
            pending.fail(PeerUnreachable(pending.dst, f"{env.src} reports: {body.message}"))
            return
        if pending is None or not await pending.put(env):
            await self._inbox.put(env)

    # relaying --------------------------------------------------------------------------------

    async def _on_relay(self, wrapper: Envelope, relay: Relay) -> None:
        """A wrapped frame arrived: unwrap it when it is for us (or everyone); forward it if we relay."""
        target = relay.target
        hops = wrapper.hops if wrapper.hops else [wrapper.src]
        broadcast = target == "*" or target.startswith("group:")
        if target != self.node_id and not broadcast:
            if self.relay:
                await self._forward(wrapper, relay)
            else:
                self.stats.relay_refused += 1
                log.warning("%s: no relay; dropped a frame for %s", self.node_id, target)
            return
        frame = relay.frame
        try:
            inner = decode(frame, max_size=self._max_frame)
            if inner.id in self._dedupe or inner.src == self.node_id:
                return  # flooded along two routes, or our own coming back
            if inner.dst != target and not (inner.dst == "*" and target == self.node_id):
                raise ProtocolError(f"a frame for {inner.dst!r} was wrapped for {target!r}")
            if self._verifier is not None:  # end to end: the origin's own signature
                self._verifier.check(inner, frame, fresh=inner.kind != "hello")
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.warning("%s: dropped a frame relayed by %s: %s", self.node_id, wrapper.src, exc)
            return
        if self.relay and isinstance(inner.body, Hello):
            known = self._hellos.get(inner.src)
            self._hellos[inner.src] = frame
            broadcast = broadcast or known != frame  # introduced to us alone: pass it on all the same
        if broadcast and self.relay:
            await self._flood(frame, "*" if target == self.node_id else target, hops)
        self.stats.relayed_received += 1
        self.routes.heard_through_relay(inner.src, wrapper.src)
        await self._dispatch(inner.model_copy(update={"hops": hops}))

    async def _forward(self, wrapper: Envelope, relay: Relay) -> None:
        """Pass a wrapped frame one hop on toward its target, or answer why it cannot go on."""
        target = relay.target
        hops = list(wrapper.hops)
        why: str | None = None
        if self.node_id in hops:
            why = f"routing loop: the frame for {target} came back to relay {self.node_id} (hops {hops})"
        elif len(hops) >= MAX_HOPS:
            why = f"hop limit: the frame for {target} has passed {len(hops)} relays (at most {MAX_HOPS})"
        else:
            hop = self.routes.next_hop(target)
            if hop is None or hop in hops:
                why = f"relay {self.node_id} has no route to {target}"
            else:
                frame = self._wrap(
                    hop, relay, hops=[*hops, self.node_id], deadline=wrapper.deadline, trace=wrapper.trace
                )
                try:
                    await self._put(hop, frame)
                except FabricError as exc:
                    why = f"relay {self.node_id} could not pass the frame to {hop}: {exc}"
                else:
                    self.stats.forwarded += 1
                    return
        self.stats.relay_refused += 1
        log.warning("%s: dropped a frame from %s: %s", self.node_id, wrapper.src, why)
        await self._refuse(relay, why)

    async def _refuse(self, relay: Relay, why: str) -> None:
        """Tell the origin of a request that it cannot be delivered (best effort, never raises)."""
        try:
            inner = decode(relay.frame, max_size=self._max_frame)
        except ProtocolError:
            return
        if isinstance(inner.body, (Error, BlobChunk, Heartbeat, Bye, Hello)) or inner.corr is not None:
            return  # nobody waits on these by id: a reply to a reply helps no one
        error = Error(code="unreachable", message=why[:200], ref=inner.id, target=relay.target)
        with contextlib.suppress(FabricError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self.send(inner.src, error, corr=inner.id, deadline=inner.deadline, trace=inner.trace)

    async def _flood(self, frame: bytes, target: str, hops: list[str]) -> None:
        """As a relay, pass a broadcast (or group) frame into every segment we join."""
        if self.node_id in hops or len(hops) >= MAX_HOPS:
            return
        try:
            await self._put(
                target, self._wrap(target, Relay(target=target, frame=frame), hops=[*hops, self.node_id])
            )
        except FabricError as exc:
            log.warning("%s: could not pass a broadcast on: %s", self.node_id, exc)
            return
        self.stats.forwarded += 1

    async def _on_chunk(self, env: Envelope, chunk: BlobChunk) -> None:
        try:
            payload = self._reassembler.add(chunk, source=env.src)
        except ProtocolError as exc:
            self.stats.blob_errors += 1
            log.warning("%s: dropped a chunked transfer from %s: %s", self.node_id, env.src, exc)
            return
        if payload is not None:
            await self._deliver_payload(env, payload, "chunked transfer", chunk.size)

    async def _on_blob_ref(self, env: Envelope, ref: BlobRef) -> None:
        if self._bulk_listener is None:
            self.stats.blob_errors += 1
            log.warning("%s: blob.ref from %s, but this node takes no bulk streams", self.node_id, env.src)
            return
        try:
            payload = self._bulk_listener.claim(ref.transfer, size=ref.size, crc=ref.crc32c)
        except ProtocolError as exc:
            self.stats.blob_errors += 1
            log.warning("%s: dropped a bulk transfer from %s: %s", self.node_id, env.src, exc)
            return
        if await self._deliver_payload(env, payload, "bulk transfer", ref.size):
            self.stats.bulk_received += 1

    async def _deliver_payload(self, env: Envelope, payload: Any, how: str, size: int) -> bool:
        """Decode the envelope a transfer carried and dispatch it; False (counted) when refused.

        The envelope was signed before its transfer began, so on a signing fabric its timestamp
        may be older than the skew allows by as long as a transfer of its size may take.
        """
        grace = self._reassembler.idle_timeout_s + size / TRANSFER_MIN_RATE
        try:
            inner = decode(
                payload, verifier=self._verifier, grace_s=grace, max_size=self._reassembler.max_transfer_bytes
            )
        except ProtocolError as exc:
            self.stats.blob_errors += 1
            log.warning("%s: dropped a %s from %s: %s", self.node_id, how, env.src, exc)
            return False
        if inner.src != env.src:
            self.stats.blob_errors += 1
            log.warning(
                "%s: %s from %s carried an envelope of %s; dropped", self.node_id, how, env.src, inner.src
            )
            return False
        self.stats.blobs_received += 1
        if env.hops:  # its chunks came through relays: so did it
            self.stats.relayed_blobs_received += 1
            inner = inner.model_copy(update={"hops": env.hops})
        await self._dispatch(inner)
        return True

    # presence --------------------------------------------------------------------------------

    def add_peer_listener(self, listener: Callable[[PeerEvent], None]) -> None:
        """Call `listener` on every join, leave and death; it must not block."""
        self._listeners.append(listener)

    async def wait_for_peer(self, node: str, timeout: float, *, announced: bool = False) -> None:
        """Return once `node` is alive; raise `DeadlineExceeded` after `timeout` seconds.

        A node in another segment must also be reachable through a relay. With `announced`, also
        wait for its `hello`, so its capabilities and bulk address are known.
        """
        deadline = time.monotonic() + timeout

        def ready() -> bool:
            peer = self.peers.get(node)
            if peer is None or not peer.alive or (announced and peer.capabilities is None):
                return False
            return not self.routes.is_far(node) or self.routes.path(node) is not None  # and routable

        while not ready():
            if time.monotonic() > deadline:
                what = "announce itself" if announced else "appear"
                raise DeadlineExceeded(f"{self.node_id}: node {node!r} did not {what} within {timeout:g}s")
            await asyncio.sleep(min(0.01, self.heartbeat_s))

    def _on_presence(self, transport: int, event: PresenceEvent) -> None:
        if event.node == self.node_id:
            return
        if event.state == "offline":
            self.routes.visible(event.node, transport, False)
            if not self.routes.is_visible(event.node):  # a relay may still be seen on another broker
                self.peers.gone(event.node, "dead")
            return
        try:
            hello = decode(event.frame, verifier=self._verifier, fresh=False)
        except ProtocolError as exc:
            log.warning("%s: ignored presence of %s: %s", self.node_id, event.node, exc)
            return
        if isinstance(hello.body, Hello) and hello.src == event.node:
            body = hello.body
            self.routes.visible(event.node, transport, True)
            self.peers.seen(event.node, body.capabilities, tuple(body.versions), body.bulk)
            if self.relay:
                self._spawn(self._introduce(event.node, event.frame), f"introduce:{event.node}")

    async def _introduce(self, node: str, frame: bytes) -> None:
        """As a relay, tell the other segments of a node that appeared, and it of every node we know."""
        await self._joined.wait()  # presence arrives while later transports still connect
        known = self._hellos.get(node)
        self._hellos[node] = frame
        if known != frame:
            await self._flood(frame, "*", [])
        for other, hello in list(self._hellos.items()):
            if other == node or (other != self.node_id and other not in self.peers):
                continue
            try:
                await self._put(node, self._wrap(node, Relay(target=node, frame=hello), hops=[self.node_id]))
            except FabricError as exc:
                log.warning("%s: could not introduce %s to %s: %s", self.node_id, other, node, exc)
                return

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in the background, held until done (the loop keeps only weak references)."""
        task = asyncio.create_task(work, name=f"{name}:{self.node_id}")
        self._strays.add(task)
        task.add_done_callback(self._strays.discard)

    def _on_peer_event(self, event: PeerEvent) -> None:
        self.routes.invalidate()
        if event.kind != "joined":
            why = "it said bye" if event.kind == "left" else "it was declared dead"
            self._hellos.pop(event.node, None)  # a relay introduces no one who is gone
            for pending in list(self._pending.values()):
                if pending.dst == event.node:
                    pending.fail(PeerUnreachable(event.node, why))
                elif pending.via == event.node:
                    self._reroute(pending, event.node)
            held = self._outbox.take(event.node)
            if held:
                self._spawn(self._resend(event.node, [(s.dst, s.frame, s.deadline) for s in held]), "resend")
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("%s: peer listener failed on %s", self.node_id, event)

    def _reroute(self, pending: _Request | _Stream, relay: str) -> None:
        """The relay a request went through died: it now goes by the route left, or fails at once.

        The request itself is sent again from the outbox (`_resend`), with everything else that
        went through the relay lately.
        """
        try:
            hop = self._hop(pending.dst)
            if hop == pending.dst and self.routes.is_far(pending.dst):
                raise PeerUnreachable(pending.dst, f"no relay other than {relay} reaches it")
        except PeerUnreachable as exc:
            why = f"relay {relay} died with the request in flight, and {exc.why}"
            pending.fail(PeerUnreachable(pending.dst, why))
            return
        pending.via = hop if hop != pending.dst else None

    async def _resend(self, relay: str, held: list[tuple[str, bytes, float | None]]) -> None:
        """Send again, by the routes left, what went through `relay` shortly before it died.

        Whatever had arrived is dropped by its receiver as a duplicate; what the relay still held
        arrives now. Frames for nodes no longer reachable are dropped (their pending requests fail).
        """
        for dst, frame, deadline in held:
            if deadline is not None and deadline < time.time():
                continue
            try:
                await self._transmit(dst, frame, self._hop(dst, reply=True), deadline)
            except FabricError as exc:
                log.warning("%s: not sent again after relay %s died: %s", self.node_id, relay, exc)
                continue
            self.stats.rerouted += 1

    async def _probe(self, seq: int) -> None:
        """Probe the links toward relays: a unicast heartbeat to each direct peer that relays.

        A relay probes every direct peer. The receiver takes a probe's delay as a sample of the link.

        Broadcasts are not samples: they take one path for all, where unicast frames take the
        link (and its emulation) toward each receiver.
        """
        probe = Heartbeat(seq=seq)
        for peer in self.peers.alive():
            relays = peer.capabilities is not None and peer.capabilities.relay
            if (self.relay or relays) and self.routes.is_direct(peer.node):
                await self._send_envelope(Envelope.new(src=self.node_id, dst=peer.node, body=probe))

    async def _heartbeats(self) -> None:
        for seq in itertools.count():
            try:
                beat = self._make_heartbeat(seq)
                if self.relay:
                    beat = beat.model_copy(update={"links": self.routes.advertise()})
                await self._send_envelope(Envelope.new(src=self.node_id, dst="*", body=beat))
                await self._probe(seq)
            except FabricError as exc:  # the transport reconnects by itself; keep beating
                log.warning("%s: heartbeat %d not sent: %s", self.node_id, seq, exc)
            except Exception:  # e.g. a failing `heartbeat` callback: log it, keep the node alive
                log.exception("%s: heartbeat %d failed", self.node_id, seq)
            await asyncio.sleep(self.heartbeat_s)

    async def _detect_failures(self) -> None:
        interval = min(self.heartbeat_s, self.peers.dead_after_s / 4)
        while True:
            await asyncio.sleep(interval)
            self.peers.sweep(interval)
            self._reassembler.expire()  # a transfer cut off mid-way frees its buffer in time
            if self._bulk_listener is not None:
                alive = {node_digest(peer.node) for peer in self.peers.alive()}
                self._bulk_listener.expire(alive.__contains__)
