"""Totals that count each joule once among runs measured at the same time.

The MLflow plugin tags runs alive at once in one process ``green.concurrent_runs``: each
measured the whole machine (or this process's share), so their figures overlap. Nested runs
are already left out of their parent's exclusive figure by the union of their time, but the
nested runs' own figures still overlap each other. :func:`counted_once` says which families to
sum, which runs lie inside another's measured time (counted in that one), and which overlap
in a way their totals cannot tell (the sum is then an upper bound).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from green_mlops.compare import Row
    from green_mlops.runs import RunRecord

__all__ = ["concurrent_runs", "counted_once", "family_sum", "names", "outside_children"]


def concurrent_runs(tags: Mapping[str, str]) -> int | None:
    """``green.concurrent_runs``: how many runs were alive at once (None: one, or not said)."""
    try:
        n = int(tags.get("green.concurrent_runs", ""))
    except ValueError:
        return None
    return n if n > 1 else None


def names(rows: Sequence[Row]) -> str:
    return ", ".join(r.name for r in rows[:5]) + (f" and {len(rows) - 5} more" * (len(rows) > 5))


def counted_once(rows: Sequence[Row]) -> tuple[list[tuple[Row, list[Row]]], list[str], list[Row]]:
    """The units to sum: each family (a run and its nested runs among ``rows``) whose top run
    is not inside another concurrent run's measured time; what was counted once (notes); the
    concurrent runs whose overlap cannot be known (the sum is an upper bound)."""
    ids = {r.run_id: r for r in rows}
    families: dict[str, list[Row]] = {}
    for row in rows:
        top, seen = row, {row.run_id}
        while top.parent_id in ids and top.parent_id not in seen:
            top = ids[top.parent_id]
            seen.add(top.run_id)
        families.setdefault(top.run_id, []).append(row)
    notes = [
        f"{ids[top].name}: its nested runs measured the same time (green.concurrent_runs, each "
        "the whole machine), so the totals count its family by its inclusive figure "
        f"({family_sum(ids[top], members, 'energy_kwh'):.3g} kWh, not their sum "
        f"{math.fsum(m.energy_kwh or 0.0 for m in members):.3g})"
        for top, members in families.items()
        if family_sum(ids[top], members, "energy_kwh")
        != math.fsum(m.energy_kwh or 0.0 for m in members)
    ]
    siblings: dict[str | None, list[Row]] = {}
    for top_id in families:
        if ids[top_id].concurrent:
            siblings.setdefault(ids[top_id].parent_id, []).append(ids[top_id])
    inside: dict[str, Row] = {}
    unknown: list[Row] = []
    for group in siblings.values():
        if len(group) > 1:
            _overlaps(group, inside, unknown)
    for v in {id(v): v for v in inside.values()}.values():
        within = [ids[u] for u, w in inside.items() if w is v]
        notes.append(
            f"{names(within)} ran inside {v.name}'s measured time (green.concurrent_runs, each "
            f"measuring the whole machine): the totals count that energy once, in {v.name}"
        )
    units = [(ids[t], m) for t, m in families.items() if t not in inside]
    return units, notes, unknown


def _overlaps(group: list[Row], inside: dict[str, Row], unknown: list[Row]) -> None:
    """Concurrent runs of one parent (or top-level): a run inside the span of one measured
    throughout it goes into ``inside`` (run id -> that run); runs that still overlap, or
    whose times are not known, into ``unknown``. One sweep by start time."""
    timed = sorted(
        (r for r in group if r.start_time is not None and r.end_time is not None),
        key=lambda r: (r.start_time, -(r.end_time or 0.0), r.run_id),
    )
    best: Row | None = None  # the run measured throughout its span that ends last so far
    for row in timed:
        if best is not None and (best.end_time or 0.0) >= (row.end_time or 0.0):
            inside[row.run_id] = best
        span = (row.end_time or 0.0) - (row.start_time or 0.0)
        throughout = row.duration_s is not None and row.duration_s >= 0.9 * span
        if throughout and (best is None or (row.end_time or 0.0) > (best.end_time or 0.0)):
            best = row
    left = [r for r in timed if r.run_id not in inside]
    end = -math.inf
    cluster: list[Row] = []
    for run in [*left, None]:
        if run is None or (run.start_time or 0.0) >= end:
            unknown += cluster if len(cluster) > 1 else []
            cluster, end = [], -math.inf
        if run is not None:
            cluster.append(run)
            end = max(end, run.end_time or 0.0)
    if len(timed) < len(group):  # times not known: any overlap is possible
        unknown += [r for r in group if r.run_id not in inside and r not in unknown]


def family_sum(top: Row, members: Sequence[Row], attr: str) -> float:
    """The members' sum of ``attr``, at most the top run's inclusive figure (the machine over
    its time): concurrent nested runs each measured the whole machine."""
    total = math.fsum(getattr(m, attr) or 0.0 for m in members)
    cap = getattr(top, {"energy_kwh": "inclusive_kwh"}.get(attr, f"inclusive_{attr}"))
    if len(members) > 1 and cap is not None and total > cap * (1 + 1e-9):
        return float(cap)
    return total


def outside_children(records: Iterable[RunRecord]) -> list[str]:
    """A note for parents whose nested runs are not compared: their totals exclude them."""
    ids = {r.run_id for r in records}
    parents = {r.parent_id for r in records if r.parent_id in ids}
    notes = []
    for r in records:
        inclusive = r.metrics.get("green/inclusive/energy_kwh")
        own = r.metrics.get("green/energy_kwh")
        if (
            inclusive is not None
            and own is not None
            and inclusive > own
            and r.run_id not in parents
        ):
            notes.append(
                f"{r.name}: its nested runs are not among the runs compared; the totals exclude "
                f"their {inclusive - own:.3g} kWh"
            )
    return notes
