"""Errors of the agents layer, under the shared `FlowloomError` root.

::

    FlowloomError
    ├── ScenarioError        a scenario file cannot be read or is invalid (fix the file)
    └── AgentError           running a job went wrong
        ├── PatchRejected    a graph patch breaks an invariant; nothing was changed
        ├── UnknownTaskKind  no executor for a task kind on this node (not retryable here)
        └── ExecutorFailed   an executor could not do its task (retryable)
"""

from __future__ import annotations

from typing import Any

from protocol import FlowloomError

__all__ = ["AgentError", "ExecutorFailed", "PatchRejected", "ScenarioError", "UnknownTaskKind"]


class ScenarioError(FlowloomError):
    """A scenario file cannot be read or is invalid; the message names the file and the field path."""


class AgentError(FlowloomError):
    """Running a job went wrong."""


class PatchRejected(AgentError):
    """A graph patch breaks an invariant; the graph is exactly as it was before the patch."""

    def __init__(self, index: int, op: Any, why: str) -> None:
        name = getattr(op, "op", type(op).__name__)
        super().__init__(f"patch rejected at op {index} ({name}): {why}")
        self.index = index
        self.op = op
        self.why = why


class UnknownTaskKind(AgentError):
    """No executor for a task kind (or its plugin failed to load)."""


class ExecutorFailed(AgentError):
    """An executor could not do its task; another attempt may succeed."""
