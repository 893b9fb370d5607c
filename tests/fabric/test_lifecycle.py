"""Each test pins a defect found in review: a node must never wedge, leak, or drop silently."""

import asyncio
import logging

import numpy as np
import pytest

from fabric import Endpoint, FabricClosed, LinkSpec, LinkTable, MqttTransport
from fabric.testing import MosquittoBroker
from protocol import Heartbeat, TaskAssign, TaskProgress, TaskResult
from tests.fabric.harness import Harness, eventually, recorder


def progress(seq: int, task: str = "t") -> TaskProgress:
    return TaskProgress(job="j", task=task, attempt=0, seq=seq)


async def test_an_abandoned_stream_never_blocks_later_messages(fabric: Harness) -> None:
    a = await fabric.endpoint("a", inbox_size=4)
    b = await fabric.endpoint("b")

    async def serve() -> None:
        env = await b.recv(timeout=30)
        for i in range(10):
            await b.reply(env, progress(i))

    server = asyncio.create_task(serve())
    async for _ in a.stream("b", TaskAssign(job="j", task="t", attempt=0, task_kind="x"), timeout=30):
        await asyncio.sleep(0.2)
        break  # the consumer gives up early, with replies still coming
    await b.send("a", progress(99, task="later"))
    seen = []
    while not seen or seen[-1] != "later":
        seen.append((await a.recv(timeout=30)).body.task)  # late stream replies come first, then ours
    await asyncio.wait_for(server, 30)


async def test_a_failing_heartbeat_callback_neither_cancels_the_application_nor_stops_the_node(
    fabric: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    def flaky(seq: int) -> Heartbeat:
        if seq == 2:
            raise RuntimeError("load probe broke")
        return Heartbeat(seq=seq)

    a = await fabric.endpoint("a", heartbeat=flaky, heartbeat_s=0.05)
    b = await fabric.endpoint("b")
    with caplog.at_level(logging.ERROR, logger="fabric.endpoint"):
        await asyncio.sleep(0.5)  # the application's own work is not cancelled
    assert "heartbeat 2 failed" in caplog.text
    await a.send("b", progress(1))
    assert (await b.recv(timeout=30)).body.seq == 1


async def test_receivers_waiting_on_a_closed_endpoint_are_released(fabric: Harness) -> None:
    a = await fabric.endpoint("a")
    waiter = asyncio.create_task(a.recv())
    iterated: list[object] = []

    async def iterate() -> None:
        async for env in a:
            iterated.append(env)

    loop_task = asyncio.create_task(iterate())
    await asyncio.sleep(0.1)
    await a.close()
    with pytest.raises(FabricClosed):
        await asyncio.wait_for(waiter, 30)
    await asyncio.wait_for(loop_task, 30)  # the `async for` ends
    with pytest.raises(FabricClosed):
        await a.recv()


async def test_closing_delivers_what_is_still_on_an_emulated_link(fabric: Harness) -> None:
    b = await fabric.endpoint("b")
    events = recorder(b)
    a = await fabric.endpoint("a", links=LinkTable({"*": LinkSpec(latency_ms=50)}))
    await b.wait_for_peer("a", timeout=30)
    for i in range(3):
        await a.send("b", progress(i))
    await a.close()
    assert [(await b.recv(timeout=30)).body.seq for _ in range(3)] == [0, 1, 2]
    await eventually(lambda: any(e.node == "a" and e.kind == "left" for e in events), what="a leaving")
    assert not any(e.node == "a" and e.kind == "dead" for e in events), [e.kind for e in events]


async def test_changing_a_link_never_reorders_frames(fabric: Harness) -> None:
    links = LinkTable({"b": LinkSpec(latency_ms=200)})
    a = await fabric.endpoint("a", links=links)
    b = await fabric.endpoint("b")
    await a.send("b", progress(1))
    links.set("b", LinkSpec(latency_ms=10))
    await a.send("b", progress(2))
    links.set("b", None)
    await a.send("b", progress(3))
    assert [(await b.recv(timeout=30)).body.seq for _ in range(3)] == [1, 2, 3]
    assert links._retired == []


async def test_a_node_with_a_full_inbox_can_still_send(fabric: Harness) -> None:
    a = await fabric.endpoint("a", inbox_size=8)
    b, c = await fabric.endpoint("b"), await fabric.endpoint("c")
    flood = asyncio.create_task(_send_many(c, "a", 200))  # a never reads its inbox
    await asyncio.sleep(0.5)
    await asyncio.wait_for(_send_many(a, "b", 50), 60)  # a hang guard, not a timing claim
    assert [(await b.recv(timeout=30)).body.seq for _ in range(50)] == list(range(50))
    assert "a" in b.peers  # still alive: its keepalive and heartbeats kept flowing
    flood.cancel()


async def _send_many(ep: Endpoint, dst: str, n: int) -> None:
    for seq in range(n):
        await ep.send(dst, progress(seq))


async def test_a_transfer_cut_off_midway_frees_its_buffer(fabric: Harness) -> None:
    from protocol import Reassembler

    b = await fabric.endpoint("b", reassembler=Reassembler(idle_timeout_s=0.3), heartbeat_s=0.1)
    a = await fabric.endpoint("a", links=LinkTable({"b": LinkSpec(bandwidth_mbps=200)}))
    sending = asyncio.create_task(
        a.send("b", TaskResult(job="j", task="t", attempt=0, value=np.zeros(16 << 20, np.uint8)))
    )
    await eventually(lambda: b._reassembler.pending == 1, what="the transfer starting")
    sending.cancel()
    await a.crash()  # the rest never comes
    await eventually(lambda: b._reassembler.pending == 0, what="the partial transfer expiring")
    assert b._reassembler.buffered_bytes == 0 and b._reassembler.expired == 1


@pytest.fixture
def own_broker() -> MosquittoBroker:
    with MosquittoBroker() as broker:
        yield broker


async def test_the_mqtt_send_window_stays_bounded(own_broker: MosquittoBroker) -> None:
    transport = MqttTransport(own_broker.url, "a", namespace="wnd", max_outstanding=4)
    async with Endpoint("a", transport, heartbeat_s=10) as a:
        for _ in range(5):
            await transport.announce(b"\x80")
        for i in range(20):
            await a.send("a", progress(i))
        await eventually(lambda: not transport._send_mids, what="every PUBACK")
        assert transport._window._value == 4


async def test_a_send_waiting_for_window_room_fails_when_the_transport_closes(
    own_broker: MosquittoBroker,
) -> None:
    transport = MqttTransport(own_broker.url, "a", namespace="wnd2", max_outstanding=1)

    async def ignore(frame: bytes) -> None:
        return None

    await transport.start(ignore, lambda event: None, [])  # the bare transport: no heartbeats
    await asyncio.to_thread(own_broker.stop)
    await eventually(lambda: not transport._connected.is_set(), what="the broker gone")
    await transport.send("b", b"x")  # takes the only slot; no PUBACK will come
    blocked = asyncio.create_task(transport.send("b", b"y"))
    await asyncio.sleep(0.2)
    assert not blocked.done()
    await transport.crash()
    with pytest.raises(FabricClosed):
        await asyncio.wait_for(blocked, 30)
