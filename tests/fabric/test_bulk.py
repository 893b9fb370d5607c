"""Large envelopes on direct bulk streams, beside the broker, and every way that can go wrong."""

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from fabric import DeadlineExceeded, Endpoint, FabricClosed, LinkSpec, LinkTable, TransportError
from fabric._bulk import BulkListener, BulkRefused, BulkSender
from protocol import (
    BULK_HEADER_SIZE,
    BlobRef,
    BulkStatus,
    ChunkError,
    Envelope,
    Reassembler,
    Signer,
    TaskProgress,
    TaskResult,
    TooLargeError,
    Verifier,
    encode,
    encode_parts,
    new_id,
    pack_bulk_header,
    split_blob,
)
from tests.fabric.harness import Harness, eventually

LOCAL = "127.0.0.1:0"


def result(value: object) -> TaskResult:
    return TaskResult(job="j", task="t", attempt=0, value=value)


async def knows_bulk_address(sender: Endpoint, node: str) -> None:
    await sender.wait_for_peer(node, timeout=30, announced=True)
    peer = sender.peers.get(node)
    assert peer is not None and peer.bulk is not None, f"{node} announced no bulk address"


async def test_a_64_mib_tensor_crosses_on_a_bulk_stream_intact(fabric: Harness) -> None:
    a, b = await fabric.endpoint("a"), await fabric.endpoint("b", bulk=LOCAL)
    await knows_bulk_address(a, "b")
    tensor = np.random.default_rng(5).standard_normal(16 << 20).astype(np.float32)
    await a.send("b", result(tensor))
    env = await b.recv(timeout=120)
    assert np.array_equal(env.body.value, tensor)
    assert (a.stats.bulk_sent, a.stats.chunks_sent, b.stats.bulk_received) == (1, 0, 1)


async def test_bulk_envelopes_keep_their_place_among_small_ones(fabric: Harness) -> None:
    a, b = await fabric.endpoint("a"), await fabric.endpoint("b", bulk=LOCAL)
    await knows_bulk_address(a, "b")
    big = np.arange(3 << 20, dtype=np.uint8)
    for seq in range(9):
        data = big if seq % 3 == 1 else None
        await a.send("b", TaskProgress(job="j", task="t", attempt=0, seq=seq, data=data))
    got = [await b.recv(timeout=60) for _ in range(9)]
    assert [env.body.seq for env in got] == list(range(9))
    assert all(np.array_equal(env.body.data, big) for env in got[1::3])
    assert a.stats.bulk_sent == 3


class TcpServer:
    """A TCP server that is no bulk listener: it counts connections and either closes each at
    once (`hang_up`) or holds it open without a word."""

    def __init__(self, *, hang_up: bool) -> None:
        self.hang_up = hang_up
        self.accepted = 0
        self._held: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> "TcpServer":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.hang_up:
            writer.close()
        else:
            self._held.append(writer)

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._held:
            writer.close()
        assert self._server is not None
        self._server.close()


async def test_an_unreachable_bulk_address_falls_back_to_chunks_and_is_not_tried_again(
    fabric: Harness,
) -> None:
    async with TcpServer(hang_up=True) as server:  # announced, but it hangs up on every stream
        a = await fabric.endpoint("a")
        b = await fabric.endpoint("b", bulk=LOCAL, bulk_advertise=server.address)
        await knows_bulk_address(a, "b")
        payload = np.arange(2 << 20, dtype=np.uint8)
        for _ in range(2):
            await a.send("b", result(payload))
            assert np.array_equal((await b.recv(timeout=60)).body.value, payload)
        # Both went as chunks; the second did not even dial the address that had just failed.
        assert (a.stats.bulk_sent, a.stats.bulk_fallbacks, a.stats.blobs_sent) == (0, 2, 2)
        assert server.accepted == 1


async def test_an_address_that_leads_to_another_node_is_refused_and_nothing_is_lost() -> None:
    fabric = Harness("inproc")
    try:
        c = await fabric.endpoint("c", bulk=LOCAL)
        assert c.bulk_listener is not None
        # b announces c's listener as its own (a stale or wrong address, e.g. 'localhost' elsewhere)
        a = await fabric.endpoint("a")
        b = await fabric.endpoint("b", bulk=LOCAL, bulk_advertise=c.bulk_listener.address)
        await knows_bulk_address(a, "b")
        payload = np.arange(2 << 20, dtype=np.uint8)
        await a.send("b", result(payload))
        assert np.array_equal((await b.recv(timeout=60)).body.value, payload)
        assert (a.stats.bulk_sent, a.stats.bulk_fallbacks) == (0, 1)
        assert c.bulk_listener.stats.stored == 0 and c.bulk_listener.stats.refused == 1
        assert c.bulk_listener.held_bytes == 0
    finally:
        await fabric.close()


