"""``CarbonAwarePause``: pause a fit at epoch (or N-step) boundaries while the grid is dirtier
than allowed, as long as the deadline still holds.

from green_mlops.integrations.lightning.carbon_aware_pause import CarbonAwarePause
trainer = Trainer(callbacks=[EnergyMonitor(), CarbonAwarePause(finish_by="2026-12-02T08:00Z",
                                                               threshold_g_per_kwh=250)])

At a boundary, rank 0 reads the forecast (the providers' optional ``forecast``, as
``green-mlops plan``) and decides; the decision is broadcast, so all DDP ranks pause together.
``threshold_g_per_kwh``: pause while the intensity now is above it. ``plan=True``: plan the
remaining work (its measured time per epoch x the epochs left) and pause until the planned
start, when waiting saves at least ``min_saving``. Either way the pause ends at the latest
resume that still meets ``finish_by``. ``mode="wait"`` sleeps in-process, in the tracker's
``paused`` phase of a green-mlops measurement (idle hardware draws power: the pause's energy
is measured, green/phase/paused_kwh); ``mode="exit"`` saves a checkpoint and exits with
:data:`EXIT_CODE` for a requeue (SLURM ``--requeue --begin=...``; resume with
``fit(ckpt_path=...)``). Without a forecast it never pauses (a static value does not vary).
See docs/scheduling.md.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from green_mlops.integrations.lightning._namespaces import Callback, Misconfiguration

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from green_mlops.scheduling.model import Forecast

log = logging.getLogger(__name__)

__all__ = ["EXIT_CODE", "CarbonAwarePause"]

#: Exit status of ``mode="exit"``: 75, EX_TEMPFAIL ("try again later"), for a requeue.
EXIT_CODE = 75


class CarbonAwarePause(Callback):
    def __init__(
        self,
        *,
        finish_by: float | str,
        threshold_g_per_kwh: float | None = None,
        plan: bool = False,
        mode: str = "wait",
        every_n_steps: int | None = None,
        check_every_s: float = 300.0,
        min_saving: float = 0.05,
        checkpoint_path: str | Path | None = None,
        location: str | None = None,
        forecast: Callable[[float, float], Forecast] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        if (threshold_g_per_kwh is None) == (not plan):
            raise Misconfiguration(
                "CarbonAwarePause: give threshold_g_per_kwh=<g/kWh> or plan=True (one of them)"
            )
        if threshold_g_per_kwh is not None and not threshold_g_per_kwh >= 0:
            raise Misconfiguration(
                f"CarbonAwarePause(threshold_g_per_kwh={threshold_g_per_kwh!r}): must be >= 0"
            )
        if mode not in ("wait", "exit"):
            raise Misconfiguration(f"CarbonAwarePause(mode={mode!r}): 'wait' or 'exit'")
        if every_n_steps is not None and every_n_steps < 1:
            raise Misconfiguration(f"CarbonAwarePause(every_n_steps={every_n_steps!r}): >= 1")
        if not check_every_s > 0:
            raise Misconfiguration(f"CarbonAwarePause(check_every_s={check_every_s!r}): > 0")
        if isinstance(finish_by, str):
            from green_mlops.intensity import parse_time

            try:
                finish_by = parse_time(finish_by)
            except (TypeError, ValueError):
                raise Misconfiguration(
                    f"CarbonAwarePause(finish_by={finish_by!r}): ISO 8601, e.g. 2026-12-02T08:00Z"
                ) from None
        if not math.isfinite(float(finish_by)):
            raise Misconfiguration(
                f"CarbonAwarePause(finish_by={finish_by!r}): a time, Unix seconds or ISO 8601"
            )
        if not 0 <= min_saving < 1:
            raise Misconfiguration(
                f"CarbonAwarePause(min_saving={min_saving!r}): a fraction in [0, 1), e.g. 0.05"
            )
        self.finish_by = float(finish_by)
        self.threshold = threshold_g_per_kwh
        self.plan = plan
        self.mode = mode
        self.every_n_steps = every_n_steps
        self.check_every_s = check_every_s
        self.min_saving = min_saving
        self.checkpoint_path = checkpoint_path
        self.location = location
        self._forecast = forecast
        self._clock = clock
        self._sleep = sleep
        self._boundary_at: float | None = None
        self._unit_s: float | None = None  # measured seconds per epoch (or per N steps)
        self._step = -1  # the global step of the last N-step boundary
        #: (paused at, resumed at, why) of each pause, for the user and the tests.
        self.pauses: list[tuple[float, float, str]] = []

    # -- hooks ---------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._boundary_at = self._clock()
        self._step = trainer.global_step  # a resumed fit: no boundary before its next step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is None:
            left = trainer.max_epochs - trainer.current_epoch - 1 if trainer.max_epochs else -1
            self._boundary(trainer, left if (trainer.max_epochs or -1) > 0 else None)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        n, step = self.every_n_steps, trainer.global_step
        # once per optimizer step: under gradient accumulation global_step repeats over batches
        if n is not None and step > 0 and step % n == 0 and step != self._step:
            self._step = step
            max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            left = None if max_steps is None else (max_steps - trainer.global_step) / n
            self._boundary(trainer, left)

    # -- the decision ----------------------------------------------------------------------

    def _boundary(self, trainer: pl.Trainer, units_left: float | None) -> None:
        now = self._clock()
        if self._boundary_at is not None:
            self._unit_s = now - self._boundary_at
        decision: tuple[float, str] | None = None
        if trainer.global_rank == 0 and units_left is not None and units_left > 0:
            try:
                decision = self._decide(now, units_left * (self._unit_s or 0.0))
            except Exception as exc:  # never harm the fit: no forecast, no pause
                log.warning("CarbonAwarePause: not pausing: %s", exc)
        if trainer.world_size > 1:  # every rank takes part, and pauses with rank 0
            decision = trainer.strategy.broadcast(decision, src=0)
        if decision is not None:
            self._pause(trainer, now, *decision)
        self._boundary_at = self._clock()

    def _decide(self, now: float, remaining_s: float) -> tuple[float, str] | None:
        """(resume at, why), or None to go on now."""
        latest = self.finish_by - remaining_s
        if remaining_s <= 0 or latest <= now:
            return None  # the deadline does not allow a pause
        forecast = self._get_forecast(now, self.finish_by)
        if self.plan:
            from green_mlops.scheduling import Job, plan

            planned = plan(
                forecast, Job(remaining_s), earliest=now, finish_by=self.finish_by,
                min_saving=self.min_saving,
            )  # fmt: skip
            if planned.decision != "wait" or planned.chosen.start <= now:
                return None
            return min(planned.chosen.start, latest), planned.reason
        clean = _first_clean(forecast, now, float(self.threshold or 0.0))
        resume = latest if clean is None else min(clean, latest)
        if resume <= now:
            return None
        return resume, f"intensity above {self.threshold:g} g/kWh until {_iso(resume)}"

    def _get_forecast(self, now: float, end: float) -> Forecast:
        if self._forecast is not None:
            return self._forecast(now, end)
        from green_mlops.config import Settings
        from green_mlops.scheduling.forecasts import fetch_forecast

        settings = Settings.load()
        where = self.location or settings.location
        if not where:
            raise ValueError("no location: CarbonAwarePause(location=...) or GREEN_MLOPS_LOCATION")
        from green_mlops.location import parse_location

        return fetch_forecast(settings, parse_location(where), now, end).forecast

    # -- pausing ---------------------------------------------------------------------------

    def _pause(self, trainer: pl.Trainer, now: float, resume_at: float, why: str) -> None:
        if self.mode == "exit":
            path = Path(
                self.checkpoint_path or Path(trainer.default_root_dir) / "carbon_pause.ckpt"
            )
            trainer.save_checkpoint(str(path))
            if trainer.global_rank == 0:
                from datetime import datetime

                begin = datetime.fromtimestamp(resume_at).strftime("%Y-%m-%dT%H:%M:%S")
                print(
                    f"CarbonAwarePause: {why}; checkpoint {path}; exiting with {EXIT_CODE} "
                    f"for a requeue (sbatch --begin={begin}; fit(ckpt_path=...) resumes)",
                    file=sys.stderr,
                )
            self.pauses.append((now, now, why))
            raise SystemExit(EXIT_CODE)
        tracker = _tracker(trainer)
        if tracker is not None:
            tracker.enter("paused")
        try:
            self._wait(now, resume_at)
        finally:
            if tracker is not None:
                tracker.exit("paused")
        if trainer.world_size > 1:
            trainer.strategy.barrier("carbon_aware_pause")
        self.pauses.append((now, self._clock(), why))

    def _wait(self, now: float, resume_at: float) -> None:
        """Sleep until ``resume_at`` (the same on every rank: no collective while waiting, so
        no process-group timeout however long the pause), in steps of ``check_every_s``."""
        while now < resume_at:
            self._sleep(min(self.check_every_s, resume_at - now))
            now = self._clock()


def _first_clean(forecast: Forecast, now: float, threshold: float) -> float | None:
    """The first time from ``now`` the forecast is at or below ``threshold``; None if never.
    ValueError when the forecast does not cover now."""
    edges, values = forecast.edges, forecast.values
    covered = False
    for a, b, v in zip(edges[:-1], edges[1:], values, strict=True):
        if b <= now or math.isnan(float(v)):
            continue
        covered = covered or a <= now
        if float(v) <= threshold:
            if not covered:
                break
            return max(float(a), now)
    if not covered:
        raise ValueError("the forecast does not cover now")
    return None


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def _tracker(trainer: pl.Trainer) -> Any:
    """The tracker of the fit's EnergyMonitor (as validation_energy finds it), if any."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if type(callback).__name__ == "EnergyMonitor" and type(callback).__module__.startswith(
            "green_mlops"
        ):
            return getattr(getattr(callback, "_measurement", None), "tracker", None)
    return None
