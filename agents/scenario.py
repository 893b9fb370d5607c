"""Scenario files: YAML validated by pydantic models, errors that name the file and field path.

Sections: `nodes`, `links` (emulated), `workload` (a DAG of tasks, or generated requests),
`faults` (at given times), `expect` (checked at the end; a failed check fails the run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import networkx as nx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agents.errors import PatchRejected, ScenarioError
from agents.graph import TaskGraph
from fabric import LinkSpec
from protocol import (
    AddTask,
    Envelope,
    GraphPatch,
    NodeId,
    Placement,
    ProtocolError,
    Resources,
    TaskId,
    TaskSpec,
    encode,
)

__all__ = [
    "ORCHESTRATOR",
    "Expectations",
    "Fault",
    "Generator",
    "Link",
    "NodeSpec",
    "Progress",
    "Scenario",
    "Workload",
    "WorkloadTask",
    "load_scenario",
]


ORCHESTRATOR = "orchestrator"
"""The orchestrator's node id on a scenario's fabric; no scenario node may take it."""


class _Strict(BaseModel):
    # strict: a value of the wrong type is an error, never converted ("4" is no int, true no 1)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


class NodeSpec(_Strict):
    """One node of the scenario."""

    tier: Literal["device", "edge", "cloud"]
    """Where the node sits."""
    cores: int = Field(default=1, ge=1)
    """CPU cores offered to tasks; the node runs at most this many tasks at once."""
    memory_mb: int = Field(default=1024, ge=0)
    """Memory offered to tasks, in MiB."""
    segment: str = "default"
    """Network segment (on MQTT: the broker). A node reaches the nodes of its segments, and public
    nodes; a node behind NAT in another segment only through a relay."""
    segments: list[str] = []
    """Every segment the node joins, when more than one (a relay's); replaces `segment`."""
    nat: bool = False
    """True when the node cannot be dialled from other segments."""
    relay: bool = False
    """True when the node forwards messages between the segments it joins."""
    labels: dict[str, str] = {}
    """Free labels for placement constraints."""
    models: list[str] = []
    """Models the node can load stages of (``smollm2-135m``, ``tiny-llama``, a directory)."""

    @model_validator(mode="after")
    def _one_way_to_name_segments(self) -> NodeSpec:
        if self.segments and self.segment != "default":
            raise ValueError("give `segment` or `segments`, not both")
        if len(set(self.segments)) != len(self.segments):
            raise ValueError(f"segments: {self.segments} names a segment twice")
        return self

    @property
    def joined(self) -> list[str]:
        """The segments the node joins, its own first."""
        return list(self.segments) or [self.segment]


class Link(_Strict):
    """An emulated directed link; `symmetric` adds the reverse direction with the same figures."""

    src: str
    """Sending node."""
    dst: str
    """Receiving node."""
    latency_ms: float = Field(default=0.0, ge=0)
    """One-way latency, in milliseconds."""
    bandwidth_mbps: float | None = Field(default=None, gt=0)
    """Bandwidth in Mbit/s; unset means unlimited."""
    loss: float = Field(default=0.0, ge=0, lt=1)
    """Share of messages lost."""
    symmetric: bool = True
    """Also emulate dst -> src with the same figures."""

    def spec(self) -> LinkSpec:
        """The fabric's emulation of this link (which also models its transfer time)."""
        return LinkSpec(latency_ms=self.latency_ms, bandwidth_mbps=self.bandwidth_mbps, loss=self.loss)


class WorkloadTask(_Strict):
    """One task of the workload's DAG."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    """Unique name of the task."""
    kind: str = Field(min_length=1, max_length=128)
    """Task kind: which executor runs it (echo, sum, sleep, fail, python, escalate, or a backend's)."""
    params: dict[str, Any] = {}
    """Parameters for the executor."""
    inputs: dict[str, str] = {}
    """Input name -> id of the upstream task whose result it is."""
    after: list[str] = []
    """Tasks that must be done first, without passing data."""
    tier: Literal["device", "edge", "cloud"] | None = None
    """Run only on a node of this tier."""
    node: str | None = None
    """Run only on this node."""
    labels: dict[str, str] = {}
    """Run only on nodes carrying all of these labels, with these values."""
    cores: float = Field(default=1.0, ge=0)
    """Cores the task needs: only nodes offering at least this many may run it (checked, not reserved)."""
    memory_mb: int = Field(default=0, ge=0)
    """Memory the task needs, in MiB: only nodes offering at least this much may run it (checked, not
    reserved)."""
    retries: int = Field(default=0, ge=0, le=100)
    """Extra attempts after a failure (a timeout is one)."""
    timeout_s: float | None = Field(default=None, gt=0)
    """Seconds an attempt may run before it is cancelled and counted as failed; unset means no limit."""
    report: bool = False
    """Also put the task's result in the report's outputs (tasks nothing depends on always are)."""


class Generator(_Strict):
    """Independent requests, beside or instead of a DAG: `count` tasks of one kind."""

    count: int = Field(ge=1, le=1_000_000)
    """How many requests; they are named `request-0`, `request-1`, and so on."""
    kind: str = Field(default="echo", min_length=1, max_length=128)
    """Task kind of each request."""
    params: dict[str, Any] = {}
    """Parameters of each request."""


class Workload(_Strict):
    """What the scenario runs: `tasks` (a DAG) and/or `generate` (independent requests)."""

    tasks: list[WorkloadTask] = []
    """The DAG's tasks."""
    generate: Generator | None = None
    """Independent requests added beside the DAG."""
    timeout_s: float = Field(default=300.0, gt=0)
    """Seconds after which every task that has not finished is cancelled."""


class Progress(_Strict):
    """A point in a running task's life: once it has streamed `count` progress reports."""

    task: str
    """The task watched."""
    count: int = Field(ge=1)
    """Progress reports it must have sent (e.g. tokens generated, for ``llm.generate``)."""


class Fault(_Strict):
    """A fault injected at a given time after the run starts, or at a point of a task's progress."""

    at_s: float = Field(default=0.0, ge=0)
    """When, in seconds from the start of the run (with `after`: not before then)."""
    after: Progress | None = None
    """Also wait until this task has streamed this many progress reports (e.g. kill a stage node
    after the 5th token). Faults are injected in the order of their `at_s`, each waiting for its
    own moment."""
    action: Literal["kill_node", "restart_node", "partition", "heal", "slow_node", "restart_broker"]
    """kill_node: the node dies (no goodbye); restart_node: it comes back; partition/heal: cut or
    restore the link between `node` and `peer` both ways; slow_node: the node runs `factor` times
    slower; restart_broker: the MQTT broker restarts (runs against a broker only)."""
    node: str | None = None
    """The node acted on; every action but restart_broker needs one."""
    peer: str | None = None
    """The other end, for partition and heal."""
    factor: float = Field(default=3.0, gt=1)
    """Slowdown factor, for slow_node."""


class Expectations(_Strict):
    """Checked at the end of the run; any that fails makes the run fail (exit code 1)."""

    all_done: bool = True
    """Every task of the job ends done; false drops this check."""
    min_reassigned: int = Field(default=0, ge=0)
    """At least this many tasks were moved off a node that died, left or handed them back; 0 drops this
    check."""
    outputs: dict[str, Any] = {}
    """Task id -> the result it must have (compared as JSON-like data)."""


class Scenario(_Strict):
    """A whole scenario file."""

    name: TaskId
    """Shown in progress displays and reports; also the job's id (letters, digits, '.', '_', ':', '-')."""
    description: str = ""
    """What the scenario shows, for people."""
    nodes: dict[NodeId, NodeSpec] = Field(min_length=1)
    """Node id (1-64 of letters, digits, '.', '_', '-'; not `orchestrator`) -> node."""
    links: list[Link] = []
    """Emulated links between nodes."""
    workload: Workload = Field(default_factory=Workload)
    """The tasks to run."""
    faults: list[Fault] = []
    """Faults to inject, by time."""
    expect: Expectations = Field(default_factory=Expectations)
    """What must hold at the end."""
    orchestrator: NodeId | None = None
    """The node the orchestrator runs beside, in-process: its messages take that node's links (and
    its partitions). Unset: the first cloud node, else the first node."""

    @model_validator(mode="after")
    def _names_refer_to_known_things(self) -> Scenario:
        def node(where: str, name: str | None) -> None:
            if name is not None and name not in self.nodes:
                raise ValueError(f"{where}: unknown node {name!r}; nodes are {sorted(self.nodes)}")

        if ORCHESTRATOR in self.nodes:
            raise ValueError(f"nodes: {ORCHESTRATOR!r} is the orchestrator's own id; name the node otherwise")
        node("orchestrator", self.orchestrator)
        for i, link in enumerate(self.links):
            node(f"links.{i}.src", link.src)
            node(f"links.{i}.dst", link.dst)
        ids = [t.id for t in self.workload.tasks]
        first: dict[str, int] = {}
        for i, task in enumerate(self.workload.tasks):
            if task.id in first:
                raise ValueError(
                    f"workload.tasks.{i}.id: task {task.id!r} is already workload.tasks.{first[task.id]}"
                )
            first[task.id] = i
            for field_name, refs in (("inputs", list(task.inputs.values())), ("after", task.after)):
                for ref in refs:
                    if ref not in ids:
                        raise ValueError(f"workload.tasks.{i}.{field_name}: unknown task {ref!r}")
            node(f"workload.tasks.{i}.node", task.node)
            if not any(_fits(task, name, spec) for name, spec in self.nodes.items()):
                raise ValueError(
                    f"workload.tasks.{i}: no node can run task {task.id!r} (its tier, node, labels, "
                    "cores and memory_mb together rule out every node)"
                )
        for i, fault in enumerate(self.faults):
            if fault.action != "restart_broker" and fault.node is None:
                raise ValueError(f"faults.{i}.node: {fault.action} needs a node")
            node(f"faults.{i}.node", fault.node)
            node(f"faults.{i}.peer", fault.peer)
            if fault.action in ("partition", "heal") and fault.peer is None:
                raise ValueError(f"faults.{i}.peer: {fault.action} needs a peer")
            if fault.after is not None and fault.after.task not in ids:
                raise ValueError(f"faults.{i}.after.task: unknown task {fault.after.task!r}")
        self._check_reachable()
        generated = self.workload.generate.count if self.workload.generate is not None else 0
        for task_id in self.expect.outputs:
            if task_id not in ids and not _is_request(task_id, generated):
                raise ValueError(f"expect.outputs: unknown task {task_id!r}")
        self.graph()  # the rest: a cycle, a generated id taken, params that cannot travel
        return self

    def _check_reachable(self) -> None:
        """Every node must reach the orchestrator's host and be reached by it, through relays if need be.

        A node reaches directly the nodes of its segments and public nodes; only relays pass
        messages on. Without this check such a run would wait for a node that can never answer.
        """
        host = self.orchestrator_host
        reach: nx.DiGraph[str] = nx.DiGraph()
        reach.add_nodes_from(self.nodes)
        for a, spec_a in self.nodes.items():
            for b, spec_b in self.nodes.items():
                if a != b and (not spec_b.nat or set(spec_a.joined) & set(spec_b.joined)):
                    reach.add_edge(a, b)
        for node in self.nodes:
            for src, dst in ((host, node), (node, host)):
                # Only relays pass messages on: every node on the way but the first must relay.
                ways = reach.edge_subgraph((a, b) for a, b in reach.edges if a == src or self.nodes[a].relay)
                if src != dst and not (dst in ways and nx.has_path(ways, src, dst)):
                    raise ValueError(
                        f"nodes.{node}: {src} cannot reach {dst}, which is behind NAT in segments "
                        f"{self.nodes[dst].joined}, and no relay (or chain of relays) joins a segment of "
                        f"{src}'s {self.nodes[src].joined} to one of {dst}'s; the orchestrator runs beside "
                        f"{host}. Add a node with `relay: true` and `segments:` naming both sides"
                    )

    def graph(self, job: str | None = None) -> TaskGraph:
        """The workload as a task graph of job `job` (default: the scenario's name).

        Raises `ValueError` naming the task's path when a task cannot be made into a wire
        `TaskSpec`, or when the tasks do not form a DAG.
        """
        specs: list[TaskSpec] = []
        paths: list[str] = []
        edges: list[tuple[str, str]] = []
        for i, task in enumerate(self.workload.tasks):
            specs.append(_spec(f"workload.tasks.{i}", task))
            paths.append(f"workload.tasks.{i}")
            edges.extend((before, task.id) for before in task.after)
        gen = self.workload.generate
        if gen is not None:
            request = WorkloadTask(id="request-0", kind=gen.kind, params=gen.params)
            template = _spec("workload.generate", request)
            specs.extend(template.model_copy(update={"id": f"request-{n}"}) for n in range(gen.count))
            paths.extend(f"workload.generate (request-{n})" for n in range(gen.count))
        try:
            return TaskGraph(job or self.name, specs, edges)
        except PatchRejected as exc:
            where = paths[exc.index] if exc.index < len(paths) else "workload.tasks (after)"
            raise ValueError(f"{where}: {exc.why}") from None

    @property
    def orchestrator_host(self) -> str:
        """The node the orchestrator runs beside (`orchestrator`, or its default)."""
        if self.orchestrator is not None:
            return self.orchestrator
        return next((n for n, spec in self.nodes.items() if spec.tier == "cloud"), next(iter(self.nodes)))

    def link(self, src: str, dst: str) -> Link | None:
        """The link from `src` to `dst`, if the scenario emulates one.

        `ORCHESTRATOR` stands for the node it runs beside (and has no link to that node).
        """
        host = self.orchestrator_host
        src, dst = (host if n == ORCHESTRATOR else n for n in (src, dst))
        for link in self.links:
            if (link.src, link.dst) == (src, dst) or (link.symmetric and (link.dst, link.src) == (src, dst)):
                return link
        return None


def _fits(task: WorkloadTask, name: str, node: NodeSpec) -> bool:
    """Whether `node` meets `task`'s placement constraints and resource needs."""
    return (
        (task.tier is None or task.tier == node.tier)
        and (task.node is None or task.node == name)
        and all(node.labels.get(k) == v for k, v in task.labels.items())
        and task.cores <= node.cores
        and task.memory_mb <= node.memory_mb
    )


def _is_request(task_id: str, count: int) -> bool:
    number = task_id.removeprefix("request-")
    return number != task_id and number.isdigit() and str(int(number)) == number and int(number) < count


def _spec(path: str, task: WorkloadTask) -> TaskSpec:
    """The wire spec of `task`; `ValueError` naming `path` and the field when it cannot be one."""
    try:
        spec = TaskSpec(
            id=task.id,
            kind=task.kind,
            params=task.params,
            inputs=task.inputs,
            needs=Resources(cores=task.cores, memory_mb=task.memory_mb),
            placement=Placement(tier=task.tier, node=task.node, labels=task.labels),
            retries=task.retries,
            timeout_s=task.timeout_s,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{path}.{loc}: {err['msg'].removeprefix('Value error, ')}") from None
    try:  # what the models accept may still not encode (an integer beyond 64 bits)
        encode(Envelope.new(src="scenario", dst="*", body=GraphPatch(job="check", ops=[AddTask(task=spec)])))
    except ProtocolError as exc:
        raise ValueError(f"{path}.params: {exc}") from None
    return spec


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; raise `ScenarioError` naming the file and field path."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{path}{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ScenarioError(
            f"{path}: a scenario is a mapping with 'name' and 'nodes', got {type(data).__name__}"
        )
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {loc + ': ' if loc else ''}{msg}")
        raise ScenarioError("\n".join(lines)) from None
