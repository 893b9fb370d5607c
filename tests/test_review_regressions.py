"""Each test pins a hole found in review: hostile inputs that once crashed, hung or lied."""

import struct
import time

import msgpack
import numpy as np
import pytest

from protocol import (
    BlobChunk,
    ChunkError,
    DecodeError,
    Envelope,
    Lossy,
    Reassembler,
    ReplayError,
    Signer,
    TaskProgress,
    TaskResult,
    Verifier,
    decode,
    encode,
    split_blob,
)
from protocol._codec import MAX_VALUES, ZERO_COPY_MIN

KEY = b"k" * 32


def progress_frame(data: object) -> bytes:
    plain = msgpack.unpackb(
        encode(Envelope.new(src="a", dst="b", body=TaskProgress(job="j", task="t", attempt=0, seq=0)))
    )
    plain["body"]["data"] = data
    return msgpack.packb(plain)


def test_an_empty_chunk_that_is_not_the_last_is_a_chunk_error() -> None:
    for index, offset in [(0, 0), (1, 0)]:
        chunk = BlobChunk(transfer="0" * 32, index=index, count=2, size=10, offset=offset, crc32c=0, data=b"")
        with pytest.raises(ChunkError):
            Reassembler().add(chunk)


def test_a_redelivered_transfer_is_returned_once_and_leaves_nothing_buffered() -> None:
    r = Reassembler()
    chunks = list(split_blob(b"x" * 1000, chunk_size=100))
    results = [r.add(c) for c in chunks + chunks]
    assert sum(x is not None for x in results) == 1
    assert r.pending == 0 and r.buffered_bytes == 0
    single = next(split_blob(b"tiny"))
    assert r.add(single) == b"tiny"
    assert r.add(single) is None


def test_a_frame_of_millions_of_tiny_values_is_refused_quickly() -> None:
    n = 2_000_000  # an array of two million empty maps, one byte each
    hostile = progress_frame(None).replace(
        b"\xa4data\xc0", b"\xa4data\xdd" + struct.pack(">I", n) + b"\x80" * n
    )
    assert len(hostile) > ZERO_COPY_MIN
    started = time.perf_counter()
    with pytest.raises(DecodeError, match=f"more than {MAX_VALUES} values"):
        decode(hostile)
    assert time.perf_counter() - started < 60  # generous: it stops after MAX_VALUES, not n


@pytest.mark.parametrize("pad_to", [0, ZERO_COPY_MIN])
def test_both_decoders_refuse_the_same_deep_value(pad_to: int) -> None:
    deep: object = 0
    for _ in range(40):
        deep = [deep]
    frame = progress_frame([deep, b"\x00" * pad_to])
    with pytest.raises(DecodeError, match="nests deeper than 32 levels"):
        decode(frame)


def test_non_string_map_keys_are_refused_by_both_decoders() -> None:
    small = progress_frame({1: 2})
    large = progress_frame([{1: 2}, b"\x00" * ZERO_COPY_MIN])
    for frame in (small, large):
        with pytest.raises(DecodeError):
            decode(frame)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_replay_is_refused_even_after_the_clock_steps_back() -> None:
    clock = Clock(1_000_000.0)
    v = Verifier({"k": KEY}, max_skew_s=30, clock=clock)
    signer = Signer("k", KEY)
    beat = Envelope.new(src="a", dst="b", body=TaskProgress(job="j", task="t", attempt=0, seq=0))
    f1 = encode(beat.model_copy(update={"ts": clock.now}), signer=signer)
    decode(f1, verifier=v)
    clock.now += 31
    decode(encode(beat.model_copy(update={"ts": clock.now, "id": "f" * 32}), signer=signer), verifier=v)
    clock.now -= 20
    with pytest.raises(ReplayError):
        decode(f1, verifier=v)


def carry(value: object) -> object:
    env = Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=value))
    return decode(encode(env)).body.value


def test_lossy_formats_saturate_instead_of_producing_inf() -> None:
    assert np.isfinite(carry(Lossy(np.array([1e39]), "bfloat16"))).all()
    assert np.isfinite(carry(Lossy(np.float16([65504]), "bfloat16"))).all()
    assert carry(Lossy(np.float16([65504]), "bfloat16"))[0] == np.float16(65504)
    got = carry(Lossy(np.array([1e39, 1.0]), "int8"))
    assert np.isfinite(got).all() and got[1] == pytest.approx(0.0, abs=1.4e36)
    assert np.isinf(carry(Lossy(np.array([np.inf], np.float32), "float16")))[0]


def test_non_canonical_tensor_bytes_are_refused() -> None:
    frame = bytearray(
        encode(
            Envelope.new(
                src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=np.array([True, False]))
            )
        )
    )
    data_at = len(frame) - 1 - frame[::-1].index(b"\x01\x00"[::-1]) - 1  # the two bool bytes
    assert frame[data_at : data_at + 2] == b"\x01\x00"
    frame[data_at] = 2
    with pytest.raises(DecodeError, match="bool values must be bytes 0 or 1"):
        decode(bytes(frame))
