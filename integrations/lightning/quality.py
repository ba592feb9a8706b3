"""Quality per FLOP and per kWh at each validation, and the energy and FLOPs to a target.

``EnergyMonitor``'s ``monitor``, ``mode`` and ``target``; see docs/energy-monitor.md ("Quality").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from green_mlops.integrations.lightning._namespaces import Misconfiguration
from green_mlops.log import warn_user

__all__ = ["Quality"]


class Quality:
    """Quality is the ``monitor`` metric in ``"max"`` mode and ``1 / metric`` in ``"min"`` mode
    (undefined for a metric <= 0), divided by the run's cumulative PFLOPs and kWh.

    Raises:
        Misconfiguration: ``mode`` is not ``"min"`` or ``"max"``, or ``target`` is not a
            finite number or comes without ``monitor``.
    """

    def __init__(self, monitor: str | None, mode: str, target: float | None) -> None:
        if mode not in ("min", "max"):
            raise Misconfiguration(
                f"EnergyMonitor(mode={mode!r}) is not valid: use mode='max' when a higher "
                f"{monitor or 'metric'} is better (accuracy) or mode='min' when lower is better "
                "(loss)"
            )
        if target is not None and monitor is None:
            raise Misconfiguration(
                f"EnergyMonitor(target={target!r}) needs the metric to compare it with: "
                "pass monitor='<metric logged at validation>'"
            )
        if target is not None and not math.isfinite(target):
            raise Misconfiguration(f"EnergyMonitor(target={target!r}) must be a finite number")
        self.monitor = monitor
        self.mode = mode
        self.target = target
        #: ``green/energy_to_target_kwh`` (and ``green/flops_to_target``) once reached.
        self.to_target: dict[str, float] | None = None
        #: Validations seen: a target met at the first one measures almost nothing.
        self.validations = 0
        #: The latest quality metrics (with the target's): handed to a shared measurement.
        self.last: dict[str, float] = {}
        self._said: set[str] = set()

    def update(self, logged: Mapping[str, Any], totals: Mapping[str, float]) -> dict[str, float]:
        """This validation's metrics, from ``logged`` (``trainer.callback_metrics``) and the run
        totals so far. Problems the user must fix are warned once each (call on rank 0)."""
        assert self.monitor is not None
        value = logged.get(self.monitor)
        if value is None:
            keys = ", ".join(sorted(logged)) or "none"
            self._say(
                "monitor",
                f"EnergyMonitor(monitor={self.monitor!r}): the module did not log "
                f"{self.monitor!r} at validation, so no quality-per-FLOP/kWh is logged. Logged "
                f"metrics: {keys}. Log it with self.log({self.monitor!r}, ...) in "
                "validation_step, or pass one of these names.",
            )
            return {}
        metric = float(value)
        self.validations += 1
        quality = metric if self.mode == "max" else (1.0 / metric if metric > 0 else None)
        out: dict[str, float] = {}
        kwh = totals.get("green/energy_kwh", 0.0)
        flops = totals.get("green/flops", 0.0)
        if quality is None:
            self._say(
                "quality",
                f"EnergyMonitor: {self.monitor}={metric:g} <= 0 in mode='min': quality is "
                "1/metric, undefined here; quality metrics are not logged",
            )
        else:
            if flops > 0:
                out[f"green/quality/{self.monitor}_per_pflop"] = quality / (flops / 1e15)
            if kwh > 0:
                out[f"green/quality/{self.monitor}_per_kwh"] = quality / kwh
        if self.target is not None and self.to_target is None:
            reached = metric >= self.target if self.mode == "max" else metric <= self.target
            if reached:
                self.to_target = {"green/energy_to_target_kwh": kwh}
                if "green/flops" in totals:
                    self.to_target["green/flops_to_target"] = flops
                out.update(self.to_target)
                if self.validations == 1:
                    better = "higher" if self.mode == "max" else "lower"
                    self._say(
                        "target",
                        f"EnergyMonitor: target {self.monitor}={self.target:g} was reached at "
                        f"the first validation ({self.monitor}={metric:g}, mode={self.mode!r}): "
                        "energy-to-target measures almost nothing. Check that mode is right "
                        f"({better} is better) and that the target is not already met by an "
                        "untrained model.",
                    )
        if out:
            self.last = dict(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (keys of ``EnergyMonitor.state_dict``)."""
        to_target = dict(self.to_target) if self.to_target is not None else None
        return {"to_target": to_target, "validations": self.validations}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        target = state_dict.get("to_target")
        self.to_target = dict(target) if target else None
        self.validations = int(state_dict.get("validations", 0))

    def metrics(self) -> dict[str, float]:
        """The latest quality metrics and the target's."""
        return self.last | dict(self.to_target or {})

    def _say(self, topic: str, message: str) -> None:
        """Warn once per topic (through Lightning: rank zero only); the user's to fix."""
        if topic not in self._said:
            self._said.add(topic)
            rank_zero_only(warn_user)(message)
