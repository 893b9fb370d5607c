"""Frames sent lately through each relay, to be sent again if that relay dies holding them."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Outbox", "Sent"]


@dataclass(frozen=True, slots=True)
class Sent:
    """One frame for `dst`, handed to `relay` at `at` (monotonic seconds)."""

    at: float
    relay: str
    dst: str
    frame: bytes
    deadline: float | None


class Outbox:
    """Remembers what went through which relay for `keep_s` seconds, at most `max_bytes` in all.

    A relay that dies may hold frames it had not passed on yet; whoever sent them learns of the
    death within the failure-detection bound and sends them again by another route (receivers drop
    the copies that did arrive). A frame older than `keep_s` had its relay alive long enough to
    pass it on. Past `max_bytes` the oldest frames are forgotten first (they are then lost with
    their relay, as they would be without this).
    """

    def __init__(
        self, keep_s: float, *, max_bytes: int = 256 << 20, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.keep_s = keep_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._sent: deque[Sent] = deque()
        self._bytes = 0

    def keep(self, relay: str, dst: str, frame: bytes, deadline: float | None) -> None:
        """Remember that `frame` for `dst` was handed to `relay` now."""
        now = self._clock()
        self._sent.append(Sent(now, relay, dst, frame, deadline))
        self._bytes += len(frame)
        sent = self._sent
        while sent and (sent[0].at < now - self.keep_s or self._bytes > self.max_bytes):
            self._bytes -= len(sent.popleft().frame)

    def take(self, relay: str) -> list[Sent]:
        """Forget and return, oldest first, what was handed to `relay` within `keep_s`."""
        horizon = self._clock() - self.keep_s
        taken = [s for s in self._sent if s.relay == relay and s.at >= horizon]
        if taken:
            self._sent = deque(s for s in self._sent if s.relay != relay)
            self._bytes = sum(len(s.frame) for s in self._sent)
        return taken
