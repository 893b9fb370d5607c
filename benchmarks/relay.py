"""Relay benchmark: what one and two relays cost over talking through one broker.

Run from the project root::

    .venv/bin/python benchmarks/relay.py [--quick] [--json]

Three private Mosquitto brokers (`fabric.testing.MosquittoBroker`), A, B and C, one per segment,
with nothing bridging them but relay endpoints. Three topologies, each in a fabric (namespace) of
its own, all built at once in this process (every endpoint on this event loop, as in
``tests/fabric/test_relay.py``; so a relay's work takes turns with the client's and the server's
on one core, where a deployed relay would run on a machine of its own):

- ``direct`` (the baseline, measured in the same run): client and server both on broker A.
- ``relay1``: client on A, server on B, and ``relay-1`` joined to A and B.
- ``relay2``: client on A, server on C, ``relay-1`` on A and B, ``relay-2`` on B and C.

A relay is ``Endpoint(node, [MqttTransport(url_a, node, namespace=ns), MqttTransport(url_b, ...)],
relay=True)``. Heartbeats every 0.5 s (``dead_after_s`` 5 s, so a long transfer on this one event
loop cannot get a node declared dead). The relays start first, then the server, then the client:
a relay passes a node's hello on only when it floods it, and one that learns a hello from another
relay's targeted introduction keeps it to itself, so with the relays started last a node two
relays away may never learn the other's capabilities. Before measuring, the client waits for the
server (``wait_for_peer(..., announced=True)``; the server for the client, not announced), then
until ``client.route("server")`` and the server's route back are the expected paths, then warms
up (requests and one blob).

Figures, for each topology (the topologies take turns within every round, so drift and noisy
neighbours hit them alike):

- request/reply latency: sequential ``await client.request("server", TaskCancel(job="j",
  task="t"), timeout=5)`` calls, each answered by the server with a ``task.ack`` (``ep.reply``),
  timed one by one with ``perf_counter`` (garbage collector paused). The rounds give every
  topology a batch of consecutive calls in turn (``--quick``: 4 x 250, full: 10 x 500); p50 and
  p90 (nearest rank) are over ALL of a topology's calls. ``details`` also holds the best batch's
  p50 (the convention of ``benchmarks/fabric.py``).
- blob throughput, GB/s (GB = 1e9 bytes): one ``task.result`` whose value is a numpy uint8 array of
  64 MiB (``--quick``: 16 MiB) sent with ``client.request``; the server answers with a small
  ``task.result`` naming the size it received and the relays it came through. The time is the
  whole round trip; the figure is the best of the rounds (``--quick``: 3, full: 4). After every
  timed transfer, an untimed request asks the server for the sha256 of the array it received,
  which must match (and so must dtype and shape): a corrupted transfer stops the run.

No endpoint takes bulk streams (no ``bulk=``): a direct large envelope would otherwise go node to
node over TCP, which a relayed one never does. So in all three topologies the blob goes as 1 MiB
chunks through the broker(s): like for like.

Checks (printed, and in the JSON under ``checks``; any failure makes the exit code 1): each route
is the expected one before and after measuring; the direct topology sent nothing wrapped for a
relay; the relayed ones did (``client.stats.relayed_sent`` grew by at least the number of
requests), every reply came back through the relays (the reply envelope's ``hops``), the server
saw the blobs arrive through them, the relays forwarded the frames, and nothing went on a bulk
stream.

Target: ``relay_overhead_ratio`` = relay1_rr_p50_us / direct_rr_p50_us <= 2.5 (a relay adds two
broker hops and a forward each way to a round trip of two broker hops). A missed target is
reported, not an error.

JSON (``--json``): one object on stdout: ``direct_rr_p50_us``, ``relay1_rr_p50_us``,
``relay2_rr_p50_us`` (and ``*_rr_p90_us``), ``relay_overhead_ratio``, ``relay2_overhead_ratio``
(information), ``direct_blob_gbps``, ``relay1_blob_gbps``, ``relay2_blob_gbps``, ``blob_bytes``,
``requests`` (timed requests per topology), the targets, ``meets_targets``, ``checks``, ``notes``
and ``details``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The project root first, this folder off: `import fabric` must find the package, not fabric.py.
sys.path[:] = [
    str(ROOT),
    *(p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")),
]

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

import protocol  # noqa: E402
from benchmarks._common import base_parser, cpu_seconds, emit_live, gc_paused, percentile, target_met  # noqa: E402
from fabric import Endpoint, EndpointStats, MqttTransport, PeerUnreachable  # noqa: E402
from fabric.testing import MosquittoBroker  # noqa: E402
from protocol import Envelope, TaskAck, TaskCancel, TaskResult  # noqa: E402

GB = 1e9
MIB = 1 << 20
HEARTBEAT_S = 0.5
DEAD_AFTER_S = 5.0
READY_TIMEOUT = 30.0  # seconds for a topology's route to be learnt
REQUEST_TIMEOUT = 5.0
BLOB_TIMEOUT = 60.0
SEGMENTS = ("A", "B", "C")
OVERHEAD_TARGET = 2.5  # relay_overhead_ratio <= this
TARGETS = {"relay_overhead_ratio": f"<= {OVERHEAD_TARGET:g}"}
ACK = TaskAck(job="j", task="t", attempt=0)
DIGEST = TaskCancel(job="j", task="digest")  # asks the server for the sha256 of the last blob


@dataclass(frozen=True)
class Spec:
    """A topology: its endpoints (node, segments, relay?) and the route client -> server."""

    name: str
    nodes: tuple[tuple[str, tuple[str, ...], bool], ...]

    @property
    def relays(self) -> list[str]:
        return [node for node, _, relay in self.nodes if relay]

    @property
    def route(self) -> list[str]:
        return ["client", *self.relays, "server"]


TOPOLOGIES = (  # in start order: relays first (see the module docstring), then the server, the client
    Spec("direct", (("server", ("A",), False), ("client", ("A",), False))),
    Spec(
        "relay1",
        (("relay-1", ("A", "B"), True), ("server", ("B",), False), ("client", ("A",), False)),
    ),
    Spec(
        "relay2",
        (
            ("relay-1", ("A", "B"), True),
            ("relay-2", ("B", "C"), True),
            ("server", ("C",), False),
            ("client", ("A",), False),
        ),
    ),
)


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int  # request rounds; in each, every topology makes `batch` timed calls in turn
    batch: int
    warmup: int  # untimed requests per topology before the timed ones
    blob_bytes: int
    blob_rounds: int  # timed blob transfers per topology

    @classmethod
    def of(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick, rounds=4, batch=250, warmup=100, blob_bytes=16 * MIB, blob_rounds=3)
        return cls(quick, rounds=10, batch=500, warmup=300, blob_bytes=64 * MIB, blob_rounds=4)

    @property
    def requests(self) -> int:
        return self.rounds * self.batch


# --- timing -------------------------------------------------------------------------------------


def broker_pid(broker: MosquittoBroker) -> int | None:
    process = getattr(broker, "_process", None)  # for the CPU time it spends (diagnostic only)
    return process.pid if isinstance(process, subprocess.Popen) else None


# --- topologies ---------------------------------------------------------------------------------


@dataclass
class Topology:
    spec: Spec
    endpoints: dict[str, Endpoint]
    serving: asyncio.Task[None] | None = None
    rr: list[list[float]] = field(default_factory=list)  # seconds per call, one list per round
    blob_s: list[float] = field(default_factory=list)
    bad_reply_hops: int = 0  # replies that did not come back through the expected relays
    blob_hops: list[list[str]] = field(default_factory=list)  # the relays each blob came through
    blob_cpu_s: dict[str, list[float]] = field(default_factory=dict)  # per timed transfer
    routes_before: tuple[list[str], list[str]] = ([], [])  # client -> server, server -> client
    routes_after: tuple[list[str], list[str]] = ([], [])
    stats_before: dict[str, EndpointStats] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def client(self) -> Endpoint:
        return self.endpoints["client"]

    @property
    def server(self) -> Endpoint:
        return self.endpoints["server"]

    @property
    def reply_hops(self) -> list[str]:
        """The relays a reply passes, in the order it passes them."""
        return list(reversed(self.spec.relays))

    def routes(self) -> tuple[list[str], list[str]]:
        return self.client.route("server"), self.server.route("client")


async def serve(ep: Endpoint) -> None:
    """The server: a task.ack to a small request; to a blob, its size and the relays it came
    through; to `DIGEST`, the sha256, dtype and shape of the last blob received."""
    held: np.ndarray[Any, Any] | None = None
    async for env in ep:
        body = env.body
        if isinstance(body, TaskResult) and isinstance(body.value, np.ndarray):
            held = body.value
            answer = {"nbytes": int(held.nbytes), "hops": list(env.hops)}
            await ep.reply(env, TaskResult(job="j", task="t", attempt=0, value=answer))
        elif isinstance(body, TaskCancel) and body.task == DIGEST.task:
            digest: dict[str, Any] = {"sha256": None}
            if held is not None:
                data = np.ascontiguousarray(held)
                digest = {"sha256": hashlib.sha256(data.data).hexdigest(), "dtype": str(data.dtype)}
                digest["shape"] = list(data.shape)
            held = None
            await ep.reply(env, TaskResult(job="j", task="digest", attempt=0, value=digest))
        else:
            await ep.reply(env, ACK)


async def build(spec: Spec, urls: dict[str, str]) -> Topology:
    """Start the endpoints of `spec` in a fresh namespace and the server's loop; wait for the routes."""
    ns = f"relaybench{uuid.uuid4().hex[:10]}"
    top = Topology(spec, {})
    try:
        for node, segments, relay in spec.nodes:
            transports = [MqttTransport(urls[s], node, namespace=ns) for s in segments]
            ep = Endpoint(node, transports, relay=relay, heartbeat_s=HEARTBEAT_S, dead_after_s=DEAD_AFTER_S)
            await ep.start()
            top.endpoints[node] = ep
        top.serving = asyncio.create_task(serve(top.server), name=f"serve:{spec.name}")
        await top.client.wait_for_peer("server", READY_TIMEOUT, announced=True)
        await top.server.wait_for_peer("client", READY_TIMEOUT)  # (its hello may never come: see above)
        expected = (spec.route, list(reversed(spec.route)))
        deadline = time.monotonic() + READY_TIMEOUT
        while (routes := _routes_or_none(top)) != expected:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{spec.name}: routes are {routes} after {READY_TIMEOUT:g} s, expected {expected}"
                )
            await asyncio.sleep(0.05)
    except BaseException:
        await close(top)
        raise
    return top


