"""Link emulation: latency, jitter, bandwidth and loss per directed link, on any transport.

Applied by the sending endpoint, so it behaves the same in-process and over MQTT. A link is looked
up by (src, dst) and then (src, "*"); broadcasts and group messages use (src, "*"), the sender's
uplink. Each link is a pipe of two stages:

1. serialisation: frames leave one after another at `bandwidth_mbps` (a frame of n bytes occupies
   the link for n * 8 / bandwidth seconds), then are lost with probability `loss`;
2. propagation: each frame arrives `latency_ms` (+ a uniform jitter in [0, jitter_ms]) after it
   left, never before the frame ahead of it (links are ordered, like the TCP under MQTT).

So a 10 MB blob over 100 Mbit/s and 20 ms takes about 10e6 * 8 / 100e6 + 0.020 = 0.82 s.
Both stages hold a bounded number of frames; a sender waits when they are full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["LinkSpec", "LinkTable"]

log = logging.getLogger("fabric.links")

Deliver = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """The figures of one emulated directed link."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbps: float | None = None
    loss: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError("latency_ms and jitter_ms must be >= 0")
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise ValueError("bandwidth_mbps must be > 0 (or None for unlimited)")
        if not 0 <= self.loss <= 1:
            raise ValueError("loss must be within [0, 1]")

    def transfer_s(self, nbytes: int) -> float:
        """Time for `nbytes` sent back to back to arrive: serialisation plus latency."""
        wire = 0.0 if self.bandwidth_mbps is None else nbytes * 8 / (self.bandwidth_mbps * 1e6)
        return wire + self.latency_ms / 1000


class _Pipe:
    def __init__(self, spec: LinkSpec, deliver: Deliver, rng: random.Random, depth: int) -> None:
        self.spec = spec
        self._deliver = deliver
        self._rng = rng
        self._outgoing: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(depth)
        self._in_flight: asyncio.Queue[tuple[float, str, bytes]] = asyncio.Queue(depth)
        self._free_at = 0.0  # when the serialiser finishes the frames already accepted
        self._last_due = 0.0
        self.lost = 0
        self.delivered = 0
        self.failed = 0
        self.pending = 0  # frames accepted and not yet delivered, lost or failed
        self.idle = asyncio.Event()
        self.idle.set()
        self._tasks = [
            asyncio.create_task(self._serialise(), name="link-serialise"),
            asyncio.create_task(self._propagate(), name="link-propagate"),
        ]

    async def put(self, address: str, frame: bytes) -> None:
        self.pending += 1
        self.idle.clear()
        await self._outgoing.put((address, frame))

    def _done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.idle.set()

    async def _serialise(self) -> None:
        loop = asyncio.get_running_loop()
        bandwidth = self.spec.bandwidth_mbps
        while True:
            address, frame = await self._outgoing.get()
            now = loop.time()
            if bandwidth is not None:
                self._free_at = max(self._free_at, now) + len(frame) * 8 / (bandwidth * 1e6)
                if (
                    self._free_at - now > 0.001
                ):  # sleeping less than a millisecond costs more than it emulates
                    await asyncio.sleep(self._free_at - now)
            if self.spec.loss and self._rng.random() < self.spec.loss:
                self.lost += 1
                self._done()
                continue
            delay = (self.spec.latency_ms + self._rng.uniform(0, self.spec.jitter_ms)) / 1000
            due = max(max(self._free_at, now) + delay, self._last_due)
            self._last_due = due
            await self._in_flight.put((due, address, frame))

    async def _propagate(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, address, frame = await self._in_flight.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self._deliver(address, frame)
                self.delivered += 1
            except Exception:  # a failed delivery must not kill the link for the frames behind it
                self.failed += 1
                log.exception("link: delivery of a frame to %s failed", address)
            self._done()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class LinkTable:
    """The emulated links leaving one node; frames on other links pass straight through.

    >>> links = LinkTable({"edge-1": LinkSpec(latency_ms=20, bandwidth_mbps=100)})  # doctest: +SKIP
    """

    def __init__(
        self, links: dict[str, LinkSpec] | None = None, *, seed: int | None = None, depth: int = 256
    ):
        self._specs: dict[str, LinkSpec] = dict(links or {})
        self._pipes: dict[str, _Pipe] = {}
        self._retired: list[_Pipe] = []  # replaced pipes finish delivering what they hold
        self._rng = random.Random(seed)
        self._depth = depth

    def set(self, dst: str, spec: LinkSpec | None) -> None:
        """Emulate `spec` toward `dst` (``"*"`` for every destination); None removes the link.

        Frames already on the old link are still delivered with the old figures, and before any
        frame sent after this call.
        """
        pipe = self._pipes.pop(dst, None)
        if pipe is not None:
            self._retired.append(pipe)
        if spec is None:
            self._specs.pop(dst, None)
        else:
            self._specs[dst] = spec

    def spec(self, dst: str) -> LinkSpec | None:
        """The link toward `dst`, or the uplink (``"*"``), or None."""
        return self._specs.get(dst) or self._specs.get("*")

    def stats(self) -> dict[str, dict[str, int]]:
        """Frames delivered, lost (emulated loss) and failed (delivery raised) per destination key."""
        return {
            key: {"delivered": p.delivered, "lost": p.lost, "failed": p.failed}
            for key, p in self._pipes.items()
        }

    async def send(self, address: str, frame: bytes, deliver: Deliver) -> None:
        """Pass `frame` to `deliver` through the emulated link toward `address`, if any."""
        key = address if address in self._specs else "*"
        spec = self._specs.get(key)
        pipe = self._pipes.get(key)
        if pipe is not None and pipe.spec != spec:
            # The link changed: frames still on the old one arrive first (links never reorder).
            del self._pipes[key]
            self._retired.append(pipe)
            pipe = None
        await self._settle_retired()
        if spec is None:
            await deliver(address, frame)
            return
        if pipe is None:
            pipe = self._pipes[key] = _Pipe(spec, deliver, self._rng, self._depth)
        await pipe.put(address, frame)

    async def _settle_retired(self) -> None:
        while self._retired:
            old = self._retired.pop(0)
            await old.idle.wait()
            await old.close()

    async def drain(self, timeout: float) -> None:
        """Wait until every frame on every link is delivered or lost, for at most `timeout` s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._settle_retired()
                for pipe in list(self._pipes.values()):
                    await pipe.idle.wait()

    async def close(self) -> None:
        """Stop every pipe; frames still in them are dropped, counted and logged."""
        dropped = sum(p.pending for p in [*self._pipes.values(), *self._retired])
        if dropped:
            log.warning("link emulation closed with %d frames still on its links: dropped", dropped)
        for pipe in [*self._pipes.values(), *self._retired]:
            await pipe.close()
        self._pipes.clear()
        self._retired.clear()
