"""Task kinds of the split-LLM backend (``flowloom.executors`` entry points).

``llm.generate``: split generation over the fabric's nodes (`driver.SplitGenerator`).

- ``model`` (required): a model name (`models`), which the stage nodes announce in their
  capabilities' ``models``.
- The prompt: ``prompt`` (text; wrapped in the model's chat template unless ``chat: false``, with
  an optional ``system`` text) or ``prompt_ids`` (token ids). ``prompts`` / ``prompts_ids`` give
  several, run as concurrent sessions; the result is then a list.
- ``max_new_tokens`` (default 32), ``stop_at_eos`` (default true), ``sample`` (`sampling`;
  default greedy), ``wire`` (float32, float16, bfloat16 or int8; default float32).
- ``nodes`` (the nodes to cut the model over; default every node announcing the model),
  ``spares`` (more nodes that may take over a lost stage), ``max_stages``,
  ``step_timeout_s`` (default 60).

Each token is streamed as task progress (``data``: ``{"session", "token", "text"}``). The result
of one session is ``{"text", "tokens", "plan", "failovers"}`` (``text`` only with a tokenizer),
and the task's figures are ``tokens``, ``tokens_per_s`` (all sessions together), ``ttft_s``,
``wire_bytes_per_token`` (activation bytes between stages per position run), ``failovers`` and,
after one, ``failover_s`` (how long the answer stalled, detection included).

``llm.reference``: the same parameters (``nodes``, ``wire`` and ``max_stages`` aside), run on
this node by the monolithic model (`reference`); the result has the same shape.

``same_tokens`` (for the ``python`` kind): whether two results hold the same tokens.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from agents.errors import ExecutorFailed
from agents.executors import Measured, TaskContext
from backends.llm.driver import Generation, SplitGenerator
from backends.llm.errors import LlmError
from backends.llm.models import load_tokenizer, model_info
from backends.llm.reference import generate_monolithic
from backends.llm.sampling import check_sample

__all__ = ["generate", "reference", "same_tokens"]


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str) -> Any:
    """`load_tokenizer`, looked up once per model."""
    return load_tokenizer(model)


def _prompts(model: str, params: dict[str, Any]) -> tuple[list[list[int]], bool]:
    """The prompts as token ids, and whether one was given (not a list)."""
    if "prompt_ids" in params or "prompts_ids" in params:
        single = "prompt_ids" in params
        given = [params["prompt_ids"]] if single else params["prompts_ids"]
        if not isinstance(given, list) or not all(
            isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in given
        ):
            raise LlmError("prompt_ids must be a non-empty list of token ids (prompts_ids: a list of them)")
        return [list(p) for p in given], single
    single = "prompt" in params
    texts = [params["prompt"]] if single else params.get("prompts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise LlmError("give prompt (text), prompts (a list of texts), prompt_ids or prompts_ids")
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        raise LlmError(f"{model} has no tokenizer: give prompt_ids instead of a text prompt")
    out = []
    for text in texts:
        if params.get("chat", True):
            messages = [{"role": "user", "content": text}]
            if params.get("system"):
                messages.insert(0, {"role": "system", "content": str(params["system"])})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
                "input_ids"
            ]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(list(ids))
    return out, single


def _text(model: str, tokens: list[int]) -> str | None:
    tokenizer = _tokenizer(model)  # a model without one answers in ids
    return None if tokenizer is None else str(tokenizer.decode(tokens, skip_special_tokens=True))


def _settings(ctx: TaskContext) -> tuple[str, dict[str, Any], int]:
    model = ctx.params.get("model")
    if not isinstance(model, str):
        raise LlmError("params.model is required: a model name such as smollm2-135m")
    try:
        sample = check_sample(dict(ctx.params.get("sample") or {}))
    except ValueError as exc:
        raise LlmError(str(exc)) from None
    max_new = ctx.params.get("max_new_tokens", 32)
    if not isinstance(max_new, int) or max_new < 1:
        raise LlmError(f"max_new_tokens must be an integer >= 1, got {max_new!r}")
    return model, sample, max_new


def _stop_ids(ctx: TaskContext, eos: tuple[int, ...]) -> list[int]:
    return list(eos) if ctx.params.get("stop_at_eos", True) else []


async def generate(ctx: TaskContext) -> Measured:
    if ctx.fabric is None:
        raise ExecutorFailed("llm.generate needs a node's fabric to reach the stages")
    model, sample, max_new = _settings(ctx)
    prompts, single = await asyncio.to_thread(_prompts, model, ctx.params)
    generator = SplitGenerator(
        ctx.fabric,
        model,
        wire=str(ctx.params.get("wire", "float32")),
        sample=sample,
        nodes=ctx.params.get("nodes"),
        spares=ctx.params.get("spares") or (),
        max_stages=ctx.params.get("max_stages"),
        step_timeout_s=float(ctx.params.get("step_timeout_s", 60.0)),
    )
    began = time.perf_counter()
    await generator.make_plan()
    stop = _stop_ids(ctx, generator.stop_ids)
    streamed = [0] * len(prompts)

    async def on_token(index: int, token: int) -> None:
        streamed[index] += 1
        piece = _text(model, [token])
        done = sum(streamed) / (max_new * len(prompts))
        await ctx.progress(min(1.0, done), piece or "", {"session": index, "token": token, "text": piece})

    answers: list[Generation] = await asyncio.gather(
        *(
            generator.generate(p, max_new_tokens=max_new, stop_ids=stop, on_token=on_token, index=i)
            for i, p in enumerate(prompts)
        )
    )
    wall = time.perf_counter() - began
    plan = generator.plan.report() if generator.plan is not None else []
    results = [
        {
            "text": _text(model, g.tokens),
            "tokens": g.tokens,
            "plan": plan,
            "failovers": [
                {"at_token": f.at_token, "moved": f.moved, "recover_s": round(f.recover_s, 4)}
                for f in g.failovers
            ],
        }
        for g in answers
    ]
    total = sum(len(g.tokens) for g in answers)
    stalls = [f.stall_s for g in answers for f in g.failovers]
    metrics = {
        "tokens": float(total),
        "tokens_per_s": round(total / max(g.decode_s for g in answers), 3) if total else 0.0,
        "ttft_s": round(min(g.ttft_s for g in answers), 4),
        "wire_bytes_per_token": round(
            sum(g.wire_bytes for g in answers) / max(1, sum(g.positions for g in answers)), 1
        ),
        "failovers": float(len(stalls)),
        "wall_s": round(wall, 3),
    }
    if stalls:
        metrics["failover_s"] = round(max(stalls), 4)
    return Measured(results[0] if single else results, metrics)


async def reference(ctx: TaskContext) -> Measured:
    model, sample, max_new = _settings(ctx)
    prompts, single = await asyncio.to_thread(_prompts, model, ctx.params)
    stop = _stop_ids(ctx, (await asyncio.to_thread(model_info, model)).eos_token_ids)
    results, metrics = [], {"tokens": 0.0}
    for ids in prompts:
        out = await asyncio.to_thread(
            generate_monolithic, model, ids, max_new_tokens=max_new, sample=sample, stop_ids=stop
        )
        results.append({"text": _text(model, out.tokens), "tokens": out.tokens})
        metrics["tokens"] += len(out.tokens)
        metrics["tokens_per_s"] = round(out.tokens_per_s, 3)
        metrics["ttft_s"] = round(out.ttft_s, 4)
    return Measured(results[0] if single else results, metrics)


def same_tokens(split: Any, reference: Any) -> bool:
    """Whether two results (or lists of them) hold the same tokens."""
    pairs = zip(split, reference, strict=False) if isinstance(split, list) else [(split, reference)]
    same = isinstance(split, list) == isinstance(reference, list)
    return (
        same
        and all(a["tokens"] == b["tokens"] for a, b in pairs)
        and (not isinstance(split, list) or len(split) == len(reference))
    )
