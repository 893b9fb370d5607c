"""Errors of the agents layer, under the shared `FlowloomError` root."""

from __future__ import annotations

from protocol import FlowloomError

__all__ = ["ScenarioError"]


class ScenarioError(FlowloomError):
    """A scenario file cannot be read or is invalid; the message names the file and the field path."""
