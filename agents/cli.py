"""The `flowloom` command: validate and run scenario files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agents.errors import ScenarioError
from agents.scenario import load_scenario
from agents.wire_check import run_wire_check

__all__ = ["main"]


def _validate(args: argparse.Namespace, console: Console) -> int:
    scenario = load_scenario(args.file)
    console.print(f"[green]ok[/green] {args.file}: scenario {scenario.name!r}, {len(scenario.nodes)} nodes")
    return 0


def _run(args: argparse.Namespace, console: Console) -> int:
    scenario = load_scenario(args.file)
    console.print(f"[bold]{scenario.name}[/bold]: {scenario.description.strip()}")
    console.print(
        "[dim]The orchestrator and task DAG are not built yet: this run exchanges real, signed "
        "protocol frames between the scenario's nodes in one process.[/dim]"
    )
    report = run_wire_check(scenario, step=lambda line: console.print(f"  [cyan]>[/cyan] {line}"))

    table = Table(title="expectations")
    table.add_column("check")
    table.add_column("ok")
    table.add_column("detail", overflow="fold")
    for exp in report.expectations:
        table.add_row(exp.name, "[green]yes[/green]" if exp.ok else "[red]NO[/red]", exp.detail)
    console.print(table)
    figures = Table(title="figures")
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    for name, value in report.figures.items():
        figures.add_row(name, f"{value:,.4g}")
    console.print(figures)
    if args.report:
        Path(args.report).write_text(report.model_dump_json(indent=2) + "\n")
        console.print(f"report written to {args.report}")
    console.print("[green]ok[/green]" if report.ok else "[red]FAILED[/red]", f"in {report.wall_s:.2f}s")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flowloom` command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="flowloom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a scenario file and report what is wrong")
    validate.add_argument("file")
    run = sub.add_parser("run", help="run a scenario in-process")
    run.add_argument("file")
    run.add_argument("--report", metavar="FILE", help="write the report JSON here")
    args = parser.parse_args(argv)
    console = Console()
    try:
        return {"validate": _validate, "run": _run}[args.command](args, console)
    except ScenarioError as exc:
        # plain lines, never wrapped: people grep them and editors jump to file:line
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
