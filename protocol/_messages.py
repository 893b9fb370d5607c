"""The closed set of message bodies an envelope can carry, discriminated by ``kind``."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from protocol._models import Address, HostPort, NodeId, ShortText, TaskId, WireId, WireModel
from protocol._values import WireValue

__all__ = [
    "MESSAGE_KINDS",
    "AddEdge",
    "AddTask",
    "BlobChunk",
    "BlobRef",
    "Body",
    "Bye",
    "Call",
    "CallResult",
    "Capabilities",
    "Error",
    "ErrorCode",
    "GraphPatch",
    "Heartbeat",
    "Hello",
    "PatchOp",
    "Placement",
    "Relay",
    "RemoveEdge",
    "RemoveTask",
    "Resources",
    "TaskAck",
    "TaskAssign",
    "TaskCancel",
    "TaskFailed",
    "TaskProgress",
    "TaskResult",
    "TaskSpec",
    "UpdateTask",
    "Welcome",
]

Tier = Literal["device", "edge", "cloud"]
Reachability = Literal["public", "nat"]


class Capabilities(WireModel):
    """What a node is and what it can run; announced in `hello` and `welcome`."""

    tier: Tier
    """Where the node sits: a device, an edge box or a cloud machine."""
    cores: int = Field(ge=1)
    """CPU cores the node offers to tasks."""
    memory_mb: int = Field(ge=0)
    """Memory the node offers to tasks, in MiB."""
    accelerators: list[str] = Field(default_factory=list)
    """Accelerator names, e.g. ``["cuda:0"]``; empty on CPU-only nodes."""
    task_kinds: list[str] = Field(default_factory=list)
    """Task kinds the node has executors for."""
    models: list[str] = Field(default_factory=list)
    """Model names the node can load."""
    segment: str = "default"
    """The network segment (on MQTT: the broker) the node is joined to."""
    reachability: Reachability = "public"
    """``public``: reachable from other segments; ``nat``: dials out only."""
    relay: bool = False
    """True when the node forwards envelopes between the segments it joins."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Free key/value labels that placement constraints can match."""


class Hello(WireModel):
    """First message of a node joining a fabric; answered by `welcome` or an `error`."""

    WIRE_OMIT_NONE = frozenset({"bulk"})

    kind: Literal["hello"] = "hello"
    versions: list[int] = Field(min_length=1)
    """Protocol versions the sender can speak."""
    capabilities: Capabilities
    """What the sender is and can run."""
    bulk: HostPort | None = None
    """Where this node accepts direct bulk streams (see `blob.ref`); absent: send it chunks only.
    Host labels of 1-63 characters (at most 253 in all) or an IPv6 address in brackets; port 1-65535."""


class Welcome(WireModel):
    """Accepts a `hello`: the version both sides will speak and the welcomer's own capabilities."""

    kind: Literal["welcome"] = "welcome"
    version: int = Field(ge=1)
    """The highest version present in both sides' lists."""
    heartbeat_s: float = Field(gt=0)
    """Interval at which the joining node must send heartbeats, in seconds."""
    capabilities: Capabilities | None = None
    """The welcomer's capabilities, when it is a node that runs tasks."""


class Heartbeat(WireModel):
    """Periodic liveness and load report of a node."""

    WIRE_OMIT_NONE = frozenset({"links"})

    kind: Literal["heartbeat"] = "heartbeat"
    seq: int = Field(ge=0)
    """Increases by one with every heartbeat of a node's life."""
    running: int = Field(default=0, ge=0)
    """Tasks the node is running now."""
    queued: int = Field(default=0, ge=0)
    """Tasks the node has accepted but not started."""
    load: float = Field(default=0.0, ge=0)
    """One-minute load average divided by cores."""
    links: dict[NodeId, float] | None = Field(default=None, max_length=1024)
    """Sent by relays only: each node the relay can send to directly, with the measured one-way
    delay of that link in milliseconds (arrival minus sender time: negative when the clocks
    differ by more than the delay). Other nodes route through the relay on these links."""


class Bye(WireModel):
    """A node leaves the fabric on purpose."""

    kind: Literal["bye"] = "bye"
    reason: ShortText = ""
    """Why the node leaves, for people."""


class Resources(WireModel):
    """What a task needs from the node that runs it."""

    cores: float = Field(default=1.0, ge=0)
    """CPU cores the task occupies."""
    memory_mb: int = Field(default=0, ge=0)
    """Memory the task needs, in MiB."""
    accelerators: list[str] = Field(default_factory=list)
    """Accelerator kinds the task needs, e.g. ``["cuda"]``."""


class Placement(WireModel):
    """Where a task may run; every field that is set must match."""

    tier: Tier | None = None
    """Only nodes of this tier."""
    node: NodeId | None = None
    """Only this node."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Only nodes carrying all of these labels."""


