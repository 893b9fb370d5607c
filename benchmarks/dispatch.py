"""Dispatch benchmark: how many trivial tasks a second the orchestrator drives through its nodes.

Run from the project root::

    python benchmarks/dispatch.py [--quick] [--json]

Two job shapes of ``echo`` tasks (the built-in kind that returns ``params.value``; it does no work,
so all the time measured is the cost of dispatching):

- wide: N independent tasks (10,000; ``--quick``: 2,000), all ready at once. Throughput-bound:
  ``*_tasks_per_s`` is N over the wall time; ``*_us_per_task`` its inverse.
- chain: M tasks, each waiting for the one before (an ordering edge; 1,000, ``--quick``: 200).
  Latency-bound: every task is one full round trip (place, assign, ack, run, result, accept).
  ``*_chain_tasks_per_s`` is M over the wall time; ``*_chain_us_per_task`` the time per link.

Each run builds its `TaskGraph` (and a fresh `Orchestrator`, job named after the run) before the
clock starts; the time is that of ``await orchestrator.run(graph)`` alone, with the garbage
collector paused, as in the other benchmarks. Every task must come back done with its own value,
or the run is reported in ``notes`` and does not count. Nodes and the orchestrator use their
default heartbeats (1 s), as a deployment would; each node announces 2 cores, so it runs 2 tasks
at a time and queues the rest. Speculation stays on (the default): copies it starts show up in
``details`` as ``speculative`` and ``ignored_results``.

(1) In-process: 8 `Node`s and the orchestrator's `Endpoint` on one `InprocHub`, a fresh cluster per
    run, every node announced before the clock starts; one untimed wide job of full size runs first
    (imports, first calls, the process's memory grown to what a run needs). As in ``fabric.py``,
    every repeat runs once pinned to each CPU in turn (``details.inproc_by_cpu``): on a VM the
    vCPUs need not be alike. Target: ``inproc_tasks_per_s`` >= 5,000, and ahead of Ray.

(2) MQTT: a private Mosquitto (`fabric.testing.MosquittoBroker`), 4 node processes (this file with
    the hidden ``--_node`` argument: a `Node` on `MqttTransport`, as ``flowloom node`` runs one)
    and the orchestrator in this process on its own `MqttTransport` endpoint. All node processes
    are announced and one small warm-up job has run before anything is timed; the nodes serve
    every repeat (each run is a new job). Not pinned: on 2 CPUs the broker, 4 nodes and the
    orchestrator share the machine, which is what this figure shows. For information.

(3) Ray local tasks, the baseline, where Ray is installed (``pip install ray``; else its figures are
    null and ``notes`` says why): in a helper process (hidden ``--_ray``) so that Ray's threads and
    daemons never run inside our timed runs, ``ray.init(num_cpus=2, include_dashboard=False)``,
    warmed up with 200 tasks. Wide: ``ray.get([echo.remote(i) for i in range(N)])``; chain: each
    task takes the previous one's result as an argument, so Ray runs them in order, then
    ``ray.get`` of the last. ``echo`` returns its value, checked as ours are. Each repeat times
    ours, then Ray's, so drift and noisy neighbours hit both alike; Ray is started for its part of
    the repeat and shut down after it, so its daemons never run beside ours.

Every figure is the best of the repeats (3, ``--quick``: 1): noise only ever makes a run slower.

JSON (``--json``): one object on stdout with the figures as top-level keys, ``inproc_vs_ray``
(wide, ours over Ray's tasks/s) and ``inproc_chain_vs_ray``, ``targets``, ``meets_targets`` (the
Ray comparison counts only where Ray ran), ``notes`` and ``details`` (every run, with the
orchestrator's counters). A missed target or a failed run is reported, never an error: the exit
code is 0 unless an exception escapes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SCRIPT = Path(__file__).resolve()
ROOT = Path(__file__).resolve().parents[1]
# The project root first, this folder off: `import fabric` must find the package, not fabric.py.
sys.path[:] = [
    str(ROOT),
    *(p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")),
]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agents.graph import TaskGraph  # noqa: E402
from agents.node import Node  # noqa: E402
from agents.orchestrator import Orchestrator  # noqa: E402
from benchmarks._common import (  # noqa: E402
    base_parser,
    cpu_choices,
    emit_live,
    gc_paused,
    num,
    pinned,
    read_line,
    spawn_script,
)
from fabric import Endpoint, FabricError, InprocHub, MqttTransport  # noqa: E402
from fabric.testing import MosquittoBroker  # noqa: E402
from protocol import Capabilities, TaskSpec  # noqa: E402

Shape = Literal["wide", "chain"]
SHAPES: tuple[Shape, ...] = ("wide", "chain")

ORCHESTRATOR = "orchestrator"
INPROC_NODES = 8
MQTT_NODES = 4
NODE_CORES = 2  # what each node announces: it runs this many tasks at a time
HEARTBEAT_S = 1.0  # the default of nodes and endpoints
READY_TIMEOUT = 30.0  # seconds for a node (process) to start and announce itself
RUN_TIMEOUT = 300.0  # seconds for one job; a run that needs more is broken, not slow
RAY_TIMEOUT = 300.0  # seconds for the Ray helper to answer (its start included)
RAY_CPUS = 2
RAY_WARMUP = 200
WARMUP_TASKS = 200

INPROC_TARGET = 5000.0  # inproc_tasks_per_s >= this
TARGETS = {"inproc_tasks_per_s": f">= {INPROC_TARGET:,.0f}", "inproc_vs_ray": "> 1"}


@dataclass(frozen=True)
class Settings:
    quick: bool
    wide: int  # tasks in the wide job
    chain: int  # tasks in the chain
    repeats: int

    @classmethod
    def of(cls, quick: bool) -> Settings:
        return cls(True, 2000, 200, 1) if quick else cls(False, 10_000, 1000, 3)

    def size(self, shape: Shape) -> int:
        return self.wide if shape == "wide" else self.chain


@dataclass
class Run:
    """One timed job (or one Ray batch)."""

    shape: Shape
    n: int
    seconds: float | None  # None: the run did not complete correctly
    cpu: int | None = None  # the CPU it was pinned to (in-process only)
    counters: dict[str, int] = field(default_factory=dict)  # the orchestrator's stats
    error: str | None = None

    @property
    def rate(self) -> float | None:
        return self.n / self.seconds if self.seconds else None


# --- jobs ---------------------------------------------------------------------------------------


def job_graph(job: str, shape: Shape, n: int) -> TaskGraph:
    """`n` echo tasks ``t0``..; task ``ti`` returns ``i``; in a chain ``ti`` waits for ``t(i-1)``."""
    specs = [TaskSpec(id=f"t{i}", kind="echo", params={"value": i}) for i in range(n)]
    edges = [(f"t{i - 1}", f"t{i}") for i in range(1, n)] if shape == "chain" else []
    return TaskGraph(job, specs, edges)


def wrong_results(graph: TaskGraph) -> str | None:
    """Why the finished `graph` is not every task done with its own value, or None."""
    counts = graph.counts()
    if counts["done"] != len(graph):
        states = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        return f"{counts['done']} of {len(graph)} tasks done ({states})"
    for i in range(len(graph)):
        value = graph.task(f"t{i}").result
        if value != i:
            return f"task t{i} returned {value!r}, not {i}"
    return None


async def timed_job(endpoint: Endpoint, shape: Shape, n: int, cpu: int | None = None) -> Run:
    """Run one job of `shape` on the nodes `endpoint` sees; time ``orchestrator.run`` alone."""
    job = f"{shape}-{uuid.uuid4().hex[:8]}"  # a new job per run: stale answers are told apart
    graph = job_graph(job, shape, n)
    orchestrator = Orchestrator(endpoint)
    with gc_paused():
        start = time.perf_counter()
        await orchestrator.run(graph, timeout=RUN_TIMEOUT)
        elapsed = time.perf_counter() - start
    counters = dataclasses.asdict(orchestrator.stats)
    if (why := wrong_results(graph)) is not None:
        return Run(shape, n, None, cpu, counters, why)
    return Run(shape, n, elapsed, cpu, counters)


def orchestrator_caps() -> Capabilities:
    """The orchestrator's endpoint announces that it runs nothing (as the scenario runner's does)."""
    return Capabilities(tier="cloud", cores=1, memory_mb=0, task_kinds=[])


def node_caps() -> Capabilities:
    return Capabilities(tier="edge", cores=NODE_CORES, memory_mb=1024)


# --- (1) in-process -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def inproc_cluster(nodes: int) -> AsyncIterator[Endpoint]:
    """`nodes` nodes and the orchestrator's endpoint on one hub, every node announced."""
    hub = InprocHub()
    endpoint = Endpoint(
        ORCHESTRATOR, hub.transport(ORCHESTRATOR), capabilities=orchestrator_caps(), heartbeat_s=HEARTBEAT_S
    )
    started: list[Node] = []
    async with endpoint:
        try:
            for i in range(nodes):
                node = Node(
                    f"node-{i}", hub.transport(f"node-{i}"), capabilities=node_caps(), heartbeat_s=HEARTBEAT_S
                )
                await node.start()
                started.append(node)
            for node in started:
                await endpoint.wait_for_peer(node.node_id, READY_TIMEOUT, announced=True)
            yield endpoint
        finally:
            for node in started:
                await node.close(grace_s=0.0)


