"""Choosing the next token from logits: greedy, or sampled with a seed that makes it repeatable.

``sample`` settings: ``temperature`` (absent or 0: greedy, the highest logit), ``top_k`` (keep
the k most likely), ``top_p`` (keep the smallest set whose probability reaches p) and ``seed``.
A sampled choice at a position depends only on the logits, the settings and the position, not
on the node or on what ran before: a stage rebuilt on another node after a failure draws the
same token the lost one would have.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_sample", "choose"]

_KEYS = {"temperature", "top_k", "top_p", "seed"}


def check_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """`sample` if its settings are valid; ValueError naming the first bad one."""
    unknown = set(sample) - _KEYS
    if unknown:
        raise ValueError(f"unknown sample settings {sorted(unknown)}; use {sorted(_KEYS)}")
    temperature = sample.get("temperature") or 0.0
    if not isinstance(temperature, int | float) or temperature < 0:
        raise ValueError(f"sample.temperature must be a number >= 0, got {temperature!r}")
    top_k = sample.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"sample.top_k must be an integer >= 1, got {top_k!r}")
    top_p = sample.get("top_p")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise ValueError(f"sample.top_p must be in (0, 1], got {top_p!r}")
    seed = sample.get("seed", 0)
    if not isinstance(seed, int):
        raise ValueError(f"sample.seed must be an integer, got {seed!r}")
    return sample


def choose(logits: torch.Tensor, sample: dict[str, Any], position: int) -> int:
    """The token following `position`, from its logits ``[1, vocab]`` (see the module docstring)."""
    row = logits.reshape(-1).to(torch.float32)
    temperature = float(sample.get("temperature") or 0.0)
    if temperature <= 0:
        return int(torch.argmax(row))
    row = row / temperature
    top_k = sample.get("top_k")
    if top_k is not None and top_k < row.numel():
        kth = torch.topk(row, int(top_k)).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    top_p = sample.get("top_p")
    if top_p is not None and top_p < 1:
        ordered, index = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered
        ordered = ordered.masked_fill(before >= float(top_p), 0.0)
        probs = torch.zeros_like(probs).scatter(0, index, ordered)
    generator = torch.Generator().manual_seed((int(sample.get("seed", 0)) * 1_000_003 + position) % 2**63)
    return int(torch.multinomial(probs, 1, generator=generator))
