"""The task graph of one job: a networkx DAG of tasks with states, edited by atomic patches.

A task is ``pending`` while some upstream task is not done and ``ready`` once all are; the
orchestrator then marks it ``running`` and finally ``done``, ``failed`` or ``cancelled``. A task
that can never run, because an upstream task failed, was cancelled or was skipped, is
``skipped``. Edge ``u -> v`` means v waits for u. Edges come from each task's `inputs` (data:
v receives u's result) and from explicit ordering (`AddTask.after`, the `edges` of the graph).

>>> from protocol import TaskSpec
>>> g = TaskGraph("job", [TaskSpec(id="a", kind="echo"), TaskSpec(id="b", kind="sum", inputs={"x": "a"})])
>>> g.ready()
['a']
>>> g.mark_running("a", node="edge-1")
>>> g.mark_done("a", 41)
['b']
>>> g.inputs_of("b")
{'x': 41}

Patches (`TaskGraph.apply`) are all or nothing: the ops are checked in order against a draft,
and a patch that breaks an invariant raises `PatchRejected` naming the op and the reason,
leaving the graph exactly as it was. Invariants: the graph stays acyclic; running and finished
tasks are never edited; a task that another task takes input from cannot be removed, nor can
that data edge.

Costs: `mark_running`, `mark_done` and `reset` are O(the task's degree), because each task keeps
the count of its upstream tasks not yet done and the ready tasks are kept in an ordered set;
`finished` and `counts` are O(1). A patch costs what it touches, plus one reachability search
per added edge; the graph is never copied.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import networkx as nx
from pydantic import ValidationError

from agents.errors import PatchRejected
from protocol import AddEdge, AddTask, PatchOp, RemoveEdge, RemoveTask, TaskSpec, UpdateTask

__all__ = ["FINISHED", "Task", "TaskGraph", "TaskState"]

TaskState = Literal["pending", "ready", "running", "done", "failed", "cancelled", "skipped"]
FINISHED: frozenset[str] = frozenset({"done", "failed", "cancelled", "skipped"})
"""States a task never leaves."""

_STATES: tuple[TaskState, ...] = get_args(TaskState)
_FROZEN = FINISHED | {"running"}  # patches may not edit tasks in these states
_BLOCKING = frozenset({"failed", "cancelled", "skipped"})  # an upstream task in one: never runs
_OPEN = ("pending", "ready", "running")  # states mark_failed and mark_cancelled accept


@dataclass
class Task:
    """One task of the graph and what has happened to it; change it through `TaskGraph` only."""

    spec: TaskSpec
    """What to run."""
    state: TaskState = "pending"
    """Where the task is in its life (see the module docstring)."""
    attempts: int = 0
    """Dispatches so far; `TaskGraph.mark_running` counts them."""
    result: Any = None
    """The value of the attempt that completed the task."""
    error: str | None = None
    """Why the task failed or was cancelled."""
    node: str | None = None
    """The node the task runs or ran on."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Figures the executor measured in the accepted attempt (besides ``compute_s``)."""


def _cycle(path: Sequence[str]) -> str:
    """The reason for a patch that closes the cycle `path` (back to its start); long ones elided."""
    shown = [*path, path[0]]
    if len(shown) > 12:
        shown = [*shown[:5], f"... ({len(shown) - 10} more)", *shown[-5:]]
    return "it would make a cycle: " + " -> ".join(shown)


