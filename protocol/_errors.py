"""The exception tree shared by every Flowloom layer.

One root, with branches by what the caller can do about the failure::

    FlowloomError                 anything Flowloom raises on purpose
    └── ProtocolError             these bytes or this message are wrong: do not resend them as they are
        ├── EncodeError           a value cannot be put on the wire (unsupported type, non-finite int8 input)
        ├── DecodeError           malformed bytes, a bad field or a bad tensor payload
        │   └── UnknownKindError  a message kind this peer does not know
        ├── VersionMismatchError  no protocol version in common
        ├── TooLargeError         a frame or transfer above the configured limit
        ├── ChunkError            a chunk that does not fit its transfer (checksum, index, size)
        ├── BadSignatureError     missing, unknown-key or wrong HMAC signature
        └── ReplayError           an envelope id seen before
            └── StaleError        a timestamp outside the accepted clock skew

Higher layers (fabric, agents) add their own branches under `FlowloomError`. Errors raised by
libraries below us (msgpack, pydantic, numpy, torch) are translated into these in one place,
`protocol._codec.translate_error`, so callers never need to catch a third-party exception.
"""

from __future__ import annotations

__all__ = [
    "BadSignatureError",
    "ChunkError",
    "DecodeError",
    "EncodeError",
    "FlowloomError",
    "ProtocolError",
    "ReplayError",
    "StaleError",
    "TooLargeError",
    "UnknownKindError",
    "VersionMismatchError",
]


class FlowloomError(Exception):
    """Root of every error Flowloom raises on purpose."""


class ProtocolError(FlowloomError):
    """The bytes or the message are wrong; sending them again unchanged will fail again."""


class EncodeError(ProtocolError):
    """A value cannot be encoded for the wire."""


class DecodeError(ProtocolError):
    """Malformed bytes, an invalid field, or an invalid tensor payload."""


class UnknownKindError(DecodeError):
    """The body names a message kind this peer does not know."""

    def __init__(self, kind: object) -> None:
        super().__init__(f"unknown message kind {kind!r}")
        self.kind = kind


class VersionMismatchError(ProtocolError):
    """The peer speaks no protocol version that we support."""


class TooLargeError(ProtocolError):
    """A frame, tensor or transfer is larger than the configured limit."""


class ChunkError(ProtocolError):
    """A blob chunk is inconsistent with its transfer or fails its checksum."""


class BadSignatureError(ProtocolError):
    """The signature is missing, names an unknown key id, or does not match."""


class ReplayError(ProtocolError):
    """The envelope id has been accepted before."""


class StaleError(ReplayError):
    """The sender timestamp is outside the accepted clock skew or below the replay horizon."""
