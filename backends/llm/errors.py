"""Errors of the split-LLM backend, under the agents layer's `ExecutorFailed`.

::

    ExecutorFailed (agents)
    └── LlmError               split generation went wrong
        ├── ModelUnavailable   the model cannot be found or loaded here (name, package, layers)
        └── NoStageNode        no live node can host a stage (plan or failover); names the layers
"""

from __future__ import annotations

from agents.errors import ExecutorFailed

__all__ = ["LlmError", "ModelUnavailable", "NoStageNode"]


class LlmError(ExecutorFailed):
    """Split generation went wrong."""


class ModelUnavailable(LlmError):
    """The model cannot be found or loaded here; the message says which and why."""


class NoStageNode(LlmError):
    """No live node can host a stage: too little memory, no node with the model, all dead."""
