"""scenarios/split_llm.yaml end to end: SmolLM2 over device, edge and cloud, a stage killed mid-answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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


@pytest.mark.slow
async def test_the_device_stage_behind_nat_reaches_the_rest_through_relays(tmp_path: Path) -> None:
    """The same answer with the phone behind NAT at home and the cloud in a data centre.

    Only the edge boxes join both networks, as relays: the driver on the phone reaches the cloud
    stage and the orchestrator only through them. The killed edge-1 is a stage and a relay at once.
    """
    data = yaml.safe_load(SCENARIO.read_text())
    data["nodes"]["phone"].update(segment="home", nat=True)
    data["nodes"]["edge-1"].update(segments=["home", "dc"], relay=True)
    data["nodes"]["edge-2"].update(segments=["home", "dc"], relay=True)
    data["nodes"]["cloud-1"].update(segment="dc", nat=True)
    nat = tmp_path / "split_llm_nat.yaml"
    nat.write_text(yaml.safe_dump(data))

    report, _ = await run_scenario(load_scenario(nat))

    assert report.ok, [e for e in report.expectations if not e.ok]
    chat, reference = report.outputs["chat"], report.outputs["reference"]
    assert chat["text"] and chat["text"] == reference["text"]
    assert [m["from"] for m in chat["failovers"][0]["moved"]] == ["edge-1"]
    assert report.routes["phone -> cloud-1"] == ["phone", "edge-2", "cloud-1"]
    assert report.routes["orchestrator -> phone"] == ["orchestrator", "edge-2", "phone"]
    assert report.figures["relayed_envelopes"] > 0
