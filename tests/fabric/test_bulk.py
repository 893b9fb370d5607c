"""Large envelopes on direct bulk streams, beside the broker, and every way that can go wrong."""

import asyncio
import socket
import struct

import numpy as np
import pytest

from fabric import Endpoint, LinkSpec, LinkTable
from fabric._bulk import BulkListener, BulkRefused, BulkSender
from fabric.testing import free_port
from protocol import (
    BULK_HEADER_SIZE,
    BlobRef,
    BulkStatus,
    ChunkError,
    Envelope,
    Signer,
    TaskProgress,
    TaskResult,
    Verifier,
    encode,
    new_id,
    pack_bulk_header,
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


async def test_an_unreachable_bulk_address_falls_back_to_chunks(fabric: Harness) -> None:
    dead = f"127.0.0.1:{free_port()}"  # announced, but nothing listens there
    a = await fabric.endpoint("a")
    b = await fabric.endpoint("b", bulk=LOCAL, bulk_advertise=dead)
    await knows_bulk_address(a, "b")
    payload = np.arange(2 << 20, dtype=np.uint8)
    for _ in range(2):
        await a.send("b", result(payload))
        assert np.array_equal((await b.recv(timeout=60)).body.value, payload)
    # Both went as chunks; the second did not even try the address that had just failed.
    assert (a.stats.bulk_sent, a.stats.bulk_fallbacks, a.stats.blobs_sent) == (0, 2, 2)


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
    fabric = Harness("inproc")
    key = b"k" * 32
    try:
        a = await fabric.endpoint("a", signer=Signer("k1", key), verifier=Verifier({"k1": key}))
        b = await fabric.endpoint("b", bulk=LOCAL, signer=Signer("k1", key), verifier=Verifier({"k1": key}))
        mallory = await fabric.endpoint("mallory", signer=Signer("k1", b"m" * 32))
        await knows_bulk_address(a, "b")
        await knows_bulk_address(mallory, "b")
        payload = np.arange(2 << 20, dtype=np.uint8)
        await mallory.send("b", result(payload))  # its bulk frame is stored, its blob.ref fails the MAC
        await a.send("b", result(payload))
        env = await b.recv(timeout=60)
        assert env.src == "a" and np.array_equal(env.body.value, payload)
        assert b.stats.bulk_received == 1 and b._inbox.empty()
        assert mallory.stats.bulk_sent == 1 and b.stats.malformed >= 1
    finally:
        await fabric.close()


# the listener and sender on their own -----------------------------------------------------------


@pytest.fixture
async def listener() -> BulkListener:
    bulk = BulkListener(LOCAL, max_frame_bytes=1 << 20, max_stored_bytes=3 << 19, idle_timeout_s=5)
    await bulk.start()
    yield bulk
    await bulk.close()


async def push(address: str, data: bytes, transfer: str | None = None) -> tuple[str, int]:
    sender = BulkSender()
    transfer = transfer or new_id()
    try:
        _, crc = await sender.push(address, transfer, [data], timeout=30)
    finally:
        await sender.close()
    return transfer, crc


async def test_a_stored_frame_is_claimed_once_and_only_as_announced(listener: BulkListener) -> None:
    data = bytes(range(256)) * 100
    transfer, crc = await push(listener.address, data)
    with pytest.raises(ChunkError, match=r"blob\.ref says 5 bytes"):
        listener.claim(transfer, size=5, crc=crc)
    transfer, crc = await push(listener.address, data)
    assert bytes(listener.claim(transfer, size=len(data), crc=crc)) == data
    with pytest.raises(ChunkError, match=f"no bulk frame stored for transfer {transfer}"):
        listener.claim(transfer, size=len(data), crc=crc)
    assert listener.held_bytes == 0


async def test_a_listener_refuses_what_it_cannot_hold_before_the_bytes_are_sent(
    listener: BulkListener,
) -> None:
    with pytest.raises(BulkRefused, match="TOO_LARGE"):
        await push(listener.address, bytes(2 << 20))
    transfer, _ = await push(listener.address, bytes(1 << 20))
    with pytest.raises(BulkRefused, match="DUPLICATE"):
        await push(listener.address, bytes(10), transfer=transfer)
    with pytest.raises(BulkRefused, match="BUSY"):  # 1 MiB held of 1.5 MiB allowed
        await push(listener.address, bytes(1 << 20))
    assert listener.stats.refused == 3 and listener.held_bytes == 1 << 20


async def test_garbage_and_cut_streams_are_counted_and_the_listener_keeps_serving(
    listener: BulkListener,
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
    http = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n"
    assert await loop.run_in_executor(None, lambda: raw(http, answers=1)) == bytes([BulkStatus.BAD_HEADER])
    header = pack_bulk_header(new_id(), 1000)
    cut = await loop.run_in_executor(None, lambda: raw(header + bytes(10), answers=0))
    assert cut == bytes([BulkStatus.OK])  # the header was fine; then the stream stopped short
    wrong_crc = header + bytes(1000) + struct.pack(">I", 12345)
    answer = await loop.run_in_executor(None, lambda: raw(wrong_crc, answers=2))
    assert answer == bytes([BulkStatus.OK, BulkStatus.BAD_CHECKSUM])
    assert len(header) == BULK_HEADER_SIZE
    await eventually(lambda: listener.stats.failed == 2, what="two failed streams counted")
    assert listener.stats.refused == 1 and listener.held_bytes == 0
    transfer, crc = await push(listener.address, b"still here")
    assert bytes(listener.claim(transfer, size=10, crc=crc)) == b"still here"


async def test_a_frame_nobody_claims_is_dropped_after_the_idle_timeout(listener: BulkListener) -> None:
    await push(listener.address, bytes(100))
    listener.idle_timeout_s = 0.0
    await asyncio.sleep(0.01)
    assert listener.expire() == 1 and listener.held_bytes == 0 and listener.stats.expired == 1


def test_a_listener_on_every_interface_must_say_what_to_advertise() -> None:
    with pytest.raises(ValueError, match="advertise"):
        BulkListener("0.0.0.0:0")
    with pytest.raises(ValueError, match="not host:port"):
        BulkListener("localhost")
