"""The task kinds every node can run, registered as ``flowloom.executors`` entry points.

- ``echo``: returns ``params.value`` if given, else the inputs as a map.
- ``sum``: adds every numeric input and ``params.add`` (default 0).
- ``sleep``: waits ``params.seconds``, reporting progress ``params.steps`` times; returns the seconds.
- ``fail``: raises `ExecutorFailed` with ``params.message`` while the attempt is below
  ``params.until_attempt`` (default: always), then returns ``params.value``; for retry demos.
- ``python``: calls ``params.fn`` (``"module:function"``) with ``params.kwargs`` and the inputs as
  keyword arguments; a plain function runs in a worker thread so the node keeps heartbeating.
- ``escalate``: a classifier stand-in. It returns ``{"label", "confidence"}`` from ``params``;
  when the confidence is below ``params.threshold`` it also adds a task ``<task>.escalated`` of
  ``params.escalate_kind`` (default ``echo``) placed on ``params.escalate_tier`` (default
  ``cloud``), to run after it, with ``params.value = {"label", "escalated_from": <node>}`` and
  no inputs: a job that grows while it runs.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

from agents.errors import ExecutorFailed
from agents.executors import Expand, TaskContext
from protocol import AddTask, Placement, TaskSpec

__all__ = ["echo", "escalate", "fail", "python", "sleep", "sum_inputs"]


async def echo(ctx: TaskContext) -> Any:
    return ctx.params["value"] if "value" in ctx.params else dict(ctx.inputs)


async def sum_inputs(ctx: TaskContext) -> Any:
    total = ctx.params.get("add", 0)
    for name, value in ctx.inputs.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ExecutorFailed(f"sum: input {name!r} is {type(value).__name__}, not a number")
        total += value
    return total


async def sleep(ctx: TaskContext) -> Any:
    seconds = float(ctx.params.get("seconds", 0.0))
    steps = max(1, int(ctx.params.get("steps", 1)))
    for step in range(steps):
        await asyncio.sleep(seconds / steps)
        if steps > 1:
            await ctx.progress((step + 1) / steps, f"slept {seconds * (step + 1) / steps:.3f}s")
    return seconds


async def fail(ctx: TaskContext) -> Any:
    until = ctx.params.get("until_attempt")
    if until is None or ctx.attempt < int(until):
        raise ExecutorFailed(str(ctx.params.get("message", f"fail: attempt {ctx.attempt} fails on purpose")))
    return ctx.params.get("value")


async def python(ctx: TaskContext) -> Any:
    target = ctx.params.get("fn")
    if not isinstance(target, str) or ":" not in target:
        raise ExecutorFailed(f"python: params.fn must be 'module:function', got {target!r}")
    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ExecutorFailed(f"python: cannot import {target!r}: {exc}") from exc
    kwargs = {**dict(ctx.params.get("kwargs", {})), **ctx.inputs}
    if inspect.iscoroutinefunction(fn):
        return await fn(**kwargs)
    return await asyncio.to_thread(fn, **kwargs)


async def escalate(ctx: TaskContext) -> Any:
    confidence = float(ctx.params.get("confidence", 1.0))
    value = {"label": ctx.params.get("label", "unknown"), "confidence": confidence}
    if confidence >= float(ctx.params.get("threshold", 0.5)):
        return value
    bigger = TaskSpec(
        id=f"{ctx.task}.escalated",
        kind=str(ctx.params.get("escalate_kind", "echo")),
        params={"value": {"label": ctx.params.get("label", "unknown"), "escalated_from": ctx.node}},
        placement=Placement(tier=ctx.params.get("escalate_tier", "cloud")),
    )
    return Expand(value=value, patch=[AddTask(task=bigger, after=[ctx.task])])
