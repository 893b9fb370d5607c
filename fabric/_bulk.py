"""Direct bulk streams: large frames node to node over TCP, beside the broker.

Through Mosquitto a 64 MiB tensor moves at ~0.4 GB/s here: every byte crosses the broker, and
paho copies it on both sides. A direct TCP stream moves it at several GB/s. So a node may listen
for bulk streams (`BulkListener`) and announce the address in its `hello`; a sender streams a
large frame there (`BulkSender`) and then sends a small `blob.ref` through the fabric, which
delivers the stored frame in the sender's order. The byte layout is in `protocol._bulk`.

Neither side copies the payload: the sender writes views of the encoded parts, the receiver reads
into one buffer that the decoder then returns views of. Both compute the CRC-32C on the way.

Limits and policy of the listener:

- memory: it holds at most `max_stored_bytes` together with whatever `also_held` reports (the
  endpoint's chunk reassembler: one budget for both); a header that would exceed it, or a frame
  above `max_frame_bytes`, is refused before any byte of the frame is sent, and the sender uses
  `blob.chunk` through the broker instead. Nothing is ever evicted to make room: a refusal costs
  a slower path, an eviction would lose a message;
- a stored frame waits for its `blob.ref` as long as its sender is alive (the `blob.ref` may sit
  behind backpressure); `expire` drops it once it is older than `idle_timeout_s` and its sender is
  gone, and in any case after `max_unclaimed_s`;
- a frame must arrive within `idle_timeout_s` plus its size at `min_rate` bytes/s, and no stream
  may stall for `idle_timeout_s` mid-frame, so a trickling sender cannot hold the budget;
- a kept connection idle for `keep_idle_s` between transfers is closed; at most
  `max_connections` are open at once (more are closed on accept);
- a header naming another node is refused with ``WRONG_NODE`` (the address announced for that
  node reaches this one), so the sender falls back instead of losing the envelope;
- a failing accept (e.g. out of file descriptors) is logged and retried with backoff.

The sender keeps one connection per listener address; transfers to it take turns. A kept
connection the listener has since closed is retried once on a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from crc32c import crc32c
from typing_extensions import Buffer

from fabric._errors import DeadlineExceeded, FabricClosed, TransportError
from protocol import (
    BULK_HEADER_SIZE,
    BulkStatus,
    ChunkError,
    DecodeError,
    node_digest,
    pack_bulk_header,
    unpack_bulk_header,
)

__all__ = [
    "TRANSFER_MIN_RATE",
    "BulkListener",
    "BulkListenerStats",
    "BulkRefused",
    "BulkSender",
    "split_host_port",
]

log = logging.getLogger("fabric.bulk")

TRANSFER_MIN_RATE = 1e6
"""Bytes/s below which a bulk transfer is cut (after a grace of `idle_timeout_s`)."""

_CRC = struct.Struct(">I")
_PIECE = 4 << 20  # the sender checksums and writes this much at a time, so the CRC stays in cache
# After these statuses the listener closes the connection.
_CLOSING = frozenset({BulkStatus.BAD_HEADER, BulkStatus.WRONG_NODE})


def split_host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); `ValueError` naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bulk address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A kept connection to a host that vanished (no FIN, no RST) is found out by the kernel.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class BulkRefused(TransportError):
    """The receiver declined a transfer before any of its bytes were sent."""

    def __init__(self, address: str, status: BulkStatus) -> None:
        super().__init__(f"bulk receiver {address} refused the transfer: {status.name} ({status.meaning})")
        self.status = status


@dataclass
class _Stored:
    buffer: memoryview
    crc: int
    src: bytes
    stored_at: float


@dataclass
class BulkListenerStats:
    """Counters of one listener."""

    stored: int = 0
    claimed: int = 0
    refused: int = 0
    """Headers answered with anything but OK, and connections closed on accept over the cap."""
    failed: int = 0
    """Streams cut mid-frame (stalled, too slow, closed early), or whose checksum did not match."""
    expired: int = 0
    """Stored frames dropped unclaimed (`expire`) or discarded (`discard`)."""
    accept_errors: int = 0
    """Failed accepts (e.g. out of file descriptors), each retried after a pause."""


class BulkListener:
    """Accepts bulk streams for node `node_id` and keeps each frame until `claim` hands it over.

    Lifecycle: `start` (binds; `address` is then what peers should dial) -> `close`.
    """

    def __init__(
        self,
        listen: str,
        *,
        node_id: str,
        advertise: str | None = None,
        max_frame_bytes: int = 1 << 30,
        max_stored_bytes: int = 2 << 30,
        also_held: Callable[[], int] = lambda: 0,
        idle_timeout_s: float = 30.0,
        min_rate: float = TRANSFER_MIN_RATE,
        max_unclaimed_s: float = 600.0,
        keep_idle_s: float = 300.0,
        max_connections: int = 64,
    ) -> None:
        self._listen = split_host_port(listen)
        if advertise is not None:
            split_host_port(advertise)
        elif self._listen[0] in ("0.0.0.0", "::", ""):
            raise ValueError(
                f"bulk listener on {listen} binds every interface: say which address peers should dial "
                "(advertise='host:port')"
            )
        self._advertise = advertise
        self.node_id = node_id
        self._digest = node_digest(node_id)
        self.max_frame_bytes = max_frame_bytes
        self.max_stored_bytes = max_stored_bytes
        self.also_held = also_held
        self.idle_timeout_s = idle_timeout_s
        self.min_rate = min_rate
        self.max_unclaimed_s = max_unclaimed_s
        self.keep_idle_s = keep_idle_s
        self.max_connections = max_connections
        self.stats = BulkListenerStats()
        self.address = ""
        self._stored: dict[str, _Stored] = {}
        self._receiving: set[str] = set()
        self._held = 0  # bytes of stored frames plus frames being received
        self._open = 0  # connections being served
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def held_bytes(self) -> int:
        """Bytes of stored frames and of frames being received."""
        return self._held

    @property
    def connections(self) -> int:
        """Connections being served."""
        return self._open

    async def start(self) -> None:
        host, port = self._listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=64)
        sock.setblocking(False)
        self._sock = sock
        bound_port = sock.getsockname()[1]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self.address = self._advertise or f"{shown}:{bound_port}"
        self._task = asyncio.create_task(self._serve(sock), name=f"bulk-listener:{self.node_id}")

    async def close(self) -> None:
        """Stop accepting, cut open streams, drop stored frames. Idempotent; never raises."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # a bug in serving must not keep the endpoint from closing
                log.exception("%s: bulk listener failed", self.node_id)
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._stored.clear()
        self._held = 0

    def claim(self, transfer: str, *, size: int, crc: int) -> memoryview:
        """Hand over the stored frame of `transfer`; `ChunkError` when absent or not as announced."""
        stored = self._stored.pop(transfer, None)
        if stored is None:
            raise ChunkError(
                f"no bulk frame stored for transfer {transfer} (never arrived, or dropped unclaimed "
                "after its sender went away)"
            )
        self._held -= stored.buffer.nbytes
        if stored.buffer.nbytes != size or stored.crc != crc:
            raise ChunkError(
                f"bulk transfer {transfer}: stored {stored.buffer.nbytes} bytes with CRC-32C "
                f"{stored.crc:#010x}, blob.ref says {size} bytes with {crc:#010x}"
            )
        self.stats.claimed += 1
        return stored.buffer

    def discard(self, transfer: str) -> bool:
        """Drop the stored frame of `transfer` (its `blob.ref` came expired); False if none."""
        stored = self._stored.pop(transfer, None)
        if stored is None:
            return False
        self._held -= stored.buffer.nbytes
        self.stats.expired += 1
        return True

    def expire(self, alive: Callable[[bytes], bool] = lambda src: False) -> int:
        """Drop stored frames nobody will claim; return how many.

        A frame goes once it is older than `idle_timeout_s` and `alive` (given the sender's
        `node_digest`) says its sender is gone, or once it is older than `max_unclaimed_s`.
        """
        now = time.monotonic()
        old = [
            t
            for t, s in self._stored.items()
            if now - s.stored_at > self.max_unclaimed_s
            or (now - s.stored_at > self.idle_timeout_s and not alive(s.src))
        ]
        for transfer in old:
            self._held -= self._stored.pop(transfer).buffer.nbytes
            log.warning(
                "%s: bulk transfer %s was never claimed by a blob.ref; dropped", self.node_id, transfer
            )
        self.stats.expired += len(old)
        return len(old)

    # serving ---------------------------------------------------------------------------------

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        pause = 0.05
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    conn, peer = await loop.sock_accept(sock)
                except OSError as exc:
                    # e.g. EMFILE: the connection waits in the backlog; try again after a pause
                    self.stats.accept_errors += 1
                    log.warning(
                        "%s: bulk listener cannot accept (%s); retrying in %.2fs", self.node_id, exc, pause
                    )
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, 2.0)
                    continue
                pause = 0.05
                if self._open >= self.max_connections:
                    self.stats.refused += 1
                    log.warning(
                        "%s: closed a bulk connection from %s: %d are open", self.node_id, peer, self._open
                    )
                    conn.close()
                    continue
                self._open += 1
                tg.create_task(self._connection(conn), name=f"bulk-conn:{self.node_id}:{peer}")

    async def _connection(self, conn: socket.socket) -> None:
        try:
            _tune(conn)
            while await self._one_transfer(conn):
                pass
        except TimeoutError:
            self.stats.failed += 1
            log.warning(
                "%s: bulk stream cut: stalled for %gs or slower than %g bytes/s",
                self.node_id,
                self.idle_timeout_s,
                self.min_rate,
            )
        except (OSError, EOFError) as exc:
            self.stats.failed += 1
            log.warning("%s: bulk stream cut: %s", self.node_id, exc)
        except Exception:  # one bad connection must never stop the listener
            self.stats.failed += 1
            log.exception("%s: bulk stream failed", self.node_id)
        finally:
            self._open -= 1
            conn.close()

    def _admit(self, transfer: str, size: int) -> BulkStatus:
        if size > self.max_frame_bytes:
            return BulkStatus.TOO_LARGE
        if transfer in self._stored or transfer in self._receiving:
            return BulkStatus.DUPLICATE
        if self._held + self.also_held() + size > self.max_stored_bytes:
            return BulkStatus.BUSY
        return BulkStatus.OK

    async def _refuse(self, conn: socket.socket, status: BulkStatus, why: str) -> None:
        self.stats.refused += 1
        if status in _CLOSING:
            log.warning("%s: refused a bulk stream: %s", self.node_id, why)
        await asyncio.get_running_loop().sock_sendall(conn, bytes([status]))

    async def _one_transfer(self, conn: socket.socket) -> bool:
        """Serve one transfer; False when the connection is to be closed."""
        loop = asyncio.get_running_loop()
        header = bytearray(BULK_HEADER_SIZE)
        try:
            async with asyncio.timeout(self.keep_idle_s):  # a kept connection waits this long
                got = await loop.sock_recv_into(conn, header)
        except TimeoutError:
            return False
        if got == 0:
            return False
        if got < BULK_HEADER_SIZE:
            async with asyncio.timeout(self.idle_timeout_s):
                await _recv_exactly(conn, memoryview(header)[got:])
        try:
            transfer, src, dst, size = unpack_bulk_header(bytes(header))
        except DecodeError as exc:
            await self._refuse(conn, BulkStatus.BAD_HEADER, str(exc))
            return False
        if dst != self._digest:
            await self._refuse(
                conn,
                BulkStatus.WRONG_NODE,
                f"transfer {transfer} is for another node, not {self.node_id} (the address announced "
                "for that node leads here)",
            )
            return False
        status = self._admit(transfer, size)
        if status != BulkStatus.OK:
            await self._refuse(conn, status, status.meaning)
            return True
        self._held += size
        self._receiving.add(transfer)
        stored = False
        try:
            await loop.sock_sendall(conn, bytes([BulkStatus.OK]))
            # np.empty: the buffer is written once by recv, so zero-filling it would be wasted work.
            buffer = np.empty(size, dtype=np.uint8).data.cast("B")
            trailer = bytearray(_CRC.size)
            async with asyncio.timeout(self.idle_timeout_s + size / self.min_rate):
                crc = await self._receive(conn, buffer)
                await _recv_exactly(conn, memoryview(trailer))
            (sent_crc,) = _CRC.unpack(trailer)
            if sent_crc != crc:
                self.stats.failed += 1
                log.warning(
                    "%s: bulk transfer %s: CRC-32C %#010x, sender says %#010x; dropped",
                    self.node_id,
                    transfer,
                    crc,
                    sent_crc,
                )
                await loop.sock_sendall(conn, bytes([BulkStatus.BAD_CHECKSUM]))
                return False
            self._stored[transfer] = _Stored(buffer, crc, src, time.monotonic())
            stored = True
            self.stats.stored += 1
            await loop.sock_sendall(conn, bytes([BulkStatus.OK]))
            return True
        finally:
            self._receiving.discard(transfer)
            if not stored:
                self._held -= size

    async def _receive(self, conn: socket.socket, buffer: memoryview) -> int:
        """Fill `buffer` from `conn`, checksumming as it arrives; cut after `idle_timeout_s` of silence."""
        loop = asyncio.get_running_loop()
        crc, got, size = 0, 0, buffer.nbytes
        async with asyncio.timeout(loop.time() + self.idle_timeout_s) as watchdog:
            rescheduled = loop.time()
            while got < size:
                n = await loop.sock_recv_into(conn, buffer[got:])
                if n == 0:
                    raise EOFError(f"sender closed the stream after {got} of {size} bytes")
                crc = crc32c(buffer[got : got + n], crc)
                got += n
                now = loop.time()
                if now - rescheduled > 0.5:  # progress: push the watchdog back (cheaply, not per read)
                    watchdog.reschedule(now + self.idle_timeout_s)
                    rescheduled = now
        return crc


