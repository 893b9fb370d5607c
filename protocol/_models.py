"""Base model and constrained string types shared by every wire model."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

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

_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")


def _check_host_port(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} is not in 1..65535")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
    elif len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        raise ValueError(f"{host!r} is not a host name or IPv4 address (dot-separated labels of 1-63)")
    return value


HostPort = Annotated[
    str,
    StringConstraints(pattern=r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{1,253}):[0-9]{1,5}$"),
    AfterValidator(_check_host_port),
]
"""A TCP address to dial: ``host:port`` (port 1-65535), an IPv6 host in brackets (``[::1]:7000``)."""

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

    WIRE_OMIT_NONE: ClassVar[frozenset[str]] = frozenset()
    """Fields written only when set. Every optional field added to a version after its first
    release is listed here, so a frame without it still decodes on a peer that predates it."""
