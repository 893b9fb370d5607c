"""Split inference over a real Mosquitto: every stage a `flowloom node` process, one SIGKILLed mid-answer.

The driver is a `Node` in this process with no models; the stages are node daemons started with
``--model tiny-llama``, each loading its own layers from the same generated weights. The greedy
answer must be the monolithic model's, token for token, with or without a stage process killed.
Waits are bounded generously only so that a broken build fails instead of hanging; nothing is timed.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from agents.node import Node
from backends.llm.driver import SplitGenerator
from backends.llm.models import TINY_LLAMA, model_info
from backends.llm.plan import Plan
from backends.llm.reference import generate_monolithic
from backends.llm.stage import SERVICE
from fabric import DeadlineExceeded, MqttTransport
from fabric.testing import MosquittoBroker
from protocol import Capabilities
from tests.agents.test_daemons import flowloom  # noqa: F401  (the fixture that starts and reaps daemons)

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

Daemons = dict[str, subprocess.Popen[str]]
Start = Callable[..., subprocess.Popen[str]]

PROMPT = [1, 5, 7, 9, 11, 13, 17]
NEW_TOKENS = 20
KILL_AFTER = 5  # tokens
STAGE_NODES = {"edge-1": "edge", "edge-2": "edge", "cloud-1": "cloud"}
SPARE = {"spare-1": "edge"}
# The failure detector: daemons beat every 0.2 s (their peers give up after three missed beats);
# the driver beats every 0.1 s and gives up on a silent daemon after 1 s. A SIGKILLed daemon is
# usually known sooner: the broker publishes its Last Will as soon as its socket closes.
DAEMON_HEARTBEAT_S = 0.2
DRIVER_HEARTBEAT_S, DRIVER_DEAD_AFTER_S = 0.1, 1.0
WAIT_S = 120.0  # against a hang, not a timing


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """The monolithic model's greedy answer, computed in this process."""
    return generate_monolithic(TINY_LLAMA, PROMPT, max_new_tokens=NEW_TOKENS).tokens


def start_daemons(start: Start, broker: MosquittoBroker, namespace: str, nodes: dict[str, str]) -> Daemons:
    return {
        node_id: start(
            "node",
            "--id",
            node_id,
            "--tier",
            tier,
            "--cores",
            "2",  # equal speeds: the layers are shared evenly
            "--broker",
            broker.url,
            "--namespace",
            namespace,
            "--model",
            TINY_LLAMA,
            "--heartbeat-s",
            str(DAEMON_HEARTBEAT_S),
        )
        for node_id, tier in nodes.items()
    }


def output_of(proc: subprocess.Popen[str]) -> str:
    """What a daemon printed (it has exited, or is killed now to say it)."""
    if proc.poll() is None:
        proc.kill()
    return proc.communicate()[0]


