"""scenarios/split_llm.yaml end to end: SmolLM2 over device, edge and cloud, a stage killed mid-answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.runner import run_scenario
from agents.scenario import load_scenario

SCENARIO = Path(__file__).parents[2] / "scenarios" / "split_llm.yaml"


@pytest.mark.slow
async def test_the_answer_survives_a_stage_node_killed_mid_answer() -> None:
    report, _ = await run_scenario(load_scenario(SCENARIO))
    assert report.ok, [e for e in report.expectations if not e.ok]
    chat, reference = report.outputs["chat"], report.outputs["reference"]
    assert chat["text"] and chat["text"] == reference["text"]
    assert len(chat["tokens"]) > 5  # the kill came mid-answer, not after it
    [failover] = chat["failovers"]
    assert [m["from"] for m in failover["moved"]] == ["edge-1"]
    assert failover["moved"][0]["to"] == "edge-2"
    assert {s["node"] for s in chat["plan"]} == {"phone", "edge-2", "cloud-1"}
    assert report.faults[0].target == "killed edge-1" and not report.nodes["edge-1"].alive
    for name in ["tokens_per_s", "ttft_s", "wire_bytes_per_token", "failover_s"]:
        assert report.figures[f"chat.{name}"] > 0
    assert report.figures["chat.wire_bytes_per_token"] == 2 * 576 * 4  # float32, two hops
