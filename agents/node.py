"""The node: a machine's worker on the fabric. It announces what it can run and runs what it is given.

>>> async with Node("edge-1", hub.transport("edge-1"), capabilities=caps) as node:  # doctest: +SKIP
...     await node.wait_closed()

For each `task.assign` the node answers `task.ack` at once, runs the task's executor when a slot
is free (at most `concurrency` at a time; the rest wait in arrival order), streams the
executor's `task.progress`, and answers `task.result` or `task.failed`, all correlated to the
assignment. A `task.cancel` stops the matching attempt (or every attempt of the task); the node
then answers `task.failed` with code ``cancelled``. Heartbeats carry how many tasks run and wait.

Lifecycle: new -> running (`start`, ``async with``) -> draining (`drain`) -> closed (`close`,
`crash`). `drain` (what SIGTERM does) refuses new work, gives running tasks `grace_s` to finish,
then hands the rest back: it cancels them and answers `task.failed` (code ``cancelled``,
retryable), so the orchestrator runs them elsewhere at once instead of waiting to declare the
node dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.errors import ExecutorFailed, UnknownTaskKind
from agents.executors import ExecutorRegistry, Expand, Measured, TaskContext
from agents.services import Fabric, LinkCost, ServiceHost, ServiceRegistry
from fabric import Endpoint, FabricError, LinkTable, PeerUnreachable, Transport
from protocol import (
    Call,
    Capabilities,
    Envelope,
    Heartbeat,
    Signer,
    TaskAck,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskProgress,
    TaskResult,
    Verifier,
)

__all__ = ["Node", "NodeStats"]

log = logging.getLogger("agents.node")

_ANSWER_TRIES = 12
"""Tries to send a result to an orchestrator with no route to it (about 8 s with the backoff)."""


@dataclass
class NodeStats:
    """Counters of one node."""

    assigned: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    handed_back: int = 0


@dataclass
class _Run:
    assign: Envelope
    body: TaskAssign
    task: asyncio.Task[None] | None = None
    started: bool = False
    ids: dict[str, Any] = field(init=False)
    """job, task and attempt: the fields every answer about this run starts with."""

    def __post_init__(self) -> None:
        self.ids = {"job": self.body.job, "task": self.body.task, "attempt": self.body.attempt}


class Node:
    """Runs tasks for whoever assigns them, on any transport (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        transport: Transport | Sequence[Transport],
        *,
        capabilities: Capabilities,
        registry: ExecutorRegistry | None = None,
        concurrency: int | None = None,
        heartbeat_s: float = 1.0,
        dead_after_s: float | None = None,
        links: LinkTable | None = None,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
        bulk: str | None = None,
        bulk_advertise: str | None = None,
        slowdown: float = 1.0,
        services: ServiceRegistry | None = None,
        link_cost: LinkCost | None = None,
        relay: bool = False,
    ) -> None:
        self.node_id = node_id
        self.registry = registry or ExecutorRegistry()
        kinds = capabilities.task_kinds or self.registry.kinds()
        self.capabilities = capabilities.model_copy(update={"task_kinds": kinds, "relay": relay})
        self.concurrency = concurrency or capabilities.cores
        self.slowdown = slowdown
        """Run time multiplier: 3.0 makes every task take three times as long (a straggler)."""
        self.stats = NodeStats()
        self.endpoint = Endpoint(
            node_id,
            transport,
            capabilities=self.capabilities,
            heartbeat_s=heartbeat_s,
            dead_after_s=dead_after_s,
            links=links,
            signer=signer,
            verifier=verifier,
            bulk=bulk,
            bulk_advertise=bulk_advertise,
            heartbeat=self._heartbeat,
            relay=relay,
        )
        self.services = ServiceHost(node_id, services or ServiceRegistry())
        self.fabric = Fabric(self.endpoint, self.capabilities, self.services, link_cost)
        """This node's handle on the fabric, as its executors and services get it."""
        self.services.fabric = self.fabric
        self._slots = asyncio.Semaphore(self.concurrency)
        self._runs: dict[tuple[str, str, int], _Run] = {}
        self._state = "new"
        self._serve: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    # lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Join the fabric and start taking tasks."""
        await self.endpoint.start()
        self._state = "running"
        self._serve = asyncio.create_task(self._receive(), name=f"node:{self.node_id}")

    @property
    def closed(self) -> bool:
        """True once the node closed or crashed."""
        return self._state == "closed"

    async def wait_closed(self) -> None:
        """Return once the node is closed (for daemons)."""
        await self._closed.wait()

    async def drain(self, grace_s: float = 10.0) -> None:
        """Stop taking tasks, let running ones finish for `grace_s`, hand the rest back."""
        if self._state != "running":
            return
        self._state = "draining"
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for run in list(self._runs.values()):
            if run.task is not None and not run.task.done():
                run.task.cancel("node shutting down; task handed back")
                self.stats.handed_back += 1
        await self._settle()

    async def close(self, grace_s: float = 10.0) -> None:
        """Drain, say bye, leave the fabric. Idempotent."""
        if self._state == "closed":
            return
        await self.drain(grace_s)
        await self._stop(graceful=True)

    async def crash(self) -> None:
        """Stop as if the process died: no answers, no bye (peers learn of it by failure detection)."""
        if self._state == "closed":
            return
        self._state = "closed"  # a dead process answers nothing: the cancelled runs stay silent
        for run in self._runs.values():
            if run.task is not None:
                run.task.cancel()
        self._runs.clear()
        await self._stop(graceful=False)

    async def _stop(self, *, graceful: bool) -> None:
        self._state = "closed"
        if self._serve is not None:
            self._serve.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve
        await self.services.close()
        await (self.endpoint.close() if graceful else self.endpoint.crash())
        self._closed.set()

    async def _settle(self) -> None:
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    def _heartbeat(self, seq: int) -> Heartbeat:
        running = sum(1 for run in self._runs.values() if run.started)
        queued = len(self._runs) - running
        return Heartbeat(seq=seq, running=running, queued=queued, load=len(self._runs) / self.concurrency)

    # receiving -------------------------------------------------------------------------------

    async def _receive(self) -> None:
        async for env in self.endpoint:
            body = env.body
            try:
                if isinstance(body, TaskAssign):
                    await self._on_assign(env, body)
                elif isinstance(body, TaskCancel):
                    self._on_cancel(body)
                elif isinstance(body, Call) and self._state != "closed":
                    self.services.serve(env, body, self.endpoint.reply)
            except FabricError as exc:  # the orchestrator learns of it from missed answers
                log.warning("%s: could not answer %s from %s: %s", self.node_id, env.kind, env.src, exc)

    async def _on_assign(self, env: Envelope, body: TaskAssign) -> None:
        key = (body.job, body.task, body.attempt)
        if key in self._runs:
            return  # the same attempt assigned twice (a retried send): it is already here
        self.stats.assigned += 1
        if self._state != "running":
            await self._answer(
                env,
                TaskFailed(
                    job=body.job,
                    task=body.task,
                    attempt=body.attempt,
                    code="overloaded",
                    message=f"node {self.node_id} is shutting down",
                    retryable=True,
                ),
            )
            return
        await self.endpoint.reply(env, TaskAck(job=body.job, task=body.task, attempt=body.attempt))
        run = _Run(env, body)
        self._runs[key] = run
        run.task = asyncio.create_task(self._run(run), name=f"task:{body.job}/{body.task}#{body.attempt}")

    def _on_cancel(self, body: TaskCancel) -> None:
        for (job, task, attempt), run in self._runs.items():
            if job == body.job and task == body.task and body.attempt in (None, attempt) and run.task:
                run.task.cancel(body.reason or "cancelled by the orchestrator")

    # running ---------------------------------------------------------------------------------

    async def _run(self, run: _Run) -> None:
        body, key, ids = run.body, (run.body.job, run.body.task, run.body.attempt), run.ids
        try:
            try:
                async with self._slots:
                    run.started = True
                    reply = await self._execute(run)
            except asyncio.CancelledError as exc:
                if self._state == "closed":
                    raise
                self.stats.cancelled += 1
                why = str(exc.args[0]) if exc.args else "cancelled"
                reply = TaskFailed(**ids, code="cancelled", message=why, retryable=True)
            await self._answer(run.assign, reply)
        except FabricError as exc:
            log.warning("%s: result of %s/%s not sent: %s", self.node_id, body.job, body.task, exc)
        finally:
            self._runs.pop(key, None)

    async def _execute(self, run: _Run) -> TaskResult | TaskFailed:
        body, ids = run.body, run.ids
        seq = 0

        async def progress(fraction: float | None, message: str, data: Any) -> None:
            nonlocal seq
            update = TaskProgress(**ids, seq=seq, fraction=fraction, message=message, data=data)
            seq += 1
            await self.endpoint.reply(run.assign, update)

        ctx = TaskContext(
            job=body.job,
            task=body.task,
            attempt=body.attempt,
            kind=body.task_kind,
            node=self.node_id,
            params=dict(body.params),
            inputs=dict(body.inputs),
            fabric=self.fabric,
            _progress=progress,
        )
        started = time.perf_counter()
        try:
            executor = await self.registry.load(body.task_kind)
            value = await executor(ctx)
        except UnknownTaskKind as exc:
            self.stats.failed += 1
            return TaskFailed(**ids, code="rejected", message=str(exc), retryable=False)
        except ExecutorFailed as exc:
            self.stats.failed += 1
            return TaskFailed(**ids, code="executor", message=str(exc), retryable=True)
        except Exception as exc:  # an executor's bug fails its task, never the node
            self.stats.failed += 1
            log.exception("%s: executor %r failed", self.node_id, body.task_kind)
            return TaskFailed(**ids, code="executor", message=f"{type(exc).__name__}: {exc}", retryable=True)
        compute_s = time.perf_counter() - started
        if self.slowdown > 1.0:  # an emulated straggler: as if the machine were this much slower
            await asyncio.sleep(compute_s * (self.slowdown - 1.0))
        patch, metrics = [], {"compute_s": compute_s}
        if isinstance(value, Expand):
            value, patch = value.value, value.patch
        if isinstance(value, Measured):
            value, metrics = value.value, {**value.metrics, **metrics}
        try:
            result = TaskResult(**ids, value=value, patch=patch, metrics=metrics)
        except ValueError as exc:
            self.stats.failed += 1
            return TaskFailed(
                **ids, code="executor", message=f"result cannot travel on the wire: {exc}", retryable=False
            )
        self.stats.done += 1
        return result

    async def _answer(self, assign: Envelope, body: TaskResult | TaskFailed) -> None:
        # The orchestrator may wait a long time for a result; answers never expire on their way.
        for attempt in itertools.count():
            try:
                await self.endpoint.send(assign.src, body, corr=assign.id, trace=assign.trace)
                return
            except PeerUnreachable:
                # In another segment, between relays (one died, the next has not reported its
                # routes yet): keep the result while the orchestrator is still believed alive.
                peer = self.endpoint.peers.get(assign.src)
                if peer is None or not peer.alive or attempt >= _ANSWER_TRIES:
                    raise
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
