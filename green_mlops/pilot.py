"""A pilot run prices the full run: energy, time, carbon and cost from the pilot's joules per
FLOP, MFU, phase shares and power (``green-mlops estimate``; docs/forecasts.md).

The full run's FLOPs come from ``--flops N``, ``--scale params=4x,tokens=10x`` (training FLOPs
~ 6 N D: both factors multiply them) or ``--epochs E`` (the pilot's epochs scaled). Energy is the
pilot's J/FLOP times the full FLOPs; time follows at the pilot's FLOP/s, or, on other hardware,
at the pilot's MFU times that hardware's dense peak. With ``--scale``, the pilot's data wait and
loop overhead (phases ``data_wait``, ``other``) grow with the tokens only and its sanity check
with the params only (they do not grow with the model: benchmarks/pilot.py). The band: the
pilot's own energy band plus an allowance for the extrapolation (:data:`SCALE_BAND`).

One pilot cannot tell its per-batch overheads (Python, data loading, optimizer bookkeeping)
from its compute: a larger model's J/FLOP is lower. Two pilots of one family on the same data
(:func:`estimate_trend`, ``--pilot A --pilot B``) separate them: each phase = a fixed part + a
part proportional to its FLOPs, fitted through both (the point); the band reaches down to a
power law in the FLOPs through both (:data:`TREND_BAND` wider each side).

The full run is tagged with its pilot: ``green-mlops estimate ... --save FILE`` writes the
estimate (:func:`save_estimate`); a measured run started with ``GREEN_MLOPS_ESTIMATE=FILE``
(:data:`ESTIMATE_ENV`) gets ``green.estimate.pilot_run_id`` and, at its end,
``green/estimate/error`` = (measured - estimate) / estimate (:func:`attach_estimate`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from green_mlops.config import ConfigError
from green_mlops.flops_peaks import DENSE_PEAKS, find_peak, peak_flops
from green_mlops.metrics import add_not_reported
from green_mlops.units import J_PER_KWH

log = logging.getLogger(__name__)

__all__ = [
    "ERROR_KEY",
    "ESTIMATE_ENV",
    "SCALE_BAND",
    "Estimate",
    "PilotError",
    "attach_estimate",
    "check_estimate",
    "estimate",
    "estimate_trend",
    "parse_scale",
    "save_estimate",
]

#: The environment variable naming a ``green-mlops estimate --save`` file for the run started.
ESTIMATE_ENV = "GREEN_MLOPS_ESTIMATE"
#: (measured - estimate) / estimate of the run's total energy, logged at its end.
ERROR_KEY = "green/estimate/error"

#: Half-width allowance for extrapolating: the same FLOPs (``--flops``/``--epochs``) or a larger
#: model (``--scale``: utilisation and J/FLOP change with size), and other hardware.
SCALE_BAND = {"flops": 0.10, "epochs": 0.10, "scale": 0.25, "hardware": 0.25}
#: Two pilots: the band's allowance beyond the two laws fitted through them (run-to-run noise;
#: J/FLOP rising at a larger size, e.g. out of cache).
TREND_BAND = 0.10
#: Two pilots whose FLOPs differ by less than this factor give no usable trend.
MIN_TREND_RATIO = 1.5

Pilot = tuple[Mapping[str, float], Mapping[str, str]]


class PilotError(ConfigError):
    """The pilot cannot price the full run (the message says what to log or pass)."""


@dataclass(frozen=True)
class Estimate:
    flops: float
    energy_kwh: float
    low_kwh: float
    high_kwh: float
    duration_s: float
    co2e_g: float | None
    cost: float | None
    currency: str
    #: Phase -> share of the energy, as in the pilot.
    phases: Mapping[str, float]
    assumptions: tuple[str, ...] = field(default=())

    def metrics(self) -> dict[str, float]:
        out = {
            "green/estimate/energy_kwh": self.energy_kwh,
            "green/estimate/energy_low_kwh": self.low_kwh,
            "green/estimate/energy_high_kwh": self.high_kwh,
            "green/estimate/duration_s": self.duration_s,
            "green/estimate/flops": self.flops,
        }
        if self.co2e_g is not None:
            out["green/estimate/co2e_g"] = self.co2e_g
        if self.cost is not None:
            out["green/estimate/cost"] = self.cost
        return out


def parse_scale(text: str) -> dict[str, float]:
    """``params=4x,tokens=10x`` -> {"params": 4.0, "tokens": 10.0}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        found = re.fullmatch(r"(params|tokens)\s*=\s*([0-9.eE+-]+)\s*x?", part)
        value = _number(found.group(2)) if found else math.nan
        if found is None or found.group(1) in out or not math.isfinite(value) or value <= 0:
            raise PilotError(
                f"--scale {text!r} is not valid: expected params=<factor>x and/or "
                "tokens=<factor>x, each once, factors > 0, e.g. --scale params=4x,tokens=10x"
            )
        out[found.group(1)] = value
    if not out:
        raise PilotError("--scale '' is not valid: expected e.g. --scale params=4x,tokens=10x")
    return out


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _positive(option: str, value: float, what: str) -> float:
    if not value > 0 or not math.isfinite(value):
        raise PilotError(f"{option} {value!r} is not valid: expected {what} > 0")
    return value


