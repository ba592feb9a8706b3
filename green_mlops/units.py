"""Units and small text helpers shared by every module (one definition of each)."""

from __future__ import annotations

__all__ = ["DAY", "HOUR", "J_PER_KWH", "TAG_TEXT_LIMIT", "YEAR", "clip", "joules_to_kwh"]

#: Joules in one kilowatt-hour.
J_PER_KWH = 3.6e6
HOUR = 3600.0
DAY = 24 * HOUR
#: A mean (Julian) year, for amortising embodied carbon.
YEAR = 365.25 * DAY
#: Longest provenance text kept in one tag (MLflow caps tag values at 8,000 characters).
TAG_TEXT_LIMIT = 5000


def joules_to_kwh(joules: float) -> float:
    return joules / J_PER_KWH


def clip(text: str, limit: int = TAG_TEXT_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
