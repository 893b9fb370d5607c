"""MQTT client benchmark: how fast raw paho-mqtt and aiomqtt move small messages through Mosquitto.

Run from the project root::

    python benchmarks/mqtt_clients.py [--quick] [--json]

A decision benchmark for the fabric's MQTT transport: the figures are end-to-end messages per
second, publisher -> Mosquitto -> subscriber, for each client library with MQTT 3.1.1 and MQTT 5
at QoS 1 (QoS 0 with raw paho, for information).

Setup: one private Mosquitto broker (``fabric.testing.MosquittoBroker``: loopback, no queue or
in-flight limits, so the broker neither drops QoS 1 messages nor throttles the subscriber).

One run of one configuration (client library, protocol version, QoS):

- The SUBSCRIBER runs in its own OS process (multiprocessing, ``spawn`` context), connects with
  a fresh client id and a clean session, subscribes to a topic unique to the run at the run's
  QoS, and signals ready once the SUBACK is in. It counts messages until it has N, then reports
  the count and the time from the first message to the last (``time.perf_counter`` in the
  subscriber process). Raw paho: a plain ``paho.mqtt.client.Client`` driven by ``loop_forever()``
  in the process's main thread, counting in ``on_message``. aiomqtt: ``async for message in
  client.messages`` with the default unbounded incoming queue (a bound would discard messages,
  not slow the broker down: paho sends the PUBACK as soon as it has read the packet, before the
  application sees the message). Both stop at N; a watchdog (a thread for paho, a task for
  aiomqtt, waking every 0.25 s) ends a run that has received nothing for 3 s, so a lossy run
  reports how many messages it got instead of hanging.
- The PUBLISHER runs in the main process, with the same library and protocol version as the
  subscriber, and publishes N messages of a fixed 200-byte payload (the size of a small Flowloom
  envelope) to that topic, then waits until all are acknowledged (PUBACK for QoS 1; written to
  the socket for QoS 0). Both libraries get the same window of 100 unacknowledged QoS 1
  publishes. Raw paho: ``loop_start()`` (the network thread) with
  ``max_inflight_messages_set(100)``, and the main thread calls ``publish()`` N times back to
  back; paho queues the messages beyond the window and sends them as PUBACKs free it. aiomqtt:
  ``max_inflight_messages=100`` and 100 worker tasks that each ``await client.publish(...)`` in
  turn, so at most 100 publishes await their PUBACK at any time (one awaited publish at a time
  would measure round trips, not throughput). Its ``pending_calls_threshold`` is raised above
  the concurrency, or aiomqtt logs a warning for every publish.

  Why 100 and not more: on every PUBACK paho walks its dict of unacknowledged messages from the
  start (``Client._update_inflight``), and aiomqtt lists its pending calls on every publish, so
  both cost O(window) per message. Publisher alone, QoS 1, MQTT 3.1.1, on a 2-CPU VM: paho window
  10: 15k msgs/s, 100: 20k, 1000: 9k (unbounded, ``max_inflight_messages_set(0)``, which skips
  the walk: 24k, but with no flow control at all); aiomqtt concurrency 10-100: 11-14k, 1000: 5k.

The figure: throughput = N / (subscriber's time from the first to the last message). Every
message must be counted: a run that delivers fewer than N is not a throughput; it is reported
with its delivered count and marked lossy. Each configuration runs 3 times (``--quick``: once)
with N = 20000 (``--quick``: 5000), the configurations taking turns within every repeat; the best
complete run counts (noise only ever makes a run slower). The publisher's own rate (N / time
from the first publish call to the last acknowledgement) is reported for information.

Each side alone (information, QoS 1): end to end, publisher, broker and subscriber share this
machine's CPUs (``cpus`` in the output); with fewer than three cores they compete, the slower
side sets the pace and the figures swing from run to run. So every client and protocol version
also runs once per repeat with the two sides apart in time: the subscriber process creates a
persistent session (MQTT 3.1.1: clean session off; MQTT 5: session expiry 300 s), subscribes,
disconnects and signals ready; the publisher publishes N messages as above, which the broker
queues for the offline session (it has no queue limit); then the subscriber reconnects to its
session and counts the N messages as above. The publisher's rate is then its rate alone
(``<client>_<version>_publisher_alone_msgs_per_s``) and the subscriber's is the rate at which
the client can take in messages that the broker sends as fast as it can
(``<client>_<version>_subscriber_alone_msgs_per_s``).

JSON (``--json``): the figures above as top-level keys (``raw_paho_v311_msgs_per_s``, ...,
``raw_paho_v5_qos0_msgs_per_s``, None when no run was complete), ``n``, ``payload_bytes``,
``quick``, versions and settings, and ``details``: per configuration every run's rate and
delivered count, ``lossy`` and any errors. A lossy run or a failed run is reported, never an
error: the exit code is 0 unless an exception escapes.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The project root first, this folder off: `import fabric` must find the package, not fabric.py.
sys.path[:] = [
    str(ROOT),
    *(p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")),
]

import aiomqtt  # noqa: E402
import paho.mqtt  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks._common import base_parser, emit  # noqa: E402
from fabric.testing import MosquittoBroker  # noqa: E402

PAYLOAD_BYTES = 200
PAYLOAD = bytes(i % 251 for i in range(PAYLOAD_BYTES))
PAHO_MAX_INFLIGHT = 100
AIOMQTT_MAX_INFLIGHT = 100
AIOMQTT_CONCURRENCY = 100  # publish tasks awaiting a PUBACK at once
IDLE_TIMEOUT = 3.0  # seconds without a message before a subscriber gives up
READY_TIMEOUT = 30.0  # seconds for a subscriber process to start, connect and subscribe
RESULT_TIMEOUT = 120.0  # seconds for a run to finish once the publisher is done
PUBLISH_TIMEOUT = 120.0  # seconds for all acknowledgements

PAHO, AIOMQTT = "raw_paho", "aiomqtt"
PROTOCOLS = {"v311": MQTTProtocolVersion.MQTTv311, "v5": MQTTProtocolVersion.MQTTv5}


@dataclass(frozen=True)
class Config:
    """One configuration: client library, protocol version, QoS; end to end, or each side alone."""

    client: str  # PAHO or AIOMQTT
    version: str  # "v311" or "v5"
    qos: int
    alone: bool = False  # publish into an offline persistent session, then drain it

    @property
    def key(self) -> str:
        """The JSON key of its figure, e.g. ``raw_paho_v5_msgs_per_s``, ``raw_paho_v5_qos0_msgs_per_s``.

        Each side alone: ``raw_paho_v5_alone`` (details only).
        """
        qos = "" if self.qos == 1 else f"_qos{self.qos}"
        if self.alone:
            return f"{self.client}_{self.version}{qos}_alone"
        return f"{self.client}_{self.version}{qos}_msgs_per_s"

    @property
    def protocol(self) -> MQTTProtocolVersion:
        return PROTOCOLS[self.version]


CONFIGS = [
    Config(PAHO, "v311", 1),
    Config(PAHO, "v5", 1),
    Config(AIOMQTT, "v311", 1),
    Config(AIOMQTT, "v5", 1),
    Config(PAHO, "v311", 0),
    Config(PAHO, "v5", 0),
]
ALONE_CONFIGS = [Config(c.client, c.version, c.qos, alone=True) for c in CONFIGS if c.qos == 1]
SESSION_EXPIRY = 300  # seconds; MQTT 5 persistent session of the "alone" subscriber


@dataclass(frozen=True)
class Settings:
    quick: bool
    n: int
    repeats: int

    @classmethod
    def of(cls, quick: bool) -> Settings:
        return cls(quick, n=5000, repeats=1) if quick else cls(quick, n=20000, repeats=3)


@dataclass(frozen=True)
class SubSpec:
    """What a subscriber process needs to know (picklable, for the ``spawn`` context)."""

    config: Config
    host: str
    port: int
    topic: str
    n: int


@dataclass
class Tally:
    """Messages counted by a subscriber, with the times of the first and the last one."""

    count: int = 0
    first: float = 0.0
    last: float = 0.0
    error: str | None = None

    def record(self, now: float, n: int) -> bool:
        """Count one message received at `now`; True once `n` have arrived."""
        self.count += 1
        if self.count == 1:
            self.first = now
        self.last = now
        return self.count >= n

    def report(self) -> dict[str, Any]:
        elapsed = self.last - self.first if self.count else 0.0
        return {"count": self.count, "elapsed": elapsed, "error": self.error}


@dataclass
class RunResult:
    delivered: int
    sub_elapsed: float
    pub_elapsed: float | None
    error: str | None = None

    def complete(self, n: int) -> bool:
        return self.error is None and self.delivered == n and self.sub_elapsed > 0


@dataclass
class ConfigResult:
    config: Config
    runs: list[RunResult] = field(default_factory=list)


# --- subscribers (each in its own process) ------------------------------------------------------


def subscriber_main(spec: SubSpec, conn: Connection) -> None:
    """Process entry point: run the subscriber of `spec.config`, send the tally over `conn`."""
    try:
        if spec.config.client == PAHO:
            tally = paho_subscriber(spec, conn)
        else:
            tally = asyncio.run(aiomqtt_subscriber(spec, conn))
    except Exception as exc:
        tally = Tally(error=f"{type(exc).__name__}: {exc}")
    conn.send(("result", tally.report()))
    conn.close()


def _session(spec: SubSpec, first: bool) -> dict[str, Any]:
    """Connect arguments of the "alone" subscriber's persistent session (created when `first`)."""
    if spec.config.version == "v311":
        return {}  # clean_session=False is a constructor argument for MQTT 3.1.1
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call,unused-ignore]
    properties.SessionExpiryInterval = SESSION_EXPIRY
    return {"clean_start": first, "properties": properties}