def estimate(
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    *,
    flops: float | None = None,
    scale: Mapping[str, float] | None = None,
    epochs: float | None = None,
    pilot_epochs: float | None = None,
    hardware: str | None = None,
    dtype: str = "bf16",
) -> Estimate:
    """The full run's figures from a pilot's ``metrics`` and ``tags`` (one of ``flops``,
    ``scale``, ``epochs``). Raises :class:`PilotError` with what to log or pass."""
    by_phase: dict[str, float] = {}  # phases that do not scale with the FLOPs: their factor
    given = (("flops", flops), ("scale", scale), ("epochs", epochs))
    chosen = [k for k, v in given if v is not None]
    if len(chosen) != 1:
        raise PilotError("give exactly one of --flops N, --scale params=4x,tokens=10x, --epochs E")
    pilot_flops, pilot_kwh = _measured(metrics)
    assumptions: list[str] = [
        f"energy per FLOP held at the pilot's {pilot_kwh * J_PER_KWH / pilot_flops:.3g} J/FLOP "
        "(all phases: the pilot's validation and data wait scale with its FLOPs)"
    ]
    if flops is not None:
        factor = _positive("--flops", flops, "a number of FLOPs") / pilot_flops
        kind = "flops"
    elif scale is not None:
        factor = math.prod(scale.values())
        kind = "scale"
        assumptions.append(
            "training FLOPs ~ 6 x params x tokens (a transformer): FLOPs x "
            + " x ".join(f"{v:g} ({k})" for k, v in scale.items())
        )
        by_phase = {"data_wait": scale.get("tokens", 1.0), "sanity_check": scale.get("params", 1.0)}
        by_phase["other"] = by_phase["data_wait"]
        assumptions.append(
            "the pilot's data wait and loop overhead (phases data_wait, other) x "
            f"{by_phase['data_wait']:g} (tokens: they do not grow with the model), its sanity "
            f"check x {by_phase['sanity_check']:g} (params)"
        )
        assumptions.append(
            "one pilot: its per-batch overheads inside train and validation are taken to grow "
            "with the FLOPs (an over-estimate for a larger model): give a second pilot of "
            "another size (--pilot SMALL --pilot PILOT) to separate them"
        )
    else:
        assert epochs is not None
        _positive("--epochs", epochs, "the full run's epochs")
        if pilot_epochs is None:
            raise PilotError(
                "--epochs needs the pilot's number of epochs: it has no max_epochs or epochs "
                "param; pass --pilot-epochs E, or --flops instead"
            )
        factor = epochs / _positive("--pilot-epochs", pilot_epochs, "the pilot's epochs")
        kind = "epochs"
        assumptions.append(
            f"FLOPs x {epochs:g} / {pilot_epochs:g} epochs (the same data per epoch)"
        )
    band = SCALE_BAND[kind]
    seconds = _scaled(metrics, "s", metrics.get("green/duration_s", 0.0), factor, by_phase)
    assumptions.append(f"MFU held constant: time x {factor:.4g}, on the pilot's hardware")
    if hardware is not None:
        seconds, note = _on_hardware(metrics, tags, hardware, dtype, pilot_flops * factor)
        assumptions[-1] = note
        band += SCALE_BAND["hardware"]
    kwh = _scaled(metrics, "kwh", pilot_kwh, factor, by_phase)
    rel = metrics.get("green/energy_uncertainty_kwh", 0.0) / pilot_kwh + band
    intensity = metrics.get("green/intensity_g_per_kwh")
    co2e = None if intensity is None else kwh * intensity * _pue(metrics, pilot_kwh)
    if intensity is not None:
        assumptions.append(
            f"carbon at the pilot's mean {intensity:.4g} g/kWh ({tags.get('green.location', '?')})"
        )
    cost = metrics.get("green/cost")
    total = pilot_kwh
    phases = {name: v / total for name, v in _phase_kwh(metrics).items()}
    return Estimate(
        flops=pilot_flops * factor,
        energy_kwh=kwh,
        low_kwh=kwh * max(0.0, 1 - rel),
        high_kwh=kwh * (1 + rel),
        duration_s=seconds,
        co2e_g=co2e,
        cost=None if cost is None else cost * factor,
        currency=tags.get("green.currency", ""),
        phases=phases,
        assumptions=tuple(assumptions),
    )


