"""HMAC-SHA256 signatures, clock-skew checks and a bounded replay cache.

A signed frame is an ordinary msgpack map whose last entry is ``"sig"``: a 32-byte bin holding
HMAC-SHA256(key[kid], every frame byte up to and including the key ``"sig"``), that is every
byte but the last 34. Verifying needs no re-encoding: the MAC
runs over the received bytes, so a peer in any language can check it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from typing_extensions import Buffer

from protocol._errors import BadSignatureError, ReplayError, StaleError

if TYPE_CHECKING:
    from protocol._envelope import Envelope

__all__ = ["SIG_TRAILER", "Signer", "Verifier"]

#: The last bytes of every signed frame before the MAC: key "sig" (fixstr 3) and bin8 of 32.
SIG_TRAILER = b"\xa3sig\xc4\x20"
_MAC_LEN = 32
_MIN_KEY_LEN = 16


def _check_key(key_id: str, key: bytes) -> None:
    if not key_id or len(key_id) > 64:
        raise ValueError(f"key id must be 1-64 characters, got {key_id!r}")
    if len(key) < _MIN_KEY_LEN:
        raise ValueError(f"key {key_id!r} is {len(key)} bytes; use at least {_MIN_KEY_LEN}")


class Signer:
    """Signs frames with one key of the fabric's keyring.

    >>> signer = Signer("k1", b"0123456789abcdef0123456789abcdef")
    >>> frame = encode(envelope, signer=signer)  # doctest: +SKIP
    """

    def __init__(self, key_id: str, key: bytes) -> None:
        _check_key(key_id, key)
        self.key_id = key_id
        self._key = key

    def mac(self, parts: Iterable[Buffer]) -> bytes:
        """HMAC-SHA256 over the concatenation of `parts`."""
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            h.update(part)
        return h.digest()


class Verifier:
    """Checks signatures, timestamps and ids of received envelopes.

    An envelope passes when it is signed by a known key, its timestamp is within `max_skew_s` of
    this clock, and its id has not been accepted before. Remembered ids are bounded by
    `replay_capacity`. An id is forgotten when its timestamp falls out of the skew window, or,
    when the cache is full, oldest first; either way every timestamp at or below the forgotten
    one's is refused from then on, so no replay slips through, even if the wall clock steps back.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        *,
        max_skew_s: float = 30.0,
        replay_capacity: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for key_id, key in keys.items():
            _check_key(key_id, key)
        if max_skew_s <= 0 or replay_capacity < 1:
            raise ValueError("max_skew_s must be > 0 and replay_capacity >= 1")
        self._keys = dict(keys)
        self.max_skew_s = max_skew_s
        self.replay_capacity = replay_capacity
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._graced: OrderedDict[str, float] = OrderedDict()  # id -> when it is stale even with grace
        self._floor = 0.0

    def check(self, envelope: Envelope, frame: Buffer, *, fresh: bool = True, grace_s: float = 0.0) -> None:
        """Raise `BadSignatureError`, `StaleError` or `ReplayError`, or remember the id and return.

        With ``fresh=False`` only the signature is checked: for frames that are old by design,
        such as retained presence announcements. `grace_s` accepts a timestamp up to that much
        older than `max_skew_s` allows, for an envelope that arrived inside a transfer (chunks or a
        bulk stream) that took long: its carrier, checked without grace, vouches that it is fresh.
        Its id is refused when already accepted, within the grace too.
        """
        who = f"envelope {envelope.id} from {envelope.src!r}"
        if envelope.sig is None or envelope.kid is None:
            raise BadSignatureError(f"{who} is unsigned; this fabric requires signatures")
        key = self._keys.get(envelope.kid)
        if key is None:
            raise BadSignatureError(f"{who} is signed with unknown key id {envelope.kid!r}")
        view = memoryview(frame).cast("B")
        end = len(view) - _MAC_LEN
        if end < len(SIG_TRAILER) or view[end - len(SIG_TRAILER) : end] != SIG_TRAILER:
            raise BadSignatureError(f"{who}: 'sig' is not the last field of the frame")
        expected = hmac.new(key, view[: end - 2], hashlib.sha256).digest()
        if not hmac.compare_digest(expected, envelope.sig):
            raise BadSignatureError(f"{who}: signature does not match key {envelope.kid!r}")
        if not fresh:
            return
        now = self._clock()
        age = now - envelope.ts
        if age > self.max_skew_s + grace_s or age < -self.max_skew_s:
            accepted = f"+-{self.max_skew_s:g}s" + (f" (+{grace_s:g}s for its transfer)" if grace_s else "")
            raise StaleError(f"{who}: timestamp is {age:+.1f}s from this clock; accepted skew is {accepted}")
        if envelope.id in self._seen or envelope.id in self._graced:
            raise ReplayError(f"{who} was already accepted (replayed id)")
        if grace_s:
            # Inside a transfer the carrier already passed the horizon check (the floor could
            # refuse a frame its own transfer made old). Its id is kept apart, until it is stale
            # even with its grace, so it never moves the floor that guards everything else.
            graced = self._graced
            graced[envelope.id] = envelope.ts + grace_s + self.max_skew_s
            while graced and (next(iter(graced.values())) < now or len(graced) > self.replay_capacity):
                graced.popitem(last=False)
            return
        if envelope.ts <= self._floor:
            raise StaleError(f"{who}: timestamp is at or below the replay horizon {self._floor:.3f}")
        self._remember(envelope.id, envelope.ts, now)

    def _remember(self, envelope_id: str, ts: float, now: float) -> None:
        seen = self._seen
        seen[envelope_id] = ts
        horizon = now - self.max_skew_s
        while seen:
            oldest_id, oldest_ts = next(iter(seen.items()))
            if oldest_ts < horizon:
                del seen[oldest_id]
                # Refused anyway while the clock moves forward; this also holds if it steps back.
                self._floor = max(self._floor, oldest_ts)
            elif len(seen) > self.replay_capacity:
                del seen[oldest_id]
                self._floor = max(self._floor, oldest_ts)
            else:
                break