class TaskGraph:
    """The mutable task DAG of one job.

    `graph` maps each task id to a node whose attribute ``"task"`` is its `Task`; read it freely,
    change it through the methods only, which keep the counters that make them cheap.

    Built from specs in any order plus explicit ``(upstream, downstream)`` edges; the build
    checks what a patch would (an unknown task, a duplicate id, a cycle) and raises
    `PatchRejected` with the index of the offending spec (edges count after the specs)::

        graph = TaskGraph("job", [spec_a, spec_b], edges=[("a", "b")])
        for task_id in graph.ready():
            graph.mark_running(task_id, node="edge-1")
    """

    def __init__(
        self, job: str, tasks: Iterable[TaskSpec] = (), edges: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.job = job
        self.graph: nx.DiGraph[str] = nx.DiGraph()
        self._waiting: dict[str, int] = {}  # task -> upstream tasks not done
        self._ready: dict[str, None] = {}  # an ordered set: tasks in the order they became ready
        self._counts: dict[str, int] = dict.fromkeys(_STATES, 0)
        self._build(list(tasks), list(edges))

    def _build(self, specs: list[TaskSpec], edges: list[tuple[str, str]]) -> None:
        # Specs may name tasks that come later, so all nodes go in first and the cycle check runs
        # once at the end: O(tasks + edges), where one AddTask op per spec could not forward-reference.
        graph = self.graph

        def op_at(index: int) -> PatchOp:
            if index < len(specs):
                return AddTask(task=specs[index])
            src, dst = edges[index - len(specs)]
            return AddEdge.model_construct(src=src, dst=dst)  # as given, even if it is no valid id

        tasks: dict[str, Task] = {}
        for index, spec in enumerate(specs):
            if spec.id in tasks:
                raise PatchRejected(index, op_at(index), f"task {spec.id} already exists")
            tasks[spec.id] = Task(spec)
        made: dict[tuple[str, str], int] = {}  # edge -> index of the first spec or edge making it
        for index, spec in enumerate(specs):
            for name, up in spec.inputs.items():
                if up not in tasks:
                    why = f"task {spec.id} takes input {name} from unknown task {up}"
                    raise PatchRejected(index, op_at(index), why)
                made.setdefault((up, spec.id), index)
        for index, (src, dst) in enumerate(edges, start=len(specs)):
            for end in (src, dst):
                if end not in tasks:
                    raise PatchRejected(index, op_at(index), f"no task {end}")
            made.setdefault((src, dst), index)
        # In bulk: networkx's add_edge pays a cache reset per call.
        graph.add_nodes_from((task_id, {"task": task}) for task_id, task in tasks.items())
        graph.add_edges_from(made)
        if not nx.is_directed_acyclic_graph(graph):
            cycle = [(u, v) for u, v, *_ in nx.find_cycle(graph)]
            index = max(made[edge] for edge in cycle)  # the spec or edge that closes the cycle
            raise PatchRejected(index, op_at(index), _cycle([u for u, _ in cycle]))
        for task_id in graph:
            self._waiting[task_id] = waiting = graph.in_degree(task_id)
            if waiting == 0:
                self.task(task_id).state = "ready"
                self._ready[task_id] = None
        self._counts["ready"] = len(self._ready)
        self._counts["pending"] = len(graph) - len(self._ready)

    # reading ---------------------------------------------------------------------------------

    def task(self, task_id: str) -> Task:
        """The task `task_id`; KeyError naming the job when it has no such task."""
        try:
            task: Task = self.graph.nodes[task_id]["task"]
        except KeyError:
            raise KeyError(f"job {self.job} has no task {task_id!r}") from None
        return task

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.graph

    def __len__(self) -> int:
        return len(self.graph)

    def ready(self) -> list[str]:
        """Ids of the tasks in state ``ready``, in the order they became ready."""
        return list(self._ready)

    def inputs_of(self, task_id: str) -> dict[str, Any]:
        """Input name -> the result of the upstream task it names."""
        return {name: self.task(up).result for name, up in self.task(task_id).spec.inputs.items()}

    def finished(self) -> bool:
        """True when every task is done, failed, cancelled or skipped."""
        return sum(self._counts[state] for state in FINISHED) == len(self.graph)

    def counts(self) -> dict[str, int]:
        """Number of tasks per state; every state is a key."""
        return dict(self._counts)

    def order(self) -> list[str]:
        """The task ids in a topological order (upstream first)."""
        return list(nx.topological_sort(self.graph))

    # state changes ---------------------------------------------------------------------------

    def _move(self, task_id: str, task: Task, state: TaskState) -> None:
        if task.state == state:
            return  # keeps a ready task's place in the ready order
        self._counts[task.state] -= 1
        self._counts[state] += 1
        task.state = state
        if state == "ready":
            self._ready[task_id] = None
        else:
            self._ready.pop(task_id, None)

    def _expect(self, task_id: str, target: str, allowed: Sequence[str]) -> Task:
        task = self.task(task_id)
        if task.state not in allowed:
            raise ValueError(
                f"cannot mark task {task_id} {target}: it is {task.state}, not {' or '.join(allowed)}"
            )
        return task

    def mark_running(self, task_id: str, node: str) -> None:
        """Ready -> running on `node`; counts one more attempt. ValueError in any other state."""
        task = self._expect(task_id, "running", ("ready",))
        self._move(task_id, task, "running")
        task.attempts += 1
        task.node = node

    def mark_done(self, task_id: str, result: Any) -> list[str]:
        """Running -> done with `result`; return the tasks that became ready, in edge order.

        ValueError in any other state, a task already done included: a result is accepted once.
        """
        task = self._expect(task_id, "done", ("running",))
        task.result = result
        self._move(task_id, task, "done")
        became: list[str] = []
        for down in self.graph.successors(task_id):
            self._waiting[down] -= 1
            if self._waiting[down] == 0:
                after = self.task(down)
                if after.state == "pending":  # a skipped task stays skipped
                    self._move(down, after, "ready")
                    became.append(down)
        return became

    def mark_failed(self, task_id: str, error: str) -> list[str]:
        """A pending, ready or running task failed for good; skip what waits on it (returned)."""
        task = self._expect(task_id, "failed", _OPEN)
        task.error = error
        self._move(task_id, task, "failed")
        return self._skip_downstream(task_id)

    def mark_cancelled(self, task_id: str, reason: str) -> list[str]:
        """Cancel a task that has not finished; skip what waits on it (returned)."""
        task = self._expect(task_id, "cancelled", _OPEN)
        task.error = reason
        self._move(task_id, task, "cancelled")
        return self._skip_downstream(task_id)

    def reset(self, task_id: str) -> None:
        """Running -> ready again, at the back of the ready order, for a retry or a reassignment.

        The node is cleared; attempts are kept.
        """
        task = self._expect(task_id, "ready", ("running",))
        task.node = None
        self._move(task_id, task, "ready")

    def _skip_downstream(self, task_id: str) -> list[str]:
        """Skip the pending and ready tasks downstream of `task_id`, nearest first; return them."""
        skipped: list[str] = []
        queue = deque(self.graph.successors(task_id))
        while queue:
            down = queue.popleft()
            task = self.task(down)
            # Whatever is already finished has had its own downstream skipped (a done task cannot
            # sit below an unfinished one), so the walk stops there and each task is walked once.
            if task.state in ("pending", "ready"):
                self._move(down, task, "skipped")
                skipped.append(down)
                queue.extend(self.graph.successors(down))
        return skipped

    # patches ---------------------------------------------------------------------------------

    def apply(self, ops: Sequence[PatchOp]) -> None:
        """Apply `ops` in order, as one unit.

        When an op breaks an invariant (see the module docstring) `PatchRejected` names its index,
        the op and the reason, and the graph is exactly as before. Otherwise the states of tasks
        that are neither running nor finished are re-derived from their upstream tasks: a task
        added after done tasks is ready at once, one added after a failed task is skipped.
        """
        draft = _Draft(self.graph)
        for index, op in enumerate(ops):
            why = draft.edit(op)
            if why is not None:
                raise PatchRejected(index, op, why)
        self._commit(draft)

    def _commit(self, draft: _Draft) -> None:
        graph = self.graph
        for task_id in draft.removed:
            old = self.task(task_id)
            self._counts[old.state] -= 1
            self._ready.pop(task_id, None)
            self._waiting.pop(task_id, None)
        for src, dst in draft.gone_edges:
            graph.remove_edge(src, dst)
        for task_id in draft.removed:
            if task_id not in draft.added:  # a removed id added again keeps its node, with a new Task
                graph.remove_node(task_id)
        for task_id, task in draft.added.items():
            graph.add_node(task_id, task=task)
            self._counts[task.state] += 1
        graph.add_edges_from(draft.new_edges)
        for task_id, spec in draft.specs.items():
            self.task(task_id).spec = spec
        for task_id in draft.touched:
            self._settle(task_id)

    def _settle(self, task_id: str) -> None:
        """Re-derive the upstream count and (unless running or finished) the state of a task."""
        task = self.task(task_id)
        ups = [self.task(up).state for up in self.graph.predecessors(task_id)]
        self._waiting[task_id] = waiting = sum(state != "done" for state in ups)
        if task.state in _FROZEN:
            return
        if any(state in _BLOCKING for state in ups):
            self._move(task_id, task, "skipped")
            self._skip_downstream(task_id)
        else:
            self._move(task_id, task, "ready" if waiting == 0 else "pending")


class _Draft:
    """A patch being checked: the live graph as the ops so far would leave it, without changing it.

    Reads see the live graph through the recorded changes; `TaskGraph._commit` writes them. A
    copy of the graph would be simpler but costs tens of ms at 10,000 tasks, and undoing edits
    on the live graph could not restore its iteration order, which fixes the ready order.
    """

    def __init__(self, live: nx.DiGraph[str]) -> None:
        self.live = live
        self.added: dict[str, Task] = {}  # new tasks, in op order; an id removed earlier included
        self.removed: dict[str, None] = {}  # live tasks removed
        self.specs: dict[str, TaskSpec] = {}  # new specs of live tasks
        self.new_edges: dict[tuple[str, str], None] = {}
        self.gone_edges: dict[tuple[str, str], None] = {}  # live edges removed
        self.new_succ: dict[str, dict[str, None]] = {}
        self.new_pred: dict[str, dict[str, None]] = {}
        self.touched: dict[str, None] = {}  # tasks whose upstream changed, to settle after commit

    # reading the draft

    def has(self, task_id: str) -> bool:
        return task_id in self.added or (task_id in self.live and task_id not in self.removed)

    def state(self, task_id: str) -> str:
        if task_id in self.added:
            return "pending"
        state: str = self.live.nodes[task_id]["task"].state
        return state

    def spec(self, task_id: str) -> TaskSpec:
        if task_id in self.added:
            return self.added[task_id].spec
        spec: TaskSpec = self.specs.get(task_id) or self.live.nodes[task_id]["task"].spec
        return spec

    def successors(self, task_id: str) -> list[str]:
        # A removed (or removed and re-added) id's live edges are all in gone_edges.
        out: list[str] = []
        if task_id in self.live:
            out = [down for down in self.live.successors(task_id) if (task_id, down) not in self.gone_edges]
        out.extend(self.new_succ.get(task_id, ()))
        return out

    def predecessors(self, task_id: str) -> list[str]:
        out: list[str] = []
        if task_id in self.live:
            out = [up for up in self.live.predecessors(task_id) if (up, task_id) not in self.gone_edges]
        out.extend(self.new_pred.get(task_id, ()))
        return out

    def has_edge(self, src: str, dst: str) -> bool:
        edge = (src, dst)
        return edge in self.new_edges or (self.live.has_edge(src, dst) and edge not in self.gone_edges)

    def path(self, src: str, dst: str) -> list[str] | None:
        """A path src -> ... -> dst, or None.

        Searches forward from src and backward from dst in turn and stops when either side runs
        out, so it costs about twice the smaller side: an edge from a new task, whose upstream is
        small, is checked quickly even at the top of a long chain.
        """
        if src == dst:
            return [src]
        ahead: dict[str, str] = {src: src}  # reached from src -> the node it was reached from
        behind: dict[str, str] = {dst: dst}  # reaches dst -> the node it leads to
        forward, backward = deque([src]), deque([dst])
        meet: str | None = None
        while forward and backward and meet is None:
            here = forward.popleft()
            for down in self.successors(here):
                if down not in ahead:
                    ahead[down] = here
                    if down in behind:
                        meet = down
                        break
                    forward.append(down)
            if meet is not None:
                break
            here = backward.popleft()
            for up in self.predecessors(here):
                if up not in behind:
                    behind[up] = here
                    if up in ahead:
                        meet = up
                        break
                    backward.append(up)
        if meet is None:
            return None
        path = [meet]
        while path[-1] != src:
            path.append(ahead[path[-1]])
        path.reverse()
        while path[-1] != dst:
            path.append(behind[path[-1]])
        return path

    # recording changes

    def add_edge(self, src: str, dst: str) -> None:
        if self.has_edge(src, dst):
            return
        self.touched[dst] = None
        if (src, dst) in self.gone_edges:
            del self.gone_edges[src, dst]
            return
        self.new_edges[src, dst] = None
        self.new_succ.setdefault(src, {})[dst] = None
        self.new_pred.setdefault(dst, {})[src] = None

    def remove_edge(self, src: str, dst: str) -> None:
        self.touched[dst] = None
        if (src, dst) in self.new_edges:
            del self.new_edges[src, dst]
            del self.new_succ[src][dst]
            del self.new_pred[dst][src]
        else:
            self.gone_edges[src, dst] = None

    def remove_task(self, task_id: str) -> None:
        for down in self.successors(task_id):
            self.remove_edge(task_id, down)
        for up in self.predecessors(task_id):
            self.remove_edge(up, task_id)
        self.added.pop(task_id, None)
        if task_id in self.live:
            self.removed[task_id] = None
            self.specs.pop(task_id, None)
        self.touched.pop(task_id, None)

    # the op rules

    def frozen(self, task_id: str) -> str | None:
        """Why `task_id` cannot be edited, or None."""
        if not self.has(task_id):
            return f"no task {task_id}"
        state = self.state(task_id)
        if state in _FROZEN:
            return f"task {task_id} is {state}; running and finished tasks cannot be edited"
        return None

    def edit(self, op: PatchOp) -> str | None:
        """Record `op`; return why it breaks an invariant instead (then nothing is recorded)."""
        if isinstance(op, AddTask):
            spec = op.task
            if self.has(spec.id):
                return f"task {spec.id} already exists"
            for name, up in spec.inputs.items():
                if not self.has(up):
                    return f"task {spec.id} takes input {name} from unknown task {up}"
            for up in op.after:
                if not self.has(up):
                    return f"task {spec.id} waits for unknown task {up}"
            # A new task has no downstream, so its edges cannot close a cycle.
            self.added[spec.id] = Task(spec)
            self.touched[spec.id] = None
            for up in [*spec.inputs.values(), *op.after]:
                self.add_edge(up, spec.id)
            return None
        if isinstance(op, RemoveTask):
            if (why := self.frozen(op.task)) is not None:
                return why
            for down in self.successors(op.task):
                for name, up in self.spec(down).inputs.items():
                    if up == op.task:
                        return f"task {down} takes input {name} from {op.task}"
            self.remove_task(op.task)
            return None
        if isinstance(op, AddEdge):
            if not self.has(op.src):
                return f"no task {op.src}"
            if (why := self.frozen(op.dst)) is not None:
                return why
            path = self.path(op.dst, op.src)
            if path is not None:
                return _cycle(path)
            self.add_edge(op.src, op.dst)
            return None
        if isinstance(op, RemoveEdge):
            if not (self.has(op.src) and self.has(op.dst) and self.has_edge(op.src, op.dst)):
                return f"no edge {op.src} -> {op.dst}"
            if (why := self.frozen(op.dst)) is not None:
                return why
            for name, up in self.spec(op.dst).inputs.items():
                if up == op.src:
                    return f"task {op.dst} takes input {name} from {op.src}; that edge cannot be removed"
            self.remove_edge(op.src, op.dst)
            return None
        if isinstance(op, UpdateTask):
            if (why := self.frozen(op.task)) is not None:
                return why
            return self.update(op)
        return f"unknown op {type(op).__name__}"

    def update(self, op: UpdateTask) -> str | None:
        old = self.spec(op.task)
        changes: dict[str, Any] = {}
        if op.params is not None:
            changes["params"] = {**old.params, **op.params}
        for name in ("placement", "retries", "timeout_s"):
            value = getattr(op, name)
            if value is not None:
                changes[name] = value
        try:
            # model_copy does not validate; validating its fields rejects an op built unchecked.
            spec = TaskSpec.model_validate(dict(old.model_copy(update=changes)))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            return f"task {op.task}: {where}: {first['msg']}"
        if op.task in self.added:
            self.added[op.task].spec = spec  # the draft's own Task, not shared with the graph
        else:
            self.specs[op.task] = spec
        return None
