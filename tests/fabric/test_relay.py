"""Relays: nodes in separated segments reach each other through relay nodes joined to both.

Every test runs twice: in-process, where the hub enforces the segments' NAT rules, and over real
Mosquitto brokers, one per segment, with nothing between the brokers but the relays' two
connections. The nodes are behind NAT (``public=False``), so both transports have one topology.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

from fabric import Endpoint, InprocHub, LinkSpec, LinkTable, MqttTransport, PeerUnreachable
from fabric.testing import MosquittoBroker
from protocol import MAX_HOPS, Capabilities, Envelope, Error, Relay, Signer, TaskResult, Verifier, encode
from tests.fabric.harness import eventually

HEARTBEAT_S = 0.1
DEAD_AFTER_S = 0.6
KEY = {"k1": b"k" * 32}


@pytest.fixture(scope="module")
def brokers() -> Iterator[dict[str, MosquittoBroker]]:
    """One real Mosquitto per segment; nothing bridges them."""
    running: dict[str, MosquittoBroker] = {}
    try:
        for segment in ("home", "mid", "dc"):
            running[segment] = MosquittoBroker()
            running[segment].start()
        yield running
    finally:
        for broker in running.values():
            broker.close()


class Net:
    """Endpoints on named segments; closes them all at the end."""

    def __init__(self, kind: str, brokers: dict[str, MosquittoBroker] | None) -> None:
        self.kind = kind
        self.brokers = brokers
        self.hub = InprocHub()
        self.namespace = f"t{uuid.uuid4().hex[:12]}"
        self.endpoints: list[Endpoint] = []
        self.servers: list[asyncio.Task[None]] = []

    async def node(self, name: str, *segments: str, relay: bool = False, **kwargs: Any) -> Endpoint:
        transports: Any
        if self.kind == "inproc":
            transports = self.hub.transport(name, segments=segments, public=False)
        else:
            assert self.brokers is not None
            urls = [self.brokers[s].url for s in segments]
            transports = [MqttTransport(url, name, namespace=self.namespace) for url in urls]
        caps = Capabilities(tier="edge", cores=1, memory_mb=64, segment=segments[0])
        kwargs.setdefault("capabilities", caps)
        ep = Endpoint(
            name, transports, relay=relay, heartbeat_s=HEARTBEAT_S, dead_after_s=DEAD_AFTER_S, **kwargs
        )
        await ep.start()
        self.endpoints.append(ep)
        return ep

    def serve(self, ep: Endpoint) -> None:
        """Answer every request with who answered, the relays it came through, and a digest of its value."""

        async def loop() -> None:
            async for env in ep:
                value = getattr(env.body, "value", None)
                blob = isinstance(value, np.ndarray)
                digest = hashlib.sha256(value.tobytes()).hexdigest() if blob else None
                answer = {"by": ep.node_id, "hops": list(env.hops), "sha256": digest}
                await ep.reply(env, TaskResult(job="j", task="t", attempt=0, value=answer))

        self.servers.append(asyncio.create_task(loop(), name=f"serve:{ep.node_id}"))

    async def close(self) -> None:
        for task in self.servers:
            task.cancel()
        for ep in reversed(self.endpoints):
            await ep.close()


@pytest.fixture(params=["inproc", "mqtt"])
async def net(request: pytest.FixtureRequest) -> AsyncIterator[Net]:
    brokers = request.getfixturevalue("brokers") if request.param == "mqtt" else None
    built = Net(request.param, brokers)
    try:
        yield built
    finally:
        await built.close()


def ask(value: Any = None) -> TaskResult:
    return TaskResult(job="j", task="t", attempt=0, value=value)


async def test_a_device_reaches_a_cloud_in_another_segment_only_through_the_relay(net: Net) -> None:
    device = await net.node("device", "home")
    cloud = await net.node("cloud", "dc")
    relay = await net.node("relay-1", "home", "dc", relay=True)
    net.serve(cloud)
    await device.wait_for_peer("cloud", timeout=30, announced=True)
    assert device.peers.get("cloud").capabilities.segment == "dc"  # type: ignore[union-attr]
    assert device.route("cloud") == ["device", "relay-1", "cloud"]

    reply = await device.request("cloud", ask(), timeout=10)

    assert reply.body.value == {"by": "cloud", "hops": ["relay-1"], "sha256": None}
    assert reply.hops == ["relay-1"]  # the answer came back through the relay too
    assert device.stats.relayed_sent >= 1 and device.stats.relayed_received >= 1
    assert relay.stats.forwarded >= 2
    if net.kind == "inproc":  # the segments really are separate: a direct frame goes nowhere
        dropped = net.hub.unreachable
        await device.transport.send("cloud", encode(Envelope.new(src="device", dst="cloud", body=ask())))
        assert net.hub.unreachable == dropped + 1


async def test_a_node_in_the_same_segment_is_sent_to_directly_even_with_a_relay_around(net: Net) -> None:
    device = await net.node("device", "home")
    phone = await net.node("phone", "home")
    await net.node("relay-1", "home", "dc", relay=True)
    net.serve(phone)
    await device.wait_for_peer("phone", timeout=30, announced=True)

    reply = await device.request("phone", ask(), timeout=10)

    assert device.route("phone") == ["device", "phone"]
    assert reply.body.value["hops"] == [] and reply.hops == []
    assert device.stats.relayed_sent == 0


async def test_a_blob_crosses_the_relay_in_chunks_with_its_bytes_intact(net: Net) -> None:
    device = await net.node("device", "home")
    # The cloud takes bulk streams, but nobody can dial it from home: chunks through the relay.
    cloud = await net.node("cloud", "dc", bulk="127.0.0.1:0")
    await net.node("relay-1", "home", "dc", relay=True)
    net.serve(cloud)
    await device.wait_for_peer("cloud", timeout=30, announced=True)
    blob = np.random.default_rng(6).integers(0, 255, size=16 << 20, dtype=np.uint8)

    reply = await device.request("cloud", ask(blob), timeout=60)

    assert reply.body.value["sha256"] == hashlib.sha256(blob.tobytes()).hexdigest()
    assert reply.body.value["hops"] == ["relay-1"]
    assert device.stats.relayed_blobs_sent == 1 and device.stats.bulk_sent == 0
    assert cloud.stats.relayed_blobs_received == 1 and cloud.stats.blob_errors == 0


async def test_a_route_of_two_relays_is_found_and_followed(net: Net) -> None:
    device = await net.node("device", "home")
    cloud = await net.node("cloud", "dc")
    await net.node("relay-1", "home", "mid", relay=True)
    await net.node("relay-2", "mid", "dc", relay=True)
    net.serve(cloud)
    await device.wait_for_peer("cloud", timeout=30, announced=True)

    reply = await device.request("cloud", ask(), timeout=10)

    assert device.route("cloud") == ["device", "relay-1", "relay-2", "cloud"]
    assert reply.body.value["hops"] == ["relay-1", "relay-2"]
    assert reply.hops == ["relay-2", "relay-1"]


async def test_when_the_relay_dies_the_other_takes_over_and_without_one_the_error_names_the_node(
    net: Net,
) -> None:
    device = await net.node("device", "home")
    cloud = await net.node("cloud", "dc")
    first = await net.node("relay-1", "home", "dc", relay=True)
    net.serve(cloud)
    await device.wait_for_peer("cloud", timeout=30, announced=True)
    assert (await device.request("cloud", ask(), timeout=10)).body.value["hops"] == ["relay-1"]
    second = await net.node("relay-2", "home", "dc", relay=True)
    await eventually(lambda: "cloud" in device.routes.reported("relay-2"), what="relay-2's link to the cloud")

    await first.crash()
    bound = 10 * DEAD_AFTER_S
    await eventually(lambda: device.route("cloud")[1] == "relay-2", within=bound, what="a new route")
    reply = await device.request("cloud", ask(), timeout=10)
    assert reply.body.value["hops"] == ["relay-2"]

    await second.crash()
    with pytest.raises(PeerUnreachable) as lost:
        for _ in range(200):  # until the device has noticed (within the failure-detection bound)
            await device.request("cloud", ask(), timeout=DEAD_AFTER_S)
    assert lost.value.node == "cloud" and "'cloud'" in str(lost.value)


async def test_a_request_in_flight_when_its_relay_dies_completes_or_fails_clearly(net: Net) -> None:
    device = await net.node("device", "home")
    cloud = await net.node("cloud", "dc")
    first = await net.node("relay-1", "home", "dc", relay=True)
    await net.node("relay-2", "home", "dc", relay=True)
    await device.wait_for_peer("cloud", timeout=30, announced=True)
    await eventually(
        lambda: (
            all("cloud" in device.routes.reported(r) for r in ("relay-1", "relay-2"))
            and all("device" in cloud.routes.reported(r) for r in ("relay-1", "relay-2"))
        ),
        what="both relays' links, both ways",
    )
    via = device.route("cloud")[1]
    assert via == "relay-1" or via == "relay-2"
    dying = first if via == "relay-1" else None
    # The cloud answers only after the relay the request took has died.
    answered = asyncio.Event()

    async def slow_server() -> None:
        env = await cloud.recv()
        await answered.wait()
        await cloud.reply(env, ask("late"))

    server = asyncio.create_task(slow_server())
    request = asyncio.create_task(device.request("cloud", ask(), timeout=30))
    await eventually(lambda: cloud.stats.received >= 1, what="the request at the cloud")
    await (dying or next(e for e in net.endpoints if e.node_id == via)).crash()
    await eventually(lambda: via not in device.routes.relays(), within=10 * DEAD_AFTER_S, what="the death")
    answered.set()
    reply = await request  # it completes (the answer takes the relay that is left)
    await server
    assert reply.body.value == "late" and reply.hops != [via]


async def test_a_frame_past_the_hop_limit_or_in_a_loop_is_refused_with_an_error_naming_the_target(
    net: Net,
) -> None:
    device = await net.node("device", "home")
    relay = await net.node("relay-1", "home", "dc", relay=True)
    await net.node("cloud", "dc")
    await device.wait_for_peer("cloud", timeout=30, announced=True)
    inner = Envelope.new(src="device", dst="cloud", body=ask())
    for hops, why in (([f"r{i}" for i in range(MAX_HOPS)], "hop limit"), (["relay-1"], "routing loop")):
        wrapper = Envelope.new(
            src="device", dst="relay-1", body=Relay(target="cloud", frame=encode(inner)), hops=hops
        )
        refused = relay.stats.relay_refused
        await device.transport.send("relay-1", encode(wrapper))
        error = await device.recv(timeout=10)
        assert isinstance(error.body, Error) and error.body.code == "unreachable"
        assert error.body.target == "cloud" and why in error.body.message and error.corr == inner.id
        assert relay.stats.relay_refused == refused + 1


async def test_signatures_hold_end_to_end_and_a_forged_inner_frame_is_dropped(net: Net) -> None:
    signer = Signer("k1", KEY["k1"])
    device = await net.node("device", "home", signer=signer, verifier=Verifier(KEY))
    cloud = await net.node("cloud", "dc", signer=signer, verifier=Verifier(KEY))
    await net.node("relay-1", "home", "dc", relay=True, signer=signer, verifier=Verifier(KEY))
    net.serve(cloud)
    await device.wait_for_peer("cloud", timeout=30, announced=True)
    assert (await device.request("cloud", ask(), timeout=10)).body.value["hops"] == ["relay-1"]

    # The relay vouches for the wrapper, never for what is inside: an inner frame signed with
    # another key reaches the cloud and is dropped there.
    forged = encode(Envelope.new(src="device", dst="cloud", body=ask()), signer=Signer("k1", b"x" * 32))
    wrapper = Envelope.new(src="device", dst="relay-1", body=Relay(target="cloud", frame=forged))
    malformed = cloud.stats.malformed
    await device.transport.send("relay-1", encode(wrapper, signer=signer))
    await eventually(lambda: cloud.stats.malformed == malformed + 1, what="the forged frame dropped")
    assert cloud.stats.received == 1


async def test_routes_follow_the_measured_link_cost(net: Net) -> None:
    device = await net.node("device", "home")
    cloud = await net.node("cloud", "dc")
    slow_links = LinkTable()
    slow_links.set("*", LinkSpec(latency_ms=40))  # everything relay-1 sends takes 40 ms
    await net.node("relay-1", "home", "dc", relay=True, links=slow_links)
    await net.node("relay-2", "home", "dc", relay=True)
    net.serve(cloud)
    await device.wait_for_peer("cloud", timeout=30, announced=True)
    await eventually(
        lambda: (
            device.routes.delay_ms("relay-1") > 30
            and all("cloud" in device.routes.reported(r) for r in ("relay-1", "relay-2"))
        ),
        what="relay-1's delay measured, and both relays' links to the cloud",
    )
    device.routes.invalidate()

    assert device.route("cloud") == ["device", "relay-2", "cloud"]
    assert (await device.request("cloud", ask(), timeout=10)).body.value["hops"] == ["relay-2"]


async def test_what_a_dying_relay_still_held_is_sent_again_through_the_other_relay(net: Net) -> None:
    device = await net.node("device", "home")
    cloud = await net.node("cloud", "dc")
    holding = LinkTable()
    holding.set("cloud", LinkSpec(latency_ms=3000))  # relay-1 sits on what it passes to the cloud
    first = await net.node("relay-1", "home", "dc", relay=True, links=holding)
    await device.wait_for_peer("cloud", timeout=30, announced=True)
    assert device.route("cloud") == ["device", "relay-1", "cloud"]

    sent = await device.send("cloud", ask("fire and forget"))  # no reply awaited: nothing to time out
    await eventually(lambda: first.stats.forwarded >= 1, what="the message inside relay-1")
    await net.node("relay-2", "home", "dc", relay=True)
    await eventually(lambda: "cloud" in device.routes.reported("relay-2"), what="relay-2's link to the cloud")
    await first.crash()  # with the message still on its way out

    got = await cloud.recv(timeout=30)
    assert got.id == sent.id and got.body.value == "fire and forget" and got.hops == ["relay-2"]
    assert device.stats.rerouted >= 1