def paho_subscriber(spec: SubSpec, conn: Connection) -> Tally:
    """Count `spec.n` messages with a plain paho client driven by ``loop_forever()``.

    Alone: subscribe in a persistent session, disconnect, signal ready, wait for "go" (all N are
    then queued at the broker), reconnect to the session and count.
    """
    tally = Tally()
    n, alone = spec.n, spec.config.alone
    perf_counter = time.perf_counter
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"sub-{uuid.uuid4().hex[:12]}",
        protocol=spec.config.protocol,
        clean_session=None if spec.config.version == "v5" else not alone,
    )
    subscribed = threading.Event()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not subscribed.is_set():
            client.subscribe(spec.topic, qos=spec.config.qos)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        subscribed.set()
        if alone:
            client.disconnect()
        else:
            conn.send(("ready", None))

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if tally.record(perf_counter(), n):
            client.disconnect()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message

    if alone:
        client.connect(spec.host, spec.port, **_session(spec, first=True))
        client.loop_forever()  # until on_subscribe disconnects
        if not subscribed.is_set():
            raise RuntimeError("paho subscriber: no SUBACK")
        conn.send(("ready", None))
        conn.recv()  # "go"
        client.connect(spec.host, spec.port, **_session(spec, first=False))
    else:
        client.connect(spec.host, spec.port)
    _loop_until_done(client, tally)
    return tally


