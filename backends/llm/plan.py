"""Cutting a model into stages: which node holds which layers, sized to memory, speed and links.

`plan_stages` uses every candidate node that has room for at least one layer (or the
`max_stages` fastest). It orders them so that one token's trip (driver -> first stage -> ... ->
last stage -> driver) costs least over the links, trying every order of up to 7 nodes, and gives
each node a share of the layers proportional to its speed, never more than its memory holds: the
first stage also holds the embeddings, the last the final norm and head. A node's speed is its
``speed`` label when it has one, else its core count.

`replacement` picks the node that takes over a lost stage: a live node not excluded, with
room for the stage beside whatever it already holds, cheapest to reach from its neighbours.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from backends.llm.errors import NoStageNode
from backends.llm.models import ModelInfo
from protocol import Capabilities

__all__ = ["Plan", "StagePlacement", "plan_stages", "replacement", "speed_of"]

MIB = 1024 * 1024
LinkCost = Callable[[str, str, int], float]
_BRUTE_FORCE_MAX = 7


@dataclass(frozen=True)
class StagePlacement:
    """Layers ``[start, end)`` on `node`."""

    node: str
    start: int
    end: int
    param_bytes: int

    def wire(self, model: str) -> dict[str, object]:
        """The stage as the ``llm.stage`` service names it, with its node."""
        return {"node": self.node, "stage": {"model": model, "start": self.start, "end": self.end}}


@dataclass(frozen=True)
class Plan:
    """The stages of one model, in pipeline order, and what a token's trip costs over the links."""

    model: str
    hidden_size: int
    stages: tuple[StagePlacement, ...]
    link_s_per_token: float
    """Seconds one decode step spends on the links (driver -> stages -> driver), by the link model."""

    def report(self) -> list[dict[str, object]]:
        """The stages for people and reports."""
        return [
            {"node": s.node, "layers": [s.start, s.end], "param_mib": round(s.param_bytes / MIB, 1)}
            for s in self.stages
        ]


def speed_of(caps: Capabilities) -> float:
    """A node's relative speed: its ``speed`` label, else its cores."""
    try:
        return max(1e-3, float(caps.labels["speed"]))
    except (KeyError, ValueError):
        return float(caps.cores)


def stage_bytes(info: ModelInfo, start: int, end: int) -> int:
    """Parameter bytes of layers ``[start, end)`` with the embeddings or head they carry."""
    size = (end - start) * info.layer_bytes
    size += info.embed_bytes if start == 0 else 0
    size += info.head_bytes if end == info.num_layers else 0
    return size


def _trip_cost(order: Sequence[str], driver: str, info: ModelInfo, link_cost: LinkCost) -> float:
    hidden = info.hidden_size * 4
    cost = link_cost(driver, order[0], 8)
    cost += sum(link_cost(a, b, hidden) for a, b in itertools.pairwise(order))
    return cost + link_cost(order[-1], driver, 64)


