"""What every benchmark shares: pausing the garbage collector, the command line, the output.

Each benchmark runs as a script (``python benchmarks/NAME.py [--quick] [--json]``) and first puts
the project root at the front of ``sys.path`` (and its own folder off it: ``benchmarks/fabric.py``
would otherwise shadow the ``fabric`` package), then imports this module.
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

__all__ = ["base_parser", "emit", "gc_paused"]


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
