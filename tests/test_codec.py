"""Envelopes survive the wire exactly, and bad frames are refused with errors that say why."""

import math

import msgpack
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from protocol import (
    BULK_HEADER_SIZE,
    MESSAGE_KINDS,
    AddTask,
    BlobChunk,
    BlobRef,
    Bye,
    Call,
    CallResult,
    Capabilities,
    DecodeError,
    EncodeError,
    Envelope,
    Error,
    GraphPatch,
    Heartbeat,
    Hello,
    Relay,
    TaskAck,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskProgress,
    TaskResult,
    TaskSpec,
    TooLargeError,
    UnknownKindError,
    VersionMismatchError,
    Welcome,
    decode,
    encode,
    encode_parts,
    negotiate_version,
    new_id,
    node_digest,
    pack_bulk_header,
    unpack_bulk_header,
)

CAPS = Capabilities(tier="edge", cores=4, memory_mb=8192, task_kinds=["echo"], labels={"site": "lab"})

ONE_OF_EACH = [
    Hello(versions=[1], capabilities=CAPS, bulk="10.0.0.7:7000"),
    Welcome(version=1, heartbeat_s=1.0, capabilities=CAPS),
    Heartbeat(seq=7, running=1, queued=2, load=0.5),
    Bye(reason="shutting down"),
    TaskAssign(job="j1", task="t1", attempt=0, task_kind="echo", params={"x": 1}, inputs={"a": [1, 2]}),
    TaskAck(job="j1", task="t1", attempt=0),
    TaskProgress(job="j1", task="t1", attempt=0, seq=3, fraction=0.5, data={"token": "hi"}),
    TaskResult(job="j1", task="t1", attempt=0, value={"y": 2}, metrics={"compute_s": 0.01}),
    TaskFailed(job="j1", task="t1", attempt=1, code="executor", message="boom", retryable=False),
    TaskCancel(job="j1", task="t1", reason="user asked"),
    GraphPatch(job="j1", ops=[AddTask(task=TaskSpec(id="t2", kind="echo"), after=["t1"])]),
    Call(service="llm.stage", method="forward", args={"session": "s1", "pos": 3, "tokens": [1, 2]}),
    CallResult(value={"token": 7}, metrics={"compute_s": 0.002}),
    BlobChunk(transfer=new_id(), index=0, count=1, size=3, offset=0, crc32c=0x364B3FB7, data=b"abc"),
    BlobRef(transfer=new_id(), size=3, crc32c=0x364B3FB7),
    Relay(target="cloud-1", frame=b"\x80"),
    Error(code="unreachable", message="no route to cloud-9", target="cloud-9"),
]


def test_one_example_of_every_kind_is_listed() -> None:
    assert {body.kind for body in ONE_OF_EACH} == MESSAGE_KINDS


@pytest.mark.parametrize("body", ONE_OF_EACH, ids=lambda b: b.kind)
def test_every_message_kind_round_trips_unchanged(body: object) -> None:
    env = Envelope.new(src="edge-1", dst="orchestrator", body=body, corr=new_id(), trace="job-1")
    again = decode(encode(env))
    assert again == env
    assert again.kind == env.kind


def test_reply_goes_back_to_the_sender_correlated_to_the_request() -> None:
    request = Envelope.new(src="orchestrator", dst="edge-1", body=TaskCancel(job="j", task="t"))
    reply = request.reply(TaskAck(job="j", task="t", attempt=0))
    assert (reply.src, reply.dst, reply.corr) == ("edge-1", "orchestrator", request.id)


def test_ids_sort_in_creation_order() -> None:
    ids = [new_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_a_frame_is_plain_msgpack_that_any_decoder_reads() -> None:
    env = Envelope.new(src="device-1", dst="*", body=Heartbeat(seq=1))
    plain = msgpack.unpackb(encode(env))
    assert list(plain) == [
        "v",
        "id",
        "src",
        "dst",
        "corr",
        "ts",
        "deadline",
        "hops",
        "trace",
        "kid",
        "body",
        "sig",
    ]
    assert plain["body"] == {"kind": "heartbeat", "seq": 1, "running": 0, "queued": 0, "load": 0.0}


def _frame(**changes: object) -> bytes:
    plain = msgpack.unpackb(encode(Envelope.new(src="a", dst="b", body=Heartbeat(seq=1))))
    plain.update(changes)
    return msgpack.packb(plain)


def test_unknown_kind_is_named() -> None:
    with pytest.raises(UnknownKindError, match=r"'task\.teleport'"):
        decode(_frame(body={"kind": "task.teleport"}))


def test_unsupported_version_names_both_sides() -> None:
    with pytest.raises(VersionMismatchError, match=r"version 9 .* reads \[1\]"):
        decode(_frame(v=9))


def test_invalid_field_is_named_by_its_path() -> None:
    with pytest.raises(DecodeError, match=r"body\.seq"):
        decode(_frame(body={"kind": "heartbeat", "seq": -1}))
    with pytest.raises(DecodeError, match=r"src"):
        decode(_frame(src="no spaces allowed"))
    with pytest.raises(DecodeError, match=r"surprise"):
        decode(_frame(surprise=1))


def test_oversize_frame_is_refused_before_parsing() -> None:
    with pytest.raises(TooLargeError, match="exceeds the limit of 100 bytes"):
        decode(b"\x80" * 101, max_size=100)


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(DecodeError, match="trailing"):
        decode(_frame() + b"\x00")


def test_values_that_cannot_travel_are_refused_when_the_message_is_built() -> None:
    with pytest.raises(ValidationError, match=r"s: a builtins\.set cannot travel on the wire"):
        TaskResult(job="j", task="t", attempt=0, value={"s": {1, 2}})
    with pytest.raises(ValidationError, match=r"map key 1 is not a string"):
        TaskProgress(job="j", task="t", attempt=0, seq=0, data={1: "x"})
    deep: object = 0
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ValidationError, match="nests deeper than 32 levels"):
        TaskResult(job="j", task="t", attempt=0, value=deep)


