"""Renders docs/scenarios.md from the scenario models.

Run ``python -m agents.scenario_doc > docs/scenarios.md`` (or ``make docs``).

The field tables come from the pydantic models in `agents.scenario` (types, limits, defaults and the
attribute docstrings), the examples are validated while the page is rendered, and every error
message shown on the page is produced by the real loader and the real ``flowloom validate``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import io
import json
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from agents import builtin
from agents.cli import main as flowloom
from agents.errors import ScenarioError
from agents.orchestrator import Orchestrator
from agents.scenario import Fault, Scenario, WorkloadTask, load_scenario

__all__ = ["EXAMPLE", "render"]

EXAMPLE = """\
# Three machines on emulated links run a three-task job; the edge box dies while it runs `work`,
# the task is reassigned, and it runs again when the edge box comes back.
name: minimal
description: A phone, an edge box and a cloud machine; the edge box dies mid-task and comes back.
nodes:
  device-1: {tier: device, cores: 2, memory_mb: 2048, nat: true, labels: {kind: phone}}
  edge-1: {tier: edge, cores: 4, memory_mb: 8192}
  cloud-1: {tier: cloud, cores: 16, memory_mb: 65536}
links:
  - {src: device-1, dst: edge-1, latency_ms: 20, bandwidth_mbps: 100}
  - {src: edge-1, dst: cloud-1, latency_ms: 10, bandwidth_mbps: 1000}
workload:
  timeout_s: 30
  tasks:
    - {id: capture, kind: echo, tier: device, params: {value: [1, 2, 3]}}
    - {id: work, kind: sleep, tier: edge, params: {seconds: 1.0}, after: [capture], retries: 1}
    - {id: total, kind: sum, inputs: {a: work}, params: {add: 1}}
faults:
  - {at_s: 0.5, action: kill_node, node: edge-1}
  - {at_s: 2.0, action: restart_node, node: edge-1}
expect:
  all_done: true
  min_reassigned: 1
  outputs: {total: 2.0}
"""
"""The page's complete example; tests/agents/test_scenario_doc.py also runs it."""

_BROKEN = """\
name: broken
nodes:
  phone: {tier: mobile, cores: 0}
  edge-1: {tier: edge, memory_mb: 4GB}
links:
  - {src: phone, dst: edge-1, latency_ms: -5}
workload:
  tasks:
    - {id: capture, kind: echo, retry: 2}
faults:
  - {at_s: 1, action: reboot, node: edge-1}
"""

_FAULT_ACTIONS: dict[str, tuple[str, str]] = {
    "kill_node": (
        "`node`",
        "The node stops as if its process died: it answers nothing more and sends no goodbye; what "
        "it was running or had queued is lost. In-process the hub withdraws its presence at once (as "
        "a broker fires a Last Will), so the orchestrator puts those tasks back to be placed on "
        "another node straight away; they count as reassigned, not as retries. Killing a node that "
        "is already dead changes nothing (the report says `was already down; not killed`).",
    ),
    "restart_node": (
        "`node`",
        "A fresh node starts under the same id, with the scenario's capabilities and links (and the "
        "`slow_node` factor it had, if any), and joins the fabric; tasks waiting for a node that "
        "fits can then be placed on it. Partitions still in force hold for it too. If the node "
        "is running, nothing happens (the report says `was running; not restarted`).",
    ),
    "partition": (
        "`node`, `peer`",
        "Every message between `node` and `peer` is dropped, both ways, broadcasts and heartbeats "
        "included; presence stays, as a broker still sees both sides. Only the in-process hub can "
        "cut a broadcast for one receiver, so `flowloom run --mqtt` refuses a scenario with "
        "partitions. A partition from the node "
        "the orchestrator runs beside cuts the orchestrator off too: it stops hearing the other "
        "node, declares it dead after its failure-detection bound and reassigns its tasks; results "
        "sent across the cut are lost. Between two other nodes a partition only matters for what "
        "they send each other.",
    ),
    "heal": (
        "`node`, `peer`",
        "Both directions between `node` and `peer` get back the figures the scenario gives them "
        "(or no emulation when the scenario has no link between them).",
    ),
    "slow_node": (
        "`node`, `factor`",
        "From then on the node is `factor` times slower: after each task's executor returns, the "
        "node waits `compute time x (factor - 1)` before it answers (tasks already running when the "
        "fault comes are slowed too). `factor` must be above 1. The factor survives a "
        "`restart_node`.",
    ),
    "restart_broker": (
        "nothing",
        "With `flowloom run --mqtt` (nodes in-process on a private Mosquitto started for the run) "
        "the broker is stopped cleanly and started again on the same port: nodes reconnect by "
        "themselves and QoS 1 messages sent meanwhile are delivered after; nodes silent for longer "
        "than the failure-detection bound are declared dead and their tasks reassigned, and results "
        "that arrive later are counted as ignored. On the in-process hub there is no broker and the "
        "fault is skipped (`no broker in-process (run with --mqtt for one): skipped`); against "
        "daemons (`--broker`) it is not injected either (the broker is yours).",
    ),
}
"""Per fault action: the fields it uses, and what the in-process runner (agents/runner.py) does."""