def _split(info: ModelInfo, order: Sequence[str], nodes: Mapping[str, Capabilities]) -> list[int] | None:
    """Layers per node: proportional to speed within each node's memory; None when they do not fit."""
    total = info.num_layers
    caps = []
    for i, node in enumerate(order):
        extra = (info.embed_bytes if i == 0 else 0) + (info.head_bytes if i == len(order) - 1 else 0)
        caps.append(max(0, (nodes[node].memory_mb * MIB - extra) // info.layer_bytes))
    if min(caps) < 1 or sum(caps) < total or len(order) > total:
        return None
    speeds = [speed_of(nodes[n]) for n in order]
    share = [0.0] * len(order)
    free = list(range(len(order)))
    left = float(total)
    while free:  # water-filling: capped nodes take their cap, the rest split what is left by speed
        weight = sum(speeds[i] for i in free)
        capped = [i for i in free if left * speeds[i] / weight > caps[i]]
        if not capped:
            for i in free:
                share[i] = left * speeds[i] / weight
            break
        for i in capped:
            share[i] = caps[i]
            left -= caps[i]
            free.remove(i)
    counts = [max(1, min(caps[i], math.floor(share[i]))) for i in range(len(order))]
    while sum(counts) > total:  # the floor of one layer each may overshoot
        i = max((i for i in range(len(order)) if counts[i] > 1), key=lambda i: counts[i] - share[i])
        counts[i] -= 1
    while sum(counts) < total:  # hand out the rest by largest remainder
        i = max((i for i in range(len(order)) if counts[i] < caps[i]), key=lambda i: share[i] - counts[i])
        counts[i] += 1
    return counts


def plan_stages(
    info: ModelInfo,
    nodes: Mapping[str, Capabilities],
    *,
    driver: str,
    link_cost: LinkCost,
    max_stages: int | None = None,
) -> Plan:
    """Cut `info`'s layers over `nodes` (see the module docstring); `NoStageNode` when they cannot hold it."""
    usable = [n for n in sorted(nodes) if nodes[n].memory_mb * MIB >= info.layer_bytes]
    usable.sort(key=lambda n: -speed_of(nodes[n]))
    if max_stages is not None:
        usable = usable[:max_stages]
    need = stage_bytes(info, 0, info.num_layers)
    offered = sum(nodes[n].memory_mb for n in usable)
    while usable:
        orders: Iterable[Sequence[str]] = (
            itertools.permutations(usable)
            if len(usable) <= _BRUTE_FORCE_MAX
            else [sorted(usable, key=lambda n: ("device", "edge", "cloud").index(nodes[n].tier))]
        )
        best: tuple[float, Sequence[str], list[int]] | None = None
        for order in orders:
            counts = _split(info, order, nodes)
            if counts is None:
                continue
            cost = _trip_cost(order, driver, info, link_cost)
            if best is None or cost < best[0]:
                best = (cost, order, counts)
        if best is not None:
            cost, order, counts = best
            stages, start = [], 0
            for node, count in zip(order, counts, strict=True):
                stages.append(
                    StagePlacement(node, start, start + count, stage_bytes(info, start, start + count))
                )
                start += count
            return Plan(info.name, info.hidden_size, tuple(stages), cost)
        usable.pop()  # the slowest node cannot take a useful share: try without it
    raise NoStageNode(
        f"{info.name} needs {need / MIB:.0f} MiB over {info.num_layers} layers; the nodes that have it "
        f"({sorted(nodes)}) offer {offered} MiB"
    )


def replacement(
    plan: Plan,
    index: int,
    nodes: Mapping[str, Capabilities],
    *,
    exclude: set[str],
    driver: str,
    link_cost: LinkCost,
) -> str:
    """The node to take over stage `index` of `plan` (see the module docstring)."""
    lost = plan.stages[index]
    held: dict[str, int] = {}
    for i, stage in enumerate(plan.stages):
        if i != index:
            held[stage.node] = held.get(stage.node, 0) + stage.param_bytes
    before = plan.stages[index - 1].node if index > 0 else driver
    after = plan.stages[index + 1].node if index + 1 < len(plan.stages) else driver
    hidden = 4 * plan.hidden_size

    def cost(node: str) -> tuple[float, float]:
        trip = link_cost(before, node, hidden) + link_cost(node, after, hidden)
        return trip, -(nodes[node].memory_mb * MIB - held.get(node, 0))

    fits = [
        n for n in nodes if n not in exclude and nodes[n].memory_mb * MIB - held.get(n, 0) >= lost.param_bytes
    ]
    if not fits:
        raise NoStageNode(
            f"no live node can take layers {lost.start}-{lost.end} of {plan.model} "
            f"({lost.param_bytes / MIB:.0f} MiB) after {lost.node} was lost; excluded {sorted(exclude)}"
        )
    return min(fits, key=cost)