async def wait_announced(driver: Node, daemons: Daemons) -> None:
    """Until every daemon has said hello to the driver; a daemon that exits fails the test with its output."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    for node_id, proc in daemons.items():
        while True:
            assert proc.poll() is None, f"{node_id} exited ({proc.returncode}):\n{output_of(proc)}"
            try:
                await driver.endpoint.wait_for_peer(node_id, 0.5, announced=True)
                break
            except DeadlineExceeded:
                assert loop.time() < deadline, f"{node_id} did not announce itself within {WAIT_S:g}s"


async def warm_up(driver: Node, daemons: Daemons) -> None:
    """Have every daemon make its ``llm.stage`` service (importing torch and transformers) first.

    The daemon imports it off its event loop and keeps heartbeating; the call only keeps the
    seconds of that import out of the timings the tests print.
    """
    await asyncio.gather(
        *(driver.fabric.call(node_id, SERVICE, "stats", {}, timeout=WAIT_S) for node_id in daemons)
    )


@dataclass
class Cluster:
    driver: Node
    """In this process, on the broker, with no models."""
    daemons: Daemons
    """The stage processes by node id."""


@asynccontextmanager
async def cluster(start: Start, broker: MosquittoBroker, nodes: dict[str, str]) -> AsyncIterator[Cluster]:
    """Daemons for `nodes` on a fabric of their own, and the driver node beside them."""
    namespace = f"t{uuid.uuid4().hex[:12]}"  # each test its own fabric: runs never cross-talk
    daemons = start_daemons(start, broker, namespace, nodes)
    driver = Node(
        "driver",
        MqttTransport(broker.url, "driver", namespace=namespace),
        capabilities=Capabilities(tier="device", cores=1, memory_mb=512, models=[]),
        heartbeat_s=DRIVER_HEARTBEAT_S,
        dead_after_s=DRIVER_DEAD_AFTER_S,
    )
    await driver.start()
    try:
        await wait_announced(driver, daemons)
        await warm_up(driver, daemons)
        yield Cluster(driver, daemons)
    finally:
        await driver.close(grace_s=0.1)


def assert_covers_the_model(plan: Plan, nodes: set[str]) -> None:
    """One stage on each of `nodes`, with contiguous, non-empty layer ranges covering the model."""
    assert {s.node for s in plan.stages} == nodes and len(plan.stages) == len(nodes), plan.report()
    assert plan.stages[0].start == 0, plan.report()
    assert plan.stages[-1].end == model_info(TINY_LLAMA).num_layers, plan.report()
    assert all(s.start < s.end for s in plan.stages), plan.report()
    for before, after in itertools.pairwise(plan.stages):
        assert before.end == after.start, plan.report()


async def test_split_over_three_daemons_equals_the_monolithic_model(
    broker: MosquittoBroker,
    flowloom: Start,  # noqa: F811
    reference: list[int],
) -> None:
    async with cluster(flowloom, broker, STAGE_NODES) as c:
        gen = SplitGenerator(c.driver.fabric, TINY_LLAMA, nodes=list(STAGE_NODES))
        plan = await gen.make_plan()
        assert_covers_the_model(plan, set(STAGE_NODES))
        out = await gen.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_ids=())
        assert out.tokens == reference
        assert out.failovers == []
        assert out.positions == len(PROMPT) + NEW_TOKENS - 1  # the last token is never fed back
        assert all(proc.poll() is None for proc in c.daemons.values())


@pytest.mark.parametrize("stage", [1, 0], ids=["middle-stage", "first-stage"])
async def test_a_sigkilled_stage_process_changes_nothing_in_the_answer(
    broker: MosquittoBroker,
    flowloom: Start,  # noqa: F811
    reference: list[int],
    stage: int,
) -> None:
    async with cluster(flowloom, broker, {**STAGE_NODES, **SPARE}) as c:
        driver, daemons = c.driver, c.daemons
        gen = SplitGenerator(driver.fabric, TINY_LLAMA, nodes=list(STAGE_NODES), spares=list(SPARE))
        plan = await gen.make_plan()
        assert_covers_the_model(plan, set(STAGE_NODES))  # the spare only stands by
        victim = plan.stages[stage]
        killed: list[str] = []
        seen: list[int] = []

        async def on_token(index: int, token: int) -> None:
            seen.append(token)
            if len(seen) == KILL_AFTER:
                killed.append(victim.node)
                proc = daemons[victim.node]
                proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait)  # gone before the next step is sent

        out = await gen.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_ids=(), on_token=on_token)
        assert out.tokens == seen == reference
        assert killed == [victim.node] and daemons[victim.node].returncode == -signal.SIGKILL
        assert len(out.failovers) == 1, [f.moved for f in out.failovers]
        failover = out.failovers[0]
        assert failover.at_token == KILL_AFTER
        assert len(failover.moved) == 1, failover.moved
        moved = failover.moved[0]
        assert moved["from"] == victim.node
        assert moved["layers"] == [victim.start, victim.end]
        new = moved["to"]
        assert new != victim.node and new in daemons
        assert daemons[new].poll() is None and driver.fabric.alive(new)  # a live process took the layers
        assert gen.plan is not None and gen.plan.stages[stage].node == new  # later sessions use it
        print(  # for the record (pytest -s); never asserted
            f"killed {victim.node} (stage {stage}, layers {victim.start}-{victim.end}) -> {new}: "
            f"recover {failover.recover_s:.3f}s, stall {failover.stall_s:.3f}s"
        )
