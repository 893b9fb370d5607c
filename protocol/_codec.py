"""Envelope <-> bytes: msgpack with tensor exts, zero-copy for large tensors.

A frame is one msgpack map, the envelope's fields in declaration order. Encoding never copies
tensor data: `encode_parts` returns the frame as a list of buffers (small headers and views of the
tensors), and `encode` joins them. Decoding frames below `ZERO_COPY_MIN` bytes uses msgpack's C
decoder (which copies ext payloads, a few KiB at most); larger frames are read by `_FrameReader`,
which returns tensors as views on the input buffer.
"""

from __future__ import annotations

import reprlib
import struct
from typing import Any, Final

import msgpack
from pydantic import BaseModel, ValidationError
from typing_extensions import Buffer

from protocol._envelope import SUPPORTED_VERSIONS, Envelope
from protocol._errors import (
    DecodeError,
    EncodeError,
    ProtocolError,
    TooLargeError,
    UnknownKindError,
    VersionMismatchError,
)
from protocol._messages import MESSAGE_KINDS
from protocol._signing import SIG_TRAILER, Signer, Verifier
from protocol._tensor import (
    LOSSY_EXT,
    TENSOR_EXT,
    Lossy,
    TensorParts,
    decode_lossy,
    decode_tensor,
    is_tensor,
    lossy_parts,
    tensor_parts,
)

__all__ = ["DEFAULT_MAX_FRAME", "ZERO_COPY_MIN", "decode", "encode", "encode_parts"]

#: Frames larger than this are refused by `decode` unless the caller passes a larger `max_size`.
DEFAULT_MAX_FRAME: Final = 512 << 20
#: Frames of at least this many bytes are decoded without copying their tensors.
ZERO_COPY_MIN: Final = 64 << 10
_MAX_DEPTH: Final = 64  # nesting of maps and arrays; see docs/protocol.md "Limits"
#: Most values (scalars and containers, not counting tensor or bin bytes) one frame may hold: a
#: bound on the memory and time a hostile frame can cost. Bulk data belongs in tensors and bins.
MAX_VALUES: Final = 1 << 18


class _HasTensor(Exception):
    """Raised inside msgpack's default hook to switch to the scatter-gather encoder."""


def _fields(model: BaseModel) -> dict[str, Any]:
    """A model's fields as written on the wire: `WireModel.WIRE_OMIT_NONE` fields only when set."""
    omit: frozenset[str] = getattr(model, "WIRE_OMIT_NONE", frozenset())
    if omit:
        return {k: v for k, v in model.__dict__.items() if v is not None or k not in omit}
    return model.__dict__


def _default(obj: object) -> object:
    if isinstance(obj, BaseModel):
        return _fields(obj)
    if isinstance(obj, Lossy) or is_tensor(obj):
        raise _HasTensor
    raise EncodeError(f"cannot encode a value of type {type(obj).__module__}.{type(obj).__qualname__}")


_packb = msgpack.Packer(default=_default, use_bin_type=True, autoreset=True).pack


def _wire_dict(envelope: Envelope, signer: Signer | None) -> dict[str, Any]:
    wire = dict(envelope.__dict__)
    wire["kid"] = signer.key_id if signer is not None else None
    wire["sig"] = None  # always the last key: the signature covers every byte before its value
    return wire


def encode_parts(envelope: Envelope, *, signer: Signer | None = None) -> list[Buffer]:
    """Encode `envelope` as a list of buffers whose concatenation is the frame.

    Tensor data appear as views of the caller's tensors (made contiguous and little-endian when they
    are not), so keep the tensors unchanged until the parts are sent. With `signer` the frame ends
    in its HMAC.
    """
    wire = _wire_dict(envelope, signer)
    try:
        try:
            parts: list[Buffer] = [_packb(wire)]
        except _HasTensor:
            writer = _PartsWriter()
            writer.pack(wire)
            parts = writer.finish()
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack, numpy or torch (sparse, meta tensors): one error type out
        raise EncodeError(f"cannot encode envelope of kind {envelope.kind!r}: {exc}") from exc
    if signer is not None:
        last = memoryview(parts[-1])
        parts[-1] = last[:-1]  # drop the nil placeholder of "sig"
        parts.append(SIG_TRAILER[-2:] + signer.mac(parts))  # bin8 of 32 bytes, then the MAC
    return parts