class TaskSpec(WireModel):
    """One task of a job's graph, as scenario files, patches and the API describe it."""

    id: TaskId
    """Unique within the job."""
    kind: str = Field(min_length=1, max_length=128)
    """The task kind; a node runs it with the executor registered for that kind."""
    params: dict[str, WireValue] = Field(default_factory=dict)
    """Parameters passed to the executor as they are."""
    inputs: dict[str, TaskId] = Field(default_factory=dict)
    """Input name -> id of the upstream task whose result fills it; each is also a graph edge."""
    needs: Resources = Field(default_factory=Resources)
    """Resources the task occupies while it runs."""
    placement: Placement = Field(default_factory=Placement)
    """Constraints on the node that may run the task."""
    retries: int = Field(default=0, ge=0, le=100)
    """How many times a failed attempt is retried."""
    timeout_s: float | None = Field(default=None, gt=0)
    """Seconds an attempt may run before it is cancelled and counted as failed."""


class AddTask(WireModel):
    """Add a task; `after` lists upstream tasks it waits for besides its inputs."""

    op: Literal["add_task"] = "add_task"
    task: TaskSpec
    """The new task."""
    after: list[TaskId] = Field(default_factory=list)
    """Tasks that must finish before this one starts."""


class RemoveTask(WireModel):
    """Remove a task that has not started, with its edges."""

    op: Literal["remove_task"] = "remove_task"
    task: TaskId
    """The task to remove."""


class AddEdge(WireModel):
    """Make `dst` wait for `src`."""

    op: Literal["add_edge"] = "add_edge"
    src: TaskId
    """The upstream task."""
    dst: TaskId
    """The downstream task; it must not have started."""


class RemoveEdge(WireModel):
    """Stop `dst` waiting for `src`."""

    op: Literal["remove_edge"] = "remove_edge"
    src: TaskId
    """The upstream task."""
    dst: TaskId
    """The downstream task; it must not have started."""


class UpdateTask(WireModel):
    """Change fields of a task that has not started; unset fields stay as they are."""

    op: Literal["update_task"] = "update_task"
    task: TaskId
    """The task to change."""
    params: dict[str, WireValue] | None = None
    """New parameters, replacing the old ones whole."""
    placement: Placement | None = None
    """New placement constraints."""
    retries: int | None = Field(default=None, ge=0, le=100)
    """New retry budget."""
    timeout_s: float | None = Field(default=None, gt=0)
    """New per-attempt timeout in seconds."""


PatchOp = Annotated[AddTask | RemoveTask | AddEdge | RemoveEdge | UpdateTask, Field(discriminator="op")]
"""One edit of a task graph."""


class TaskAssign(WireModel):
    """Orchestrator -> node: run one attempt of a task."""

    kind: Literal["task.assign"] = "task.assign"
    job: TaskId
    """The job the task belongs to."""
    task: TaskId
    """The task to run."""
    attempt: int = Field(ge=0)
    """Attempt number, from 0; results of other attempts are told apart by it."""
    task_kind: str = Field(min_length=1, max_length=128)
    """The executor kind to run."""
    params: dict[str, WireValue] = Field(default_factory=dict)
    """Executor parameters."""
    inputs: dict[str, WireValue] = Field(default_factory=dict)
    """Input name -> the upstream result value."""
    timeout_s: float | None = Field(default=None, gt=0)
    """Seconds the attempt may run."""


class TaskAck(WireModel):
    """Node -> orchestrator: the attempt was accepted and queued or started."""

    kind: Literal["task.ack"] = "task.ack"
    job: TaskId
    """The job of the task."""
    task: TaskId
    """The acknowledged task."""
    attempt: int = Field(ge=0)
    """The acknowledged attempt."""


class TaskProgress(WireModel):
    """Node -> orchestrator: progress of a running attempt, with optional streamed output."""

    kind: Literal["task.progress"] = "task.progress"
    job: TaskId
    """The job of the task."""
    task: TaskId
    """The running task."""
    attempt: int = Field(ge=0)
    """The running attempt."""
    seq: int = Field(ge=0)
    """Increases by one with each progress message of an attempt, so receivers can order them."""
    fraction: float | None = Field(default=None, ge=0, le=1)
    """Share of the work done, when the executor knows it."""
    message: ShortText = ""
    """A line for people."""
    data: WireValue = None
    """Streamed partial output (e.g. generated tokens); any encodable value."""


class TaskResult(WireModel):
    """Node -> orchestrator: an attempt finished; its value, and optionally a patch of the graph."""

    kind: Literal["task.result"] = "task.result"
    job: TaskId
    """The job of the task."""
    task: TaskId
    """The finished task."""
    attempt: int = Field(ge=0)
    """The finished attempt."""
    value: WireValue = None
    """The result; downstream tasks receive it as an input."""
    patch: list[PatchOp] = Field(default_factory=list)
    """Graph edits the task asks for (dynamic expansion, escalation), applied atomically."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Figures measured by the executor, e.g. ``{"compute_s": 0.12}``."""


ErrorCode = Literal[
    "decode",
    "unknown_kind",
    "version_mismatch",
    "too_large",
    "bad_signature",
    "replay",
    "unreachable",
    "timeout",
    "overloaded",
    "rejected",
    "cancelled",
    "executor",
    "internal",
]


