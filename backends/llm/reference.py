"""The monolithic model: the whole model on one node, the baseline split generation must equal.

It runs the same steps as the split driver (the prompt, then one token at a time, with a KV
cache) and chooses tokens with the same `sampling.choose`, so greedy and seeded output can be
compared token for token. Its greedy output is also Hugging Face's own ``generate``'s.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from backends.llm.models import load_full
from backends.llm.sampling import choose

__all__ = ["MonolithicResult", "cached_full_model", "generate_monolithic"]


@functools.lru_cache(maxsize=2)
def cached_full_model(model: str) -> Any:
    """`load_full(model)`, loaded once per process."""
    return load_full(model)


@dataclass
class MonolithicResult:
    """The tokens and how long they took."""

    tokens: list[int]
    ttft_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0


@torch.inference_mode()
def generate_monolithic(
    model: str,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 32,
    sample: dict[str, Any] | None = None,
    stop_ids: Sequence[int] = (),
) -> MonolithicResult:
    """Generate with the whole model in this process (blocking; run it in a thread from async code)."""
    full = cached_full_model(model)
    cache = DynamicCache(config=full.config)
    began = time.perf_counter()
    tokens: list[int] = []
    ids = list(prompt_ids)
    pos = 0
    ttft = 0.0
    while len(tokens) < max_new_tokens:
        x = torch.tensor([ids], dtype=torch.long)
        positions = torch.arange(pos, pos + len(ids)).unsqueeze(0)
        out = full(
            input_ids=x, past_key_values=cache, use_cache=True, position_ids=positions, logits_to_keep=1
        )
        pos += len(ids)
        token = choose(out.logits[:, -1, :], sample or {}, pos - 1)
        tokens.append(token)
        if len(tokens) == 1:
            ttft = time.perf_counter() - began
        ids = [token]
        if token in stop_ids:
            break
    return MonolithicResult(tokens, ttft, time.perf_counter() - began)