async def inproc_run(shape: Shape, n: int, cpu: int | None) -> Run:
    try:
        async with inproc_cluster(INPROC_NODES) as endpoint:
            return await timed_job(endpoint, shape, n, cpu)
    except FabricError as exc:  # a node did not come up: reported, not raised
        return Run(shape, n, None, cpu, error=f"{type(exc).__name__}: {exc}")


# --- (3) Ray, in a helper process ---------------------------------------------------------------


def ray_main() -> None:
    """``--_ray``: start Ray, then answer each ``SHAPE N`` line on stdin with one JSON line."""
    try:
        ray: Any = importlib.import_module("ray")
    except ImportError as exc:
        print(json.dumps({"error": f"ray is not installed ({exc})"}), flush=True)
        return
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:

        def echo(value: int, after: int | None = None) -> int:
            return value

        remote = ray.remote(echo)
        ray.get([remote.remote(i) for i in range(RAY_WARMUP)])  # the workers are up
        print(json.dumps({"ready": ray.__version__}), flush=True)
        for line in sys.stdin:
            shape, n = line.split()[0], int(line.split()[1])
            with gc_paused():
                start = time.perf_counter()
                if shape == "wide":
                    values = ray.get([remote.remote(i) for i in range(n)])
                    ok = values == list(range(n))
                else:
                    ref = remote.remote(0)
                    for i in range(1, n):
                        ref = remote.remote(i, ref)  # waits for the previous task's result
                    ok = ray.get(ref) == n - 1
                elapsed = time.perf_counter() - start
            print(json.dumps({"seconds": elapsed, "ok": ok}), flush=True)
    finally:
        ray.shutdown()