async def test_a_deadline_that_runs_out_mid_stream_drops_the_envelope_but_not_the_address() -> None:
    fabric = Harness("inproc")
    async with TcpServer(hang_up=False) as server:  # takes the connection, never answers
        try:
            a = await fabric.endpoint("a")
            b = await fabric.endpoint("b", bulk=LOCAL, bulk_advertise=server.address)
            await knows_bulk_address(a, "b")
            big = result(np.zeros(2 << 20, dtype=np.uint8))
            await a.send("b", big, deadline=time.time() + 0.5)
            # dropped when its deadline passed mid-stream, not sent on as chunks
            assert (a.stats.expired, a.stats.chunks_sent, a.stats.bulk_fallbacks) == (1, 0, 1)
            # The address was slow for that deadline, not broken: the next large send dials it again.
            await a.send("b", big, deadline=time.time() + 0.5)
            assert a.stats.expired == 2
            assert server.accepted == 2 and b.stats.received == 0
        finally:
            await fabric.close()


async def test_an_emulated_link_carries_chunks_so_its_shape_holds() -> None:
    fabric = Harness("inproc")
    try:
        a = await fabric.endpoint("a", links=LinkTable({"b": LinkSpec(bandwidth_mbps=10_000)}))
        b = await fabric.endpoint("b", bulk=LOCAL)
        await knows_bulk_address(a, "b")
        await a.send("b", result(np.zeros(2 << 20, dtype=np.uint8)))
        await b.recv(timeout=60)
        assert a.stats.bulk_sent == 0 and a.stats.chunks_sent == 3
    finally:
        await fabric.close()


async def test_a_blob_ref_for_bytes_never_sent_is_counted_and_the_node_keeps_working() -> None:
    fabric = Harness("inproc")
    try:
        a, b = await fabric.endpoint("a"), await fabric.endpoint("b", bulk=LOCAL)
        forged = Envelope.new(src="a", dst="b", body=BlobRef(transfer=new_id(), size=10, crc32c=0))
        await a.transport.send("b", encode(forged))
        await a.send("b", TaskProgress(job="j", task="t", attempt=0, seq=1))
        assert (await b.recv(timeout=30)).body.seq == 1
        assert b.stats.blob_errors == 1 and b.stats.bulk_received == 0
    finally:
        await fabric.close()


async def test_a_signing_fabric_verifies_what_came_on_a_bulk_stream() -> None:
    """Three forgeries, each stopped by its own check; the genuine envelope arrives."""
    fabric = Harness("inproc")
    key, keys = b"k" * 32, {"k1": b"k" * 32}
    try:
        a = await fabric.endpoint("a", signer=Signer("k1", key), verifier=Verifier(keys))
        b = await fabric.endpoint("b", bulk=LOCAL, signer=Signer("k1", key), verifier=Verifier(keys))
        mallory = await fabric.endpoint("mallory", signer=Signer("k1", b"m" * 32))
        await knows_bulk_address(a, "b")
        await knows_bulk_address(mallory, "b")
        address = b.bulk_listener.address if b.bulk_listener else ""
        payload = np.arange(2 << 20, dtype=np.uint8)
        # 1. mallory's own blob.ref fails its MAC (its bulk frame is stored, never delivered)
        await mallory.send("b", result(payload))
        # 2. a frame in a's name signed with mallory's key, claimed by a genuine blob.ref of a's:
        #    the frame's own MAC refuses it
        sender = BulkSender("a")
        forged = Envelope.new(src="a", dst="b", body=result(payload))
        size, crc = await sender.push(
            address, "b", forged.id, encode_parts(forged, signer=Signer("k1", b"m" * 32)), timeout=30
        )
        await a.send("b", BlobRef(transfer=forged.id, size=size, crc32c=crc))
        # 3. a frame validly signed, but by c, claimed by a's blob.ref: the sources differ
        foreign = Envelope.new(src="c", dst="b", body=result(payload))
        size, crc = await sender.push(
            address, "b", foreign.id, encode_parts(foreign, signer=Signer("k1", key)), timeout=30
        )
        await a.send("b", BlobRef(transfer=foreign.id, size=size, crc32c=crc))
        await sender.close()
        await a.send("b", result(payload))
        env = await b.recv(timeout=60)
        assert env.src == "a" and np.array_equal(env.body.value, payload)
        assert b.stats.bulk_received == 1 and b._inbox.empty()
        assert mallory.stats.bulk_sent == 1 and b.stats.malformed >= 1
        assert b.stats.blob_errors == 2  # the forged MAC and the foreign source
    finally:
        await fabric.close()


