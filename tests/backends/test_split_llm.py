"""Split inference in one process: stages on in-process nodes, compared with the monolithic model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import torch

from agents.node import Node
from agents.services import CallFailed
from backends.llm.driver import SplitGenerator
from backends.llm.errors import LlmError, NoStageNode
from backends.llm.models import TINY_LLAMA, load_full, load_stage, model_info
from backends.llm.plan import plan_stages, replacement
from backends.llm.reference import generate_monolithic
from fabric import InprocHub
from protocol import Capabilities

PROMPT = [1, 5, 7, 9, 11, 13, 17]
STAGE_NODES = ["edge-1", "edge-2", "cloud-1"]


class Cluster:
    def __init__(self) -> None:
        self.hub = InprocHub()
        self.nodes: dict[str, Node] = {}

    async def add(self, name: str, tier: str = "edge", *, models: list[str], memory_mb: int = 2048) -> Node:
        caps = Capabilities(tier=tier, cores=2, memory_mb=memory_mb, models=models)
        node = Node(name, self.hub.transport(name), capabilities=caps, heartbeat_s=0.05, dead_after_s=0.5)
        await node.start()
        self.nodes[name] = node
        return node

    async def settle(self) -> None:
        driver = self.nodes["device"]
        for name in self.nodes:
            if name != "device":
                await driver.endpoint.wait_for_peer(name, 10.0, announced=True)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    await c.add("device", "device", models=[])
    for name in [*STAGE_NODES, "spare-1"]:
        await c.add(name, models=[TINY_LLAMA])
    await c.settle()
    yield c
    for node in c.nodes.values():
        await node.close(grace_s=0.1)


def reference(n: int = 16, **sample: object) -> list[int]:
    return generate_monolithic(TINY_LLAMA, PROMPT, max_new_tokens=n, sample=dict(sample)).tokens


# planning ------------------------------------------------------------------------------------


def caps(memory_mb: int, speed: float, tier: str = "edge") -> Capabilities:
    return Capabilities(tier=tier, cores=1, memory_mb=memory_mb, labels={"speed": str(speed)})


def test_layers_follow_speed_and_stay_within_memory() -> None:
    info = model_info("smollm2-135m")  # 30 layers of 13.5 MiB, embeddings and head of 108 MiB each
    nodes = {"fast": caps(4096, 4), "slow": caps(4096, 1), "small": caps(300, 4)}
    plan = plan_stages(info, nodes, driver="phone", link_cost=lambda a, b, n: 0.0)
    layers = {s.node: s.end - s.start for s in plan.stages}
    assert sum(layers.values()) == 30
    assert [s.start for s in plan.stages[1:]] == [s.end for s in plan.stages[:-1]]  # contiguous
    assert layers["fast"] > 2 * layers["slow"]  # 4x the speed gets several times the layers
    for stage in plan.stages:  # nobody holds more than it announced
        assert stage.param_bytes <= nodes[stage.node].memory_mb * 1024 * 1024


def test_the_order_of_stages_follows_the_links() -> None:
    info = model_info(TINY_LLAMA)
    nodes = {"a": caps(64, 1), "b": caps(64, 1), "c": caps(64, 1)}
    near = {("phone", "c"), ("c", "a"), ("a", "b"), ("b", "phone")}

    def cost(src: str, dst: str, nbytes: int) -> float:
        return 0.001 if (src, dst) in near else 0.05

    plan = plan_stages(info, nodes, driver="phone", link_cost=cost)
    assert [s.node for s in plan.stages] == ["c", "a", "b"]
    assert plan.link_s_per_token == pytest.approx(0.004)


def test_too_little_memory_is_refused_with_what_is_needed() -> None:
    info = model_info("smollm2-135m")
    with pytest.raises(NoStageNode, match=r"needs \d+ MiB .* offer 200 MiB"):
        plan_stages(info, {"a": caps(100, 1), "b": caps(100, 1)}, driver="d", link_cost=lambda *a: 0.0)


def test_a_replacement_has_room_beside_what_it_holds() -> None:
    info = model_info("smollm2-135m")
    nodes = {"a": caps(1024, 1), "b": caps(1024, 1), "c": caps(1024, 1), "tiny": caps(50, 8)}
    plan = plan_stages(info, {n: nodes[n] for n in "abc"}, driver="d", link_cost=lambda *a: 0.0)
    lost = plan.stages[1].node
    new = replacement(plan, 1, nodes, exclude={lost}, driver="d", link_cost=lambda *a: 0.0)
    assert new not in (lost, "tiny")
    with pytest.raises(NoStageNode, match="no live node can take layers"):
        replacement(plan, 1, {"tiny": nodes["tiny"]}, exclude={lost}, driver="d", link_cost=lambda *a: 0.0)


# loading -------------------------------------------------------------------------------------


def test_a_stage_loads_only_its_layers() -> None:
    info = model_info(TINY_LLAMA)
    first, middle, last = (
        load_stage(TINY_LLAMA, 0, 3),
        load_stage(TINY_LLAMA, 3, 5),
        load_stage(TINY_LLAMA, 5, 8),
    )
    assert middle.inner.embed_tokens is None and middle.head is None
    assert len(middle.inner.layers) == 2
    assert middle.param_bytes == 2 * info.layer_bytes
    assert first.param_bytes == 3 * info.layer_bytes + info.embed_bytes
    assert last.param_bytes == 3 * info.layer_bytes + info.head_bytes
    full = sum(p.numel() * 4 for p in load_full(TINY_LLAMA).parameters())
    assert first.param_bytes + middle.param_bytes + last.param_bytes == full


def test_the_monolithic_reference_is_hugging_faces_greedy_generate() -> None:
    full = load_full(TINY_LLAMA)
    out = full.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert out[0, len(PROMPT) :].tolist() == reference(16)


# generating ----------------------------------------------------------------------------------


async def test_split_greedy_equals_the_monolithic_model(cluster: Cluster) -> None:
    gen = SplitGenerator(cluster.nodes["device"].fabric, TINY_LLAMA, nodes=STAGE_NODES)
    plan = await gen.make_plan()
    assert sorted(s.node for s in plan.stages) == sorted(STAGE_NODES)
    out = await gen.generate(PROMPT, max_new_tokens=16)
    assert out.tokens == reference(16)
    assert out.wire_bytes / out.positions == 2 * 64 * 4  # two hops of one float32 hidden state


async def test_seeded_sampling_is_repeatable_and_equals_the_monolithic_model(cluster: Cluster) -> None:
    sample = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 7}
    gen = SplitGenerator(cluster.nodes["device"].fabric, TINY_LLAMA, nodes=STAGE_NODES, sample=sample)
    first = await gen.generate(PROMPT, max_new_tokens=16)
    assert first.tokens == (await gen.generate(PROMPT, max_new_tokens=16)).tokens
    assert first.tokens == reference(16, **sample)
    assert first.tokens != reference(16, **{**sample, "seed": 8})


async def test_concurrent_sessions_each_get_their_own_answer(cluster: Cluster) -> None:
    gen = SplitGenerator(cluster.nodes["device"].fabric, TINY_LLAMA, nodes=STAGE_NODES)
    prompts = [PROMPT, PROMPT[:3], [1, 2, 3, 4, 5], PROMPT[::-1]]
    outs = await asyncio.gather(*(gen.generate(p, max_new_tokens=12) for p in prompts))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.tokens == generate_monolithic(TINY_LLAMA, prompt, max_new_tokens=12).tokens


def killer(
    cluster: Cluster, gen: SplitGenerator, stage: int, after: int
) -> tuple[list[str], Callable[..., object]]:
    killed: list[str] = []

    async def on_token(index: int, token: int) -> None:
        on_token.count += 1  # type: ignore[attr-defined]
        if on_token.count == after and not killed:  # type: ignore[attr-defined]
            assert gen.plan is not None
            victim = gen.plan.stages[stage].node
            killed.append(victim)
            await cluster.nodes[victim].crash()

    on_token.count = 0  # type: ignore[attr-defined]
    return killed, on_token


@pytest.mark.parametrize("stage", [0, 1, 2])
async def test_a_stage_node_killed_after_the_fifth_token_changes_nothing(
    cluster: Cluster, stage: int
) -> None:
    gen = SplitGenerator(
        cluster.nodes["device"].fabric, TINY_LLAMA, nodes=[*STAGE_NODES, "spare-1"], max_stages=3
    )
    await gen.make_plan()
    killed, on_token = killer(cluster, gen, stage, after=5)
    out = await gen.generate(PROMPT, max_new_tokens=16, on_token=on_token)  # type: ignore[arg-type]
    assert out.tokens == reference(16)
    assert len(killed) == 1 and len(out.failovers) == 1
    moved = out.failovers[0].moved
    assert [m["from"] for m in moved] == killed
    assert moved[0]["to"] != killed[0] and not cluster.nodes[moved[0]["to"]].closed
    assert out.failovers[0].at_token == 5


async def test_a_lost_session_is_refilled_on_the_same_node(cluster: Cluster) -> None:
    """A stage that evicted (or, restarted, forgot) a session is rebuilt where it is."""
    gen = SplitGenerator(cluster.nodes["device"].fabric, TINY_LLAMA, nodes=STAGE_NODES)
    await gen.make_plan()
    assert gen.plan is not None
    middle = gen.plan.stages[1].node

    async def on_token(index: int, token: int) -> None:
        if on_token.count == 4:  # type: ignore[attr-defined]
            service = await cluster.nodes[middle].services._service("llm.stage")
            service._sessions.clear()  # type: ignore[attr-defined]
        on_token.count += 1  # type: ignore[attr-defined]

    on_token.count = 0  # type: ignore[attr-defined]
    out = await gen.generate(PROMPT, max_new_tokens=12, on_token=on_token)
    assert out.tokens == reference(12)
    assert [m["to"] for m in out.failovers[0].moved] == [middle]


async def test_lossy_wire_formats_send_fewer_bytes(cluster: Cluster) -> None:
    per_token = {}
    for wire in ["float32", "bfloat16", "float16", "int8"]:
        gen = SplitGenerator(cluster.nodes["device"].fabric, TINY_LLAMA, nodes=STAGE_NODES, wire=wire)
        out = await gen.generate(PROMPT, max_new_tokens=8)
        assert len(out.tokens) == 8
        per_token[wire] = out.wire_bytes / out.positions
    assert per_token["bfloat16"] == per_token["float16"] == per_token["float32"] / 2
    assert per_token["int8"] == 2 * (64 + 4)  # a byte per value and a float32 scale per row, two hops


async def test_bad_requests_name_what_is_wrong(cluster: Cluster) -> None:
    fabric = cluster.nodes["device"].fabric
    with pytest.raises(LlmError, match="wire must be one of"):
        SplitGenerator(fabric, TINY_LLAMA, wire="float8")
    with pytest.raises(NoStageNode, match="no live node announces model 'gpt-9'"):
        await SplitGenerator(fabric, "gpt-9").make_plan()
    with pytest.raises(CallFailed, match="unknown model 'gpt-9'"):
        stage = {"model": "gpt-9", "start": 0, "end": 2}
        await fabric.call("edge-1", "llm.stage", "open", {"session": "s", "stage": stage}, timeout=10)
    with pytest.raises(CallFailed, match="has no method 'explode'"):
        await fabric.call("edge-1", "llm.stage", "explode", {}, timeout=10)
    with pytest.raises(CallFailed, match="session nope is not open"):
        stage = {"model": TINY_LLAMA, "start": 0, "end": 2}
        await fabric.call(
            "edge-1", "llm.stage", "forward", {"session": "nope", "stage": stage, "pos": 0}, timeout=10
        )
    with pytest.raises(CallFailed, match=r"no service 'llm\.nothing'"):
        await fabric.call("edge-1", "llm.nothing", "open", {}, timeout=10)


async def test_idle_and_surplus_sessions_are_evicted() -> None:
    from agents.services import ServiceRegistry
    from backends.llm.stage import StageService

    hub = InprocHub()
    services = ServiceRegistry({"llm.stage": lambda fabric: StageService(fabric, max_sessions=2)})
    caps = Capabilities(tier="edge", cores=1, memory_mb=512, models=[TINY_LLAMA])
    async with Node("edge-1", hub.transport("edge-1"), capabilities=caps, services=services) as node:
        stage = {"model": TINY_LLAMA, "start": 0, "end": 8}
        for sid in ["a", "b", "c"]:  # the third open evicts the least recently used: a
            await node.fabric.call(
                "edge-1", "llm.stage", "open", {"session": sid, "stage": stage}, timeout=10
            )
        stats = (await node.fabric.call("edge-1", "llm.stage", "stats", {}, timeout=10)).value
        assert sorted(s["session"] for s in stats["sessions"]) == ["b", "c"]
        assert stats["stages"][0]["param_bytes"] > 0
        forward = {"session": "a", "stage": stage, "pos": 0, "x": PROMPT}
        with pytest.raises(CallFailed, match="session a is not open"):
            await node.fabric.call("edge-1", "llm.stage", "forward", forward, timeout=10)
        reply = await node.fabric.call(
            "edge-1", "llm.stage", "forward", {**forward, "session": "b"}, timeout=10
        )
        assert reply.value["token"] == reference(1)[0]
