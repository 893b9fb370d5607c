"""Direct bulk streams: large frames node to node over TCP, beside the broker.

Through Mosquitto a 64 MiB tensor moves at ~0.4 GB/s here: every byte crosses the broker, and
paho copies it on both sides. A direct TCP stream moves it at several GB/s. So a node may listen
for bulk streams (`BulkListener`) and announce the address in its `hello`; a sender streams a
large frame there (`BulkSender`) and then sends a small `blob.ref` through the fabric, which
delivers the stored frame in the sender's order. The byte layout is in `protocol._bulk`.

Neither side copies the payload: the sender writes views of the encoded parts, the receiver reads
into one buffer that the decoder then returns views of. Both compute the CRC-32C on the way.

Limits and policy:

- the listener holds at most `max_stored_bytes` (a frame counts from its header on); a header
  that would exceed it, or a frame above `max_frame_bytes`, is refused before any byte of the frame
  is sent, and the sender uses `blob.chunk` through the broker instead;
- a frame stored and not claimed by a `blob.ref` within `idle_timeout_s` is dropped (its sender
  died before sending the `blob.ref`, or the `blob.ref` arrived expired); a stream that stalls for
  `idle_timeout_s` mid-frame is cut;
- connections are kept: one per receiver, transfers to the same receiver take turns on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from crc32c import crc32c
from typing_extensions import Buffer

from fabric._errors import TransportError
from protocol import (
    BULK_HEADER_SIZE,
    BulkStatus,
    ChunkError,
    DecodeError,
    pack_bulk_header,
    unpack_bulk_header,
)

__all__ = ["BulkListener", "BulkListenerStats", "BulkRefused", "BulkSender", "split_host_port"]

log = logging.getLogger("fabric.bulk")

_CRC = struct.Struct(">I")
_PIECE = 4 << 20  # the sender checksums and writes this much at a time, so the CRC stays in cache


def split_host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); `ValueError` naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bulk address {address!r} is not host:port")
    return host.strip("[]"), int(port)


class BulkRefused(TransportError):
    """The receiver declined a transfer before any of its bytes were sent; the connection is fine."""

    def __init__(self, address: str, status: BulkStatus) -> None:
        super().__init__(f"bulk receiver {address} refused the transfer: {status.name} ({status.meaning})")
        self.status = status


@dataclass
class _Stored:
    buffer: memoryview
    crc: int
    stored_at: float


@dataclass
class BulkListenerStats:
    """Counters of one listener."""

    stored: int = 0
    claimed: int = 0
    refused: int = 0
    """Headers answered with anything but OK (busy, too large, duplicate, bad header)."""
    failed: int = 0
    """Streams cut mid-frame, or whose checksum did not match."""
    expired: int = 0
    """Stored frames dropped because no `blob.ref` claimed them in time."""


class BulkListener:
    """Accepts bulk streams and keeps each frame until `claim` hands it over.

    Lifecycle: `start` (binds; `address` is then what peers should dial) -> `close`.
    """

    def __init__(
        self,
        listen: str,
        *,
        advertise: str | None = None,
        max_frame_bytes: int = 1 << 30,
        max_stored_bytes: int = 2 << 30,
        idle_timeout_s: float = 30.0,
        name: str = "",
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
        self.max_frame_bytes = max_frame_bytes
        self.max_stored_bytes = max_stored_bytes
        self.idle_timeout_s = idle_timeout_s
        self.stats = BulkListenerStats()
        self.address = ""
        self._name = name
        self._stored: dict[str, _Stored] = {}
        self._receiving: set[str] = set()
        self._held = 0  # bytes of stored frames plus frames being received
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def held_bytes(self) -> int:
        """Bytes of stored frames and of frames being received."""
        return self._held

    async def start(self) -> None:
        host, port = self._listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=64)
        sock.setblocking(False)
        self._sock = sock
        bound_port = sock.getsockname()[1]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self.address = self._advertise or f"{shown}:{bound_port}"
        self._task = asyncio.create_task(self._serve(sock), name=f"bulk-listener:{self._name}")

    async def close(self) -> None:
        """Stop accepting, cut open streams, drop stored frames. Idempotent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
                f"no bulk frame stored for transfer {transfer} (never arrived, or dropped after "
                f"{self.idle_timeout_s:g}s unclaimed)"
            )
        self._held -= stored.buffer.nbytes
        if stored.buffer.nbytes != size or stored.crc != crc:
            raise ChunkError(
                f"bulk transfer {transfer}: stored {stored.buffer.nbytes} bytes with CRC-32C "
                f"{stored.crc:#010x}, blob.ref says {size} bytes with {crc:#010x}"
            )
        self.stats.claimed += 1
        return stored.buffer

    def expire(self) -> int:
        """Drop stored frames unclaimed for longer than `idle_timeout_s`; return how many."""
        cutoff = time.monotonic() - self.idle_timeout_s
        old = [t for t, s in self._stored.items() if s.stored_at < cutoff]
        for transfer in old:
            self._held -= self._stored.pop(transfer).buffer.nbytes
            log.warning("%s: bulk transfer %s was never claimed by a blob.ref; dropped", self._name, transfer)
        self.stats.expired += len(old)
        return len(old)

    # serving ---------------------------------------------------------------------------------

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            while True:
                conn, peer = await loop.sock_accept(sock)
                tg.create_task(self._connection(conn), name=f"bulk-conn:{self._name}:{peer}")

    async def _connection(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while await self._one_transfer(conn):
                pass
        except TimeoutError:
            self.stats.failed += 1
            log.warning("%s: bulk stream cut: nothing for %gs mid-transfer", self._name, self.idle_timeout_s)
        except (OSError, EOFError) as exc:
            self.stats.failed += 1
            log.warning("%s: bulk stream cut: %s", self._name, exc)
        except Exception:  # one bad connection must never stop the listener
            self.stats.failed += 1
            log.exception("%s: bulk stream failed", self._name)
        finally:
            conn.close()

    def _admit(self, transfer: str, size: int) -> BulkStatus:
        if size > self.max_frame_bytes:
            return BulkStatus.TOO_LARGE
        if transfer in self._stored or transfer in self._receiving:
            return BulkStatus.DUPLICATE
        if self._held + size > self.max_stored_bytes:
            return BulkStatus.BUSY
        return BulkStatus.OK

    async def _one_transfer(self, conn: socket.socket) -> bool:
        """Serve one transfer; False when the peer closed the connection between transfers."""
        loop = asyncio.get_running_loop()
        header = bytearray(BULK_HEADER_SIZE)
        # Between transfers a pooled connection may sit idle as long as its sender likes.
        got = await loop.sock_recv_into(conn, header)
        if got == 0:
            return False
        if got < BULK_HEADER_SIZE:
            async with asyncio.timeout(self.idle_timeout_s):
                await _recv_exactly(conn, memoryview(header)[got:])
        try:
            transfer, size = unpack_bulk_header(bytes(header))
        except DecodeError as exc:
            self.stats.refused += 1
            log.warning("%s: refused a bulk stream: %s", self._name, exc)
            await loop.sock_sendall(conn, bytes([BulkStatus.BAD_HEADER]))
            return False
        status = self._admit(transfer, size)
        if status != BulkStatus.OK:
            self.stats.refused += 1
            await loop.sock_sendall(conn, bytes([status]))
            return True
        self._held += size
        self._receiving.add(transfer)
        stored = False
        try:
            await loop.sock_sendall(conn, bytes([BulkStatus.OK]))
            # np.empty: the buffer is written once by recv, so zero-filling it would be wasted work.
            buffer = np.empty(size, dtype=np.uint8).data.cast("B")
            crc = await self._receive(conn, buffer)
            trailer = bytearray(_CRC.size)
            async with asyncio.timeout(self.idle_timeout_s):
                await _recv_exactly(conn, memoryview(trailer))
            (sent_crc,) = _CRC.unpack(trailer)
            if sent_crc != crc:
                self.stats.failed += 1
                log.warning(
                    "%s: bulk transfer %s: CRC-32C %#010x, sender says %#010x; dropped",
                    self._name,
                    transfer,
                    crc,
                    sent_crc,
                )
                await loop.sock_sendall(conn, bytes([BulkStatus.BAD_CHECKSUM]))
                return False
            self._stored[transfer] = _Stored(buffer, crc, time.monotonic())
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
    """Streams frames to bulk listeners, one kept connection per listener address."""

    def __init__(self, *, connect_timeout_s: float = 5.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._connections: dict[str, _Connection] = {}

    async def push(
        self, address: str, transfer: str, parts: Sequence[Buffer], timeout: float
    ) -> tuple[int, int]:
        """Stream the concatenation of `parts` to `address` as `transfer`; return (size, CRC-32C).

        Raises `BulkRefused` when the receiver declines before the frame is sent, and
        `TransportError` (naming the address) when the connection fails or `timeout` passes; the
        frame is then not stored there, and the caller sends it another way.
        """
        loop = asyncio.get_running_loop()
        views = [memoryview(p).cast("B") for p in parts]
        size = sum(v.nbytes for v in views)
        conn = self._connections.setdefault(address, _Connection())
        async with conn.lock:
            try:
                async with asyncio.timeout(timeout):
                    sock = conn.sock or await self._connect(address)
                    conn.sock = sock
                    await loop.sock_sendall(sock, pack_bulk_header(transfer, size))
                    status = await _recv_status(sock)
                    if status != BulkStatus.OK:
                        raise BulkRefused(address, status)
                    crc = 0
                    for view in views:
                        for start in range(0, view.nbytes, _PIECE):
                            piece = view[start : start + _PIECE]
                            crc = crc32c(piece, crc)
                            await loop.sock_sendall(sock, piece)
                    await loop.sock_sendall(sock, _CRC.pack(crc))
                    status = await _recv_status(sock)
                    if status != BulkStatus.OK:
                        raise TransportError(
                            f"bulk receiver {address} did not store transfer {transfer}: "
                            f"{status.name} ({status.meaning})"
                        )
                    return size, crc
            except BulkRefused:
                raise
            except (OSError, EOFError, TimeoutError, TransportError) as exc:
                self._drop(conn)
                if isinstance(exc, TransportError):
                    raise
                why = f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError) else str(exc)
                raise TransportError(f"bulk stream to {address} failed: {why}") from exc
            except BaseException:  # cancelled mid-frame: the stream is out of step, never reuse it
                self._drop(conn)
                raise

    async def _connect(self, address: str) -> socket.socket:
        host, port = split_host_port(address)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {host!r}")
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        """Close every kept connection. Idempotent."""
        for conn in self._connections.values():
            self._drop(conn)
        self._connections.clear()