def _loop_until_done(client: mqtt.Client, tally: Tally) -> None:
    """``client.loop_forever()`` until it disconnects, or a watchdog does after ``IDLE_TIMEOUT``."""
    stop = threading.Event()

    def watchdog() -> None:
        seen, since = -1, time.monotonic()
        while not stop.wait(0.25):
            if tally.count != seen:
                seen, since = tally.count, time.monotonic()
            elif time.monotonic() - since > (IDLE_TIMEOUT if seen > 0 else READY_TIMEOUT):
                client.disconnect()
                return

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    try:
        client.loop_forever()
    finally:
        stop.set()
        guard.join()


async def aiomqtt_subscriber(spec: SubSpec, conn: Connection) -> Tally:
    """Count `spec.n` messages with ``async for message in client.messages``.

    Alone: as for paho, with one client context to create the session and one to drain it.
    """
    identifier = f"sub-{uuid.uuid4().hex[:12]}"
    protocol = aiomqtt.ProtocolVersion(spec.config.protocol)
    if not spec.config.alone:
        async with aiomqtt.Client(spec.host, spec.port, identifier=identifier, protocol=protocol) as client:
            await client.subscribe(spec.topic, qos=spec.config.qos)
            conn.send(("ready", None))
            return await _count(client, spec.n)
    v311: dict[str, Any] = {"clean_session": False} if spec.config.version == "v311" else {}
    async with aiomqtt.Client(
        spec.host, spec.port, identifier=identifier, protocol=protocol, **v311, **_session(spec, first=True)
    ) as client:
        await client.subscribe(spec.topic, qos=spec.config.qos)
    conn.send(("ready", None))
    conn.recv()  # "go"; blocking is fine, nothing else runs on this loop
    async with aiomqtt.Client(
        spec.host, spec.port, identifier=identifier, protocol=protocol, **v311, **_session(spec, first=False)
    ) as client:
        return await _count(client, spec.n)