def _routes_or_none(top: Topology) -> tuple[list[str], list[str]] | None:
    try:
        return top.routes()
    except PeerUnreachable:  # while the relays' links are being learnt
        return None


async def close(top: Topology) -> None:
    if top.serving is not None:
        top.serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await top.serving
    for ep in reversed(list(top.endpoints.values())):
        await ep.close()


# --- measuring ----------------------------------------------------------------------------------


async def rr_batch(top: Topology, calls: int) -> list[float]:
    """Seconds per sequential request/reply; counts replies that did not take the expected relays."""
    body = TaskCancel(job="j", task="t")
    expect = top.reply_hops
    samples = [0.0] * calls
    bad = 0
    request, perf_counter = top.client.request, time.perf_counter
    with gc_paused():
        for i in range(calls):
            start = perf_counter()
            reply = await request("server", body, timeout=REQUEST_TIMEOUT)
            samples[i] = perf_counter() - start
            if reply.hops != expect or not isinstance(reply.body, TaskAck):
                bad += 1
    top.bad_reply_hops += bad
    return samples


async def blob_round(
    top: Topology, body: TaskResult, value: np.ndarray[Any, Any], digest: str, pids: dict[str, int | None]
) -> float:
    """One blob round trip (seconds), then its integrity checked: a mismatch raises."""
    client = top.client
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    with gc_paused():
        start = time.perf_counter()
        reply = await client.request("server", body, timeout=BLOB_TIMEOUT)
        elapsed = time.perf_counter() - start
    for name, pid in pids.items():
        spent, was = cpu_seconds(pid), before[name]
        if spent is not None and was is not None:
            top.blob_cpu_s.setdefault(name, []).append(spent - was)
    answer = getattr(reply.body, "value", None)
    if not isinstance(answer, dict) or answer.get("nbytes") != value.nbytes:
        raise RuntimeError(f"{top.name}: a blob of {value.nbytes} bytes was answered with {answer!r}")
    top.blob_hops.append(list(answer.get("hops", [])))
    check = await client.request("server", DIGEST, timeout=BLOB_TIMEOUT)
    got = getattr(check.body, "value", None)
    want = {"sha256": digest, "dtype": str(value.dtype), "shape": list(value.shape)}
    if got != want:
        raise RuntimeError(f"{top.name}: the blob arrived corrupted: the server got {got!r}, sent {want!r}")
    return elapsed


