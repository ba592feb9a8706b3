"""The Tracker: energy per device, component and phase, measured by the shared sampler thread.

    with Tracker() as tracker:
        with tracker.phase("train"):
            train()
    print(tracker.stop().kwh)

A phase boundary is O(1) in the caller's thread; after :meth:`Tracker.start` nothing raises into
the caller. How energy is split over phases: docs/energy-measurement.md.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from green_mlops.config import Settings
from green_mlops.log import warn_once
from green_mlops.meters import (
    Component,
    Device,
    DeviceError,
    Meter,
    MeterUnavailable,
    Method,
    Readings,
)
from green_mlops.plugin_manager import HookFailure, call_hook, get_plugin_manager
from green_mlops.sampler import get_sampler
from green_mlops.snapshot import (
    OTHER_PHASE,
    DeviceEnergy,
    PhaseEnergy,
    Snapshot,
    TimelinePoint,
)

__all__ = ["SMOOTHING_RESOLUTIONS", "MeterPart", "Tracker", "offers_from_plugins", "select_meters"]

log = logging.getLogger(__name__)

_MAX_TIMELINE = 4096

#: For a counter with a coarse resolution: a power integral that leaves the counter's band is
#: brought back over this many resolutions.
SMOOTHING_RESOLUTIONS = 10.0


class MeterPart(Meter):
    """Some of another meter's devices: only these are reported (the rest lost their component
    to a better meter). Starting, sampling and closing go to the whole meter."""

    def __init__(self, meter: Meter, devices: Sequence[Device]) -> None:
        super().__init__(list(devices))
        self.meter = meter
        self.name = meter.name
        self.max_interval_s = meter.max_interval_s
        self._ids = frozenset(d.id for d in devices)

    def start(self) -> None:
        self.meter.start()

    def sample(self, now: float) -> Readings:
        return {k: v for k, v in self.meter.sample(now).items() if k in self._ids}

    def power_w(self) -> Mapping[str, float]:
        return {k: v for k, v in self.meter.power_w().items() if k in self._ids}

    def close(self) -> None:
        self.meter.close()

    def notes(self) -> list[str]:
        return self.meter.notes()


def select_meters(
    offers: Sequence[Meter | MeterUnavailable],
) -> tuple[list[Meter], list[Meter], list[MeterUnavailable]]:
    """Split plugin offers into (used, superseded, unavailable).

    For each component, the meter whose best device method ranks highest wins (counter over
    sampled power over estimate); ties go to the first offer. ``other`` devices never compete.
    A meter that wins some components and loses others is used for its winning devices only
    and listed as superseded for the others (each part a :class:`MeterPart`), so no component
    is counted twice.
    """
    meters = [o for o in offers if isinstance(o, Meter)]
    unavailable = [o for o in offers if isinstance(o, MeterUnavailable)]
    winner: dict[Component, Meter] = {}
    for meter in meters:
        for component in {d.component for d in meter.devices} - {Component.OTHER}:
            best = min(d.method.rank for d in meter.devices if d.component == component)
            current = winner.get(component)
            if current is None or best < min(
                d.method.rank for d in current.devices if d.component == component
            ):
                winner[component] = meter
    used: list[Meter] = []
    superseded: list[Meter] = []
    for meter in meters:
        keep = [
            d
            for d in meter.devices
            if d.component is Component.OTHER or winner.get(d.component) is meter
        ]
        lose = [d for d in meter.devices if d.component is not Component.OTHER and d not in keep]
        if not lose:
            used.append(meter)
        elif not keep:
            superseded.append(meter)
        else:
            used.append(MeterPart(meter, keep))
            superseded.append(MeterPart(meter, lose))
    return used, superseded, unavailable


class _DeviceState:
    __slots__ = (
        "device",
        "failures",
        "joules",
        "meter",
        "powered",
        "problem",
        "since",
        "t",
        "watts",
        "zero",
    )

    def __init__(self, meter: Meter, device: Device) -> None:
        self.meter = meter
        self.device = device
        self.joules = 0.0  # the meter's count (since its start) at the last read
        self.zero = 0.0  # its count at the tracker's zero point: the run's energy is the rest
        self.problem: str | None = None
        self.failures = 0
        #: Cumulative phase seconds at the last attributed read: the device's energy since then
        #: is split over the phase time accumulated since.
        self.since: Mapping[str, float] = {}
        self.t = 0.0  # time of the last good read (coarse counters)
        self.watts: float | None = None  # power at that read (coarse counters)
        self.powered = 0  # reads apportioned by power (coarse counters)


class Tracker:
    """Measures energy from :meth:`start` to :meth:`stop`, per device, component and phase.

    Args:
        settings: a :class:`Settings`, a mapping of setting names to values, or ``None``
            (``GREEN_MLOPS_*`` and defaults), resolved by :meth:`Settings.resolve`.
        meters: use these meters instead of asking the plugins (for tests and embedding).
        clock: the monotonic clock for phase marks and readings (``time.monotonic``; tests
            pass one they control). Meters receive its time in ``sample(now)``.
        **overrides: settings as keyword arguments (``sample_interval_s=0.1``, ...).

    Raises:
        ConfigError: at construction, for an invalid setting.
    """

    def __init__(
        self,
        settings: Settings | Mapping[str, Any] | None = None,
        *,
        meters: Sequence[Meter | MeterUnavailable] | None = None,
        clock: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> None:
        settings = Settings.resolve(settings, **overrides)
        self.settings = settings
        self._offers = None if meters is None else list(meters)
        self._clock: Callable[[], float] = time.monotonic if clock is None else clock
        self._lock = threading.RLock()
        self._events: collections.deque[tuple[float, bool, str]] = collections.deque()
        self._stack: list[str] = []
        self._meters: list[Meter] = []
        self._counters: list[Meter] = []  # the meters a phase boundary reads
        self._superseded: list[Meter] = []
        self._unavailable: list[MeterUnavailable] = []
        self._states: dict[str, _DeviceState] = {}
        self._phase_joules: dict[str, dict[str, float]] = {}
        self._phase_seconds: dict[str, float] = {}
        self._phase_entries: dict[str, int] = {}
        self._problems: dict[str, None] = {}
        self._timeline: list[TimelinePoint] = []
        self._timeline_step = settings.log_interval_s
        self._pid = os.getpid()
        self._started = False
        self._final: Snapshot | None = None
        self._t0 = self._last = self._last_timeline = 0.0
        self._unix0 = 0.0
        self._forecaster: Any = None
        self.interval_s = settings.sample_interval_s

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._started and self._final is None and os.getpid() == self._pid

    def start(self) -> Tracker:
        """Discover meters and start measuring. Calling it again while running does nothing."""
        if self._started:
            return self
        offers = self._offers if self._offers is not None else offers_from_plugins(self.settings)
        self._meters, self._superseded, self._unavailable = select_meters(offers)
        for item in self._unavailable:
            if not item.quiet:  # with a fix to apply here, the user must act: a GreenMlopsWarning
                warn_once(item.describe(), fix=bool(item.fix) and item.actionable)
        started: list[Meter] = []
        for meter in self._meters:
            try:
                meter.start()
            except Exception as exc:
                self._problem(f"meter {meter.name} failed to start: {exc}")
                continue
            started.append(meter)
            for device in meter.devices:
                self._states[device.id] = _DeviceState(meter, device)
        self._meters = started
        self._counters = [m for m in started if any(d.method is Method.COUNTER for d in m.devices)]
        if started:
            self.interval_s = min(
                [self.settings.sample_interval_s, *(m.max_interval_s for m in started)]
            )
        self._t0 = self._last = self._last_timeline = self._clock()
        for meter in started:  # the zero point: what each meter counted while others started
            try:
                zero = meter.sample(self._t0)
            except Exception:
                zero = {}  # read again at the first sample; that read then counts from start()
            watts = self._power(meter)
            for device in meter.devices:
                state = self._states[device.id]
                state.t, state.watts = self._t0, watts.get(device.id)
                value = zero.get(device.id)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    state.joules = state.zero = float(value)
        self._unix0 = time.time()
        self._timeline.append(TimelinePoint(self._unix0, {}))
        self._started = True
        get_sampler().add(self)
        return self

    def stop(self) -> Snapshot:
        """Stop measuring and return the final snapshot. Idempotent; never raises."""
        if self._final is not None:
            return self._final
        if not self._started:
            return self._empty("the tracker was never started")
        if os.getpid() != self._pid:
            return self._empty("this tracker was started in another process (before a fork)")
        try:
            get_sampler().remove(self)
            with self._lock:
                self._sample(self._clock(), self._meters)
                self._append_timeline(force=True)
                final = self._build(running=False)
                self._final = final
            for meter in self._meters:
                try:
                    meter.close()
                except Exception as exc:
                    self._problem(f"meter {meter.name} failed to close: {exc}")
            return final
        except Exception as exc:  # never raise into training code
            log.exception("green-mlops: stopping the tracker failed")
            self._final = self._empty(f"stopping failed: {exc}")
            return self._final

    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- phases ----------------------------------------------------------------------------

    def enter(self, name: str, *, precise: bool = True) -> None:
        """Mark the start of phase ``name``. ``precise`` wakes the sampler to read the energy
        counters (if there are any); leave it False for very frequent phases (per-batch data
        wait), which are attributed by time."""
        if self._final is not None:
            return
        self._events.append((self._clock(), True, name))
        if precise and self._counters:
            self._wake()

    def exit(self, name: str, *, precise: bool = True) -> None:
        """Mark the end of phase ``name`` (the innermost open phase of that name)."""
        if self._final is not None:
            return
        self._events.append((self._clock(), False, name))
        if precise and self._counters:
            self._wake()

    @contextlib.contextmanager
    def phase(self, name: str, *, precise: bool = True) -> Iterator[None]:
        """Context manager around :meth:`enter` / :meth:`exit`."""
        self.enter(name, precise=precise)
        try:
            yield
        finally:
            self.exit(name, precise=precise)

    @property
    def current_phase(self) -> str:
        """The innermost open phase as of the last sample (``other`` outside phases)."""
        return self._stack[-1] if self._stack else OTHER_PHASE

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self, *, mark: bool = False) -> Snapshot:
        """The energy so far. Reads the meters now (in the caller's thread); never raises.

        ``mark`` also ends the timeline here (a point now, as :meth:`stop` adds), for a result
        that must cover the time up to now: the values at a run's termination."""
        if self._final is not None:
            return self._final
        if not self.running:
            return self._empty("the tracker is not running")
        try:
            with self._lock:
                self.sample_now()
                if mark:
                    self._append_timeline(force=True)
                return self._build(running=True)
        except Exception as exc:
            self._problem(f"snapshot failed: {exc}")
            return self._empty(f"snapshot failed: {exc}")

    def forecast(self, progress: float, *, max_duration_s: float | None = None) -> Any:
        """The loop's total energy and duration (a :class:`green_mlops.forecast.Forecast`, with
        a band) when ``progress`` (0, 1] of it is done; None before a steady state (said once).
        Reads the meters now. Raises ValueError for a progress outside (0, 1]."""
        from green_mlops.forecast import Forecaster, tracker_forecast

        if self._forecaster is None:
            self._forecaster = Forecaster()
        return tracker_forecast(self._forecaster, self.snapshot(), progress, max_duration_s)

    def sample_now(self, now: float | None = None, *, counters_only: bool = False) -> None:
        """Read the meters and attribute their energy since their last read (sampler's entry).

        ``now`` defaults to the tracker's clock. ``counters_only`` (a phase boundary) reads only
        the meters with an energy counter; the others wait for the next full sample.
        """
        with self._lock:
            if self._final is not None or os.getpid() != self._pid:
                return
            self._sample(
                self._clock() if now is None else now,
                self._counters if counters_only else self._meters,
            )
            if not counters_only:
                self._append_timeline()

    def _sample(self, now: float, meters: Sequence[Meter]) -> None:
        self._advance(now)
        mark = dict(self._phase_seconds)
        shares: dict[int, tuple[object, dict[str, float]]] = {}  # by id of a ``since``
        for meter in meters:
            try:
                readings = meter.sample(now)
            except Exception as exc:
                readings = {
                    d.id: DeviceError(f"{type(exc).__name__}: {exc}") for d in meter.devices
                }
            watts: Mapping[str, float] | None = None
            for device in meter.devices:
                state = self._states.get(device.id)
                if state is None:
                    continue
                value = readings.get(device.id, DeviceError("no reading returned"))
                if isinstance(value, DeviceError):
                    state.failures += 1
                    if state.problem != value.reason:
                        state.problem = value.reason
                        self._problem(f"{device.id} ({meter.name}): {value.reason}")
                    continue
                state.problem = None
                if device.resolution_s > 0:
                    if watts is None:
                        watts = self._power(meter)
                    value = self._smooth(state, value, watts.get(device.id), now)
                if value > state.joules:
                    self._assign(state, value - state.joules, mark, shares)
                    state.joules = value
                state.since = mark

    def _advance(self, now: float) -> None:
        """Consume the phase marks up to ``now``, adding each phase's time up to ``now``.

        Runs in the sampler thread for every mark (per-batch ones included), so it is kept to
        a few operations per mark."""
        events, stack = self._events, self._stack
        seconds, entries = self._phase_seconds, self._phase_entries
        get, pop = seconds.get, events.popleft
        cursor = self._last
        leaf = stack[-1] if stack else OTHER_PHASE
        while events and events[0][0] <= now:
            t, entering, name = pop()
            if t > cursor:
                seconds[leaf] = get(leaf, 0.0) + (t - cursor)
                cursor = t
            elif leaf not in seconds:
                seconds[leaf] = 0.0
            if entering:
                stack.append(name)
                entries[name] = entries.get(name, 0) + 1
            elif stack and stack[-1] == name:
                stack.pop()
            elif name in stack:
                del stack[len(stack) - 1 - stack[::-1].index(name)]
            leaf = stack[-1] if stack else OTHER_PHASE
        seconds[leaf] = get(leaf, 0.0) + max(0.0, now - cursor)
        self._last = max(self._last, now)

    def _assign(
        self,
        state: _DeviceState,
        joules: float,
        mark: Mapping[str, float],
        cache: dict[int, tuple[object, dict[str, float]]],
    ) -> None:
        """Split a device's ``joules`` over the phase time since its last read, by time."""
        since = state.since
        cached = cache.get(id(since))  # the entry keeps ``since`` alive: its id stays unique
        if cached is not None:
            shares = cached[1]
        else:
            span = {p: s - since.get(p, 0.0) for p, s in mark.items() if s > since.get(p, 0.0)}
            total = sum(span.values())
            shares = (
                {p: s / total for p, s in span.items()} if total > 0 else {self.current_phase: 1.0}
            )
            cache[id(since)] = (since, shares)
        device = state.device.id
        for phase, share in shares.items():
            bucket = self._phase_joules.setdefault(phase, {})
            bucket[device] = bucket.get(device, 0.0) + joules * share

    def _smooth(
        self, state: _DeviceState, counted: float, watts: float | None, now: float
    ) -> float:
        """A coarse counter's energy at ``now``: the power integral, pulled towards [counter,
        counter + one step of power], where the truth lies, in proportion to the interval's
        share of the horizon (docs/energy-measurement.md, "Phases")."""
        resolution = state.device.resolution_s
        dt = now - state.t
        if watts is None or state.watts is None or dt < 0:
            value = counted
        else:
            value = state.joules + 0.5 * (state.watts + watts) * dt
            high = counted + max(watts, state.watts) * resolution
            gap = counted - value if value < counted else min(0.0, high - value)
            value += gap * min(1.0, dt / (SMOOTHING_RESOLUTIONS * resolution))
            state.powered += 1
        state.t, state.watts = now, watts
        return value

    def _power(self, meter: Meter) -> Mapping[str, float]:
        try:
            return meter.power_w()
        except Exception as exc:
            self._problem(f"meter {meter.name} power reading failed: {exc}")
            return {}

    def _append_timeline(self, *, force: bool = False) -> None:
        if not force and self._last - self._last_timeline < self._timeline_step:
            return
        self._last_timeline = self._last
        totals: dict[str, float] = {}
        for state in self._states.values():
            key = state.device.component.value
            totals[key] = totals.get(key, 0.0) + state.joules - state.zero
        self._timeline.append(TimelinePoint(self._unix(self._last), totals))
        if len(self._timeline) > _MAX_TIMELINE:  # halve the resolution, keep first and last
            self._timeline = self._timeline[::2] + (
                [self._timeline[-1]] if len(self._timeline) % 2 == 0 else []
            )
            self._timeline_step *= 2

    def _build(self, *, running: bool) -> Snapshot:
        devices = tuple(
            DeviceEnergy(
                device=s.device.id,
                component=s.device.component.value,
                meter=s.meter.name,
                method=s.device.method.value,
                joules=s.joules - s.zero,
                uncertainty=s.device.uncertainty,
                status="failed" if s.problem else ("degraded" if s.failures else "ok"),
                problem=s.problem,
                label=s.device.label,
                resolution_s=s.device.resolution_s,
            )
            for s in self._states.values()
        )
        phases = {
            name: PhaseEnergy(
                name=name,
                duration_s=self._phase_seconds.get(name, 0.0),
                entries=self._phase_entries.get(name, 0),
                joules_by_device=dict(self._phase_joules.get(name, {})),
            )
            for name in {*self._phase_seconds, *self._phase_joules}
        }
        notes: list[str] = []
        for meter in self._meters:
            try:
                notes.extend(f"{meter.name}: {note}" for note in meter.notes())
            except Exception as exc:
                self._problem(f"meter {meter.name} notes failed: {exc}")
        notes.extend(
            self._resolution_note(s) for s in self._states.values() if s.device.resolution_s > 0
        )
        return Snapshot(
            started_at=self._unix0,
            duration_s=self._last - self._t0,
            devices=devices,
            phases=phases,
            timeline=tuple(self._timeline),
            unavailable=tuple(u.describe() for u in self._unavailable),
            superseded=tuple(
                f"{m.name} ({', '.join(sorted({d.component.value for d in m.devices}))})"
                for m in self._superseded
            ),
            problems=tuple(self._problems),
            notes=tuple(notes),
            running=running,
        )

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _resolution_note(state: _DeviceState) -> str:
        resolution = state.device.resolution_s
        head = (
            f"{state.device.id} ({state.meter.name}): the energy counter changes every "
            f"~{resolution:g} s"
        )
        if not state.powered:
            return f"{head}; no power reading, so phases shorter than that get its steps"
        return (
            f"{head}; energy apportioned by power x time between reads ({state.powered} reads),"
            f" held within one step of the counter (a drift is corrected over "
            f"{SMOOTHING_RESOLUTIONS * resolution:g} s)"
        )

    def _unix(self, monotonic: float) -> float:
        return self._unix0 + (monotonic - self._t0)

    def _wake(self) -> None:
        get_sampler().request(self)

    def _problem(self, message: str) -> None:
        if message not in self._problems:
            self._problems[message] = None
            warn_once(message)

    def _empty(self, problem: str) -> Snapshot:
        return Snapshot(
            started_at=self._unix0 or time.time(),
            duration_s=0.0,
            devices=(),
            phases={},
            problems=(*self._problems, problem),
            running=False,
        )


def offers_from_plugins(settings: Settings) -> list[Meter | MeterUnavailable]:
    """Ask every registered plugin for its meters (and the ones it cannot provide here).

    Each plugin is asked on its own: one that failed to load or whose hook raises is listed as
    unavailable, with its name and the error, and the others' meters are still used.
    """
    pm = get_plugin_manager(settings.disable_plugins)
    offers: list[Meter | MeterUnavailable] = [
        MeterUnavailable(name, Component.OTHER, f"plugin failed to load ({error})")
        for name, error in pm.load_errors.items()
    ]
    found: tuple[list[tuple[str, Meter | MeterUnavailable]], list[HookFailure]] = call_hook(
        pm, "green_mlops_meters", (Meter, MeterUnavailable), settings=settings
    )
    items, failures = found
    offers.extend(
        MeterUnavailable(f.plugin, Component.OTHER, f"hook {f.hook} failed ({f.error})")
        for f in failures
    )
    offers.extend(item for _, item in items)
    return offers