async def test_a_frame_waits_for_its_blob_ref_while_its_sender_lives() -> None:
    """A blob.ref may sit behind backpressure past the idle timeout: the frame must still be there.
    A frame whose sender is gone is dropped."""
    fabric = Harness("inproc")
    try:
        a = await fabric.endpoint("a", heartbeat_s=0.05)
        b = await fabric.endpoint(
            "b", bulk=LOCAL, heartbeat_s=0.05, reassembler=Reassembler(idle_timeout_s=0.1)
        )
        await a.wait_for_peer("b", timeout=30, announced=True)
        await b.wait_for_peer("a", timeout=30)
        listener = b.bulk_listener
        assert listener is not None
        inner = Envelope.new(src="a", dst="b", body=result(np.arange(2 << 20, dtype=np.uint8)))
        sender, ghost = BulkSender("a"), BulkSender("ghost")
        size, crc = await sender.push(listener.address, "b", inner.id, encode_parts(inner), timeout=30)
        await ghost.push(listener.address, "b", new_id(), [bytes(1000)], timeout=30)
        await sender.close()
        await ghost.close()
        await eventually(lambda: listener.stats.expired == 1, what="the ghost's frame dropped")
        await asyncio.sleep(0.3)  # several failure-detector sweeps past the idle timeout
        await a.send("b", BlobRef(transfer=inner.id, size=size, crc32c=crc))
        got = await b.recv(timeout=30)
        assert got.id == inner.id and listener.held_bytes == 0 and listener.stats.expired == 1
    finally:
        await fabric.close()


async def test_a_blob_ref_that_arrives_expired_frees_its_frame() -> None:
    fabric = Harness("inproc")
    try:
        a, b = await fabric.endpoint("a"), await fabric.endpoint("b", bulk=LOCAL)
        listener = b.bulk_listener
        assert listener is not None
        sender = BulkSender("a")
        transfer = new_id()
        size, crc = await sender.push(listener.address, "b", transfer, [bytes(5000)], timeout=30)
        await sender.close()
        assert listener.held_bytes == 5000
        late = Envelope.new(src="a", dst="b", body=BlobRef(transfer=transfer, size=size, crc32c=crc))
        await a.transport.send("b", encode(late.model_copy(update={"deadline": late.ts - 1})))
        await eventually(lambda: listener.held_bytes == 0, what="the frame freed")
        assert b.stats.expired == 1 and listener.stats.expired == 1
    finally:
        await fabric.close()


async def test_chunks_and_bulk_frames_share_one_memory_budget() -> None:
    fabric = Harness("inproc")
    try:
        reassembler = Reassembler(max_transfer_bytes=4 << 20, max_buffered_bytes=5 << 20)
        b = await fabric.endpoint("b", bulk=LOCAL, reassembler=reassembler)
        listener = b.bulk_listener
        assert listener is not None and reassembler.also_held() == 0
        # with a bulk frame of 3 MiB stored, a chunked transfer of 3 MiB no longer fits in 5 MiB
        sender = BulkSender("a")
        await sender.push(listener.address, "b", new_id(), [bytes(3 << 20)], timeout=30)
        assert reassembler.also_held() == 3 << 20
        first = next(split_blob([bytes(3 << 20)], chunk_size=1 << 20))
        with pytest.raises(TooLargeError, match="reassembly buffers hold 3145728 bytes"):
            reassembler.add(first, source="a")
        reassembler.add(next(split_blob([bytes(3 << 19)], chunk_size=1 << 20)), source="a")
        with pytest.raises(BulkRefused, match="BUSY"):  # 3 MiB stored + 1.5 MiB reassembling
            await sender.push(listener.address, "b", new_id(), [bytes(1 << 20)], timeout=30)
        await sender.close()
    finally:
        await fabric.close()


