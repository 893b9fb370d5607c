"""Relays as `flowloom node` processes: a device on one broker runs work on a cloud node on another.

Two private Mosquitto brokers, A and B, with nothing between them. The cloud node daemon is on B
only; the relay daemons (``--broker A --broker B --relay``) are the only things on both. The device
is this process: an `Endpoint` on A only, running an `Orchestrator` whose tasks may go to cloud-1
alone. Everything the device sends the cloud, and everything the cloud answers, crosses a relay.

Waits are bounded generously only so that a broken build fails instead of hanging; nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from agents.graph import TaskGraph
from agents.orchestrator import JobEvent, Orchestrator
from fabric import DeadlineExceeded, Endpoint, FabricError, MqttTransport, PeerUnreachable
from fabric.testing import MosquittoBroker
from protocol import Capabilities, TaskAssign, TaskSpec

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

DAEMON_HEARTBEAT_S = 0.2  # daemons beat every 0.2 s and give up on a peer after three missed beats
# A SIGKILLed relay is known at once: each broker publishes its Last Will as soon as its socket
# closes. The device's own failure detector is only the fallback, so it is patient: on a loaded
# machine, 64 MiB through a relay can hold cloud-1's heartbeats up for a while, and a node wrongly
# declared dead gets its task again (which is correct, but sends the blob twice).
DEVICE_HEARTBEAT_S, DEVICE_DEAD_AFTER_S = 0.1, 5.0
PROBE_TIMEOUT_S = 1.0  # per request, while waiting for the device to find cloud-1 unreachable
MAX_DISPATCHES = 20  # of one task in one job; far more is the orchestrator spinning (see run_on_cloud)
WAIT_S = 120.0  # against a hang, not a timing
BLOB_BYTES = 64 << 20
ROOT = Path(__file__).resolve().parents[2]
FLOWLOOM = [sys.executable, "-m", "agents.cli"]


@pytest.fixture(scope="module")
def brokers() -> Iterator[tuple[MosquittoBroker, MosquittoBroker]]:
    """Brokers A (the device's) and B (the cloud's), on two free ports; nothing bridges them."""
    a, b = MosquittoBroker(), MosquittoBroker()
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.close()
        b.close()


@dataclass
class Daemons:
    """`flowloom node` processes of one fabric, each writing its output to a file of its own.

    A file, not a pipe: a pipe nobody reads while the test runs would block a chatty daemon.
    """

    namespace: str
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, node_id: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{node_id}.log").open("wb") as out:
            proc = subprocess.Popen(
                [
                    *FLOWLOOM,
                    "node",
                    "--id",
                    node_id,
                    *args,
                    "--namespace",
                    self.namespace,
                    "--heartbeat-s",
                    str(DAEMON_HEARTBEAT_S),
                ],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs[node_id] = proc
        return proc

    def output(self, node_id: str) -> str:
        return (self.logs / f"{node_id}.log").read_text(errors="replace")

    def check_running(self, node_id: str) -> None:
        proc = self.procs[node_id]
        assert proc.poll() is None, f"{node_id} exited ({proc.returncode}):\n{self.output(node_id)}"

    def kill(self, node_id: str) -> None:
        """SIGKILL: the process dies at once, says no bye; its brokers publish its Last Will."""
        self.procs[node_id].send_signal(signal.SIGKILL)
        self.procs[node_id].wait(timeout=WAIT_S)

    def reap(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=WAIT_S)


@dataclass
class Topology:
    a: MosquittoBroker
    b: MosquittoBroker
    daemons: Daemons
    device: Endpoint
    """This process, on broker A only."""

    def start_relay(self, node_id: str) -> None:
        brokers = ("--broker", self.a.url, "--broker", self.b.url)
        self.daemons.start(node_id, "--tier", "edge", *brokers, "--relay")


async def until(check: Callable[[], bool], what: str, daemons: Daemons) -> None:
    """Poll `check` until it holds; fail with the daemons' output when a daemon exits or after WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not check():
        for node_id, proc in daemons.procs.items():
            if proc.returncode is None:  # not one the test has killed and reaped
                daemons.check_running(node_id)
        assert loop.time() < deadline, f"{what} did not happen within {WAIT_S:g}s"
        await asyncio.sleep(0.02)


