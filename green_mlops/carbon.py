"""Time-resolved carbon accounting: energy in each interval x the intensity of that interval.

Providers are chained, most preferred first; each piece of time is priced by the first series
that covers it. Exact and additive. See docs/carbon-accounting.md.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from green_mlops.intensity import (
    MARKET_BASED,
    IntensityProvider,
    IntensitySeries,
    IntensityUnavailable,
)
from green_mlops.location import UNKNOWN, Location, parse_location
from green_mlops.log import warn_once
from green_mlops.plugin_manager import call_hook, get_plugin_manager
from green_mlops.units import J_PER_KWH

if TYPE_CHECKING:  # config reads this module (provider names): it must not import config
    from green_mlops.config import Settings

__all__ = [
    "DEFAULT_INTENSITY_PROVIDERS",
    "MARKET_BASED",
    "SKIPPED_DEFAULT",
    "CarbonAccountant",
    "CarbonResult",
    "PricedInterval",
    "account",
    "resolve",
]
#: Ends the reason of a provider that the default list names but nobody configured: it was
#: never chosen, so pricing by the next one is not a fallback (``green-mlops compare``).
SKIPPED_DEFAULT = "(not configured: skipped from the default list)"

log = logging.getLogger(__name__)

#: The built-in providers, best first (the default of ``GREEN_MLOPS_INTENSITY_PROVIDERS``); a
#: name whose plugin is disabled is skipped, not refused.
DEFAULT_INTENSITY_PROVIDERS = ("constant", "electricitymaps", "watttime", "static")


@dataclass(frozen=True)
class PricedInterval:
    """``[start, end)`` priced at ``g_per_kwh`` by ``series``, the first in the chain there."""

    start: float
    end: float
    g_per_kwh: float
    series: IntensitySeries

    def to_dict(self) -> dict[str, object]:
        """The report's form (docs/report-format.md, ``accounting.intervals``)."""
        s = self.series
        return {
            "start": self.start,
            "end": self.end,
            "g_per_kwh": self.g_per_kwh,
            "source": s.source,
            "dataset": s.dataset,
            "zone": s.zone,
            "basis": s.basis,
            "scope": s.scope,
            "estimated": s.estimated,
            "vintage": s.vintage,
        }


@dataclass(frozen=True)
class CarbonResult:
    """Carbon of an energy timeline, with the sources that priced it."""

    grams: float
    kwh: float
    #: kWh priced by each source (``IntensitySeries.describe()``), in chain order.
    kwh_by_source: dict[str, float]
    #: kWh that no series covered (0 when the chain ends with a yearly table).
    unpriced_kwh: float = 0.0
    #: The intensity over the priced span (first to last interval with energy): disjoint,
    #: sorted, clipped to the span; what the energy was priced with.
    intervals: tuple[PricedInterval, ...] = ()
    #: The market-based figure (the whole chain, contracts first where preferred), when a
    #: series of the chain is :data:`MARKET_BASED`; this result is then location-based only.
    market: CarbonResult | None = None

    @property
    def mean_g_per_kwh(self) -> float:
        priced = self.kwh - self.unpriced_kwh
        return self.grams / priced if priced > 0 else float("nan")

    @property
    def primary_source(self) -> str:
        """The source that priced the most energy."""
        if not self.kwh_by_source:
            return "none"
        return max(self.kwh_by_source.items(), key=lambda item: item[1])[0]


