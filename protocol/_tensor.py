"""Tensor payloads: the byte layout of the tensor and lossy-tensor msgpack exts.

Tensor ext (type 1)::

    offset  size     field
    0       1        layout version, 1
    1       1        flags: bit 0 set = the sender had a torch tensor (decoded as torch)
    2       1        dtype code (see DTYPES)
    3       1        ndim, 0..32
    4       1        pad: number of zero bytes between the dims and the data, 0..15
    5       3        reserved, zero
    8       8*ndim   dims, uint64 little-endian, outermost first
    ..      pad      zero bytes, so the data starts 16-byte aligned in the frame
    ..      rest     data: C-contiguous, little-endian, prod(dims) * itemsize bytes

Lossy ext (type 2) shares the first eight bytes, with byte 4 the pad and byte 5 the format
(1 float16, 2 bfloat16, 3 int8); dtype is the original dtype the receiver gets back. For int8
the data is ``rows`` float32 scales followed by the int8 values, where rows is the product of
every dim but the last (1 for a 0-d or 1-d tensor).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from protocol._errors import DecodeError, EncodeError

__all__ = [
    "DTYPES",
    "LOSSY_EXT",
    "TENSOR_EXT",
    "Lossy",
    "LossyFormat",
    "TensorParts",
    "decode_lossy",
    "decode_tensor",
    "is_tensor",
    "lossy_parts",
    "tensor_parts",
]

TENSOR_EXT = 1
LOSSY_EXT = 2
MAX_NDIM = 32
_ALIGN = 16
_FIXED = struct.Struct("<BBBBBBBB")
_LAYOUT = 1
_TORCH_FLAG = 1

# code -> (name, numpy dtype or None when numpy has none, itemsize)
DTYPES: dict[int, tuple[str, np.dtype[Any] | None, int]] = {
    1: ("float32", np.dtype("<f4"), 4),
    2: ("float16", np.dtype("<f2"), 2),
    3: ("bfloat16", None, 2),
    4: ("int8", np.dtype("i1"), 1),
    5: ("uint8", np.dtype("u1"), 1),
    6: ("int64", np.dtype("<i8"), 8),
    7: ("bool", np.dtype("?"), 1),
    8: ("float64", np.dtype("<f8"), 8),
    9: ("int32", np.dtype("<i4"), 4),
    10: ("int16", np.dtype("<i2"), 2),
}
_CODE_BY_NAME = {name: code for code, (name, _, _) in DTYPES.items()}

LossyFormat = Literal["float16", "bfloat16", "int8"]
_LOSSY_CODES: dict[str, int] = {"float16": 1, "bfloat16": 2, "int8": 3}
_LOSSY_NAMES = {code: name for name, code in _LOSSY_CODES.items()}
_FP16_MAX = 65504.0


@dataclass(frozen=True, slots=True)
class Lossy:
    """Marks a float tensor to travel in a smaller, lossy format.

    Decoding returns a tensor of the original dtype and shape.

    Error bounds, per element x, for finite float32 inputs (a float64 input is first rounded to
    float32, adding at most ``2**-24 * |x|``):

    - ``float16``: ``|x' - x| <= 2**-11 * |x|`` when ``2**-14 <= |x| <= 65504``; ``<= 2**-25``
      below that; values beyond +-65504 saturate to +-65504 (never inf).
    - ``bfloat16``: ``|x' - x| <= 2**-8 * |x|`` when ``|x| >= 2**-126``; ``<= 2**-134`` below
      that; values beyond +-3.3895e38 (bfloat16's largest finite) saturate to it (never inf).
    - ``int8``: per row (last axis) symmetric scale ``s = max|row| / 127``;
      ``|x' - x| <= s / 2`` (plus float32 rounding). Non-finite values cannot be sent as int8.

    >>> frame_value = Lossy(hidden_states, "int8")  # doctest: +SKIP
    """

    tensor: Any
    format: LossyFormat

    def data_size(self) -> int:
        """Bytes of data this value takes in its ext (the header not counted), without encoding it."""
        shape = tuple(int(d) for d in np.shape(self.tensor))
        if self.format == "int8":
            rows, _ = _rows_and_last(shape)
            return 4 * rows + _count(shape)
        return 2 * _count(shape)

    def received(self) -> Any:
        """The tensor a receiver decodes from this value: the same values, bit for bit."""
        parts = lossy_parts(self)
        return decode_lossy(memoryview(parts.header(0) + bytes(parts.data)))


@dataclass(frozen=True, slots=True)
class TensorParts:
    """An ext ready for the wire: a small header and the data buffer it describes."""

    code: int
    header_before_pad: bytes
    data: memoryview

    def header(self, data_offset_in_frame: int) -> bytes:
        """Header bytes with the pad chosen so the data starts aligned at the given frame offset."""
        pad = (-(data_offset_in_frame + len(self.header_before_pad))) % _ALIGN
        head = bytearray(self.header_before_pad)
        head[4] = pad
        return bytes(head) + b"\0" * pad


def _torch() -> Any:
    return sys.modules.get("torch")


def is_tensor(obj: object) -> bool:
    """True for numpy arrays and scalars (sent as 0-d arrays) and, when torch is imported, torch tensors."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return True
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


def _as_numpy(obj: Any) -> tuple[np.ndarray[Any, Any], int, bool]:
    """C-contiguous little-endian numpy view (or copy when needed), its dtype code, is-torch."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _CODE_BY_NAME:
            raise EncodeError(f"cannot encode torch tensor of dtype {t.dtype}")
        arr = t.view(torch.int16).numpy() if name == "bfloat16" else t.numpy()
        return arr, _CODE_BY_NAME[name], True
    arr = np.asarray(obj)
    if not arr.flags.c_contiguous:  # np.ascontiguousarray would turn a 0-d array into 1-d
        arr = arr.copy(order="C")
    name = arr.dtype.name
    if name not in _CODE_BY_NAME or arr.dtype.kind not in "fiub":
        raise EncodeError(f"cannot encode numpy array of dtype {arr.dtype}")
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr, _CODE_BY_NAME[name], False


def _fixed_header(flags: int, code: int, shape: tuple[int, ...], extra: int = 0) -> bytes:
    if len(shape) > MAX_NDIM:
        raise EncodeError(f"cannot encode a tensor of {len(shape)} dims; the limit is {MAX_NDIM}")
    dims = struct.pack(f"<{len(shape)}Q", *shape)
    return _FIXED.pack(_LAYOUT, flags, code, len(shape), 0, extra, 0, 0) + dims


def _raw(arr: np.ndarray[Any, Any]) -> memoryview:
    return arr.reshape(-1).view(np.uint8).data


def tensor_parts(obj: Any) -> TensorParts:
    """Describe a numpy array or torch tensor as a tensor ext without copying contiguous data."""
    arr, code, is_torch = _as_numpy(obj)
    head = _fixed_header(_TORCH_FLAG if is_torch else 0, code, arr.shape)
    return TensorParts(TENSOR_EXT, head, _raw(arr))


def lossy_parts(value: Lossy) -> TensorParts:
    """Quantize a float tensor into the lossy ext layout (this always makes a new buffer)."""
    if value.format not in _LOSSY_CODES:
        raise EncodeError(f"unknown lossy format {value.format!r}; use float16, bfloat16 or int8")
    arr, code, is_torch = _as_numpy(value.tensor)
    name = DTYPES[code][0]
    if name not in ("float32", "float16", "bfloat16", "float64"):
        raise EncodeError(f"lossy format {value.format} needs a float tensor, not {name}")
    x = _to_float32(arr, name).reshape(-1)  # flat: numpy turns 0-d results into scalars
    if value.format == "float16":
        body = _raw(_saturate(x, _FP16_MAX).astype("<f2"))
    elif value.format == "bfloat16":
        body = _raw(_float32_to_bf16_bits(x))
    else:
        body = memoryview(_int8_encode(x, arr.shape))
    head = _fixed_header(_TORCH_FLAG if is_torch else 0, code, arr.shape, extra=_LOSSY_CODES[value.format])
    return TensorParts(LOSSY_EXT, head, body)


_LIMITS = {  # largest finite value of each float dtype a lossy tensor may come back as
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": float(np.finfo(np.float32).max),
    "float64": float(np.finfo(np.float32).max),  # lossy values pass through float32
}


def _saturate(x: np.ndarray[Any, Any], limit: float) -> np.ndarray[Any, Any]:
    """Clip finite values to +-limit; inf and NaN stay as they are."""
    clipped: np.ndarray[Any, Any] = np.asarray(np.clip(x, -limit, limit))  # np.clip returns a scalar for 0-d
    special = ~np.isfinite(x)
    if special.any():
        clipped[special] = x[special]
    return clipped


def _to_float32(arr: np.ndarray[Any, Any], name: str) -> np.ndarray[Any, Any]:
    if name == "bfloat16":
        return _bf16_bits_to_float32(arr.view("<u2"))
    if name == "float64":  # a finite float64 beyond float32's range saturates instead of becoming inf
        return _saturate(arr, _LIMITS["float32"]).astype("<f4")
    return arr.astype("<f4", copy=False)


def _float32_to_bf16_bits(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    bits = x.astype("<f4", copy=False).view("<u4").astype(np.uint64)
    # Round to nearest, ties to even, on the 16 bits that are dropped; NaN stays NaN.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype("<u2")
    overflow = ((out & 0x7FFF) == 0x7F80) & np.isfinite(x)  # rounded up past the largest finite
    out[overflow] = (out[overflow] & 0x8000) | 0x7F7F
    out[np.isnan(x)] = 0x7FC0
    return out


def _bf16_bits_to_float32(bits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (bits.astype("<u4") << 16).view("<f4")


def _rows_and_last(shape: tuple[int, ...]) -> tuple[int, int]:
    """int8 scales are per row of the last axis; a 0-d tensor is one row of one."""
    return (_count(shape[:-1]), shape[-1]) if shape else (1, 1)


def _int8_encode(x: np.ndarray[Any, Any], shape: tuple[int, ...]) -> bytes:
    if not np.isfinite(x).all():
        raise EncodeError("lossy int8 cannot carry inf or NaN; send this tensor as float16 or exact")
    n_rows, last = _rows_and_last(shape)
    rows = x.reshape(n_rows, last)
    absmax = np.abs(rows).max(axis=1) if last else np.zeros(n_rows, "<f4")
    scale = (absmax / 127.0).astype("<f4")
    safe = np.where(scale > 0, scale, 1.0).astype("<f4")
    q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype("i1")
    out: bytes = scale.tobytes() + q.tobytes()
    return out


def _parse_header(view: memoryview, what: str) -> tuple[int, int, tuple[int, ...], int, int]:
    """Return flags, dtype code, shape, data offset and the header's extra byte."""
    if len(view) < _FIXED.size:
        raise DecodeError(f"{what}: header truncated ({len(view)} bytes)")
    layout, flags, code, ndim, pad, extra, r1, r2 = _FIXED.unpack_from(view)
    if layout != _LAYOUT:
        raise DecodeError(f"{what}: unknown layout version {layout}")
    if code not in DTYPES:
        raise DecodeError(f"{what}: unknown dtype code {code}")
    if ndim > MAX_NDIM:
        raise DecodeError(f"{what}: {ndim} dims exceeds the limit of {MAX_NDIM}")
    if pad >= _ALIGN or r1 or r2 or flags & ~_TORCH_FLAG:
        raise DecodeError(f"{what}: malformed header (pad {pad}, flags {flags}, reserved bytes)")
    start = _FIXED.size + 8 * ndim + pad
    if len(view) < start:
        raise DecodeError(f"{what}: header declares {ndim} dims but the payload is {len(view)} bytes")
    shape = struct.unpack_from(f"<{ndim}Q", view, _FIXED.size)
    if pad and any(view[start - pad : start]):
        raise DecodeError(f"{what}: pad bytes must be zero")
    return flags, code, shape, start, extra


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def decode_tensor(view: memoryview) -> Any:
    """Decode a tensor ext payload; the result is a view on `view` when its data is aligned."""
    flags, code, shape, start, extra = _parse_header(view, "tensor")
    if extra:
        raise DecodeError("tensor: malformed header (reserved byte 5 is set)")
    name, np_dtype, itemsize = DTYPES[code]
    n = _count(shape)
    data = view[start:]
    if n * itemsize != len(data):
        raise DecodeError(
            f"tensor: shape {list(shape)} of {name} needs {n * itemsize} bytes, payload has {len(data)}"
        )
    if name == "bool" and n and np.frombuffer(data, np.uint8).max() > 1:
        raise DecodeError("tensor: bool values must be bytes 0 or 1")
    if flags & _TORCH_FLAG or np_dtype is None:
        return _torch_from(data, name, shape, n)
    arr: np.ndarray[Any, Any] = np.frombuffer(data, dtype=np_dtype, count=n)
    if not arr.flags.aligned:
        arr = arr.copy()
    return _native(arr).reshape(shape)


def _native(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if sys.byteorder == "big" and arr.dtype.itemsize > 1:
        return arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _import_torch(what: str) -> Any:
    try:
        import torch  # noqa: PLC0415 - lazy: nodes that never receive torch tensors never import it
    except ImportError as exc:
        raise DecodeError(f"{what} arrived as a torch tensor but torch is not installed") from exc
    return torch


def _torch_from(data: memoryview, name: str, shape: tuple[int, ...], n: int) -> Any:
    torch = _import_torch(f"a {name} tensor")
    dtype = getattr(torch, name)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    itemsize = len(data) // n
    # torch has no read-only tensors: a view over `bytes` would let in-place ops mutate them.
    if data.readonly or sys.byteorder == "big" or _address(data) % itemsize:
        copy = bytearray(data)  # read-only or misaligned data, or a big-endian host: copy, then view
        if sys.byteorder == "big" and itemsize > 1:
            np.frombuffer(copy, dtype=f"u{itemsize}").byteswap(inplace=True)
        return torch.frombuffer(copy, dtype=dtype, count=n).reshape(shape)
    return torch.frombuffer(data, dtype=dtype, count=n).reshape(shape)


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data)


def decode_lossy(view: memoryview) -> Any:
    """Decode a lossy ext payload back into a tensor of its original dtype (always a new buffer)."""
    flags, code, shape, start, fmt_code = _parse_header(view, "lossy tensor")
    name, _, _ = DTYPES[code]
    fmt = _LOSSY_NAMES.get(fmt_code)
    if fmt is None:
        raise DecodeError(f"lossy tensor: unknown format code {fmt_code}")
    if name not in ("float32", "float16", "bfloat16", "float64"):
        raise DecodeError(f"lossy tensor: original dtype {name} is not a float dtype")
    n = _count(shape)
    data = view[start:]
    rows, last = _rows_and_last(shape)
    want = 4 * rows + n if fmt == "int8" else 2 * n
    if len(data) != want:
        raise DecodeError(
            f"lossy tensor: shape {list(shape)} in {fmt} needs {want} bytes, payload has {len(data)}"
        )
    if fmt == "float16":
        x = np.frombuffer(data, "<f2").astype(np.float32)
    elif fmt == "bfloat16":
        x = _bf16_bits_to_float32(np.frombuffer(data, "<u2"))
    else:
        scale = np.frombuffer(data, "<f4", count=rows)
        q = np.frombuffer(data, "i1", offset=4 * rows).reshape(rows, last)
        # 127 * scale can round just past float32's largest value: saturate, the input was finite
        with np.errstate(over="ignore"):  # the input was finite: an overflow saturates
            x = np.clip(q.astype(np.float32) * scale[:, None], -_LIMITS["float32"], _LIMITS["float32"])
    x = x.reshape(shape)
    return _restore(x, name, bool(flags & _TORCH_FLAG))


def _restore(x: np.ndarray[Any, Any], name: str, as_torch: bool) -> Any:
    x = _saturate(x, _LIMITS[name])  # e.g. a float16 65504 sent as bfloat16 comes back as 65536
    if as_torch or name == "bfloat16":
        torch = _import_torch(f"a lossy {name} tensor")
        return torch.from_numpy(np.array(x, dtype=np.float32)).to(getattr(torch, name))
    return np.asarray(x.astype(name))
