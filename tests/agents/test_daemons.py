"""The CLI as separate processes: node daemons over a real Mosquitto, and a SIGKILLed orchestrator.

Every process here is a real `flowloom` command. Waits are bounded generously only so that a
broken build fails instead of hanging; nothing is timed.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agents.journal import Journal, JournalEntry
from fabric.testing import MosquittoBroker

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
FLOWLOOM = [sys.executable, "-m", "agents.cli"]
NODES = {
    "device-1": ["--tier", "device", "--cores", "2", "--memory-mb", "2048", "--nat", "--label", "kind=phone"],
    "edge-1": ["--tier", "edge", "--cores", "4", "--memory-mb", "8192"],
    "cloud-1": ["--tier", "cloud", "--cores", "16", "--memory-mb", "65536"],
}
pytestmark = pytest.mark.slow


def entries(path: Path, job: str) -> list[JournalEntry]:
    """The journal as it stands; empty while the orchestrator has not created it yet."""
    if not path.exists():
        return []
    journal = Journal(path)
    try:
        return list(journal.entries(job))
    finally:
        journal.close()


def wait_until(check: Callable[[], bool], what: str, *, within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {within:g}s"
        time.sleep(0.01)


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=300)  # against a hang, not a timing
    return out


@pytest.fixture
def flowloom() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts `flowloom ARGS...` in the project root (output captured); kills what is left at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*FLOWLOOM, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_quickstart_on_node_daemons_survives_a_sigkilled_node(
    broker: MosquittoBroker, tmp_path: Path, flowloom: Callable[..., subprocess.Popen[str]]
) -> None:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    daemons = {}
    for node_id, args in NODES.items():
        daemons[node_id] = flowloom(
            "node",
            "--id",
            node_id,
            *args,
            "--broker",
            broker.url,
            "--namespace",
            namespace,
            "--heartbeat-s",
            "0.2",
        )
    journal, report_path = tmp_path / "job.sqlite", tmp_path / "report.json"
    run = flowloom(
        "run",
        str(QUICKSTART),
        "--broker",
        broker.url,
        "--namespace",
        namespace,
        "--journal",
        str(journal),
        "--report",
        str(report_path),
    )

    def edge_is_running_a_task() -> bool:
        log = entries(journal, "quickstart")
        done = {env.body.task for kind, env in log if kind == "result"}
        return any(
            kind == "dispatch" and env.dst == "edge-1" and env.body.task not in done for kind, env in log
        )

    wait_until(edge_is_running_a_task, "a task dispatched to edge-1")
    daemons["edge-1"].send_signal(signal.SIGKILL)
    out = finish(run)
    assert run.returncode == 0, out
    report = json.loads(report_path.read_text())
    assert report["tasks"]["done"] == report["tasks"]["total"] == 13, out
    assert report["nodes"]["edge-1"]["alive"] is False and report["figures"]["reassigned"] >= 1
    assert report["outputs"]["notify"] == {"message": "2.0"}
    # The scenario's own kill_node is not the runner's to do against daemons; it says so.
    assert "not injected against node daemons" in report["faults"][0]["target"]
    # Exactly once: one accepted result per task, none of them from edge-1 after it died.
    log = entries(journal, "quickstart")
    results = Counter(env.body.task for kind, env in log if kind == "result")
    assert len(results) == 13 and set(results.values()) == {1}
    for node in ("device-1", "cloud-1"):
        daemons[node].send_signal(signal.SIGTERM)
        assert "draining" in finish(daemons[node])
        assert daemons[node].returncode == 0


def test_a_sigkilled_run_resumes_from_its_journal_without_redoing_finished_tasks(
    tmp_path: Path, flowloom: Callable[..., subprocess.Popen[str]]
) -> None:
    # The resumed run may have nothing left to take off edge-1, so min_reassigned is not asked.
    scenario = tmp_path / "journaled.yaml"
    scenario.write_text(QUICKSTART.read_text().replace("min_reassigned: 1", "min_reassigned: 0"))
    journal, report_path = tmp_path / "job.sqlite", tmp_path / "report.json"
    first = flowloom("run", str(scenario), "--journal", str(journal))

    def some_results() -> bool:
        return sum(kind == "result" for kind, _ in entries(journal, "quickstart")) >= 3

    wait_until(some_results, "three results journaled")
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    before = entries(journal, "quickstart")
    finished = {env.body.task for kind, env in before if kind == "result"}
    assert 3 <= len(finished) < 13, "the run was killed after it had finished, or too early"
    resumed = subprocess.run(
        [
            *FLOWLOOM,
            "run",
            str(scenario),
            "--journal",
            str(journal),
            "--resume",
            "--report",
            str(report_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    report = json.loads(report_path.read_text())
    assert report["tasks"]["done"] == report["tasks"]["total"] == 13
    after = entries(journal, "quickstart")[len(before) :]
    redone = {env.body.task for kind, env in after if kind == "dispatch"} & finished
    assert not redone, f"finished before the kill, dispatched again: {sorted(redone)}"
    results = Counter(env.body.task for kind, env in entries(journal, "quickstart") if kind == "result")
    assert len(results) == 13 and set(results.values()) == {1}  # no accepted result lost or doubled
