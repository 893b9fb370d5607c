"""docs/scenarios.md is generated from the scenario models and must not drift from them."""

import re
from pathlib import Path
from typing import get_args

import pytest

from agents.errors import ScenarioError
from agents.runner import run_scenario
from agents.scenario import (
    Expectations,
    Fault,
    Generator,
    Link,
    NodeSpec,
    Scenario,
    Workload,
    WorkloadTask,
    load_scenario,
)
from agents.scenario_doc import EXAMPLE, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "scenarios.md"
BLOCK = re.compile(r"^```(yaml|yaml invalid)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(kind: str) -> list[str]:
    return [text for info, text in BLOCK.findall(DOC.read_text()) if info == kind]


def load(text: str, tmp_path: Path, name: str = "example.yaml") -> Scenario:
    path = tmp_path / name
    path.write_text(text)
    return load_scenario(path)


def test_scenarios_page_matches_the_code() -> None:
    assert DOC.read_text() == render(), "docs/scenarios.md is stale: run `make docs` and commit it"


def test_every_yaml_example_on_the_page_is_a_valid_scenario(tmp_path: Path) -> None:
    examples = blocks("yaml")
    assert len(examples) >= 2  # the complete example, and it again with every default written out
    assert examples[0] == EXAMPLE
    loaded = [load(text, tmp_path, f"example-{i}.yaml") for i, text in enumerate(examples)]
    assert loaded[1] == loaded[0]  # writing the defaults out changes nothing


def test_every_invalid_example_on_the_page_is_refused(tmp_path: Path) -> None:
    broken = blocks("yaml invalid")
    assert broken
    for text in broken:
        with pytest.raises(ScenarioError, match=r"broken\.yaml: \w"):
            load(text, tmp_path, "broken.yaml")


def test_every_field_and_fault_action_is_on_the_page() -> None:
    text = DOC.read_text()
    every = {Expectations, Fault, Generator, Link, NodeSpec, Scenario, Workload, WorkloadTask}
    seen, todo = set(), [Scenario]
    while todo:  # every model reachable from Scenario, as the generator walks them
        model = todo.pop()
        seen.add(model)
        section = text.split(f'<a id="{model.__name__.lower()}"></a>')[1].split("<a id=")[0]
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            assert f"| `{name}` |" in section, f"{model.__name__}.{name} is not in its table"
            todo += [m for m in (field.annotation, *get_args(field.annotation)) if m in every]
    assert seen == every
    for action in get_args(Fault.model_fields["action"].annotation):
        assert f"| `{action}` |" in text


async def test_the_complete_example_runs_and_passes(tmp_path: Path) -> None:
    scenario = load(blocks("yaml")[0], tmp_path)
    report, _ = await run_scenario(scenario)
    assert report.ok, report.expectations
    assert [f.kind for f in report.faults] == ["kill_node", "restart_node"]
