"""The lower bound of benchmarks/validation_bound.py: below what a valid test really uses."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from green_mlops.adaptive import Decision, PairedComparison

ROOT = Path(__file__).resolve().parents[1]
N, BATCH, EPS, ALPHA = 2000, 50, 0.02, 0.05


def _bound_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "validation_bound", ROOT / "benchmarks" / "validation_bound.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("validation_bound", module)
    spec.loader.exec_module(module)
    return module


def _pool(shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-example losses of an incumbent and a candidate, clamped at 5 as in the benchmark."""
    rng = np.random.default_rng(seed)
    inc = np.minimum(rng.exponential(0.5, N), 5.0)
    cand = np.clip(inc + shift + rng.normal(0.0, 0.15, N), 0.0, 5.0)
    return cand, inc


def _examples_used(cand: np.ndarray, inc: np.ndarray, seed: int, trials: int) -> float:
    """Mean examples PairedComparison (tolerance EPS) reads over random orders of the data set
    (the bound's model), knowing the incumbent's values in full."""
    rng = np.random.default_rng(seed)
    used = []
    for _ in range(trials):
        pick = rng.permutation(N)
        test = PairedComparison(inc[pick], ALPHA, upper=5.0, early="both", tolerance=EPS)
        for start in range(0, N, BATCH):
            if test.update(cand[pick][start : start + BATCH]) is not Decision.UNDECIDED:
                break
        used.append(test.n)
    return float(np.mean(used))


@pytest.mark.parametrize("shift", [0.0, -0.05, 0.06])
def test_the_bound_lies_below_what_a_valid_test_reads_and_is_not_vacuous(shift: float) -> None:
    bound = _bound_module()
    cand, inc = _pool(shift, seed=1)
    lower = bound.comparison_bound(cand, inc, EPS, ALPHA)
    used = _examples_used(cand, inc, seed=2, trials=12)
    assert 5 < lower <= used, (lower, used)


def test_the_bound_grows_as_alpha_shrinks_and_the_zone_narrows() -> None:
    bound = _bound_module()
    cand, inc = _pool(-0.05, seed=3)
    wide = bound.comparison_bound(cand, inc, EPS, ALPHA)
    assert bound.comparison_bound(cand, inc, EPS, ALPHA / 100) > wide
    assert bound.comparison_bound(cand, inc, EPS / 4, ALPHA) > wide