def account(
    timeline: Sequence[tuple[float, float]], chain: Sequence[IntensitySeries]
) -> CarbonResult:
    """Carbon of ``timeline`` ((Unix time, cumulative joules), sorted) priced by ``chain``.

    Each energy interval is spread evenly over its time and priced by the pieces of
    :func:`resolve` it overlaps; time no series covers is unpriced. O(timeline + points): the
    timeline and the pieces are both sorted, so one cursor only moves forward.
    """
    steps = []
    for (t0, e0), (t1, e1) in itertools.pairwise(timeline):
        if e1 - e0 > 0:  # t0 + 1e-9 == t0 for Unix times: a zero-length step gets the next float
            steps.append((t0, t1 if t1 > t0 else math.nextafter(t0, math.inf), e1 - e0))
    pieces = resolve(chain, steps[0][0], steps[-1][1]) if steps else ()
    order = {id(series): k for k, series in reversed(list(enumerate(chain)))}
    starts, ends = [p.start for p in pieces], [p.end for p in pieces]
    rates, owners = [p.g_per_kwh for p in pieces], [order[id(p.series)] for p in pieces]
    joules_by = [0.0] * len(chain)
    gram_joules = unpriced_j = 0.0  # gCO2e/kWh x J: divided by J_PER_KWH once at the end
    i, n = 0, len(pieces)
    for t0, t1, joules in steps:
        while i < n and ends[i] <= t0:
            i += 1
        if i < n and starts[i] <= t0 and t1 <= ends[i]:  # the common case: one piece covers it
            gram_joules += joules * rates[i]
            joules_by[owners[i]] += joules
            continue
        watts, cursor, j = joules / (t1 - t0), t0, i
        while j < n and starts[j] < t1:
            lo, hi = max(t0, starts[j]), min(t1, ends[j])
            share = watts * (hi - lo)
            gram_joules += share * rates[j]
            joules_by[owners[j]] += share
            unpriced_j += watts * (lo - cursor)
            cursor, j = hi, j + 1
        unpriced_j += watts * (t1 - cursor)
    by_source: dict[str, float] = {}
    for series, joules in zip(chain, joules_by, strict=True):
        if joules > 0:
            key = series.describe()
            by_source[key] = by_source.get(key, 0.0) + joules / J_PER_KWH
    return CarbonResult(
        grams=gram_joules / J_PER_KWH,
        kwh=sum(joules for _, _, joules in steps) / J_PER_KWH,
        kwh_by_source=by_source,
        unpriced_kwh=unpriced_j / J_PER_KWH,
        intervals=pieces,
    )


def resolve(
    chain: Sequence[IntensitySeries], start: float, end: float
) -> tuple[PricedInterval, ...]:
    """The intensity over ``[start, end)`` by :func:`account`'s rule (each piece of time from
    the first series that covers it): disjoint pieces, sorted; time no series covers is left
    out. O(points)."""
    pieces: list[PricedInterval] = []
    gaps = [(start, end)] if end > start else []
    for series in chain:
        if not gaps:
            break
        pts = series.points
        ends = [p.end for p in pts]
        remaining: list[tuple[float, float]] = []
        for a, b in gaps:
            j = bisect.bisect_right(ends, a)  # the first point ending after a
            cursor = a
            while j < len(pts) and pts[j].start < b:
                p = pts[j]
                lo, hi = max(cursor, p.start), min(b, p.end)
                if lo > cursor:
                    remaining.append((cursor, lo))
                pieces.append(PricedInterval(lo, hi, p.g_per_kwh, series))
                cursor = hi
                if cursor >= b:
                    break
                j += 1
            if cursor < b:
                remaining.append((cursor, b))
        gaps = remaining
    return tuple(sorted(pieces, key=lambda p: p.start))


