"""The run report: the JSON whose keys DESIGN.md fixes, so tools can read it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["Expectation", "FaultRecord", "NodeReport", "Report", "TaskCounts"]


class TaskCounts(BaseModel):
    """How many tasks ended in each state."""

    total: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0


class NodeReport(BaseModel):
    """One node at the end of the run."""

    tier: str
    segment: str
    tasks_run: int = 0
    alive: bool = True


class FaultRecord(BaseModel):
    """A fault injected during the run."""

    at_s: float
    kind: str
    target: str


class Expectation(BaseModel):
    """A check made at the end of the run."""

    name: str
    ok: bool
    detail: str = ""


class Report(BaseModel):
    """What `flowloom run --report FILE` writes."""

    scenario: str
    ok: bool
    wall_s: float
    tasks: TaskCounts = Field(default_factory=TaskCounts)
    nodes: dict[str, NodeReport] = {}
    faults: list[FaultRecord] = []
    expectations: list[Expectation] = []
    figures: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    routes: dict[str, list[str]] = {}
    """Routes through relays at the end of the run, ``"src -> dst": [src, relay..., dst]``: between
    the orchestrator and the nodes, and (in-process) between any two nodes. Direct routes are left out."""