def encode(envelope: Envelope, *, signer: Signer | None = None) -> bytes:
    """Encode `envelope` into one frame of bytes (see `encode_parts` to avoid the final copy)."""
    parts = encode_parts(envelope, signer=signer)
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return b"".join(parts)


def decode(
    data: Buffer,
    *,
    verifier: Verifier | None = None,
    fresh: bool = True,
    grace_s: float = 0.0,
    max_size: int = DEFAULT_MAX_FRAME,
) -> Envelope:
    """Decode one frame into a validated `Envelope`.

    Raises only `ProtocolError` subclasses, whatever the bytes. With `verifier`, the envelope must
    also be signed by a known key, fresh, and not seen before; ``fresh=False`` checks only the
    signature (for frames that are old by design, such as retained presence), and `grace_s`
    accepts a timestamp that much older (see `Verifier.check`).

    Tensors in frames of at least `ZERO_COPY_MIN` bytes are views on `data`, so do not reuse or
    modify `data` while they are in use. Numpy arrays over `bytes` are read-only; torch has no
    read-only tensors, so a torch tensor is a view only over a writable buffer (a `bytearray`,
    as `Reassembler` returns) and a copy otherwise.
    """
    view = memoryview(data)
    size = view.nbytes
    if size > max_size:
        raise TooLargeError(f"frame of {size} bytes exceeds the limit of {max_size} bytes")
    # A plain try costs nothing on success; a context manager here cost ~1 us per frame.
    try:
        if size < ZERO_COPY_MIN:
            obj = msgpack.unpackb(view, ext_hook=_ext_hook, raw=False, strict_map_key=True)
        else:
            obj = _FrameReader(view.cast("B") if view.format != "B" else view).read_frame()
        envelope = _to_envelope(obj)
    except Exception as exc:
        error = translate_error(exc)
        if error is exc:
            raise
        raise error from (None if isinstance(exc, ValidationError) else exc)
    if verifier is not None:
        verifier.check(envelope, view, fresh=fresh, grace_s=grace_s)
    return envelope


_validate_envelope: Final = Envelope.__pydantic_validator__.validate_python


def _to_envelope(obj: object) -> Envelope:
    """Validate; only when that fails, look for the cause callers can act on (version, kind)."""
    try:
        envelope: Envelope = _validate_envelope(obj)
    except ValidationError:
        _diagnose(obj)
        raise
    return envelope


