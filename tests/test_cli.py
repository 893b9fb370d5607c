"""The `flowloom` command as a user meets it: validate, run, report, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agents.cli import main

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
    }
    assert report["ok"] is True
    assert set(report["tasks"]) == {"total", "done", "failed", "cancelled"}
    assert set(report["nodes"]) == {"device-1", "edge-1", "cloud-1"}
    assert all(set(n) == {"tier", "segment", "tasks_run", "alive"} for n in report["nodes"].values())
    assert {e["name"] for e in report["expectations"]} >= {"every node welcomed", "replayed hello refused"}
    assert report["figures"]["chunks"] == 5


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
    assert "activation crossed" in done.stdout