# the listener and sender on their own -----------------------------------------------------------


@pytest.fixture
async def listener() -> AsyncIterator[BulkListener]:
    bulk = BulkListener(
        LOCAL, node_id="rx", max_frame_bytes=1 << 20, max_stored_bytes=3 << 19, idle_timeout_s=5
    )
    await bulk.start()
    yield bulk
    await bulk.close()
    assert bulk.held_bytes == 0


@pytest.fixture
async def sender() -> AsyncIterator[BulkSender]:
    bulk = BulkSender("tx")
    yield bulk
    await bulk.close()


async def push(
    sender: BulkSender, address: str, data: bytes, transfer: str | None = None, dst: str = "rx"
) -> tuple[str, int]:
    transfer = transfer or new_id()
    _, crc = await sender.push(address, dst, transfer, [data], timeout=30)
    return transfer, crc


async def test_a_stored_frame_is_claimed_once_and_only_as_announced(
    listener: BulkListener, sender: BulkSender
) -> None:
    data = bytes(range(256)) * 100
    transfer, crc = await push(sender, listener.address, data)
    with pytest.raises(ChunkError, match=r"blob\.ref says 5 bytes"):
        listener.claim(transfer, size=5, crc=crc)
    transfer, crc = await push(sender, listener.address, data)
    with pytest.raises(ChunkError, match=f"blob\\.ref says {len(data)} bytes with {crc ^ 1:#010x}"):
        listener.claim(transfer, size=len(data), crc=crc ^ 1)
    transfer, crc = await push(sender, listener.address, data)
    assert bytes(listener.claim(transfer, size=len(data), crc=crc)) == data
    with pytest.raises(ChunkError, match=f"no bulk frame stored for transfer {transfer}"):
        listener.claim(transfer, size=len(data), crc=crc)
    assert listener.held_bytes == 0
    assert listener.connections == 1  # all three went on one kept connection


async def test_a_listener_refuses_what_it_cannot_hold_before_the_bytes_are_sent(
    listener: BulkListener, sender: BulkSender
) -> None:
    with pytest.raises(BulkRefused, match="TOO_LARGE"):
        await push(sender, listener.address, bytes(2 << 20))
    transfer, _ = await push(sender, listener.address, bytes(1 << 20))
    with pytest.raises(BulkRefused, match="DUPLICATE"):
        await push(sender, listener.address, bytes(10), transfer=transfer)
    with pytest.raises(BulkRefused, match="BUSY"):  # 1 MiB held of 1.5 MiB allowed
        await push(sender, listener.address, bytes(1 << 20))
    with pytest.raises(BulkRefused, match="WRONG_NODE"):
        await push(sender, listener.address, bytes(10), dst="someone-else")
    assert listener.stats.refused == 4 and listener.held_bytes == 1 << 20
    transfer, crc = await push(sender, listener.address, b"fine")  # on a fresh connection
    assert bytes(listener.claim(transfer, size=4, crc=crc)) == b"fine"


async def test_garbage_and_cut_streams_are_counted_and_the_listener_keeps_serving(
    listener: BulkListener, sender: BulkSender
) -> None:
    host, port = listener.address.rsplit(":", 1)

    def raw(payload: bytes, *, answers: int) -> bytes:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(payload)
            got = b""
            while len(got) < answers and (more := sock.recv(16)):
                got += more
            if answers:
                return got
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(16)

    loop = asyncio.get_running_loop()
    http = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n" + bytes(30)
    assert await loop.run_in_executor(None, lambda: raw(http, answers=1)) == bytes([BulkStatus.BAD_HEADER])
    header = pack_bulk_header(new_id(), 1000, src="tx", dst="rx")
    cut = await loop.run_in_executor(None, lambda: raw(header + bytes(10), answers=0))
    assert cut == bytes([BulkStatus.OK])  # the header was fine; then the stream stopped short
    wrong_crc = header + bytes(1000) + struct.pack(">I", 12345)
    answer = await loop.run_in_executor(None, lambda: raw(wrong_crc, answers=2))
    assert answer == bytes([BulkStatus.OK, BulkStatus.BAD_CHECKSUM])
    assert len(header) == BULK_HEADER_SIZE
    await eventually(lambda: listener.stats.failed == 2, what="two failed streams counted")
    assert listener.stats.refused == 1 and listener.held_bytes == 0
    transfer, crc = await push(sender, listener.address, b"still here")
    assert bytes(listener.claim(transfer, size=10, crc=crc)) == b"still here"


