"""The validation energy ``AdaptiveValidation`` reads from an ``EnergyMonitor`` among the
callbacks, for its estimate of the energy saved (see docs/adaptive-validation.md, "Costs")."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

__all__ = ["validation_joules"]


def validation_joules(trainer: pl.Trainer) -> float | None:
    """Validation energy measured so far in the current stage, summed over the processes;
    None without an ``EnergyMonitor`` or where a process could not read it. With several
    processes it is a collective: every rank must call it."""
    monitor = _energy_monitor(trainer)
    if monitor is None:
        return None
    joules = _local_joules(monitor)
    if trainer.world_size > 1:  # collective: every rank takes part, whatever it read
        local = torch.tensor(
            [joules if joules is not None else 0.0, 1.0 if joules is None else 0.0],
            dtype=torch.float64,
            device=trainer.strategy.root_device,
        )
        total = trainer.strategy.reduce(local, reduce_op="sum")
        joules = None if float(total[1]) > 0 else float(total[0])
    return joules


def _energy_monitor(trainer: pl.Trainer) -> Any:
    callbacks: Sequence[Any] = trainer.callbacks  # type: ignore[attr-defined]
    for callback in callbacks:  # by name: either namespace's class, or a subclass of one
        if any(
            c.__name__ == "EnergyMonitor" and c.__module__.startswith("green_mlops")
            for c in type(callback).__mro__
        ):
            return callback
    return None


def _local_joules(monitor: Any) -> float | None:
    """Validation energy this process measured so far in the current stage, or None."""
    try:
        getter = getattr(monitor, "phase_joules", None)
        if callable(getter):
            value = getter("validation")
            return None if value is None else float(value)
        measurement = getattr(monitor, "_measurement", None)
        tracker = getattr(measurement, "tracker", None)
        if tracker is None:
            return None
        phase = tracker.snapshot().phases.get("validation")
        return 0.0 if phase is None else float(phase.joules)
    except Exception as exc:  # energy is a bonus: never break validation for it
        log.debug("AdaptiveValidation: no validation energy: %s", exc)
        return None
