"""Settings: one typed object, from keyword arguments > ``GREEN_MLOPS_*`` variables > defaults.

Every setting is declared once below with its variable, its parser, the accepted form and a
one-line description; ``green-mlops config`` prints the table and the README documents it.
A bad value raises :class:`ConfigError` before anything is measured, naming the setting, the
value and the accepted form. Secret settings are never echoed (not in errors, not in ``repr``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Settings", "settings_table"]

ENV_PREFIX = "GREEN_MLOPS_"


class ConfigError(ValueError):
    """A setting has a value outside its accepted form. Raised before measuring starts."""


# --- parsers: str | typed value -> typed value, raising ValueError with no value in the text ---

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError


def _float_in(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)  # type: ignore[arg-type]
        if number != number or (number <= lo if lo_open else number < lo) or number > hi:
            raise ValueError
        return number

    return parse


def _optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def wrapped(value: object) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parse(value)

    return wrapped


def _names(value: object) -> frozenset[str]:
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    names = frozenset(str(item).strip() for item in items if str(item).strip())
    if any(not name.replace("_", "").replace("-", "").replace(".", "").isalnum() for name in names):
        raise ValueError
    return names


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError
        return text

    return parse


def _path(value: object) -> Path:
    text = str(value).strip()
    if not text:
        raise ValueError
    return Path(text)


def _text(value: object) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError
    return text


def _setting(
    name: str,
    default: Any,
    parse: Callable[[object], Any],
    accepted: str,
    doc: str,
    *,
    secret: bool = False,
) -> Any:
    meta = {
        "env": ENV_PREFIX + name,
        "parse": parse,
        "accepted": accepted,
        "doc": doc,
        "secret": secret,
    }
    return field(default=default, metadata=meta, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """All green-mlops settings. Build with :meth:`Settings.load`, never by hand."""

    enable: bool = _setting(
        "ENABLE",
        False,
        _bool,
        "1/0, true/false, yes/no, on/off",
        "Track every MLflow run of this process (the MLflow plugin reads it).",
    )
    sample_interval_s: float = _setting(
        "SAMPLE_INTERVAL_S",
        0.5,
        _float_in(0.01, 60.0),
        "a number of seconds in [0.01, 60]",
        "Longest time between two meter samples. Meters may ask for less (NVML power: 0.1 s).",
    )
    log_interval_s: float = _setting(
        "LOG_INTERVAL_S",
        10.0,
        _float_in(0.5, 3600.0),
        "a number of seconds in [0.5, 3600]",
        "Resolution of the power/energy time series, and how often integrations send it.",
    )
    disable_plugins: frozenset[str] = _setting(
        "DISABLE_PLUGINS",
        frozenset(),
        _names,
        "comma-separated plugin names, e.g. rapl,nvml",
        "Plugins not to load (built-in or third-party); `green-mlops doctor` lists the names.",
    )
    rapl_root: Path = _setting(
        "RAPL_ROOT",
        Path("/sys/class/powercap"),
        _path,
        "a directory path",
        "Where the RAPL powercap tree lives (tests point it at a fake tree).",
    )
    share: str = _setting(
        "SHARE",
        "machine",
        _choice("machine", "process"),
        "machine or process",
        "Whose CPU/RAM estimate to report: the whole machine, or this process tree's share "
        "(for shared hosts). Counters (RAPL, NVML) always measure the whole device.",
    )
    cpu_tdp_w: float | None = _setting(
        "CPU_TDP_W",
        None,
        _optional(_float_in(0.0, 5000.0, lo_open=True)),
        "watts, > 0 and <= 5000, or empty",
        "TDP of all CPU sockets together, for the CPU estimate; overrides the model lookup.",
    )
    cpu_model: str | None = _setting(
        "CPU_MODEL",
        None,
        _optional(_text),
        "a CPU model name, e.g. 'AMD EPYC 7763'",
        "CPU model to look up in the bundled TDP table, instead of the detected one.",
    )
    ram_w_per_gb: float = _setting(
        "RAM_W_PER_GB",
        0.3725,
        _float_in(0.0, 100.0),
        "watts per GB, in [0, 100]",
        "Power of memory in use, for the RAM estimate (Green Algorithms: 0.3725 W/GB).",
    )

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Resolve every setting: keyword arguments, then ``GREEN_MLOPS_*``, then defaults."""
        env = os.environ if environ is None else environ
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            accepted = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"unknown setting(s) {sorted(unknown)}; accepted: {accepted}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if f.name in overrides:
                raw, origin = overrides[f.name], f"argument {f.name}"
            elif meta["env"] in env:
                raw, origin = env[meta["env"]], meta["env"]
            else:
                continue
            try:
                values[f.name] = meta["parse"](raw)
            except (ValueError, TypeError):
                shown = "<secret>" if meta["secret"] else repr(raw)
                raise ConfigError(
                    f"{origin}={shown} is not valid: expected {meta['accepted']}"
                ) from None
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` validated like keyword arguments to :meth:`load`."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Settings.load(environ={}, **{**current, **changes})


def settings_table() -> Iterator[tuple[str, str, str, str]]:
    """(variable, default, accepted form, description) for every setting, in declaration order."""
    for f in dataclasses.fields(Settings):
        default = f.default
        if isinstance(default, frozenset):
            shown = ",".join(sorted(default)) or "(none)"
        elif default is None:
            shown = "(unset)"
        else:
            shown = str(default)
        yield f.metadata["env"], shown, f.metadata["accepted"], f.metadata["doc"]
