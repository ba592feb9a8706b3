"""An :class:`~green_mlops.adaptive.validator.AdaptiveValidator`'s state, for checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from green_mlops.adaptive.validator import AdaptiveValidator

__all__ = ["load_state", "state_of"]


def state_of(self: AdaptiveValidator) -> dict[str, Any]:
    """Everything needed to resume (the incumbent's weights are the driver's): the
    incumbent's values (NaN where unknown), the best values, counters."""
    return {
        "version": 2,
        "mode": self.mode,
        "alpha": self.alpha,
        "lower": self.lower,
        "upper": self.upper,
        "precision": self.precision,
        "incumbent_mode": self.incumbent_mode,
        "min_delta": self.min_delta,
        "best": self.best,
        "es_best": self.es_best,
        "incumbent": None if self.incumbent is None else self.incumbent.copy(),
        "known": self.known,
        "incumbent_value": self.incumbent_value,
        "es_value": self.es_value,
        "comparisons": self.comparisons,
        "evaluated_total": self.evaluated_total,
        "population_total": self.population_total,
        "problem": self.problem,
        "tolerance": self.tolerance,
        "horizon": self.horizon,
        "runs": self.runs,
        "incumbent_run": self.incumbent_run,
    }


def load_state(self: AdaptiveValidator, state: Mapping[str, Any]) -> None:
    """Restore what :func:`state_of` wrote (version 1: ``incumbent="values"`` checkpoints)."""
    version = state.get("version")
    if version not in (1, 2):
        raise ValueError(f"unknown AdaptiveValidator state version {version!r}")
    if state["mode"] != self.mode:
        raise ValueError(
            f"the checkpoint was written with mode={state['mode']!r}, this run has "
            f"mode={self.mode!r}"
        )
    incumbent = state["incumbent"]
    self.incumbent = None if incumbent is None else np.asarray(incumbent, np.float64).copy()
    self.best = float(state["best"])
    self.comparisons = int(state["comparisons"])
    self.evaluated_total = int(state["evaluated_total"])
    self.problem = state["problem"]
    size = 0 if self.incumbent is None else self.incumbent.size
    if version == 1:  # values mode: complete incumbent, logged values all exact
        self.known = size
        self.incumbent_value = None if self.incumbent is None else self.best
        self.es_best = self.best  # exact when min_delta == 0; else see below
        self.es_value = None
        self.population_total = self.evaluated_total + int(state["skipped_total"])
        # EarlyStopping's best was not recorded: without it no early "improved"
        self._es_tracked = self.min_delta == 0
    else:
        self.known = int(state["known"])
        value = state["incumbent_value"]
        self.incumbent_value = None if value is None else float(value)
        self.es_best = float(state["es_best"])
        es_value = state["es_value"]
        self.es_value = None if es_value is None else float(es_value)
        self.population_total = int(state["population_total"])
        if float(state["min_delta"]) != self.min_delta:
            raise ValueError(
                f"the checkpoint was written with EarlyStopping min_delta="
                f"{state['min_delta']}, this run has {self.min_delta}"
            )
    for name in ("tolerance", "horizon"):
        if state.get(name) != getattr(self, name):
            raise ValueError(
                f"the checkpoint was written with {name}={state.get(name)!r}, this run has "
                f"{name}={getattr(self, name)!r}"
            )
    self.runs = int(state.get("runs", self.comparisons + (size > 0)))
    self.incumbent_run = int(state.get("incumbent_run", -1))
    if self.known > size:
        raise ValueError(f"state has {self.known} known values of {size}")
    self._test = None
    self._running = False
