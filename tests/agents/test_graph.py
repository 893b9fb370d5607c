"""A job's task DAG: readiness as tasks finish, failure and cancellation, atomic patches."""

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.errors import PatchRejected
from agents.graph import FINISHED, TaskGraph
from protocol import AddEdge, AddTask, PatchOp, Placement, RemoveEdge, RemoveTask, TaskSpec, UpdateTask


def spec(task_id: str, kind: str = "echo", **inputs: str) -> TaskSpec:
    return TaskSpec(id=task_id, kind=kind, inputs=inputs)


def diamond_specs() -> list[TaskSpec]:
    """a feeds b and c; d takes both."""
    return [spec("a"), spec("b", x="a"), spec("c", x="a"), spec("d", left="b", right="c")]


def diamond() -> TaskGraph:
    return TaskGraph("job", diamond_specs())


def run(graph: TaskGraph, task_id: str, result: Any = None, node: str = "n1") -> list[str]:
    graph.mark_running(task_id, node)
    return graph.mark_done(task_id, result)


def drive(graph: TaskGraph) -> int:
    """Run every ready task until none is left; return how many ran."""
    ran = 0
    while ready := graph.ready():
        for task_id in ready:
            run(graph, task_id, ran)
            ran += 1
    return ran


def states(graph: TaskGraph) -> dict[str, str]:
    return {task_id: graph.task(task_id).state for task_id in graph.graph}


def snapshot(graph: TaskGraph) -> tuple[object, ...]:
    """Everything a rejected patch must leave as it was, orders and Task identities included."""
    tasks = [
        (t, id(task), task.state, task.spec, task.attempts, task.node, task.result, task.error)
        for t in graph.graph
        for task in [graph.task(t)]
    ]
    preds = {t: list(graph.graph.predecessors(t)) for t in graph.graph}
    return tasks, list(graph.graph.edges), preds, graph.ready(), graph.counts(), graph.finished()


def check_consistent(graph: TaskGraph) -> None:
    """States, ready set and counts agree with what the edges say."""
    assert set(graph.order()) == set(graph.graph)  # acyclic
    for task_id in graph.graph:
        task = graph.task(task_id)
        ups = [graph.task(up).state for up in graph.graph.predecessors(task_id)]
        assert set(task.spec.inputs.values()) <= set(graph.graph.predecessors(task_id))
        if task.state in ("pending", "ready"):
            assert not any(s in ("failed", "cancelled", "skipped") for s in ups), task_id
            assert (task.state == "ready") == all(s == "done" for s in ups), task_id
    assert set(graph.ready()) == {t for t, s in states(graph).items() if s == "ready"}
    assert len(graph.ready()) == len(set(graph.ready()))
    expected = dict.fromkeys(graph.counts(), 0)
    for state in states(graph).values():
        expected[state] += 1
    assert graph.counts() == expected
    assert graph.finished() == all(s in FINISHED for s in states(graph).values())


# running a graph -----------------------------------------------------------------------------


def test_a_diamond_becomes_ready_as_its_tasks_finish() -> None:
    g = diamond()
    assert g.ready() == ["a"]
    assert states(g) == {"a": "ready", "b": "pending", "c": "pending", "d": "pending"}

    assert run(g, "a", 1) == ["b", "c"]
    assert g.ready() == ["b", "c"]
    assert run(g, "c", 3) == []  # d still waits for b
    assert g.task("d").state == "pending"
    assert run(g, "b", 2) == ["d"]
    assert g.inputs_of("d") == {"left": 2, "right": 3}
    assert run(g, "d", 5) == []
    assert g.finished()
    assert g.counts() == {
        "pending": 0,
        "ready": 0,
        "running": 0,
        "done": 4,
        "failed": 0,
        "cancelled": 0,
        "skipped": 0,
    }
    assert g.order()[0] == "a" and g.order()[-1] == "d"


def test_inputs_of_gives_each_input_the_result_of_the_task_it_names() -> None:
    g = TaskGraph("job", [spec("x"), spec("y"), spec("sum", "sum", first="x", second="y", again="x")])
    run(g, "x", [1, 2])
    run(g, "y", {"v": 3})
    assert g.inputs_of("sum") == {"first": [1, 2], "second": {"v": 3}, "again": [1, 2]}
    assert g.inputs_of("x") == {}