def test_a_value_that_slipped_past_validation_is_still_refused_at_encode() -> None:
    body = TaskResult.model_construct(job="j", task="t", attempt=0, value={"s": {1, 2}}, patch=[], metrics={})
    env = Envelope.model_construct(v=1, id=new_id(), src="a", dst="b", ts=1.0, hops=[], body=body)
    with pytest.raises(EncodeError, match=r"builtins\.set"):
        encode(env)


def test_non_finite_timestamps_are_refused() -> None:
    with pytest.raises(DecodeError, match="ts"):
        decode(_frame(ts=math.nan))


def test_version_negotiation_picks_the_highest_common_version() -> None:
    assert negotiate_version([1, 2, 3], [1, 2]) == 2
    with pytest.raises(VersionMismatchError, match=r"peer offers \[4\], this node speaks \[1\]"):
        negotiate_version([4])


def test_tensors_anywhere_in_a_value_round_trip() -> None:
    value = {
        "np": np.arange(12, dtype=np.int64).reshape(3, 4),
        "list": [torch.ones(2, 2, dtype=torch.bfloat16), np.array(True)],
        "big": np.random.default_rng(0).standard_normal((300, 300)).astype(np.float32),
    }
    env = Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=value))
    got = decode(encode(env)).body.value
    assert np.array_equal(got["np"], value["np"])
    assert isinstance(got["list"][0], torch.Tensor) and got["list"][0].dtype == torch.bfloat16
    assert torch.equal(got["list"][0], value["list"][0])
    assert got["list"][1].dtype == np.bool_ and bool(got["list"][1])
    assert np.array_equal(got["big"], value["big"])


def test_encode_parts_does_not_copy_tensor_data() -> None:
    big = np.zeros(1 << 20, dtype=np.float32)
    env = Envelope.new(src="a", dst="b", body=TaskResult(job="j", task="t", attempt=0, value=big))
    parts = encode_parts(env)
    tensor_part = max(parts, key=lambda p: memoryview(p).nbytes)
    assert np.shares_memory(np.frombuffer(tensor_part, dtype=np.uint8), big)
    assert b"".join(parts) == encode(env)


def test_the_envelope_model_accepts_exactly_the_supported_versions() -> None:
    from typing import get_args

    from protocol import PROTOCOL_VERSION, SUPPORTED_VERSIONS

    assert set(get_args(Envelope.model_fields["v"].annotation)) == SUPPORTED_VERSIONS
    assert PROTOCOL_VERSION in SUPPORTED_VERSIONS


@pytest.mark.parametrize("address", ["10.0.0.7:7000", "edge-1.lan:7000", "[::1]:7000"])
def test_a_bulk_address_is_host_and_port(address: str) -> None:
    assert Hello(versions=[1], capabilities=CAPS, bulk=address).bulk == address


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.7",
        ":7000",
        "a b:1",
        "::1:7000",
        "host:port",
        "host:0",
        "host:70000",
        "a..b:1",
        "-a:1",
        "[zz]:1",
    ],
)
def test_a_bulk_address_without_host_and_port_is_refused(address: str) -> None:
    with pytest.raises(ValidationError, match="bulk"):
        Hello(versions=[1], capabilities=CAPS, bulk=address)


def test_a_hello_without_a_bulk_address_leaves_the_field_out() -> None:
    """A field added to v1 later is written only when set, so peers that predate it still decode."""
    hello = Envelope.new(src="a", dst="*", body=Hello(versions=[1], capabilities=CAPS))
    wire = msgpack.unpackb(encode(hello))
    assert "bulk" not in wire["body"] and "capabilities" in wire["body"]
    assert decode(encode(hello)).body.bulk is None
    with_bulk = hello.model_copy(update={"body": Hello(versions=[1], capabilities=CAPS, bulk="h:1")})
    assert msgpack.unpackb(encode(with_bulk))["body"]["bulk"] == "h:1"


def test_a_bulk_header_round_trips_and_bad_headers_name_the_fault() -> None:
    transfer = new_id()
    header = pack_bulk_header(transfer, 1 << 26, src="device-1", dst="edge-1")
    assert len(header) == BULK_HEADER_SIZE
    assert unpack_bulk_header(header) == (transfer, node_digest("device-1"), node_digest("edge-1"), 1 << 26)
    assert node_digest("edge-1") != node_digest("edge-2")
    with pytest.raises(DecodeError, match="expected b'FLB2'"):
        unpack_bulk_header(b"HTTP" + header[4:])
    with pytest.raises(DecodeError, match="FLB1, which this node no longer speaks"):
        unpack_bulk_header(b"FLB1" + header[4:])
    with pytest.raises(DecodeError, match=f"{BULK_HEADER_SIZE - 1} bytes"):
        unpack_bulk_header(header[:-1])