# Breaks one of the rules `Scenario` checks across sections, in a copy of the example's data.
_Mutation = Callable[[dict[str, Any]], None]


def _cross_checks() -> list[tuple[str, _Mutation]]:
    def link_to_nowhere(d: dict[str, Any]) -> None:
        d["links"][0]["dst"] = "edge-9"

    def duplicate_task(d: dict[str, Any]) -> None:
        d["workload"]["tasks"].append({"id": "capture", "kind": "echo"})

    def unknown_input(d: dict[str, Any]) -> None:
        d["workload"]["tasks"][2]["inputs"] = {"a": "wrok"}

    def unknown_after(d: dict[str, Any]) -> None:
        d["workload"]["tasks"][1]["after"] = ["captrue"]

    def pinned_to_nowhere(d: dict[str, Any]) -> None:
        d["workload"]["tasks"][0]["node"] = "phone-9"

    def fault_without_node(d: dict[str, Any]) -> None:
        del d["faults"][0]["node"]

    def fault_on_unknown_node(d: dict[str, Any]) -> None:
        d["faults"][0]["node"] = "edge-9"

    def partition_without_peer(d: dict[str, Any]) -> None:
        d["faults"].append({"at_s": 1.0, "action": "partition", "node": "edge-1"})

    def expect_unknown_output(d: dict[str, Any]) -> None:
        d["expect"]["outputs"]["request-0"] = 1

    def unplaceable(d: dict[str, Any]) -> None:
        d["workload"]["tasks"][0]["memory_mb"] = 1 << 30

    def reserved_node(d: dict[str, Any]) -> None:
        d["nodes"]["orchestrator"] = {"tier": "cloud"}

    def cycle(d: dict[str, Any]) -> None:
        d["workload"]["tasks"][0]["after"] = [d["workload"]["tasks"][-1]["id"]]

    def not_on_the_wire(d: dict[str, Any]) -> None:
        d["workload"]["tasks"][0]["params"] = {"when": datetime.date(2024, 1, 1)}

    return [
        ("A link's `src` and `dst` are nodes of `nodes`.", link_to_nowhere),
        ("Task ids are unique.", duplicate_task),
        ("A task's `inputs` name tasks of `workload.tasks`...", unknown_input),
        ("... and so does its `after`.", unknown_after),
        ("A task's `node`, when set, is a node of `nodes`.", pinned_to_nowhere),
        ("Every fault but `restart_broker` names a `node`...", fault_without_node),
        ("... which is a node of `nodes` (and so is `peer`).", fault_on_unknown_node),
        ("`partition` and `heal` name a `peer` too.", partition_without_peer),
        (
            "The keys of `expect.outputs` are tasks of `workload.tasks` or generated requests "
            "(not tasks added while the job runs).",
            expect_unknown_output,
        ),
        ("Some node meets each task's `tier`, `node`, `labels`, `cores` and `memory_mb`.", unplaceable),
        ("No node is called `orchestrator`: that is the orchestrator's id on the fabric.", reserved_node),
        ("`inputs` and `after` together make no cycle.", cycle),
        (
            "`params` hold only values that can travel on the wire (an unquoted YAML date such as "
            "`2024-01-01` cannot: quote it).",
            not_on_the_wire,
        ),
    ]


# field types ---------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """One markdown table cell: whitespace folded, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _link(model: type[BaseModel]) -> str:
    return f"[{model.__name__}](#{_anchor(model)})"


def _is_model(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, BaseModel)


