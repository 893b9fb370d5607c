"""Services: long-lived parts of a node that answer `call` messages and keep state between calls.

A task runs once and ends; a service lives as long as its node. A model stage is the example: it
loads its layers once and keeps a KV cache per session, and the stage before it (or a driver
task) calls its ``forward`` method for every token. Services are found by name through the
``flowloom.services`` entry points, created on a node's first call to them, and closed with it::

    [project.entry-points."flowloom.services"]
    "llm.stage" = "backends.llm.stage:StageService"

An entry point names a factory: called with the node's `Fabric`, it returns a `Service`.

`Fabric` is the handle executors (``TaskContext.fabric``) and services get on their node: who
is there and what they can do, the cost of moving bytes between two nodes, and `Fabric.call`
to another node's service. A call to a service of the node itself skips the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agents.errors import AgentError
from agents.executors import PluginRegistry
from fabric import Endpoint
from protocol import Call, CallResult, Capabilities, Envelope, Error, ErrorCode

__all__ = [
    "SERVICE_ENTRY_POINT_GROUP",
    "CallFailed",
    "Fabric",
    "LinkCost",
    "Reply",
    "Service",
    "ServiceError",
    "ServiceFactory",
    "ServiceHost",
    "ServiceRegistry",
    "load_services",
]

log = logging.getLogger("agents.services")

SERVICE_ENTRY_POINT_GROUP = "flowloom.services"

LinkCost = Callable[[str, str, int], float]


class ServiceError(AgentError):
    """Raised by a service method: the caller gets an `error` with this code and message."""

    def __init__(self, message: str, code: ErrorCode = "rejected", target: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.target = target
        """The node the failure is about, when it is not the one answering (e.g. unreachable)."""


class CallFailed(AgentError):
    """A service answered a call with an error (its code and message are kept)."""

    def __init__(
        self,
        node: str,
        service: str,
        method: str,
        code: ErrorCode,
        message: str,
        *,
        target: str | None = None,
    ) -> None:
        super().__init__(f"{service}.{method} on {node}: {message} ({code})")
        self.node = node
        self.code: ErrorCode = code
        self.detail = message
        self.target = target
        """The node the failure is about, as the service named it (`ServiceError.target`)."""


@dataclass(frozen=True)
class Reply:
    """A service method's value with figures measured while computing it."""

    value: Any
    metrics: dict[str, float] = field(default_factory=dict)


class Service(Protocol):
    """What a service is: methods called by name, and a close."""

    async def handle(self, method: str, args: dict[str, Any]) -> Any:
        """Run `method` with `args`; return its value (or a `Reply`), raise `ServiceError`."""
        ...

    async def close(self) -> None:
        """Release what the service holds; called once when its node closes."""
        ...


ServiceFactory = Callable[["Fabric"], Service]


class ServiceRegistry(PluginRegistry[ServiceFactory]):
    """Service name -> factory: registered in code, or from ``flowloom.services`` entry points."""

    group = SERVICE_ENTRY_POINT_GROUP
    what = "service"


def load_services(registry: ServiceRegistry) -> None:
    """Import every service of `registry` now (one that fails to load is reported on its first call)."""
    for name in registry.kinds():
        with contextlib.suppress(AgentError):
            registry.get(name)


