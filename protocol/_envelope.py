"""The envelope: routing, timing and security fields around one message body."""

from __future__ import annotations

import time
from typing import Any, Final, Literal

from pydantic import Field

from protocol._ids import new_id
from protocol._messages import Body
from protocol._models import MAX_HOPS, Address, NodeId, WireId, WireModel

__all__ = ["PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "Envelope"]

#: The envelope layout this code writes.
PROTOCOL_VERSION: Final = 1
#: Envelope layouts this code reads.
SUPPORTED_VERSIONS: frozenset[int] = frozenset({1})


class Envelope(WireModel):
    """One message on the wire: who sent it, where it goes, when, and a typed body.

    Field order is the wire order; `sig` is always last so a signature covers every byte before it.

    >>> from protocol import Envelope, Heartbeat
    >>> env = Envelope.new(src="edge-1", dst="orchestrator", body=Heartbeat(seq=3))
    >>> env.kind
    'heartbeat'
    """

    v: Literal[1]  # SUPPORTED_VERSIONS, spelled as a type so validation refuses other layouts
    """Envelope layout version; see `PROTOCOL_VERSION`."""
    id: WireId
    """Unique, time-sortable id; receivers drop ids they have seen (dedupe, replay defence)."""
    src: NodeId
    """The node that created the envelope."""
    dst: Address
    """A node id, ``group:<name>`` or ``*`` (broadcast)."""
    corr: WireId | None = None
    """For replies and streamed messages: the id of the request they answer."""
    ts: float = Field(gt=0)
    """Sender wall-clock time, Unix seconds."""
    deadline: float | None = Field(default=None, gt=0)
    """Unix seconds after which the message is useless and may be dropped unanswered."""
    hops: list[NodeId] = Field(default_factory=list, max_length=MAX_HOPS)
    """Relays the envelope has passed through, in order."""
    trace: str | None = Field(default=None, max_length=64)
    """Trace id shared by every envelope of one job or request, for tracing tools."""
    kid: str | None = Field(default=None, max_length=64)
    """Id of the key that signed the envelope; unset when unsigned."""
    body: Body
    """The message; its ``kind`` field says which model it is."""
    sig: bytes | None = Field(default=None, min_length=32, max_length=32)
    """HMAC-SHA256 of every encoded byte before this field's value; unset when unsigned."""

    @property
    def kind(self) -> str:
        """The body's message kind, e.g. ``"task.assign"``."""
        kind: str = self.body.kind
        return kind

    @classmethod
    def new(
        cls,
        *,
        src: str,
        dst: str,
        body: Any,
        corr: str | None = None,
        deadline: float | None = None,
        trace: str | None = None,
    ) -> Envelope:
        """Build an envelope with a fresh id and the current time, validating every field."""
        return cls(
            v=PROTOCOL_VERSION,
            id=new_id(),
            src=src,
            dst=dst,
            corr=corr,
            ts=time.time(),
            deadline=deadline,
            trace=trace,
            body=body,
        )

    def reply(self, body: Any, *, src: str | None = None) -> Envelope:
        """Build the answer to this envelope: back to its sender, correlated to its id."""
        return Envelope.new(
            src=src if src is not None else _node_part(self.dst),
            dst=self.src,
            body=body,
            corr=self.id,
            deadline=self.deadline,
            trace=self.trace,
        )


def _node_part(address: str) -> str:
    if address == "*" or address.startswith("group:"):
        raise ValueError(f"cannot reply as {address!r}: pass src= with the replying node's id")
    return address
