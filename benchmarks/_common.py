"""What every benchmark shares: pausing the garbage collector, the command line, the output.

Each benchmark runs as a script (``python benchmarks/NAME.py [--quick] [--json]``) and first puts
the project root at the front of ``sys.path`` (and its own folder off it: ``benchmarks/fabric.py``
would otherwise shadow the ``fabric`` package), then imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

__all__ = [
    "base_parser",
    "cpu_choices",
    "emit",
    "emit_live",
    "gc_paused",
    "pinned",
    "read_line",
    "spawn_script",
]

MAX_PINNED_CPUS = 4
"""In-process figures are measured pinned to each of at most this many CPUs in turn."""


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector, so a collection does not land inside a timed loop."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def base_parser(doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """An argument parser with the two flags every benchmark takes: --quick and --json."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    return parser


def emit(result: dict[str, Any], *, as_json: bool, render: Callable[[dict[str, Any], Console], None]) -> None:
    """Print `result` as one JSON object, or as the benchmark's table."""
    if as_json:
        print(json.dumps(result))
    else:
        render(result, Console())


def emit_live(
    measure: Callable[[Callable[[str], None]], dict[str, Any]],
    *,
    as_json: bool,
    render: Callable[[dict[str, Any], Console], None],
) -> None:
    """Like `emit`, for a long benchmark: `measure(progress)` runs under a status line (when not
    printing JSON) that shows what `progress` last said."""
    if as_json:
        print(json.dumps(measure(lambda _: None)))
        return
    console = Console()
    with console.status("starting") as status:
        result = measure(status.update)
    render(result, console)


def cpu_choices() -> list[int | None]:
    """The CPUs the in-process figures are measured on in turn (up to 4), or [None] (no pinning)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return [None]
    return list(cpus[:MAX_PINNED_CPUS]) if len(cpus) > 1 else [None]


@contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run this process on `cpu` only, for the duration (nothing when None)."""
    if cpu is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


async def spawn_script(script: Path, *args: str) -> asyncio.subprocess.Process:
    """`script` (a benchmark) with hidden `args`, as a helper process with piped stdin and stdout."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=script.resolve().parents[1],
    )


async def read_line(proc: asyncio.subprocess.Process, timeout: float, what: str) -> str:
    """The helper's next line of output; `RuntimeError` naming `what` if none comes in `timeout` s."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            line = await proc.stdout.readline()
    except TimeoutError:
        raise RuntimeError(f"{what}: said nothing within {timeout:g} s") from None
    if not line:
        raise RuntimeError(f"{what}: exited with code {await proc.wait()}")
    return line.decode().strip()


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..1) of `samples`."""
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) of process `pid` so far, from /proc (None elsewhere)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def target_met(ok: bool) -> str:
    """A target's verdict for a rich table: a green yes or a red no."""
    return "[green]yes[/]" if ok else "[red]no[/]"


def num(value: float | None, fmt: str = ",.0f") -> str:
    """`value` formatted with `fmt` for a rich table, or a red "none" when it was not measured."""
    return "[red]none[/]" if value is None else format(value, fmt)