class RayBaseline:
    """The Ray helper process: ``run(shape, n)`` times one batch there."""

    def __init__(self) -> None:
        self.version: str | None = None
        self.error: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        # Ray's own chatter goes here (its answers come on stdout); closed by close().
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--_ray"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=ROOT,
            text=True,
            start_new_session=True,  # its own process group, which Ray's daemons join
        )
        answer = self._ask(None)
        if answer is None or "ready" not in answer:
            why = answer.get("error") if answer else f"no answer; its last words: {self._last_words()!r}"
            self.error = f"the Ray helper did not start: {why}"
            self.close()
        else:
            self.version = str(answer["ready"])

    def _last_words(self) -> str:
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().splitlines() if line.strip()]
        return lines[-1][-300:] if lines else ""

    @property
    def available(self) -> bool:
        return self._proc is not None and self.error is None

    def _ask(self, line: str | None) -> dict[str, Any] | None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            return None
        # The helper answers each line with one JSON line, or exits (an empty line), or hangs.
        if line is not None:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], RAY_TIMEOUT)
            if not ready:
                self.error = f"the Ray helper said nothing within {RAY_TIMEOUT:g} s"
                return None
            reply = proc.stdout.readline()
            if not reply:
                return None
            if reply.startswith("{"):  # anything else is Ray talking
                answer: dict[str, Any] = json.loads(reply)
                return answer

    def run(self, shape: Shape, n: int) -> Run:
        if not self.available:
            return Run(shape, n, None, error=self.error)
        answer = self._ask(f"{shape} {n}")
        if answer is None:
            self.error = self.error or f"the Ray helper exited: {self._last_words()!r}"
            return Run(shape, n, None, error=self.error)
        if not answer["ok"]:
            return Run(shape, n, None, error="Ray returned wrong values")
        return Run(shape, n, float(answer["seconds"]))

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(30.0)  # on EOF the helper calls ray.shutdown(), which stops Ray's daemons
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the helper's group: it and Ray's daemons
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> RayBaseline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- (2) MQTT -----------------------------------------------------------------------------------


