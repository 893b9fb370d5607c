"""Large payloads cross in chunks: reassembled exactly, mismatches refused, memory bounded."""

import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    BlobChunk,
    ChunkError,
    Envelope,
    Reassembler,
    TaskResult,
    TooLargeError,
    decode,
    encode,
    encode_parts,
    split_blob,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reassemble(chunks: list[BlobChunk], r: Reassembler | None = None) -> bytearray:
    r = r or Reassembler()
    done = [out for c in chunks if (out := r.add(c)) is not None]
    assert len(done) == 1
    return done[0]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(1, 700), st.randoms())
def test_any_payload_reassembles_in_any_order(payload: bytes, chunk_size: int, rnd: random.Random) -> None:
    chunks = list(split_blob(payload, chunk_size=chunk_size))
    assert len(chunks) == max(1, -(-len(payload) // chunk_size))
    rnd.shuffle(chunks)
    assert reassemble(chunks) == payload


def test_a_64_mib_tensor_crosses_in_one_mib_chunks_and_decodes_intact() -> None:
    arr = np.random.default_rng(7).standard_normal(16 << 20).astype(np.float32)  # 64 MiB
    env = Envelope.new(src="edge-1", dst="cloud-1", body=TaskResult(job="j", task="t", attempt=0, value=arr))
    chunks = list(split_blob(encode_parts(env)))
    assert len(chunks) == 65 and all(len(c.data) <= 1 << 20 for c in chunks)
    # every chunk travels as its own frame
    frames = [encode(Envelope.new(src="edge-1", dst="cloud-1", body=c)) for c in chunks]
    r = Reassembler()
    payload = None
    for frame in reversed(frames):
        payload = r.add(decode(frame).body) or payload
    assert payload is not None
    assert np.array_equal(decode(payload).body.value, arr)
    assert r.pending == 0 and r.buffered_bytes == 0


def test_repeated_chunks_are_ignored() -> None:
    chunks = list(split_blob(os.urandom(1000), chunk_size=100))
    r = Reassembler()
    for c in chunks[:-1]:
        assert r.add(c) is None
        assert r.add(c) is None
    assert r.add(chunks[-1]) is not None


def test_a_corrupted_chunk_is_refused_and_the_transfer_survives() -> None:
    payload = os.urandom(1000)
    chunks = list(split_blob(payload, chunk_size=100))
    r = Reassembler()
    r.add(chunks[0])
    bad = chunks[1].model_copy(update={"data": b"x" * 100})
    with pytest.raises(ChunkError, match=r"chunk 1/10 of transfer [0-9a-f]{32}: checksum mismatch"):
        r.add(bad)
    for c in chunks[1:]:
        out = r.add(c)
    assert out == payload


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"count": 11}, "declares 11 chunks"),
        ({"size": 999}, "of 999 bytes in all"),
        ({"offset": 150}, "do not fit"),
        ({"index": 12}, "index is not below count"),
    ],
)
def test_a_chunk_that_does_not_fit_its_transfer_is_refused(change: dict[str, int], message: str) -> None:
    chunks = list(split_blob(os.urandom(1000), chunk_size=100))
    r = Reassembler()
    r.add(chunks[0])
    with pytest.raises(ChunkError, match=message):
        r.add(chunks[1].model_copy(update=change))


def test_memory_is_bounded_and_transfers_under_way_keep_going() -> None:
    r = Reassembler(max_transfer_bytes=1000, max_buffered_bytes=1500)
    a = list(split_blob(os.urandom(1000), chunk_size=100))
    b = list(split_blob(os.urandom(800), chunk_size=100))
    r.add(a[0])
    with pytest.raises(TooLargeError, match="reassembly buffers hold 1010 bytes"):
        r.add(b[0])
    with pytest.raises(TooLargeError, match="exceeds the limit of 1000"):
        r.add(next(split_blob(os.urandom(1001), chunk_size=100)))
    assert reassemble(a[1:], r) == b"".join(c.data for c in a)
    assert reassemble(b, r) == b"".join(c.data for c in b)


def test_idle_partial_transfers_are_dropped_after_the_timeout() -> None:
    clock = FakeClock()
    r = Reassembler(idle_timeout_s=5.0, clock=clock)
    slow = list(split_blob(os.urandom(300), chunk_size=100))
    stuck = list(split_blob(os.urandom(300), chunk_size=100))
    r.add(stuck[0])
    for c in slow[:2]:
        clock.now += 3.0
        r.add(c)
    assert r.pending == 1 and r.expired == 1 and r.buffered_bytes == 300 + 3  # payload + chunk map
    assert r.add(slow[2]) is not None


def test_transfers_from_different_senders_do_not_mix() -> None:
    r = Reassembler()
    one = list(split_blob(b"a" * 200, transfer="0" * 32, chunk_size=100))
    two = list(split_blob(b"b" * 200, transfer="0" * 32, chunk_size=100))
    r.add(one[0], source="edge-1")
    r.add(two[0], source="edge-2")
    assert r.add(one[1], source="edge-1") == b"a" * 200
    assert r.add(two[1], source="edge-2") == b"b" * 200
