"""Settings: one typed object, from keyword arguments > ``GREEN_MLOPS_*`` variables > defaults.

Every setting is declared once below with its variable, its parser, the accepted form and a
one-line description; ``green-mlops config`` prints the table and the README documents it.
A bad value raises :class:`ConfigError` before anything is measured, naming the setting, the
value and the accepted form. Secret settings are never echoed (not in errors, not in ``repr``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from green_mlops.carbon import DEFAULT_INTENSITY_PROVIDERS, unknown_provider_names
from green_mlops.facility import CLOUD_PUE
from green_mlops.location import parse_location
from green_mlops.units import DAY

__all__ = ["ConfigError", "Secret", "Settings", "settings_table"]

ENV_PREFIX = "GREEN_MLOPS_"


class ConfigError(ValueError):
    """A setting has a value outside its accepted form. Raised before measuring starts."""


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
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError from None
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


def _scope2_method(value: object) -> str:
    """``location-based`` or ``market-based`` (``location`` and ``market`` for short)."""
    text = str(value).strip().lower().removesuffix("-based")
    if text not in ("location", "market"):
        raise ValueError
    return f"{text}-based"


def _region(value: object) -> str:
    text = str(value).strip().upper()
    if not text.replace("_", "").isalnum():
        raise ValueError
    return text


def _url(value: object) -> str:
    text = str(value).strip().rstrip("/")
    if not text.startswith(("http://", "https://")) or len(text) < 10 or " " in text:
        raise ValueError
    return text


def _postcode(value: object) -> str:
    text = str(value).strip().upper()
    if not 2 <= len(text) <= 4 or not text.isalnum() or not text[0].isalpha():
        raise ValueError
    return text


def _default_cache_dir(env: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME/green-mlops, else ~/.cache/green-mlops, from ``env`` when settings load
    (not at import: a later XDG_CACHE_HOME counts). A relative XDG_CACHE_HOME is ignored, as
    the XDG spec says."""
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "green-mlops"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".cache" / "green-mlops"


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


def _secret(value: object) -> Secret | None:
    if isinstance(value, Secret):
        return value
    text = str(value).strip() if value is not None else ""
    return Secret(text) if text else None


def _providers(value: object) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    names = tuple(str(item).strip().lower() for item in items if str(item).strip())
    if not names or len(set(names)) != len(names):
        raise ValueError
    if any(not name.replace("_", "").replace("-", "").isalnum() for name in names):
        raise ValueError
    return names


def _location(value: object) -> str | None:
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


def _pue(value: object) -> float:
    if isinstance(value, Pue):
        return value
    text = str(value).strip().lower()
    if text in CLOUD_PUE:
        figure = CLOUD_PUE[text]
        return Pue(figure.value, f"{text} fleet average {figure.year}: {figure.source}")
    number = _float_in(1.0, 5.0)(value)
    if number == 1.0:
        return Pue(1.0, "default 1.0: IT energy only, no data-centre overhead counted")
    return Pue(number)


def _currency(value: object) -> str:
    text = str(value).strip().upper()
    if len(text) != 3 or not text.isalpha():
        raise ValueError
    return text