def _diagnose(obj: object) -> None:
    if not isinstance(obj, dict):
        raise DecodeError(f"frame must be a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int:
        raise DecodeError(f"envelope field 'v' must be an integer, got {version!r:.40}")
    if version not in SUPPORTED_VERSIONS:
        raise VersionMismatchError(
            f"envelope version {version} is not supported; this peer reads {sorted(SUPPORTED_VERSIONS)}"
        )
    body = obj.get("body")
    if isinstance(body, dict):
        kind = body.get("kind")
        if not isinstance(kind, str) or kind not in MESSAGE_KINDS:
            raise UnknownKindError(kind)


def _short(value: object) -> str:
    """A bounded repr: never formats more of a huge hostile value than it shows."""
    if isinstance(value, (str, bytes)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return reprlib.repr(value)


def describe_validation_error(exc: ValidationError, what: str = "envelope") -> str:
    """One line naming each invalid field by its dotted path (at most five)."""
    items = []
    for err in exc.errors()[:5]:
        path = ".".join(_wire_path(err["loc"])) or "(root)"
        items.append(f"{path}: {err['msg']} (got {_short(err.get('input'))})")
    more = exc.error_count() - len(items)
    return f"invalid {what}: " + "; ".join(items) + (f"; and {more} more" if more > 0 else "")


_TAGS: Final = MESSAGE_KINDS | {"add_task", "remove_task", "add_edge", "remove_edge", "update_task"}


def _wire_path(loc: tuple[int | str, ...]) -> list[str]:
    """The error's location as a path in the frame: pydantic's union tags are not wire keys."""
    path: list[str] = []
    for part in loc:
        if isinstance(part, str) and part in _TAGS and path and (path[-1] == "body" or path[-1].isdigit()):
            continue
        path.append(str(part))
    return path


def translate_error(exc: Exception) -> ProtocolError:
    """The one place where errors of msgpack, pydantic, numpy and torch become `ProtocolError`."""
    if isinstance(exc, ProtocolError):
        return exc
    if isinstance(exc, ValidationError):
        return DecodeError(describe_validation_error(exc))
    if isinstance(exc, msgpack.ExtraData):
        return DecodeError("trailing bytes after the envelope map")
    if isinstance(exc, msgpack.FormatError):
        return DecodeError("frame is not msgpack: it contains the reserved marker byte 0xc1")
    if isinstance(exc, (msgpack.StackError, RecursionError)):
        return DecodeError("frame nests deeper than the decoder allows")
    if isinstance(exc, ValueError) and "incomplete input" in str(exc):
        return DecodeError("frame truncated: msgpack input ends mid-value")
    # any byte string must end in a ProtocolError, never a crash
    return DecodeError(f"malformed frame: {type(exc).__name__}: {exc}")


def _ext_hook(code: int, data: bytes) -> object:
    return _decode_ext(code, memoryview(data))


def _decode_ext(code: int, view: memoryview) -> object:
    if code == TENSOR_EXT:
        return decode_tensor(view)
    if code == LOSSY_EXT:
        return decode_lossy(view)
    if code == -1:
        return msgpack.Timestamp.from_bytes(bytes(view))
    raise DecodeError(f"unknown msgpack ext type {code}")


def _container_header(n: int, fix: int, c16: int, c32: int) -> bytes:
    if n < 16:
        return bytes((fix | n,))
    if n < 0x10000:
        return bytes((c16,)) + n.to_bytes(2, "big")
    return bytes((c32,)) + n.to_bytes(4, "big")


class _PartsWriter:
    """Writes msgpack like `msgpack.packb`, but tensors' data as separate, aligned buffer parts."""

    def __init__(self) -> None:
        self._parts: list[Buffer] = []
        self._buf = bytearray()
        self._offset = 0  # bytes in self._parts

    def pack(self, obj: object, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise EncodeError(f"value nests deeper than {_MAX_DEPTH} levels")
        if isinstance(obj, BaseModel):
            obj = _fields(obj)
        if isinstance(obj, dict):
            self._buf += _container_header(len(obj), 0x80, 0xDE, 0xDF)
            for key, value in obj.items():
                self.pack(key, depth + 1)
                self.pack(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            self._buf += _container_header(len(obj), 0x90, 0xDC, 0xDD)
            for item in obj:
                self.pack(item, depth + 1)
        elif isinstance(obj, Lossy):
            self._ext(lossy_parts(obj))
        elif is_tensor(obj):
            self._ext(tensor_parts(obj))
        else:
            self._buf += _packb(obj)

    def _ext(self, ext: TensorParts) -> None:
        header_at = self._offset + len(self._buf) + 6  # after the ext32 header
        header = ext.header(header_at)
        length = len(header) + ext.data.nbytes
        if length > 0xFFFFFFFF:
            raise EncodeError(f"tensor of {ext.data.nbytes} bytes exceeds the 4 GiB ext limit")
        self._buf += struct.pack(">BIb", 0xC9, length, ext.code) + header
        self._flush()
        if ext.data.nbytes:
            self._parts.append(ext.data)
            self._offset += ext.data.nbytes

    def _flush(self) -> None:
        if self._buf:
            self._parts.append(bytes(self._buf))
            self._offset += len(self._buf)
            self._buf = bytearray()

    def finish(self) -> list[Buffer]:
        self._flush()
        return self._parts


_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_FIXED_LEAVES: dict[int, struct.Struct] = {
    0xCA: struct.Struct(">f"),
    0xCB: struct.Struct(">d"),
    0xCC: struct.Struct(">B"),
    0xCD: struct.Struct(">H"),
    0xCE: struct.Struct(">I"),
    0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"),
    0xD1: struct.Struct(">h"),
    0xD2: struct.Struct(">i"),
    0xD3: struct.Struct(">q"),
}
_SIZED = {  # marker -> (length struct, what)
    0xC4: (_U8, "bin"),
    0xC5: (_U16, "bin"),
    0xC6: (_U32, "bin"),
    0xD9: (_U8, "str"),
    0xDA: (_U16, "str"),
    0xDB: (_U32, "str"),
    0xC7: (_U8, "ext"),
    0xC8: (_U16, "ext"),
    0xC9: (_U32, "ext"),
}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


class _FrameReader:
    """A msgpack decoder for large frames: same results as msgpack.unpackb, tensors as views."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0
        self._budget = MAX_VALUES

    def read_frame(self) -> object:
        obj = self._read(0)
        if self._pos != len(self._view):
            raise DecodeError(f"trailing bytes after the envelope map ({len(self._view) - self._pos})")
        return obj

    def _take(self, n: int) -> memoryview:
        start = self._pos
        end = start + n
        if end > len(self._view):
            raise DecodeError(
                f"frame truncated: need {n} bytes at offset {start}, have {len(self._view) - start}"
            )
        self._pos = end
        return self._view[start:end]

    def _read(self, depth: int) -> object:
        if depth > _MAX_DEPTH:
            raise DecodeError(f"frame nests deeper than {_MAX_DEPTH} levels")
        self._budget -= 1
        if self._budget < 0:
            raise DecodeError(f"frame holds more than {MAX_VALUES} values; send bulk data as tensors or bins")
        marker = self._take(1)[0]
        if marker <= 0x7F:
            return marker
        if marker >= 0xE0:
            return marker - 0x100
        if 0x80 <= marker <= 0x8F:
            return self._map(marker & 0x0F, depth)
        if 0x90 <= marker <= 0x9F:
            return self._array(marker & 0x0F, depth)
        if 0xA0 <= marker <= 0xBF:
            return str(self._take(marker & 0x1F), "utf-8")
        if marker == 0xC0:
            return None
        if marker in (0xC2, 0xC3):
            return marker == 0xC3
        fmt = _FIXED_LEAVES.get(marker)
        if fmt is not None:
            return fmt.unpack(self._take(fmt.size))[0]
        sized = _SIZED.get(marker)
        if sized is not None:
            length_fmt, what = sized
            n = length_fmt.unpack(self._take(length_fmt.size))[0]
            if what == "ext":
                code = struct.unpack(">b", self._take(1))[0]
                return _decode_ext(code, self._take(n))
            data = self._take(n)
            return str(data, "utf-8") if what == "str" else bytes(data)
        if marker in _FIXEXT:
            code = struct.unpack(">b", self._take(1))[0]
            return _decode_ext(code, self._take(_FIXEXT[marker]))
        if marker in (0xDC, 0xDD):
            return self._array(self._length(marker == 0xDC), depth)
        if marker in (0xDE, 0xDF):
            return self._map(self._length(marker == 0xDE), depth)
        raise DecodeError(f"invalid msgpack marker 0x{marker:02x} at offset {self._pos - 1}")

    def _length(self, short: bool) -> int:
        fmt = _U16 if short else _U32
        n: int = fmt.unpack(self._take(fmt.size))[0]
        if n > len(self._view) - self._pos:  # every item takes at least one byte
            raise DecodeError(
                f"container declares {n} items but only {len(self._view) - self._pos} bytes remain"
            )
        return n

    def _array(self, n: int, depth: int) -> list[object]:
        return [self._read(depth + 1) for _ in range(n)]

    def _map(self, n: int, depth: int) -> dict[object, object]:
        out: dict[object, object] = {}
        for _ in range(n):
            key = self._read(depth + 1)
            if not isinstance(key, (str, bytes)):
                raise DecodeError(f"map key must be a string, got {type(key).__name__}")
            out[key] = self._read(depth + 1)
        return out