class CarbonAccountant:
    """Fetches intensity for a run off the training thread and prices its energy.

    ``start(t)`` begins a background refresh; ``refresh()`` may be called again during long runs;
    ``result(timeline)`` prices the energy with whatever the providers returned, waiting at most
    ``wait_s`` for a fetch still under way. Providers that are not configured or fail are
    skipped and the reason is kept in :attr:`skipped` (provenance).
    """

    def __init__(
        self,
        settings: Settings,
        providers: Sequence[IntensityProvider] | None = None,
    ) -> None:
        self.settings = settings
        self.location: Location = (
            parse_location(settings.location) if settings.location else UNKNOWN
        )
        problems: dict[str, str] = {}
        #: Providers made for this accountant (by the plugins) are closed with it; ones passed
        #: in belong to the caller.
        self._owns_providers = providers is None
        if providers is None:
            providers, problems = chosen_providers(settings)
        self._providers = list(providers)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._future: Future[list[IntensitySeries]] | None = None
        self._series: list[IntensitySeries] = []
        #: Why each provider (or plugin) priced nothing: provenance (green.intensity.fallbacks).
        self.skipped: dict[str, str] = dict(problems)
        if not self.location.known:
            _warn_unknown_location()

    @property
    def providers(self) -> list[IntensityProvider]:
        return list(self._providers)

    @property
    def chain(self) -> list[IntensitySeries]:
        """The series of the last completed fetch, in preference order."""
        with self._lock:
            return list(self._series)

    def refresh(
        self, start: float, end: float, *, queue: bool = False
    ) -> Future[list[IntensitySeries]]:
        """Fetch ``[start, end)`` from every provider in the background, one fetch at a time.

        While a fetch is under way it is returned instead of starting another, unless ``queue``:
        then a new fetch of this range runs after it (the final one of a run needs its end).
        """
        with self._lock:
            if not queue and self._future is not None and not self._future.done():
                return self._future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="green-mlops-intensity")
            try:
                self._future = self._pool.submit(self._fetch, start, end)
                return self._future
            except RuntimeError:  # interpreter exit (or closed): executors take no new work
                future: Future[list[IntensitySeries]] = Future()
                self._future = future

        def fetch() -> None:
            try:
                future.set_result(self._fetch(start, end))
            except BaseException as exc:
                future.set_exception(exc)

        try:  # a plain thread, so that result() can still bound its wait
            threading.Thread(target=fetch, name="green-mlops-intensity", daemon=True).start()
        except RuntimeError:  # no new threads either: fetch here (bounded by HTTP timeouts)
            fetch()
        return future

    def result(
        self, timeline: Sequence[tuple[float, float]], *, wait_s: float = 2.0
    ) -> CarbonResult:
        """Price ``timeline`` now. Never raises; an unpriced remainder is reported as such.

        ``wait_s > 0`` (the end of a run): fetch the whole range and wait that long for it.
        ``wait_s == 0`` (a live result): price with what was fetched so far, refreshing in the
        background for the next call.
        """
        if timeline:
            start, end = timeline[0][0], timeline[-1][0]
            future = self.refresh(start, end, queue=wait_s > 0)
            if wait_s > 0:
                try:
                    future.result(timeout=wait_s)
                except Exception as exc:  # timeout or a provider bug: use what we have
                    self.skipped["fetch"] = (
                        f"intensity for the whole run not fetched within {wait_s:g} s "
                        f"({type(exc).__name__}); earlier data and the fallbacks priced it"
                    )
        with self._lock:
            chain = list(self._series)
        location = [s for s in chain if s.basis != MARKET_BASED]
        carbon = account(timeline, location)
        if len(location) < len(chain):  # a contract's figure: reported apart (never in SCI)
            carbon = dataclasses.replace(carbon, market=account(timeline, chain))
        return carbon

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._close_providers()

    def _close_providers(self) -> None:
        """Close the HTTP sessions of the providers made for this accountant (urllib3 lets a
        request still in flight finish)."""
        if not self._owns_providers:
            return
        for provider in self._providers:
            try:
                provider.close()
            except Exception:  # a provider bug must not surface at the end of a run
                log.exception("green-mlops: closing intensity provider %s failed", provider.name)

    def _fetch(self, start: float, end: float) -> list[IntensitySeries]:
        chain: list[IntensitySeries] = []
        for provider in self._providers:
            reason = provider.configured()
            if reason is not None:  # unconfigured in the default list: not a fallback, said so
                default = self.settings.intensity_providers == DEFAULT_INTENSITY_PROVIDERS
                self.skipped[provider.name] = f"{reason} {SKIPPED_DEFAULT}" if default else reason
                continue
            try:
                series = provider.series(self.location, start, end)
            except IntensityUnavailable as exc:
                self.skipped[provider.name] = str(exc)
                continue
            except Exception as exc:  # a provider bug must not lose the run's carbon
                log.exception("green-mlops: intensity provider %s failed", provider.name)
                self.skipped[provider.name] = f"failed: {type(exc).__name__}"
                continue
            self.skipped.pop(provider.name, None)
            chain.append(series)
            # a market-based figure covering the run still needs the location-based one
            if series.basis != MARKET_BASED and series.covered(start, end) >= end - start:
                break
        with self._lock:
            self._series = chain
        self.skipped.pop("fetch", None)
        return chain


