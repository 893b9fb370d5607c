"""Executors: the code that runs a task of a given kind, found by kind through a registry.

An executor is an async callable taking a `TaskContext` and returning the task's value (anything
that can travel on the wire), an `Expand` to also patch the job's graph, or a `Measured` to
also report figures. Executors are found
by task kind: first those registered in code, then the ``flowloom.executors`` entry points of
installed packages, loaded on first use. That is how backends plug in without the agents layer
importing them::

    [project.entry-points."flowloom.executors"]
    "llm.stage" = "backends.torch_split:run_stage"
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from agents.errors import UnknownTaskKind
from protocol import PatchOp

if TYPE_CHECKING:
    from agents.services import Fabric

__all__ = [
    "ENTRY_POINT_GROUP",
    "Executor",
    "ExecutorRegistry",
    "Expand",
    "Measured",
    "PluginRegistry",
    "TaskContext",
]

T = TypeVar("T")

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
    fabric: Fabric | None = None
    """The running node's handle on the fabric (peers, link costs, calls to services); None in
    executors run outside a node."""
    _progress: ProgressSink = _no_progress

    async def progress(self, fraction: float | None = None, message: str = "", data: Any = None) -> None:
        """Stream a progress report to whoever assigned the task (a fraction in [0, 1], text, data)."""
        await self._progress(fraction, message, data)


@dataclass(frozen=True)
class Expand:
    """A task result that also edits the job's graph (dynamic expansion, escalation)."""

    value: Any
    patch: list[PatchOp]


@dataclass(frozen=True)
class Measured:
    """A task result with figures the executor measured (they reach the run report's figures)."""

    value: Any
    metrics: dict[str, float]


Executor = Callable[[TaskContext], Awaitable[Any]]


class PluginRegistry(Generic[T]):
    """Name -> plugin: registered in code, or from an entry point group on first use."""

    group: str = ""
    """The entry point group searched; subclasses set it."""
    what: str = "plugin"
    """What a plugin is called in error messages."""

    def __init__(self, plugins: Mapping[str, T] | None = None, *, entry_points: bool = True) -> None:
        self._plugins: dict[str, T] = dict(plugins or {})
        self._entry_points = (
            {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)} if entry_points else {}
        )

    def register(self, name: str, plugin: T) -> None:
        """Use `plugin` for `name` (replacing any other)."""
        self._plugins[name] = plugin

    def kinds(self) -> list[str]:
        """Every name this registry knows, without importing anything."""
        return sorted({*self._plugins, *self._entry_points})

    def get(self, name: str) -> T:
        """The plugin for `name`; `UnknownTaskKind` naming the ones there are."""
        plugin = self._plugins.get(name)
        if plugin is not None:
            return plugin
        entry = self._entry_points.get(name)
        if entry is None:
            raise UnknownTaskKind(f"no {self.what} {name!r}; this node has {self.kinds()}")
        try:
            loaded: T = entry.load()
        except Exception as exc:  # a broken plugin is the plugin's fault: say which and why
            raise UnknownTaskKind(f"{self.what} {name!r} ({entry.value}) failed to load: {exc}") from exc
        self._plugins[name] = loaded
        return loaded

    async def load(self, name: str) -> T:
        """`get` for async code: a plugin not yet imported is imported in a worker thread.

        A first import can take seconds (torch, transformers); on the event loop it would stop the
        node's heartbeats. A plugin already loaded is returned at once, with no thread hop.
        """
        plugin = self._plugins.get(name)
        if plugin is not None:
            return plugin
        return await asyncio.to_thread(self.get, name)


class ExecutorRegistry(PluginRegistry[Executor]):
    """Task kind -> executor: registered in code, or from ``flowloom.executors`` entry points."""

    group = ENTRY_POINT_GROUP
    what = "executor for task kind"