def estimate_trend(
    pilots: list[Pilot],
    *,
    flops: float | None = None,
    scale: Mapping[str, float] | None = None,
    epochs: float | None = None,
    pilot_epochs: float | None = None,
    hardware: str | None = None,
) -> Estimate:
    """The full run from two pilots of one family on the same data, of different sizes: each
    phase's energy and time = a fixed part (per-batch overhead) + a part proportional to the
    phase's FLOPs, fitted through both (the point), and a power law in the FLOPs through both
    (the band's other end). Sizes are relative to the larger pilot (by FLOPs)."""
    if hardware is not None:
        raise PilotError(
            f"--hardware {hardware!r} with two pilots is not supported: fit the trend with "
            "pilots on the full run's hardware, or give one pilot"
        )
    for metrics, _ in pilots:
        _measured(metrics)
    (small, s_tags), (large, l_tags) = sorted(pilots, key=lambda p: p[0]["green/flops"])
    devices = s_tags.get("green.devices"), l_tags.get("green.devices")
    if None not in devices and devices[0] != devices[1]:
        raise PilotError(
            f"the two pilots ran on different hardware ({devices[0]!r} and {devices[1]!r}): "
            "their J/FLOP trend mixes size and hardware; run both on the same devices"
        )
    ratio = large["green/flops"] / small["green/flops"]
    if ratio < MIN_TREND_RATIO:
        raise PilotError(
            f"the two pilots' FLOPs differ by x{ratio:.3g} ({small['green/flops']:.4g} and "
            f"{large['green/flops']:.4g}): need x{MIN_TREND_RATIO:g} or more to fit a trend "
            "(pilots of two sizes), or give one pilot"
        )
    given = [v for v in (flops, scale, epochs) if v is not None]
    if len(given) != 1:
        raise PilotError("give exactly one of --flops N, --scale params=4x,tokens=10x, --epochs E")
    if flops is not None:
        params, tokens = (
            _positive("--flops", flops, "a number of FLOPs") / large["green/flops"],
            1.0,
        )
        sized = f"--flops: the larger pilot's model x {params:.4g} on the pilots' data"
    elif scale is not None:
        params, tokens = scale.get("params", 1.0), scale.get("tokens", 1.0)
        sized = f"--scale relative to the larger pilot: params x {params:g}, tokens x {tokens:g}"
    else:
        assert epochs is not None
        if pilot_epochs is None:
            raise PilotError("--epochs needs the pilots' number of epochs: pass --pilot-epochs E")
        tokens = _positive("--epochs", epochs, "the full run's epochs") / _positive(
            "--pilot-epochs", pilot_epochs, "the pilot's epochs"
        )
        params, sized = 1.0, f"FLOPs x {epochs:g} / {pilot_epochs:g} epochs (the larger model)"
    names = {*_phase_kwh(small), *_phase_kwh(large)}
    fits: dict[str, dict[str, tuple[float, float, float]]] = {"kwh": {}, "s": {}}
    grown: dict[str, float] = {}  # phase -> share of the larger pilot's that grows with FLOPs
    for unit, out in fits.items():
        for name in sorted(names):
            linear, power, grows = _fit_phase(small, large, name, unit, params)
            keep = 1.0 if name == "sanity_check" else tokens  # per batch: x the tokens
            out[name] = (keep * linear, keep * min(linear, power), keep * max(linear, power))
            if unit == "kwh" and large.get(f"green/phase/{name}_kwh", 0.0) > 0:
                grown[name] = grows / large[f"green/phase/{name}_kwh"]
        total = "green/energy_kwh" if unit == "kwh" else "green/duration_s"
        rest = large.get(total, 0.0) - sum(large.get(f"green/phase/{n}_{unit}", 0.0) for n in names)
        out["(outside phases)"] = (tokens * rest,) * 3
    kwh, low, high = (sum(v[i] for v in fits["kwh"].values()) for i in range(3))
    pilot_kwh = large["green/energy_kwh"]
    rel = large.get("green/energy_uncertainty_kwh", 0.0) / pilot_kwh + TREND_BAND
    intensity = large.get("green/intensity_g_per_kwh")
    cost = large.get("green/cost")
    overheads = ", ".join(
        f"{n} {100 * (1 - grown[n]):.0f} %" for n in ("train", "validation") if n in grown
    )
    assumptions = [
        f"two pilots of one family on the same data (the same batches): {small['green/flops']:.4g}"
        f" and {large['green/flops']:.4g} FLOPs; {sized}",
        "each phase's energy and time per batch = a per-batch overhead that does not grow with "
        "the model (Python, data loading, optimizer bookkeeping) + a part proportional to the "
        "phase's FLOPs, fitted through both pilots "
        f"(overhead in the larger pilot: {overheads or 'no train/validation phases'}); a "
        "phase that runs no model (no FLOPs: data wait, loop overhead) does not grow with it: "
        "the lower pilot's value (another tenant only adds), the band up to the other's; "
        "every phase x the tokens, the sanity check not",
        "band: down to a power law in the FLOPs through both pilots (J/FLOP ~ FLOPs^k per phase; "
        "below the overhead fit when the overhead is real), up to the overhead fit (above it "
        f"when larger matmuls run at a higher FLOP/s), each {100 * rel:.0f} % wider (run-to-run "
        "noise, the pilot's measurement uncertainty)",
    ]
    if intensity is not None:
        assumptions.append(
            f"carbon at the larger pilot's mean {intensity:.4g} g/kWh "
            f"({l_tags.get('green.location', '?')})"
        )
    phases = {name: v / pilot_kwh for name, v in _phase_kwh(large).items()}
    return Estimate(
        flops=large["green/flops"] * params * tokens,
        energy_kwh=kwh,
        low_kwh=low * max(0.0, 1 - rel),
        high_kwh=high * (1 + rel),
        duration_s=sum(v[0] for v in fits["s"].values()),
        co2e_g=None if intensity is None else kwh * intensity * _pue(large, pilot_kwh),
        cost=None if cost is None else cost * kwh / pilot_kwh,
        currency=l_tags.get("green.currency", ""),
        phases=phases,
        assumptions=tuple(assumptions),
    )


