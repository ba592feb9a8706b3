"""What a report needs beyond the runs, and the error a format raises (shared by the
formats' modules, which import this, not the package)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TRAINING_TYPES", "ReportError", "ReportOptions"]

#: The Hugging Face model card's ``training_type`` values.
TRAINING_TYPES = ("pre-training", "fine-tuning")


class ReportError(ValueError):
    """The runs cannot be rendered in this format (the message says which run and why)."""


@dataclass(frozen=True)
class ReportOptions:
    """What a report needs beyond the runs."""

    #: ``pre-training`` or ``fine-tuning`` (model card, BoAmps ``taskStage``); None: not said.
    training_type: str | None = None
    #: BoAmps ``taskFamily`` (e.g. "image classification"); None: ``unspecified``.
    task_family: str | None = None
    #: A heading for the HTML / Markdown report.
    title: str | None = None
    #: :func:`green_mlops.compare.compare`'s result, shown by the HTML / Markdown report.
    comparison: Any = None
