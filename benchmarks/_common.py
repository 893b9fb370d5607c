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
import os
import sys
from collections.abc import Callable, Iterator
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
