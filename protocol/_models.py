"""Base model and constrained string types shared by every wire model."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

__all__ = ["MAX_HOPS", "Address", "HostPort", "NodeId", "ShortText", "TaskId", "WireId", "WireModel"]

#: Longest hop list an envelope may carry; a relay that would exceed it drops the envelope.
MAX_HOPS = 8

NodeId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
"""A node name: 1-64 of letters, digits, '.', '_' and '-', starting with a letter or digit."""

Address = Annotated[
    str,
    StringConstraints(pattern=r"^(\*|group:[A-Za-z0-9._-]{1,64}|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$"),
]
"""A destination: a node id, ``group:<name>`` for a group, or ``*`` for every node of the fabric."""

WireId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
"""An envelope or transfer id: 32 lowercase hex digits, time-sortable (see `protocol.new_id`)."""

TaskId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
"""A task or job name: 1-128 of letters, digits, '.', '_', ':' and '-'."""

HostPort = Annotated[
    str, StringConstraints(pattern=r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{1,253}):[0-9]{1,5}$")
]
"""A TCP address: ``host:port``, with an IPv6 host in brackets (``[::1]:7000``)."""

ShortText = Annotated[str, StringConstraints(max_length=4096)]
"""Free text for people (reasons, error messages), at most 4096 characters."""


class WireModel(BaseModel):
    """Base of every model that crosses a process boundary.

    Strict (msgpack already yields exact types, so nothing is coerced), immutable, closed to
    unknown fields, and finite floats only.
    """

    model_config = ConfigDict(
        strict=True,
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )
