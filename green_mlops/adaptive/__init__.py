"""Adaptive validation: stop a validation pass as soon as its decision is certain.

Framework-agnostic statistics (numpy only): the betting test (:mod:`.betting`), the paired
comparison (:mod:`.comparison`), float-rounding margins (:mod:`.rounding`) and the validator
that the Lightning callback and ``benchmarks/adaptive_validation.py`` drive (:mod:`.validator`).
See docs/adaptive-validation.md (the decision rule) and docs/betting-test.md (the test).
"""

from __future__ import annotations

from green_mlops.adaptive.betting import alpha_spending
from green_mlops.adaptive.comparison import Decision, PairedComparison
from green_mlops.adaptive.rounding import FLOAT32_ROUNDING_MARGIN, ROUNDING_MARGIN
from green_mlops.adaptive.validator import AdaptiveValidator, Outcome

__all__ = [
    "FLOAT32_ROUNDING_MARGIN",
    "ROUNDING_MARGIN",
    "AdaptiveValidator",
    "Decision",
    "Outcome",
    "PairedComparison",
    "alpha_spending",
]
