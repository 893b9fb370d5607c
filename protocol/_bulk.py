"""The direct bulk stream: large frames node to node over TCP, beside the broker.

One TCP connection carries transfers one after another. Per transfer:

1. sender -> receiver, the header (`BULK_HEADER_SIZE` = 28 bytes): the magic ``FLB1``, the
   transfer id (its 32 hex digits as 16 raw bytes), and the frame size (unsigned 64-bit, big-endian);
2. receiver -> sender, one status byte: `BulkStatus.OK` (send it) or why not;
3. sender -> receiver, the frame (exactly `size` bytes), then its CRC-32C (unsigned 32-bit, big-endian);
4. receiver -> sender, one status byte: `BulkStatus.OK` once the frame is stored, or why not.

After a refusal in step 2 the connection stays usable (no frame follows); after any other
failure the receiver closes it. The frame is an ordinary encoded (and, on a signing fabric,
signed) envelope; it is delivered only when a `blob.ref` naming its transfer arrives through the
fabric, so a bulk stream alone can never inject a message.
"""

from __future__ import annotations

import enum
import struct

from protocol._errors import DecodeError

__all__ = ["BULK_HEADER_SIZE", "BULK_MAGIC", "BulkStatus", "pack_bulk_header", "unpack_bulk_header"]

BULK_MAGIC = b"FLB1"
_HEADER = struct.Struct(">4s16sQ")
BULK_HEADER_SIZE = _HEADER.size


class BulkStatus(enum.IntEnum):
    """The receiver's answer, one byte, after the header and after the frame."""

    OK = 0
    BUSY = 1
    TOO_LARGE = 2
    BAD_HEADER = 3
    BAD_CHECKSUM = 4
    DUPLICATE = 5

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
}


def pack_bulk_header(transfer: str, size: int) -> bytes:
    """The 28-byte header announcing `size` bytes for `transfer` (32 lowercase hex digits)."""
    return _HEADER.pack(BULK_MAGIC, bytes.fromhex(transfer), size)


def unpack_bulk_header(header: bytes) -> tuple[str, int]:
    """Return (transfer id, size); raise `DecodeError` naming what is wrong."""
    if len(header) != BULK_HEADER_SIZE:
        raise DecodeError(f"bulk header is {len(header)} bytes, expected {BULK_HEADER_SIZE}")
    magic, transfer, size = _HEADER.unpack(header)
    if magic != BULK_MAGIC:
        raise DecodeError(f"bulk header starts with {magic!r}, expected {BULK_MAGIC!r}")
    return transfer.hex(), size
