"""Split-LLM benchmark: a real LLM cut over three stage nodes against the same model in one piece.

Run from the project root::

    python benchmarks/split_llm.py [--quick] [--json]

The model is SmolLM2-135M-Instruct (``smollm2-135m``, 30 layers, hidden size 576, float32), the
prompt is fixed: the model's chat template around "What is the capital of France?". Every run is
greedy with no stop token, so every run generates exactly N tokens (32; ``--quick``: 12), and
every split answer must be the monolithic one, token for token.

(1) Monolithic: `reference.generate_monolithic`, the whole model in this process (in a worker
    thread, as the in-process stages run theirs), after an untimed warm-up run that loads it.
(2) Split in-process: one `InprocHub`; a driver node ``device`` that announces no models, and three
    stage nodes ``edge-1``, ``edge-2`` and ``cloud`` that announce the model, with equal cores (2)
    and memory (2048 MiB), so the planner cuts 10 layers each. A `SplitGenerator` restricted to
    those three (``nodes=[...]``) runs one session, then four concurrent sessions
    (``asyncio.gather`` of four ``generate`` calls). An untimed warm-up (one session, then four)
    loads the stages first. Torch keeps its default threads in this process, for (1) and (2) alike.
(3) Split over MQTT: a private Mosquitto (`fabric.testing.MosquittoBroker`), the three stage nodes
    as ``flowloom node`` processes (``--cores 2 --memory-mb 2048 --model smollm2-135m``), the
    driver node in this process on its own `MqttTransport`; one and four sessions, after the same
    warm-up. Each stage process runs torch with ``--stage-threads`` threads (default 1, see
    `STAGE_THREADS`). For information: on a small machine the broker, three stage processes and
    the driver share the CPUs, which is what this figure shows.
(4) Wire formats, in-process: one session for each of float32, bfloat16, float16 and int8;
    ``wire_bytes_per_token`` is the activation bytes sent between stages (two hops) per position
    run (`Generation.wire_bytes` / `Generation.positions`), ``first_divergence`` the index of the
    first generated token that differs from the monolithic answer (null: the same answer).

Timing: tokens/s is N (or 4N for four sessions) over the wall time of the whole call
(``generate_monolithic``; ``SplitGenerator.generate`` with its session open and close; the
``gather`` of four), with the garbage collector paused. Time to first token is each run's own
``ttft_s`` (split: opening the session on the three stages included). Every repeat (4,
``--quick``: 2) runs the monolithic model and then the in-process split, so drift and noisy
neighbours hit both alike; every figure is the best of the repeats.
The split answers' own figures (``decode_s`` based, as ``llm.generate`` reports them) are in
``details``.

Target (the design's figure): ``split_inproc_ratio`` (in-process split over monolithic tokens/s,
one session) >= 0.8, and ``identical_tokens`` (every float32 split answer, in-process and over
MQTT, equals the monolithic one).

JSON (``--json``): one object on stdout with the figures as top-level keys, ``targets``,
``meets_targets``, ``notes`` (failed runs, missing Mosquitto) and ``details`` (every run, the plans,
the monolithic tokens and the index of its first end-of-text token, each wire format's text). A missed
target or a failed run is reported, never an error: the exit code is 0 unless an exception escapes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
# The project root first, this folder off: `import fabric` must find the package, not fabric.py.
sys.path[:] = [
    str(ROOT),
    *(p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")),
]

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agents.errors import AgentError  # noqa: E402
from agents.node import Node  # noqa: E402
from backends.llm.driver import Generation, SplitGenerator  # noqa: E402
from backends.llm.models import SMOLLM2, load_tokenizer  # noqa: E402
from backends.llm.reference import MonolithicResult, generate_monolithic  # noqa: E402
from backends.llm.stage import SERVICE, WIRE_DTYPES  # noqa: E402
from benchmarks._common import base_parser, emit_live, gc_paused, num, target_met  # noqa: E402
from fabric import DeadlineExceeded, FabricError, InprocHub, MqttTransport  # noqa: E402
from fabric.testing import MosquittoBroker  # noqa: E402
from protocol import Capabilities  # noqa: E402

T = TypeVar("T")

MODEL = SMOLLM2
QUESTION = "What is the capital of France?"
DRIVER = "device"
STAGE_NODES = {"edge-1": "edge", "edge-2": "edge", "cloud": "cloud"}  # node id -> tier
NODE_CORES = 2  # every node announces the same cores and memory: the planner cuts 10 layers each
NODE_MEMORY_MB = 2048
SESSIONS = 4
STAGE_THREADS = 1
"""Torch threads of each stage process (OMP_NUM_THREADS and MKL_NUM_THREADS in its environment).

