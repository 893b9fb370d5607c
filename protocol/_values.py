"""What may travel in a message's free-form (`any value`) fields, checked by the models themselves.

A wire value is nil, bool, int, float (NaN and inf allowed), str, bytes, a list of wire values, a
map from str to wire values, a numpy array, a torch tensor, or a `Lossy` tensor; nested at most
`MAX_VALUE_DEPTH` levels. Senders learn of a bad value when they build the message, receivers
refuse the same values whichever decoder read the frame.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

from protocol._tensor import Lossy, is_tensor

__all__ = ["MAX_VALUE_DEPTH", "WireValue", "check_wire_value"]

#: Deepest nesting of lists and maps inside one free-form field.
MAX_VALUE_DEPTH = 32
_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


def _kind(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def check_wire_value(value: Any) -> Any:
    """Return `value` unchanged if it can travel; raise ValueError naming the first offending spot."""
    stack: list[tuple[object, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, where = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is list or kind is tuple:
            items: list[Any] | tuple[Any, ...] = item  # type: ignore[assignment]
            if depth >= MAX_VALUE_DEPTH:
                raise ValueError(f"{where or 'value'} nests deeper than {MAX_VALUE_DEPTH} levels")
            if not set(map(type, items)) <= _SCALARS:  # fast path: a flat list of scalars
                stack.extend((x, depth + 1, f"{where}[{i}]") for i, x in enumerate(items))
        elif kind is dict:
            mapping: dict[Any, Any] = item  # type: ignore[assignment]
            if depth >= MAX_VALUE_DEPTH:
                raise ValueError(f"{where or 'value'} nests deeper than {MAX_VALUE_DEPTH} levels")
            for key, sub in mapping.items():
                if type(key) is not str:
                    raise ValueError(f"{where or 'value'}: map key {key!r:.40} is not a string")
                stack.append((sub, depth + 1, f"{where}.{key}" if where else key))
        elif isinstance(item, Lossy) or is_tensor(item):
            continue
        else:
            raise ValueError(f"{where or 'value'}: a {_kind(item)} cannot travel on the wire")
    return value


WireValue = Annotated[Any, AfterValidator(check_wire_value)]
"""Any value that can travel: see the module docstring."""
