"""Runs a scenario: its workload on its nodes, its faults at their times, a report at the end.

In-process (the default) the nodes are real `Node`s and the orchestrator a real `Orchestrator`,
on an `InprocHub`, with the scenario's links emulated by each sender. Against a broker
(`broker=`), the nodes are `flowloom node` daemons already running there, under the scenario's
node ids; only the orchestrator runs here, and faults that need a hand on a node or the broker
are not injected (the report says so). The report holds the task counts, each node's work, the
faults, the expectations checked and the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agents.errors import ScenarioError, UnknownTaskKind
from agents.executors import ExecutorRegistry
from agents.graph import TaskGraph
from agents.journal import Journal
from agents.node import Node
from agents.orchestrator import JobEvent, Orchestrator
from agents.report import Expectation, FaultRecord, NodeReport, Report, TaskCounts
from agents.scenario import ORCHESTRATOR, Fault, Scenario
from agents.services import ServiceRegistry, load_services
from fabric import DeadlineExceeded, Endpoint, FabricError, InprocHub, LinkTable, MqttTransport, Transport
from fabric.testing import MosquittoBroker
from protocol import Capabilities

__all__ = ["ORCHESTRATOR", "run_scenario", "write_trace"]

log = logging.getLogger("agents.runner")

HEARTBEAT_S = 0.2
DEAD_AFTER_S = 1.0
# Against daemons: their default heartbeat is 1 s; a crash is usually seen sooner, by Last Will.
DAEMON_HEARTBEAT_S = 1.0
DAEMON_DEAD_AFTER_S = 3.0


def capabilities_of(scenario: Scenario, node: str) -> Capabilities:
    spec = scenario.nodes[node]
    return Capabilities(
        tier=spec.tier,
        cores=spec.cores,
        memory_mb=spec.memory_mb,
        segment=spec.joined[0],
        reachability="nat" if spec.nat else "public",
        relay=spec.relay,
        labels=spec.labels,
        models=spec.models,
    )


def hub_transport(scenario: Scenario, hub: InprocHub) -> Callable[[str], Transport]:
    """Makes each node's hub transport in its segments (the orchestrator in its host's)."""

    def make(node: str) -> Transport:
        spec = scenario.nodes[scenario.orchestrator_host if node == ORCHESTRATOR else node]
        return hub.transport(node, segments=spec.joined, public=not spec.nat)

    return make


def links_of(scenario: Scenario, node: str) -> LinkTable:
    """The emulated links out of `node` (a scenario node, or `ORCHESTRATOR`)."""
    table = LinkTable()
    for other in [*scenario.nodes, ORCHESTRATOR]:
        link = scenario.link(node, other) if other != node else None
        if link is not None:
            table.set(other, link.spec())
    return table


def link_cost(scenario: Scenario) -> Callable[[str, str, int], float]:
    def cost(src: str, dst: str, nbytes: int) -> float:
        link = scenario.link(src, dst)
        return 0.0 if link is None else link.spec().transfer_s(nbytes)

    return cost


class _InprocCluster:
    """The scenario's nodes in this process, on a hub or a private broker; faults act on them."""

    def __init__(
        self,
        scenario: Scenario,
        transport: Callable[[str], Transport],
        *,
        hub: InprocHub | None = None,
        broker: MosquittoBroker | None = None,
    ) -> None:
        self.scenario = scenario
        self.transport = transport
        self.hub = hub
        self.broker = broker
        self.nodes: dict[str, Node] = {}
        self.links: dict[str, LinkTable] = {}
        self.slowdown: dict[str, float] = {}
        self.restarting: asyncio.Future[None] | None = None
        self.links[ORCHESTRATOR] = links_of(scenario, ORCHESTRATOR)

    async def start(self, node_id: str) -> None:
        self.links[node_id] = links_of(self.scenario, node_id)
        node = Node(
            node_id,
            self.transport(node_id),
            capabilities=capabilities_of(self.scenario, node_id),
            heartbeat_s=HEARTBEAT_S,
            dead_after_s=DEAD_AFTER_S,
            links=self.links[node_id],
            slowdown=self.slowdown.get(node_id, 1.0),
            link_cost=link_cost(self.scenario),
            relay=self.scenario.nodes[node_id].relay,
        )
        self.nodes[node_id] = node  # before start: a start cut short is still closed at the end
        await node.start()

    async def inject(self, fault: Fault) -> str:
        """Apply `fault`; return what was done, for the report."""
        name = fault.node or ""
        if fault.action == "kill_node":
            if self.nodes[name].closed:
                return f"{name} was already down; not killed"
            await self.nodes[name].crash()
            return f"killed {name}"
        if fault.action == "restart_node":
            if name in self.nodes and not self.nodes[name].closed:
                return f"{name} was running; not restarted"
            await self.start(name)
            return f"restarted {name}"
        if fault.action == "slow_node":
            self.slowdown[name] = fault.factor
            self.nodes[name].slowdown = fault.factor
            return f"{name} runs {fault.factor:g}x slower"
        if fault.action in ("partition", "heal"):
            # The hub cuts everything, heartbeats included, and keeps the cut across a node's
            # restart (run_scenario refuses partitions where there is no hub).
            assert self.hub is not None
            peer = fault.peer or ""
            host = self.scenario.orchestrator_host

            def side(node: str) -> list[str]:  # the orchestrator shares its host's fate
                return [node, ORCHESTRATOR] if node == host else [node]

            act = self.hub.partition if fault.action == "partition" else self.hub.heal
            for a in side(name):
                for b in side(peer):
                    act(a, b)
            return f"{'cut' if fault.action == 'partition' else 'restored'} {name} <-> {peer}"
        if self.broker is None:
            return "no broker in-process (run with --mqtt for one): skipped"
        # A clean stop: sessions and queues survive. Shielded and remembered, so a run that ends
        # meanwhile waits for the restart before it closes the broker.
        self.restarting = asyncio.ensure_future(asyncio.to_thread(self.broker.restart))
        await asyncio.shield(self.restarting)
        return "restarted the broker"

    def alive(self, node_id: str) -> bool:
        return not self.nodes[node_id].closed

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.close(grace_s=0.0)
        if self.restarting is not None:
            with contextlib.suppress(Exception):
                await self.restarting
        if self.broker is not None:
            await asyncio.to_thread(self.broker.close)


