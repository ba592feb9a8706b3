"""What the CPU and RAM estimates share about psutil: the probe of what it can read here, and
how often a process tree is rescanned."""

from __future__ import annotations

from collections.abc import Callable

import psutil

from green_mlops.meters import Component, MeterUnavailable

__all__ = ["CHILDREN_REFRESH_S", "psutil_unavailable"]

#: Longest time between two scans for new descendant processes (a scan costs ~1 ms).
CHILDREN_REFRESH_S = 3.0

FIX = "check that /proc is mounted (Linux) or psutil supports this platform"


def psutil_unavailable(
    name: str, component: Component, what: str, *reads: Callable[[], object]
) -> MeterUnavailable | None:
    """``None`` when every one of ``reads`` succeeds; otherwise why meter ``name`` cannot work
    here (psutil cannot read ``what``), with the fix."""
    try:
        for read in reads:
            read()
    except (psutil.Error, OSError, NotImplementedError) as exc:
        return MeterUnavailable(
            name=name,
            component=component,
            reason=f"psutil cannot read {what} here: {exc}",
            fix=FIX,
        )
    return None