async def test_a_failing_accept_is_retried_and_the_listener_keeps_serving(
    listener: BulkListener, sender: BulkSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    real_accept = loop.sock_accept
    failures = [OSError(24, "Too many open files")] * 2

    async def flaky_accept(sock: socket.socket) -> tuple[socket.socket, object]:
        if failures:
            raise failures.pop()
        return await real_accept(sock)

    monkeypatch.setattr(loop, "sock_accept", flaky_accept)
    await asyncio.sleep(0.01)  # the listener is already waiting in the real accept
    transfer, crc = await push(sender, listener.address, b"first")  # served by that accept
    assert bytes(listener.claim(transfer, size=5, crc=crc)) == b"first"
    other = BulkSender("tx")  # a second connection meets the failing accepts, then gets in
    transfer, crc = await push(other, listener.address, b"second")
    await other.close()
    assert bytes(listener.claim(transfer, size=6, crc=crc)) == b"second"
    assert listener.stats.accept_errors == 2


async def test_idle_and_surplus_connections_are_closed_and_a_kept_one_is_redialled(
    sender: BulkSender,
) -> None:
    listener = BulkListener(LOCAL, node_id="rx", keep_idle_s=0.2, max_connections=2)
    await listener.start()
    host, port = listener.address.rsplit(":", 1)
    try:
        idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(2)]
        await eventually(lambda: listener.connections == 2, what="two connections served")
        surplus = socket.create_connection((host, int(port)), timeout=30)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, surplus.recv, 1) == b""  # closed at once
        assert listener.stats.refused == 1
        for sock in [*idle, surplus]:
            assert await loop.run_in_executor(None, sock.recv, 1) == b""  # closed when idle
            sock.close()
        transfer, crc = await push(sender, listener.address, b"one")
        await eventually(lambda: listener.connections == 0, what="the kept connection closed as idle")
        transfer, crc = await push(sender, listener.address, b"two")  # redialled, not an error
        assert bytes(listener.claim(transfer, size=3, crc=crc)) == b"two"
    finally:
        await listener.close()


async def test_a_trickling_stream_is_cut_and_frees_its_bytes() -> None:
    listener = BulkListener(LOCAL, node_id="rx", idle_timeout_s=5, min_rate=1e6)
    listener.idle_timeout_s = 0.2  # the allowance is 0.2 s plus 1 s per MB: 1.2 s for 1 MB
    await listener.start()
    host, port = listener.address.rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(pack_bulk_header(new_id(), 1_000_000, src="tx", dst="rx"))
        assert await reader.readexactly(1) == bytes([BulkStatus.OK])
        assert listener.held_bytes == 1_000_000
        while not reader.at_eof():  # 10 kB every 0.1 s: never silent, far too slow
            writer.write(bytes(10_000))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(0.1)
        assert listener.held_bytes == 0 and listener.stats.failed == 1
        writer.close()
    finally:
        await listener.close()