class _DaemonCluster:
    """The scenario's nodes as daemons on a broker: nothing to start, no hand on them for faults."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def inject(self, fault: Fault) -> str:
        return (
            f"{fault.node or 'broker'}: not injected against node daemons (stop or slow the process yourself)"
        )

    def alive(self, node_id: str) -> bool:
        peer = self.endpoint.peers.get(node_id)
        return peer is not None and peer.alive

    async def close(self) -> None:
        pass


async def run_scenario(
    scenario: Scenario,
    *,
    on_event: Callable[[JobEvent], None] | None = None,
    on_start: Callable[[TaskGraph], None] | None = None,
    journal: Path | None = None,
    resume: bool = False,
    broker: str | None = None,
    namespace: str = "flowloom",
    wait_s: float = 30.0,
    private_broker: bool = False,
) -> tuple[Report, Orchestrator]:
    """Run `scenario`; return its report and the orchestrator (events, stats).

    In-process by default, on an `InprocHub`, or with `private_broker` on a Mosquitto started for
    the run (so `restart_broker` faults can be injected; needs mosquitto installed). With
    `broker` (``mqtt://host:port``), against the node daemons in fabric `namespace` there,
    waiting up to `wait_s` in all for the scenario's nodes to announce themselves; tasks go only
    to the scenario's nodes.
    `on_start` gets the job's graph (fresh, or rebuilt from the journal with `resume`) before it runs.
    """
    if private_broker and any(f.action in ("partition", "heal") for f in scenario.faults):
        # A broker carries broadcasts (heartbeats) past any emulated link: the cut would only be
        # half a cut, and the job would wait on a node it believes alive.
        raise ScenarioError(
            f"scenario {scenario.name!r}: partition and heal need the in-process hub; drop --mqtt"
        )
    if private_broker and len({s for spec in scenario.nodes.values() for s in spec.joined}) > 1:
        raise ScenarioError(
            f"scenario {scenario.name!r}: its nodes are in several segments, which --mqtt's one broker "
            "cannot separate; run it in-process, or on daemons with a broker per segment (--broker)"
        )
    if broker is None:
        _load_plugins(scenario)
    started = time.monotonic()
    faults: list[FaultRecord] = []
    cluster, endpoint = await _make_cluster(scenario, broker, namespace, private_broker=private_broker)
    inproc = cluster if isinstance(cluster, _InprocCluster) else None
    store = Journal(journal) if journal is not None else None
    try:
        await endpoint.start()
        if inproc is not None:
            for node_id in scenario.nodes:
                await inproc.start(node_id)
        await _wait_for_nodes(endpoint, scenario, wait_s if broker else 10.0, broker, namespace)
        if broker is not None:
            for warning in _mismatches(endpoint, scenario):
                log.warning("%s", warning)
        watch = _ProgressWatch(on_event)
        orchestrator = Orchestrator(
            endpoint,
            journal=store,
            link_cost=link_cost(scenario),
            nodes=list(scenario.nodes),  # on a shared broker, other daemons are not this run's
            on_event=watch,
        )
        graph = orchestrator.resume() if resume and store is not None else scenario.graph()
        if on_start is not None:
            on_start(graph)

        due = sorted(scenario.faults, key=lambda f: f.at_s)

        async def inject_faults() -> None:
            for fault in due:
                await asyncio.sleep(max(0.0, started + fault.at_s - time.monotonic()))
                if fault.after is not None:
                    await watch.reached(fault.after.task, fault.after.count)
                what = await cluster.inject(fault)
                faults.append(
                    FaultRecord(at_s=round(time.monotonic() - started, 3), kind=fault.action, target=what)
                )

        injector = asyncio.create_task(inject_faults(), name="faults")
        try:
            await orchestrator.run(graph, timeout=scenario.workload.timeout_s)
        finally:
            injector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await injector
        wall = time.monotonic() - started
        for fault in due[len(faults) :]:  # in the report too, so none vanishes unmentioned
            what = f"{fault.node or 'broker'}: not injected, the job had ended"
            faults.append(FaultRecord(at_s=fault.at_s, kind=fault.action, target=what))
        report = _report(
            scenario, graph, orchestrator=orchestrator, cluster=cluster, faults=faults, wall=wall
        )
        return report, orchestrator
    finally:
        await cluster.close()
        await endpoint.close()
        if store is not None:
            store.close()


class _ProgressWatch:
    """Passes job events on, counting each task's progress reports (for faults `after` them)."""

    def __init__(self, on_event: Callable[[JobEvent], None] | None) -> None:
        self.on_event = on_event
        self.counts: dict[str, int] = {}
        self._moved = asyncio.Event()

    def __call__(self, event: JobEvent) -> None:
        if event.kind == "progress":
            self.counts[event.task] = self.counts.get(event.task, 0) + 1
            self._moved.set()
        if self.on_event is not None:
            self.on_event(event)

    async def reached(self, task: str, count: int) -> None:
        """Return once `task` has sent `count` progress reports."""
        while self.counts.get(task, 0) < count:
            self._moved.clear()
            await self._moved.wait()


def _load_plugins(scenario: Scenario) -> None:
    """Import the executors the workload names (and the services, when nodes serve models) first.

    A first import can take seconds (torch, transformers); in the middle of a run it would stall
    the process's event loop, and with it every in-process node's heartbeats.
    """
    kinds = {task.kind for task in scenario.workload.tasks}
    if scenario.workload.generate is not None:
        kinds.add(scenario.workload.generate.kind)
    executors = ExecutorRegistry()
    for kind in sorted(kinds):
        with contextlib.suppress(UnknownTaskKind):  # the node reports it when the task runs
            executors.get(kind)
    if any(spec.models for spec in scenario.nodes.values()):  # as `flowloom node --model` does
        load_services(ServiceRegistry())


async def _make_cluster(
    scenario: Scenario, broker: str | None, namespace: str, *, private_broker: bool
) -> tuple[_InprocCluster | _DaemonCluster, Endpoint]:
    """The nodes (in this process, or daemons on `broker`) and the orchestrator's endpoint."""
    caps = Capabilities(tier="cloud", cores=1, memory_mb=0, task_kinds=[])
    cluster: _InprocCluster | _DaemonCluster
    if broker is None:
        if private_broker:
            mosquitto = MosquittoBroker()
            await asyncio.to_thread(mosquitto.start)
            run_ns = f"run-{uuid.uuid4().hex[:8]}"
            cluster = _InprocCluster(
                scenario, lambda node: MqttTransport(mosquitto.url, node, namespace=run_ns), broker=mosquitto
            )
        else:
            hub = InprocHub()
            cluster = _InprocCluster(scenario, hub_transport(scenario, hub), hub=hub)
        endpoint = Endpoint(
            ORCHESTRATOR,
            cluster.transport(ORCHESTRATOR),
            links=cluster.links[ORCHESTRATOR],
            capabilities=caps,
            heartbeat_s=HEARTBEAT_S,
            dead_after_s=DEAD_AFTER_S,
        )
    else:
        # Its own id per run: two runs on one namespace must not take each other's MQTT session.
        me = f"{ORCHESTRATOR}-{uuid.uuid4().hex[:8]}"
        endpoint = Endpoint(
            me,
            MqttTransport(broker, me, namespace=namespace),
            capabilities=caps,
            heartbeat_s=DAEMON_HEARTBEAT_S,
            dead_after_s=DAEMON_DEAD_AFTER_S,
        )
        cluster = _DaemonCluster(endpoint)
    return cluster, endpoint


async def _wait_for_nodes(
    endpoint: Endpoint, scenario: Scenario, wait_s: float, broker: str | None, namespace: str
) -> None:
    deadline = time.monotonic() + wait_s
    for node_id in scenario.nodes:
        try:
            await endpoint.wait_for_peer(
                node_id, timeout=max(0.0, deadline - time.monotonic()), announced=True
            )
        except DeadlineExceeded:
            if broker is None:
                raise
            spec = scenario.nodes[node_id]
            flags = [
                f"--id {node_id} --tier {spec.tier} --cores {spec.cores} --memory-mb {spec.memory_mb}",
                *(f"--label {k}={v}" for k, v in spec.labels.items()),
                f"--segment {spec.joined[0]}" if spec.joined != ["default"] else "",
                "--nat" if spec.nat else "",
                "--relay --broker <one per further segment>" if spec.relay else "",
            ]
            raise ScenarioError(
                f"node {node_id!r} of scenario {scenario.name!r} did not announce itself on {broker} "
                f"(namespace {namespace!r}) within {wait_s:g}s; start it there: flowloom node "
                f"{' '.join(f for f in flags if f)} --broker {broker} --namespace {namespace}"
            ) from None
    if any(spec.relay for spec in scenario.nodes.values()):
        # Relays report a link once they have heard it; a few heartbeats more, and the first tasks
        # take routes chosen by measured delay rather than by whichever relay spoke first.
        await asyncio.sleep(3 * (DAEMON_HEARTBEAT_S if broker else HEARTBEAT_S))


def _mismatches(endpoint: Endpoint, scenario: Scenario) -> list[str]:
    """How the daemons' announced capabilities differ from the scenario's nodes."""
    found = []
    for node_id in scenario.nodes:
        peer = endpoint.peers.get(node_id)
        caps = peer.capabilities if peer is not None else None
        if caps is None:
            continue
        want = capabilities_of(scenario, node_id)
        for name in ("tier", "cores", "memory_mb", "segment", "reachability", "relay", "labels", "models"):
            if getattr(caps, name) != getattr(want, name):
                found.append(
                    f"daemon {node_id} announces {name}={getattr(caps, name)!r}, the scenario says "
                    f"{getattr(want, name)!r}; placement follows the daemon"
                )
    return found


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.ndim == 0:  # a number that travelled as a tensor (e.g. numpy's sum)
            return value.item()
        return {"tensor": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _report(
    scenario: Scenario,
    graph: TaskGraph,
    *,
    orchestrator: Orchestrator,
    cluster: _InprocCluster | _DaemonCluster,
    faults: list[FaultRecord],
    wall: float,
) -> Report:
    counts = graph.counts()
    ran = Counter(graph.task(t).node for t in graph.graph.nodes if graph.task(t).state == "done")
    nodes = {
        node_id: NodeReport(
            tier=spec.tier,
            segment="+".join(spec.joined),
            tasks_run=ran.get(node_id, 0),
            alive=cluster.alive(node_id),
        )
        for node_id, spec in scenario.nodes.items()
    }
    sinks = [t for t in graph.graph.nodes if graph.graph.out_degree(t) == 0]
    shown = [*sinks, *(t.id for t in scenario.workload.tasks if t.report and t.id not in sinks)]
    outputs = {t: _jsonable(graph.task(t).result) for t in shown if graph.task(t).state == "done"}
    expected = scenario.expect
    checks: list[Expectation] = []
    if expected.all_done:
        not_done = [t for t in graph.graph.nodes if graph.task(t).state != "done"]
        checks.append(
            Expectation(
                name="every task done",
                ok=not not_done,
                detail=f"{counts['done']} of {len(graph)} done"
                + (f"; not done: {not_done[:5]}" if not_done else ""),
            )
        )
    if expected.min_reassigned:
        got = orchestrator.stats.reassigned
        checks.append(
            Expectation(
                name="tasks reassigned off a lost node",
                ok=got >= expected.min_reassigned,
                detail=f"{got} reassigned (expected at least {expected.min_reassigned})",
            )
        )
    for task_id, want in expected.outputs.items():
        state = graph.task(task_id).state if task_id in graph else "never added"
        if state != "done":  # a task that never finished has no output, not a null one
            checks.append(Expectation(name=f"output of {task_id}", ok=False, detail=f"task is {state}"))
            continue
        have = _jsonable(graph.task(task_id).result)
        checks.append(
            Expectation(name=f"output of {task_id}", ok=have == want, detail=f"{have!r} (expected {want!r})")
        )
        outputs.setdefault(task_id, have)
    stats = orchestrator.stats
    figures = {
        "wall_s": round(wall, 3),
        "tasks_per_s": round(counts["done"] / wall, 1) if wall else 0.0,
        "dispatched": stats.dispatched,
        "reassigned": stats.reassigned,
        "retries": stats.retries,
        "timeouts": stats.timeouts,
        "speculative": stats.speculative,
        "ignored_results": stats.ignored_results,
        "patches_applied": stats.patches_applied,
        "patches_rejected": stats.patches_rejected,
    }
    for task_id in graph.order():  # what executors measured, e.g. "chat.tokens_per_s"
        measured = graph.task(task_id).metrics
        figures.update({f"{task_id}.{name}": value for name, value in measured.items()})
    endpoints = [orchestrator.endpoint]
    if isinstance(cluster, _InprocCluster):
        endpoints += [node.endpoint for node in cluster.nodes.values() if not node.closed]
    relayed = [ep.stats for ep in endpoints]
    if any(s.relayed_received or s.forwarded for s in relayed):  # marked: what went through relays
        figures["relayed_envelopes"] = sum(s.relayed_received for s in relayed)
        figures["relayed_blobs"] = sum(s.relayed_blobs_received for s in relayed)
        figures["relay_forwarded"] = sum(s.forwarded for s in relayed)
    return Report(
        scenario=scenario.name,
        ok=all(c.ok for c in checks),
        wall_s=round(wall, 3),
        tasks=TaskCounts(
            total=len(graph),
            done=counts["done"],
            failed=counts["failed"] + counts["skipped"],
            cancelled=counts["cancelled"],
        ),
        nodes=nodes,
        faults=faults,
        expectations=checks,
        figures=figures,
        outputs=outputs,
        routes=_routes(endpoints, [orchestrator.endpoint.node_id, *scenario.nodes]),
    )


def _routes(endpoints: list[Endpoint], nodes: list[str]) -> dict[str, list[str]]:
    """The routes through relays from each of `endpoints` to each of `nodes` (for the report)."""
    routes: dict[str, list[str]] = {}
    for ep in endpoints:
        for dst in nodes:
            if dst == ep.node_id:
                continue
            try:
                path = ep.route(dst)
            except FabricError:  # unreachable at the end: no route to show
                continue
            if len(path) > 2:
                routes[f"{ep.node_id} -> {dst}"] = path
    return routes


def write_trace(events: list[JobEvent], path: str | Path) -> None:
    """Write a Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev): one track per node.

    Each task attempt is a span from its dispatch to its result (or its loss); faults, retries and
    reassignments are instant markers on the node they concern.
    """
    pids: dict[str, int] = {}
    out: list[dict[str, Any]] = []

    def pid(node: str | None) -> int:
        name = node or ORCHESTRATOR
        if name not in pids:
            pids[name] = len(pids) + 1
            out.append({"ph": "M", "name": "process_name", "pid": pids[name], "args": {"name": name}})
        return pids[name]

    open_spans: dict[tuple[str, int | None], JobEvent] = {}
    for event in events:
        us = event.t * 1e6
        if event.kind in ("dispatch", "speculate"):
            open_spans[(event.task, event.attempt)] = event
        elif event.kind == "done" or event.kind in ("reassign", "timeout"):
            start = open_spans.pop((event.task, event.attempt), None)
            if start is not None:
                out.append(
                    {
                        "ph": "X",
                        "name": event.task,
                        "cat": event.kind,
                        "pid": pid(start.node),
                        "tid": 1,
                        "ts": start.t * 1e6,
                        "dur": max(1.0, us - start.t * 1e6),
                        "args": {
                            "attempt": event.attempt,
                            "end": event.kind,
                            "speculative": start.kind == "speculate",
                            # relayed messages: "via edge-1" (out) and the way the result came back
                            **({"sent": start.detail} if start.detail else {}),
                            **({"returned": event.detail} if event.kind == "done" and event.detail else {}),
                        },
                    }
                )
        if event.kind not in ("dispatch", "done", "progress"):
            out.append(
                {
                    "ph": "i",
                    "s": "p",
                    "name": f"{event.kind} {event.task}",
                    "pid": pid(event.node),
                    "tid": 1,
                    "ts": us,
                    "args": {"detail": event.detail},
                }
            )
    Path(path).write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}))
