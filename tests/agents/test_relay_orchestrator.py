"""The orchestrator across segments: a node it cannot route to for a while is waited for, not spun on."""

import asyncio

from agents.graph import TaskGraph
from agents.node import Node
from agents.orchestrator import Orchestrator
from fabric import Endpoint, InprocHub
from protocol import Capabilities, Placement, TaskSpec
from tests.fabric.harness import eventually


async def test_a_task_waits_while_its_node_is_unroutable_and_runs_once_a_relay_is_back() -> None:
    hub = InprocHub()
    caps = Capabilities(tier="cloud", cores=2, memory_mb=1024)
    timing = {"heartbeat_s": 0.1, "dead_after_s": 3.0}  # the cloud stays "alive" while unroutable
    home = Endpoint("orchestrator", hub.transport("orchestrator", segments=["home"], public=False), **timing)
    cloud = Node(
        "cloud-1", hub.transport("cloud-1", segments=["dc"], public=False), capabilities=caps, **timing
    )
    relays = [
        Node(
            name,
            hub.transport(name, segments=["home", "dc"], public=False),
            capabilities=caps,
            relay=True,
            **timing,
        )
        for name in ("relay-1", "relay-2")
    ]
    try:
        await home.start()
        await cloud.start()
        await relays[0].start()
        await home.wait_for_peer("cloud-1", timeout=30, announced=True)
        await relays[0].crash()  # no route to cloud-1 now, though it is not declared dead yet
        assert not home.reachable("cloud-1") and "cloud-1" in home.peers
        orchestrator = Orchestrator(home, nodes=["cloud-1"], retry_backoff_s=0.01)
        graph = TaskGraph(
            "j", [TaskSpec(id="t", kind="echo", params={"value": 7}, placement=Placement(node="cloud-1"))]
        )
        job = asyncio.create_task(orchestrator.run(graph, timeout=60))
        await asyncio.sleep(0.5)
        assert not job.done() and orchestrator.stats.dispatched == 0  # waiting, not spinning

        await relays[1].start()  # a route again: the task goes through relay-2
        await job

        assert graph.task("t").result == 7 and graph.task("t").node == "cloud-1"
        assert orchestrator.stats.dispatched == 1
        assert [e.detail for e in orchestrator.events if e.kind == "dispatch"] == ["via relay-2"]
    finally:
        for node in (*relays, cloud):
            await node.crash()
        await home.close()


async def test_an_assignment_a_relay_cannot_pass_on_is_placed_again_once_a_route_is_back() -> None:
    """orchestrator (home) -> relay-1 (home, mid) -> relay-2 (mid, dc) -> cloud-1 (dc).

    relay-2 dies: relay-1 knows at once, the orchestrator only once relay-2's silence is long
    enough. Meanwhile its assignment goes to relay-1, which has no route and says so; the task is
    placed again, and runs once relay-3 joins mid and dc.
    """
    hub = InprocHub()
    caps = Capabilities(tier="cloud", cores=2, memory_mb=1024)
    slow = {"heartbeat_s": 0.1, "dead_after_s": 3.0}  # the orchestrator's view lags behind
    home = Endpoint("orchestrator", hub.transport("orchestrator", segments=["home"], public=False), **slow)
    cloud = Node(
        "cloud-1", hub.transport("cloud-1", segments=["dc"], public=False), capabilities=caps, **slow
    )

    def relay(name: str, *segments: str) -> Node:
        transport = hub.transport(name, segments=segments, public=False)
        return Node(name, transport, capabilities=caps, relay=True, heartbeat_s=0.1, dead_after_s=0.5)

    relays = [relay("relay-1", "home", "mid"), relay("relay-2", "mid", "dc"), relay("relay-3", "mid", "dc")]
    try:
        await home.start()
        await cloud.start()
        await relays[0].start()
        await relays[1].start()
        await home.wait_for_peer("cloud-1", timeout=30, announced=True)
        await relays[1].crash()
        orchestrator = Orchestrator(home, nodes=["cloud-1"], retry_backoff_s=0.01)
        graph = TaskGraph(
            "j", [TaskSpec(id="t", kind="echo", params={"value": 7}, placement=Placement(node="cloud-1"))]
        )
        job = asyncio.create_task(orchestrator.run(graph, timeout=60))
        await eventually(
            lambda: any(e.kind == "retry" and "not delivered" in e.detail for e in orchestrator.events),
            what="relay-1's refusal",
        )
        assert not job.done()

        await relays[2].start()
        await job

        assert graph.task("t").result == 7
        refusals = [e.detail for e in orchestrator.events if e.kind == "retry"]
        assert refusals and all(
            "relay-1 reports relay relay-1 has no route to cloud-1" in d for d in refusals
        )
        assert orchestrator.stats.dispatched == len(refusals) + 1  # placed again a few times, not spun on
        assert orchestrator.events[-1].kind == "done"
    finally:
        for node in (*relays, cloud):
            await node.crash()
        await home.close()
