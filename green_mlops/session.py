"""A measured run: energy (Tracker) + carbon (CarbonAccountant) + footprint, as metrics and tags.

Integrations create one :class:`Measurement` per run and ask it for :class:`Result`s: live ones
during the run (periodic logging) and a final one at the end. Every integration logs the same
keys because they all come from here. A process-wide registry keyed by the host's run id (the
MLflow run id) makes sure that two integrations seeing the same run share one measurement, so
exactly one set of metrics is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from green_mlops.config import Settings
from green_mlops.job import Job, job_tags
from green_mlops.meters import Component, Meter, MeterUnavailable
from green_mlops.metrics import (
    EXCLUSIVE_KEYS,
    add_not_reported,
    energy_metrics,
    power_series,
    provenance_tags,
)
from green_mlops.references import EnergyReference, ReferenceWindow, compare
from green_mlops.snapshot import Snapshot
from green_mlops.tracker import Tracker
from green_mlops.units import HOUR
from green_mlops.verify import REPORT_SCHEMA, report_digests

log = logging.getLogger(__name__)

__all__ = [
    "REPORT_SCHEMA",
    "Measurement",
    "Result",
    "claim",
    "lookup",
    "reference_offers",
    "release",
]

#: Longest wait for intensity data when the run ends; the tail is priced by the fallback after.
FINAL_WAIT_S = 3.0


@dataclass(frozen=True)
class Result:
    """What sinks log: totals as metrics, provenance as tags, the power series, a report."""

    snapshot: Snapshot
    metrics: dict[str, float]
    tags: dict[str, str]
    footprint: Any = None
    sentence: str = ""
    power: list[tuple[float, float]] = field(default_factory=list)
    #: The values at the run's end (or at a termination of a run that may go on).
    final: bool = False
    #: What a reader needs to recompute the figures (the report's ``accounting``).
    accounting: dict[str, Any] | None = None
    #: A job's totals gathered from several nodes: this measurement's own metrics
    #: (``rank0_metrics``, what ``accounting`` recomputes) and each other node's (``nodes``).
    parts: dict[str, Any] | None = None

    def report(self) -> dict[str, Any]:
        """The versioned JSON report (``green/report.json``): docs/report-format.md."""
        from green_mlops import __version__

        fp = dataclasses.asdict(self.footprint) if self.footprint is not None else None
        accounting = self.accounting or accounting_block(None, [], None, None, {}, {})
        return {
            "schema": REPORT_SCHEMA,
            "green_mlops_version": __version__,
            "generated_at": time.time(),
            "final": self.final or not self.snapshot.running,
            "metrics": self.metrics,
            "tags": self.tags,
            "footprint": fp,
            "reporting_sentence": self.sentence,
            "energy": self.snapshot.to_dict(),
            "accounting": accounting,
            "digests": report_digests(accounting),
            **(self.parts or {}),
        }


class Measurement:
    """Measures one run. ``start`` begins energy tracking and fetching intensity in the
    background; :meth:`result` can be called at any time; :meth:`stop` gives the final result.

    Never raises after :meth:`start`; a failure in carbon or footprint leaves the energy
    metrics intact and is recorded in the tags.
    """

    def __init__(
        self,
        settings: Settings | Mapping[str, Any] | None = None,
        *,
        meters: Sequence[Meter | MeterUnavailable] | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = Settings.resolve(settings, **overrides)
        self.tracker = Tracker(self.settings, meters=meters)
        self.functional_units: float | None = None
        self._offsets: dict[str, float] = {}
        self._earlier: dict[str, float] = {}
        #: Metrics and tags contributed by other parts (FLOPs and quality from a callback).
        self.extra_metrics: dict[str, float] = {}
        self.extra_tags: dict[str, str] = {}
        self._children: dict[str, float] = {}
        self._accountant: Any = None
        self._references: Any = None
        self._final: Result | None = None
        self._lock = threading.Lock()

    @property
    def offsets(self) -> dict[str, float]:
        """Totals added to ours: those of a resumed run's earlier segments (assigned), and what
        an integration that sums the ranks adds to it in place (the other ranks')."""
        return self._offsets

    @offsets.setter
    def offsets(self, value: dict[str, float]) -> None:
        self._offsets = value
        # the earlier segments alone: an energy reference read in this one leaves them out
        self._earlier = dict(value)

    def start(self) -> Measurement:
        self.tracker.start()
        if Job.current().rank in (None, 0):  # the process that reports the job's totals
            try:
                self._references = ReferenceWindow(*reference_offers(self.settings)).start()
            except Exception as exc:
                log.warning("green-mlops: energy references unavailable: %s", exc)
        try:
            from green_mlops.carbon import CarbonAccountant

            self._accountant = CarbonAccountant(self.settings)
            now = time.time()
            self._accountant.refresh(now - now % HOUR, now + HOUR)  # prefetch this hour
        except Exception as exc:
            log.warning("green-mlops: carbon accounting unavailable: %s", exc)
            self._accountant = None
        return self

    @property
    def running(self) -> bool:
        return self.tracker.running

    def phase(self, name: str, *, precise: bool = True) -> Any:
        return self.tracker.phase(name, precise=precise)

    def intensity_chain(self) -> list[Any]:
        """The intensity series the run is priced with, most preferred first (its providers'
        forecasts included); empty without carbon accounting."""
        try:
            return list(self._accountant.chain) if self._accountant is not None else []
        except Exception:
            return []

    def forecast(self, progress: float, *, max_duration_s: float | None = None) -> Any:
        """:meth:`Tracker.forecast <green_mlops.tracker.Tracker.forecast>`, priced as the run
        is (its carbon so far, its intensity series, else the current value): a
        :class:`~green_mlops.forecast.Forecast`, or None before a steady state (said once).
        Reads the meters and composes the result: call it every few hundred steps, not per
        step. Raises ValueError for a ``progress`` outside (0, 1]."""
        from green_mlops.forecast import price_run

        found = self.tracker.forecast(progress, max_duration_s=max_duration_s)
        if found is None:
            return None
        return price_run(found, self.result().metrics, self.intensity_chain(), time.time())

    def add_child(self, child: Result) -> None:
        """Subtract a nested run's totals from ours (it reports them itself)."""
        self.subtract(child.metrics)

    def subtract(self, totals: dict[str, float]) -> None:
        """Leave ``totals`` (of :data:`~green_mlops.metrics.EXCLUSIVE_KEYS`) out of ours: nested
        runs report them."""
        with self._lock:
            for key in EXCLUSIVE_KEYS:
                if key in totals:
                    self._children[key] = self._children.get(key, 0.0) + totals[key]

    def result(self) -> Result:
        """The run so far (or the final result once stopped)."""
        if self._final is not None:
            return self._final
        return self._compose(self.tracker.snapshot(), wait_s=0.0)

    def checkpoint(self) -> Result:
        """A final result (carbon waited for, as at the end) of the run so far, without
        stopping: for a run that was terminated but may be written again."""
        if self._final is not None:
            return self._final
        return self._compose(self.tracker.snapshot(mark=True), wait_s=FINAL_WAIT_S, final=True)

    def stop(self) -> Result:
        """Stop and return the final result. Idempotent."""
        with self._lock:
            if self._final is None:
                snapshot = self.tracker.stop()
                self._final = self._compose(snapshot, wait_s=FINAL_WAIT_S, final=True)
                if self._accountant is not None:
                    self._accountant.close()
            return self._final

    def close(self) -> None:
        """Stop measuring without a result (nothing more will be reported). Idempotent."""
        with self._lock:
            if self._final is None:
                self._final = Result(self.tracker.stop(), {}, {}, final=True)
                if self._accountant is not None:
                    self._accountant.close()

    def _compose(self, snapshot: Snapshot, *, wait_s: float, final: bool = False) -> Result:
        metrics = energy_metrics(snapshot)
        tags = provenance_tags(snapshot)
        tags.update(job_tags(tags))
        fp: Any = None
        carbon: Any = None
        sentence = ""
        timeline = list(_energy_timeline(snapshot))
        try:
            from green_mlops.footprint import (
                footprint,
                footprint_metrics,
                footprint_tags,
                reporting_sentence,
            )

            chain = None
            skipped: dict[str, str] = {}
            location: Any = self.settings.location
            if self._accountant is not None:
                carbon = self._accountant.result(timeline, wait_s=wait_s)
                chain = self._accountant.chain
                skipped = dict(self._accountant.skipped)
                location = self._accountant.location
            fp = footprint(
                snapshot,
                carbon,
                self.settings,
                location=location,
                intensity_sources=chain or (),
                fallbacks=skipped,
                functional_units=self.functional_units,
            )
            metrics.update(footprint_metrics(fp))
            metrics.update(phase_carbon(metrics))
            tags.update(footprint_tags(fp))
            sentence = reporting_sentence(fp)
        except Exception as exc:  # energy is still worth logging
            log.exception("green-mlops: carbon/footprint failed")
            tags["green.problems"] = f"{tags.get('green.problems', '')} footprint failed: {exc}"
        if final and self._references is not None:  # another meter's whole-job figure
            found, said = self._references.figures()
            metrics.update(found)
            add_not_reported(tags, said.pop("green.not_reported", ""))
            tags.update(said)
        children = dict(self._children)  # a copy: nested runs end in threads
        for key, value in children.items():
            if key in metrics:
                metrics[key.replace("green/", "green/inclusive/", 1)] = metrics[key]
                metrics[key] -= value
        for key, value in self.offsets.items():
            if key in metrics and not key.endswith("intensity_g_per_kwh"):
                metrics[key] += value
        metrics.update(self.extra_metrics)
        tags.update(self.extra_tags)
        if final and self._references is not None:
            metrics.update(compare(metrics, tags, self._earlier))
        if final:  # launched by `green-mlops run`: its plan and the run-now carbon
            from green_mlops.scheduling.handoff import attach_schedule

            attach_schedule(self.settings, timeline, carbon, metrics, tags)
            from green_mlops.pilot import attach_estimate  # started from a pilot's estimate

            attach_estimate(metrics, tags)
        accounting = accounting_block(snapshot, timeline, carbon, fp, children, self.offsets)
        return Result(
            snapshot, metrics, tags, fp, sentence, power_series(snapshot), final, accounting
        )


def accounting_block(
    snapshot: Snapshot | None,
    timeline: Sequence[tuple[float, float]],
    carbon: Any,
    fp: Any,
    nested: Mapping[str, float],
    earlier: Mapping[str, float],
) -> dict[str, Any]:
    """The report's ``accounting``: the priced timeline, the intervals that priced it, the
    inputs (PUE, price, embodied) and this measurement's figures, and what the logged totals
    add or subtract (nested runs, earlier segments). See docs/report-format.md."""
    market = getattr(carbon, "market", None)

    def figure(name: str) -> Any:
        return getattr(fp, name, None)

    return {
        "timeline": [[t, j] for t, j in timeline],
        "intervals": [p.to_dict() for p in getattr(carbon, "intervals", ())],
        "market_intervals": None if market is None else [p.to_dict() for p in market.intervals],
        "pue": figure("pue"),
        "price_per_kwh": figure("price_per_kwh"),
        "currency": figure("currency"),
        "embodied": {
            "total_kgco2e": figure("embodied_total_kgco2e"),
            "hardware_lifetime_years": figure("hardware_lifetime_years"),
            "resource_share": figure("resource_share"),
            "reserved_s": figure("reserved_s"),
            "source": figure("embodied_source"),
        },
        "functional_unit": figure("functional_unit"),
        "functional_units": figure("functional_units"),
        "figures": {
            "energy_kwh": snapshot.kwh if snapshot is not None else None,
            "energy_facility_kwh": figure("facility_kwh"),
            "co2e_g": figure("operational_g"),
            "co2e_market_g": figure("market_g"),
            "cost": figure("cost"),
            "embodied_g": figure("embodied_g"),
            "sci_g": figure("sci_g"),
        },
        "adjustments": {"nested_runs": dict(nested), "earlier_segments": dict(earlier)},
    }


def phase_carbon(metrics: dict[str, float]) -> dict[str, float]:
    """``green/phase/<phase>_co2e_g``: each phase's share of the energy x the run's carbon.

    An apportionment by energy (the run's mean intensity), not a time-resolved sum per phase.
    """
    co2e, kwh = metrics.get("green/co2e_g"), metrics.get("green/energy_kwh", 0.0)
    if co2e is None or kwh <= 0:
        return {}
    return {
        key[: -len("_kwh")] + "_co2e_g": co2e * value / kwh
        for key, value in metrics.items()
        if key.startswith("green/phase/") and key.endswith("_kwh") and key.count("/") == 2
    }


def _energy_timeline(snapshot: Snapshot) -> Iterator[tuple[float, float]]:
    """(Unix time, cumulative joules), ending at the snapshot's end."""
    last = None
    for point in snapshot.timeline:
        last = (point.time, sum(point.joules_by_component.values()))
        yield last
    end = (snapshot.started_at + snapshot.duration_s, snapshot.joules)
    if last is None or end[0] > last[0]:
        yield end


def reference_offers(
    settings: Settings,
) -> tuple[list[EnergyReference], list[MeterUnavailable]]:
    """The references the plugins offer here, and those they cannot (with the reason)."""
    from green_mlops.plugin_manager import call_hook, get_plugin_manager

    pm = get_plugin_manager(settings.disable_plugins)
    items, failures = call_hook(
        pm,
        "green_mlops_energy_references",
        (EnergyReference, MeterUnavailable),
        settings=settings,
    )
    used = [item for _, item in items if isinstance(item, EnergyReference)]
    refused = [item for _, item in items if isinstance(item, MeterUnavailable)]
    refused += [MeterUnavailable(f.plugin, Component.OTHER, f.describe()) for f in failures]
    return used, refused


# --- one measurement per host run ---------------------------------------------------------

_registry: dict[str, tuple[Measurement, str]] = {}
_registry_lock = threading.Lock()


def claim(key: str, owner: str, factory: Any) -> tuple[Measurement, bool]:
    """The measurement of run ``key``: the existing one, or a new one from ``factory()`` owned
    by ``owner``. Returns ``(measurement, created)``; only the creator logs its totals."""
    with _registry_lock:
        existing = _registry.get(key)
        if existing is not None:
            return existing[0], False
        measurement = factory()
        _registry[key] = (measurement, owner)
        return measurement, True


def lookup(key: str) -> tuple[Measurement, str] | None:
    """(measurement, owner) of run ``key``, if one is registered."""
    with _registry_lock:
        return _registry.get(key)


def release(key: str) -> None:
    with _registry_lock:
        _registry.pop(key, None)