def _limits(kind: str, metadata: list[Any]) -> str:
    """`kind` with the bounds and length limits of `metadata`: `float > 0`, `0 <= float < 1`."""
    low: tuple[str, Any] | None = None
    high: tuple[str, Any] | None = None
    extra: list[str] = []
    for item in metadata:  # annotated_types' Ge, Gt, ..., MinLen, and pydantic's pattern metadata
        if getattr(item, "ge", None) is not None:
            low = ("<=", item.ge)
        elif getattr(item, "gt", None) is not None:
            low = ("<", item.gt)
        elif getattr(item, "le", None) is not None:
            high = ("<=", item.le)
        elif getattr(item, "lt", None) is not None:
            high = ("<", item.lt)
        elif getattr(item, "min_length", None) is not None:
            extra.append("not empty" if item.min_length == 1 else f"length >= {item.min_length}")
        elif getattr(item, "max_length", None) is not None:
            extra.append(f"length <= {item.max_length}")
        elif getattr(item, "pattern", None) is not None:
            extra.append(f"matching {item.pattern}")
    if low is not None and high is not None:
        text = f"{low[1]} {low[0]} {kind} {high[0]} {high[1]}"
    elif low is not None:  # `int >= 1` reads better than `1 <= int`
        text = f"{kind} {'>=' if low[0] == '<=' else '>'} {low[1]}"
    elif high is not None:
        text = f"{kind} {high[0]} {high[1]}"
    else:
        text = kind
    return text + (f" ({', '.join(extra)})" if extra else "")


def _type(annotation: Any, metadata: list[Any]) -> list[str | type[BaseModel]]:
    """The field's type as pieces: text, and models (which become links)."""
    origin = get_origin(annotation)
    if origin is Annotated:  # e.g. a constrained dict key: its constraints are its metadata
        base, *meta = get_args(annotation)
        return _type(base, [*meta, *metadata])
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(annotation) if a is not type(None)]
        pieces: list[str | type[BaseModel]] = []
        for i, arg in enumerate(args):
            pieces += ([" | "] if i else []) + _type(arg, metadata)
        return [*pieces, " | null"] if len(args) < len(get_args(annotation)) else pieces
    if origin is Literal:
        return [" | ".join(json.dumps(v) for v in get_args(annotation))]
    if origin is list or origin is dict:
        inner: list[str | type[BaseModel]] = []
        for i, arg in enumerate(get_args(annotation)):
            inner += ([", "] if i else []) + _type(arg, [])
        limits = _limits("", metadata).strip()
        return [f"{origin.__name__}[", *inner, "]" + (f" {limits}" if limits else "")]
    if _is_model(annotation):
        return [annotation]
    if annotation is Any:
        return ["any"]
    return [_limits(annotation.__name__, metadata)]


def _type_cell(field: FieldInfo) -> str:
    out: list[str] = []
    text = ""
    for piece in _type(field.annotation, field.metadata):
        if isinstance(piece, str):
            text += piece
            continue
        if text:
            out.append(f"`{text}`")
            text = ""
        out.append(_link(piece))
    if text:
        out.append(f"`{text}`")
    return _cell("".join(out))


