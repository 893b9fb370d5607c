"""The orchestrator across segments: a node it cannot route to for a while is waited for, not spun on."""

import asyncio

from agents.graph import TaskGraph
from agents.node import Node
from agents.orchestrator import Orchestrator
from fabric import Endpoint, InprocHub
from protocol import Capabilities, Placement, TaskSpec


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
