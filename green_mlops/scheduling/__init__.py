"""Carbon-aware scheduling: plan a job into the cleanest window of an intensity forecast.

Framework-free (numpy only). See docs/scheduling.md.
"""

from green_mlops.scheduling.planner import (
    DEFAULT_MIN_SAVING,
    Forecast,
    Job,
    Placement,
    Plan,
    PlanError,
    plan,
)

__all__ = ["DEFAULT_MIN_SAVING", "Forecast", "Job", "Placement", "Plan", "PlanError", "plan"]
