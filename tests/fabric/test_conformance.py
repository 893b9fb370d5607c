"""One behaviour, every transport: what a node on the fabric can count on."""

import asyncio
import time

import numpy as np
import pytest

from fabric import DeadlineExceeded, LinkSpec, LinkTable, PeerUnreachable
from protocol import Capabilities, Heartbeat, TaskAck, TaskAssign, TaskCancel, TaskProgress, TaskResult
from tests.fabric.harness import Harness, eventually, recorder


def progress(seq: int, data: object = None) -> TaskProgress:
    return TaskProgress(job="j", task="t", attempt=0, seq=seq, data=data)


async def test_messages_from_one_sender_arrive_in_the_order_sent(fabric: Harness) -> None:
    a, b = await fabric.endpoint("a"), await fabric.endpoint("b")
    for seq in range(300):
        await a.send("b", progress(seq))
    got = [(await b.recv(timeout=30)).body.seq for _ in range(300)]
    assert got == list(range(300))


async def test_a_request_gets_its_reply(fabric: Harness) -> None:
    a, b = await fabric.endpoint("a"), await fabric.endpoint("b")

    async def serve() -> None:
        async for env in b:
            await b.reply(env, TaskAck(job="j", task=env.body.task, attempt=0))

    server = asyncio.create_task(serve())
    replies = [await a.request("b", TaskCancel(job="j", task=f"t{i}"), timeout=30) for i in range(20)]
    server.cancel()
    assert [r.body.task for r in replies] == [f"t{i}" for i in range(20)]
    assert all(r.src == "b" and r.dst == "a" for r in replies)


async def test_a_request_nobody_answers_fails_at_its_deadline_naming_the_peer(fabric: Harness) -> None:
    a = await fabric.endpoint("a")
    await fabric.endpoint("b")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"no reply from 'b' to task.cancel .* within 0.3s"):
        await a.request("b", TaskCancel(job="j", task="t"), timeout=0.3)
    assert time.monotonic() - started >= 0.3


async def test_streamed_replies_arrive_in_order_and_end_with_the_result(fabric: Harness) -> None:
    a, b = await fabric.endpoint("a"), await fabric.endpoint("b")

    async def serve() -> None:
        env = await b.recv(timeout=30)
        for i in range(5):
            await b.reply(env, progress(i, data={"token": f"w{i}"}))
        await b.reply(env, TaskResult(job="j", task="t", attempt=0, value="w0 w1 w2 w3 w4"))

    server = asyncio.create_task(serve())
    replies = [
        r async for r in a.stream("b", TaskAssign(job="j", task="t", attempt=0, task_kind="gen"), timeout=30)
    ]
    await server
    assert [r.kind for r in replies] == ["task.progress"] * 5 + ["task.result"]
    assert [r.body.data["token"] for r in replies[:5]] == [f"w{i}" for i in range(5)]


async def test_a_broadcast_reaches_every_other_node_once(fabric: Harness) -> None:
    nodes = [await fabric.endpoint(n) for n in ("a", "b", "c")]
    await nodes[0].broadcast(progress(1))
    for other in nodes[1:]:
        env = await other.recv(timeout=30)
        assert env.src == "a" and env.dst == "*"
    await asyncio.sleep(0.2)
    assert all(ep._inbox.empty() for ep in nodes)  # no echo to the sender, no second copy


async def test_a_group_message_reaches_its_members_only(fabric: Harness) -> None:
    a = await fabric.endpoint("a")
    gpu1 = await fabric.endpoint("gpu1", groups=["gpu"])
    gpu2 = await fabric.endpoint("gpu2", groups=["gpu"])
    cpu = await fabric.endpoint("cpu")
    await a.send("group:gpu", progress(7))
    assert (await gpu1.recv(timeout=30)).body.seq == 7
    assert (await gpu2.recv(timeout=30)).body.seq == 7
    with pytest.raises(DeadlineExceeded):
        await cpu.recv(timeout=0.3)


async def test_nodes_see_each_other_join_with_capabilities_and_leave(fabric: Harness) -> None:
    a = await fabric.endpoint("a")
    events = recorder(a)
    caps = Capabilities(tier="cloud", cores=16, memory_mb=65536, task_kinds=["llm"])
    c = await fabric.endpoint("c", capabilities=caps)
    await eventually(lambda: "c" in a.peers, what="c joining")
    peer = a.peers.get("c")
    assert peer is not None and peer.capabilities == caps
    await c.close()
    await eventually(lambda: any(e.node == "c" and e.kind == "left" for e in events), what="c leaving")
    assert [e.kind for e in events if e.node == "c"] == ["joined", "left"]


