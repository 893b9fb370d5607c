"""The driver of split generation: plans the stages, runs prefill and decode, survives lost stages.

`SplitGenerator` plans where the layers go (`plan.plan_stages`), opens a session on every stage,
and runs one step at a time: the prompt first, then each new token. A step goes to the first
stage; each stage sends its hidden states straight to the next (never through the driver), and
the last stage's chosen token travels back along the chain. Several sessions may run at once;
their steps interleave on the stages, so the stages work in parallel.

Every step's input is kept (the session's input log). When a step fails because a stage's node is
lost (dead, unreachable, or it lost the session), the driver raises the session's epoch, moves
each lost stage to another node (`plan.replacement`), rebuilds its cache by replaying the log
(stage 0 from the token steps, a later stage from its predecessor's log of what it sent,
step by step as they first ran, so the rebuilt cache is the same bit for bit), and sends the
failed step again. Greedy text after a failover is the text without one, at any token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.services import CallFailed, Fabric, Reply
from backends.llm.errors import LlmError, NoStageNode
from backends.llm.models import ModelInfo
from backends.llm.plan import Plan, StagePlacement, plan_stages, replacement
from backends.llm.stage import SERVICE, WIRE_DTYPES
from fabric import FabricError, PeerUnreachable
from protocol import new_id

__all__ = ["Failover", "Generation", "SplitGenerator"]

log = logging.getLogger("backends.llm.driver")

TokenSink = Callable[[int, int], Awaitable[None]]
"""Called with (session index, token) as each token arrives."""


@dataclass
class Failover:
    """One recovery: the stages moved, and how long the answer stalled."""

    at_token: int
    moved: list[dict[str, Any]]
    recover_s: float
    """From the failed step's error to the rebuilt stages being ready."""
    stall_s: float = 0.0
    """From the last token before the failure to the first one after it (detection included)."""


@dataclass
class Generation:
    """One session's answer and its figures."""

    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    """From the start (planning and loading included) to the first token."""
    decode_s: float = 0.0
    """From the first step sent to the last token."""
    wire_bytes: int = 0
    """Activation bytes sent between stages, every step included."""
    positions: int = 0
    """Positions run through the stages (prompt and generated tokens; replays not counted)."""
    failovers: list[Failover] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0


