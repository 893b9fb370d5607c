"""The `flowloom` command: validate and run scenario files."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import sys
import urllib.parse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agents.errors import ScenarioError
from agents.graph import TaskGraph
from agents.node import Node
from agents.orchestrator import JobEvent
from agents.report import Report
from agents.runner import run_scenario, write_trace
from agents.scenario import load_scenario
from agents.services import load_services
from fabric import FabricError, MqttTransport
from protocol import Capabilities

__all__ = ["main"]


def _validate(args: argparse.Namespace, console: Console) -> int:
    scenario = load_scenario(args.file)
    console.print(f"[green]ok[/green] {args.file}: scenario {scenario.name!r}, {len(scenario.nodes)} nodes")
    return 0


def _run(args: argparse.Namespace, console: Console) -> int:
    scenario = load_scenario(args.file)
    console.print(f"[bold]{scenario.name}[/bold]: {scenario.description.strip()}")
    if args.broker:
        console.print(
            f"against the node daemons on {args.broker}, fabric {args.namespace!r}: "
            f"waiting up to {args.wait_s:g}s for {', '.join(scenario.nodes)}",
            highlight=False,
        )
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    bar = progress.add_task("tasks", total=None)

    def on_start(graph: TaskGraph) -> None:  # a resumed job starts with some tasks done
        progress.update(bar, total=len(graph), completed=graph.counts()["done"])

    def on_event(event: JobEvent) -> None:
        if event.kind == "done":
            progress.advance(bar)
        elif event.kind == "patch" and "rejected" not in event.detail:
            progress.update(bar, total=(progress.tasks[0].total or 0) + 1)
        if event.kind in ("reassign", "retry", "timeout", "speculate", "failed", "cancel", "patch"):
            where = f" on {event.node}" if event.node else ""
            progress.console.print(
                f"  [yellow]{event.t:6.2f}s[/yellow] {event.kind} {event.task}{where} {event.detail}"
            )

    journal = Path(args.journal) if args.journal else None
    with progress:
        report, orchestrator = asyncio.run(
            run_scenario(
                scenario,
                on_event=on_event,
                on_start=on_start,
                journal=journal,
                resume=args.resume,
                broker=args.broker,
                namespace=args.namespace,
                wait_s=args.wait_s,
                private_broker=args.mqtt,
            )
        )
    _print_report(report, console)
    if args.report:
        Path(args.report).write_text(report.model_dump_json(indent=2) + "\n")
        console.print(f"report written to {args.report}")
    if args.trace:
        write_trace(orchestrator.events, args.trace)
        console.print(f"trace written to {args.trace} (open in ui.perfetto.dev or chrome://tracing)")
    console.print("[green]ok[/green]" if report.ok else "[red]FAILED[/red]", f"in {report.wall_s:.2f}s")
    return 0 if report.ok else 1


def _print_report(report: Report, console: Console) -> None:
    nodes = Table(title="nodes")
    for column in ("node", "tier", "tasks run", "alive"):
        nodes.add_column(column)
    for name, node in report.nodes.items():
        nodes.add_row(name, node.tier, str(node.tasks_run), "yes" if node.alive else "[red]no[/red]")
    console.print(nodes)
    if report.faults:
        faults = Table(title="faults")
        for column in ("at s", "fault", "what"):
            faults.add_column(column)
        for fault in report.faults:
            faults.add_row(f"{fault.at_s:.2f}", fault.kind, fault.target)
        console.print(faults)
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
    if report.routes:
        routes = Table(title="routes through relays")
        routes.add_column("from -> to")
        routes.add_column("path")
        for pair, path in report.routes.items():
            routes.add_row(pair, " > ".join(path))
        console.print(routes)
    t = report.tasks
    console.print(
        f"tasks: {t.done} done, {t.failed} failed or skipped, {t.cancelled} cancelled, of {t.total}"
    )


def _node(args: argparse.Namespace, console: Console) -> int:
    labels = dict(item.split("=", 1) for item in args.label)
    caps = Capabilities(
        tier=args.tier,
        cores=args.cores,
        memory_mb=args.memory_mb,
        segment=args.segment,
        reachability="nat" if args.nat else "public",
        labels=labels,
        models=args.model,
    )
    return asyncio.run(_serve_node(args, caps, console))


def loopback_warning(bulk_address: str | None, broker: str) -> str | None:
    """Why peers on other machines could not dial `bulk_address`, when that is so, else None.

    A node whose broker is on another machine has peers there too; a loopback address announced
    to them leads each to its own machine (where the stream is refused, and chunks are sent).
    """
    if bulk_address is None:
        return None
    host = bulk_address.rpartition(":")[0].strip("[]")
    broker_host = urllib.parse.urlsplit(broker).hostname or ""
    if _is_loopback(host) and not _is_loopback(broker_host):
        return (
            f"bulk address {bulk_address} is a loopback address, but the broker {broker} is not on "
            "this machine: peers elsewhere cannot dial it; pass --bulk-advertise with an address they can"
        )
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve_node(args: argparse.Namespace, caps: Capabilities, console: Console) -> int:
    brokers: list[str] = args.broker  # one or more (--broker repeats): one segment each
    # The bulk address is announced on every broker (and relays carry hellos further), so peers on
    # each broker may dial it: every broker not on this machine gets its warning.
    for broker in brokers:
        warning = loopback_warning(args.bulk_advertise or args.bulk, broker)
        if warning is not None:
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if args.relay and len(brokers) < 2:
        console.print(
            "[yellow]warning:[/yellow] --relay with a single --broker forwards nothing: "
            "a relay joins two brokers or more (repeat --broker)",
            highlight=False,
        )
    # One transport per broker, all with this node's id and the same namespace.
    transports = [MqttTransport(url, args.id, namespace=args.namespace) for url in brokers]
    node = Node(
        args.id,
        transports,
        capabilities=caps,
        heartbeat_s=args.heartbeat_s,
        dead_after_s=args.dead_after_s,
        bulk=args.bulk,
        bulk_advertise=args.bulk_advertise,
        relay=args.relay,
    )
    if caps.models:
        # A node that serves model stages imports its services (torch, transformers: seconds of
        # CPU) before it joins, not while peers count its heartbeats.
        await asyncio.to_thread(load_services, node.services.registry)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with node:
        relaying = ", relaying" if args.relay else ""
        console.print(
            f"node {args.id} ({caps.tier}) on {', '.join(brokers)}, "
            f"fabric {args.namespace!r}{relaying}: ready",
            highlight=False,
            soft_wrap=True,  # one line, however long: scripts and tests wait for it
        )
        await stopping.wait()
        console.print(f"node {args.id}: draining (up to {args.grace_s:g}s), then leaving")
        await node.close(grace_s=args.grace_s)
    return 0


def _mqtt_url(value: str) -> str:
    """An argparse type: ``mqtt://host[:port]``, or a clear error naming what is wrong."""
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not an MQTT URL: {exc}") from None
    if url.scheme not in ("mqtt", "tcp") or not url.hostname:
        raise argparse.ArgumentTypeError(f"{value!r} is not an MQTT URL: expected mqtt://host:port")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flowloom` command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="flowloom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a scenario file and report what is wrong")
    validate.add_argument("file")
    run = sub.add_parser("run", help="run a scenario (in-process by default)")
    run.add_argument("file")
    run.add_argument("--report", metavar="FILE", help="write the report JSON here")
    run.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace here")
    run.add_argument("--journal", metavar="FILE", help="journal the run in this sqlite file")
    run.add_argument("--resume", action="store_true", help="finish the job journaled in --journal")
    run.add_argument(
        "--broker", metavar="URL", type=_mqtt_url, help="run against node daemons on this MQTT broker"
    )
    run.add_argument("--namespace", default="flowloom", help="with --broker: the fabric namespace")
    run.add_argument(
        "--mqtt", action="store_true", help="nodes in-process, over a private Mosquitto (for restart_broker)"
    )
    run.add_argument(
        "--wait-s", type=float, default=30.0, help="with --broker: how long to wait for the nodes"
    )
    node = sub.add_parser(
        "node", help="run a node daemon on an MQTT broker (or several, one segment each, with --relay)"
    )
    node.add_argument("--id", required=True, help="node id, unique on the fabric")
    node.add_argument("--tier", choices=["device", "edge", "cloud"], required=True)
    node.add_argument(
        "--broker",
        required=True,
        action="append",
        metavar="URL",
        type=_mqtt_url,
        help="mqtt://host:port; repeat it to join several brokers (one segment each), e.g. with --relay",
    )
    node.add_argument("--namespace", default="flowloom", help="fabric namespace on the broker")
    node.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    node.add_argument("--memory-mb", type=int, default=1024)
    node.add_argument("--segment", default="default")
    node.add_argument("--nat", action="store_true", help="this node cannot be dialled")
    node.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    node.add_argument(
        "--model", action="append", default=[], metavar="NAME", help="a model this node can load stages of"
    )
    node.add_argument("--bulk", metavar="HOST:PORT", help="accept large tensors directly here")
    node.add_argument("--bulk-advertise", metavar="HOST:PORT", help="the address peers dial for --bulk")
    node.add_argument(
        "--relay",
        action="store_true",
        help="forward envelopes between this node's brokers, for nodes that cannot reach each other",
    )
    node.add_argument("--heartbeat-s", type=float, default=1.0)
    node.add_argument(
        "--dead-after-s",
        type=float,
        help="declare a silent peer dead after this long (default: 3 heartbeats); raise it on busy links",
    )
    node.add_argument("--grace-s", type=float, default=10.0, help="on SIGTERM, time for running tasks")
    args = parser.parse_args(argv)
    if getattr(args, "resume", False) and not args.journal:
        parser.error("--resume needs --journal FILE")
    if getattr(args, "mqtt", False) and args.broker:
        parser.error("--mqtt starts a private broker; --broker uses daemons on yours: choose one")
    if args.command == "node":
        twice = sorted({url for url in args.broker if args.broker.count(url) > 1})
        if twice:  # two connections with one client id: the broker would drop each for the other
            parser.error(f"--broker {twice[0]} is given twice")
    console = Console()
    try:
        return {"validate": _validate, "run": _run, "node": _node}[args.command](args, console)
    except ScenarioError as exc:
        # plain lines, never wrapped: people grep them and editors jump to file:line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FabricError as exc:  # e.g. no broker at that address
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
