"""The direct bulk stream: large frames node to node over TCP, beside the broker.

One TCP connection carries transfers one after another. Per transfer:

1. sender -> receiver, the header (`BULK_HEADER_SIZE` = 60 bytes): the magic ``FLB2``, the
   transfer id (its 32 hex digits as 16 raw bytes), the `node_digest` of the sending node and of
   the node the frame is for (16 bytes each), and the frame size (unsigned 64-bit, big-endian);
2. receiver -> sender, one status byte: `BulkStatus.OK` (send it) or why not;
3. sender -> receiver, the frame (exactly `size` bytes), then its CRC-32C (unsigned 32-bit, big-endian);
4. receiver -> sender, one status byte: `BulkStatus.OK` once the frame is stored, or why not.

After a refusal in step 2 the connection stays usable (no frame follows), except after
``BAD_HEADER`` and ``WRONG_NODE``, which close it; after any other failure the receiver closes
it too. The frame is an ordinary encoded (and, on a signing fabric, signed) envelope; it is
delivered only when a `blob.ref` naming its transfer arrives through the fabric, so a bulk
stream alone can never inject a message. The header's node digests let a listener refuse frames
meant for another node (a wrong or stale announced address) and tie a stored frame to its
sender's liveness; they are not authenticated and decide nothing else.

Version: the magic names it. ``FLB1`` (a 28-byte header without node digests) is no longer
spoken; a listener answers it with ``BAD_HEADER`` and its sender falls back to ``blob.chunk``.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from typing import NamedTuple

from protocol._errors import DecodeError

__all__ = [
    "BULK_HEADER_SIZE",
    "BULK_MAGIC",
    "BulkHeader",
    "BulkStatus",
    "node_digest",
    "pack_bulk_header",
    "unpack_bulk_header",
]

BULK_MAGIC = b"FLB2"
_HEADER = struct.Struct(">4s16s16s16sQ")
BULK_HEADER_SIZE = _HEADER.size


class BulkStatus(enum.IntEnum):
    """The receiver's answer, one byte, after the header and after the frame."""

    OK = 0
    BUSY = 1
    TOO_LARGE = 2
    BAD_HEADER = 3
    BAD_CHECKSUM = 4
    DUPLICATE = 5
    WRONG_NODE = 6

    @property
    def meaning(self) -> str:
        """What the status tells the sender."""
        return _MEANINGS[self]


_MEANINGS = {
    BulkStatus.OK: "after the header: send the frame; after the frame: stored, waiting for its blob.ref",
    BulkStatus.BUSY: "the receiver holds as many bulk bytes as it may; send this payload another way",
    BulkStatus.TOO_LARGE: "the frame is larger than the receiver accepts",
    BulkStatus.BAD_HEADER: "wrong magic or a malformed header; the connection closes",
    BulkStatus.BAD_CHECKSUM: "the frame's bytes do not match its CRC-32C; the connection closes",
    BulkStatus.DUPLICATE: "a frame with this transfer id is already stored",
    BulkStatus.WRONG_NODE: (
        "this listener belongs to another node: the address announced for the destination does "
        "not reach it from here; the connection closes"
    ),
}


class BulkHeader(NamedTuple):
    """A decoded bulk header."""

    transfer: str
    """The transfer id, 32 lowercase hex digits, as the `blob.ref` will name it."""
    src: bytes
    """`node_digest` of the sending node."""
    dst: bytes
    """`node_digest` of the node the frame is for."""
    size: int
    """Bytes of the frame that follows."""


def node_digest(node_id: str) -> bytes:
    """The 16 bytes that stand for `node_id` in a bulk header: BLAKE2b-128 of its UTF-8."""
    return hashlib.blake2b(node_id.encode(), digest_size=16).digest()


def pack_bulk_header(transfer: str, size: int, *, src: str, dst: str) -> bytes:
    """The header announcing `size` bytes for `transfer` (32 lowercase hex digits) from `src` to `dst`."""
    return _HEADER.pack(BULK_MAGIC, bytes.fromhex(transfer), node_digest(src), node_digest(dst), size)


def unpack_bulk_header(header: bytes) -> BulkHeader:
    """Decode a header; raise `DecodeError` naming what is wrong."""
    if len(header) != BULK_HEADER_SIZE:
        raise DecodeError(f"bulk header is {len(header)} bytes, expected {BULK_HEADER_SIZE}")
    magic, transfer, src, dst, size = _HEADER.unpack(header)
    if magic != BULK_MAGIC:
        if magic == b"FLB1":
            raise DecodeError(
                f"bulk header of version FLB1, which this node no longer speaks ({BULK_MAGIC!r})"
            )
        raise DecodeError(f"bulk header starts with {magic!r}, expected {BULK_MAGIC!r}")
    return BulkHeader(transfer.hex(), src, dst, size)