class SplitGenerator:
    """Generates with `model` cut over the fabric's nodes (see the module docstring).

    >>> gen = SplitGenerator(ctx.fabric, "smollm2-135m")  # doctest: +SKIP
    >>> answer = await gen.generate([1, 9690, 198], max_new_tokens=16)  # doctest: +SKIP
    """

    def __init__(
        self,
        fabric: Fabric,
        model: str,
        *,
        wire: str = "float32",
        sample: dict[str, Any] | None = None,
        nodes: Sequence[str] | None = None,
        spares: Sequence[str] = (),
        max_stages: int | None = None,
        plan: Plan | None = None,
        step_timeout_s: float = 60.0,
        max_failovers: int = 8,
    ) -> None:
        if wire not in WIRE_DTYPES:
            raise LlmError(f"wire must be one of {list(WIRE_DTYPES)}, got {wire!r}")
        self.fabric = fabric
        self.model = model
        self.wire = wire
        self.sample = dict(sample or {})
        self.nodes = list(nodes) if nodes is not None else None
        self.spares = list(spares)
        self.max_stages = max_stages
        self.plan = plan
        self.step_timeout_s = step_timeout_s
        self.max_failovers = max_failovers
        self.stop_ids: tuple[int, ...] = ()
        """The model's end-of-text tokens, known once planned."""
        self.lost: set[str] = set()
        """Nodes found dead; never given a stage again by this generator."""
        self._planning = asyncio.Lock()  # sessions started together share one plan

    # planning --------------------------------------------------------------------------------

    def candidates(self, *, spares: bool = False) -> dict[str, Any]:
        """Live nodes that can load the model, are allowed (`nodes`, and `spares` if asked) and not lost."""
        allowed = None if self.nodes is None else {*self.nodes, *(self.spares if spares else ())}
        return {
            n: caps
            for n, caps in self.fabric.peers().items()
            if self.model in caps.models
            and n not in self.lost
            and (allowed is None or n in allowed)
            and self.fabric.alive(n)
        }

    async def make_plan(self) -> Plan:
        """The stage plan: given at construction, or cut now over the live candidates."""
        async with self._planning:
            if self.plan is None:
                await self._cut()
        assert self.plan is not None
        return self.plan

    async def _cut(self) -> None:
        """Plan over the live candidates, with the model's sizes from a node that has it."""
        nodes = self.candidates()
        if not nodes:
            raise NoStageNode(f"no live node announces model {self.model!r} (capabilities.models)")
        # The driver may hold no copy of the model: a node that does tells its sizes.
        asked = min(nodes, key=lambda n: self.fabric.link_cost(self.fabric.node_id, n, 1))
        answer = await self._call(asked, "info", {"model": self.model})
        info = ModelInfo(**{**answer.value, "eos_token_ids": tuple(answer.value["eos_token_ids"])})
        self.stop_ids = info.eos_token_ids
        self.plan = plan_stages(
            info,
            nodes,
            driver=self.fabric.node_id,
            link_cost=self.fabric.link_cost,
            max_stages=self.max_stages,
        )

    # calls -----------------------------------------------------------------------------------

    async def _call(self, node: str, method: str, args: dict[str, Any]) -> Reply:
        return await self.fabric.call(node, SERVICE, method, args, timeout=self.step_timeout_s)

    def _args(self, run: _Session, stage: StagePlacement) -> dict[str, Any]:
        return {"session": run.sid, "stage": stage.wire(self.model)["stage"], "epoch": run.epoch}

    async def _open(self, run: _Session, stage: StagePlacement) -> None:
        await self._call(stage.node, "open", {**self._args(run, stage), "wire": self.wire})

    async def _close(self, sid: str, chain: Sequence[StagePlacement]) -> None:
        async def close(node: str) -> None:
            try:
                await self.fabric.call(node, SERVICE, "close", {"session": sid}, timeout=5.0)
            except (CallFailed, FabricError) as exc:  # it evicts idle sessions by itself
                log.info("closing session %s on %s: %s", sid, node, exc)

        await asyncio.gather(*(close(n) for n in {s.node for s in chain} if self.fabric.alive(n)))

    # generation ------------------------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 32,
        stop_ids: Sequence[int] = (),
        on_token: TokenSink | None = None,
        index: int = 0,
    ) -> Generation:
        """Generate up to `max_new_tokens` after `prompt_ids`, stopping after any of `stop_ids`."""
        if not prompt_ids:
            raise LlmError("the prompt is empty: give at least one token")
        began = time.perf_counter()
        plan = await self.make_plan()
        run = _Session(new_id(), list(plan.stages), list(prompt_ids), Generation(list(prompt_ids)))
        await asyncio.gather(*(self._open(run, s) for s in run.chain))
        first_step = last_token_at = time.perf_counter()
        stalled: Failover | None = None
        try:
            while len(run.result.tokens) < max_new_tokens:
                try:
                    token = await self._step(run)
                except (CallFailed, FabricError) as exc:
                    if len(run.result.failovers) >= self.max_failovers:
                        raise LlmError(f"gave up after {self.max_failovers} failovers: {exc}") from exc
                    failed_at = time.perf_counter()
                    run.epoch += 1
                    moved = await self._recover(run, exc)
                    stalled = Failover(len(run.result.tokens), moved, time.perf_counter() - failed_at)
                    run.result.failovers.append(stalled)
                    continue
                now = time.perf_counter()
                if stalled is not None:
                    stalled.stall_s, stalled = now - last_token_at, None
                last_token_at = now
                if len(run.result.tokens) == 1:
                    run.result.ttft_s = now - began
                if on_token is not None:
                    await on_token(index, token)
                if token in stop_ids:
                    break
            run.result.decode_s = time.perf_counter() - first_step
        finally:
            await self._close(run.sid, run.chain)
        return run.result

    async def _step(self, run: _Session) -> int:
        """Send the next step down the chain; log it and return the token it gave."""
        ids = run.tokens[run.completed :]
        args = {
            **self._args(run, run.chain[0]),
            "pos": run.completed,
            "x": ids,
            "route": [s.wire(self.model) for s in run.chain[1:]],
            "sample": self.sample,
            "deadline": time.time() + self.step_timeout_s,
        }
        reply = await self._call(run.chain[0].node, "forward", args)
        run.steps.append((run.completed, ids))
        run.result.positions += len(ids)
        run.result.wire_bytes += int(reply.metrics.get("wire_bytes", 0))
        run.completed = len(run.tokens)
        token = int(reply.value["token"])
        run.tokens.append(token)
        run.result.tokens.append(token)
        return token

    # failover --------------------------------------------------------------------------------

    def _lost_nodes(self, exc: Exception, chain: Sequence[StagePlacement]) -> set[str]:
        """The nodes whose stages must be rebuilt after `exc`."""
        if isinstance(exc, CallFailed) and exc.target is not None:
            if exc.code == "unreachable":  # a stage could not reach it: do not give it the stage back
                self.lost.add(exc.target)
            return {exc.target}  # otherwise it lost the session (evicted, restarted): fill it again
        if isinstance(exc, PeerUnreachable):
            self.lost.add(exc.node)
            return {exc.node}
        if isinstance(exc, CallFailed) and exc.code not in ("unreachable", "timeout"):
            raise LlmError(f"a stage failed: {exc}") from exc
        dead = {s.node for s in chain if not self.fabric.alive(s.node)}
        if not dead:
            raise LlmError(f"no stage is known lost, yet the step failed: {exc}") from exc
        return dead

    async def _recover(self, run: _Session, exc: Exception) -> list[dict[str, Any]]:
        """Rebuild the lost stages of the session's chain in place; what moved where."""
        lost = self._lost_nodes(exc, run.chain)
        moved: list[dict[str, Any]] = []
        for attempt in itertools.count():
            try:
                for i, stage in enumerate(run.chain):
                    if stage.node in lost:
                        new = await self._rebuild(run, i)
                        moved.append({"layers": [stage.start, stage.end], "from": stage.node, "to": new.node})
                        log.warning("session %s: stage %s moved to %s", run.sid, moved[-1], new.node)
                        lost.discard(stage.node)
                break
            except (CallFailed, FabricError) as again:  # another node went down while we rebuilt
                if attempt >= self.max_failovers:
                    raise LlmError(f"could not rebuild the lost stages: {again}") from again
                lost |= self._lost_nodes(again, run.chain)
        if self.plan is not None:  # later sessions start on the rebuilt chain
            self.plan = dataclasses.replace(self.plan, stages=tuple(run.chain))
        return moved

    async def _rebuild(self, run: _Session, i: int) -> StagePlacement:
        """Open stage `i` again (on another node if its own is gone) and replay the input log into it."""
        stage = run.chain[i]
        node = stage.node
        if node in self.lost or not self.fabric.alive(node):
            self.lost.add(node)
            assert self.plan is not None
            node = replacement(
                dataclasses.replace(self.plan, stages=tuple(run.chain)),
                i,
                self.candidates(spares=True),
                exclude=self.lost,
                driver=self.fabric.node_id,
                link_cost=self.fabric.link_cost,
            )
        new = StagePlacement(node, stage.start, stage.end, stage.param_bytes)
        await self._open(run, new)
        if run.completed == 0:
            pass  # nothing ran yet: the next step fills it
        elif i == 0:
            steps = [{"pos": pos, "x": ids} for pos, ids in run.steps if pos < run.completed]
            await self._call(new.node, "fill", {**self._args(run, new), "steps": steps})
        else:
            before = run.chain[i - 1]
            args = {
                **self._args(run, before),
                "to": new.wire(self.model),
                "upto": run.completed,
                "deadline": time.time() + self.step_timeout_s,
            }
            await self._call(before.node, "handoff", args)
        run.chain[i] = new
        return new


@dataclass
class _Session:
    """One generation under way: its chain of stages, its input log, its answer so far."""

    sid: str
    chain: list[StagePlacement]
    tokens: list[int]
    """The prompt and every token generated."""
    result: Generation
    epoch: int = 0
    steps: list[tuple[int, list[int]]] = field(default_factory=list)
    """The input log: (position, token ids) of every step that completed, in order."""
    completed: int = 0
    """Positions every stage holds."""