async def test_every_way_a_push_can_end_early_leaves_the_sender_usable(
    listener: BulkListener, sender: BulkSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cancelled mid-frame: the frame's first piece never leaves, as on a stalled link
    loop = asyncio.get_running_loop()
    real_sendall, stalled = loop.sock_sendall, asyncio.Event()

    async def stalling_sendall(sock: socket.socket, data: bytes) -> None:
        if len(data) == 1000:
            stalled.set()
            await asyncio.Event().wait()
        await real_sendall(sock, data)

    monkeypatch.setattr(loop, "sock_sendall", stalling_sendall)
    task = asyncio.create_task(push(sender, listener.address, bytes(1000)))
    await stalled.wait()
    assert listener.held_bytes == 1000  # admitted, being received
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    monkeypatch.undo()
    await eventually(lambda: listener.held_bytes == 0, what="the cancelled frame's bytes freed")
    transfer, crc = await push(sender, listener.address, b"after a cancel")
    assert bytes(listener.claim(transfer, size=14, crc=crc)) == b"after a cancel"
    # an address that passes the schema but cannot be dialled is a TransportError, not a crash
    for bad in ("localhost:99999", "no-such-host.invalid:7000"):
        with pytest.raises(TransportError, match="cannot resolve"):
            await sender.push(bad, "rx", new_id(), [b"x"], timeout=30)


async def test_a_push_waits_for_its_turn_only_within_its_timeout() -> None:
    async with TcpServer(hang_up=False) as server:
        sender = BulkSender("tx")
        first = asyncio.create_task(sender.push(server.address, "rx", new_id(), [b"x"], timeout=0.5))
        await asyncio.sleep(0)  # the first one takes the connection
        with pytest.raises(DeadlineExceeded, match="stayed busy"):
            await sender.push(server.address, "rx", new_id(), [b"y"], timeout=0.1)
        with pytest.raises(DeadlineExceeded, match="not stored within"):
            await first
        await sender.close()


async def test_closing_the_sender_ends_a_push_under_way() -> None:
    async with TcpServer(hang_up=False) as server:
        sender = BulkSender("tx")
        task = asyncio.create_task(sender.push(server.address, "rx", new_id(), [b"x"], timeout=3600))
        await eventually(lambda: server.accepted == 1, what="the push connected")
        await sender.close()
        done, _ = await asyncio.wait([task], timeout=60)  # a deadline against a hang, not a timing
        assert done, "the push still waits after close"
        with pytest.raises(TransportError):
            task.result()
        with pytest.raises(FabricClosed):
            await sender.push(server.address, "rx", new_id(), [b"x"], timeout=1)


async def test_frames_are_dropped_only_when_their_sender_is_gone_or_after_the_cap(
    listener: BulkListener, sender: BulkSender
) -> None:
    await push(sender, listener.address, bytes(100))
    await asyncio.sleep(0.01)
    listener.idle_timeout_s = 0.0
    assert listener.expire(lambda src: True) == 0  # its sender lives: keep waiting for the blob.ref
    assert listener.expire(lambda src: False) == 1 and listener.held_bytes == 0
    listener.idle_timeout_s = 5.0
    await push(sender, listener.address, bytes(100))
    await asyncio.sleep(0.01)
    listener.max_unclaimed_s = 0.0
    assert listener.expire(lambda src: True) == 1 and listener.stats.expired == 2


async def test_closing_a_listener_mid_transfer_frees_everything(sender: BulkSender) -> None:
    listener = BulkListener(LOCAL, node_id="rx")
    await listener.start()
    await push(sender, listener.address, bytes(1000))
    task = asyncio.create_task(push(sender, listener.address, bytes(64 << 20)))
    await eventually(lambda: listener.held_bytes > 1000 or task.done(), what="a transfer under way")
    await listener.close()
    assert listener.held_bytes == 0 and listener.connections == 0
    with pytest.raises((TransportError, BulkRefused)):
        await task


def test_a_listener_on_every_interface_must_say_what_to_advertise() -> None:
    with pytest.raises(ValueError, match="advertise"):
        BulkListener("0.0.0.0:0", node_id="rx")
    with pytest.raises(ValueError, match="not host:port"):
        BulkListener("localhost", node_id="rx")


async def test_a_send_cancelled_between_its_stream_and_its_blob_ref_frees_the_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fabric = Harness("inproc")
    try:
        a, b = await fabric.endpoint("a"), await fabric.endpoint("b", bulk=LOCAL)
        await knows_bulk_address(a, "b")
        listener = b.bulk_listener
        assert listener is not None
        real_transmit, stuck = a._transmit, asyncio.Event()

        async def transmit(address: str, frame: bytes, hop: str, deadline: float | None) -> None:
            if address == "b" and not stuck.is_set():  # the first frame to b is the blob.ref: it hangs
                stuck.set()
                await asyncio.Event().wait()
            await real_transmit(address, frame, hop, deadline)

        monkeypatch.setattr(a, "_transmit", transmit)
        send = asyncio.create_task(a.send("b", result(np.zeros(2 << 20, dtype=np.uint8))))
        await stuck.wait()
        assert listener.held_bytes > 0  # stored, waiting for a blob.ref that will never come
        send.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await send
        await eventually(lambda: listener.held_bytes == 0, what="the orphaned frame freed")
        assert b.stats.expired == 1 and b.stats.received == 0
    finally:
        await fabric.close()
