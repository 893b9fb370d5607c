"""The Flowloom wire protocol; this package does no I/O.

Envelopes and the closed union of message models, the msgpack codec with tensor exts, lossy
activation formats, chunking of large payloads, and HMAC signing with replay defence.

>>> from protocol import Envelope, Heartbeat, decode, encode
>>> env = Envelope.new(src="edge-1", dst="orchestrator", body=Heartbeat(seq=1))
>>> decode(encode(env)) == env
True
"""

from protocol._bulk import (
    BULK_HEADER_SIZE,
    BULK_MAGIC,
    BulkHeader,
    BulkStatus,
    node_digest,
    pack_bulk_header,
    unpack_bulk_header,
)
from protocol._chunking import CHUNK_SIZE, Reassembler, split_blob
from protocol._codec import DEFAULT_MAX_FRAME, decode, encode, encode_parts
from protocol._envelope import PROTOCOL_VERSION, SUPPORTED_VERSIONS, Envelope
from protocol._errors import (
    BadSignatureError,
    ChunkError,
    DecodeError,
    EncodeError,
    FlowloomError,
    ProtocolError,
    ReplayError,
    StaleError,
    TooLargeError,
    UnknownKindError,
    VersionMismatchError,
)
from protocol._ids import new_id
from protocol._messages import (
    MESSAGE_KINDS,
    AddEdge,
    AddTask,
    BlobChunk,
    BlobRef,
    Body,
    Bye,
    Call,
    CallResult,
    Capabilities,
    Error,
    ErrorCode,
    GraphPatch,
    Heartbeat,
    Hello,
    PatchOp,
    Placement,
    Relay,
    RemoveEdge,
    RemoveTask,
    Resources,
    TaskAck,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskProgress,
    TaskResult,
    TaskSpec,
    UpdateTask,
    Welcome,
)
from protocol._models import MAX_HOPS, NodeId, TaskId
from protocol._negotiation import negotiate_version
from protocol._signing import Signer, Verifier
from protocol._tensor import Lossy, LossyFormat

__all__ = [
    "BULK_HEADER_SIZE",
    "BULK_MAGIC",
    "CHUNK_SIZE",
    "DEFAULT_MAX_FRAME",
    "MAX_HOPS",
    "MESSAGE_KINDS",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "AddEdge",
    "AddTask",
    "BadSignatureError",
    "BlobChunk",
    "BlobRef",
    "Body",
    "BulkHeader",
    "BulkStatus",
    "Bye",
    "Call",
    "CallResult",
    "Capabilities",
    "ChunkError",
    "DecodeError",
    "EncodeError",
    "Envelope",
    "Error",
    "ErrorCode",
    "FlowloomError",
    "GraphPatch",
    "Heartbeat",
    "Hello",
    "Lossy",
    "LossyFormat",
    "NodeId",
    "PatchOp",
    "Placement",
    "ProtocolError",
    "Reassembler",
    "Relay",
    "RemoveEdge",
    "RemoveTask",
    "ReplayError",
    "Resources",
    "Signer",
    "StaleError",
    "TaskAck",
    "TaskAssign",
    "TaskCancel",
    "TaskFailed",
    "TaskId",
    "TaskProgress",
    "TaskResult",
    "TaskSpec",
    "TooLargeError",
    "UnknownKindError",
    "UpdateTask",
    "Verifier",
    "VersionMismatchError",
    "Welcome",
    "decode",
    "encode",
    "encode_parts",
    "negotiate_version",
    "new_id",
    "node_digest",
    "pack_bulk_header",
    "split_blob",
    "unpack_bulk_header",
]

# Public classes and functions report the package as their home, so reprs and tracebacks show
# `protocol.DecodeError`, not the private module it happens to live in.
for _name in __all__:
    _member = globals()[_name]
    if isinstance(_member, type) or (callable(_member) and hasattr(_member, "__code__")):
        _member.__module__ = "protocol"
del _name, _member
