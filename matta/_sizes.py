"""Sizes given to the Python API (widths, layer counts, indices): ints, never truncated.

`int(8.9)` is 8 and `int(True)` is 1, so a float or a bool passed as a width would silently
build another model. These helpers accept exactly the values that are integers (int, numpy
and integer 0-dim torch scalars, anything with `__index__`) and refuse the rest with an error
naming the argument: TypeError for the wrong kind of value, ValueError for one out of range.
"""
from __future__ import annotations

import operator


def _index(value) -> int:
    if isinstance(value, bool):  # an int subclass, but never a size
        raise TypeError
    return operator.index(value)  # TypeError for floats, strings, float tensors


def _requirement(minimum: int) -> str:
    return "a positive int" if minimum == 1 else f"an int >= {minimum}"


def as_size(what: str, value, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`."""
    try:
        size = _index(value)
    except TypeError:
        raise TypeError(f"{what} must be {_requirement(minimum)}, got {value!r}") from None
    if size < minimum:
        raise ValueError(f"{what} must be {_requirement(minimum)}, got {value!r}")
    return size


def as_size_pair(what: str, value, parts: str) -> tuple[int, int]:
    """`value`, a pair of integers described as `parts` (e.g. "(N_S, M_S)"), as two ints;
    range checks are the caller's."""
    try:
        first, second = value
        return _index(first), _index(second)
    except (TypeError, ValueError):  # not a pair, or not integers
        raise TypeError(f"{what} must be a pair {parts} of ints, got {value!r}") from None
