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

from green_mlops import config_values as parsers
from green_mlops.carbon import DEFAULT_INTENSITY_PROVIDERS, MARKET_BASED, unknown_provider_names
from green_mlops.config_values import Pue, Secret
from green_mlops.units import DAY

__all__ = ["ConfigError", "Secret", "Settings", "settings_table"]

ENV_PREFIX = "GREEN_MLOPS_"


class ConfigError(ValueError):
    """A setting has a value outside its accepted form. Raised before measuring starts."""


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
        parsers.flag,
        "1/0, true/false, yes/no, on/off",
        "Track every MLflow run of this process (the MLflow plugin reads it).",
    )
    sample_interval_s: float = _setting(
        "SAMPLE_INTERVAL_S",
        0.5,
        parsers.float_in(0.01, 60.0),
        "a number of seconds in [0.01, 60]",
        "Longest time between two meter samples. Meters may ask for less (NVML power: 0.1 s).",
    )
    log_interval_s: float = _setting(
        "LOG_INTERVAL_S",
        10.0,
        parsers.float_in(0.5, 3600.0),
        "a number of seconds in [0.5, 3600]",
        "Resolution of the power/energy time series, and how often integrations send it.",
    )
    disable_plugins: frozenset[str] = _setting(
        "DISABLE_PLUGINS",
        frozenset(),
        parsers.names,
        "comma-separated plugin names, e.g. rapl,nvml",
        "Plugins not to load (built-in or third-party); `green-mlops doctor` lists the names.",
    )
    rapl_root: Path = _setting(
        "RAPL_ROOT",
        Path("/sys/class/powercap"),
        parsers.path,
        "a directory path",
        "Where the RAPL powercap tree lives (tests point it at a fake tree).",
    )
    share: str = _setting(
        "SHARE",
        "machine",
        parsers.choice("machine", "process"),
        "machine or process",
        "Whose CPU/RAM estimate to report: the whole machine, or this process tree's share "
        "(for shared hosts). Counters (RAPL, NVML) always measure the whole device.",
    )
    cpu_tdp_w: float | None = _setting(
        "CPU_TDP_W",
        None,
        parsers.optional(parsers.float_in(0.0, 5000.0, lo_open=True)),
        "watts, > 0 and <= 5000, or empty",
        "TDP of all CPU sockets together, for the CPU estimate; overrides the model lookup.",
    )
    cpu_model: str | None = _setting(
        "CPU_MODEL",
        None,
        parsers.optional(parsers.text),
        "a CPU model name, e.g. 'AMD EPYC 7763'",
        "CPU model to look up in the bundled TDP table, instead of the detected one.",
    )
    ram_w_per_gb: float = _setting(
        "RAM_W_PER_GB",
        0.3725,
        parsers.float_in(0.0, 100.0),
        "watts per GiB, in [0, 100]",
        "Power per GiB (2**30 bytes) of memory in use, for the RAM estimate "
        "(Green Algorithms: 0.3725 W/GB).",
    )

    # --- carbon, cost, embodied emissions -----------------------------------------------
    location: str | None = _setting(
        "LOCATION",
        None,
        parsers.location,
        "an ISO 3166 country code (DE, DEU), an Electricity Maps zone (US-CAL-CISO), or a "
        "cloud region (aws:eu-west-1, gcp:europe-west4, azure:westeurope)",
        "Where the electricity is drawn. Unset: the world average, with a warning. "
        "Never guessed from the IP address.",
    )
    intensity_providers: tuple[str, ...] = _setting(
        "INTENSITY_PROVIDERS",
        DEFAULT_INTENSITY_PROVIDERS,
        parsers.providers,
        "comma-separated provider names, first preferred, e.g. electricitymaps,uk,static",
        "Carbon-intensity providers in order of preference; each falls back to the next. "
        "Unconfigured ones (no token) are skipped; `static` works offline. A name that no "
        "installed plugin offers is a configuration error.",
    )
    intensity_g_per_kwh: float | None = _setting(
        "INTENSITY_G_PER_KWH",
        None,
        parsers.optional(parsers.float_in(0.0, 3000.0)),
        "gCO2e/kWh in [0, 3000], or empty",
        "A constant intensity of your own (the `constant` provider): a grid figure, or a "
        "contract's (a PPA: set GREEN_MLOPS_INTENSITY_BASIS=market-based).",
    )
    intensity_basis: str = _setting(
        "INTENSITY_BASIS",
        "location-based",
        parsers.scope2_method,
        "location-based or market-based",
        "GHG Protocol method of GREEN_MLOPS_INTENSITY_G_PER_KWH: location-based (the grid's) "
        "or market-based (a contract: reported as green/co2e_market_g, never in SCI).",
    )
    electricitymaps_token: Secret | None = _setting(
        "ELECTRICITYMAPS_TOKEN",
        None,
        parsers.secret,
        "an Electricity Maps API token",
        "Enables the Electricity Maps provider (time-resolved, lifecycle). Never logged.",
        secret=True,
    )
    electricitymaps_url: str = _setting(
        "ELECTRICITYMAPS_URL",
        "https://api.electricitymaps.com",
        parsers.url,
        "an http(s) URL",
        "Base URL of the Electricity Maps API v3.",
    )
    watttime_username: str | None = _setting(
        "WATTTIME_USERNAME",
        None,
        parsers.optional(parsers.text),
        "a WattTime user name",
        "Enables the WattTime provider (marginal MOER) together with the password.",
    )
    watttime_password: Secret | None = _setting(
        "WATTTIME_PASSWORD",
        None,
        parsers.secret,
        "a WattTime password",
        "WattTime password. Never logged.",
        secret=True,
    )
    watttime_region: str | None = _setting(
        "WATTTIME_REGION",
        None,
        parsers.optional(parsers.region),
        "a WattTime region code, e.g. CAISO_NORTH",
        "WattTime region to use instead of the one mapped from the location's zone.",
    )
    watttime_url: str = _setting(
        "WATTTIME_URL",
        "https://api.watttime.org",
        parsers.url,
        "an http(s) URL",
        "Base URL of the WattTime API v3.",
    )
    uk_url: str = _setting(
        "UK_URL",
        "https://api.carbonintensity.org.uk",
        parsers.url,
        "an http(s) URL",
        "Base URL of the UK Carbon Intensity API (used when `uk` is in the provider list).",
    )
    uk_postcode: str | None = _setting(
        "UK_POSTCODE",
        None,
        parsers.optional(parsers.postcode),
        "an outward UK postcode, e.g. SW1A or RG10",
        "Regional UK intensity for this postcode area instead of the national figure.",
    )
    http_timeout_s: float = _setting(
        "HTTP_TIMEOUT_S",
        10.0,
        parsers.float_in(0.1, 120.0),
        "seconds in [0.1, 120]",
        "Read timeout of intensity API calls (connect timeout: a third of it, at most 3.05 s).",
    )
    cache_dir: Path = _setting(
        "CACHE_DIR",
        parsers.default_cache_dir,
        parsers.path,
        "a directory path",
        "Where API responses are cached on disk ($XDG_CACHE_HOME/green-mlops by default).",
        shown_default="$XDG_CACHE_HOME/green-mlops (~/.cache/green-mlops)",
    )
    cache_ttl_s: float = _setting(
        "CACHE_TTL_S",
        3600.0,
        parsers.float_in(0.0, 7 * DAY),
        "seconds in [0, 604800]",
        "How long a cached API response is reused (0 disables the cache).",
    )
    pue: float = _setting(
        "PUE",
        Pue(1.0, "default 1.0: IT energy only, no data-centre overhead counted"),
        parsers.pue,
        "a number in [1, 5], or aws or gcp for the provider's published fleet PUE",
        "Power usage effectiveness of the data centre: facility energy / IT energy.",
    )
    price_per_kwh: float | None = _setting(
        "PRICE_PER_KWH",
        None,
        parsers.optional(parsers.float_in(0.0, 100.0)),
        "a price in [0, 100] per kWh, or empty",
        "Electricity price, for `green/cost` (facility energy x price).",
    )
    currency: str = _setting(
        "CURRENCY",
        "EUR",
        parsers.currency,
        "an ISO 4217 code, e.g. EUR, USD",
        "Currency of the price.",
    )
    embodied_kgco2e: float | None = _setting(
        "EMBODIED_KGCO2E",
        None,
        parsers.optional(parsers.float_in(0.0, 1e6)),
        "kgCO2e in [0, 1e6], or empty",
        "Embodied emissions of the reserved hardware (SCI's TE); overrides the known-device "
        "defaults.",
    )
    hardware_lifetime_years: float = _setting(
        "HARDWARE_LIFETIME_YEARS",
        4.0,
        parsers.float_in(0.1, 30.0),
        "years in [0.1, 30]",
        "Expected lifespan of the hardware, to amortise embodied emissions (SCI's EL).",
    )
    resource_share: float = _setting(
        "RESOURCE_SHARE",
        1.0,
        parsers.float_in(0.0, 1.0, lo_open=True),
        "a fraction in (0, 1]",
        "Share of the machine reserved by this job (SCI's RR/TR), for embodied emissions.",
    )
    functional_unit: str = _setting(
        "FUNCTIONAL_UNIT",
        "run",
        parsers.unit,
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
                if "expected " in str(exc):  # the parser's message names the accepted form
                    raise ConfigError(f"{origin}={raw!r} is not valid: {exc}") from None
                hint = f" ({exc})" if str(exc) else ""
                raise ConfigError(
                    f"{origin}={raw!r} is not valid{hint}: expected {meta['accepted']}"
                ) from None
        settings = cls(**values)
        _say_misspelled(env)
        if settings.intensity_providers != DEFAULT_INTENSITY_PROVIDERS:
            _check_provider_names(settings, *origins["intensity_providers"])
        if settings.intensity_basis == MARKET_BASED:
            _check_contract(settings, *origins.get("intensity_basis", ("", MARKET_BASED)))
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


#: ``GREEN_MLOPS_*`` variables read outside the settings (a pilot's estimate, a scheduled job).
OTHER_VARIABLES = frozenset({"GREEN_MLOPS_ESTIMATE", "GREEN_MLOPS_SCHEDULE"})
_SAID: set[str] = set()


def _say_misspelled(env: Mapping[str, str]) -> None:
    """A ``GREEN_MLOPS_*`` variable close to a setting's name but none (GREEN_MLOPS_LOCATON) is
    said once: it is ignored, and the setting it meant keeps its default. Variables close to
    no name are left alone (a third-party plugin may read its own)."""
    known = {f.metadata["env"] for f in dataclasses.fields(Settings)} | OTHER_VARIABLES
    for name in env:
        if not name.startswith(ENV_PREFIX) or name in known or name in _SAID:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        if close:
            _SAID.add(name)
            from green_mlops.log import warn_user

            warn_user(f"{name} is not a setting, and is ignored: did you mean {close[0]}?")


def _check_contract(settings: Settings, origin: str, raw: object) -> None:
    """The market-based basis qualifies the user's constant; without it (or without the
    ``constant`` provider that prices with it) no contract figure would ever be reported.
    ``origin`` and ``raw``: where the basis was set, and the value as given."""
    if settings.intensity_g_per_kwh is None:
        missing = "GREEN_MLOPS_INTENSITY_G_PER_KWH is not set: set it to the contract's gCO2e/kWh"
    elif "constant" not in settings.intensity_providers:
        missing = "GREEN_MLOPS_INTENSITY_PROVIDERS lacks `constant`: add it (e.g. constant,static)"
    else:
        return
    given = f"{origin or 'GREEN_MLOPS_INTENSITY_BASIS'}={raw}"
    if raw != MARKET_BASED:
        given += f" ({MARKET_BASED})"
    raise ConfigError(
        f"{given} names the basis of a contract's figure, but {missing}, or unset "
        "GREEN_MLOPS_INTENSITY_BASIS"
    )


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