def test_specs_may_name_tasks_listed_later_and_explicit_edges_order_tasks() -> None:
    g = TaskGraph("job", [spec("late", x="early"), spec("early"), spec("free")], edges=[("free", "early")])
    assert g.ready() == ["free"]
    assert run(g, "free") == ["early"]
    assert run(g, "early", 7) == ["late"]
    assert g.inputs_of("late") == {"x": 7}
    assert len(g) == 3 and "late" in g and "nope" not in g


def test_a_failed_task_skips_everything_downstream_and_only_that() -> None:
    # a -> b -> d -> e, a -> c -> f: b fails, so d and e can never run; c and f carry on.
    tasks = [
        spec("a"),
        spec("b", x="a"),
        spec("c", x="a"),
        spec("d", x="b"),
        spec("e", x="d"),
        spec("f", x="c"),
    ]
    g = TaskGraph("job", tasks)
    run(g, "a")
    g.mark_running("b", "n1")
    assert g.mark_failed("b", "out of memory") == ["d", "e"]
    assert states(g) == {
        "a": "done",
        "b": "failed",
        "c": "ready",
        "d": "skipped",
        "e": "skipped",
        "f": "pending",
    }
    assert g.task("b").error == "out of memory"
    assert not g.finished()
    assert drive(g) == 2
    assert g.finished()
    assert g.counts()["done"] == 3 and g.counts()["skipped"] == 2 and g.counts()["failed"] == 1


def test_a_task_that_waits_on_a_failed_and_a_done_task_is_skipped_once_both_are_known() -> None:
    g = diamond()
    run(g, "a")
    g.mark_running("b", "n1")
    g.mark_running("c", "n2")
    assert g.mark_failed("b", "boom") == ["d"]
    assert g.mark_done("c", None) == []  # d stays skipped although its last upstream task is now done
    assert g.task("d").state == "skipped"
    assert g.finished()


def test_a_pending_task_can_fail_without_running() -> None:
    g = diamond()
    assert g.mark_failed("d", "no node can run it") == []
    assert g.task("d").state == "failed"
    assert drive(g) == 3


def test_cancelling_a_task_skips_what_waits_on_it() -> None:
    g = diamond()
    run(g, "a")
    g.mark_running("b", "n1")
    assert g.mark_cancelled("b", "user asked") == ["d"]
    assert g.task("b").state == "cancelled" and g.task("b").error == "user asked"
    assert g.mark_cancelled("c", "user asked") == []  # a ready task; d is already skipped
    assert g.ready() == []
    assert g.finished()
    with pytest.raises(ValueError, match="cannot mark task b cancelled: it is cancelled"):
        g.mark_cancelled("b", "again")


def test_reset_puts_a_running_task_back_to_ready_and_keeps_its_attempts() -> None:
    g = TaskGraph("job", [spec("a"), spec("b")])
    g.mark_running("a", "n1")
    assert g.task("a").attempts == 1 and g.task("a").node == "n1"
    assert g.ready() == ["b"]
    g.reset("a")
    task = g.task("a")
    assert (task.state, task.node, task.attempts) == ("ready", None, 1)
    assert g.ready() == ["b", "a"]  # a retry queues behind tasks that were already waiting
    g.mark_running("a", "n2")
    assert (g.task("a").attempts, g.task("a").node) == (2, "n2")
    with pytest.raises(ValueError, match="cannot mark task b ready: it is ready, not running"):
        g.reset("b")


def test_illegal_transitions_name_the_task_and_its_state() -> None:
    g = diamond()
    with pytest.raises(ValueError, match="cannot mark task a done: it is ready, not running"):
        g.mark_done("a", 1)
    with pytest.raises(ValueError, match="cannot mark task b running: it is pending, not ready"):
        g.mark_running("b", "n1")
    run(g, "a", 1)
    with pytest.raises(ValueError, match="cannot mark task a failed: it is done"):
        g.mark_failed("a", "late failure")
    with pytest.raises(ValueError, match="cannot mark task a running: it is done"):
        g.mark_running("a", "n1")
    assert states(g)["a"] == "done"


def test_a_second_completion_of_a_task_is_refused() -> None:
    g = diamond()
    run(g, "a", "first")
    with pytest.raises(ValueError, match="cannot mark task a done: it is done, not running"):
        g.mark_done("a", "second")
    assert g.task("a").result == "first"
    assert g.ready() == ["b", "c"]  # b and c were released once, not twice
    run(g, "b")
    assert g.task("d").state == "pending"