def _fit_phase(
    small: Mapping[str, float], large: Mapping[str, float], name: str, unit: str, params: float
) -> tuple[float, float, float]:
    """A phase's value at ``params`` x the larger pilot's model by the overhead fit and by the
    power law, and the larger pilot's part that grows with the FLOPs."""
    key = f"green/phase/{name}_{unit}"
    y_s, y_l = small.get(key, 0.0), large.get(key, 0.0)
    f_s, f_l = (
        small.get(f"green/phase/{name}_flops", 0.0),
        large.get(f"green/phase/{name}_flops", 0.0),
    )
    if not (f_s > 0 and f_l > f_s):  # runs no model: no trend; interference only adds
        return min(y_s, y_l), max(y_s, y_l), 0.0
    slope = max(0.0, (y_l - y_s) / (f_l - f_s))  # J (s) per FLOP; never negative
    grows = slope * f_l
    linear = y_l + grows * (params - 1)
    power = y_l * params ** (math.log(y_l / y_s) / math.log(f_l / f_s)) if y_s > 0 < y_l else linear
    return linear, power, grows


def _phase_kwh(metrics: Mapping[str, float]) -> dict[str, float]:
    """Each phase's energy, by its name (``green/phase/<name>_kwh``; not per component)."""
    return {
        k[len("green/phase/") : -len("_kwh")]: v
        for k, v in metrics.items()
        if k.startswith("green/phase/") and k.endswith("_kwh") and k.count("/") == 2
    }


