"""The task graph of one job: a networkx DAG of tasks with states, edited by atomic patches.

States: pending (waits for upstream) -> ready -> running -> done | failed | cancelled; a task
whose upstream failed, was cancelled or skipped becomes skipped. Edge u -> v: v waits for u; the
edges come from each task's `inputs` (data) and from explicit ordering (`after`).

Patches (`apply`) are all or nothing: the ops are applied in order to a copy, and a patch that
breaks an invariant raises `PatchRejected` naming the op and the reason, leaving the graph as it
was. Invariants: the graph stays acyclic; running and finished tasks are never edited; a task
another task takes input from cannot be removed, nor that data edge.

Completing a task costs O(its out-degree): each task keeps the count of upstream tasks not done.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import networkx as nx
from pydantic import ValidationError

from agents.errors import PatchRejected
from protocol import AddEdge, AddTask, PatchOp, RemoveEdge, RemoveTask, TaskSpec, UpdateTask

__all__ = ["FINISHED", "Task", "TaskGraph", "TaskState"]

TaskState = Literal["pending", "ready", "running", "done", "failed", "cancelled", "skipped"]
FINISHED: frozenset[str] = frozenset({"done", "failed", "cancelled", "skipped"})
_STATES: tuple[TaskState, ...] = ("pending", "ready", "running", "done", "failed", "cancelled", "skipped")


@dataclass
class Task:
    """One task of the graph and what happened to it."""

    spec: TaskSpec
    state: TaskState = "pending"
    attempts: int = 0
    result: Any = None
    error: str | None = None
    node: str | None = None


class TaskGraph:
    """The mutable DAG of one job (see the module docstring)."""

    def __init__(
        self, job: str, tasks: Iterable[TaskSpec] = (), edges: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.job = job
        self.graph: nx.DiGraph[str] = nx.DiGraph()
        self._waiting: dict[str, int] = {}  # task -> upstream tasks not done
        self._ready: dict[str, None] = {}  # insertion-ordered set
        ops: list[PatchOp] = [AddTask(task=spec) for spec in tasks]
        ops += [AddEdge(src=src, dst=dst) for src, dst in edges]
        if ops:
            self.apply(ops)

    # reading ---------------------------------------------------------------------------------

    def task(self, task_id: str) -> Task:
        try:
            task: Task = self.graph.nodes[task_id]["task"]
        except KeyError:
            raise KeyError(f"job {self.job!r} has no task {task_id!r}") from None
        return task

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.graph

    def __len__(self) -> int:
        return len(self.graph)

    def ready(self) -> list[str]:
        """Tasks ready to run, oldest first."""
        return list(self._ready)

    def inputs_of(self, task_id: str) -> dict[str, Any]:
        """Input name -> the result of the upstream task it names."""
        return {name: self.task(up).result for name, up in self.task(task_id).spec.inputs.items()}

    def finished(self) -> bool:
        return all(self.graph.nodes[t]["task"].state in FINISHED for t in self.graph)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(_STATES, 0)
        for t in self.graph:
            counts[self.graph.nodes[t]["task"].state] += 1
        return counts

    def order(self) -> list[str]:
        """A topological order of the tasks."""
        return list(nx.topological_sort(self.graph))

    # state changes ---------------------------------------------------------------------------

    def _expect(self, task_id: str, *states: str) -> Task:
        task = self.task(task_id)
        if task.state not in states:
            raise ValueError(f"task {task_id!r} is {task.state}, not {' or '.join(states)}")
        return task

    def mark_running(self, task_id: str, node: str) -> None:
        task = self._expect(task_id, "ready")
        task.state, task.node = "running", node
        task.attempts += 1
        self._ready.pop(task_id, None)

    def mark_done(self, task_id: str, result: Any) -> list[str]:
        """Running -> done; return the tasks that became ready."""
        task = self._expect(task_id, "running")
        task.state, task.result = "done", result
        became: list[str] = []
        for down in self.graph.successors(task_id):
            self._waiting[down] -= 1
            if self._waiting[down] == 0 and self.task(down).state == "pending":
                self.task(down).state = "ready"
                self._ready[down] = None
                became.append(down)
        return became

    def mark_failed(self, task_id: str, error: str) -> list[str]:
        """The task failed for good; everything downstream is skipped (returned)."""
        task = self._expect(task_id, "running", "ready", "pending")
        task.state, task.error = "failed", error
        self._ready.pop(task_id, None)
        return self._skip_downstream(task_id)

    def mark_cancelled(self, task_id: str, reason: str) -> list[str]:
        """Cancel a task that has not finished; everything downstream is skipped (returned)."""
        task = self._expect(task_id, "running", "ready", "pending")
        task.state, task.error = "cancelled", reason
        self._ready.pop(task_id, None)
        return self._skip_downstream(task_id)

    def reset(self, task_id: str) -> None:
        """Running -> ready again (retry, reassignment); attempts are kept."""
        task = self._expect(task_id, "running")
        task.state, task.node = "ready", None
        self._ready[task_id] = None

    def _skip_downstream(self, task_id: str) -> list[str]:
        skipped = []
        for down in nx.descendants(self.graph, task_id):
            task = self.task(down)
            if task.state not in FINISHED and task.state != "running":
                task.state = "skipped"
                self._ready.pop(down, None)
                skipped.append(down)
        return skipped

    # patches ---------------------------------------------------------------------------------

    def apply(self, ops: Sequence[PatchOp]) -> None:
        """Apply `ops` atomically; `PatchRejected` (graph unchanged) when one breaks an invariant."""
        work = (
            self.graph.copy()
        )  # node attribute dicts are copied, Task objects shared: replace, never mutate
        touched: set[str] = set()
        for index, op in enumerate(ops):
            why = self._apply_one(work, op, touched)
            if why is not None:
                raise PatchRejected(index, op, why)
        self.graph = work
        self._recompute(touched)

    def _apply_one(self, work: nx.DiGraph[str], op: PatchOp, touched: set[str]) -> str | None:
        def editable(task_id: str) -> str | None:
            if task_id not in work:
                return f"no task {task_id!r}"
            state = work.nodes[task_id]["task"].state
            if state == "running" or state in FINISHED:
                return f"task {task_id!r} is {state}; running and finished tasks cannot be edited"
            return None

        if isinstance(op, AddTask):
            spec = op.task
            if spec.id in work:
                return f"task {spec.id!r} already exists"
            for ref in [*spec.inputs.values(), *op.after]:
                if ref not in work:
                    return f"task {spec.id!r} refers to unknown task {ref!r}"
            work.add_node(spec.id, task=Task(spec))
            for ref in [*spec.inputs.values(), *op.after]:
                work.add_edge(ref, spec.id)
            touched.add(spec.id)
        elif isinstance(op, RemoveTask):
            if (why := editable(op.task)) is not None:
                return why
            for down in work.successors(op.task):
                if op.task in work.nodes[down]["task"].spec.inputs.values():
                    return f"task {down!r} takes input from {op.task!r}"
            touched.update(work.successors(op.task))
            work.remove_node(op.task)
            touched.discard(op.task)
        elif isinstance(op, AddEdge):
            if op.src not in work:
                return f"no task {op.src!r}"
            if (why := editable(op.dst)) is not None:
                return why
            # Only a new edge can close a cycle (a new task has no outgoing edges): look for a path back.
            if op.src == op.dst or nx.has_path(work, op.dst, op.src):
                path = [op.src] if op.src == op.dst else nx.shortest_path(work, op.dst, op.src)
                return f"it would make a cycle: {' -> '.join([*path, path[0]])}"
            work.add_edge(op.src, op.dst)
            touched.add(op.dst)
        elif isinstance(op, RemoveEdge):
            if not work.has_edge(op.src, op.dst):
                return f"no edge {op.src!r} -> {op.dst!r}"
            if (why := editable(op.dst)) is not None:
                return why
            if op.src in work.nodes[op.dst]["task"].spec.inputs.values():
                return f"{op.dst!r} takes input from {op.src!r}; remove that input instead"
            work.remove_edge(op.src, op.dst)
            touched.add(op.dst)
        elif isinstance(op, UpdateTask):
            if (why := editable(op.task)) is not None:
                return why
            old: Task = work.nodes[op.task]["task"]
            fields = old.spec.model_dump()
            if op.params is not None:
                fields["params"] = {**old.spec.params, **op.params}
            for name in ("placement", "retries", "timeout_s"):
                value = getattr(op, name)
                if value is not None:
                    fields[name] = value.model_dump() if name == "placement" else value
            try:
                spec = TaskSpec.model_validate(fields)
            except ValidationError as exc:
                return f"task {op.task!r}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
            work.nodes[op.task]["task"] = replace(copy.copy(old), spec=spec)
        return None

    def _recompute(self, touched: set[str]) -> None:
        """Re-derive waiting counts and states of the tasks a patch touched (and their downstream)."""
        for task_id in list(self._ready):
            if task_id not in self.graph:
                del self._ready[task_id]
        for task_id in nx.topological_sort(self.graph.subgraph(self._closure(touched))):
            task: Task = self.graph.nodes[task_id]["task"]
            ups = [self.graph.nodes[u]["task"].state for u in self.graph.predecessors(task_id)]
            self._waiting[task_id] = sum(1 for s in ups if s != "done")
            if task.state == "running" or task.state in FINISHED:
                continue
            if any(s in ("failed", "cancelled", "skipped") for s in ups):
                task.state = "skipped"
                self._ready.pop(task_id, None)
            elif self._waiting[task_id] == 0:
                task.state = "ready"
                self._ready.setdefault(task_id, None)
            else:
                task.state = "pending"
                self._ready.pop(task_id, None)
        for task_id in list(self._waiting):
            if task_id not in self.graph:
                del self._waiting[task_id]

    def _closure(self, touched: set[str]) -> set[str]:
        if len(touched) * 4 >= len(self.graph):
            return set(self.graph)
        closure = set(touched)
        for task_id in touched:
            closure |= nx.descendants(self.graph, task_id)
        return closure
