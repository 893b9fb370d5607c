"""Whatever bytes arrive, decoding ends in an Envelope or a ProtocolError, never anything else."""

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocol import (
    Envelope,
    Heartbeat,
    ProtocolError,
    TaskProgress,
    TaskResult,
    TooLargeError,
    decode,
    encode,
)
from protocol._codec import ZERO_COPY_MIN, _FrameReader, translate_error

FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_refuses(data: bytes) -> None:
    try:
        env = decode(data)
    except ProtocolError as exc:
        assert str(exc), "a ProtocolError must say what was wrong"
    else:
        assert isinstance(env, Envelope)


SMALL = encode(
    Envelope.new(
        src="edge-1",
        dst="orchestrator",
        body=TaskProgress(
            job="j", task="t", attempt=0, seq=1, data={"tok": [1, 2], "h": np.ones(3, np.float32)}
        ),
    )
)
LARGE = encode(
    Envelope.new(
        src="edge-1",
        dst="cloud-1",
        body=TaskResult(
            job="j", task="t", attempt=0, value={"x": np.arange(ZERO_COPY_MIN // 4, dtype=np.float32)}
        ),
    )
)


@FUZZ
@given(st.binary(max_size=512))
@example(b"")
@example(b"\xc1")
@example(b"\x91" * 5000)
@example(b"\xdf\xff\xff\xff\xff")
@example(b"\xc6\xff\xff\xff\xff")
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@FUZZ
@given(st.data())
def test_mutated_valid_frames(data: st.DataObject) -> None:
    frame = bytearray(data.draw(st.sampled_from([SMALL, LARGE])))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    decodes_or_refuses(bytes(frame))


@FUZZ
@given(st.sampled_from([SMALL, LARGE]), st.integers(min_value=0))
def test_truncated_frames(frame: bytes, cut: int) -> None:
    cut %= len(frame)
    with pytest.raises(ProtocolError):
        decode(frame[:cut])


@FUZZ
@given(
    marker=st.sampled_from([0xC6, 0xC9, 0xDB, 0xDD, 0xDF]),
    declared=st.integers(0, 0xFFFFFFFF),
    pad=st.integers(ZERO_COPY_MIN - 64, ZERO_COPY_MIN + 64),
)
def test_huge_declared_sizes_in_large_frames(marker: int, declared: int, pad: int) -> None:
    frame = b"\x81\xa1x" + bytes([marker]) + struct.pack(">I", declared) + b"\x01" + b"\x00" * pad
    decodes_or_refuses(frame)


@FUZZ
@given(
    ndim=st.integers(0, 40),
    dims=st.lists(st.integers(0, 2**64 - 1), min_size=40, max_size=40),
    dtype=st.integers(0, 12),
    payload=st.integers(0, 64),
    ext=st.sampled_from([1, 2]),
    fmt=st.integers(0, 4),
)
def test_tensor_headers_declaring_anything(
    ndim: int, dims: list[int], dtype: int, payload: int, ext: int, fmt: int
) -> None:
    header = bytes([1, 0, dtype, ndim, 0, fmt if ext == 2 else 0, 0, 0])
    header += struct.pack(f"<{ndim}Q", *dims[:ndim]) + b"\x00" * payload
    value = msgpack.ExtType(ext, header)
    plain = msgpack.unpackb(SMALL)
    plain["body"]["data"] = value
    decodes_or_refuses(msgpack.packb(plain))
    plain["body"]["data"] = [value, b"\x00" * ZERO_COPY_MIN]  # the zero-copy reader
    decodes_or_refuses(msgpack.packb(plain))


def test_oversize_frames_are_refused_by_size_alone() -> None:
    with pytest.raises(TooLargeError):
        decode(LARGE, max_size=len(LARGE) - 1)


# The large-frame reader must agree with msgpack's own decoder on every well-formed value.
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.floats(width=32, allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300)
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=10), inner, max_size=20),
    max_leaves=60,
)


@FUZZ
@given(values)
def test_large_frame_reader_agrees_with_msgpack(value: object) -> None:
    frame = msgpack.packb(value, use_bin_type=True)
    ours = _FrameReader(memoryview(frame)).read_frame()
    assert msgpack.packb(ours, use_bin_type=True) == msgpack.packb(msgpack.unpackb(frame), use_bin_type=True)


@FUZZ
@given(st.binary(max_size=256))
def test_large_frame_reader_refuses_garbage_with_protocol_errors_only(data: bytes) -> None:
    try:
        _FrameReader(memoryview(data)).read_frame()
    except Exception as exc:  # as decode() does: every error is translated in one place
        assert isinstance(translate_error(exc), ProtocolError)


def test_envelope_fields_survive_the_large_frame_path() -> None:
    env = Envelope.new(src="a", dst="group:gpu", body=Heartbeat(seq=5), trace="t" * 64)
    plain = msgpack.unpackb(encode(env))
    plain["hops"] = []
    padded = dict(plain, body=dict(plain["body"]))
    frame = msgpack.packb(padded)
    assert decode(frame) == env