def _measured(metrics: Mapping[str, float]) -> tuple[float, float]:
    """The pilot's FLOPs and kWh; a pilot without them is refused with what to log."""
    pilot_flops, pilot_kwh = metrics.get("green/flops"), metrics.get("green/energy_kwh")
    if not pilot_flops or pilot_flops <= 0:
        raise PilotError(
            "the pilot has no FLOPs (green/flops): log them with EnergyMonitor(count_flops=True) "
            "(the default) or a module's flops_per_batch, or log green/flops yourself"
        )
    if not pilot_kwh or pilot_kwh <= 0:
        raise PilotError("the pilot has no energy (green/energy_kwh): measure it with green-mlops")
    return pilot_flops, pilot_kwh


def _scaled(
    metrics: Mapping[str, float], unit: str, total: float, factor: float, by: Mapping[str, float]
) -> float:
    """``total`` x ``factor``, except the pilot's phases in ``by``, each x its own factor."""
    out = total * factor
    for phase, own in by.items():
        out += metrics.get(f"green/phase/{phase}_{unit}", 0.0) * (own - factor)
    return out


def _pue(metrics: Mapping[str, float], kwh: float) -> float:
    facility = metrics.get("green/energy_facility_kwh")
    return facility / kwh if facility else 1.0


def _on_hardware(
    metrics: Mapping[str, float], tags: Mapping[str, str], hardware: str, dtype: str, flops: float
) -> tuple[float, str]:
    """Seconds on ``hardware`` at the pilot's MFU, and the assumption said."""
    figure = find_peak(hardware)
    if figure is None:
        known = ", ".join(sorted({f.model for _, f in DENSE_PEAKS}))
        raise PilotError(
            f"--hardware {hardware!r} is not in green_mlops/flops_peaks.py: expected one of {known}"
        )
    peak = peak_flops(hardware, dtype)
    if peak is None:
        raise PilotError(
            f"--hardware {hardware!r} has no dense {dtype} peak in green_mlops/flops_peaks.py: "
            f"pass --dtype one of {', '.join(sorted(figure.flops))}"
        )
    mfu, rate = metrics.get("green/mfu"), metrics.get("green/flops_per_s")
    if not mfu or not rate:
        raise PilotError(
            f"--hardware {hardware!r}: the pilot has no MFU (green/mfu; its device's peak is "
            f"unknown: {tags.get('green.mfu', 'not reported')}), so its utilisation cannot be "
            "carried to other hardware: estimate on the pilot's hardware (leave out --hardware)"
        )
    pilot_peak = rate / mfu
    seconds = metrics.get("green/duration_s", 0.0) * flops / metrics["green/flops"]
    return seconds * pilot_peak / peak, (
        f"MFU held at the pilot's {mfu:.3g}: time x {pilot_peak / peak:.3g} (the pilot's peak "
        f"{pilot_peak / 1e12:.4g} TFLOP/s, {figure.model}'s {dtype} dense peak "
        f"{peak / 1e12:.4g} TFLOP/s, {figure.source}); energy per FLOP held too (rough across "
        "hardware)"
    )