One: there are 2 vCPUs here for three stage processes, the broker and the driver. With four
sessions all three stages compute at once, and two OpenMP threads each would be six spinning
threads on two CPUs, which slows every step down several times over; with one session only one
stage computes at a time, so a second thread could help it, but a step of one token through ten
layers of hidden size 576 is too small to gain much from it. ``--stage-threads`` changes it.
"""

READY_TIMEOUT = 120.0  # seconds for a stage process to start and announce itself (imports included)
WARMUP_TIMEOUT = 300.0  # seconds for a warm-up, stage loading included
RUN_TIMEOUT = 300.0  # seconds for one timed run; a run that needs more is broken, not slow
STOP_TIMEOUT = 10.0  # seconds for a stage process to leave after SIGTERM, before SIGKILL

RATIO_TARGET = 0.8
TARGETS = {"split_inproc_ratio": f">= {RATIO_TARGET}", "identical_tokens": "true"}


@dataclass(frozen=True)
class Settings:
    quick: bool
    new_tokens: int
    repeats: int
    stage_threads: int = STAGE_THREADS

    @classmethod
    def of(cls, quick: bool, stage_threads: int = STAGE_THREADS) -> Settings:
        return cls(quick, 12, 2, stage_threads) if quick else cls(quick, 32, 4, stage_threads)


@dataclass
class Run:
    """One timed run: one session (or `sessions` at once) of `tokens` new tokens in all."""

    what: str  # mono, inproc or mqtt
    sessions: int
    tokens: int
    wall_s: float | None  # None: the run failed or gave the wrong number of tokens
    ttft_s: float | None = None  # of the one session (the first of several)
    own_tokens_per_s: float | None = None  # the answer's own figure: tokens / decode_s (one session)
    answers: list[list[int]] = field(default_factory=list)
    error: str | None = None

    @property
    def rate(self) -> float | None:
        return self.tokens / self.wall_s if self.wall_s else None


@dataclass
class Results:
    prompt: list[int] = field(default_factory=list)
    reference: list[int] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    wire: dict[str, Generation] = field(default_factory=dict)
    inproc_plan: list[dict[str, object]] = field(default_factory=list)
    mqtt_plan: list[dict[str, object]] = field(default_factory=list)
    eos_ids: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)


def prompt_ids() -> list[int]:
    """The fixed prompt: the chat template of `QUESTION`, as ``llm.generate`` builds it."""
    tokenizer = load_tokenizer(MODEL)
    messages = [{"role": "user", "content": QUESTION}]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def bounded(awaitable: Awaitable[T], timeout: float) -> T:
    async with asyncio.timeout(timeout):
        return await awaitable


# --- the runs -----------------------------------------------------------------------------------


async def mono_run(prompt: list[int], n: int) -> Run:
    with gc_paused():
        began = time.perf_counter()
        out: MonolithicResult = await asyncio.to_thread(generate_monolithic, MODEL, prompt, max_new_tokens=n)
        wall = time.perf_counter() - began
    return Run("mono", 1, len(out.tokens), wall, out.ttft_s, out.tokens_per_s, [out.tokens])


async def split_run(what: str, gen: SplitGenerator, prompt: list[int], n: int, sessions: int) -> Run:
    """`sessions` concurrent sessions of `n` tokens; a failure is reported in the run, not raised."""
    try:
        with gc_paused():
            began = time.perf_counter()
            answers = await bounded(
                asyncio.gather(*(gen.generate(prompt, max_new_tokens=n, index=i) for i in range(sessions))),
                RUN_TIMEOUT,
            )
            wall = time.perf_counter() - began
    except (AgentError, FabricError, TimeoutError) as exc:
        return Run(what, sessions, n * sessions, None, error=describe(exc))
    got = [g.tokens for g in answers]
    run = Run(what, sessions, n * sessions, wall, answers[0].ttft_s, answers[0].tokens_per_s, got)
    if any(len(tokens) != n for tokens in got):
        run.wall_s, run.error = None, f"expected {n} tokens per session, got {[len(t) for t in got]}"
    return run


async def warm_up(gen: SplitGenerator, prompt: list[int], n: int) -> None:
    """Untimed: one session (the stages load), then four at once (threads and buffers grown)."""
    await bounded(gen.generate(prompt, max_new_tokens=n), WARMUP_TIMEOUT)
    await bounded(
        asyncio.gather(*(gen.generate(prompt, max_new_tokens=n) for _ in range(SESSIONS))), WARMUP_TIMEOUT
    )


def stage_caps() -> Capabilities:
    return Capabilities(tier="edge", cores=NODE_CORES, memory_mb=NODE_MEMORY_MB, models=[MODEL])


def driver_caps() -> Capabilities:
    return Capabilities(tier="device", cores=NODE_CORES, memory_mb=NODE_MEMORY_MB, models=[])


# --- (1), (2) and (4): in-process ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def inproc_cluster() -> AsyncIterator[Node]:
    """The driver and the three stage nodes on one hub, every stage node announced to the driver."""
    hub = InprocHub()
    started: list[Node] = []
    try:
        for node_id, tier in {DRIVER: "device", **STAGE_NODES}.items():
            caps = driver_caps() if node_id == DRIVER else stage_caps().model_copy(update={"tier": tier})
            node = Node(node_id, hub.transport(node_id), capabilities=caps)
            await node.start()
            started.append(node)
        driver = started[0]
        for node_id in STAGE_NODES:
            await driver.endpoint.wait_for_peer(node_id, READY_TIMEOUT, announced=True)
        yield driver
    finally:
        for node in reversed(started):
            await node.close(grace_s=0.0)


async def bench_inproc(settings: Settings, results: Results, progress: Callable[[str], None]) -> None:
    prompt, n = results.prompt, settings.new_tokens
    async with inproc_cluster() as driver:
        gen = SplitGenerator(driver.fabric, MODEL, nodes=list(STAGE_NODES))
        results.inproc_plan = (await gen.make_plan()).report()
        results.eos_ids = gen.stop_ids  # known once planned; not used to stop: every run makes N tokens
        progress("in-process split: loading the stages, warm-up")
        await warm_up(gen, prompt, n)
        for r in range(settings.repeats):
            step = f"repeat {r + 1}/{settings.repeats}"
            progress(f"{step}: monolithic")
            results.runs.append(await mono_run(prompt, n))
            progress(f"{step}: in-process split, 1 session")
            results.runs.append(await split_run("inproc", gen, prompt, n, 1))
            progress(f"{step}: in-process split, {SESSIONS} sessions")
            results.runs.append(await split_run("inproc", gen, prompt, n, SESSIONS))
        for wire in WIRE_DTYPES:
            progress(f"wire formats: {wire}")
            lossy = SplitGenerator(driver.fabric, MODEL, wire=wire, plan=gen.plan)
            try:
                results.wire[wire] = await bounded(lossy.generate(prompt, max_new_tokens=n), RUN_TIMEOUT)
            except (AgentError, FabricError, TimeoutError) as exc:
                results.notes.append(f"wire {wire}: {describe(exc)}")


# --- (3) MQTT -----------------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function that has Linux SIGTERM the child when this process dies (None elsewhere).

    Our ``finally`` stops the stage processes on any error; this covers a benchmark that is killed.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


async def start_stage(
    broker: MosquittoBroker, namespace: str, node_id: str, *, threads: int, log: IO[bytes]
) -> asyncio.subprocess.Process:
    """``flowloom node`` for one stage, its output into `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [
        "--id",
        node_id,
        "--tier",
        STAGE_NODES[node_id],
        "--cores",
        str(NODE_CORES),
        "--memory-mb",
        str(NODE_MEMORY_MB),
    ]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agents.cli",
        "node",
        *args,
        "--broker",
        broker.url,
        "--namespace",
        namespace,
        "--model",
        MODEL,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env=env,
        preexec_fn=_die_with_parent(),
    )


async def stop_stage(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM (the daemon drains and leaves), then SIGKILL after `STOP_TIMEOUT`."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await bounded(proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def log_tail(log: IO[bytes], lines: int = 15) -> str:
    log.flush()
    log.seek(0)
    return b"\n".join(log.read().splitlines()[-lines:]).decode(errors="replace")


async def wait_announced(
    driver: Node, procs: dict[str, asyncio.subprocess.Process], logs: dict[str, IO[bytes]]
) -> None:
    """Until every stage process has said hello to the driver; `RuntimeError` if one exits or is late."""
    deadline = time.monotonic() + READY_TIMEOUT
    for node_id, proc in procs.items():
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{node_id} exited ({proc.returncode}): {log_tail(logs[node_id])}")
            try:
                await driver.endpoint.wait_for_peer(node_id, 0.5, announced=True)
                break
            except DeadlineExceeded:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{node_id} did not announce itself within {READY_TIMEOUT:g} s"
                    ) from None


async def bench_mqtt(settings: Settings, results: Results, progress: Callable[[str], None]) -> None:
    prompt, n = results.prompt, settings.new_tokens
    try:
        broker = MosquittoBroker()
    except RuntimeError as exc:  # no Mosquitto here: the MQTT figures are null, with this note
        results.notes.append(f"MQTT: {exc}")
        return
    namespace = f"bench{uuid.uuid4().hex[:12]}"
    procs: dict[str, asyncio.subprocess.Process] = {}
    with broker, contextlib.ExitStack() as files:
        logs: dict[str, IO[bytes]] = {
            node_id: files.enter_context(tempfile.TemporaryFile()) for node_id in STAGE_NODES
        }
        driver: Node | None = None
        try:
            progress(f"MQTT: starting {len(STAGE_NODES)} stage processes")
            for node_id in STAGE_NODES:
                procs[node_id] = await start_stage(
                    broker, namespace, node_id, threads=settings.stage_threads, log=logs[node_id]
                )
            driver = Node(
                DRIVER, MqttTransport(broker.url, DRIVER, namespace=namespace), capabilities=driver_caps()
            )
            await driver.start()
            await wait_announced(driver, procs, logs)
            # Each daemon makes its llm.stage service (torch and transformers imported) on a first call.
            await bounded(
                asyncio.gather(
                    *(driver.fabric.call(p, SERVICE, "stats", {}, timeout=READY_TIMEOUT) for p in procs)
                ),
                READY_TIMEOUT,
            )
            gen = SplitGenerator(driver.fabric, MODEL, nodes=list(STAGE_NODES))
            results.mqtt_plan = (await gen.make_plan()).report()
            progress("MQTT split: loading the stages, warm-up")
            await warm_up(gen, prompt, n)
            for r in range(settings.repeats):
                for sessions in (1, SESSIONS):
                    progress(f"repeat {r + 1}/{settings.repeats}: MQTT split, {sessions} session(s)")
                    results.runs.append(await split_run("mqtt", gen, prompt, n, sessions))
        except (AgentError, FabricError, RuntimeError, OSError, TimeoutError) as exc:
            results.notes.append(f"MQTT: {describe(exc)}")
        finally:
            if driver is not None:
                await driver.close(grace_s=0.0)
            await asyncio.gather(*(stop_stage(proc) for proc in procs.values()))


async def measure_async(settings: Settings, progress: Callable[[str], None]) -> Results:
    results = Results()
    progress("loading the model and the tokenizer")
    results.prompt = await asyncio.to_thread(prompt_ids)
    warm = await asyncio.to_thread(
        generate_monolithic, MODEL, results.prompt, max_new_tokens=settings.new_tokens
    )
    results.reference = warm.tokens
    try:
        await bench_inproc(settings, results, progress)
    except (AgentError, FabricError, TimeoutError) as exc:
        results.notes.append(f"in-process: {describe(exc)}")
    await bench_mqtt(settings, results, progress)
    return results


# --- reporting ----------------------------------------------------------------------------------


def best_rate(runs: Sequence[Run], what: str, sessions: int) -> float | None:
    rates = [rate for r in runs if r.what == what and r.sessions == sessions and (rate := r.rate) is not None]
    return max(rates) if rates else None


def best_ttft(runs: Sequence[Run], what: str) -> float | None:
    ttfts = [
        r.ttft_s for r in runs if r.what == what and r.sessions == 1 and r.wall_s and r.ttft_s is not None
    ]
    return min(ttfts) if ttfts else None


def first_divergence(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """The index of the first token that differs (or where one answer is shorter), or None."""
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return round(value / baseline, 3) if value is not None and baseline else None


def _run_detail(run: Run, reference: list[int]) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "what": run.what,
        "sessions": run.sessions,
        "tokens": run.tokens,
        "wall_s": _round(run.wall_s, 4),
        "tokens_per_s": _round(run.rate, 2),
    }
    if run.wall_s is not None:
        detail["ttft_s"] = _round(run.ttft_s, 4)
        detail["own_tokens_per_s"] = _round(run.own_tokens_per_s, 2)
        detail["identical"] = all(tokens == reference for tokens in run.answers)
    if run.error is not None:
        detail["error"] = run.error
    return detail


def report(settings: Settings, results: Results) -> dict[str, Any]:
    runs, reference = results.runs, results.reference
    notes = list(results.notes)
    notes.extend(f"{r.what} run, {r.sessions} session(s): {r.error}" for r in runs if r.error is not None)
    mono = best_rate(runs, "mono", 1)
    inproc = best_rate(runs, "inproc", 1)
    figures: dict[str, Any] = {
        "mono_tokens_per_s": _round(mono, 2),
        "split_inproc_tokens_per_s": _round(inproc, 2),
        "split_inproc_ratio": _ratio(inproc, mono),
        "split_inproc_4_sessions_tokens_per_s": _round(best_rate(runs, "inproc", SESSIONS), 2),
        "split_mqtt_tokens_per_s": _round(best_rate(runs, "mqtt", 1), 2),
        "split_mqtt_ratio": _ratio(best_rate(runs, "mqtt", 1), mono),
        "split_mqtt_4_sessions_tokens_per_s": _round(best_rate(runs, "mqtt", SESSIONS), 2),
        "mono_ttft_s": _round(best_ttft(runs, "mono"), 4),
        "split_ttft_s": _round(best_ttft(runs, "inproc"), 4),
        "split_mqtt_ttft_s": _round(best_ttft(runs, "mqtt"), 4),
    }
    for name, value in figures.items():
        if value is None and not name.endswith("ratio"):
            notes.append(f"no complete run: {name} is null")
    figures["wire_bytes_per_token"] = {
        wire: round(g.wire_bytes / g.positions, 1) if g.positions else None
        for wire, g in results.wire.items()
    }
    figures["first_divergence"] = {
        wire: first_divergence(g.tokens, reference) for wire, g in results.wire.items()
    }
    # Every float32 split answer, every session of every run, in-process and over MQTT.
    split_answers = [tokens for r in runs if r.what != "mono" and r.wall_s for tokens in r.answers]
    if "float32" in results.wire:
        split_answers.append(results.wire["float32"].tokens)
    mono_answers = [tokens for r in runs if r.what == "mono" and r.wall_s for tokens in r.answers]
    identical = bool(split_answers) and all(t == reference for t in split_answers + mono_answers)
    if not any(r.what == "mqtt" and r.wall_s for r in runs):
        notes.append("identical_tokens covers the in-process answers only: no MQTT run completed")
    if any(t != reference for t in mono_answers):
        notes.append("the monolithic model gave different answers in different runs")
    ratio = figures["split_inproc_ratio"]
    tokenizer = load_tokenizer(MODEL)
    out: dict[str, Any] = {
        "quick": settings.quick,
        "model": MODEL,
        "prompt": QUESTION,
        "prompt_tokens": len(results.prompt),
        "new_tokens": settings.new_tokens,
        "repeats": settings.repeats,
        "sessions": SESSIONS,
        **figures,
        "identical_tokens": identical,
        "answer": tokenizer.decode(reference, skip_special_tokens=False),
        "targets": TARGETS,
        "meets_targets": bool(ratio is not None and ratio >= RATIO_TARGET and identical),
        "notes": notes,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "stage_threads": settings.stage_threads,
        "details": {
            "reference_tokens": reference,
            "reference_eos_at": next((i for i, t in enumerate(reference) if t in results.eos_ids), None),
            "inproc_plan": results.inproc_plan,
            "mqtt_plan": results.mqtt_plan,
            "runs": [_run_detail(r, reference) for r in runs],
            "wire": {
                wire: {
                    "wire_bytes": g.wire_bytes,
                    "positions": g.positions,
                    "tokens_per_s": round(g.tokens_per_s, 2),
                    "text": tokenizer.decode(g.tokens, skip_special_tokens=False),
                }
                for wire, g in results.wire.items()
            },
        },
    }
    return out


def render(result: dict[str, Any], console: Console) -> None:
    """The figures as two tables (speed, wire formats), then notes and a one-line verdict."""
    r = result
    mode = "quick" if r["quick"] else "full"
    table = Table(
        title=(
            f"Flowloom split LLM, {r['model']}, Python {r['python']}, torch {r['torch']}, {r['cpus']} CPUs, "
            f"{mode} run: {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, greedy"
        ),
        caption=(
            f"best of {r['repeats']}; 3 stages of 10 layers; ratio: split in-process / mono; torch threads: "
            f"{r['torch_threads']} here, {r['stage_threads']} per stage process; tokens/s over each call's "
            "wall time; TTFT: time to first token"
        ),
    )
    for column in ("figure", "mono", "split\nin-proc", "split\nMQTT", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column in ("figure", "target") else "right")
    ratio = r["split_inproc_ratio"]
    table.add_row(
        "tokens/s, 1 session",
        num(r["mono_tokens_per_s"], ".2f"),
        num(r["split_inproc_tokens_per_s"], ".2f"),
        num(r["split_mqtt_tokens_per_s"], ".2f"),
        "" if ratio is None else f"{ratio:.2f}x",
        TARGETS["split_inproc_ratio"],
        target_met(ratio is not None and ratio >= RATIO_TARGET),
    )
    table.add_row(
        f"tokens/s, {r['sessions']} sessions",
        "",
        num(r["split_inproc_4_sessions_tokens_per_s"], ".2f"),
        num(r["split_mqtt_4_sessions_tokens_per_s"], ".2f"),
        "",
        "info",
        "",
    )
    table.add_row(
        "TTFT s",
        num(r["mono_ttft_s"], ".3f"),
        num(r["split_ttft_s"], ".3f"),
        num(r["split_mqtt_ttft_s"], ".3f"),
        "",
        "info",
        "",
    )
    table.add_row("identical tokens", "", "", "", "", "float32", target_met(r["identical_tokens"]))
    console.print(table)
    eos = r["details"]["reference_eos_at"]
    wires = Table(
        title="Wire formats between stages (in-process, 1 session)",
        caption="bytes/token: activations sent between stages (2 hops) per position"
        + ("" if eos is None else f"; the monolithic answer's end-of-text token is token {eos}"),
    )
    for column in ("wire", "bytes/token", "vs float32", "first divergence"):
        wires.add_column(column, justify="left" if column == "wire" else "right")
    f32 = r["wire_bytes_per_token"].get("float32")
    for wire, per_token in r["wire_bytes_per_token"].items():
        diverges = r["first_divergence"][wire]
        wires.add_row(
            wire,
            num(per_token, ",.0f"),
            num(per_token / f32 if per_token and f32 else None, ".2f") + "x",
            "none (identical)" if diverges is None else f"token {diverges}",
        )
    console.print(wires)
    console.print(
        f"Monolithic answer ({r['new_tokens']} tokens, not stopped at end-of-text): {r['answer']!r}",
        highlight=False,
    )
    for note in r["notes"]:
        console.print(f"[red]note: {note}[/]")
    verdict = "[green]meets targets[/]" if r["meets_targets"] else "[red]misses targets[/]"
    console.print(
        f"Verdict: {verdict}: split in-process {num(ratio, '.2f')}x monolithic tokens/s, "
        f"tokens {'identical' if r['identical_tokens'] else '[red]not identical[/]'}"
    )


def run(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    return report(settings, asyncio.run(measure_async(settings, progress)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__, "12 new tokens, 2 repeats (the full run: 32 tokens, 4 repeats)")
    parser.add_argument(
        "--stage-threads",
        type=int,
        default=STAGE_THREADS,
        metavar="N",
        help=f"torch threads of each stage process over MQTT (default {STAGE_THREADS})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.of(args.quick, max(1, args.stage_threads))
    # SIGTERM as Ctrl-C: asyncio.run then cancels the benchmark, whose `finally`s stop the stage
    # processes and the broker (the default action would leave the broker running).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    emit_live(lambda progress: run(settings, progress), as_json=args.json, render=render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