def test_an_unknown_task_is_a_key_error_naming_the_job() -> None:
    g = diamond()
    with pytest.raises(KeyError, match="job job has no task 'zz'"):
        g.task("zz")
    with pytest.raises(KeyError):
        g.mark_running("zz", "n1")


# building a graph ----------------------------------------------------------------------------


def test_building_with_a_cycle_is_refused_naming_the_cycle() -> None:
    with pytest.raises(PatchRejected, match=r"op 2 \(add_task\): it would make a cycle: ") as exc:
        TaskGraph("job", [spec("t1", x="t3"), spec("t2"), spec("t3", x="t1")])
    assert "t1 -> t3 -> t1" in str(exc.value) or "t3 -> t1 -> t3" in str(exc.value)
    assert exc.value.index == 2

    with pytest.raises(PatchRejected, match=r"op 2 \(add_edge\): it would make a cycle: ") as exc:
        TaskGraph("job", [spec("a"), spec("b", x="a")], edges=[("b", "a")])
    assert str(exc.value).endswith(("a -> b -> a", "b -> a -> b"))
    assert exc.value.op == AddEdge(src="b", dst="a")

    with pytest.raises(PatchRejected, match="it would make a cycle: s -> s"):
        TaskGraph("job", [spec("s", x="s")])


def test_building_with_an_unknown_input_or_a_duplicate_id_is_refused() -> None:
    with pytest.raises(PatchRejected, match=r"op 1 .*task b takes input x from unknown task nope"):
        TaskGraph("job", [spec("a"), spec("b", x="nope")])
    with pytest.raises(PatchRejected, match=r"op 1 .*task a already exists") as exc:
        TaskGraph("job", [spec("a"), spec("a", "sum")])
    assert exc.value.op == AddTask(task=spec("a", "sum"))
    with pytest.raises(PatchRejected, match=r"op 1 \(add_edge\): no task ghost"):
        TaskGraph("job", [spec("a")], edges=[("ghost", "a")])


# patches -------------------------------------------------------------------------------------


def test_tasks_added_after_a_done_task_are_ready_at_once() -> None:
    g = diamond()
    run(g, "a", 10)
    g.apply([AddTask(task=spec("more", x="a")), AddTask(task=spec("also"), after=["a"])])
    assert g.ready() == ["b", "c", "more", "also"]
    run(g, "more")
    assert g.inputs_of("more") == {"x": 10}


def test_tasks_added_below_a_running_task_wait_for_it() -> None:
    g = diamond()
    run(g, "a")
    g.mark_running("b", "n1")
    g.apply([AddTask(task=spec("check", x="b")), AddTask(task=spec("report", x="check"))])
    assert g.task("check").state == "pending" and g.task("report").state == "pending"
    assert g.mark_done("b", "text") == ["check"]
    assert run(g, "check") == ["report"]


def test_a_task_added_after_a_failed_task_is_skipped_at_once() -> None:
    g = diamond()
    g.mark_failed("a", "gone")
    g.apply([AddTask(task=spec("late", x="d")), AddTask(task=spec("free"))])
    assert g.task("late").state == "skipped"
    assert g.ready() == ["free"]


def test_an_edge_from_a_failed_task_skips_the_task_and_its_downstream() -> None:
    g = TaskGraph("job", [spec("bad"), spec("x"), spec("y", x="x")])
    g.mark_failed("bad", "no")
    g.apply([AddEdge(src="bad", dst="x")])
    assert states(g) == {"bad": "failed", "x": "skipped", "y": "skipped"}
    assert g.finished()
    check_consistent(g)


def test_removing_a_task_or_an_ordering_edge_can_release_what_waited() -> None:
    g = TaskGraph(
        "job", [spec("slow"), spec("gate"), spec("work")], edges=[("slow", "work"), ("gate", "work")]
    )
    g.apply([RemoveTask(task="slow")])
    assert "slow" not in g and g.task("work").state == "pending"
    g.apply([RemoveEdge(src="gate", dst="work")])
    assert g.ready() == ["gate", "work"]
    check_consistent(g)


def test_an_edge_to_a_ready_task_makes_it_wait_again() -> None:
    g = TaskGraph("job", [spec("a"), spec("b")])
    g.apply([AddEdge(src="a", dst="b")])
    assert g.ready() == ["a"] and g.task("b").state == "pending"
    assert run(g, "a") == ["b"]