class Fabric:
    """A node's view of the fabric, for its executors and services (see the module docstring)."""

    def __init__(
        self,
        endpoint: Endpoint,
        capabilities: Capabilities,
        host: ServiceHost,
        link_cost: LinkCost | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.node_id = endpoint.node_id
        self.capabilities = capabilities
        self._host = host
        self._link_cost = link_cost

    def peers(self) -> dict[str, Capabilities]:
        """Every node alive and announced now, this one included, with its capabilities."""
        found = {p.node: p.capabilities for p in self.endpoint.peers.alive() if p.capabilities is not None}
        found[self.node_id] = self.capabilities
        return found

    def alive(self, node: str) -> bool:
        """Whether `node` is this node or a peer not known to be gone."""
        if node == self.node_id:
            return True
        peer = self.endpoint.peers.get(node)
        return peer is not None and peer.alive

    def link_cost(self, src: str, dst: str, nbytes: int) -> float:
        """Seconds to move `nbytes` from `src` to `dst` (0 where no link is known)."""
        if src == dst or self._link_cost is None:
            return 0.0
        return self._link_cost(src, dst, nbytes)

    async def call(
        self,
        node: str,
        service: str,
        method: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float,
    ) -> Reply:
        """Run `service.method(args)` on `node` and return its reply.

        Raises `CallFailed` when the service answers with an error, and the fabric's
        `PeerUnreachable` or `DeadlineExceeded` when `node` dies or does not answer in `timeout`.
        """
        if node == self.node_id:
            return await self._host.run(service, method, dict(args or {}))
        call = Call(service=service, method=method, args=dict(args or {}))
        answer = await self.endpoint.request(node, call, timeout=timeout)
        body = answer.body
        if isinstance(body, CallResult):
            return Reply(body.value, dict(body.metrics))
        if isinstance(body, Error):
            raise CallFailed(node, service, method, body.code, body.message, target=body.target)
        raise CallFailed(node, service, method, "internal", f"answered with {answer.kind}, not call.result")


class ServiceHost:
    """A node's services: made on first call, each call run in its own task, closed with the node.

    At most `concurrency` calls run at once; more wait for a slot in arrival order (backpressure on
    the callers, nothing dropped).
    """

    def __init__(self, node_id: str, registry: ServiceRegistry, concurrency: int = 64) -> None:
        self.node_id = node_id
        self.registry = registry
        self.fabric: Fabric | None = None
        self._services: dict[str, Service] = {}
        self._making: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._calls: set[asyncio.Task[None]] = set()

    async def _service(self, name: str) -> Service:
        service = self._services.get(name)
        if service is not None:
            return service
        async with self._making.setdefault(name, asyncio.Lock()):
            if name not in self._services:
                factory = await self.registry.load(name)
                assert self.fabric is not None, "ServiceHost.fabric is set when its node starts"
                self._services[name] = factory(self.fabric)
            return self._services[name]

    async def run(self, name: str, method: str, args: dict[str, Any]) -> Reply:
        """Run one call here; errors as `Fabric.call` raises them."""
        try:
            service = await self._service(name)
        except AgentError as exc:
            raise CallFailed(self.node_id, name, method, "rejected", str(exc)) from exc
        started = time.perf_counter()
        try:
            value = await service.handle(method, args)
        except ServiceError as exc:
            raise CallFailed(self.node_id, name, method, exc.code, str(exc), target=exc.target) from exc
        if isinstance(value, Reply):
            return value
        return Reply(value, {"compute_s": time.perf_counter() - started})

    def serve(self, env: Envelope, call: Call, answer: Callable[[Envelope, Any], Any]) -> None:
        """Answer `call` (received in `env`) in a task of its own through `answer(env, body)`."""
        task = asyncio.create_task(self._serve(env, call, answer), name=f"call:{call.service}.{call.method}")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _serve(self, env: Envelope, call: Call, answer: Callable[[Envelope, Any], Any]) -> None:
        async with self._slots:
            body: CallResult | Error
            try:
                reply = await self.run(call.service, call.method, dict(call.args))
                body = CallResult(value=reply.value, metrics=reply.metrics)
            except CallFailed as exc:
                body = Error(code=exc.code, message=exc.detail[:1000], ref=env.id, target=exc.target)
            except ValueError as exc:  # the value cannot travel: a bug of the service, said plainly
                why = f"reply cannot travel on the wire: {exc}"
                body = Error(code="internal", message=why[:1000], ref=env.id)
            except Exception as exc:  # a service's bug fails its call, never the node
                log.exception("%s: %s.%s failed", self.node_id, call.service, call.method)
                body = Error(code="executor", message=f"{type(exc).__name__}: {exc}"[:1000], ref=env.id)
        try:
            await answer(env, body)
        except Exception as exc:  # the caller learns of it from its deadline
            log.warning("%s: answer to %s.%s not sent: %s", self.node_id, call.service, call.method, exc)

    async def close(self) -> None:
        """Cancel calls under way and close every service made; idempotent."""
        for task in list(self._calls):
            task.cancel()
        if self._calls:
            await asyncio.wait(list(self._calls))
        services, self._services = list(self._services.values()), {}
        for service in services:
            try:
                await service.close()
            except Exception:
                log.exception("%s: a service failed to close", self.node_id)
