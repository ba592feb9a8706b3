"""What every report format reads of a run: totals, series and provenance, from a
:class:`~green_mlops.runs.RunRecord` and its versioned JSON report (when it has one).

Metrics come from the record (MLflow's latest values, or the report file's), the series (power,
intensity) and the per-device provenance from the report. A quantity the run does not carry is
``None``; renderers leave it out, never print 0.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from green_mlops.location import Location, parse_location
from green_mlops.runs import RunRecord

__all__ = ["IntensityInterval", "PowerPoint", "RunView", "iso_utc", "significant"]


@dataclass(frozen=True)
class PowerPoint:
    """Mean power over ``[start_s, end_s)`` (seconds since the measurement began)."""

    start_s: float
    end_s: float
    watts: float
    #: The phase the interval was spent in, when the report records it.
    phase: str | None = None


@dataclass(frozen=True)
class IntensityInterval:
    """Grid intensity over ``[start_s, end_s)`` (seconds since the measurement began)."""

    start_s: float
    end_s: float
    g_per_kwh: float
    source: str = ""


@dataclass(frozen=True)
class RunView:
    """One run as the renderers read it."""

    record: RunRecord
    report: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, record: RunRecord) -> RunView:
        return cls(record, record.report or {})

    # --- totals -----------------------------------------------------------------------------

    def metric(self, key: str) -> float | None:
        """The run's metric ``key`` (the record's, else the report's), None when absent."""
        value = self.record.metrics.get(key)
        if value is None:
            raw = (self.report.get("metrics") or {}).get(key)
            value = (
                float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
            )
        return None if value is None or math.isnan(value) else float(value)

    def tag(self, key: str) -> str | None:
        value = self.record.tags.get(key)
        if value is None:
            value = (self.report.get("tags") or {}).get(key)
        return None if value is None else str(value)

    @property
    def footprint(self) -> Mapping[str, Any]:
        return self.report.get("footprint") or {}

    @property
    def energy(self) -> Mapping[str, Any]:
        return self.report.get("energy") or {}

    @property
    def started_at(self) -> float | None:
        started = self.energy.get("started_at")
        if isinstance(started, (int, float)):
            return float(started)
        return self.record.start_time

    @property
    def duration_s(self) -> float | None:
        return self.metric("green/duration_s")

    @property
    def relative_uncertainty(self) -> float | None:
        """Half-width of the IT energy band relative to the energy (0.05 = +/-5 %)."""
        fp = self.footprint.get("energy_uncertainty")
        if isinstance(fp, (int, float)):
            return float(fp)
        kwh, band = self.metric("green/energy_kwh"), self.metric("green/energy_uncertainty_kwh")
        if kwh is None or band is None or kwh <= 0:
            return None
        return band / kwh

    def components(self) -> dict[str, float]:
        """kWh per component (``green/energy/<component>_kwh``)."""
        return {
            key[len("green/energy/") : -len("_kwh")]: value
            for key, value in sorted(self.record_metrics().items())
            if key.startswith("green/energy/") and key.endswith("_kwh")
        }

    def phases(self) -> dict[str, dict[str, float]]:
        """kWh per phase and component (``green/phase/<phase>/<component>_kwh``); a phase
        without a per-component split has its total under ``"total"``."""
        metrics = self.record_metrics()
        out: dict[str, dict[str, float]] = {}
        for key, value in sorted(metrics.items()):
            parts = key.split("/")
            if parts[:2] != ["green", "phase"] or not key.endswith("_kwh"):
                continue
            if len(parts) == 4:
                out.setdefault(parts[2], {})[parts[3][: -len("_kwh")]] = value
            elif len(parts) == 3:
                out.setdefault(parts[2][: -len("_kwh")], {})
        for phase, split in out.items():
            if not split:
                total = metrics.get(f"green/phase/{phase}_kwh")
                if total is not None:
                    split["total"] = total
        return out

    def record_metrics(self) -> dict[str, float]:
        """Every numeric metric of the run: the report's, overridden by the record's."""
        merged: dict[str, float] = {}
        for key, value in (self.report.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[str(key)] = float(value)
        merged.update(self.record.metrics)
        return {k: v for k, v in merged.items() if not math.isnan(v)}

    # --- series -----------------------------------------------------------------------------

    def power(self) -> list[PowerPoint]:
        """Mean power of each interval of the report's energy timeline."""
        timeline = self.energy.get("timeline") or []
        t0 = self.started_at
        points: list[PowerPoint] = []
        before: Mapping[str, Any] | None = None
        for point in timeline:
            if before is not None and t0 is not None:
                seconds = float(point["time"]) - float(before["time"])
                if seconds > 0:
                    joules = _joules(point) - _joules(before)
                    points.append(
                        PowerPoint(
                            float(before["time"]) - t0,
                            float(point["time"]) - t0,
                            joules / seconds,
                            point.get("phase"),
                        )
                    )
            before = point
        return points

    def intensity(self, key: str = "intervals") -> list[IntensityInterval]:
        """Every intensity interval that priced the run's energy, when the report carries
        them (schema v2: ``accounting.intervals``; ``market_intervals`` for the market-based
        figure); empty for a v1 report."""
        t0 = self.started_at
        block = self.report.get("accounting")
        rows = block.get(key) if isinstance(block, Mapping) else None
        if not isinstance(rows, Sequence) or t0 is None:
            return []
        out = []
        for row in rows:
            if not isinstance(row, Mapping):
                continue
            try:
                out.append(
                    IntensityInterval(
                        float(row["start"]) - t0,
                        float(row["end"]) - t0,
                        float(row["g_per_kwh"]),
                        "/".join(str(row[k]) for k in ("source", "dataset", "zone") if row.get(k)),
                    )
                )
            except (KeyError, TypeError, ValueError):
                continue
        return out

    # --- provenance -------------------------------------------------------------------------

    @cached_property
    def location(self) -> Location | None:
        """The run's location, parsed from ``green.location`` (None when unknown)."""
        shown = self.tag("green.location") or str(self.footprint.get("location") or "")
        raw = shown.split(",")[0].strip()
        if not raw or raw == "unknown":
            return None
        try:
            return parse_location(raw)
        except ValueError:
            return None

    @property
    def country_name(self) -> str | None:
        loc = self.location
        if loc is None or loc.country is None:
            return None
        try:
            return parse_location(loc.country).name or None
        except ValueError:
            return None

    @property
    def hardware(self) -> str | None:
        value = self.footprint.get("hardware")
        return str(value) if value else None

    def devices(self) -> list[Mapping[str, Any]]:
        return [d for d in self.energy.get("devices") or [] if isinstance(d, Mapping)]

    def provenance(self) -> list[tuple[str, str]]:
        """(what, value) rows: meters, methods, uncertainty, intensity, PUE, location, and what
        was not reported, in the words of the run's ``green.*`` tags."""
        rows: list[tuple[str, str]] = []

        def add(what: str, *keys: str) -> None:
            for key in keys:
                value = self.tag(key)
                if value:
                    rows.append((what, value))
                    return

        add("meters", "green.meters")
        for key in sorted(k for k in self.all_tags() if k.startswith("green.method.")):
            add(f"method ({key.removeprefix('green.method.')})", key)
        for d in self.devices():
            rows.append(
                (
                    f"uncertainty ({d.get('device')})",
                    f"±{float(d.get('uncertainty', 0)):.0%} ({d.get('method')}, {d.get('status')})",
                )
            )
        if not self.devices() and self.relative_uncertainty is not None:
            rows.append(("uncertainty (energy)", f"±{self.relative_uncertainty:.0%}"))
        add("measured (no estimate)", "green.measured")
        add("intensity source", "green.intensity.source")
        add("intensity basis", "green.intensity.basis")
        add("intensity scope", "green.intensity.scope")
        add("intensity vintage", "green.intensity.vintage")
        add("intensity estimated", "green.intensity.estimated")
        add("intensity fallbacks", "green.intensity.fallbacks")
        add("PUE", "green.pue")
        add("PUE source", "green.pue.source")
        add("location", "green.location")
        add("embodied source", "green.embodied.source")
        add("functional unit", "green.functional_unit")
        add("not reported", "green.not_reported")
        add("problems", "green.problems")
        add("notes", "green.notes")
        add("unavailable meters", "green.unavailable")
        return rows

    def all_tags(self) -> dict[str, str]:
        tags = {str(k): str(v) for k, v in (self.report.get("tags") or {}).items()}
        tags.update(self.record.tags)
        return tags

    @property
    def sentence(self) -> str:
        return str(self.report.get("reporting_sentence") or "")


def _joules(point: Mapping[str, Any]) -> float:
    return float(sum((point.get("joules_by_component") or {}).values()))


def iso_utc(seconds: float | None, fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    """Unix seconds as UTC text (empty for None)."""
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).strftime(fmt)


def significant(value: float, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits (plain or scientific, as ``g`` chooses)."""
    return f"{value:.{digits}g}"