class TaskFailed(WireModel):
    """Node -> orchestrator: an attempt failed."""

    kind: Literal["task.failed"] = "task.failed"
    job: TaskId
    """The job of the task."""
    task: TaskId
    """The failed task."""
    attempt: int = Field(ge=0)
    """The failed attempt."""
    code: ErrorCode
    """What kind of failure."""
    message: ShortText
    """What went wrong, for people."""
    retryable: bool = True
    """False when retrying the same task cannot succeed (e.g. no executor for its kind)."""


class TaskCancel(WireModel):
    """Orchestrator -> node: stop an attempt (or every attempt of the task when `attempt` is unset)."""

    kind: Literal["task.cancel"] = "task.cancel"
    job: TaskId
    """The job of the task."""
    task: TaskId
    """The task to stop."""
    attempt: int | None = Field(default=None, ge=0)
    """The attempt to stop; unset stops them all."""
    reason: ShortText = ""
    """Why, for people."""


class GraphPatch(WireModel):
    """Edits to a running job's graph, applied atomically or rejected whole."""

    kind: Literal["graph.patch"] = "graph.patch"
    job: TaskId
    """The job to edit."""
    ops: list[PatchOp] = Field(min_length=1)
    """The edits, applied in order as one unit."""
    reason: ShortText = ""
    """Why, for people and traces."""


class Call(WireModel):
    """Ask a node's service to run one method; answered by `call.result` or an `error`.

    Services are long-lived parts of a node that keep state between calls (a model stage with
    its KV caches, say); task executors and other services reach them with calls like this one.
    """

    kind: Literal["call"] = "call"
    service: str = Field(min_length=1, max_length=128)
    """The service's name, e.g. ``llm.stage``."""
    method: str = Field(min_length=1, max_length=128)
    """The method of the service to run."""
    args: dict[str, WireValue] = Field(default_factory=dict)
    """Named arguments, passed to the method as they are."""


class CallResult(WireModel):
    """A service method's return value, correlated to its `call`."""

    kind: Literal["call.result"] = "call.result"
    value: WireValue = None
    """What the method returned."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Figures measured while running it, e.g. ``{"compute_s": 0.004}``."""


class BlobChunk(WireModel):
    """One piece of a payload too large for a single frame (see `protocol.split_blob`)."""

    kind: Literal["blob.chunk"] = "blob.chunk"
    transfer: WireId
    """Id shared by every chunk of one payload."""
    index: int = Field(ge=0)
    """Position of this chunk, from 0."""
    count: int = Field(ge=1)
    """Number of chunks in the transfer."""
    size: int = Field(ge=0)
    """Total payload size in bytes."""
    offset: int = Field(ge=0)
    """Byte offset of this chunk in the payload: ``index * chunk_size``."""
    crc32c: int = Field(ge=0, le=0xFFFFFFFF)
    """CRC-32C (Castagnoli polynomial, as in iSCSI, RFC 3720) of `data`; "123456789" gives 0xE3069283."""
    data: bytes
    """The chunk's bytes; every chunk but the last has the same length."""


class BlobRef(WireModel):
    """A large envelope that crossed beside the broker, on a direct bulk stream; deliver it here.

    The sender first streams the encoded envelope to the receiver's `bulk` address, and sends
    this small body through the fabric only once the receiver has stored it, so the envelope takes
    this body's place in the sender's order.
    """

    kind: Literal["blob.ref"] = "blob.ref"
    transfer: WireId
    """Id the bulk stream carried; unguessable (random), so others cannot claim the bytes."""
    size: int = Field(ge=0)
    """Length of the stored frame in bytes."""
    crc32c: int = Field(ge=0, le=0xFFFFFFFF)
    """CRC-32C of the stored frame, as in `blob.chunk`."""


class Relay(WireModel):
    """A complete frame for `target`, carried by relays; the inner frame keeps its own signature.

    The envelope around it goes one hop, from a node to a relay or from a relay to the next hop,
    and is signed by that hop's sender; its `hops` list names the relays passed so far.
    """

    kind: Literal["relay"] = "relay"
    target: Address
    """The final destination of the inner frame: a node, or ``*`` (or a group the relay belongs
    to), which relays flood into every segment they join."""
    frame: bytes
    """The inner envelope, encoded (and signed) by its origin; relays never alter it."""


class Error(WireModel):
    """A peer reports that it could not accept a message."""

    kind: Literal["error"] = "error"
    code: ErrorCode
    """What kind of failure."""
    message: ShortText
    """What went wrong, naming the offending field or value."""
    ref: WireId | None = None
    """Id of the envelope the error is about, when known."""
    target: Address | None = None
    """The destination that could not be reached, for ``unreachable``."""


Body = Annotated[
    Hello
    | Welcome
    | Heartbeat
    | Bye
    | TaskAssign
    | TaskAck
    | TaskProgress
    | TaskResult
    | TaskFailed
    | TaskCancel
    | GraphPatch
    | Call
    | CallResult
    | BlobChunk
    | BlobRef
    | Relay
    | Error,
    Field(discriminator="kind"),
]
"""The closed union of message bodies."""

MESSAGE_KINDS: frozenset[str] = frozenset(
    model.model_fields["kind"].default for model in get_args(get_args(Body)[0])
)
"""Every message kind of this protocol version."""
