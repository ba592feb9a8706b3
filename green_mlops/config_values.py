"""Setting values: the parsers that turn a ``GREEN_MLOPS_*`` string (or a typed argument) into
a typed value, raising ``ValueError`` with no value in its text (the caller names the setting,
the value and the accepted form), and the value types they make (:class:`Secret`, :class:`Pue`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from green_mlops.facility import CLOUD_PUE
from green_mlops.location import parse_location


class Secret:
    """A value that must never be shown: ``str``, ``repr`` and f-strings give ``***``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that sends it (an HTTP header)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


# --- parsers: str | typed value -> typed value, raising ValueError with no value in the text ---

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError


def float_in(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise ValueError
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError from None
        if number != number or (number <= lo if lo_open else number < lo) or number > hi:
            raise ValueError
        return number

    return parse


def optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def wrapped(value: object) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parse(value)

    return wrapped


def names(value: object) -> frozenset[str]:
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    names = frozenset(str(item).strip() for item in items if str(item).strip())
    if any(not name.replace("_", "").replace("-", "").replace(".", "").isalnum() for name in names):
        raise ValueError
    return names


def choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError
        return text

    return parse


def scope2_method(value: object) -> str:
    """``location-based`` or ``market-based`` (``location`` and ``market`` for short)."""
    text = str(value).strip().lower().removesuffix("-based")
    if text not in ("location", "market"):
        raise ValueError
    return f"{text}-based"


def region(value: object) -> str:
    text = str(value).strip().upper()
    if not text.replace("_", "").isalnum():
        raise ValueError
    return text


def url(value: object) -> str:
    text = str(value).strip().rstrip("/")
    if not text.startswith(("http://", "https://")) or len(text) < 10 or " " in text:
        raise ValueError
    return text


def postcode(value: object) -> str:
    text = str(value).strip().upper()
    if not 2 <= len(text) <= 4 or not text.isalnum() or not text[0].isalpha():
        raise ValueError
    return text


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME/green-mlops, else ~/.cache/green-mlops, from ``env`` when settings load
    (not at import: a later XDG_CACHE_HOME counts). A relative XDG_CACHE_HOME is ignored, as
    the XDG spec says."""
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "green-mlops"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".cache" / "green-mlops"


def path(value: object) -> Path:
    text = str(value).strip()
    if not text:
        raise ValueError
    return Path(text)


def text(value: object) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError
    return text


def secret(value: object) -> Secret | None:
    if isinstance(value, Secret):
        return value
    text = str(value).strip() if value is not None else ""
    return Secret(text) if text else None


def providers(value: object) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    names = tuple(str(item).strip().lower() for item in items if str(item).strip())
    if not names or len(set(names)) != len(names):
        raise ValueError
    if any(not name.replace("_", "").replace("-", "").isalnum() for name in names):
        raise ValueError
    return names


def location(value: object) -> str | None:
    if value is None or not str(value).strip():
        return None
    return parse_location(str(value)).raw  # raises ValueError for an unknown form


class Pue(float):
    """A PUE value that remembers where it came from (a cloud's published figure or the user)."""

    source: str = "user value (GREEN_MLOPS_PUE)"

    def __new__(cls, value: float, source: str | None = None) -> Pue:
        self = super().__new__(cls, value)
        if source is not None:
            self.source = source
        return self


def pue(value: object) -> float:
    if isinstance(value, Pue):
        return value
    text = str(value).strip().lower()
    if text in CLOUD_PUE:
        figure = CLOUD_PUE[text]
        return Pue(figure.value, f"{text} fleet average {figure.year}: {figure.source}")
    number = float_in(1.0, 5.0)(value)
    if number == 1.0:
        return Pue(1.0, "default 1.0: IT energy only, no data-centre overhead counted")
    return Pue(number)


def currency(value: object) -> str:
    text = str(value).strip().upper()
    if len(text) != 3 or not text.isalpha():
        raise ValueError
    return text


def unit(value: object) -> str:
    text = str(value).strip()
    if not text or not text.replace("_", "").replace("-", "").isalnum():
        raise ValueError
    return text