def test_update_merges_params_and_replaces_the_fields_it_sets() -> None:
    base = TaskSpec(id="t", kind="llm", params={"model": "small", "temperature": 0.2}, retries=1)
    g = TaskGraph("job", [base])
    task = g.task("t")
    g.apply(
        [
            UpdateTask(task="t", params={"model": "large", "top_p": 0.9}),
            UpdateTask(task="t", placement=Placement(tier="cloud"), timeout_s=30.0),
        ]
    )
    new = g.task("t").spec
    assert new.params == {"model": "large", "temperature": 0.2, "top_p": 0.9}
    assert new.placement == Placement(tier="cloud")
    assert (new.timeout_s, new.retries, new.kind) == (30.0, 1, "llm")
    assert g.task("t") is task and task.state == "ready"
    assert base.params == {"model": "small", "temperature": 0.2}  # specs are values, never edited


def test_update_with_a_bad_value_is_rejected() -> None:
    g = diamond()
    bad = UpdateTask.model_construct(task="d", retries=-1)  # as if built without validation
    with pytest.raises(
        PatchRejected, match=r"op 0 .*task d: retries: Input should be greater than or equal to 0"
    ):
        g.apply([bad])
    assert g.task("d").spec.retries == 0


def test_a_task_removed_and_added_again_in_one_patch_is_a_new_task() -> None:
    g = diamond()
    old = g.task("d")
    g.apply([RemoveTask(task="d"), AddTask(task=spec("d", "sum", only="a"))])
    assert g.task("d") is not old and g.task("d").spec.kind == "sum"
    assert list(g.graph.predecessors("d")) == ["a"]
    assert run(g, "a", 4) == ["b", "c", "d"]
    assert g.inputs_of("d") == {"only": 4}
    check_consistent(g)


def test_an_edge_added_in_a_patch_counts_for_later_cycle_checks() -> None:
    g = TaskGraph("job", [spec("p"), spec("q"), spec("r")])
    with pytest.raises(PatchRejected, match=r"op 2 \(add_edge\): it would make a cycle: p -> q -> r -> p"):
        g.apply([AddEdge(src="p", dst="q"), AddEdge(src="q", dst="r"), AddEdge(src="r", dst="p")])
    # ...and an edge removed earlier in the same patch no longer does.
    g.apply([AddEdge(src="p", dst="q"), RemoveEdge(src="p", dst="q"), AddEdge(src="q", dst="p")])
    assert list(g.graph.edges) == [("q", "p")]


def test_a_cycle_through_a_task_with_many_outputs_is_found() -> None:
    # The search for a way back from d meets many dead ends before the one through m.
    wide = [spec(f"w{i}", x="d") for i in range(20)]
    g = TaskGraph("job", [spec("d"), *wide, spec("m", x="d"), spec("s", x="m")])
    with pytest.raises(PatchRejected, match="it would make a cycle: d -> m -> s -> d"):
        g.apply([AddEdge(src="s", dst="d")])
    with pytest.raises(PatchRejected, match="it would make a cycle: w3 -> s -> w3"):
        g.apply([AddEdge(src="w3", dst="s"), AddEdge(src="s", dst="w3")])


def test_a_cycle_through_a_task_with_many_inputs_is_found() -> None:
    # The search for a way forward to s meets many side inputs before the one from d's chain.
    many = {f"i{k}": f"w{k}" for k in range(20)}
    tasks = [spec("d"), spec("p1", x="d"), spec("p2", x="p1"), *(spec(f"w{k}") for k in range(20))]
    g = TaskGraph("job", [*tasks, spec("s", **many, last="p2")])
    with pytest.raises(PatchRejected, match="it would make a cycle: d -> p1 -> p2 -> s -> d"):
        g.apply([AddEdge(src="s", dst="d")])


def test_removing_and_restoring_an_edge_in_one_patch_changes_nothing() -> None:
    g = TaskGraph(
        "job", [spec("a"), spec("b"), spec("c"), spec("d")], edges=[("a", "d"), ("b", "d"), ("c", "d")]
    )
    before = snapshot(g)
    g.apply([RemoveEdge(src="a", dst="d"), AddEdge(src="a", dst="d")])
    assert snapshot(g) == before