async def node_main(url: str, namespace: str, node_id: str) -> None:
    """``--_node``: a node on the broker until stdin closes; then print its counters as JSON."""
    node = Node(
        node_id,
        MqttTransport(url, node_id, namespace=namespace),
        capabilities=node_caps(),
        heartbeat_s=HEARTBEAT_S,
    )
    async with node:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)  # until EOF
        await node.close(grace_s=0.0)
    print(json.dumps(dataclasses.asdict(node.stats)), flush=True)


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await spawn_script(SCRIPT, *args)


async def reap(proc: asyncio.subprocess.Process) -> dict[str, int] | None:
    """Close its stdin (a node's signal to leave), read its counters, wait up to 10 s, then kill it."""
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    stats: dict[str, int] | None = None
    try:
        async with asyncio.timeout(10.0):
            with contextlib.suppress(RuntimeError, ValueError):
                stats = json.loads(await read_line(proc, 10.0, "node"))
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    return stats


@dataclass
class MqttResult:
    runs: list[Run] = field(default_factory=list)
    node_stats: dict[str, dict[str, int] | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


async def bench_mqtt(settings: Settings, progress: Callable[[str], None]) -> MqttResult:
    result = MqttResult()
    namespace = f"bench{uuid.uuid4().hex[:12]}"
    names = [f"node-{i}" for i in range(MQTT_NODES)]
    try:
        broker = MosquittoBroker()
    except RuntimeError as exc:  # no Mosquitto here: the MQTT figures are null, with this note
        result.errors.append(f"MQTT: {exc}")
        return result
    with broker:
        procs: dict[str, asyncio.subprocess.Process] = {}
        try:
            progress(f"MQTT: starting {MQTT_NODES} node processes")
            for name in names:
                procs[name] = await spawn("--_node", broker.url, namespace, name)
            for name, proc in procs.items():
                line = await read_line(proc, READY_TIMEOUT, name)
                if line != "ready":
                    raise RuntimeError(f"{name}: expected 'ready', got {line!r}")
            transport = MqttTransport(broker.url, ORCHESTRATOR, namespace=namespace)
            endpoint = Endpoint(
                ORCHESTRATOR, transport, capabilities=orchestrator_caps(), heartbeat_s=HEARTBEAT_S
            )
            async with endpoint:
                for name in names:
                    await endpoint.wait_for_peer(name, READY_TIMEOUT, announced=True)
                warmup = await timed_job(endpoint, "wide", WARMUP_TASKS)
                if warmup.error is not None:
                    raise RuntimeError(f"warm-up job: {warmup.error}")
                for r in range(settings.repeats):
                    for shape in SHAPES:
                        progress(f"repeat {r + 1}/{settings.repeats}: MQTT, {shape}")
                        result.runs.append(await timed_job(endpoint, shape, settings.size(shape)))
        except (RuntimeError, FabricError, OSError) as exc:
            result.errors.append(f"MQTT: {type(exc).__name__}: {exc}")
        finally:
            for name, proc in procs.items():
                result.node_stats[name] = await reap(proc)
    return result


# --- running and reporting ----------------------------------------------------------------------


@dataclass
class Results:
    inproc: list[Run] = field(default_factory=list)
    ray: list[Run] = field(default_factory=list)
    mqtt: MqttResult = field(default_factory=MqttResult)
    ray_version: str | None = None
    ray_error: str | None = None


def measure(settings: Settings, progress: Callable[[str], None]) -> Results:
    results = Results()
    cpus = cpu_choices()
    progress("in-process warm-up")
    asyncio.run(inproc_run("wide", settings.wide, None))  # imports, first calls, memory grown
    with_ray = importlib.util.find_spec("ray") is not None
    if not with_ray:
        results.ray_error = "ray is not installed here (`pip install ray` adds it)"
    for r in range(settings.repeats):
        step = f"repeat {r + 1}/{settings.repeats}"
        for shape in SHAPES:
            n = settings.size(shape)
            for cpu in cpus:
                progress(f"{step}: in-process, {shape}" + ("" if cpu is None else f", CPU {cpu}"))
                with pinned(cpu):
                    results.inproc.append(asyncio.run(inproc_run(shape, n, cpu)))
        if with_ray:
            progress(f"{step}: starting Ray")
            with RayBaseline() as ray:  # up for this repeat only: its daemons never run beside ours
                results.ray_version = results.ray_version or ray.version
                for shape in SHAPES:
                    progress(f"{step}: Ray, {shape}")
                    results.ray.append(ray.run(shape, settings.size(shape)))
            if ray.error is not None:
                results.ray_error = ray.error
                with_ray = False  # it will not start next time either
    results.mqtt = asyncio.run(bench_mqtt(settings, progress))
    return results


def best(runs: list[Run], shape: Shape) -> float | None:
    """The best tasks/s of the complete runs of `shape`, or None."""
    rates = [rate for run in runs if run.shape == shape and (rate := run.rate) is not None]
    return max(rates) if rates else None


def _round(value: float | None, digits: int = 0) -> float | None:
    return None if value is None else round(value, digits)


def _us(rate: float | None) -> float | None:
    return None if rate is None else round(1e6 / rate, 1)


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return round(value / baseline, 2) if value is not None and baseline else None


def _run_detail(run: Run) -> dict[str, Any]:
    detail: dict[str, Any] = {"shape": run.shape, "n": run.n, "tasks_per_s": _round(run.rate)}
    if run.cpu is not None:
        detail["cpu"] = run.cpu
    if run.counters:
        keys = ("dispatched", "accepted", "speculative", "ignored_results", "reassigned", "retries")
        detail.update({key: run.counters[key] for key in keys})
    if run.error is not None:
        detail["error"] = run.error
    return detail


def report(settings: Settings, results: Results) -> dict[str, Any]:
    notes: list[str] = []
    for label, runs in (("in-process", results.inproc), ("Ray", results.ray), ("MQTT", results.mqtt.runs)):
        notes.extend(f"{label} {run.shape} run: {run.error}" for run in runs if run.error is not None)
    notes.extend(results.mqtt.errors)
    if results.ray_error is not None:
        notes.append(f"Ray: {results.ray_error}; ray_* figures are null and the comparison is skipped")
    figures: dict[str, float | None] = {}
    for prefix, runs in (("inproc", results.inproc), ("mqtt", results.mqtt.runs), ("ray", results.ray)):
        for shape in SHAPES:
            rate = best(runs, shape)
            key = prefix if shape == "wide" else f"{prefix}_chain"
            figures[f"{key}_tasks_per_s"] = _round(rate)
            figures[f"{key}_us_per_task"] = _us(rate)
    inproc, ray = figures["inproc_tasks_per_s"], figures["ray_tasks_per_s"]
    vs_ray = _ratio(inproc, ray)
    for name, value in figures.items():
        if value is None and not name.startswith("ray") and name.endswith("tasks_per_s"):
            notes.append(f"no complete run: {name} is null")
    out: dict[str, Any] = {
        "quick": settings.quick,
        "wide_tasks": settings.wide,
        "chain_tasks": settings.chain,
        "repeats": settings.repeats,
        "inproc_nodes": INPROC_NODES,
        "mqtt_nodes": MQTT_NODES,
        "node_cores": NODE_CORES,
        **figures,
        "inproc_vs_ray": vs_ray,
        "inproc_chain_vs_ray": _ratio(figures["inproc_chain_tasks_per_s"], figures["ray_chain_tasks_per_s"]),
        "mqtt_vs_ray": _ratio(figures["mqtt_tasks_per_s"], ray),
        "ray_version": results.ray_version,
        "targets": TARGETS,
        "meets_targets": bool(
            inproc is not None
            and inproc >= INPROC_TARGET
            and (ray is None or (vs_ray is not None and vs_ray > 1))
        ),
        "notes": notes,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "details": {
            "inproc_by_cpu": {
                str(cpu): {
                    shape: _round(best([r for r in results.inproc if r.cpu == cpu], shape))
                    for shape in SHAPES
                }
                for cpu in dict.fromkeys(run.cpu for run in results.inproc)
            },
            "inproc_runs": [_run_detail(run) for run in results.inproc],
            "mqtt_runs": [_run_detail(run) for run in results.mqtt.runs],
            "mqtt_node_stats": results.mqtt.node_stats,
            "ray_runs": [_run_detail(run) for run in results.ray],
        },
    }
    return out


def render(result: dict[str, Any], console: Console) -> None:
    """The figures as a table, then notes and a one-line verdict."""
    r = result
    mode = "quick" if r["quick"] else "full"
    table = Table(
        title=(
            f"Flowloom dispatch, Python {r['python']}, {r['cpus']} CPUs, {mode} run: echo tasks, "
            f"wide {r['wide_tasks']:,}, chain {r['chain_tasks']:,}"
        ),
        caption=(
            f"best of {r['repeats']}; in-process {r['inproc_nodes']} nodes, MQTT {r['mqtt_nodes']} node "
            f"processes, {r['node_cores']} cores each; Ray {r['ray_version'] or 'not run'}"
        ),
    )
    for column in ("tasks/s", "flowloom", "us/task", "Ray", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column in ("tasks/s", "target") else "right")
    inproc, vs_ray = r["inproc_tasks_per_s"], r["inproc_vs_ray"]
    ok = inproc is not None and inproc >= INPROC_TARGET and (vs_ray is None or vs_ray > 1)
    # label, our figures' key prefix, Ray's figure, the ratio to Ray, the target, whether met
    rows = [
        (
            "in-process wide",
            "inproc",
            "ray_tasks_per_s",
            vs_ray,
            f"{TARGETS['inproc_tasks_per_s']}, > Ray",
            ok,
        ),
        ("in-process chain", "inproc_chain", "ray_chain_tasks_per_s", r["inproc_chain_vs_ray"], "info", None),
        ("MQTT wide", "mqtt", "ray_tasks_per_s", r["mqtt_vs_ray"], "info", None),
        ("MQTT chain", "mqtt_chain", None, None, "info", None),
    ]
    for label, ours, ray, ratio, target, met in rows:
        table.add_row(
            label,
            num(r[f"{ours}_tasks_per_s"]),
            num(r[f"{ours}_us_per_task"], ".1f"),
            num(r[ray]) if ray else "",
            "" if ratio is None else f"{ratio:.2f}x",
            target,
            "" if met is None else "[green]yes[/]" if met else "[red]no[/]",
        )
    console.print(table)
    for note in r["notes"]:
        console.print(f"[red]note: {note}[/]")
    verdict = "[green]meets targets[/]" if r["meets_targets"] else "[red]misses targets[/]"
    console.print(
        f"Verdict: {verdict}: in-process {num(inproc)} tasks/s"
        + ("" if vs_ray is None else f", {vs_ray:.2f}x Ray")
    )


def run(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    return report(settings, measure(settings, progress))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(
        __doc__, "2,000 wide and 200 chained tasks, one repeat (the full run: 10,000 and 1,000, 3)"
    )
    # Helper processes: this file runs them with these hidden arguments.
    parser.add_argument("--_node", nargs=3, metavar=("URL", "NS", "NODE"), help=argparse.SUPPRESS)
    parser.add_argument("--_ray", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._node:
        asyncio.run(node_main(*args._node))
        return 0
    if args._ray:
        ray_main()
        return 0
    settings = Settings.of(args.quick)
    emit_live(lambda progress: run(settings, progress), as_json=args.json, render=render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
