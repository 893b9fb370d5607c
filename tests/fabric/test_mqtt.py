"""What only a real broker can show: restarts, separate processes, and a client we did not write."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fabric import Endpoint, MqttTransport, PeerUnreachable
from fabric.testing import MosquittoBroker
from protocol import TaskAck, TaskCancel, TaskProgress
from tests.fabric.harness import Harness, eventually, recorder

pytestmark = pytest.mark.mqtt
ECHO_NODE = Path(__file__).with_name("echo_node.py")


@pytest.fixture
def own_broker() -> Iterator[MosquittoBroker]:
    """A broker of this test alone: these tests stop and kill it."""
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture
async def harness(own_broker: MosquittoBroker) -> AsyncIterator[Harness]:
    h = Harness("mqtt", own_broker)
    try:
        yield h
    finally:
        await h.close()


def progress(seq: int) -> TaskProgress:
    return TaskProgress(job="j", task="t", attempt=0, seq=seq)


async def test_a_broker_restart_mid_stream_loses_nothing_and_nodes_reconnect_by_themselves(
    harness: Harness, own_broker: MosquittoBroker
) -> None:
    a, b = await harness.endpoint("a"), await harness.endpoint("b")
    n = 3000

    async def stream() -> None:
        for seq in range(n):
            await a.send("b", progress(seq))
            if seq == 1000:
                await asyncio.to_thread(own_broker.restart)  # SIGTERM, then start on the same port

    sender = asyncio.create_task(stream())
    got = [(await b.recv(timeout=60)).body.seq for _ in range(n)]
    await sender
    assert sorted(got) == list(range(n))  # every message, exactly once (redeliveries deduped)
    assert a.transport.reconnects >= 1 and b.transport.reconnects >= 1


async def test_messages_sent_while_the_broker_is_dead_arrive_once_it_is_back(
    harness: Harness, own_broker: MosquittoBroker
) -> None:
    a, b = await harness.endpoint("a"), await harness.endpoint("b")
    await a.send("b", progress(1000))
    assert (await b.recv(timeout=30)).body.seq == 1000
    # A crash loses what the broker did not save: wait for an autosave that holds both sessions.
    saved_after = time.time()
    db = own_broker.persistence_dir / "mosquitto.db"
    await eventually(lambda: db.exists() and db.stat().st_mtime > saved_after + 0.01, what="an autosave")
    own_broker.kill()  # SIGKILL: a crash
    await eventually(lambda: not a.transport._connected.is_set(), what="a noticing the broker is gone")
    for seq in range(50):
        await a.send("b", progress(seq))  # held in the client's outbox
    await asyncio.to_thread(own_broker.start)
    got: list[int] = []
    try:
        for _ in range(50):
            got.append((await b.recv(timeout=60)).body.seq)
    except Exception as exc:
        raise AssertionError(f"got {len(got)} of 50; broker log:\n{own_broker.log_tail(60)}") from exc
    assert sorted(got) == list(range(50))


async def test_nodes_in_separate_processes_serve_requests_and_a_killed_one_is_declared_dead(
    harness: Harness, own_broker: MosquittoBroker
) -> None:
    procs = {
        node: subprocess.Popen(
            [sys.executable, str(ECHO_NODE), own_broker.url, harness.namespace, node],
            stdout=subprocess.PIPE,
            text=True,
        )
        for node in ("p1", "p2")
    }
    try:
        main = await harness.endpoint("main", dead_after_s=2.0)
        events = recorder(main)
        for node in procs:
            await main.wait_for_peer(node, timeout=60)
            reply = await main.request(node, TaskCancel(job="j", task="t"), timeout=30)
            assert isinstance(reply.body, TaskAck) and reply.body.job == node and reply.src == node
        os.kill(procs["p1"].pid, signal.SIGKILL)
        await eventually(
            lambda: any(e.node == "p1" and e.kind == "dead" for e in events), what="p1 declared dead"
        )
        with pytest.raises(PeerUnreachable, match="'p1'"):
            await main.request("p1", TaskCancel(job="j", task="t"), timeout=5)
        reply = await main.request("p2", TaskCancel(job="j", task="t"), timeout=30)
        assert reply.body.job == "p2"
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


async def test_garbage_published_by_mosquitto_pub_is_counted_and_the_node_keeps_working(
    harness: Harness, own_broker: MosquittoBroker
) -> None:
    a, b = await harness.endpoint("a"), await harness.endpoint("b")
    mosquitto_pub = shutil.which("mosquitto_pub")
    assert mosquitto_pub is not None, "mosquitto-clients is not installed: run `make test`"
    topic = f"fl/{harness.namespace}/n/b"
    for payload in ("garbage", "\x81\xa1v\x01", "{}"):
        subprocess.run(
            [
                mosquitto_pub,
                "-h",
                own_broker.host,
                "-p",
                str(own_broker.port),
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                payload,
            ],
            check=True,
        )
    await eventually(lambda: b.stats.malformed == 3, what=f"three malformed frames counted ({b.stats})")
    await a.send("b", progress(1))
    assert (await b.recv(timeout=30)).body.seq == 1


async def test_two_fabrics_on_one_broker_never_see_each_other(own_broker: MosquittoBroker) -> None:
    one, two = Harness("mqtt", own_broker), Harness("mqtt", own_broker)
    try:
        a1, b1 = await one.endpoint("a"), await one.endpoint("b")
        b2 = await two.endpoint("b")
        await a1.send("b", progress(1))
        await a1.broadcast(progress(2))
        assert [(await b1.recv(timeout=30)).body.seq for _ in range(2)] == [1, 2]
        await asyncio.sleep(0.3)
        assert b2._inbox.empty() and "a" not in b2.peers
    finally:
        await one.close()
        await two.close()


def test_a_broker_that_is_not_there_is_a_clear_transport_error() -> None:
    from fabric import TransportError
    from fabric.testing import free_port

    async def connect() -> None:
        ep = Endpoint("x", MqttTransport(f"mqtt://127.0.0.1:{free_port()}", "x", connect_timeout_s=2))
        await ep.start()

    with pytest.raises(TransportError, match=r"cannot connect node 'x' to mqtt://127\.0\.0\.1:\d+"):
        asyncio.run(connect())