def _unit(value: object) -> str:
    text = str(value).strip()
    if not text or not text.replace("_", "").replace("-", "").isalnum():
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
    shown_default: str | None = None,
) -> Any:
    """A setting. ``default`` may be a function of the environment (resolved when settings
    load), shown in the table as ``shown_default``."""
    meta = {
        "env": ENV_PREFIX + name,
        "parse": parse,
        "accepted": accepted,
        "doc": doc,
        "secret": secret,
        "default_from_env": default if callable(default) else None,
        "shown_default": shown_default,
    }
    if callable(default):
        return field(default_factory=lambda: default(os.environ), metadata=meta, repr=not secret)
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
        "watts per GiB, in [0, 100]",
        "Power per GiB (2**30 bytes) of memory in use, for the RAM estimate "
        "(Green Algorithms: 0.3725 W/GB).",
    )

    # --- carbon, cost, embodied emissions -----------------------------------------------
    location: str | None = _setting(
        "LOCATION",
        None,
        _location,
        "an ISO 3166 country code (DE, DEU), an Electricity Maps zone (US-CAL-CISO), or a "
        "cloud region (aws:eu-west-1, gcp:europe-west4, azure:westeurope)",
        "Where the electricity is drawn. Unset: the world average, with a warning. "
        "Never guessed from the IP address.",
    )
    intensity_providers: tuple[str, ...] = _setting(
        "INTENSITY_PROVIDERS",
        DEFAULT_INTENSITY_PROVIDERS,
        _providers,
        "comma-separated provider names, first preferred, e.g. electricitymaps,uk,static",
        "Carbon-intensity providers in order of preference; each falls back to the next. "
        "Unconfigured ones (no token) are skipped; `static` works offline. A name that no "
        "installed plugin offers is a configuration error.",
    )
    intensity_g_per_kwh: float | None = _setting(
        "INTENSITY_G_PER_KWH",
        None,
        _optional(_float_in(0.0, 3000.0)),
        "gCO2e/kWh in [0, 3000], or empty",
        "A constant intensity of your own (the `constant` provider): a grid figure, or a "
        "contract's (a PPA: set GREEN_MLOPS_INTENSITY_BASIS=market-based).",
    )
    intensity_basis: str = _setting(
        "INTENSITY_BASIS",
        "location-based",
        _scope2_method,
        "location-based or market-based",
        "GHG Protocol method of GREEN_MLOPS_INTENSITY_G_PER_KWH: location-based (the grid's) "
        "or market-based (a contract: reported as green/co2e_market_g, never in SCI).",
    )
    electricitymaps_token: Secret | None = _setting(
        "ELECTRICITYMAPS_TOKEN",
        None,
        _secret,
        "an Electricity Maps API token",
        "Enables the Electricity Maps provider (time-resolved, lifecycle). Never logged.",
        secret=True,
    )
    electricitymaps_url: str = _setting(
        "ELECTRICITYMAPS_URL",
        "https://api.electricitymaps.com",
        _url,
        "an http(s) URL",
        "Base URL of the Electricity Maps API v3.",
    )
    watttime_username: str | None = _setting(
        "WATTTIME_USERNAME",
        None,
        _optional(_text),
        "a WattTime user name",
        "Enables the WattTime provider (marginal MOER) together with the password.",
    )
    watttime_password: Secret | None = _setting(
        "WATTTIME_PASSWORD",
        None,
        _secret,
        "a WattTime password",
        "WattTime password. Never logged.",
        secret=True,
    )
    watttime_region: str | None = _setting(
        "WATTTIME_REGION",
        None,
        _optional(_region),
        "a WattTime region code, e.g. CAISO_NORTH",
        "WattTime region to use instead of the one mapped from the location's zone.",
    )
    watttime_url: str = _setting(
        "WATTTIME_URL",
        "https://api.watttime.org",
        _url,
        "an http(s) URL",
        "Base URL of the WattTime API v3.",
    )
    uk_url: str = _setting(
        "UK_URL",
        "https://api.carbonintensity.org.uk",
        _url,
        "an http(s) URL",
        "Base URL of the UK Carbon Intensity API (used when `uk` is in the provider list).",
    )
    uk_postcode: str | None = _setting(
        "UK_POSTCODE",
        None,
        _optional(_postcode),
        "an outward UK postcode, e.g. SW1A or RG10",
        "Regional UK intensity for this postcode area instead of the national figure.",
    )
    http_timeout_s: float = _setting(
        "HTTP_TIMEOUT_S",
        10.0,
        _float_in(0.1, 120.0),
        "seconds in [0.1, 120]",
        "Read timeout of intensity API calls (connect timeout: a third of it, at most 3.05 s).",
    )
    cache_dir: Path = _setting(
        "CACHE_DIR",
        _default_cache_dir,
        _path,
        "a directory path",
        "Where API responses are cached on disk ($XDG_CACHE_HOME/green-mlops by default).",
        shown_default="$XDG_CACHE_HOME/green-mlops (~/.cache/green-mlops)",
    )
    cache_ttl_s: float = _setting(
        "CACHE_TTL_S",
        3600.0,
        _float_in(0.0, 7 * DAY),
        "seconds in [0, 604800]",
        "How long a cached API response is reused (0 disables the cache).",
    )
    pue: float = _setting(
        "PUE",
        Pue(1.0, "default 1.0: IT energy only, no data-centre overhead counted"),
        _pue,
        "a number in [1, 5], or aws or gcp for the provider's published fleet PUE",
        "Power usage effectiveness of the data centre: facility energy / IT energy.",
    )
    price_per_kwh: float | None = _setting(
        "PRICE_PER_KWH",
        None,
        _optional(_float_in(0.0, 100.0)),
        "a price in [0, 100] per kWh, or empty",
        "Electricity price, for `green/cost` (facility energy x price).",
    )
    currency: str = _setting(
        "CURRENCY",
        "EUR",
        _currency,
        "an ISO 4217 code, e.g. EUR, USD",
        "Currency of the price.",
    )
    embodied_kgco2e: float | None = _setting(
        "EMBODIED_KGCO2E",
        None,
        _optional(_float_in(0.0, 1e6)),
        "kgCO2e in [0, 1e6], or empty",
        "Embodied emissions of the reserved hardware (SCI's TE); overrides the known-device "
        "defaults.",
    )
    hardware_lifetime_years: float = _setting(
        "HARDWARE_LIFETIME_YEARS",
        4.0,
        _float_in(0.1, 30.0),
        "years in [0.1, 30]",
        "Expected lifespan of the hardware, to amortise embodied emissions (SCI's EL).",
    )
    resource_share: float = _setting(
        "RESOURCE_SHARE",
        1.0,
        _float_in(0.0, 1.0, lo_open=True),
        "a fraction in (0, 1]",
        "Share of the machine reserved by this job (SCI's RR/TR), for embodied emissions.",
    )
    functional_unit: str = _setting(
        "FUNCTIONAL_UNIT",
        "run",
        _unit,
        "run, sample, token, or a name of your own (letters, digits, _ and -)",
        "SCI's R: what `green/sci_g_per_<unit>` divides by.",
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
        origins: dict[str, tuple[str, object]] = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if f.name in overrides:
                raw, origin = overrides[f.name], f"argument {f.name}"
            elif meta["env"] in env:
                raw, origin = env[meta["env"]], meta["env"]
            else:
                if meta["default_from_env"] is not None:
                    values[f.name] = meta["default_from_env"](env)
                continue
            origins[f.name] = (origin, raw)
            try:
                values[f.name] = meta["parse"](raw)
            except (ValueError, TypeError) as exc:
                if meta["secret"]:
                    raise ConfigError(
                        f"{origin}=<secret> is not valid: expected {meta['accepted']}"
                    ) from None
                hint = f" ({exc})" if str(exc) else ""
                raise ConfigError(
                    f"{origin}={raw!r} is not valid{hint}: expected {meta['accepted']}"
                ) from None
        settings = cls(**values)
        if settings.intensity_providers != DEFAULT_INTENSITY_PROVIDERS:
            _check_provider_names(settings, *origins["intensity_providers"])
        return settings

    @classmethod
    def resolve(
        cls, settings: Settings | Mapping[str, Any] | None = None, **overrides: Any
    ) -> Settings:
        """The one way an entry point takes settings: a :class:`Settings`, a mapping of
        keyword arguments, or nothing (``GREEN_MLOPS_*`` and defaults); ``overrides`` on top.
        Raises :class:`ConfigError` for a bad value, before anything is measured."""
        if isinstance(settings, Settings):
            return settings.replace(**overrides) if overrides else settings
        if settings is not None and not isinstance(settings, Mapping):
            raise ConfigError(
                f"settings={type(settings).__name__} is not valid: expected a "
                "green_mlops.Settings, a mapping of setting names to values, or None"
            )
        return cls.load(**{**(settings or {}), **overrides})

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` validated like keyword arguments to :meth:`load`."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Settings.load(environ={}, **{**current, **changes})


def _check_provider_names(settings: Settings, origin: str, raw: object) -> None:
    """Provider names come from plugins: a name none offers is a typo, refused now (before a
    run exists) rather than leaving the run's carbon unpriced."""
    found = unknown_provider_names(settings)
    if found is None:
        return
    unknown, offered = found
    hints = [
        f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
        for name in unknown
        for close in [difflib.get_close_matches(name, offered, n=1)]
    ]
    shown = raw if isinstance(raw, str) else ",".join(settings.intensity_providers)
    raise ConfigError(
        f"{origin}={shown!r} is not valid (no installed plugin offers {', '.join(hints)}): "
        f"expected comma-separated provider names from: {', '.join(offered)}"
    )


def settings_table() -> Iterator[tuple[str, str, str, str]]:
    """(variable, default, accepted form, description) for every setting, in declaration order."""
    for f in dataclasses.fields(Settings):
        default = f.default
        if f.metadata["shown_default"] is not None:
            shown = f.metadata["shown_default"]
        elif isinstance(default, frozenset):
            shown = ",".join(sorted(default)) or "(none)"
        elif isinstance(default, tuple):
            shown = ",".join(default)
        elif default is None:
            shown = "(unset)"
        else:
            shown = str(default)
        yield f.metadata["env"], shown, f.metadata["accepted"], f.metadata["doc"]