@pytest.fixture
def busy() -> TaskGraph:
    """A diamond under way (a done, b running, c ready, d pending) with an ordering edge c -> e,
    a spare task and a lone one."""
    g = TaskGraph(
        "job",
        [*diamond_specs(), spec("e"), spec("spare"), spec("lone")],
        edges=[("c", "e"), ("lone", "spare")],
    )
    run(g, "a", 1)
    g.mark_running("b", "n1")
    return g


# Ops that are each fine and change the graph in every way a patch can; a rejected patch starts
# with them, so rejecting it must undo all of it.
GOOD_PREFIX: list[PatchOp] = [
    AddTask(task=spec("x", y="c"), after=["lone"]),
    UpdateTask(task="d", params={"k": 2}, retries=3),
    RemoveEdge(src="c", dst="e"),
    AddEdge(src="lone", dst="e"),
    RemoveTask(task="spare"),
    RemoveTask(task="x"),
    AddTask(task=spec("spare", "sum", y="a")),
]

REJECTIONS: list[tuple[PatchOp, str]] = [
    (AddEdge(src="d", dst="c"), "it would make a cycle: c -> d -> c"),
    (AddEdge(src="e", dst="lone"), "it would make a cycle: lone -> e -> lone"),  # lone -> e added above
    (UpdateTask(task="b", retries=2), "task b is running; running and finished tasks cannot be edited"),
    (RemoveTask(task="b"), "task b is running; running and finished tasks cannot be edited"),
    (RemoveTask(task="a"), "task a is done; running and finished tasks cannot be edited"),
    (AddEdge(src="lone", dst="a"), "task a is done; running and finished tasks cannot be edited"),
    (AddEdge(src="lone", dst="b"), "task b is running; running and finished tasks cannot be edited"),
    (RemoveEdge(src="a", dst="b"), "task b is running; running and finished tasks cannot be edited"),
    (AddTask(task=spec("d")), "task d already exists"),
    (AddTask(task=spec("spare")), "task spare already exists"),  # re-added above
    (AddTask(task=spec("n", z="nope")), "task n takes input z from unknown task nope"),
    (AddTask(task=spec("n", z="x")), "task n takes input z from unknown task x"),  # removed above
    (AddTask(task=spec("n"), after=["ghost"]), "task n waits for unknown task ghost"),
    (RemoveTask(task="c"), "task d takes input right from c"),
    (RemoveTask(task="nope"), "no task nope"),
    (AddEdge(src="ghost", dst="d"), "no task ghost"),
    (AddEdge(src="d", dst="ghost"), "no task ghost"),
    (RemoveEdge(src="c", dst="e"), "no edge c -> e"),  # removed above
    (RemoveEdge(src="a", dst="d"), "no edge a -> d"),
    (RemoveEdge(src="c", dst="d"), "task d takes input right from c; that edge cannot be removed"),
    (UpdateTask(task="ghost", retries=1), "no task ghost"),
    (
        UpdateTask.model_construct(task="d", timeout_s=-5.0),
        "task d: timeout_s: Input should be greater than 0",
    ),
]


@pytest.mark.parametrize(("bad", "reason"), REJECTIONS, ids=[reason for _, reason in REJECTIONS])
def test_a_patch_that_breaks_a_rule_is_rejected_whole(busy: TaskGraph, bad: PatchOp, reason: str) -> None:
    before = snapshot(busy)
    with pytest.raises(PatchRejected) as exc:
        busy.apply([*GOOD_PREFIX, bad])
    assert exc.value.index == len(GOOD_PREFIX)
    assert exc.value.op is bad
    assert str(exc.value).startswith(f"patch rejected at op {len(GOOD_PREFIX)} ({bad.op}): ")
    assert reason in str(exc.value)
    assert snapshot(busy) == before
    # The graph still runs as if the patch had never been offered.
    busy.mark_done("b", 2)
    assert drive(busy) == 5
    assert busy.finished() and busy.counts()["done"] == 7


def test_the_good_prefix_alone_is_accepted(busy: TaskGraph) -> None:
    busy.apply(GOOD_PREFIX)
    assert "x" not in busy and busy.task("spare").spec.kind == "sum"
    assert busy.task("d").spec.params == {"k": 2} and busy.task("d").spec.retries == 3
    assert busy.task("spare").state == "ready"  # its only input, a, is done
    assert sorted(busy.graph.predecessors("e")) == ["lone"]
    check_consistent(busy)


