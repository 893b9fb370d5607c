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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fabric._bulk import TRANSFER_MIN_RATE, BulkListener, BulkRefused, BulkSender
from fabric._errors import DeadlineExceeded, FabricClosed, FabricError, PeerUnreachable, TransportError
from fabric._links import LinkTable
from fabric._peers import PeerEvent, PeerTable
from fabric._transports.base import PresenceEvent, Transport
from protocol import (
    CHUNK_SIZE,
    DEFAULT_MAX_FRAME,
    SUPPORTED_VERSIONS,
    BlobChunk,
    BlobRef,
    BulkStatus,
    Bye,
    Capabilities,
    Envelope,
    Heartbeat,
    Hello,
    ProtocolError,
    Reassembler,
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


class _End:
    """Queue marker: nothing more will come; readers raise (`_Stream.error`, or `FabricClosed`)."""


_END = _End()


class _Request:
    """The one reply awaited for a request id (later replies to it go to the inbox)."""

    def __init__(self, dst: str) -> None:
        self.dst = dst
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
    """

    def __init__(
        self,
        node_id: str,
        transport: Transport,
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
    ) -> None:
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be > 0")
        self.node_id = node_id
        self.transport = transport
        self.capabilities = capabilities
        self.groups = list(groups)
        self.links = links
        self.stats = EndpointStats()
        self.heartbeat_s = heartbeat_s
        self.peers = PeerTable(self._on_peer_event, dead_after_s=dead_after_s or 3 * heartbeat_s)
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
            await self.transport.start(self._on_frame, self._on_presence, self.groups)
            hello = Hello(
                versions=sorted(SUPPORTED_VERSIONS),
                capabilities=self.capabilities or Capabilities(tier="edge", cores=1, memory_mb=0),
                bulk=self._bulk_listener.address if self._bulk_listener is not None else None,
            )
            announcement = Envelope.new(src=self.node_id, dst="*", body=hello)
            await self.transport.announce(encode(announcement, signer=self._signer))
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
                crash = getattr(self.transport, "crash", None)
                if not graceful and crash is not None:
                    await crash()
                else:
                    await self.transport.close()

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
        parts = encode_parts(env, signer=self._signer)
        single = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else None
        size = len(single) if single is not None else sum(memoryview(p).nbytes for p in parts)
        if size <= self._chunk_size + _FRAME_SLACK:
            await self._transmit(env.dst, single if single is not None else b"".join(parts))
        elif not await self._send_bulk(env, parts, size):
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
                await self._transmit(env.dst, encode(chunk_env, signer=self._signer))
                self.stats.chunks_sent += 1
            self.stats.blobs_sent += 1
        self.stats.sent += 1

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
            await self._transmit(env.dst, encode(ref, signer=self._signer))
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
                    await self._transmit(late.dst, encode(late, signer=self._signer))

        task = asyncio.create_task(withdraw(), name=f"bulk-withdraw:{self.node_id}")
        self._strays.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._strays.discard)

    async def _transmit(self, address: str, frame: bytes) -> None:
        if self.links is not None:
            await self.links.send(address, frame, self.transport.send)
        else:
            await self.transport.send(address, frame)

    # requests and streams --------------------------------------------------------------------

    def _open(self, dst: str, request_id: str, pending: _Request | _Stream) -> None:
        peer = self.peers.get(dst)
        if peer is not None and not peer.alive:
            raise PeerUnreachable(dst, "it left or was declared dead")
        self._pending[request_id] = pending

    async def request(self, dst: str, body: Any, *, timeout: float, trace: str | None = None) -> Envelope:
        """Send `body` to node `dst` and return its first reply.

        Raises `DeadlineExceeded` when no reply comes within `timeout` seconds, and
        `PeerUnreachable` when `dst` is known to be gone or dies while we wait.
        """
        self._check_running()
        env = Envelope.new(src=self.node_id, dst=dst, body=body, deadline=time.time() + timeout, trace=trace)
        pending = _Request(dst)
        self._open(dst, env.id, pending)
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
        self._open(dst, env.id, pending)
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
            env = decode(frame, verifier=self._verifier, max_size=self._max_frame)
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.warning("%s: dropped a frame of %d bytes: %s", self.node_id, len(frame), exc)
            return
        await self._dispatch(env)

    async def _dispatch(self, env: Envelope) -> None:
        if env.src == self.node_id:
            return  # our own broadcast or group message, echoed back
        if self._dedupe.seen(env.id):
            self.stats.duplicates += 1
            return
        self.peers.seen(env.src)
        if env.deadline is not None and env.deadline < time.time():
            self.stats.expired += 1
            if isinstance(env.body, BlobRef) and self._bulk_listener is not None:
                self._bulk_listener.discard(env.body.transfer)  # nobody else will claim it
            return
        body = env.body
        if isinstance(body, Heartbeat):
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
        if pending is None or not await pending.put(env):
            await self._inbox.put(env)

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
        await self._dispatch(inner)
        return True

    # presence --------------------------------------------------------------------------------

    def add_peer_listener(self, listener: Callable[[PeerEvent], None]) -> None:
        """Call `listener` on every join, leave and death; it must not block."""
        self._listeners.append(listener)

    async def wait_for_peer(self, node: str, timeout: float, *, announced: bool = False) -> None:
        """Return once `node` is alive; raise `DeadlineExceeded` after `timeout` seconds.

        With `announced`, also wait for its `hello`, so its capabilities and bulk address are known.
        """
        deadline = time.monotonic() + timeout

        def ready() -> bool:
            peer = self.peers.get(node)
            return peer is not None and peer.alive and (not announced or peer.capabilities is not None)

        while not ready():
            if time.monotonic() > deadline:
                what = "announce itself" if announced else "appear"
                raise DeadlineExceeded(f"{self.node_id}: node {node!r} did not {what} within {timeout:g}s")
            await asyncio.sleep(min(0.01, self.heartbeat_s))

    def _on_presence(self, event: PresenceEvent) -> None:
        if event.node == self.node_id:
            return
        if event.state == "offline":
            self.peers.gone(event.node, "dead")
            return
        try:
            hello = decode(event.frame, verifier=self._verifier, fresh=False)
        except ProtocolError as exc:
            log.warning("%s: ignored presence of %s: %s", self.node_id, event.node, exc)
            return
        if isinstance(hello.body, Hello) and hello.src == event.node:
            body = hello.body
            self.peers.seen(event.node, body.capabilities, tuple(body.versions), body.bulk)

    def _on_peer_event(self, event: PeerEvent) -> None:
        if event.kind != "joined":
            why = "it said bye" if event.kind == "left" else "it was declared dead"
            for pending in self._pending.values():
                if pending.dst == event.node:
                    pending.fail(PeerUnreachable(event.node, why))
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("%s: peer listener failed on %s", self.node_id, event)

    async def _heartbeats(self) -> None:
        for seq in itertools.count():
            try:
                await self._send_envelope(
                    Envelope.new(src=self.node_id, dst="*", body=self._make_heartbeat(seq))
                )
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
