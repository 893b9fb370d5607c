"""The envelope: routing, timing and security fields around one message body."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Final, Literal, get_args

from pydantic import Field, TypeAdapter, ValidationError

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
        hops: list[str] | None = None,
    ) -> Envelope:
        """Build an envelope with a fresh id and the current time, validating every field.

        The common case (a body that is already a message model, valid arguments) skips
        re-validating what is known valid; anything else goes through full validation, so the
        errors are the same either way.
        """
        if (
            type(body) in _BODY_TYPES
            and _is_node(src)
            and _is_address(dst)
            and (corr is None or _is_wire_id(corr))
            and (deadline is None or (type(deadline) in (int, float) and 0 < deadline < math.inf))
            and (trace is None or (type(trace) is str and len(trace) <= 64))
            and (hops is None or (len(hops) <= MAX_HOPS and all(_is_node(h) for h in hops)))
        ):
            env = cls.__new__(cls)
            fields = {
                "v": PROTOCOL_VERSION,
                "id": new_id(),
                "src": src,
                "dst": dst,
                "corr": corr,
                "ts": time.time(),
                "deadline": deadline,
                "hops": [] if hops is None else list(hops),
                "trace": trace,
                "kid": None,
                "body": body,
                "sig": None,
            }
            _set = object.__setattr__
            _set(env, "__dict__", fields)
            _set(env, "__pydantic_fields_set__", set(_NEW_FIELDS_SET))
            _set(env, "__pydantic_extra__", None)
            _set(env, "__pydantic_private__", None)
            return env
        return cls(
            v=PROTOCOL_VERSION,
            id=new_id(),
            src=src,
            dst=dst,
            corr=corr,
            ts=time.time(),
            deadline=deadline,
            trace=trace,
            hops=[] if hops is None else hops,
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


_BODY_TYPES: frozenset[type] = frozenset(get_args(get_args(Body)[0]))
_NEW_FIELDS_SET = frozenset({"v", "id", "src", "dst", "corr", "ts", "deadline", "trace", "body"})
_node_adapter: TypeAdapter[str] = TypeAdapter(NodeId)
_address_adapter: TypeAdapter[str] = TypeAdapter(Address)
_wire_id_adapter: TypeAdapter[str] = TypeAdapter(WireId)


def _valid(adapter: TypeAdapter[str], value: object) -> bool:
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


@functools.lru_cache(maxsize=4096)  # a node talks to few distinct peers: check each name once
def _is_node(value: str) -> bool:
    return _valid(_node_adapter, value)


@functools.lru_cache(maxsize=4096)
def _is_address(value: str) -> bool:
    return _valid(_address_adapter, value)


def _is_wire_id(value: str) -> bool:
    return _valid(_wire_id_adapter, value)


def _node_part(address: str) -> str:
    if address == "*" or address.startswith("group:"):
        raise ValueError(f"cannot reply as {address!r}: pass src= with the replying node's id")
    return address
