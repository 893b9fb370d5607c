"""A scenario's nodes speak the real wire protocol to each other, in one process.

This is what `flowloom run` does until the orchestrator exists: every node joins with a signed
`hello` and is answered with a `welcome` at the negotiated version; a replayed frame is refused;
the device sends an activation tensor to the cloud in signed 1 MiB chunks that are verified,
reassembled and decoded bit-exact; the same tensor in int8 shows the lossy saving. Figures are
measured, except `modelled_link_s`, which is the scenario link's latency + size / bandwidth.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from agents.report import Expectation, NodeReport, Report
from agents.scenario import Scenario
from protocol import (
    SUPPORTED_VERSIONS,
    BlobChunk,
    Capabilities,
    Envelope,
    Heartbeat,
    Hello,
    Lossy,
    Reassembler,
    ReplayError,
    Signer,
    TaskResult,
    Verifier,
    Welcome,
    decode,
    encode,
    encode_parts,
    negotiate_version,
    split_blob,
)

__all__ = ["run_wire_check"]

ORCHESTRATOR = "orchestrator"


class _Wire:
    """Counts frames and bytes; every frame is decoded by its receiver's own verifier."""

    def __init__(self, node_ids: list[str], key: bytes) -> None:
        self.signer = Signer("run", key)
        self.verifiers = {n: Verifier({"run": key}) for n in [*node_ids, ORCHESTRATOR]}
        self.frames = 0
        self.bytes = 0

    def send(self, env: Envelope) -> Envelope:
        frame = encode(env, signer=self.signer)
        self.frames += 1
        self.bytes += len(frame)
        return decode(frame, verifier=self.verifiers[env.dst])


def _pick(scenario: Scenario, tier: str, fallback: int) -> str:
    ids = [n for n, spec in scenario.nodes.items() if spec.tier == tier]
    return ids[0] if ids else list(scenario.nodes)[fallback]


def _join_all(scenario: Scenario, wire: _Wire, step: Callable[[str], None]) -> tuple[Expectation, bytes]:
    """Every node says hello and is welcomed; returns the check and the first hello frame."""
    welcomed = 0
    first_hello = b""
    for node_id, spec in scenario.nodes.items():
        caps = Capabilities(
            tier=spec.tier,
            cores=spec.cores,
            memory_mb=spec.memory_mb,
            segment=spec.segment,
            reachability="nat" if spec.nat else "public",
            labels=spec.labels,
        )
        hello = Envelope.new(src=node_id, dst=ORCHESTRATOR, body=Hello(versions=[1], capabilities=caps))
        first_hello = first_hello or encode(hello, signer=wire.signer)
        received = wire.send(hello)
        assert isinstance(received.body, Hello)
        version = negotiate_version(received.body.versions, SUPPORTED_VERSIONS)
        welcome = wire.send(received.reply(Welcome(version=version, heartbeat_s=1.0), src=ORCHESTRATOR))
        wire.send(Envelope.new(src=node_id, dst=ORCHESTRATOR, body=Heartbeat(seq=0)))
        welcomed += isinstance(welcome.body, Welcome) and welcome.corr == hello.id
        step(f"{node_id} ({spec.tier}) joined at protocol version {version}")
    check = Expectation(
        name="every node welcomed", ok=welcomed == len(scenario.nodes), detail=f"{welcomed} nodes"
    )
    return check, first_hello


def _replay(wire: _Wire, frame: bytes) -> Expectation:
    try:
        decode(frame, verifier=wire.verifiers[ORCHESTRATOR])
    except ReplayError as exc:
        return Expectation(name="replayed hello refused", ok=True, detail=str(exc))
    return Expectation(name="replayed hello refused", ok=False, detail="accepted twice")


def _send_activation(
    scenario: Scenario, wire: _Wire, step: Callable[[str], None]
) -> tuple[list[Expectation], dict[str, float]]:
    """The device sends a 4 MiB activation to the cloud in signed chunks, then again as int8."""
    src, dst = _pick(scenario, "device", 0), _pick(scenario, "cloud", -1)
    activation = np.random.default_rng(0).standard_normal((1, 1024, 1024)).astype(np.float32)
    result = TaskResult(job="quickstart", task="activation", attempt=0, value=activation)
    parts = encode_parts(Envelope.new(src=src, dst=dst, body=result), signer=wire.signer)
    reassembler = Reassembler()
    payload = None
    chunks = 0
    t0 = time.perf_counter()
    for chunk in split_blob(parts):
        received = wire.send(Envelope.new(src=src, dst=dst, body=chunk))
        assert isinstance(received.body, BlobChunk)
        payload = reassembler.add(received.body, source=received.src) or payload
        chunks += 1
    assert payload is not None
    got = decode(payload, verifier=wire.verifiers[dst]).body
    transfer_s = time.perf_counter() - t0
    intact = isinstance(got, TaskResult) and np.array_equal(got.value, activation)
    step(f"{activation.nbytes >> 20} MiB activation crossed {src} -> {dst} in {chunks} chunks, bit-exact")

    lossy = result.model_copy(update={"value": Lossy(activation, "int8")})
    int8_frame = encode(Envelope.new(src=src, dst=dst, body=lossy))
    int8_body = decode(int8_frame).body
    assert isinstance(int8_body, TaskResult)
    bound = np.abs(activation).max(axis=-1, keepdims=True) / 254 * (1 + 1e-5)
    within = bool((np.abs(int8_body.value - activation) <= bound).all())

    payload_bytes = sum(memoryview(p).nbytes for p in parts)
    figures = {
        "activation_bytes": float(activation.nbytes),
        "chunks": float(chunks),
        "chunked_transfer_gbps": payload_bytes / transfer_s / 1e9,
        "int8_bytes_ratio": len(int8_frame) / payload_bytes,
    }
    link = scenario.link(src, dst)
    if link is not None:
        figures["modelled_link_s"] = link.transfer_s(payload_bytes)
    checks = [
        Expectation(
            name="activation intact after chunking",
            ok=intact,
            detail=f"{activation.nbytes} bytes in {chunks} signed chunks, {src} -> {dst}",
        ),
        Expectation(name="int8 activation within its bound", ok=within, detail="|x' - x| <= max|row| / 254"),
    ]
    return checks, figures


def run_wire_check(scenario: Scenario, *, step: Callable[[str], None] = lambda _: None) -> Report:
    """Run the protocol exchange between the scenario's nodes and report what was checked."""
    started = time.perf_counter()
    wire = _Wire(list(scenario.nodes), os.urandom(32))
    joined, first_hello = _join_all(scenario, wire, step)
    replay = _replay(wire, first_hello)
    step("a replayed hello was refused" if replay.ok else "a replayed hello was ACCEPTED")
    checks, figures = _send_activation(scenario, wire, step)
    expectations = [joined, replay, *checks]
    return Report(
        scenario=scenario.name,
        ok=all(e.ok for e in expectations),
        wall_s=time.perf_counter() - started,
        nodes={n: NodeReport(tier=s.tier, segment=s.segment) for n, s in scenario.nodes.items()},
        expectations=expectations,
        figures={"frames": float(wire.frames), "wire_bytes": float(wire.bytes), **figures},
    )