def route_is(device: Endpoint, path: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return device.route("cloud-1") == path
        except FabricError:  # PeerUnreachable while no relay reaches it
            return False

    return check


@pytest.fixture
async def topology(
    brokers: tuple[MosquittoBroker, MosquittoBroker], tmp_path: Path
) -> AsyncIterator[Topology]:
    """cloud-1 on B, relay-1 on A and B, the device on A; ready once the device can route to cloud-1."""
    a, b = brokers
    daemons = Daemons(f"t{uuid.uuid4().hex[:12]}", tmp_path)  # a fabric of its own: no cross-talk
    device = Endpoint(
        "device",
        MqttTransport(a.url, "device", namespace=daemons.namespace),
        capabilities=Capabilities(tier="device", cores=1, memory_mb=512, reachability="nat"),
        heartbeat_s=DEVICE_HEARTBEAT_S,
        dead_after_s=DEVICE_DEAD_AFTER_S,
    )
    try:
        daemons.start("cloud-1", "--tier", "cloud", "--cores", "4", "--broker", b.url, "--nat")
        await device.start()
        topo = Topology(a, b, daemons, device)
        await until(lambda: "ready" in daemons.output("cloud-1"), "cloud-1 ready", daemons)
        # Up on its broker, and invisible from the device's: nothing joins A and B yet.
        assert device.peers.get("cloud-1") is None
        topo.start_relay("relay-1")
        await until(lambda: "relaying: ready" in daemons.output("relay-1"), "relay-1 ready", daemons)
        await until(lambda: device.peers.get("cloud-1") is not None, "cloud-1 seen from A", daemons)
        await device.wait_for_peer("cloud-1", timeout=WAIT_S, announced=True)  # and routable
        yield topo
    finally:
        await device.close()
        daemons.reap()


def diamond(job: str) -> TaskGraph:
    """a = 1; b = a + 10; c = a + 100; d = b + c = 112."""
    return TaskGraph(
        job,
        [
            TaskSpec(id="a", kind="echo", params={"value": 1}),
            TaskSpec(id="b", kind="sum", inputs={"x": "a"}, params={"add": 10}),
            TaskSpec(id="c", kind="sum", inputs={"x": "a"}, params={"add": 100}),
            TaskSpec(id="d", kind="sum", inputs={"x": "b", "y": "c"}),
        ],
    )


async def run_on_cloud(topo: Topology, graph: TaskGraph) -> Orchestrator:
    """Run `graph` from the device, its tasks placed on cloud-1 only; check every task ran there.

    When a send to a node it believes alive fails at once (no route to it), the orchestrator places
    the task on that node again without ever yielding to the event loop: nothing can change, not
    even the run's timeout fires, and its event list grows until the machine runs out of memory. A
    bound on dispatches per task turns that into a failure of this test.
    """
    dispatches: Counter[str] = Counter()

    def on_event(event: JobEvent) -> None:
        if event.kind in ("dispatch", "speculate"):
            dispatches[event.task] += 1
            if dispatches[event.task] > MAX_DISPATCHES:
                raise RuntimeError(f"{event.task} dispatched over {MAX_DISPATCHES} times: a spin")

    orchestrator = Orchestrator(topo.device, nodes={"cloud-1"}, on_event=on_event)

    def what_happened() -> str:
        events = "\n".join(str(e) for e in orchestrator.events[:50] if e.kind != "progress")
        logs = "\n".join(f"--- {n}:\n{topo.daemons.output(n)}" for n in topo.daemons.procs)
        return f"{events}\n{topo.device.stats}\n{logs}"

    try:
        await orchestrator.run(graph, timeout=WAIT_S)
    except Exception as exc:
        exc.add_note(what_happened())
        raise
    assert graph.counts()["done"] == len(graph), what_happened()
    assert {graph.task(t).node for t in graph.order()} == {"cloud-1"}
    return orchestrator


def relays_of(orchestrator: Orchestrator) -> set[str]:
    """The relays the dispatches went through, as the orchestrator's events name them."""
    return {e.detail for e in orchestrator.events if e.kind == "dispatch"}


async def test_a_device_runs_a_job_and_a_64_mib_blob_on_a_cloud_node_behind_another_broker(
    topology: Topology,
) -> None:
    device = topology.device
    assert device.route("cloud-1") == ["device", "relay-1", "cloud-1"]
    assert not device.routes.is_direct("cloud-1")

    orchestrator = await run_on_cloud(topology, diamond("diamond"))

    assert orchestrator.graph is not None and orchestrator.graph.task("d").result == 112
    assert relays_of(orchestrator) == {"via relay-1"}
    assert device.stats.relayed_sent >= 4 and device.stats.relayed_received >= 4  # 4 assigns, 4 results

    # 64 MiB to the cloud as a task's parameter, and back as its result (`echo` returns it).
    blob = np.random.default_rng(64).integers(0, 256, size=BLOB_BYTES, dtype=np.uint8)
    graph = TaskGraph("blob", [TaskSpec(id="blob", kind="echo", params={"value": blob})])
    orchestrator = await run_on_cloud(topology, graph)

    echoed = graph.task("blob").result
    assert isinstance(echoed, np.ndarray) and echoed.dtype == np.uint8 and echoed.shape == blob.shape
    assert hashlib.sha256(echoed.tobytes()).hexdigest() == hashlib.sha256(blob.tobytes()).hexdigest()
    assert relays_of(orchestrator) == {"via relay-1"}
    # Every copy of the blob went through the relay, as chunks: once per dispatch of the task
    # (more than one only if cloud-1 was wrongly declared dead meanwhile), and at least one back.
    sent = sum(e.kind in ("dispatch", "speculate") for e in orchestrator.events)
    stats = device.stats
    assert stats.relayed_blobs_sent == stats.blobs_sent == sent >= 1, (sent, stats)
    assert stats.relayed_blobs_received == stats.blobs_received >= 1, stats
    assert stats.bulk_sent == 0 and stats.blob_errors == 0, stats
    topology.daemons.check_running("cloud-1")
    topology.daemons.check_running("relay-1")


async def test_work_moves_to_the_second_relay_and_without_relays_the_error_names_the_cloud(
    topology: Topology,
) -> None:
    device, daemons = topology.device, topology.daemons
    topology.start_relay("relay-2")
    # relay-2 has reported its links to both ends (the cloud's answers need the way back too).
    await until(
        lambda: {"cloud-1", "device"} <= set(device.routes.reported("relay-2")),
        "relay-2's links to cloud-1 and the device",
        daemons,
    )

    daemons.kill("relay-1")
    await until(route_is(device, ["device", "relay-2", "cloud-1"]), "the route through relay-2", daemons)
    orchestrator = await run_on_cloud(topology, diamond("after-relay-1"))

    assert orchestrator.graph is not None and orchestrator.graph.task("d").result == 112
    assert relays_of(orchestrator) == {"via relay-2"}

    daemons.kill("relay-2")
    assign = TaskAssign(job="probe", task="t", attempt=0, task_kind="echo", params={"value": 1})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    with pytest.raises(PeerUnreachable) as lost:
        while True:  # until the device has noticed (within its failure-detection bound)
            assert loop.time() < deadline, f"cloud-1 still answered or timed out after {WAIT_S:g}s"
            daemons.check_running("cloud-1")
            with contextlib.suppress(DeadlineExceeded):  # sent just before the relay died
                await device.request("cloud-1", assign, timeout=PROBE_TIMEOUT_S)
    assert lost.value.node == "cloud-1" and "'cloud-1'" in str(lost.value)
    # cloud-1 itself is fine: it drains and leaves cleanly on SIGTERM.
    cloud = daemons.procs["cloud-1"]
    cloud.send_signal(signal.SIGTERM)
    assert cloud.wait(timeout=WAIT_S) == 0, daemons.output("cloud-1")
    assert "draining" in daemons.output("cloud-1")