def offered_providers(
    settings: Settings,
) -> tuple[dict[str, IntensityProvider], dict[str, str], dict[str, str]]:
    """``(offered, failed, not_loaded)``: every provider the loaded plugins offer, by name (the
    first plugin to offer a name wins); the plugins whose hook failed; the plugins that failed
    to load (any of them may have been a provider's). Failures are ``{"plugin <name>": why}``.

    Each plugin's hook is called on its own, so one that raises leaves the others' providers.
    """
    pm = get_plugin_manager(settings.disable_plugins)
    items, failures = call_hook(
        pm, "green_mlops_intensity_providers", IntensityProvider, settings=settings
    )
    offered: dict[str, IntensityProvider] = {}
    for _, provider in items:
        offered.setdefault(provider.name, provider)
    failed = {f"plugin {f.plugin}": f"hook {f.hook} failed ({f.error})" for f in failures}
    not_loaded = {f"plugin {name}": f"failed to load ({e})" for name, e in pm.load_errors.items()}
    return offered, failed, not_loaded


def chosen_providers(settings: Settings) -> tuple[list[IntensityProvider], dict[str, str]]:
    """The providers named in ``settings.intensity_providers``, in that order, and for
    provenance why each missing one is missing and which plugins failed.

    Names are checked against the plugins when the settings are loaded
    (:func:`unknown_provider_names`), so a name missing here belongs to a plugin that failed to
    load or was disabled (a default name), never to a typo.
    """
    offered, problems, not_loaded = offered_providers(settings)
    chosen: list[IntensityProvider] = []
    for name in settings.intensity_providers:
        if name in offered:
            chosen.append(offered[name])
            continue
        disabled = ", ".join(sorted(settings.disable_plugins))
        problems[name] = "not offered by any loaded plugin" + (
            f" (disabled plugins: {disabled})" if disabled else ""
        )
        problems.update(not_loaded)
        if settings.intensity_providers != DEFAULT_INTENSITY_PROVIDERS:
            _warn_once_missing(name, sorted(offered))
    return chosen, problems


def unknown_provider_names(settings: Settings) -> tuple[list[str], list[str]] | None:
    """``(unknown names, offered names)`` when ``settings.intensity_providers`` names a provider
    that no plugin offers; ``None`` when all are offered, or when a plugin failed (it may have
    been the one offering it: the run then says so in its provenance instead of not starting).
    """
    offered, failed, not_loaded = offered_providers(settings)
    unknown = [name for name in settings.intensity_providers if name not in offered]
    if not unknown or failed or not_loaded:
        return None
    return unknown, sorted(offered)


def _warn_once_missing(name: str, available: list[str]) -> None:
    warn_once(
        f"intensity provider {name!r} is not offered by any loaded plugin "
        f"(GREEN_MLOPS_INTENSITY_PROVIDERS); available: {', '.join(available) or 'none'}",
        fix=True,
    )


def _warn_unknown_location() -> None:
    warn_once(
        "location unknown, so carbon uses the WORLD AVERAGE grid intensity. "
        "Set GREEN_MLOPS_LOCATION to a country (DE), an Electricity Maps zone (US-CAL-CISO) "
        "or a cloud region (aws:eu-west-1).",
        fix=True,
    )