def save_estimate(path: Path, pilot_run_id: str, result: Estimate) -> None:
    """Write ``result`` and its pilot to ``path`` (JSON) for :data:`ESTIMATE_ENV`."""
    data = {"pilot_run_id": pilot_run_id, **asdict(result)}
    data["phases"], data["assumptions"] = dict(result.phases), list(result.assumptions)
    path.write_text(json.dumps(data, indent=1) + "\n")


#: What :data:`ESTIMATE_ENV` accepts (said when it names something else).
ESTIMATE_FORM = (
    "expected the path of a file written by `green-mlops estimate --save` (JSON with "
    "pilot_run_id, energy_kwh > 0, low_kwh, high_kwh)"
)


def _read_estimate(name: str) -> tuple[str, float, float, float]:
    """The pilot, energy, band of the estimate file ``name``; raises (OSError, ValueError, ...)."""
    data = json.loads(Path(name).read_text())
    pilot, kwh = str(data["pilot_run_id"]), float(data["energy_kwh"])
    low, high = float(data["low_kwh"]), float(data["high_kwh"])
    if not (math.isfinite(kwh) and kwh > 0):
        raise ValueError(f"energy_kwh={kwh!r} is not > 0")
    return pilot, kwh, low, high


def _problem(exc: Exception) -> str:
    return f"no key {exc}" if isinstance(exc, KeyError) else str(exc)


def check_estimate(environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`~green_mlops.config.ConfigError` when :data:`ESTIMATE_ENV` names no
    estimate file: checked when a measured run is about to be created, so this bad setting
    fails before anything is measured, as the others do (not in a line at the run's end)."""
    name = (os.environ if environ is None else environ).get(ESTIMATE_ENV)
    if name:
        try:
            _read_estimate(name)
        except Exception as exc:
            why = f"{ESTIMATE_ENV}={name!r} cannot be read as an estimate ({_problem(exc)})"
            raise ConfigError(f"{why}: {ESTIMATE_FORM}") from None


def attach_estimate(
    metrics: dict[str, float], tags: dict[str, str], environ: Mapping[str, str] | None = None
) -> None:
    """For a run started with :data:`ESTIMATE_ENV`: the pilot's tags, the estimate and
    :data:`ERROR_KEY` from the run's ``green/energy_kwh``; a file that cannot be read (any more:
    :func:`check_estimate` checked it at the start) is said in ``green.problems`` and the
    error is absent (``green.not_reported``). Never raises."""
    name = (os.environ if environ is None else environ).get(ESTIMATE_ENV)
    if not name:
        return
    try:
        pilot, kwh, low, high = _read_estimate(name)
    except Exception as exc:  # never harm the run
        why = f"{ESTIMATE_ENV}={name!r} is not a `green-mlops estimate --save` file ({exc})"
        log.warning("green-mlops: %s", why)
        problems = tags.get("green.problems", "")
        tags["green.problems"] = f"{problems}; {why}" if problems else why
        add_not_reported(tags, f"{ERROR_KEY}: {why}")
        return
    tags["green.estimate.pilot_run_id"] = pilot
    metrics["green/estimate/energy_kwh"] = kwh
    measured = metrics.get("green/energy_kwh")
    if measured is None:
        add_not_reported(tags, f"{ERROR_KEY}: the run has no measured energy (green/energy_kwh)")
        return
    metrics[ERROR_KEY] = (measured - kwh) / kwh
    inside = low <= measured <= high
    tags["green.estimate.inside_band"] = f"{inside} ({low:.4g} .. {high:.4g} kWh)"
