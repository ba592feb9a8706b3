"""Float rounding: the margins an early decision must clear, and the float line a logged value
is placed on (so that it orders like the exact mean against the callbacks' bests).

See docs/adaptive-validation.md ("What is logged").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "FLOAT32_ROUNDING_MARGIN",
    "ROUNDING_MARGIN",
    "Constraint",
    "float_key",
    "from_key",
    "half_line",
    "place",
]

#: Relative margin by which an early decision must clear its threshold, so that float rounding
#: of the two full-set means cannot turn it into a tie-break the other way.
ROUNDING_MARGIN = 1e-9
#: The same for a logger that keeps float32 (MPS): 8 float32 ulps, relative.
FLOAT32_ROUNDING_MARGIN = 2.0**-20

#: A monotone predicate on the float line and the answer it must give.
Constraint = tuple[Callable[[float], bool], bool]


def float_key(x: float, dtype: type[np.floating[Any]]) -> int:
    """An integer that orders like the (non-NaN) float ``x`` of ``dtype``; adjacent floats
    have adjacent keys (+0.0 and -0.0 share 0)."""
    if dtype is np.float32:
        bits = int(np.array(x, np.float32).view(np.int32))
        return bits if bits >= 0 else -(bits & 0x7FFFFFFF)
    bits = int(np.array(x, np.float64).view(np.int64))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFFFFFFFFFF)


def from_key(key: int, dtype: type[np.floating[Any]]) -> float:
    """The float of ``dtype`` whose :func:`float_key` is ``key``."""
    if dtype is np.float32:
        bits = key if key >= 0 else (-key) | -0x80000000
        return float(np.array(bits, np.int32).view(np.float32))
    bits = key if key >= 0 else (-key) | -0x8000000000000000
    return float(np.array(bits, np.int64).view(np.float64))


def half_line(
    predicate: Callable[[float], bool], want: bool, dtype: type[np.floating[Any]]
) -> tuple[int, int] | None:
    """The keys of the floats where a monotone ``predicate`` equals ``want``, as a closed
    interval (None if none)."""
    lo, hi = float_key(-math.inf, dtype), float_key(math.inf, dtype)
    at_lo, at_hi = predicate(-math.inf), predicate(math.inf)
    if at_lo == at_hi:
        return (lo, hi) if at_lo == want else None
    a, b = lo, hi  # predicate(a) == at_lo, predicate(b) == at_hi
    while b - a > 1:
        mid = (a + b) // 2
        if predicate(from_key(mid, dtype)) == at_lo:
            a = mid
        else:
            b = mid
    return (lo, a) if at_lo == want else (b, hi)


def place(
    value: float, constraints: Sequence[Constraint], dtype: type[np.floating[Any]]
) -> tuple[float, bool]:
    """``value`` (a float of ``dtype``, not NaN) moved to the nearest float where every
    constraint holds, and True; if no float satisfies them all, the nearest where the first
    holds, and False."""
    lo, hi = float_key(-math.inf, dtype), float_key(math.inf, dtype)
    for predicate, want in constraints:
        line = half_line(predicate, want, dtype)
        if line is None:
            lo, hi = 1, 0
            break
        lo, hi = max(lo, line[0]), min(hi, line[1])
    if lo > hi:  # keep the first constraint at least (the validator's: ModelCheckpoint's)
        line = half_line(constraints[0][0], constraints[0][1], dtype)
        assert line is not None
        lo, hi = line
        key = min(max(float_key(value, dtype), lo), hi)
        return from_key(key, dtype), False
    key = min(max(float_key(value, dtype), lo), hi)
    return (value if key == float_key(value, dtype) else from_key(key, dtype)), True
