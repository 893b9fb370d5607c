"""Nodes and the orchestrator in one process: a job runs to the end whatever happens to its nodes."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agents.errors import PatchRejected
from agents.graph import TaskGraph
from agents.journal import Journal
from agents.node import Node
from agents.orchestrator import Orchestrator
from fabric import Endpoint, InprocHub
from protocol import AddEdge, AddTask, Capabilities, Error, GraphPatch, Placement, TaskSpec
from tests.fabric.harness import eventually


@dataclass
class Cluster:
    hub: InprocHub
    endpoint: Endpoint
    nodes: dict[str, Node] = field(default_factory=dict)

    async def add(self, node_id: str, tier: str = "edge", cores: int = 2, **kwargs: object) -> Node:
        caps = Capabilities(tier=tier, cores=cores, memory_mb=1024)  # type: ignore[arg-type]
        node = Node(
            node_id,
            self.hub.transport(node_id),
            capabilities=caps,
            heartbeat_s=0.1,
            dead_after_s=0.5,
            **kwargs,
        )  # type: ignore[arg-type]
        await node.start()
        self.nodes[node_id] = node
        await self.endpoint.wait_for_peer(node_id, timeout=30, announced=True)
        return node

    def orchestrator(self, **kwargs: object) -> Orchestrator:
        return Orchestrator(self.endpoint, retry_backoff_s=0.01, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    hub = InprocHub()
    endpoint = Endpoint("orchestrator", hub.transport("orchestrator"), heartbeat_s=0.1, dead_after_s=0.5)
    await endpoint.start()
    c = Cluster(hub, endpoint)
    try:
        yield c
    finally:
        for node in c.nodes.values():
            await node.crash()
        await endpoint.close()


def spec(task_id: str, kind: str = "echo", **kwargs: object) -> TaskSpec:
    return TaskSpec(id=task_id, kind=kind, **kwargs)  # type: ignore[arg-type]


def diamond() -> TaskGraph:
    return TaskGraph(
        "job",
        [
            spec("a", params={"value": 1}),
            spec("b", "sum", inputs={"x": "a"}, params={"add": 10}),
            spec("c", "sum", inputs={"x": "a"}, params={"add": 100}),
            spec("d", "sum", inputs={"x": "b", "y": "c"}),
        ],
    )


async def test_a_dag_runs_with_results_flowing_downstream(cluster: Cluster) -> None:
    await cluster.add("n1")
    await cluster.add("n2")
    graph = await cluster.orchestrator().run(diamond(), timeout=60)
    assert graph.task("d").result == 112
    assert graph.counts()["done"] == 4


async def test_placement_honours_tier_and_spreads_work(cluster: Cluster) -> None:
    await cluster.add("dev", tier="device")
    await cluster.add("e1")
    await cluster.add("e2")
    tasks = [
        spec(f"t{i}", "sleep", params={"seconds": 0.05}, placement=Placement(tier="edge")) for i in range(8)
    ]
    graph = await cluster.orchestrator().run(TaskGraph("job", tasks), timeout=60)
    ran_on = {graph.task(f"t{i}").node for i in range(8)}
    assert ran_on == {"e1", "e2"}


async def test_a_node_killed_mid_dag_has_its_tasks_reassigned(cluster: Cluster) -> None:
    await cluster.add("n1")
    doomed = await cluster.add("n2")
    tasks = [spec(f"s{i}", "sleep", params={"seconds": 0.3}) for i in range(4)]
    tasks.append(spec("sum", "sum", inputs={f"x{i}": f"s{i}" for i in range(4)}))
    orchestrator = cluster.orchestrator(speculation=False)
    job = asyncio.create_task(orchestrator.run(TaskGraph("job", tasks), timeout=60))
    await eventually(lambda: doomed.stats.assigned > 0, what="work on n2")
    await doomed.crash()
    graph = await job
    assert graph.task("sum").result == pytest.approx(1.2)
    assert orchestrator.stats.reassigned >= 1
    assert all(graph.task(f"s{i}").node == "n1" for i in range(4))


async def test_a_failing_task_is_retried_then_succeeds(cluster: Cluster) -> None:
    await cluster.add("n1")
    orchestrator = cluster.orchestrator()
    flaky = spec("flaky", "fail", params={"until_attempt": 2, "value": "finally"}, retries=3)
    graph = await orchestrator.run(TaskGraph("job", [flaky]), timeout=60)
    assert graph.task("flaky").result == "finally"
    assert orchestrator.stats.retries == 2


async def test_a_task_out_of_retries_fails_and_skips_downstream(cluster: Cluster) -> None:
    await cluster.add("n1")
    tasks = [spec("bad", "fail", retries=1), spec("after", inputs={"x": "bad"}), spec("other")]
    graph = await cluster.orchestrator().run(TaskGraph("job", tasks), timeout=60)
    assert [graph.task(t).state for t in ("bad", "after", "other")] == ["failed", "skipped", "done"]
    assert "fails on purpose" in (graph.task("bad").error or "")


async def test_a_task_past_its_timeout_is_cancelled_on_its_node(cluster: Cluster) -> None:
    node = await cluster.add("n1")
    orchestrator = cluster.orchestrator()
    slow = spec("slow", "sleep", params={"seconds": 30}, timeout_s=0.2)
    graph = await orchestrator.run(TaskGraph("job", [slow]), timeout=60)
    assert graph.task("slow").state == "failed" and orchestrator.stats.timeouts == 1
    await eventually(lambda: node.stats.cancelled == 1, what="the node cancelled the task")


async def test_cancel_reaches_the_node_and_skips_downstream(cluster: Cluster) -> None:
    node = await cluster.add("n1")
    orchestrator = cluster.orchestrator()
    tasks = [spec("long", "sleep", params={"seconds": 30}), spec("next", inputs={"x": "long"})]
    job = asyncio.create_task(orchestrator.run(TaskGraph("job", tasks), timeout=60))
    await eventually(lambda: node.stats.assigned == 1, what="the task on its node")
    await orchestrator.cancel("long", "user asked")
    graph = await job
    assert (graph.task("long").state, graph.task("next").state) == ("cancelled", "skipped")
    await eventually(lambda: node.stats.cancelled == 1, what="the node cancelled the task")


async def test_a_straggler_gets_a_speculative_copy_and_one_result_counts(cluster: Cluster) -> None:
    await cluster.add("fast")
    await cluster.add("slow", slowdown=40.0)
    orchestrator = cluster.orchestrator(speculate_after=2.0, speculate_min_s=0.1)
    tasks = [spec(f"t{i}", "sleep", params={"seconds": 0.05}) for i in range(6)]
    graph = await orchestrator.run(TaskGraph("job", tasks), timeout=60)
    assert graph.counts()["done"] == 6
    assert orchestrator.stats.speculative >= 1
    assert orchestrator.stats.accepted == 6  # exactly one accepted result per task


async def test_waiting_in_a_busy_nodes_queue_is_not_straggling(cluster: Cluster) -> None:
    """The straggler clock starts when a task can have started, not when it was sent."""
    await cluster.add("a", cores=1)
    orchestrator = cluster.orchestrator(speculate_after=2.0, speculate_min_s=0.1)
    tasks = [spec(f"t{i}", "sleep", params={"seconds": 0.2}) for i in range(4)]
    job = asyncio.create_task(orchestrator.run(TaskGraph("job", tasks), timeout=60))
    await eventually(lambda: orchestrator.stats.dispatched == 4, what="all four sent to a")
    await cluster.add("b", cores=1)  # free from now on: a copy could go there at any moment
    graph = await job
    assert graph.counts()["done"] == 4
    # t3 waited 0.6 s behind the others, three times a task's 0.2 s, yet it never straggled
    assert orchestrator.stats.speculative == 0
    assert {graph.task(f"t{i}").node for i in range(4)} == {"a"}


async def test_a_patch_while_running_adds_work_and_a_bad_patch_changes_nothing(cluster: Cluster) -> None:
    await cluster.add("n1")
    orchestrator = cluster.orchestrator()
    graph = TaskGraph(
        "job", [spec("first", "sleep", params={"seconds": 0.3}), spec("second", inputs={"x": "first"})]
    )
    job = asyncio.create_task(orchestrator.run(graph, timeout=60))
    await eventually(lambda: graph.task("first").state == "running", what="first running")
    orchestrator.patch([AddTask(task=spec("extra", "sum", inputs={"x": "first"}, params={"add": 1}))])
    with pytest.raises(PatchRejected, match="cycle"):
        orchestrator.patch(
            [AddTask(task=spec("loop")), AddEdge(src="second", dst="loop"), AddEdge(src="loop", dst="second")]
        )
    assert "loop" not in graph
    await job
    assert graph.task("extra").result == pytest.approx(1.3)
    assert graph.counts()["done"] == 3


async def test_a_task_timeout_counts_from_when_it_can_run_not_from_its_dispatch(cluster: Cluster) -> None:
    await cluster.add("a", cores=1)
    orchestrator = cluster.orchestrator()
    tasks = [spec(f"t{i}", "sleep", params={"seconds": 0.4}, timeout_s=1.0) for i in range(4)]
    graph = await orchestrator.run(TaskGraph("job", tasks), timeout=60)
    # the last one waited 1.2 s in a's queue, then ran 0.4 s of its 1 s
    assert graph.counts()["done"] == 4 and orchestrator.stats.timeouts == 0


async def test_tasks_go_only_to_the_nodes_the_orchestrator_is_given(cluster: Cluster) -> None:
    await cluster.add("mine")
    await cluster.add("stranger", cores=8)
    graph = await cluster.orchestrator(nodes=["mine"]).run(
        TaskGraph("job", [spec(f"t{i}") for i in range(6)]), timeout=60
    )
    assert {graph.task(f"t{i}").node for i in range(6)} == {"mine"}
    assert cluster.nodes["stranger"].stats.assigned == 0


async def test_patches_over_the_wire_are_taken_only_from_authorised_agents(cluster: Cluster) -> None:
    await cluster.add("n1")
    orchestrator = cluster.orchestrator(authorised=["planner"])
    graph = TaskGraph("job", [spec("slow", "sleep", params={"seconds": 0.5})])
    job = asyncio.create_task(orchestrator.run(graph, timeout=60))
    agents = {}
    for name in ("planner", "mallory"):
        agents[name] = Endpoint(name, cluster.hub.transport(name), heartbeat_s=0.1)
        await agents[name].start()
    try:
        extra = GraphPatch(job="job", ops=[AddTask(task=spec("extra", params={"value": 7}), after=["slow"])])
        for sender, body in (("mallory", extra), ("planner", extra.model_copy(update={"job": "other"}))):
            answer = await agents[sender].request("orchestrator", body, timeout=30)
            assert isinstance(answer.body, Error) and answer.body.code == "rejected"
        assert "not authorised" in str(
            (await agents["mallory"].request("orchestrator", extra, timeout=30)).body.message
        )
        assert "extra" not in graph and orchestrator.stats.patches_rejected == 3
        await agents["planner"].send("orchestrator", extra)
        await job
        assert graph.task("extra").result == 7 and graph.counts()["done"] == 2
    finally:
        for agent in agents.values():
            await agent.close()


async def test_a_result_can_grow_the_job(cluster: Cluster) -> None:
    await cluster.add("dev", tier="device")
    await cluster.add("big", tier="cloud")
    detect = spec(
        "detect",
        "escalate",
        params={"confidence": 0.2, "threshold": 0.5, "label": "cat"},
        placement=Placement(tier="device"),
    )
    graph = await cluster.orchestrator().run(TaskGraph("job", [detect]), timeout=60)
    assert graph.task("detect.escalated").node == "big"
    assert graph.task("detect.escalated").result == {"label": "cat", "escalated_from": "dev"}


async def test_a_draining_node_finishes_or_hands_back_its_tasks(cluster: Cluster) -> None:
    leaving = await cluster.add("leaving")
    await cluster.add("staying")
    orchestrator = cluster.orchestrator(speculation=False)
    tasks = [spec(f"t{i}", "sleep", params={"seconds": 2.0}) for i in range(4)]
    job = asyncio.create_task(orchestrator.run(TaskGraph("job", tasks), timeout=60))
    await eventually(lambda: leaving.stats.assigned > 0, what="work on the leaving node")
    await leaving.close(grace_s=0.05)  # what SIGTERM does
    graph = await job
    assert graph.counts()["done"] == 4
    assert leaving.stats.handed_back >= 1 and orchestrator.stats.reassigned >= 1


async def test_a_journaled_job_resumes_without_redoing_finished_tasks(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.add("n1")
    journal = Journal(tmp_path / "job.sqlite")
    tasks = [
        spec("a", params={"value": 1}),
        spec("b", "sum", inputs={"x": "a"}, params={"add": 1}),
        spec("c", "sleep", params={"seconds": 0.5}),
        spec("d", "sum", inputs={"x": "b", "y": "c"}),
    ]
    first = cluster.orchestrator(journal=journal)
    job = asyncio.create_task(first.run(TaskGraph("job", tasks), timeout=60))
    await eventually(lambda: first.stats.accepted >= 2, what="a and b done")
    job.cancel()  # the orchestrator stops with c still running
    with pytest.raises(asyncio.CancelledError):
        await job
    second = cluster.orchestrator(journal=journal)
    graph = second.resume()
    assert {t: graph.task(t).state for t in "abcd"} == {
        "a": "done",
        "b": "done",
        "c": "ready",
        "d": "pending",
    }
    await second.run(graph, timeout=60)
    assert graph.task("d").result == pytest.approx(2.5)
    assert second.stats.dispatched == 2  # c and d only: a and b were not run again
    journal.close()
