"""Whether psutil can read what an estimate needs here: the probe of the CPU and RAM estimates."""

from __future__ import annotations

from collections.abc import Callable

import psutil

from green_mlops.meters import Component, MeterUnavailable

__all__ = ["psutil_unavailable"]

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
