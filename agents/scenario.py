"""Scenario files: YAML validated by pydantic models, errors that name the file and field path.

The sections grow with the orchestrator; today a scenario declares its nodes and the emulated links
between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agents.errors import ScenarioError

__all__ = ["Link", "NodeSpec", "Scenario", "load_scenario"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class NodeSpec(_Strict):
    """One node of the scenario."""

    tier: Literal["device", "edge", "cloud"]
    """Where the node sits."""
    cores: int = Field(default=1, ge=1)
    """CPU cores offered to tasks."""
    memory_mb: int = Field(default=1024, ge=0)
    """Memory offered to tasks, in MiB."""
    segment: str = "default"
    """Network segment (on MQTT: the broker)."""
    nat: bool = False
    """True when the node cannot be dialled from other segments."""
    labels: dict[str, str] = {}
    """Free labels for placement constraints."""


class Link(_Strict):
    """An emulated directed link; `symmetric` adds the reverse direction with the same figures."""

    src: str
    """Sending node."""
    dst: str
    """Receiving node."""
    latency_ms: float = Field(default=0.0, ge=0)
    """One-way latency."""
    bandwidth_mbps: float | None = Field(default=None, gt=0)
    """Bandwidth in Mbit/s; unset means unlimited."""
    loss: float = Field(default=0.0, ge=0, lt=1)
    """Share of messages lost."""
    symmetric: bool = True
    """Also emulate dst -> src with the same figures."""

    def transfer_s(self, nbytes: int) -> float:
        """Modelled time to move `nbytes` over this link: latency plus serialisation."""
        wire = 0.0 if self.bandwidth_mbps is None else nbytes * 8 / (self.bandwidth_mbps * 1e6)
        return self.latency_ms / 1000 + wire


class Scenario(_Strict):
    """A whole scenario file."""

    name: str = Field(min_length=1)
    """Shown in progress displays and reports."""
    description: str = ""
    """What the scenario shows, for people."""
    nodes: dict[str, NodeSpec] = Field(min_length=1)
    """Node id -> node."""
    links: list[Link] = []
    """Emulated links between nodes."""

    @model_validator(mode="after")
    def _links_join_known_nodes(self) -> Scenario:
        for i, link in enumerate(self.links):
            for end in ("src", "dst"):
                name = getattr(link, end)
                if name not in self.nodes:
                    raise ValueError(
                        f"links.{i}.{end}: unknown node {name!r}; nodes are {sorted(self.nodes)}"
                    )
        return self

    def link(self, src: str, dst: str) -> Link | None:
        """The link from `src` to `dst`, if the scenario emulates one."""
        for link in self.links:
            if (link.src, link.dst) == (src, dst) or (link.symmetric and (link.dst, link.src) == (src, dst)):
                return link
        return None


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
