"""The orchestrator: runs a job's task graph on the nodes of a fabric.

Each ready task is placed on the alive node that can run it at the least estimated cost:

    queue wait (tasks outstanding beyond its cores x the kind's expected compute on it)
    + expected compute (moving average of the `compute_s` its results reported; 10 ms unknown)
    + transfer of its inputs from the nodes that produced them (`link_cost`, from the scenario links)

and dispatched at once (every ready task, concurrently). Then:

- a result is accepted exactly once: the first for a running task; later, duplicate or stale ones
  (an attempt already given up, a speculative copy that lost) are ignored and counted;
- a failure is retried after a jittered exponential backoff, up to the task's `retries`; a node
  that hands a task back (draining) gets it reassigned at once without using a retry;
- when a node dies or leaves, its tasks are reassigned to others;
- a task running longer than its `timeout_s` is cancelled on its node and counts as a failure;
- a straggler (running `speculate_after` times longer than expected, and at least
  `speculate_min_s`) gets a speculative copy on another node with a free slot; the first result
  wins and the other copy is cancelled;
- a result may carry a graph patch (dynamic expansion); patches also come from `patch` and, over
  the wire, from nodes listed in `authorised` (`graph.patch`); a rejected patch is reported and
  changes nothing;
- with a `Journal`, every accepted result, dispatch, failure and patch is written before it takes
  effect, and `resume` rebuilds the job from it: finished tasks are not run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agents.errors import PatchRejected
from agents.graph import FINISHED, TaskGraph
from agents.journal import Journal
from fabric import Endpoint, FabricError, PeerEvent
from protocol import (
    AddTask,
    Envelope,
    Error,
    GraphPatch,
    PatchOp,
    ProtocolError,
    TaskAck,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskProgress,
    TaskResult,
)

__all__ = ["JobEvent", "Orchestrator", "OrchestratorStats"]

log = logging.getLogger("agents.orchestrator")

_REPLACE_S = 0.25
"""While a ready task has no node to go to, placement is tried again this often (and on every event)."""

LinkCost = Callable[[str, str, int], float]
"""(producer node, consumer node, bytes) -> seconds to move them."""

DEFAULT_COMPUTE_S = 0.01


@dataclass
class OrchestratorStats:
    """Counters of one run, for the report."""

    dispatched: int = 0
    accepted: int = 0
    ignored_results: int = 0
    """Late, duplicate or stale results (never accepted twice)."""
    retries: int = 0
    reassigned: int = 0
    timeouts: int = 0
    speculative: int = 0
    patches_applied: int = 0
    patches_rejected: int = 0


@dataclass(frozen=True)
class JobEvent:
    """Something that happened to a task, for progress displays, traces and reports."""

    t: float
    """Seconds since the run started."""
    kind: Literal[
        "dispatch",
        "done",
        "failed",
        "retry",
        "reassign",
        "timeout",
        "speculate",
        "cancel",
        "patch",
        "progress",
    ]
    task: str
    node: str | None = None
    attempt: int | None = None
    detail: str = ""


@dataclass
class _Attempt:
    task: str
    attempt: int
    node: str
    started: float
    """When it began running on its node, as far as the orchestrator can tell; inf while it waits
    in the node's queue behind as many attempts as the node has cores."""
    speculative: bool = False
    timer: asyncio.TimerHandle | None = None
    sent_id: str | None = None
    """The id of the assignment's envelope, until the node acknowledges it."""


@dataclass
class _Estimates:
    """Moving averages of compute time per (kind, node) and per kind."""

    by_node: dict[tuple[str, str], float] = field(default_factory=dict)
    by_kind: dict[str, float] = field(default_factory=dict)

    def get(self, kind: str, node: str) -> float:
        return self.by_node.get((kind, node)) or self.by_kind.get(kind) or DEFAULT_COMPUTE_S

    def add(self, kind: str, node: str, seconds: float) -> None:
        old = self.by_node.get((kind, node))
        self.by_node[(kind, node)] = seconds if old is None else 0.8 * old + 0.2 * seconds
        old = self.by_kind.get(kind)
        self.by_kind[kind] = seconds if old is None else 0.8 * old + 0.2 * seconds