# big graphs ----------------------------------------------------------------------------------


def test_a_10000_task_chain_runs_to_the_end() -> None:
    n = 10_000
    g = TaskGraph("job", [spec("t0"), *(spec(f"t{i}", prev=f"t{i - 1}") for i in range(1, n))])
    assert g.ready() == ["t0"]
    assert drive(g) == n
    assert g.finished()
    assert g.counts()["done"] == n and sum(g.counts().values()) == n
    assert g.inputs_of(f"t{n - 1}") == {"prev": n - 2}  # drive() passes the run number as result


def test_a_10000_wide_fan_out_and_in_runs_to_the_end() -> None:
    n = 10_000
    leaves = [spec(f"leaf{i}", src="root") for i in range(n)]
    g = TaskGraph(
        "job", [spec("root"), *leaves, spec("join")], edges=[(f"leaf{i}", "join") for i in range(n)]
    )
    assert run(g, "root") == [f"leaf{i}" for i in range(n)]
    for i in range(n - 1):
        run(g, f"leaf{i}")
    assert g.ready() == [f"leaf{n - 1}"]  # join waits for the very last leaf
    assert run(g, f"leaf{n - 1}") == ["join"]
    run(g, "join")
    assert g.finished() and g.counts()["done"] == n + 2


def test_a_small_patch_on_a_big_graph_and_a_failure_at_its_root() -> None:
    n = 10_000
    g = TaskGraph("job", [spec("t0"), *(spec(f"t{i}", prev=f"t{i - 1}") for i in range(1, n))])
    with pytest.raises(PatchRejected, match=r"cycle: t0 -> t1 -> .* -> t9999 -> t0"):
        g.apply([AddTask(task=spec("extra")), AddEdge(src=f"t{n - 1}", dst="t0")])
    g.apply([AddTask(task=spec("side", x="t0")), AddEdge(src="side", dst=f"t{n - 1}")])
    assert len(g) == n + 1
    assert len(g.mark_failed("t0", "bad start")) == n
    assert g.finished() and g.counts()["skipped"] == n


# random patches ------------------------------------------------------------------------------

IDS = [f"t{i}" for i in range(8)]


@st.composite
def patch_ops(draw: st.DrawFn) -> PatchOp:
    kind = draw(st.sampled_from(["add", "remove", "add_edge", "remove_edge", "update"]))
    a, b = draw(st.sampled_from(IDS)), draw(st.sampled_from(IDS))
    if kind == "add":
        inputs = draw(st.dictionaries(st.sampled_from(["x", "y"]), st.sampled_from(IDS), max_size=2))
        after = draw(st.lists(st.sampled_from(IDS), max_size=2))
        return AddTask(task=TaskSpec(id=a, kind="echo", inputs=inputs), after=after)
    if kind == "remove":
        return RemoveTask(task=a)
    if kind == "add_edge":
        return AddEdge(src=a, dst=b)
    if kind == "remove_edge":
        return RemoveEdge(src=a, dst=b)
    return UpdateTask(task=a, params={"v": draw(st.integers(0, 3))})


@given(
    steps=st.lists(
        st.tuples(
            st.lists(patch_ops(), min_size=1, max_size=4),
            st.sampled_from(["run", "fail", "cancel", "start", "nothing"]),
        ),
        max_size=12,
    )
)
@settings(max_examples=300, deadline=None)
def test_random_patches_and_events_keep_the_graph_consistent(steps: list[tuple[list[PatchOp], str]]) -> None:
    g = TaskGraph("job", [spec("t0"), spec("t1", x="t0")])
    for ops, event in steps:
        before = snapshot(g)
        try:
            g.apply(ops)
        except PatchRejected:
            assert snapshot(g) == before
        check_consistent(g)
        ready = g.ready()
        running = [t for t, s in states(g).items() if s == "running"]
        if event == "start" and ready:
            g.mark_running(ready[0], "n1")
        elif event == "run" and running:
            g.mark_done(running[0], 1)
        elif event == "fail" and (running or ready):
            g.mark_failed((running or ready)[0], "no")
        elif event == "cancel" and ready:
            g.mark_cancelled(ready[-1], "no")
        check_consistent(g)
    for task_id in [t for t, s in states(g).items() if s == "running"]:
        g.mark_done(task_id, 1)
    drive(g)
    assert g.finished()  # nothing is left waiting for ever