async def test_a_crashed_node_is_declared_dead_and_its_pending_requests_fail(fabric: Harness) -> None:
    a = await fabric.endpoint("a", dead_after_s=1.0)
    b = await fabric.endpoint("b")
    await a.wait_for_peer("b", timeout=30)
    events = recorder(a)
    waiting = asyncio.create_task(a.request("b", TaskCancel(job="j", task="t"), timeout=60))
    await asyncio.sleep(0.1)
    await b.crash()
    with pytest.raises(PeerUnreachable, match="'b' is unreachable"):
        await waiting
    assert [e.kind for e in events if e.node == "b"] == ["dead"]
    with pytest.raises(PeerUnreachable):
        await a.request("b", TaskCancel(job="j", task="t"), timeout=1)


async def test_a_silent_node_is_declared_dead_by_missed_heartbeats(fabric: Harness) -> None:
    cut = LinkTable()
    a = await fabric.endpoint("a", dead_after_s=0.6)
    await fabric.endpoint("b", links=cut)
    await a.wait_for_peer("b", timeout=30)
    events = recorder(a)
    cut.set("*", LinkSpec(loss=1.0))  # b is still connected, but nothing it sends arrives
    started = time.monotonic()
    await eventually(lambda: any(e.kind == "dead" for e in events), what="b declared dead")
    assert time.monotonic() - started >= 0.6 - 0.25  # not before the silence bound (minus a heartbeat)
    cut.set("*", None)
    await eventually(lambda: "b" in a.peers, what="b back")  # heard again: it joins again
    assert [e.kind for e in events] == ["dead", "joined"]


async def test_redelivered_frames_are_dropped(fabric: Harness) -> None:
    a, b = await fabric.endpoint("a"), await fabric.endpoint("b")
    from protocol import Envelope, encode

    frame = encode(Envelope.new(src="a", dst="b", body=progress(1)))
    for _ in range(3):
        await a.transport.send("b", frame)
    assert (await b.recv(timeout=30)).body.seq == 1
    await eventually(lambda: b.stats.duplicates == 2, what="two duplicates counted")
    assert b._inbox.empty()


async def test_a_64_mib_tensor_arrives_intact_in_chunks(fabric: Harness) -> None:
    a, b = await fabric.endpoint("a"), await fabric.endpoint("b")
    tensor = np.random.default_rng(3).standard_normal(16 << 20).astype(np.float32)
    await a.send("b", TaskResult(job="j", task="t", attempt=0, value=tensor))
    env = await b.recv(timeout=120)
    assert np.array_equal(env.body.value, tensor)
    assert a.stats.chunks_sent == 65 and b.stats.blobs_received == 1


async def test_a_full_inbox_holds_senders_back_and_loses_nothing(fabric: Harness) -> None:
    a = await fabric.endpoint("a")
    b = await fabric.endpoint("b", inbox_size=8)
    sender = asyncio.create_task(_send_many(a, "b", 200))
    await asyncio.sleep(0.5)
    assert b._inbox.qsize() <= 8  # bounded, whatever arrives
    got = [(await b.recv(timeout=30)).body.seq for _ in range(200)]
    await sender
    assert got == list(range(200))
    assert b.stats.malformed == 0 and b.stats.duplicates == 0


async def _send_many(ep: object, dst: str, n: int) -> None:
    for seq in range(n):
        await ep.send(dst, progress(seq))  # type: ignore[attr-defined]


async def test_garbage_on_an_inbox_is_counted_and_the_node_keeps_working(fabric: Harness) -> None:
    a, b = await fabric.endpoint("a"), await fabric.endpoint("b")
    for garbage in (b"", b"\xc1", b"not msgpack at all", b"\x81\xa1v\x09"):
        await a.transport.send("b", garbage)
    await a.send("b", progress(5))
    assert (await b.recv(timeout=30)).body.seq == 5
    assert b.stats.malformed == 4


async def test_an_emulated_link_shapes_a_10_mb_transfer(fabric: Harness) -> None:
    payload = np.zeros(10_000_000, dtype=np.uint8)
    timings = {}
    b = await fabric.endpoint("b")
    for mbps in (100.0, 200.0):
        links = LinkTable({"b": LinkSpec(latency_ms=20, bandwidth_mbps=mbps)})
        a = await fabric.endpoint(f"a{int(mbps)}", links=links)
        started = time.monotonic()
        await a.send("b", TaskResult(job="j", task="t", attempt=0, value=payload))
        env = await b.recv(timeout=60)
        timings[mbps] = time.monotonic() - started
        assert env.body.value.nbytes == payload.nbytes
    # 10 MB at 100 Mbit/s + 20 ms = 0.82 s: the emulation can only make it slower, never faster,
    # and twice the bandwidth takes about half as long.
    assert timings[100.0] >= 0.80
    assert timings[200.0] >= 0.40
    assert timings[200.0] < timings[100.0]


async def test_heartbeats_are_not_delivered_as_messages(fabric: Harness) -> None:
    a, b = await fabric.endpoint("a"), await fabric.endpoint("b")
    await a.wait_for_peer("b", timeout=30)
    await asyncio.sleep(0.5)  # several heartbeats pass
    assert b._inbox.empty()
    assert isinstance(Heartbeat(seq=1), Heartbeat)