async def measure(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    value = np.random.default_rng(7).integers(0, 256, settings.blob_bytes, dtype=np.uint8)
    digest = hashlib.sha256(value.data).hexdigest()
    blob = TaskResult(job="j", task="t", attempt=0, value=value)
    brokers: list[MosquittoBroker] = []
    tops: list[Topology] = []
    try:
        for _ in SEGMENTS:
            brokers.append(MosquittoBroker())
            brokers[-1].start()
        urls = {segment: broker.url for segment, broker in zip(SEGMENTS, brokers, strict=True)}
        pids: dict[str, int | None] = {"process": os.getpid()}
        pids |= {f"broker {s}": broker_pid(b) for s, b in zip(SEGMENTS, brokers, strict=True)}
        for spec in TOPOLOGIES:
            progress(f"{spec.name}: starting {len(spec.nodes)} endpoints, learning routes")
            tops.append(await build(spec, urls))
        for top in tops:
            progress(f"{top.name}: warm-up")
            top.routes_before = top.routes()
            top.stats_before = {n: dataclasses.replace(ep.stats) for n, ep in top.endpoints.items()}
            await rr_batch(top, settings.warmup)
            await blob_round(top, blob, value, digest, {})
            top.bad_reply_hops = 0
            top.blob_hops.clear()

        for r in range(settings.rounds):
            progress(f"request/reply round {r + 1}/{settings.rounds}")
            for top in tops[r % len(tops) :] + tops[: r % len(tops)]:  # rotate who goes first
                top.rr.append(await rr_batch(top, settings.batch))
        for r in range(settings.blob_rounds):
            progress(f"blob round {r + 1}/{settings.blob_rounds} ({settings.blob_bytes // MIB} MiB)")
            for top in tops[r % len(tops) :] + tops[: r % len(tops)]:
                top.blob_s.append(await blob_round(top, blob, value, digest, pids))
        for top in tops:
            top.routes_after = top.routes()
        return report(settings, tops, blob)
    finally:
        for top in tops:
            await close(top)
        for broker in brokers:
            broker.close()


# --- report -------------------------------------------------------------------------------------


def _delta(top: Topology, node: str, counter: str) -> int:
    now: int = getattr(top.endpoints[node].stats, counter)
    was: int = getattr(top.stats_before[node], counter)
    return now - was


def checks_of(settings: Settings, top: Topology) -> dict[str, bool]:
    """What must hold for the figures of `top` to mean what they say."""
    name, relays = top.name, top.spec.relays
    expected = (top.spec.route, list(reversed(top.spec.route)))
    requests = settings.warmup + settings.requests + 2 * (1 + settings.blob_rounds)  # blobs + digests
    blobs = 1 + settings.blob_rounds
    route = " -> ".join(top.spec.route)
    checks = {
        f"{name}: route {route} before and after measuring": top.routes_before == expected
        and top.routes_after == expected,
        f"{name}: every reply came back through [{', '.join(top.reply_hops)}]": top.bad_reply_hops == 0,
        f"{name}: every blob reached the server through [{', '.join(relays)}]": len(top.blob_hops)
        == settings.blob_rounds
        and all(hops == relays for hops in top.blob_hops),
        f"{name}: no blob went on a bulk stream": _delta(top, "client", "bulk_sent") == 0,
        f"{name}: no blob error at the server": _delta(top, "server", "blob_errors") == 0,
    }
    relayed = _delta(top, "client", "relayed_sent")
    if not relays:
        checks[f"{name}: nothing sent wrapped for a relay (relayed_sent +{relayed})"] = relayed == 0
        return checks
    checks[f"{name}: client relayed_sent +{relayed} >= {requests} requests"] = relayed >= requests
    received = _delta(top, "server", "relayed_received")
    checks[f"{name}: server relayed_received +{received} >= {requests}"] = received >= requests
    sent_blobs = _delta(top, "client", "relayed_blobs_sent")
    checks[f"{name}: client relayed_blobs_sent +{sent_blobs} == {blobs}"] = sent_blobs == blobs
    for relay in relays:
        forwarded = _delta(top, relay, "forwarded")
        checks[f"{name}: {relay} forwarded +{forwarded} >= {2 * requests}"] = forwarded >= 2 * requests
    return checks


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def report(settings: Settings, tops: list[Topology], blob: TaskResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "quick": settings.quick,
        "requests": settings.requests,
        "rounds": settings.rounds,
        "batch": settings.batch,
        "warmup": settings.warmup,
        "blob_bytes": settings.blob_bytes,
        "blob_mib": settings.blob_bytes // MIB,
        "blob_rounds": settings.blob_rounds,
        "heartbeat_s": HEARTBEAT_S,
        "request_frame_bytes": len(
            protocol.encode(Envelope.new(src="client", dst="server", body=TaskCancel(job="j", task="t")))
        ),
    }
    details: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    for top in tops:
        samples = [s for batch in top.rr for s in batch]
        out[f"{top.name}_rr_p50_us"] = round(percentile(samples, 0.50) * 1e6, 1)
        out[f"{top.name}_rr_p90_us"] = round(percentile(samples, 0.90) * 1e6, 1)
        out[f"{top.name}_blob_gbps"] = round(settings.blob_bytes / min(top.blob_s) / GB, 4)
        out[f"{top.name}_route"] = top.spec.route
        stats = {
            node: {
                k: v - getattr(top.stats_before[node], k)
                for k, v in dataclasses.asdict(ep.stats).items()
                if v != getattr(top.stats_before[node], k)
            }
            for node, ep in top.endpoints.items()
        }
        details[top.name] = {
            "rr_p50_us_best_batch": round(min(percentile(b, 0.5) for b in top.rr) * 1e6, 1),
            "rr_p50_us_per_round": [round(percentile(b, 0.5) * 1e6, 1) for b in top.rr],
            "rr_p99_us": round(percentile(samples, 0.99) * 1e6, 1),
            "blob_s": [round(t, 4) for t in top.blob_s],
            "blob_cpu_s_per_transfer": {
                name: round(sum(spent) / len(spent), 4) for name, spent in top.blob_cpu_s.items()
            },
            "stats_delta": stats,
        }
        checks |= checks_of(settings, top)
    direct, relay1, relay2 = (out[f"{t.name}_rr_p50_us"] for t in tops)
    out["relay_overhead_ratio"] = round(relay1 / direct, 3)
    out["relay2_overhead_ratio"] = round(relay2 / direct, 3)
    for top in tops[1:]:
        out[f"{top.name}_blob_ratio_vs_direct"] = round(
            out[f"{top.name}_blob_gbps"] / out["direct_blob_gbps"], 3
        )
    out["targets"] = TARGETS
    out["meets_targets"] = out["relay_overhead_ratio"] <= OVERHEAD_TARGET
    out["checks"] = checks
    out["checks_passed"] = all(checks.values())
    out["notes"] = [f"check failed: {what}" for what, ok in checks.items() if not ok]
    out["python"] = platform.python_version()
    out["cpus"] = os.cpu_count()
    out["details"] = details
    return out


def render(result: dict[str, Any], console: Console) -> None:
    """The figures as a table, then the checks and a one-line verdict."""
    r = result
    mode = "quick" if r["quick"] else "full"
    table = Table(
        title=(
            f"Flowloom relays over Mosquitto, Python {r['python']}, {r['cpus']} CPUs, {mode} run: "
            f"{r['requests']:,} requests, {r['blob_mib']} MiB blob"
        ),
        caption=(
            f"one broker per segment; all endpoints in one process; requests: p50/p90 over all calls; "
            f"blob: best of {r['blob_rounds']}, round trip incl. a small reply, 1 MiB chunks via the "
            "broker(s); GB = 1e9 B"
        ),
    )
    table.add_column("topology")
    for column in ("req p50 us", "req p90 us", "p50 ratio", "blob GB/s", "GB/s ratio"):
        table.add_column(column, justify="right")
    direct_p50, direct_gbps = r["direct_rr_p50_us"], r["direct_blob_gbps"]
    for name in (spec.name for spec in TOPOLOGIES):
        p50, gbps = r[f"{name}_rr_p50_us"], r[f"{name}_blob_gbps"]
        table.add_row(
            name,
            f"{p50:,.1f}",
            f"{r[f'{name}_rr_p90_us']:,.1f}",
            "baseline" if name == "direct" else f"{p50 / direct_p50:.2f}x",
            f"{gbps:.3f}",
            "baseline" if name == "direct" else f"{gbps / direct_gbps:.2f}x",
        )
    console.print(table)
    for name in (spec.name for spec in TOPOLOGIES):
        console.print(f"route {name}: {' -> '.join(r[f'{name}_route'])}")
    for what, ok in r["checks"].items():
        console.print(f"check: {escape(what)}: {target_met(ok)}")
    ratio = r["relay_overhead_ratio"]
    console.print(
        f"Target relay_overhead_ratio (relay1 p50 / direct p50) {TARGETS['relay_overhead_ratio']}: "
        f"{ratio:.2f} -> {target_met(r['meets_targets'])}"
    )
    verdict = "[green]all checks passed[/]" if r["checks_passed"] else "[red]CHECKS FAILED[/]"
    console.print(f"Verdict: {verdict}; target {'met' if r['meets_targets'] else '[red]missed[/]'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__, "1,000 requests and a 16 MiB blob per topology (about half a minute)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.of(args.quick)
    outcome: dict[str, Any] = {}

    def run(progress: Callable[[str], None]) -> dict[str, Any]:
        outcome.update(asyncio.run(measure(settings, progress)))
        return outcome

    emit_live(run, as_json=args.json, render=render)
    return 0 if outcome.get("checks_passed") else 1


if __name__ == "__main__":
    sys.exit(main())
