"""The public surface of each package changes only on purpose."""

import protocol

PROTOCOL_API = [
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


def test_protocol_exports_exactly_its_documented_surface() -> None:
    assert protocol.__all__ == PROTOCOL_API
    assert sorted(protocol.__all__, key=lambda n: (not n.isupper(), n[0].islower(), n)) == protocol.__all__


def test_exported_classes_and_functions_present_their_public_home() -> None:
    for name in protocol.__all__:
        member = getattr(protocol, name)
        if isinstance(member, type) or (callable(member) and hasattr(member, "__code__")):
            assert member.__module__ == "protocol", name


def test_the_three_core_entry_points_are_there() -> None:
    assert {"encode", "decode", "ProtocolError"} <= set(protocol.__all__)
    assert issubclass(protocol.ProtocolError, protocol.FlowloomError)