async def _recv_exactly(conn: socket.socket, view: memoryview) -> None:
    loop = asyncio.get_running_loop()
    got = 0
    while got < view.nbytes:
        n = await loop.sock_recv_into(conn, view[got:])
        if n == 0:
            raise EOFError(f"peer closed the stream after {got} of {view.nbytes} bytes")
        got += n


async def _recv_status(conn: socket.socket) -> BulkStatus:
    data = await asyncio.get_running_loop().sock_recv(conn, 1)
    if not data:
        raise EOFError("bulk receiver closed the connection")
    try:
        return BulkStatus(data[0])
    except ValueError:
        raise EOFError(f"bulk receiver answered an unknown status {data[0]}") from None


@dataclass
class _Connection:
    sock: socket.socket | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class BulkSender:
    """Streams frames from node `node_id` to bulk listeners, one kept connection per address."""

    def __init__(self, node_id: str, *, connect_timeout_s: float = 5.0) -> None:
        self.node_id = node_id
        self.connect_timeout_s = connect_timeout_s
        self._connections: dict[str, _Connection] = {}
        self._closed = False

    async def push(
        self, address: str, dst: str, transfer: str, parts: Sequence[Buffer], timeout: float
    ) -> tuple[int, int]:
        """Stream the concatenation of `parts` to node `dst` at `address` as `transfer`.

        Returns (size, CRC-32C) once the receiver has stored the frame. Otherwise the frame is not
        stored there, and the caller sends it another way; raises

        - `BulkRefused` when the receiver declines before the frame is sent;
        - `DeadlineExceeded` when `timeout` passes (also while waiting for the connection);
        - `TransportError` (naming the address) when the address cannot be dialled or the stream
          breaks; `FabricClosed` after `close`.
        """
        if self._closed:
            raise FabricClosed(f"{self.node_id}: bulk sender is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._connections.setdefault(address, _Connection())
        try:
            async with asyncio.timeout_at(deadline):
                await conn.lock.acquire()
        except TimeoutError:
            raise DeadlineExceeded(
                f"bulk stream to {address}: the connection stayed busy for {timeout:g}s"
            ) from None
        try:
            return await self._push(
                conn, address=address, dst=dst, transfer=transfer, parts=parts, deadline=deadline
            )
        except TimeoutError:
            raise DeadlineExceeded(f"bulk stream to {address}: not stored within {timeout:g}s") from None
        finally:
            conn.lock.release()

    async def _push(
        self,
        conn: _Connection,
        *,
        address: str,
        dst: str,
        transfer: str,
        parts: Sequence[Buffer],
        deadline: float,
    ) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        views = [memoryview(p).cast("B") for p in parts]
        size = sum(v.nbytes for v in views)
        header = pack_bulk_header(transfer, size, src=self.node_id, dst=dst)
        try:
            async with asyncio.timeout_at(deadline):
                status = await self._announce(conn, address, header)
                if status != BulkStatus.OK:
                    if status in _CLOSING:
                        self._drop(conn)
                    raise BulkRefused(address, status)
                sock = conn.sock
                assert sock is not None
                crc = 0
                for view in views:
                    for start in range(0, view.nbytes, _PIECE):
                        piece = view[start : start + _PIECE]
                        crc = crc32c(piece, crc)
                        await loop.sock_sendall(sock, piece)
                await loop.sock_sendall(sock, _CRC.pack(crc))
                status = await _recv_status(sock)
        except BulkRefused:
            raise
        except TimeoutError:  # (an OSError too, so caught first) out of step: never reuse it
            self._drop(conn)
            raise
        except (OSError, EOFError) as exc:
            self._drop(conn)
            raise TransportError(f"bulk stream to {address} failed: {exc}") from exc
        except BaseException:  # timed out or cancelled mid-frame: the stream is out of step
            self._drop(conn)
            raise
        if status != BulkStatus.OK:
            self._drop(conn)
            raise TransportError(
                f"bulk receiver {address} did not store transfer {transfer}: {status.name} ({status.meaning})"
            )
        return size, crc

    async def _announce(self, conn: _Connection, address: str, header: bytes) -> BulkStatus:
        """Send the header and return the receiver's answer, on the kept connection if it still works."""
        loop = asyncio.get_running_loop()
        if conn.sock is not None:
            try:
                await loop.sock_sendall(conn.sock, header)
                return await _recv_status(conn.sock)
            except (OSError, EOFError) as exc:
                # The listener closes connections idle too long; nothing of ours was stored.
                log.debug("%s: kept bulk connection to %s is stale (%s)", self.node_id, address, exc)
                self._drop(conn)
        conn.sock = await self._connect(address)
        await loop.sock_sendall(conn.sock, header)
        return await _recv_status(conn.sock)

    async def _connect(self, address: str) -> socket.socket:
        loop = asyncio.get_running_loop()
        try:
            host, port = split_host_port(address)
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (ValueError, UnicodeError, OSError) as exc:  # socket.gaierror is an OSError
            raise OSError(f"cannot resolve {address!r}: {exc}") from exc
        if not infos:
            raise OSError(f"cannot resolve {address!r}")
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            _tune(sock)
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    await loop.sock_connect(sock, sockaddr)
            except TimeoutError:
                raise OSError(f"no connection to {address} within {self.connect_timeout_s:g}s") from None
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _drop(conn: _Connection) -> None:
        if conn.sock is not None:
            conn.sock.close()
            conn.sock = None

    async def close(self) -> None:
        """Close every kept connection; a push under way fails at once. Idempotent."""
        self._closed = True
        for conn in self._connections.values():
            if conn.sock is None:
                continue
            if conn.lock.locked():
                # A push is waiting on this socket: shutting it down wakes the push with an error,
                # and the push closes it. Closing it here would leave the push waiting forever.
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
            else:
                self._drop(conn)
        self._connections.clear()
