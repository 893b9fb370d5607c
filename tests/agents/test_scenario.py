"""Scenario files: what validation refuses, and how a run reports faults and expectations."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from agents.errors import ScenarioError
from agents.orchestrator import JobEvent
from agents.runner import run_scenario, write_trace
from agents.scenario import Scenario, load_scenario


def scenario(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "s",
        "nodes": {"edge-1": {"tier": "edge", "cores": 2}, "edge-2": {"tier": "edge"}},
        "workload": {
            "tasks": [
                {"id": "a", "kind": "echo", "params": {"value": 1}},
                {"id": "b", "kind": "sleep", "params": {"seconds": 0.3}, "after": ["a"]},
            ]
        },
    }
    data.update(overrides)
    return data


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(name="my scenario"), "s.yaml: name: String should match pattern"),
        (lambda d: d["nodes"].update({"edge 3": {"tier": "edge"}}), r"nodes\.edge 3\.\[key\]"),
        (lambda d: d["nodes"].update(orchestrator={"tier": "cloud"}), "orchestrator's own id"),
        (
            lambda d: d["nodes"]["edge-1"].update(cores="4"),
            r"nodes\.edge-1\.cores: Input should be a valid integer",
        ),
        (lambda d: d["workload"]["tasks"][0].update(after=["b"]), "it would make a cycle: a -> b -> a"),
        (
            lambda d: (
                d["workload"].update(generate={"count": 2})
                or d["workload"]["tasks"][0].update(id="request-1")
                or d["workload"]["tasks"][1].update(after=["request-1"])
            ),
            r"workload\.generate \(request-1\): task request-1 already exists",
        ),
        (
            lambda d: d["workload"]["tasks"][0].update(
                params={"when": __import__("datetime").date(2024, 1, 1)}
            ),
            r"workload\.tasks\.0\.params\.when: value: a datetime\.date cannot travel on the wire",
        ),
        (
            lambda d: d["workload"]["tasks"][1].update(id="a", after=[]),
            r"tasks\.1\.id: task 'a' is already workload\.tasks\.0",
        ),
        (
            lambda d: d["workload"]["tasks"][0].update(cores=3),
            r"workload\.tasks\.0: no node can run task 'a'",
        ),
        (
            lambda d: d["workload"]["tasks"][0].update(params={"big": 1 << 70}),
            r"workload\.tasks\.0\.params: cannot encode",
        ),
        (
            lambda d: d.update(faults=[{"at_s": 0, "action": "slow_node", "node": "edge-1", "factor": 0.5}]),
            r"faults\.0\.factor: Input should be greater than 1",
        ),
        (
            lambda d: d["nodes"]["edge-1"].update(segment="home", segments=["home", "dc"]),
            r"nodes\.edge-1: give `segment` or `segments`, not both",
        ),
        (
            lambda d: d["nodes"]["edge-1"].update(segments=["home", "home"]),
            r"nodes\.edge-1: segments: \['home', 'home'\] names a segment twice",
        ),
        (  # the orchestrator beside edge-1, behind NAT at home; edge-2 elsewhere, and no relay
            lambda d: d["nodes"]["edge-1"].update(segment="home", nat=True),
            r"nodes\.edge-2: edge-2 cannot reach edge-1, which is behind NAT in segments \['home'\], "
            r"and no relay",
        ),
    ],
)
def test_validation_names_the_file_and_field_of_each_mistake(
    tmp_path: Path, change: Any, message: str
) -> None:
    data = scenario()
    change(data)
    with pytest.raises(ScenarioError, match=message):
        load_scenario(write(tmp_path, data))


def test_generated_requests_may_be_expected_by_name(tmp_path: Path) -> None:
    data = scenario()
    data["workload"]["generate"] = {"count": 3, "kind": "echo", "params": {"value": 7}}
    data["expect"] = {"outputs": {"request-2": 7}}
    assert load_scenario(write(tmp_path, data)).expect.outputs == {"request-2": 7}
    for wrong in ("request-3", "request-01"):  # beyond the count; not how requests are named
        data["expect"] = {"outputs": {wrong: 7}}
        with pytest.raises(ScenarioError, match=f"unknown task '{wrong}'"):
            load_scenario(write(tmp_path, data))


async def test_the_report_tells_unfinished_outputs_repeated_kills_and_late_faults() -> None:
    data = scenario(
        faults=[
            {"at_s": 0.0, "action": "kill_node", "node": "edge-2"},
            {"at_s": 0.05, "action": "kill_node", "node": "edge-2"},
            {"at_s": 500, "action": "restart_node", "node": "edge-2"},
        ],
        expect={"outputs": {"b": None}},
    )
    data["workload"]["tasks"][0].update(kind="sleep", params={"seconds": 0.3})
    data["workload"]["tasks"][1].update(kind="fail", params={})  # b fails: no output, not a null one
    report, _ = await run_scenario(Scenario.model_validate(data))
    assert [f.target for f in report.faults] == [
        "killed edge-2",
        "edge-2 was already down; not killed",
        "edge-2: not injected, the job had ended",
    ]
    check = next(e for e in report.expectations if e.name == "output of b")
    assert not check.ok and check.detail == "task is failed"
    assert not report.ok


def two_nodes(tasks: list[dict[str, Any]], faults: list[dict[str, Any]], **more: Any) -> Scenario:
    return Scenario.model_validate(
        {
            "name": "faults",
            "nodes": {"edge-1": {"tier": "edge", "cores": 2}, "cloud-1": {"tier": "cloud", "cores": 2}},
            "links": [{"src": "edge-1", "dst": "cloud-1", "latency_ms": 5}],
            "workload": {"tasks": tasks, "timeout_s": 120},
            "faults": faults,
            **more,
        }
    )


async def test_a_partition_from_the_orchestrators_node_moves_work_and_heal_brings_the_node_back() -> None:
    # The orchestrator runs beside cloud-1: cutting edge-1 off from cloud-1 cuts it off from the job.
    scenario = two_nodes(
        [{"id": "edge-work", "kind": "sleep", "tier": "edge", "params": {"seconds": 3}}],
        [
            {"at_s": 0.2, "action": "partition", "node": "edge-1", "peer": "cloud-1"},
            {"at_s": 2.0, "action": "heal", "node": "edge-1", "peer": "cloud-1"},
        ],
    )
    report, orchestrator = await run_scenario(scenario)
    assert report.ok and report.tasks.done == 1
    assert [f.target for f in report.faults] == ["cut edge-1 <-> cloud-1", "restored edge-1 <-> cloud-1"]
    assert orchestrator.stats.reassigned >= 1  # declared dead behind the cut, its task put back
    kinds = [(e.kind, e.node) for e in orchestrator.events]
    assert ("dispatch", "edge-1") in kinds and kinds.count(("dispatch", "edge-1")) >= 2  # again after heal


async def test_a_restarted_node_takes_work_again() -> None:
    scenario = two_nodes(
        [
            {"id": "first", "kind": "sleep", "tier": "edge", "params": {"seconds": 1}},
            {"id": "second", "kind": "echo", "tier": "edge", "params": {"value": 2}, "after": ["first"]},
        ],
        [
            {"at_s": 0.2, "action": "kill_node", "node": "edge-1"},
            {"at_s": 0.6, "action": "restart_node", "node": "edge-1"},
        ],
    )
    report, orchestrator = await run_scenario(scenario)
    assert report.ok and report.tasks.done == 2 and report.outputs["second"] == 2
    assert [f.target for f in report.faults] == ["killed edge-1", "restarted edge-1"]
    assert orchestrator.stats.reassigned == 1 and report.nodes["edge-1"].alive


@pytest.mark.usefixtures("broker")  # mosquitto must be there; the run starts a broker of its own
async def test_a_broker_restart_mid_run_loses_nothing() -> None:
    scenario = two_nodes(
        [
            {"id": "a", "kind": "sleep", "params": {"seconds": 0.5}},
            {"id": "b", "kind": "sleep", "params": {"seconds": 0.5}},
            {"id": "c", "kind": "sum", "inputs": {"x": "a", "y": "b"}},
            {"id": "d", "kind": "echo", "params": {"value": "after"}, "after": ["c"]},
        ],
        [{"at_s": 0.2, "action": "restart_broker"}],
        expect={"outputs": {"c": 1.0, "d": "after"}},
    )
    report, orchestrator = await run_scenario(scenario, private_broker=True)
    assert [f.target for f in report.faults] == ["restarted the broker"]
    assert report.ok and report.tasks.done == 4
    assert orchestrator.stats.accepted == 4  # exactly one accepted result per task


async def test_partitions_are_refused_on_a_private_broker_which_cannot_cut_broadcasts() -> None:
    scenario = two_nodes(
        [{"id": "a", "kind": "echo"}],
        [{"at_s": 0.1, "action": "partition", "node": "edge-1", "peer": "cloud-1"}],
    )
    with pytest.raises(ScenarioError, match="partition and heal need the in-process hub; drop --mqtt"):
        await run_scenario(scenario, private_broker=True)


async def test_nat_relay_scenario_crosses_segments_through_relays_and_survives_losing_one(
    tmp_path: Path,
) -> None:

    events: list[JobEvent] = []
    report, _ = await run_scenario(load_scenario("scenarios/nat_relay.yaml"), on_event=events.append)

    assert report.ok, report.expectations
    assert report.outputs["checksum"] == sum(range(2 * 1024 * 1024))  # 16 MiB crossed intact
    assert report.faults[0].target == "killed edge-1"
    assert report.nodes["edge-1"].segment == "home+dc"
    # The phone and the cloud side reach each other only through the relay left alive.
    assert report.routes["orchestrator -> phone"] == ["orchestrator", "edge-2", "phone"]
    assert report.routes["phone -> cloud-1"] == ["phone", "edge-2", "cloud-1"]
    assert "orchestrator -> cloud-1" not in report.routes  # same segment: direct
    assert report.figures["relayed_blobs"] >= 1 and report.figures["relay_forwarded"] > 0
    # The trace says which tasks went through which relay: edge-1 before its death, then edge-2.
    trace = tmp_path / "trace.json"
    write_trace(events, trace)
    spans = {
        e["name"]: e["args"]
        for e in __import__("json").loads(trace.read_text())["traceEvents"]
        if e["ph"] == "X"
    }
    assert spans["capture"]["sent"] == "via edge-1" and spans["capture"]["returned"] == "via edge-1"
    assert spans["notify"]["sent"] == "via edge-2"
    assert "sent" not in spans["checksum"]  # the cloud is beside the orchestrator


async def test_segments_are_refused_on_a_private_broker_which_cannot_separate_them() -> None:
    scenario = load_scenario("scenarios/nat_relay.yaml")
    with pytest.raises(ScenarioError, match="several segments, which --mqtt's one broker cannot separate"):
        await run_scenario(scenario, private_broker=True)
