"""The fit's forecast for ``EnergyMonitor``: progress marks from the run totals, the end from
the Trainer's limits and ``EarlyStopping``, ``green/forecast/...`` and the errors at the end.

The method is :mod:`green_mlops.forecast`'s; see docs/forecasts.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from green_mlops.forecast import Forecast, Forecaster, Mark, Plan, price_run
from green_mlops.log import warn_once
from green_mlops.units import J_PER_KWH

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from green_mlops.session import Measurement

log = logging.getLogger(__name__)

__all__ = ["ERROR_POINTS", "MARKS_PER_EPOCH", "TRAJECTORY_CHECKS", "FitForecast", "likely_stop"]

#: Progress marks inside an epoch (single-process fits), so that a forecast comes early.
MARKS_PER_EPOCH = 4
#: Fractions of the fit at which the forecast's error is reported at its end.
ERROR_POINTS = (0.10, 0.25, 0.50)
#: The last checks of an ``EarlyStopping`` metric fitted for the fit's likely end.
TRAJECTORY_CHECKS = 5


def likely_stop(values: Sequence[float], *, patience: int, wait: int) -> float | None:
    """Checks from now until ``EarlyStopping`` likely stops, from its metric's ``values`` at
    the checks so far (lower is better): the minimum of a parabola fitted to the last
    :data:`TRAJECTORY_CHECKS` is its likely best check (not before the best seen, ``wait``
    checks ago), and it stops ``patience`` checks after that; without a minimum, a metric not
    improving on average (its line does not fall): ``patience - wait``; improving at a steady or
    growing rate over all :data:`TRAJECTORY_CHECKS` checks: ``math.inf`` (no end likely before
    the limit). None with fewer than 3 values, or improving over fewer checks than that (no
    trajectory yet: three noisy values bend either way; the forecast's point is then the least
    wrong over the range)."""
    ys = list(values)[-TRAJECTORY_CHECKS:]
    m = len(ys)
    if m < 3:
        return None
    xs = [float(x) for x in range(m)]
    x1, x2, y1 = sum(xs) / m, sum(x * x for x in xs) / m, sum(ys) / m
    x3, x4 = sum(x**3 for x in xs) / m, sum(x**4 for x in xs) / m
    xy = sum(x * y for x, y in zip(xs, ys, strict=True)) / m
    x2y = sum(x * x * y for x, y in zip(xs, ys, strict=True)) / m
    # least squares y = a x^2 + b x + c, centred moments
    sxx, sx2x, sx2x2 = x2 - x1 * x1, x3 - x1 * x2, x4 - x2 * x2
    sxy, sx2y = xy - x1 * y1, x2y - x2 * y1
    det = sxx * sx2x2 - sx2x * sx2x
    if det <= 0:
        return None
    a = (sxx * sx2y - sx2x * sxy) / det
    b = (sx2x2 * sxy - sx2x * sx2y) / det
    if a <= 0:  # no minimum: not improving on average (the best is behind), else improving
        if sxy >= 0:
            return patience - wait
        return math.inf if m >= TRAJECTORY_CHECKS else None
    best = max(float(round(-b / (2 * a))), m - 1 - wait)
    return int(best) - (m - 1) + patience


def plan_of(
    trainer: pl.Trainer,
    steps: float,
    validations_per_step: float | None,
    *,
    elapsed_s: float,
    after: object = None,
) -> Plan | None:
    """The fit's end from the Trainer: optimizer steps at its limit (``max_epochs``,
    ``max_steps``, ``limit_train_batches``, ``accumulate_grad_batches``:
    ``estimated_stepping_batches``), the earliest end ``EarlyStopping`` allows (patience from
    now, not before ``min_steps``/``min_epochs``) and ``max_time``'s end: ``elapsed_s`` (the
    marks' clock now) plus the Timer's time left; with ``AdaptiveValidation`` on, validation
    runs from here may cost anything down to nothing. ``after``: the callback asking at an epoch's
    end (an ``EarlyStopping`` after it has not checked this epoch yet: :func:`wait_of`). None when
    the fit has no step limit."""
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # an iterable without a length and no max_steps
        return None
    if not math.isfinite(total) or total <= 0:
        return None
    per_step = _validations_per_step(trainer)
    if per_step is None:
        per_step = validations_per_step
    early = None
    rate = per_step or 0.0
    for es in getattr(trainer, "early_stopping_callbacks", ()):
        checks = max(0, int(es.patience) - wait_of(trainer, es, after))
        per_check = _per_check(trainer, es, rate)
        if per_check is None:
            continue
        end = steps + checks * per_check
        early = end if early is None else min(early, end)
    if early is not None:
        floor = float(trainer.min_steps or 0)
        if trainer.min_epochs and trainer.max_epochs and trainer.max_epochs > 0:
            floor = max(floor, total * trainer.min_epochs / trainer.max_epochs)
        early = min(total, max(early, floor, steps))
    remaining, validation_low = None, None
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if type(cb).__name__ == "Timer" and hasattr(cb, "time_remaining"):
            remaining = cb.time_remaining()
        if type(cb).__name__ == "AdaptiveValidation" and getattr(cb, "enabled", False):
            validation_low = 0.0  # a run may end at its first batch
    limit = None if remaining is None else elapsed_s + float(remaining)
    return Plan(total, early, per_step, limit, validation_low=validation_low)


def wait_of(trainer: pl.Trainer, es: Any, after: object = None) -> int:
    """``es.wait_count`` once it has checked this epoch: an ``EarlyStopping`` that checks at the
    epoch's end and comes after ``after`` (the callback asking there) in ``trainer.callbacks``
    has not yet, so its coming check is applied to the monitored value (as it will: an
    improvement by ``min_delta`` resets the count, else it grows by one)."""
    wait = int(es.wait_count)
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
    if after is None or after not in callbacks or es not in callbacks:
        return wait
    if not getattr(es, "_check_on_train_epoch_end", False):
        return wait  # it checked at the validation run's end, before the epoch's end
    if callbacks.index(es) < callbacks.index(after):
        return wait
    current = trainer.callback_metrics.get(es.monitor)
    if current is None or not math.isfinite(float(current)):
        return wait
    improved = es.monitor_op(current - es.min_delta, es.best_score.to(current.device))
    return 0 if bool(improved) else wait + 1


def _per_check(trainer: pl.Trainer, es: Any, rate: float) -> float | None:
    """Optimizer steps between two checks of ``es`` (None: not known)."""
    if getattr(es, "_check_on_train_epoch_end", False):  # a check per epoch
        batches = float(trainer.num_training_batches)
        if not math.isfinite(batches) or batches <= 0:
            return None
        return float(math.ceil(batches / max(1, int(trainer.accumulate_grad_batches))))
    return 1.0 / rate if rate > 0 else None


def _validations_per_step(trainer: pl.Trainer) -> float | None:
    """Validation runs per optimizer step planned by the Trainer (None: not computable)."""
    try:
        if not trainer.enable_validation or not any(trainer.num_val_batches):
            return 0.0
        batches = float(trainer.num_training_batches)
        every = trainer.check_val_every_n_epoch
        check = float(trainer.val_check_batch or 0)
        accumulate = int(trainer.accumulate_grad_batches)
    except Exception:
        return None
    if not math.isfinite(batches) or not math.isfinite(check) or check <= 0:
        return None
    if every is None:  # every val_check_batch batches, across epochs
        return accumulate / check
    steps_per_epoch = math.ceil(batches / accumulate)
    return max(1, int(batches // check)) / every / steps_per_epoch


class FitForecast:
    """One fit's forecasts: fed the run totals (summed over ranks) at the fit's start, every
    :data:`MARKS_PER_EPOCH`-th of an epoch and every ``log_every_n_steps`` (single process),
    and at each epoch end; every rank computes the same."""

    def __init__(self) -> None:
        self.forecaster = Forecaster()
        self.latest: Forecast | None = None
        self._validations = 0
        self._history: list[tuple[float, float]] = []  # (steps, forecast energy J)
        self._observed: float | None = None
        self._marked: float | None = None  # the global step of the last mark
        #: The plan of the latest mark.
        self.plan: Plan | None = None
        self._trajectory: dict[int, list[float]] = {}  # EarlyStopping's index -> its values
        self._recorded = 0  # validation runs whose EarlyStopping metrics were recorded

    def state_dict(self) -> dict[str, Any]:
        """What a fit resumed from a checkpoint continues from (its marks and forecasts)."""
        return {
            "forecaster": self.forecaster.state(),
            "history": [list(h) for h in self._history],
            "validations": self._validations,
            "trajectory": {str(i): list(v) for i, v in self._trajectory.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the fit's forecast: its errors at 10 %, 25 % and 50 % of the whole fit
        count the forecasts made before the checkpoint."""
        self.forecaster.restore(state.get("forecaster", {}))
        self._history = [(float(s), float(j)) for s, j in state.get("history", ())]
        self._validations = self._recorded = int(state.get("validations", 0))
        self._trajectory = {int(i): list(v) for i, v in state.get("trajectory", {}).items()}

    def validated(self) -> None:
        """A validation run ended (not the sanity check)."""
        self._validations += 1

    def due(self, trainer: pl.Trainer, batch_idx: int, every_n_steps: int | None) -> bool:
        """Whether this training batch makes a mark (single process only): an optimizer step
        not marked yet (gradient accumulation: one mark per step) that is a multiple of
        ``every_n_steps`` or ends a quarter of the epoch."""
        if trainer.world_size > 1 or trainer.global_step == self._marked:
            return False
        if every_n_steps is not None and trainer.global_step % every_n_steps == 0:
            return True
        n = trainer.num_training_batches
        if not math.isfinite(n) or n < MARKS_PER_EPOCH:
            return False
        every = max(1, int(n) // MARKS_PER_EPOCH)
        return (batch_idx + 1) % every == 0 and batch_idx + 1 < n

    def mark(
        self,
        trainer: pl.Trainer,
        metrics: Mapping[str, float],
        measurement: Measurement | None,
        *,
        after: object = None,
    ) -> dict[str, float]:
        """Record the totals now (``after``: the callback asking at an epoch's end, see
        :func:`plan_of`); the forecast's metrics (empty before a steady state, or when it
        failed: said once; never raised, so the budget guards after it are still checked on
        every rank)."""
        try:
            return self._mark(trainer, metrics, measurement, after)
        except Exception as exc:
            self.latest = None
            warn_once(f"the fit's forecast failed: {type(exc).__name__}: {exc}")
            return {}

    def _mark(
        self,
        trainer: pl.Trainer,
        metrics: Mapping[str, float],
        measurement: Measurement | None,
        after: object,
    ) -> dict[str, float]:
        steps, elapsed = float(trainer.global_step), metrics.get("green/duration_s", 0.0)
        self._marked = steps
        self.forecaster.add(
            Mark(
                steps=steps,
                energy_j=metrics.get("green/energy_kwh", 0.0) * J_PER_KWH,
                duration_s=elapsed,
                validation_j=metrics.get("green/phase/validation_kwh", 0.0) * J_PER_KWH,
                validation_s=metrics.get("green/phase/validation_s", 0.0),
                validations=self._validations,
            )
        )
        if steps > 0 and self._validations:
            self._observed = self._validations / steps
        plan = plan_of(trainer, steps, self._observed, elapsed_s=elapsed, after=after)
        if plan is not None and not self._validations:
            plan = replace(plan, validation_steps=_validation_steps(trainer, metrics, steps))
        if plan is not None and plan.min_steps is not None:
            plan = replace(plan, likely_steps=self._likely(trainer, steps, plan, after))
        self.plan = plan
        found = self.forecaster.forecast(plan) if plan is not None else None
        if found is None:
            if not self.forecaster.said and steps > 0:
                self.forecaster.said = True
                why = self.forecaster.reason if plan is not None else "the fit has no step limit"
                log.info("green-mlops: no forecast of the fit yet: %s", why)
            return {}
        chain = measurement.intensity_chain() if measurement is not None else []
        found = price_run(found, metrics, chain, time.time())
        self.latest = found
        self._history.append((steps, found.energy_j))
        return found.metrics()

    def _likely(self, trainer: pl.Trainer, steps: float, plan: Plan, after: object) -> float | None:
        """The step where an ``EarlyStopping`` likely stops the fit (:func:`likely_stop` on
        its metric's values after each validation run, one check per run), or None."""
        callbacks = list(getattr(trainer, "early_stopping_callbacks", ()))
        if self._validations > self._recorded:
            self._recorded = self._validations
            for i, es in enumerate(callbacks):
                value = trainer.callback_metrics.get(es.monitor)
                if value is not None and math.isfinite(float(value)):
                    sign = -1.0 if es.mode == "max" else 1.0
                    values = self._trajectory.setdefault(i, [])
                    values[:] = [*values[1 - TRAJECTORY_CHECKS :], sign * float(value)]
        ends = []
        for i, es in enumerate(callbacks):
            per_check = _per_check(trainer, es, plan.validations_per_step or 0.0)
            checks = likely_stop(
                self._trajectory.get(i, ()),
                patience=int(es.patience),
                wait=wait_of(trainer, es, after),
            )
            if checks is not None and per_check is not None:
                ends.append(steps + checks * per_check)
        return min(ends) if ends else None

    def errors(self, trainer: pl.Trainer, metrics: Mapping[str, float]) -> dict[str, float]:
        """``green/forecast/error_at_<p>pct``: (forecast - actual) / actual of the latest
        forecast made by ``p`` of the fit's steps; absent when none was made by then."""
        steps, actual = float(trainer.global_step), metrics.get("green/energy_kwh", 0.0)
        out: dict[str, float] = {}
        if steps <= 0 or actual <= 0:
            return out
        actual_j = actual * J_PER_KWH
        for point in ERROR_POINTS:
            made = [j for s, j in self._history if s <= point * steps]
            if made:
                out[f"green/forecast/error_at_{round(point * 100)}pct"] = made[-1] / actual_j - 1
        return out

    def tags(self, errors: Mapping[str, float]) -> dict[str, str]:
        """``green.forecast``: the models and basis, and the points without a forecast."""
        f = self.latest
        if f is None:
            return {"green.forecast": f"no forecast: {self.forecaster.reason}"}
        text = (
            f"training {f.train_model}, validation {f.validation_model} per run, "
            f"{f.warmup_segments} warm-up segment(s) left out (docs/forecasts.md)"
        )
        if f.carbon_basis:
            text += f"; {f.carbon_basis}"
        missing = [
            f"{round(p * 100)} %"
            for p in ERROR_POINTS
            if f"green/forecast/error_at_{round(p * 100)}pct" not in errors
        ]
        if missing:
            text += f"; no forecast yet at {', '.join(missing)} of the fit (no error there)"
        return {"green.forecast": text}


def _validation_steps(
    trainer: pl.Trainer, metrics: Mapping[str, float], steps: float
) -> float | None:
    """A validation run's cost in training steps, by FLOPs (counted in the sanity check and
    in training), for the forecast before a run is seen; None where they are not counted."""
    sanity = sum(getattr(trainer, "num_sanity_val_batches", ()) or ())
    batches = sum(b for b in getattr(trainer, "num_val_batches", ()) or () if math.isfinite(b))
    val, train = (
        metrics.get("green/phase/sanity_check_flops"),
        metrics.get("green/phase/train_flops"),
    )
    if not (val and train and sanity > 0 and batches > 0 and steps > 0):
        return None
    return float(val / sanity * batches / (train / steps))
