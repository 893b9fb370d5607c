"""Tensors cross the wire bit-exact, without copies, and lossy formats stay inside their bounds."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol import DecodeError, EncodeError, Envelope, Lossy, TaskResult, decode, encode
from protocol._codec import ZERO_COPY_MIN
from protocol._tensor import lossy_parts


def carry(value: object) -> object:
    env = Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=value))
    return decode(encode(env)).body.value


NUMPY_DTYPES = ["float32", "float16", "int8", "uint8", "int64", "bool", "float64", "int32", "int16"]
TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int64,
    torch.bool,
]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4), (1, 0, 7)])
def test_numpy_arrays_come_back_identical(dtype: str, shape: tuple[int, ...]) -> None:
    arr = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    got = carry(arr)
    assert isinstance(got, np.ndarray)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    assert np.array_equal(got, arr)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0, 3), (3,), (2, 5, 4)])
def test_torch_tensors_come_back_identical(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = (torch.arange(int(np.prod(shape))) % 5).to(dtype).reshape(shape)
    got = carry(t)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert torch.equal(got, t)


def test_non_contiguous_and_big_endian_inputs_are_sent_in_logical_order() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert np.array_equal(carry(base.T), base.T)
    assert np.array_equal(carry(base[:, ::2]), base[:, ::2])
    big_endian = np.arange(6, dtype=">i4")
    assert np.array_equal(carry(big_endian), big_endian)
    t = torch.arange(24.0).reshape(4, 6).t()
    assert torch.equal(carry(t), t)
    grad = torch.ones(3, requires_grad=True) * 2
    assert torch.equal(carry(grad), grad.detach())


def test_large_tensors_decode_as_views_of_the_received_frame() -> None:
    arr = np.random.default_rng(1).standard_normal(ZERO_COPY_MIN).astype(np.float32)
    env = Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=arr))
    frame = bytearray(encode(env))
    got = decode(frame).body.value
    assert np.shares_memory(got, np.frombuffer(frame, dtype=np.uint8))
    assert got.ctypes.data % 16 == (np.frombuffer(frame, np.uint8).ctypes.data) % 16
    assert np.array_equal(got, arr)


def test_large_torch_tensors_are_views_too() -> None:
    t = torch.randn(256, 256)
    frame = bytearray(
        encode(Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=t)))
    )
    got = decode(frame).body.value
    frame_start = np.frombuffer(frame, np.uint8).ctypes.data
    assert frame_start <= got.data_ptr() < frame_start + len(frame)
    assert torch.equal(got, t)


def test_unsupported_dtypes_are_named() -> None:
    with pytest.raises(EncodeError, match="complex64"):
        carry(np.zeros(3, dtype=np.complex64))
    with pytest.raises(EncodeError, match="object"):
        carry(np.array([object()]))


def test_a_tensor_whose_shape_does_not_match_its_bytes_is_refused() -> None:
    arr = np.arange(4, dtype=np.float32)
    frame = bytearray(
        encode(Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=arr)))
    )
    header = frame.index(bytes([1, 0, 1, 1]))  # layout 1, numpy, float32, 1 dim
    frame[header + 8] = 5  # claim 5 elements
    with pytest.raises(DecodeError, match=r"shape \[5\] of float32 needs 20 bytes, payload has 16"):
        decode(bytes(frame))


finite_f32 = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=3, max_side=9),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=300, deadline=None)
@given(finite_f32)
def test_lossy_int8_error_is_at_most_half_a_step_of_its_row(x: np.ndarray) -> None:
    got = carry(Lossy(x, "int8"))
    assert got.shape == x.shape and got.dtype == np.float32
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    step = np.abs(rows).max(axis=1, initial=0.0) / 127.0
    bound = (step / 2)[:, None] * (1 + 1e-5) + 1e-30
    err = np.abs(got.reshape(rows.shape).astype(np.float64) - rows.astype(np.float64))
    assert (err <= bound).all()


@settings(max_examples=300, deadline=None)
@given(finite_f32)
def test_lossy_bfloat16_relative_error_is_at_most_two_to_the_minus_8(x: np.ndarray) -> None:
    got = carry(Lossy(x, "bfloat16")).astype(np.float64)
    bf16_max = 3.3895313892515355e38
    ref = np.clip(x.astype(np.float64), -bf16_max, bf16_max)
    err = np.abs(got - ref)
    normal = np.abs(ref) >= 2.0**-126
    assert np.isfinite(got).all()
    assert (err[normal] <= 2.0**-8 * np.abs(ref[normal])).all()
    assert (err[~normal] <= 2.0**-134).all()


@settings(max_examples=300, deadline=None)
@given(finite_f32)
def test_lossy_float16_stays_within_its_bound_and_saturates(x: np.ndarray) -> None:
    got = carry(Lossy(x, "float16")).astype(np.float64)
    ref = x.astype(np.float64)
    clipped = np.clip(ref, -65504.0, 65504.0)
    normal = np.abs(clipped) >= 2.0**-14
    err = np.abs(got - clipped)
    assert np.isfinite(got).all()
    assert (err[normal] <= 2.0**-11 * np.abs(clipped[normal])).all()
    assert (err[~normal] <= 2.0**-25).all()


def test_lossy_torch_tensor_keeps_its_type_and_dtype_and_shrinks_the_frame() -> None:
    h = torch.randn(1, 16, 576)
    exact = len(
        encode(Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=h)))
    )
    for fmt, ratio in [("float16", 0.5), ("bfloat16", 0.5), ("int8", 0.26)]:
        frame = encode(
            Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=Lossy(h, fmt)))
        )
        assert len(frame) < exact * ratio + 300
        got = decode(frame).body.value
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == h.shape
    bf = carry(Lossy(h.to(torch.bfloat16), "int8"))
    assert bf.dtype == torch.bfloat16


def test_lossy_int8_refuses_non_finite_values_by_name() -> None:
    with pytest.raises(EncodeError, match="inf or NaN"):
        carry(Lossy(np.array([1.0, np.inf], dtype=np.float32), "int8"))
    with pytest.raises(EncodeError, match="float tensor"):
        carry(Lossy(np.arange(3), "int8"))


def test_torch_tensors_never_write_through_to_an_immutable_frame() -> None:
    t = torch.zeros(256, 256)
    frame = encode(Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=t)))
    snapshot = bytes(frame)
    got = decode(frame).body.value
    got.add_(1.0)  # in-place on the decoded tensor
    assert frame == snapshot
    assert torch.equal(decode(frame).body.value, t)


def test_numpy_scalars_travel_as_0d_arrays() -> None:
    got = carry({"mean": np.float32(1.5), "n": np.int64(7)})
    assert got["mean"].shape == () and got["mean"].dtype == np.float32 and got["mean"] == 1.5
    assert got["n"].dtype == np.int64 and got["n"] == 7


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("shape", [(2, 3, 8), (5,), (), (4, 0)])
def test_lossy_data_size_is_what_the_ext_carries(fmt: str, shape: tuple[int, ...]) -> None:
    value = Lossy(np.ones(shape, np.float32), fmt)  # type: ignore[arg-type]
    assert value.data_size() == len(lossy_parts(value).data)