def _default_cell(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "`{}` (every field at its default)"
    return f"`{_cell(json.dumps(value))}`"


def _models(model: type[BaseModel] = Scenario, path: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """Every model of a scenario file with where it sits, as an error's field path spells it."""
    yield path, model
    for name, field in model.model_fields.items():
        annotation = field.annotation
        origin = get_origin(annotation)
        where = f"{path}.{name}" if path else name
        if origin is dict:
            inner, where = get_args(annotation)[1], f"{where}.<id>"
        elif origin is list:
            inner, where = get_args(annotation)[0], f"{where}.<n>"
        elif origin is Union or origin is types.UnionType:
            inner = next((a for a in get_args(annotation) if _is_model(a)), None)
        else:
            inner = annotation
        if _is_model(inner):
            yield from _models(inner, where)


def _section(path: str, model: type[BaseModel]) -> str:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if not field.description:
            raise ValueError(f"{model.__name__}.{name} has no docstring: document it in agents/scenario.py")
        cells = [f"`{name}`", _type_cell(field), _default_cell(field), _cell(field.description)]
        rows.append(f"| {' | '.join(cells)} |")
    where = f"`{path}`" if path else "the top level of the file"
    doc = " ".join((model.__doc__ or "").split())
    return "\n".join(
        [
            f'<a id="{_anchor(model)}"></a>',
            f"### {model.__name__}",
            "",
            f"At {where}. {doc}",
            "",
            *rows,
            "",
        ]
    )


# examples and error messages -------------------------------------------------------------------


def _validate_cli(text: str, name: str) -> tuple[str, int]:
    """What ``flowloom validate NAME`` prints for a file holding `text`, and its exit code.

    It runs the command itself, so the page shows exactly what users see.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        out = io.StringIO()
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            code = flowloom(["validate", str(path)])
        return out.getvalue().replace(f"{tmp}/", ""), code


def _load_error(text: str | None, name: str = "example.yaml") -> str:
    """The `ScenarioError` message for a file holding `text` (None: no file); fails if it loads."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        if text is not None:
            path.write_text(text)
        try:
            load_scenario(path)
        except ScenarioError as exc:
            return str(exc).replace(f"{tmp}/", "")
    raise ValueError(f"expected {name} to be invalid:\n{text}")


def _check_example() -> Scenario:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minimal.yaml"
        path.write_text(EXAMPLE)
        return load_scenario(path)


def _defaults_written_out(scenario: Scenario) -> str:
    text = yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False, width=100)
    if Scenario.model_validate(yaml.safe_load(text)) != scenario:
        raise ValueError("the example with its defaults written out is not the same scenario")
    return text


def _cross_check_rows() -> list[str]:
    rows = ["| rule | what breaking it in the example above gives |", "|---|---|"]
    for rule, mutate in _cross_checks():
        data = copy.deepcopy(yaml.safe_load(EXAMPLE))
        mutate(data)
        message = _load_error(yaml.safe_dump(data, sort_keys=False))
        rows.append(f"| {_cell(rule)} | `{_cell(message)}` |")
    return rows


def _fault_rows() -> list[str]:
    actions = list(get_args(Fault.model_fields["action"].annotation))
    if sorted(actions) != sorted(_FAULT_ACTIONS):
        raise ValueError(f"fault actions {actions} and the page's {sorted(_FAULT_ACTIONS)} differ")
    rows = ["| action | uses | what happens in an in-process run |", "|---|---|---|"]
    rows += [f"| `{a}` | {_FAULT_ACTIONS[a][0]} | {_cell(_FAULT_ACTIONS[a][1])} |" for a in actions]
    return rows


def _task_kinds() -> str:
    doc = builtin.__doc__ or ""
    kinds = doc[doc.index("- ``echo``") :].strip().replace("``", "`")
    return (
        "\nThe task kinds every node can run (installed backends add theirs, as `flowloom.executors` "
        f"entry points):\n\n{kinds}\n"
    )


def _summary(model: type[BaseModel]) -> str:
    return _cell((model.__doc__ or "").strip().split("\n")[0])


def _orchestrator_default(name: str) -> Any:
    return inspect.signature(Orchestrator.__init__).parameters[name].default


# the page --------------------------------------------------------------------------------------


def render() -> str:
    """The full text of docs/scenarios.md."""
    example = _check_example()
    models = list(_models())
    broken_output, broken_code = _validate_cli(_BROKEN, "broken.yaml")
    if broken_code != 2:
        raise ValueError(f"flowloom validate exited {broken_code} on the broken example, not 2")
    layout = [
        "| where | model | what |",
        "|---|---|---|",
        *[f"| {f'`{p}`' if p else 'top level'} | {_link(m)} | {_summary(m)} |" for p, m in models],
    ]
    not_yaml, broken = "name: broken\nnodes: {edge-1: {tier: edge}\n", "broken.yaml"
    backoff = _orchestrator_default("retry_backoff_s")
    backoff_max = _orchestrator_default("retry_backoff_max_s")
    parts = [
        "# Scenario files",
        "",
        "<!-- Generated by `python -m agents.scenario_doc > docs/scenarios.md` (or `make docs`). "
        "Do not edit: tests/agents/test_scenario_doc.py fails when this page and the code disagree. -->",
        "",
        "A scenario is one YAML file: the machines (`nodes`), the emulated network between them "
        "(`links`), the work to run (`workload`), the faults to inject while it runs (`faults`) and "
        "what must hold at the end (`expect`). The field tables below are generated from the "
        "pydantic models in `agents/scenario.py`, so they are the schema.",
        "",
        "```sh",
        "flowloom validate FILE   # check the file: exit code 0, or 2 with every problem listed",
        "flowloom run FILE        # validate, run in-process, print the report (--report FILE: as JSON)",
        "```",
        "",
        "`flowloom run` exits with 0 when every expectation holds, 1 when one does not, and 2 when "
        "the file is invalid.",
        "",
        "## Layout",
        "",
        *layout,
        "",
        "Field paths are written the way error messages spell them: `<id>` is a key of a mapping "
        "(a node id), `<n>` a list index counted from 0, so `workload.tasks.2.retries` is the "
        "`retries` of the third task.",
        "",
        "- Every model is closed: a key its table does not list is an error, so a typo is never "
        "ignored. The free maps (`nodes`, `params`, `inputs`, `labels`, `outputs`) take any keys.",
        "- Units are in the names: `_s` seconds, `_ms` milliseconds, `_mb` MiB, `_mbps` Mbit/s.",
        '- Values are converted when nothing is lost: `4`, `4.0` and `"4"` are all the integer 4, '
        "`yes` and `true` are true; `4.5` is not an integer and `4GB` not a number.",
        '- Label values are strings: write `{gpu: "true"}` or `{gen: "3"}`, since YAML reads '
        "unquoted `true` and `3` as a boolean and a number.",
        "- `{...}` and `[...]` (YAML flow style) keep one node, link, task or fault per line.",
        "",
        "## A complete example",
        "",
        "It uses every section; `flowloom run` passes it (tests/agents/test_scenario_doc.py runs it). "
        "[scenarios/quickstart.yaml](../scenarios/quickstart.yaml) is a bigger one.",
        "",
        "```yaml",
        EXAMPLE.rstrip("\n"),
        "```",
        "",
        "<details><summary>The same scenario with every default written out</summary>",
        "",
        "```yaml",
        _defaults_written_out(example).rstrip("\n"),
        "```",
        "",
        "</details>",
        "",
        "## Fields",
        "",
        *[_section(p, m) + (_task_kinds() if m is WorkloadTask else "") for p, m in models],
        "## What a run does with it",
        "",
        "`flowloom run` starts every node of `nodes` and an orchestrator in one process, on an "
        "in-process fabric, builds the job from `workload`, injects `faults` at their times and "
        "checks `expect` when the job is over.",
        "",
        "### Nodes and links",
        "",
        "Each node announces its tier, cores, memory, segment, reachability (`nat: true` is "
        "`nat`, otherwise `public`), labels, and every task kind it has an executor for. It runs at "
        "most `cores` tasks at once; the rest wait on the node in arrival order.",
        "",
        "Segments are networks. A node reaches the nodes of its own segments and every public node; "
        "a node behind NAT (`nat: true`) in another segment is reached only through a relay "
        "(`relay: true`), a node that joins several segments (`segments: [home, dc]`) and passes "
        "messages on. In-process the hub enforces these rules; against daemons a segment is a "
        "broker and a relay is `flowloom node --relay` with a `--broker` per segment. Messages take "
        "the cheapest route (a direct one whenever it exists); when a relay dies they move to "
        "another. `flowloom validate` refuses a file where a node and the orchestrator cannot reach "
        "each other. The report's `routes` lists the routes through relays at the end of the run, "
        "the figures `relayed_envelopes`, `relayed_blobs` and `relay_forwarded` count the relayed "
        "traffic, and a trace marks each task sent or answered through a relay (`via edge-1`). "
        "See `scenarios/nat_relay.yaml`.",
        "",
        "A link is directed and emulated by its sending node; `symmetric: true` (the default) also "
        "emulates the reverse direction with the same figures. When several entries cover one "
        "direction, the first one in the file counts. Task traffic (assignments with their inputs, "
        "results, heartbeats) goes between the orchestrator and the nodes; in-process the "
        "orchestrator runs beside one node (`orchestrator`, by default the first cloud node), so "
        "its messages to another node take the links between those two nodes, and share their "
        "partitions. Links also count in placement, where moving a task's inputs from the node that "
        "produced them to a candidate node is estimated at `bytes x 8 / bandwidth + latency` "
        "(`loss` does not enter the estimate). Against node daemons (`--broker`) links count in "
        "placement only: the network between the daemons is real.",
        "",
        "### Tasks",
        "",
        "- A task is ready when every task in its `inputs` and `after` is done; each input's result is "
        "passed to the executor under the input's name. A task that fails for good makes everything "
        "downstream of it `skipped`.",
        "- A ready task goes to the alive node that can run it at the least estimated cost (queue wait, "
        "expected compute time learned from earlier results, input transfer). A node can run it when "
        "it has an executor for `kind`, and matches `tier`, `node` and every one of `labels` that are "
        "set, and offers at least the task's `cores` and `memory_mb` (a check, not a reservation).",
        "- A task no alive node can run (an unknown kind, constraints nothing matches, its pinned node "
        "dead) waits until a node that fits joins, or `workload.timeout_s` ends the job.",
        "- A failed attempt (the executor raised, or the attempt ran past `timeout_s` and was "
        "cancelled) is retried up to `retries` times, after a jittered exponential backoff starting at "
        f"{backoff:g} s and capped at {backoff_max:g} s; a failure the node marks as not retryable (a "
        "result that cannot travel on the wire, say) fails the task at once. A task reassigned "
        "because its node died or handed it back does not use a retry.",
        f"- A straggler, running {_orchestrator_default('speculate_after'):g} times longer than tasks "
        f"of its kind took on average so far (and at least {_orchestrator_default('speculate_min_s'):g} "
        "s), gets a second copy on another node with a free slot; the first result wins and the "
        "other copy is cancelled.",
        "- An executor may grow the job while it runs (`escalate` adds a task); added tasks are part "
        "of the job like the others.",
        "- `generate` adds `count` independent tasks named `request-0`, `request-1`, ... of its `kind` "
        "and `params`, without constraints, retries or timeout.",
        "- When `workload.timeout_s` has passed, every task that has not finished is cancelled; the run "
        "still reports.",
        "",
        "### Faults",
        "",
        "Faults are applied in `at_s` order (file order for equal times), `at_s` seconds after the run "
        "starts; starting the nodes takes a few milliseconds in-process, so that is also about when the "
        "job starts. A fault still pending when the job ends is never applied, and the report lists it "
        "as `not injected, the job had ended`. Each applied fault is "
        "listed in the report with the time it was applied and what was done. `peer` and `factor` are "
        "ignored by the actions that do not use them.",
        "",
        *_fault_rows(),
        "",
        "### Expectations",
        "",
        "When the job is over, each expectation that is set becomes a check in the report; the run "
        "passes when every check passes (with none set, it passes).",
        "",
        '- `all_done` (on unless set to `false`), check "every task done": every task of the job ended '
        "`done`, counting generated requests and tasks added while the job ran. A task that failed, "
        "was skipped or was cancelled (by the timeout, say) fails it.",
        '- `min_reassigned` (checked when above 0), check "tasks reassigned off a lost node": at least '
        "this many times a task was taken off a node and given to another because the node died or "
        "left while running it, or handed it back while shutting down. Retries after failures do not "
        "count.",
        '- `outputs`, one check "output of <id>" per entry: the task\'s result must equal the given '
        "value. The result is compared as JSON-like data: numpy arrays as `{tensor: [shape...], "
        "dtype: name}`, bytes as `{bytes: length}`, tuples as lists; numbers compare by value (`2` "
        "equals `2.0`) and mappings whatever their key order. A task that did not finish has no "
        "result, and fails the check (`task is failed`, say).",
        "",
        "## Validation errors",
        "",
        "`flowloom validate` and `flowloom run` read the whole file before anything runs. When it is "
        "invalid they print `error: ` and then one line per problem, `<file>: <field path>: "
        "<message>`, and exit with code 2. For this file",
        "",
        "```yaml invalid",
        _BROKEN.rstrip("\n"),
        "```",
        "",
        "`flowloom validate broken.yaml` prints (on stderr)",
        "",
        "```text",
        broken_output.rstrip("\n"),
        "```",
        "",
        "Checking happens in two rounds. First every field is checked against the tables above, and "
        "every problem found is listed. Only when the fields are right are the names checked: that "
        "what refers to a node or a task names one that exists. This round stops at the first "
        "problem, so fix it and validate again. The rules, and what breaking each one in the "
        "complete example gives:",
        "",
        *_cross_check_rows(),
        "",
        "Files that cannot be read as a scenario at all:",
        "",
        f"- not YAML, with the line and column where reading failed: `{_load_error(not_yaml, broken)}`",
        f"- YAML that is not a mapping: `{_load_error('- edge-1' + chr(10), broken)}`",
        f"- a file that cannot be read: `{_load_error(None, 'missing.yaml')}`",
        "",
        "### Not checked yet",
        "",
        "This passes `flowloom validate` and only shows when the scenario runs:",
        "",
        "- A task of a kind no node has an executor for waits until `workload.timeout_s` cancels it "
        "(which executors a node has is known only once it runs: backends are plugins).",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