async def _count(client: aiomqtt.Client, n: int) -> Tally:
    """Count `n` messages of ``client.messages``, or fewer if none comes for ``IDLE_TIMEOUT``."""
    tally = Tally()
    perf_counter = time.perf_counter

    async def consume() -> None:
        async for _message in client.messages:
            if tally.record(perf_counter(), n):
                return

    consumer = asyncio.create_task(consume())
    seen, since = -1, time.monotonic()
    while not consumer.done():
        await asyncio.wait([consumer], timeout=0.25)
        if tally.count != seen:
            seen, since = tally.count, time.monotonic()
        elif time.monotonic() - since > (IDLE_TIMEOUT if seen > 0 else READY_TIMEOUT):
            consumer.cancel()
            break
    if consumer.done() and not consumer.cancelled():
        consumer.result()  # re-raise a failure
    return tally


# --- publishers (in this process) ---------------------------------------------------------------


def paho_publish(config: Config, host: str, port: int, topic: str, n: int) -> float:
    """Publish `n` messages with paho (network thread + ``publish()`` from this thread).

    Returns the seconds from the first ``publish()`` call to the last acknowledgement.
    """
    connected, done = threading.Event(), threading.Event()
    acked = 0

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        connected.set()

    def on_publish(client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        if acked >= n:
            done.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:12]}", protocol=config.protocol
    )
    client.max_inflight_messages_set(PAHO_MAX_INFLIGHT)
    client.max_queued_messages_set(0)  # 0 = unlimited (the default, stated)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(host, port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("paho publisher did not connect")
        publish, qos = client.publish, config.qos
        start = time.perf_counter()
        for _ in range(n):
            publish(topic, PAYLOAD, qos)
        if not done.wait(PUBLISH_TIMEOUT):
            raise RuntimeError(f"paho publisher: {acked} of {n} acknowledged")
        return time.perf_counter() - start
    finally:
        client.disconnect()
        client.loop_stop()


