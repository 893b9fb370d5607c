"""Executors: the code that runs a task of a given kind, found by kind through a registry.

An executor is an async callable taking a `TaskContext` and returning the task's value (anything
that can travel on the wire), or an `Expand` to also patch the job's graph. Executors are found
by task kind: first those registered in code, then the ``flowloom.executors`` entry points of
installed packages, loaded on first use. That is how backends plug in without the agents layer
importing them::

    [project.entry-points."flowloom.executors"]
    "llm.stage" = "backends.torch_split:run_stage"
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.errors import UnknownTaskKind
from protocol import PatchOp

__all__ = ["ENTRY_POINT_GROUP", "Executor", "ExecutorRegistry", "Expand", "TaskContext"]

ENTRY_POINT_GROUP = "flowloom.executors"

ProgressSink = Callable[[float | None, str, Any], Awaitable[None]]


async def _no_progress(fraction: float | None, message: str, data: Any) -> None:
    return None


@dataclass
class TaskContext:
    """What an executor gets: the task, its parameters and its inputs (upstream results by name)."""

    job: str
    task: str
    attempt: int
    kind: str
    node: str
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    _progress: ProgressSink = _no_progress

    async def progress(self, fraction: float | None = None, message: str = "", data: Any = None) -> None:
        """Stream a progress report to whoever assigned the task (a fraction in [0, 1], text, data)."""
        await self._progress(fraction, message, data)


@dataclass(frozen=True)
class Expand:
    """A task result that also edits the job's graph (dynamic expansion, escalation)."""

    value: Any
    patch: list[PatchOp]


Executor = Callable[[TaskContext], Awaitable[Any]]


class ExecutorRegistry:
    """Task kind -> executor: registered in code, or from installed entry points on first use."""

    def __init__(self, executors: Mapping[str, Executor] | None = None, *, entry_points: bool = True) -> None:
        self._executors: dict[str, Executor] = dict(executors or {})
        self._entry_points = (
            {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
            if entry_points
            else {}
        )

    def register(self, kind: str, executor: Executor) -> None:
        """Run tasks of `kind` with `executor` (replacing any other for that kind)."""
        self._executors[kind] = executor

    def kinds(self) -> list[str]:
        """Every kind this registry can run, without importing anything."""
        return sorted({*self._executors, *self._entry_points})

    def get(self, kind: str) -> Executor:
        """The executor of `kind`; `UnknownTaskKind` naming the kinds there are."""
        executor = self._executors.get(kind)
        if executor is not None:
            return executor
        entry = self._entry_points.get(kind)
        if entry is None:
            raise UnknownTaskKind(f"no executor for task kind {kind!r}; this node runs {self.kinds()}")
        try:
            loaded = entry.load()
        except Exception as exc:  # a broken plugin is the plugin's fault: say which and why
            raise UnknownTaskKind(f"executor {kind!r} ({entry.value}) failed to load: {exc}") from exc
        self._executors[kind] = loaded
        return loaded  # type: ignore[no-any-return]
