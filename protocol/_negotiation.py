"""Choosing the protocol version two peers will speak."""

from __future__ import annotations

from collections.abc import Iterable

from protocol._envelope import SUPPORTED_VERSIONS
from protocol._errors import VersionMismatchError

__all__ = ["negotiate_version"]


def negotiate_version(offered: Iterable[int], supported: Iterable[int] = SUPPORTED_VERSIONS) -> int:
    """Return the highest version in both lists, or raise `VersionMismatchError` naming both."""
    offered_set, supported_set = set(offered), set(supported)
    common = offered_set & supported_set
    if not common:
        raise VersionMismatchError(
            f"no common protocol version: peer offers {sorted(offered_set)}, "
            f"this node speaks {sorted(supported_set)}"
        )
    return max(common)
