"""One exception type for a callback's bad arguments, caught by every ``except`` a user writes."""

from __future__ import annotations

import importlib

import pytest

from green_mlops.config import ConfigError
from green_mlops.integrations.lightning import AdaptiveValidation
from green_mlops.integrations.lightning._namespaces import Misconfiguration

#: What a user may write in ``except``: ours, Python's, and Lightning's in each namespace.
CAUGHT_BY = {
    "ValueError": ("builtins", "ValueError"),
    "ConfigError": ("green_mlops.config", "ConfigError"),
    "lightning.fabric": ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),
    "lightning.pytorch": ("lightning.pytorch.utilities.exceptions", "MisconfigurationException"),
    "lightning_fabric": ("lightning_fabric.utilities.exceptions", "MisconfigurationException"),
    "pytorch_lightning": ("pytorch_lightning.utilities.exceptions", "MisconfigurationException"),
}


@pytest.mark.parametrize("form", sorted(CAUGHT_BY))
def test_a_refused_argument_is_caught_by_each_except_form(form: str) -> None:
    module, name = CAUGHT_BY[form]
    handler: type[BaseException] = getattr(importlib.import_module(module), name)
    caught: BaseException | None = None
    try:
        AdaptiveValidation(mode="maximum")  # type: ignore[arg-type]
    except handler as exc:
        caught = exc
    except Exception:  # not caught by this form
        caught = None
    assert type(caught) is Misconfiguration
    assert "mode='maximum'" in str(caught) and "'min' or 'max'" in str(caught)


def test_misconfiguration_is_a_config_error_and_a_value_error() -> None:
    assert issubclass(Misconfiguration, ConfigError)
    assert issubclass(Misconfiguration, ValueError)
    assert Misconfiguration.__module__ == "green_mlops.integrations.lightning._namespaces"