def approx_size(value: Any, depth: int = 0) -> int:
    """Rough wire size of a value in bytes, for transfer estimates (exact for tensors and bytes)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    nbytes = getattr(value, "nbytes", None)  # torch tensors and friends
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, bytes | bytearray | str):
        return len(value)
    if depth < 4 and isinstance(value, dict):
        return sum(approx_size(v, depth + 1) + 8 for v in value.values())
    if depth < 4 and isinstance(value, list | tuple):
        return sum(approx_size(v, depth + 1) for v in value)
    return 8


class Orchestrator:
    """Runs task graphs on the nodes its endpoint can see (see the module docstring)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        journal: Journal | None = None,
        link_cost: LinkCost | None = None,
        retry_backoff_s: float = 0.05,
        retry_backoff_max_s: float = 2.0,
        speculate_after: float = 3.0,
        speculate_min_s: float = 0.5,
        speculation: bool = True,
        authorised: Sequence[str] = (),
        nodes: Collection[str] | None = None,
        on_event: Callable[[JobEvent], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.journal = journal
        self.link_cost = link_cost
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.speculate_after = speculate_after
        self.speculate_min_s = speculate_min_s
        self.speculation = speculation
        self.authorised = set(authorised)
        self.nodes = None if nodes is None else frozenset(nodes)
        """The only nodes tasks are placed on; None: every node of the fabric that can run them."""
        self.stats = OrchestratorStats()
        self.events: list[JobEvent] = []
        self._on_event = on_event
        self.graph: TaskGraph | None = None
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._by_task: dict[str, set[int]] = defaultdict(set)
        self._next_attempt: dict[str, int] = defaultdict(int)
        self._retries_used: dict[str, int] = defaultdict(int)
        self._backoff: set[str] = set()  # tasks waiting out a retry backoff
        self._outstanding: dict[str, int] = defaultdict(int)
        # Per node, attempts sent beyond its cores, in dispatch order: a node runs its assignments
        # first come, first served, so each starts when an earlier one ends (the straggler clock).
        self._waiting: dict[str, deque[_Attempt]] = defaultdict(deque)
        self._produced_on: dict[str, str] = {}
        # Assignments sent and not yet acknowledged, by envelope id: a relay that cannot pass one
        # on answers with an `unreachable` error about that id.
        self._unacked: dict[str, tuple[str, int]] = {}
        self._unroutable_until: dict[str, float] = {}  # node -> monotonic time: not placed on before
        self._estimates = _Estimates()
        self._rng = random.Random()
        self._started = time.monotonic()
        self._finished: asyncio.Event = asyncio.Event()
        self._kick: asyncio.Event = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoint.add_peer_listener(self._on_peer)

    # running a job ---------------------------------------------------------------------------

    async def run(self, graph: TaskGraph, *, timeout: float | None = None) -> TaskGraph:
        """Run `graph` until every task is finished; return it (states, results, errors).

        After `timeout` seconds, what has not finished is cancelled and the graph returned as is.
        """
        self.graph = graph
        self._started = time.monotonic()
        if self.journal is not None and graph.job not in self.journal.jobs():
            self._journal("job", self._job_patch(graph))
        try:
            async with asyncio.TaskGroup() as tg:
                receiver = tg.create_task(self._receive(), name=f"orchestrator:{graph.job}:receive")
                dispatcher = tg.create_task(self._dispatch_loop(), name=f"orchestrator:{graph.job}:dispatch")
                watcher = tg.create_task(self._watch(), name=f"orchestrator:{graph.job}:watch")
                try:
                    async with asyncio.timeout(timeout):
                        await self._finished.wait()
                except TimeoutError:
                    for task_id in list(graph.graph.nodes):
                        if graph.task(task_id).state not in FINISHED:
                            await self.cancel(task_id, f"job timed out after {timeout:g}s")
                for bg in (receiver, dispatcher, watcher):
                    bg.cancel()
        finally:
            for attempt in self._attempts.values():
                if attempt.timer is not None:
                    attempt.timer.cancel()
        return graph

    def resume(self, job: str | None = None) -> TaskGraph:
        """Rebuild a job's graph from this orchestrator's journal (the last job unless named).

        Finished tasks keep their results and states, and new attempts are numbered after the
        journaled ones; pass the graph to `run` to finish the job.
        """
        journal = self.journal
        if journal is None:
            raise ValueError("resume needs an orchestrator built with a journal")
        jobs = journal.jobs()
        if not jobs:
            raise ValueError(f"journal {journal.path} holds no job")
        job = job or jobs[-1]
        graph: TaskGraph | None = None
        for kind, env in journal.entries(job):
            body = env.body
            if kind == "job" and isinstance(body, GraphPatch):
                graph = TaskGraph(job)
                graph.apply(body.ops)
            elif graph is None:
                continue
            elif kind == "patch" and isinstance(body, GraphPatch):
                graph.apply(body.ops)
            elif kind == "dispatch" and isinstance(body, TaskAssign):
                self._next_attempt[body.task] = max(self._next_attempt[body.task], body.attempt + 1)
            elif kind == "result" and isinstance(body, TaskResult):
                if graph.task(body.task).state == "ready":
                    graph.mark_running(body.task, env.src)
                    graph.mark_done(body.task, body.value)
                # A result's patch, if it was applied, has its own "patch" entry right after.
            elif kind == "failed" and isinstance(body, TaskFailed):
                graph.mark_failed(body.task, body.message)
            elif kind == "cancelled" and isinstance(body, TaskCancel):
                graph.mark_cancelled(body.task, body.reason)
        if graph is None:
            raise ValueError(f"journal {journal.path} has no graph for job {job!r}")
        return graph

    def patch(self, ops: Sequence[PatchOp], *, source: str = "api") -> None:
        """Apply a patch to the running job (atomically; `PatchRejected` says why not)."""
        graph = self._graph()
        graph.apply(ops)
        self._journal(
            "patch",
            Envelope.new(
                src=self.endpoint.node_id,
                dst="*",
                body=GraphPatch(job=graph.job, ops=list(ops), reason=source),
            ),
        )
        self.stats.patches_applied += 1
        self._event("patch", ops[0].op if ops else "", detail=f"{len(ops)} ops from {source}")
        self._kick.set()

    async def cancel(self, task_id: str, reason: str = "cancelled") -> None:
        """Cancel a task (on its node too); everything downstream is skipped."""
        graph = self._graph()
        task = graph.task(task_id)
        if task.state in FINISHED:
            return
        for attempt in self._drop_attempts(task_id):
            with contextlib.suppress(FabricError):
                await self.endpoint.send(
                    attempt.node,
                    TaskCancel(job=graph.job, task=task_id, attempt=attempt.attempt, reason=reason),
                )
        self._backoff.discard(task_id)
        self._journal(
            "cancelled",
            Envelope.new(
                src=self.endpoint.node_id,
                dst="*",
                body=TaskCancel(job=graph.job, task=task_id, reason=reason),
            ),
        )
        graph.mark_cancelled(task_id, reason)
        self._event("cancel", task_id, detail=reason)
        self._check_finished()

    # dispatching -----------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        self._check_finished()
        while True:
            await self._dispatch_ready()
            if self._graph().ready():
                # Unplaced for now: a node may come into reach with no event (a relay reports a
                # route again), so look again soon as well as on the next event.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_REPLACE_S):
                        await self._kick.wait()
            else:
                await self._kick.wait()
            self._kick.clear()

    async def _dispatch_ready(self) -> None:
        graph = self._graph()
        for task_id in graph.ready():
            if task_id in self._backoff or graph.task(task_id).state != "ready":
                continue
            node = self._place(task_id)
            if node is None:
                continue  # no capable node now; tried again when nodes join or free up
            await self._dispatch(task_id, node)

    def _place(self, task_id: str, exclude: set[str] | None = None, free_only: bool = False) -> str | None:
        # Called for every dispatch and loops over the alive nodes: what does not depend on the node is
        # read once, before the loop.
        graph = self._graph()
        spec = graph.task(task_id).spec
        kind, where, needs = spec.kind, spec.placement, spec.needs
        tier, pinned, labels, accelerators = where.tier, where.node, where.labels, needs.accelerators
        link_cost, produced_on = self.link_cost, self._produced_on
        inputs = (
            [(up, approx_size(graph.task(up).result)) for up in spec.inputs.values()]
            if link_cost is not None
            else []
        )
        outstanding_of, estimate, allowed = self._outstanding, self._estimates.get, self.nodes
        reachable, unroutable, now = self.endpoint.reachable, self._unroutable_until, time.monotonic()
        best, best_cost = None, float("inf")
        for peer in self.endpoint.peers.alive():
            caps = peer.capabilities
            node = peer.node
            if caps is None or kind not in caps.task_kinds or (exclude and node in exclude):
                continue
            if allowed is not None and node not in allowed:
                continue
            if tier is not None and caps.tier != tier:
                continue
            if pinned is not None and node != pinned:
                continue
            if labels and any(caps.labels.get(k) != v for k, v in labels.items()):
                continue
            cores = caps.cores
            if needs.cores > cores or needs.memory_mb > caps.memory_mb:
                continue
            if accelerators and any(acc not in caps.accelerators for acc in accelerators):
                continue
            if not reachable(node) or unroutable.get(node, 0.0) > now:  # no relay to it just now
                continue
            outstanding = outstanding_of[node]
            if free_only and outstanding >= cores:
                continue
            compute = estimate(kind, node)
            queue = max(0, outstanding + 1 - cores) / cores * compute
            transfer = 0.0
            if link_cost is not None:
                for upstream, nbytes in inputs:
                    source = produced_on.get(upstream)
                    if source is not None and source != node:
                        transfer += link_cost(source, node, nbytes)
            # The tiny load term spreads ties (idle nodes, unknown costs) across nodes.
            cost = queue + compute + transfer + outstanding * 1e-9
            if cost < best_cost:
                best, best_cost = node, cost
        return best

    async def _dispatch(self, task_id: str, node: str, *, speculative: bool = False) -> None:
        graph = self._graph()
        task = graph.task(task_id)
        attempt_no = self._next_attempt[task_id]
        self._next_attempt[task_id] += 1
        if not speculative:
            graph.mark_running(task_id, node)
        spec = task.spec
        assign = TaskAssign(
            job=graph.job,
            task=task_id,
            attempt=attempt_no,
            task_kind=spec.kind,
            params=spec.params,
            inputs=graph.inputs_of(task_id) if spec.inputs else {},
            timeout_s=spec.timeout_s,
        )
        attempt = _Attempt(task_id, attempt_no, node, time.monotonic(), speculative)
        if self._outstanding[node] >= self._cores(node):
            attempt.started = math.inf
            self._waiting[node].append(attempt)
        self._attempts[(task_id, attempt_no)] = attempt
        self._by_task[task_id].add(attempt_no)
        self._outstanding[node] += 1
        if attempt.started != math.inf:
            self._arm_timeout(attempt)
        if self.journal is not None:
            env = Envelope.new(src=self.endpoint.node_id, dst=node, body=assign, trace=graph.job)
            self._journal("dispatch", env)
        self.stats.dispatched += 1
        self._event("speculate" if speculative else "dispatch", task_id, node, attempt_no, self._via(node))
        try:
            sent = await self.endpoint.send(node, assign, trace=graph.job)
            self._unacked[sent.id] = (task_id, attempt_no)
            attempt.sent_id = sent.id
        except ProtocolError as exc:  # its params or inputs cannot travel: no retry will help
            log.warning("dispatch of %s failed: %s", task_id, exc)
            self._give_up_attempt(task_id, attempt_no)
            if not self._by_task[task_id]:
                self._retry_or_fail(task_id, f"cannot be sent: {exc}", False, node)
            self._kick.set()
        except FabricError as exc:  # the node vanished between placement and send: place it again
            log.warning("dispatch of %s to %s failed: %s", task_id, node, exc)
            self._give_up_attempt(task_id, attempt_no)
            if not self._by_task[task_id] and task.state == "running":
                graph.reset(task_id)
            self._kick.set()

    # receiving -------------------------------------------------------------------------------

    async def _receive(self) -> None:
        async for env in self.endpoint:
            body = env.body
            if env.corr is not None and isinstance(body, TaskResult | TaskFailed | TaskAck):
                self._unacked.pop(env.corr, None)  # delivered
            try:
                if isinstance(body, Error) and body.code == "unreachable" and env.corr is not None:
                    self._on_undelivered(env.corr, env.src, body)
                elif isinstance(body, TaskResult):
                    await self._on_result(env, body)
                elif isinstance(body, TaskAck):
                    pass  # the node has it; nothing to do until its result
                elif isinstance(body, TaskFailed):
                    self._on_failed(body)
                elif isinstance(body, TaskProgress):
                    self._event("progress", body.task, env.src, body.attempt, body.message)
                elif isinstance(body, GraphPatch):
                    await self._on_wire_patch(env, body)
            except Exception:  # one bad message must not stop the job
                log.exception("orchestrator: handling %s from %s failed", env.kind, env.src)
            # Never send from here: this loop must keep draining the inbox, or a node blocked on
            # sending us results and we blocked on sending it work would wait for each other.
            self._check_finished()

    def _on_undelivered(self, assign_id: str, by: str, error: Error) -> None:
        """A relay could not pass an assignment on: place the task again, elsewhere for a moment."""
        key = self._unacked.pop(assign_id, None)
        if key is None:
            return
        task_id, attempt_no = key
        attempt = self._give_up_attempt(task_id, attempt_no)
        if attempt is None:
            return
        self._unroutable_until[attempt.node] = time.monotonic() + _REPLACE_S
        why = f"not delivered: {by} reports {error.message}"
        self._event("retry", task_id, attempt.node, attempt_no, why)
        graph = self._graph()
        if not self._by_task[task_id] and graph.task(task_id).state == "running":
            graph.reset(task_id)
        self._kick.set()

    async def _on_result(self, env: Envelope, body: TaskResult) -> None:
        graph = self._graph()
        key = (body.task, body.attempt)
        attempt = self._attempts.get(key)
        if body.job != graph.job or attempt is None or body.task not in graph:
            self.stats.ignored_results += 1
            return
        task = graph.task(body.task)
        if task.state != "running":
            self.stats.ignored_results += 1
            return
        # Durable before it counts: a resumed orchestrator must find every accepted result.
        self._journal("result", env)
        for other in self._drop_attempts(body.task):
            if other.attempt != body.attempt:  # the losing copy of a speculated task
                cancel = TaskCancel(
                    job=graph.job, task=body.task, attempt=other.attempt, reason="another copy won"
                )
                self._background(self._send_quietly(other.node, cancel), f"cancel:{body.task}")
        graph.mark_done(body.task, body.value)
        task.node = attempt.node
        task.metrics = {k: v for k, v in body.metrics.items() if k != "compute_s"}
        self._produced_on[body.task] = attempt.node
        self.stats.accepted += 1
        compute = body.metrics.get("compute_s")
        if compute is not None:
            self._estimates.add(task.spec.kind, attempt.node, compute)
        via = f"via {' > '.join(reversed(env.hops))}" if env.hops else ""  # the result came relayed
        self._event("done", body.task, attempt.node, body.attempt, via)
        if body.patch:
            try:
                self.patch(body.patch, source=f"result of {body.task}")
            except PatchRejected as exc:
                self.stats.patches_rejected += 1
                self._event("patch", body.task, attempt.node, detail=f"rejected: {exc}")
        self._kick.set()

    def _on_failed(self, body: TaskFailed) -> None:
        graph = self._graph()
        attempt = self._attempts.get((body.task, body.attempt))
        if body.job != graph.job or attempt is None:
            self.stats.ignored_results += 1
            return
        self._give_up_attempt(body.task, body.attempt)
        if self._by_task[body.task]:
            return  # another copy is still running
        if (body.code == "cancelled" and body.retryable) or body.code == "overloaded":
            # Handed back by a draining node: not the task's fault, run it elsewhere now.
            graph.reset(body.task)
            self.stats.reassigned += 1
            self._event("reassign", body.task, attempt.node, body.attempt, body.message)
            self._kick.set()
            return
        self._retry_or_fail(body.task, body.message, body.retryable, attempt.node, body)

    def _retry_or_fail(
        self, task_id: str, message: str, retryable: bool, node: str | None, body: TaskFailed | None = None
    ) -> None:
        graph = self._graph()
        spec = graph.task(task_id).spec
        used = self._retries_used[task_id]
        if retryable and used < spec.retries:
            self._retries_used[task_id] = used + 1
            self.stats.retries += 1
            delay = min(self.retry_backoff_max_s, self.retry_backoff_s * 2**used) * self._rng.uniform(
                0.5, 1.0
            )
            self._backoff.add(task_id)
            graph.reset(task_id)
            asyncio.get_running_loop().call_later(delay, self._end_backoff, task_id)
            self._event(
                "retry",
                task_id,
                node,
                detail=f"{message} (retry {used + 1} of {spec.retries} in {delay:.2f}s)",
            )
            return
        failure = body or TaskFailed(job=graph.job, task=task_id, attempt=0, code="timeout", message=message)
        self._journal("failed", Envelope.new(src=node or self.endpoint.node_id, dst="*", body=failure))
        skipped = graph.mark_failed(task_id, message)
        self._event(
            "failed",
            task_id,
            node,
            detail=message + (f"; skipped {len(skipped)} downstream" if skipped else ""),
        )
        self._check_finished()

    def _end_backoff(self, task_id: str) -> None:
        self._backoff.discard(task_id)
        self._kick.set()

    async def _on_wire_patch(self, env: Envelope, body: GraphPatch) -> None:
        job = self._graph().job
        if env.src not in self.authorised:
            why = f"{env.src} is not authorised to patch jobs"
        elif body.job != job:
            why = f"no job {body.job} here (this orchestrator runs {job})"
        else:
            try:
                self.patch(body.ops, source=f"graph.patch from {env.src}")
                return
            except PatchRejected as exc:
                why = str(exc)
        self.stats.patches_rejected += 1
        self._event("patch", "", env.src, detail=f"rejected: {why}")
        answer = env.reply(Error(code="rejected", message=why, ref=env.id), src=self.endpoint.node_id)
        self._background(self._send_envelope_quietly(answer), "patch-rejected")

    # faults ----------------------------------------------------------------------------------

    def _on_peer(self, event: PeerEvent) -> None:
        if self.graph is None:
            return
        if event.kind == "joined":
            self._kick.set()
            return
        for attempt in [a for a in self._attempts.values() if a.node == event.node]:
            self._give_up_attempt(attempt.task, attempt.attempt)
            if not self._by_task[attempt.task] and self.graph.task(attempt.task).state == "running":
                self.graph.reset(attempt.task)
                self.stats.reassigned += 1
                self._event("reassign", attempt.task, event.node, attempt.attempt, f"node {event.kind}")
        self._kick.set()

    def _on_timeout(self, task_id: str, attempt_no: int) -> None:
        attempt = self._attempts.get((task_id, attempt_no))
        if attempt is None:
            return
        graph = self._graph()
        self.stats.timeouts += 1
        self._give_up_attempt(task_id, attempt_no)
        cancel = TaskCancel(job=graph.job, task=task_id, attempt=attempt_no, reason="timed out")
        self._background(self._send_quietly(attempt.node, cancel), f"cancel:{task_id}")
        timeout = graph.task(task_id).spec.timeout_s
        self._event("timeout", task_id, attempt.node, attempt_no, f"after {timeout}s")
        if not self._by_task[task_id]:
            self._retry_or_fail(task_id, f"timed out after {timeout}s on {attempt.node}", True, attempt.node)
        self._kick.set()

    async def _send_quietly(self, node: str, body: Any) -> None:
        with contextlib.suppress(FabricError):
            await self.endpoint.send(node, body)

    async def _send_envelope_quietly(self, env: Envelope) -> None:
        with contextlib.suppress(FabricError):
            await self.endpoint.send(env.dst, env.body, corr=env.corr)

    def _background(self, coro: Any, name: str) -> None:
        """Send without making the caller wait (the receive loop must never block on a send)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        """Speculate on stragglers."""
        while True:
            await asyncio.sleep(0.05)
            if not self.speculation:
                continue
            if not self._any_free_slot():
                continue  # a copy needs a free slot: no need to look at every attempt
            now = time.monotonic()
            graph = self._graph()
            for attempt in list(self._attempts.values()):
                if len(self._by_task[attempt.task]) > 1 or attempt.task not in graph:
                    continue
                kind = graph.task(attempt.task).spec.kind
                expected = self._estimates.by_kind.get(kind)
                if expected is None:
                    continue  # nothing finished yet to compare with
                limit = max(self.speculate_min_s, self.speculate_after * expected)
                if now - attempt.started < limit:
                    continue
                node = self._place(attempt.task, exclude={attempt.node}, free_only=True)
                if node is not None:
                    self.stats.speculative += 1
                    await self._dispatch(attempt.task, node, speculative=True)
                    if not self._any_free_slot():
                        break

    def _any_free_slot(self) -> bool:
        """True when some alive node has fewer tasks outstanding than cores (`free_only` placement)."""
        outstanding = self._outstanding
        return any(
            peer.capabilities is not None
            and outstanding.get(peer.node, 0) < peer.capabilities.cores
            and (self.nodes is None or peer.node in self.nodes)
            for peer in self.endpoint.peers.alive()
        )

    # bookkeeping -----------------------------------------------------------------------------

    def _graph(self) -> TaskGraph:
        if self.graph is None:
            raise RuntimeError("the orchestrator has no job: call run(graph) first")
        return self.graph

    def _give_up_attempt(self, task_id: str, attempt_no: int) -> _Attempt | None:
        attempt = self._attempts.pop((task_id, attempt_no), None)
        if attempt is None:
            return None
        self._by_task[task_id].discard(attempt_no)
        self._outstanding[attempt.node] -= 1
        if attempt.sent_id is not None:  # never acknowledged (its node died, say): forget it
            self._unacked.pop(attempt.sent_id, None)
        if attempt.timer is not None:
            attempt.timer.cancel()
        if attempt.started != math.inf:  # a slot freed: the next waiting attempt starts now
            waiting = self._waiting[attempt.node]
            while waiting:
                nxt = waiting.popleft()
                if self._attempts.get((nxt.task, nxt.attempt)) is nxt:
                    nxt.started = time.monotonic()
                    self._arm_timeout(nxt)
                    break
        return attempt

    def _arm_timeout(self, attempt: _Attempt) -> None:
        """Start the attempt's `timeout_s` from now: it runs from now (not from its dispatch)."""
        timeout = self._graph().task(attempt.task).spec.timeout_s
        if timeout is not None:
            attempt.timer = asyncio.get_running_loop().call_later(
                timeout, self._on_timeout, attempt.task, attempt.attempt
            )

    def _cores(self, node: str) -> int:
        peer = self.endpoint.peers.get(node)
        return peer.capabilities.cores if peer is not None and peer.capabilities is not None else 1

    def _drop_attempts(self, task_id: str) -> list[_Attempt]:
        dropped = [self._give_up_attempt(task_id, n) for n in list(self._by_task[task_id])]
        return [a for a in dropped if a is not None]

    def _check_finished(self) -> None:
        if self.graph is not None and self.graph.finished():
            self._finished.set()

    def _journal(self, kind: Any, env: Envelope) -> None:
        if self.journal is not None and self.graph is not None:
            self.journal.append(self.graph.job, kind, env)

    def _job_patch(self, graph: TaskGraph) -> Envelope:
        ops: list[PatchOp] = []
        for task_id in graph.order():
            after = [
                u
                for u in graph.graph.predecessors(task_id)
                if u not in graph.task(task_id).spec.inputs.values()
            ]
            ops.append(AddTask(task=graph.task(task_id).spec, after=after))
        return Envelope.new(
            src=self.endpoint.node_id, dst="*", body=GraphPatch(job=graph.job, ops=ops, reason="job")
        )

    def _via(self, node: str) -> str:
        """``via relay-1`` when messages to `node` go through relays (for traces), else empty."""
        try:
            path = self.endpoint.route(node)
        except FabricError:
            return ""
        return f"via {' > '.join(path[1:-1])}" if len(path) > 2 else ""

    def _event(
        self, kind: Any, task: str, node: str | None = None, attempt: int | None = None, detail: str = ""
    ) -> None:
        event = JobEvent(time.monotonic() - self._started, kind, task, node, attempt, detail)
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)
