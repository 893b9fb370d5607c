"""Time-sortable identifiers for envelopes and transfers."""

from __future__ import annotations

import itertools
import os
import random
import threading
import time

__all__ = ["new_id"]

_counter = itertools.count()
_lock = threading.Lock()
_last_ms = 0
_node_bits = int.from_bytes(os.urandom(5), "big")
_tail_bits = random.Random(os.urandom(16)).getrandbits


def new_id() -> str:
    """Return a 32-hex-digit id that sorts by creation time within one process.

    Layout: 48 bits of Unix milliseconds, 16 bits of a per-process sequence that restarts every
    millisecond, 40 random bits chosen per process, 24 pseudo-random bits per id. Ids made by one process
    sort in creation order; ids from different processes sort by millisecond.
    """
    global _counter, _last_ms
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms = ms
            _counter = itertools.count()
        else:
            ms = _last_ms
        seq = next(_counter)
        if seq > 0xFFFF:  # more than 65k ids in one millisecond: borrow the next millisecond
            _last_ms = ms = ms + 1
            _counter = itertools.count(1)
            seq = 0
    tail = _tail_bits(24)  # uniqueness comes from time, sequence and node bits; this is extra spread
    return f"{ms:012x}{seq:04x}{_node_bits:010x}{tail:06x}"