async def aiomqtt_publish(config: Config, host: str, port: int, topic: str, n: int) -> float:
    """Publish `n` messages with aiomqtt from ``AIOMQTT_CONCURRENCY`` tasks, each awaiting in turn.

    Returns the seconds from the first ``publish()`` call to the last acknowledgement.
    """
    workers = min(AIOMQTT_CONCURRENCY, n)
    shares = [n // workers + (1 if k < n % workers else 0) for k in range(workers)]
    async with aiomqtt.Client(
        host,
        port,
        identifier=f"pub-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion(config.protocol),
        max_inflight_messages=AIOMQTT_MAX_INFLIGHT,
        timeout=PUBLISH_TIMEOUT,
    ) as client:
        client.pending_calls_threshold = workers + 10  # else a warning is logged per publish

        async def worker(count: int) -> None:
            publish, qos = client.publish, config.qos
            for _ in range(count):
                await publish(topic, PAYLOAD, qos=qos)

        start = time.perf_counter()
        await asyncio.gather(*(worker(share) for share in shares))
        return time.perf_counter() - start


# --- one run ------------------------------------------------------------------------------------


def _receive(conn: Connection, process: multiprocessing.process.BaseProcess, timeout: float) -> Any:
    """The next message from a subscriber; RuntimeError if it dies or says nothing in time."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.1):
        if not process.is_alive() and not conn.poll(0):
            raise RuntimeError(f"subscriber process exited with code {process.exitcode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"subscriber said nothing within {timeout:g} s")
    return conn.recv()


def run_once(config: Config, broker: MosquittoBroker, n: int) -> RunResult:
    """One run of `config`: subscriber process, publisher here; see the module docstring."""
    ctx = multiprocessing.get_context("spawn")
    topic = f"bench/{config.key}/{uuid.uuid4().hex}"
    spec = SubSpec(config, broker.host, broker.port, topic, n)
    parent, child = ctx.Pipe()
    process = ctx.Process(target=subscriber_main, args=(spec, child), daemon=True)
    process.start()
    child.close()
    pub_elapsed: float | None = None
    error: str | None = None
    try:
        kind, payload = _receive(parent, process, READY_TIMEOUT)
        if kind == "ready":
            try:
                if config.client == PAHO:
                    pub_elapsed = paho_publish(config, broker.host, broker.port, topic, n)
                else:
                    pub_elapsed = asyncio.run(aiomqtt_publish(config, broker.host, broker.port, topic, n))
            except Exception as exc:
                error = f"publisher: {type(exc).__name__}: {exc}"
            if config.alone:
                parent.send(("go", None))  # all N are queued for the offline session
            kind, payload = _receive(parent, process, RESULT_TIMEOUT)
        report = payload
        error = error or report["error"]
        return RunResult(report["count"], report["elapsed"], pub_elapsed, error)
    except RuntimeError as exc:  # the subscriber died or hung: a failed run, not a crash
        return RunResult(0, 0.0, pub_elapsed, error or str(exc))
    finally:
        parent.close()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


# --- report -------------------------------------------------------------------------------------


def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], check=False, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("mosquitto version ").strip() or "unknown"


def summarize(result: ConfigResult, n: int) -> dict[str, Any]:
    """Best subscriber-side and publisher-side msgs/s over the complete runs, and every run."""
    complete = [run for run in result.runs if run.complete(n)]
    best = min(complete, key=lambda run: run.sub_elapsed) if complete else None
    pubs = [run.pub_elapsed for run in complete if run.pub_elapsed]
    return {
        "msgs_per_s": round(n / best.sub_elapsed) if best else None,
        "pub_msgs_per_s": round(n / min(pubs)) if pubs else None,
        "delivered": [run.delivered for run in result.runs],
        "runs_msgs_per_s": [round(n / run.sub_elapsed) if run.complete(n) else None for run in result.runs],
        "lossy": any(run.error is None and run.delivered < n for run in result.runs),
        "errors": [run.error for run in result.runs if run.error],
    }


def run(settings: Settings) -> dict[str, Any]:
    configs = CONFIGS + ALONE_CONFIGS
    results = {config: ConfigResult(config) for config in configs}
    with MosquittoBroker() as broker:
        for _ in range(settings.repeats):
            for config in configs:  # configurations take turns within every repeat
                results[config].runs.append(run_once(config, broker, settings.n))
        version = mosquitto_version(broker.binary)
    details = {config.key: summarize(results[config], settings.n) for config in configs}
    out: dict[str, Any] = {
        "quick": settings.quick,
        "n": settings.n,
        "payload_bytes": PAYLOAD_BYTES,
        "repeats": settings.repeats,
    }
    out.update({config.key: details[config.key]["msgs_per_s"] for config in CONFIGS})
    for config in ALONE_CONFIGS:
        base = f"{config.client}_{config.version}"
        out[f"{base}_subscriber_alone_msgs_per_s"] = details[config.key]["msgs_per_s"]
        out[f"{base}_publisher_alone_msgs_per_s"] = details[config.key]["pub_msgs_per_s"]
    out.update(
        {
            "python": platform.python_version(),
            "paho_mqtt": paho.mqtt.__version__,
            "aiomqtt": aiomqtt.__version__,
            "mosquitto": version,
            "cpus": os.cpu_count(),
            "paho_max_inflight": PAHO_MAX_INFLIGHT,
            "aiomqtt_max_inflight": AIOMQTT_MAX_INFLIGHT,
            "aiomqtt_publish_concurrency": AIOMQTT_CONCURRENCY,
            "details": details,
        }
    )
    return out


def _rate(value: int | None) -> str:
    return "[red]none[/]" if value is None else f"{value:,}"


def _ratio(value: int | None, baseline: int | None) -> str:
    return f"{value / baseline:.2f}x" if value and baseline else ""


def _runs(detail: dict[str, Any], n: int) -> str:
    """The spread of the runs' msgs/s in thousands; delivered counts if any run was incomplete."""
    rates = detail["runs_msgs_per_s"]
    if all(rates):
        low, high = min(rates) / 1000, max(rates) / 1000
        return f"{high:.1f}k" if len(rates) == 1 else f"{low:.1f}-{high:.1f}k"
    cells = [
        f"{rate / 1000:.1f}k" if rate else f"{d:,}/{n:,}"
        for rate, d in zip(rates, detail["delivered"], strict=True)
    ]
    return "[red]" + " ".join(cells) + (" lossy" if detail["lossy"] else "") + "[/]"


def render(result: dict[str, Any], console: Console) -> None:
    """End to end, one row per configuration; then each side alone; then any errors."""
    mode = "quick" if result["quick"] else "full"
    n = result["n"]
    table = Table(
        title=(
            f"MQTT clients, end to end through Mosquitto {result['mosquitto']}, msgs/s: {n:,} x "
            f"{result['payload_bytes']} B, Python {result['python']}, {result['cpus']} CPUs, {mode} run"
        ),
        caption=(
            f"msgs/s = N / subscriber's first-to-last message time, best of {result['repeats']} "
            f"(runs: their spread); publisher: N / first publish to last ack; paho {result['paho_mqtt']}, "
            f"aiomqtt {result['aiomqtt']}, both with {result['paho_max_inflight']} unacked QoS 1 publishes"
        ),
    )
    for column in ("client", "MQTT", "QoS", "msgs/s", "vs paho", "runs", "publisher"):
        table.add_column(column, justify="left" if column in ("client", "MQTT") else "right")
    for config in CONFIGS:
        detail = result["details"][config.key]
        baseline = result["details"][Config(PAHO, config.version, config.qos).key]["msgs_per_s"]
        table.add_row(
            config.client,
            "3.1.1" if config.version == "v311" else "5",
            f"{config.qos}" if config.qos == 1 else f"{config.qos} (info)",
            _rate(detail["msgs_per_s"]),
            _ratio(detail["msgs_per_s"], baseline) if config.client != PAHO else "",
            _runs(detail, n),
            _rate(detail["pub_msgs_per_s"]),
        )
    console.print(table)

    alone = Table(
        title="Each side alone (info), msgs/s: publish into an offline persistent session, then drain it",
        caption="QoS 1; the two sides never share the CPUs; best of the same repeats",
    )
    for column in ("client", "MQTT", "publisher", "subscriber", "vs paho", "runs"):
        alone.add_column(column, justify="left" if column in ("client", "MQTT") else "right")
    for config in ALONE_CONFIGS:
        detail = result["details"][config.key]
        baseline = result["details"][Config(PAHO, config.version, 1, alone=True).key]["msgs_per_s"]
        alone.add_row(
            config.client,
            "3.1.1" if config.version == "v311" else "5",
            _rate(detail["pub_msgs_per_s"]),
            _rate(detail["msgs_per_s"]),
            _ratio(detail["msgs_per_s"], baseline) if config.client != PAHO else "",
            _runs(detail, n),
        )
    console.print(alone)
    for key, detail in result["details"].items():
        for error in detail["errors"]:
            console.print(f"[red]{key}: {error}[/]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return base_parser(__doc__, "N=5000, one repeat (well under a minute)").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit(run(Settings.of(args.quick)), as_json=args.json, render=render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
