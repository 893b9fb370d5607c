"""The `flowloom` command as a user meets it: validate, run, report, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agents.cli import loopback_warning, main
from fabric.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


def test_every_shipped_scenario_validates(capsys: pytest.CaptureFixture[str]) -> None:
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        assert main(["validate", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_quickstart_runs_and_writes_a_report_with_the_design_keys(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    assert main(["run", str(QUICKSTART), "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert set(report) == {
        "scenario",
        "ok",
        "wall_s",
        "tasks",
        "nodes",
        "faults",
        "expectations",
        "figures",
        "outputs",
        "routes",  # added beside DESIGN's keys: routes through relays (none here)
    }
    assert report["routes"] == {}
    assert report["ok"] is True
    assert set(report["tasks"]) == {"total", "done", "failed", "cancelled"}
    assert report["tasks"]["done"] == report["tasks"]["total"] == 13  # 12 + one added by escalation
    assert set(report["nodes"]) == {"device-1", "edge-1", "cloud-1"}
    assert all(set(n) == {"tier", "segment", "tasks_run", "alive"} for n in report["nodes"].values())
    assert report["nodes"]["edge-1"]["alive"] is False
    assert [f["kind"] for f in report["faults"]] == ["kill_node"]
    assert report["figures"]["reassigned"] >= 1
    assert report["outputs"]["total"] == 2.0


def test_a_trace_has_one_track_per_node(tmp_path: Path) -> None:
    trace_path = tmp_path / "trace.json"
    assert main(["run", str(QUICKSTART), "--trace", str(trace_path)]) == 0
    events = json.loads(trace_path.read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"device-1", "cloud-1"} <= tracks
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["name"] for e in spans} >= {"capture", "total", "notify"}


def test_a_journaled_run_resumes_from_its_journal(tmp_path: Path) -> None:
    # The resumed run reassigns nothing, so it is checked without the quickstart's min_reassigned.
    scenario = tmp_path / "journaled.yaml"
    scenario.write_text(QUICKSTART.read_text().replace("min_reassigned: 1", "min_reassigned: 0"))
    journal = tmp_path / "job.sqlite"
    assert main(["run", str(scenario), "--journal", str(journal)]) == 0
    report_path = tmp_path / "report.json"
    # Everything was done: the resumed run rebuilds the job (its escalation patch once) and ends at once.
    resumed = ["run", str(scenario), "--journal", str(journal), "--resume", "--report", str(report_path)]
    assert main(resumed) == 0
    report = json.loads(report_path.read_text())
    assert report["tasks"]["done"] == report["tasks"]["total"] == 13
    assert report["figures"]["dispatched"] == 0


def test_a_failed_expectation_fails_the_run(tmp_path: Path) -> None:
    text = QUICKSTART.read_text().replace("total: 2.0", "total: 3.0")
    path = tmp_path / "wrong.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "name: x\nnodes:\n  a: {tier: satellite}\n",
            r"bad\.yaml: nodes\.a\.tier: Input should be 'device', 'edge' or 'cloud'",
        ),
        (
            "name: x\nnodes:\n  a: {tier: edge, corse: 2}\n",
            r"bad\.yaml: nodes\.a\.corse: Extra inputs are not permitted",
        ),
        (
            "name: x\nnodes:\n  a: {tier: edge}\nlinks:\n  - {src: a, dst: b}\n",
            r"bad\.yaml: links\.0\.dst: unknown node 'b'",
        ),
        ("name: x\nnodes: [a\n", r"bad\.yaml:\d+:\d+: not valid YAML"),
        ("- just a list\n", r"bad\.yaml: a scenario is a mapping"),
    ],
)
def test_an_invalid_scenario_names_the_file_and_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["validate", str(bad)]) == 2
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err.replace("\n", " ")), err


def test_a_missing_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read" in capsys.readouterr().err


def test_the_installed_command_runs_the_quickstart() -> None:
    flowloom = Path(sys.executable).with_name("flowloom")
    done = subprocess.run(
        [str(flowloom), "run", str(QUICKSTART)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "13 done" in done.stdout and "killed edge-1" in done.stdout


@pytest.mark.parametrize(
    ("bulk", "broker", "warned"),
    [
        ("127.0.0.1:7000", "mqtt://10.1.2.3:1883", True),
        ("localhost:7000", "mqtt://broker.example:1883", True),
        ("[::1]:7000", "mqtt://10.1.2.3:1883", True),
        ("127.0.0.1:7000", "mqtt://127.0.0.1:1883", False),  # everything on one machine
        ("10.0.0.5:7000", "mqtt://10.1.2.3:1883", False),
        (None, "mqtt://10.1.2.3:1883", False),
    ],
)
def test_a_node_warns_when_its_bulk_address_cannot_be_dialled_from_other_machines(
    bulk: str | None, broker: str, warned: bool
) -> None:
    warning = loopback_warning(bulk, broker)
    assert (warning is not None) == warned
    if warning:
        assert "--bulk-advertise" in warning and str(bulk) in warning


def test_a_broker_that_is_no_url_or_is_not_there_gets_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(QUICKSTART), "--broker", "localhost:1883"])
    assert exit_info.value.code == 2
    assert "'localhost:1883' is not an MQTT URL: expected mqtt://host:port" in capsys.readouterr().err
    assert main(["run", str(QUICKSTART), "--broker", f"mqtt://127.0.0.1:{free_port()}"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: cannot connect") and "Connection refused" in err and "Traceback" not in err
