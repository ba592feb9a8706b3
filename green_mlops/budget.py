"""Carbon budgets: ``green-mlops.toml`` (or ``[tool.green-mlops]`` in ``pyproject.toml``).

::

    [[budget]]
    name = "vision-q4"
    experiments = ["resnet-*"]     # globs over experiment names; and/or
    tags = { team = "vision" }     # run tags that must all match
    period = "quarter"             # run | day | week | month | quarter | year | total
    energy_kwh = 500               # any of energy_kwh, co2e_kg, cost, kwh_per_unit
    co2e_kg = 120

    [audit]
    require_location = true        # runs priced with an unknown location fail the audit
    require_measured = false       # true: runs with estimated meters fail the audit

Every bad value fails with the file, its line, the key, the value and the accepted form
(:class:`BudgetConfigError`). Calendar periods are in UTC (:func:`period_window`).
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from green_mlops.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "CONFIG_FILE",
    "LIMITS",
    "PERIODS",
    "AuditConfig",
    "AuditRules",
    "Budget",
    "BudgetConfigError",
    "find_config",
    "load_config",
    "parse_config",
    "period_window",
]

CONFIG_FILE = "green-mlops.toml"
#: ``run``: each run on its own; ``total``: all time; the others: the calendar period (UTC)
#: that contains now.
PERIODS = ("run", "day", "week", "month", "quarter", "year", "total")
#: Limit key -> what it limits.
LIMITS = {
    "energy_kwh": "IT energy in kWh (green/energy_kwh)",
    "co2e_kg": "location-based operational carbon in kg CO2e (green/co2e_g / 1000)",
    "cost": "electricity cost in the runs' currency (green/cost)",
    "kwh_per_unit": "kWh per functional unit (a run, or the `units` metric of each run)",
}
_BUDGET_KEYS = ("name", "experiments", "tags", "period", *LIMITS, "units")
_AUDIT_KEYS = ("require_location", "require_measured")
_TOP_KEYS = ("budget", "audit")
_EXAMPLE = (
    '[[budget]]\nname = "vision-q4"\nexperiments = ["resnet-*"]\nperiod = "quarter"\n'
    "energy_kwh = 500"
)


class BudgetConfigError(ConfigError):
    """A budget file has a value outside its accepted form; ``str()`` starts ``FILE:LINE:``."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class Budget:
    """One ``[[budget]]``: which runs (experiment globs and/or tags), over which period, and
    its limits (limit key of :data:`LIMITS` -> value > 0)."""

    name: str
    period: str
    limits: Mapping[str, float]
    experiments: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    #: A metric, param or tag of each run with its number of functional units (kwh_per_unit);
    #: None: each top-level run is one unit.
    units: str | None = None
    line: int = 0


@dataclass(frozen=True)
class AuditRules:
    """Provenance rules: a run they reject fails the audit (exit 2)."""

    require_location: bool = False
    require_measured: bool = False


@dataclass(frozen=True)
class AuditConfig:
    path: Path
    budgets: tuple[Budget, ...]
    rules: AuditRules = AuditRules()


def find_config(start: Path | None = None) -> Path | None:
    """The nearest ``green-mlops.toml``, or ``pyproject.toml`` with a ``[tool.green-mlops]``
    table, in ``start`` (default: the working directory) or a directory above it."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not ours to judge; a broken one is reported if given with --config
            if isinstance(data.get("tool"), dict) and "green-mlops" in data["tool"]:
                return pyproject
    return None


def load_config(
    path: Path | str | None = None, *, start: Path | None = None, hint: str = "--config FILE"
) -> AuditConfig:
    """The budgets of ``path``, else of :func:`find_config` from ``start``. Raises
    :class:`BudgetConfigError` (a :class:`~green_mlops.config.ConfigError`); where no file is
    found, its message ends "or pass ``hint``": how the caller names one (the CLI's flag, an
    argument)."""
    chosen = Path(path) if path is not None else find_config(start)
    if chosen is None:
        where = (start or Path.cwd()).resolve()
        raise ConfigError(
            f"no {CONFIG_FILE} (or pyproject.toml with [tool.green-mlops]) in {where} or a "
            f"directory above it: create {CONFIG_FILE}, e.g.\n{_EXAMPLE}\nor pass {hint}"
        )
    try:
        text = chosen.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{chosen}: cannot be read ({exc.strerror or exc})") from None
    return parse_config(text, chosen)


def parse_config(text: str, path: Path) -> AuditConfig:
    """Budgets and rules of a file's ``text``; a ``pyproject.toml`` is read under
    ``[tool.green-mlops]``."""
    try:
        data: Any = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        raise BudgetConfigError(
            path, int(found.group(1)) if found else 1, f"not valid TOML: {exc}"
        ) from None
    prefix = ""
    if path.name == "pyproject.toml":
        tool = data.get("tool")
        data = tool.get("green-mlops") if isinstance(tool, dict) else None
        if not isinstance(data, dict):
            raise BudgetConfigError(
                path,
                1,
                "no [tool.green-mlops] table: add one, e.g.\n"
                + _EXAMPLE.replace("[[budget]]", "[[tool.green-mlops.budget]]"),
            )
        prefix = "tool.green-mlops."
    return _Parser(text, path, prefix).config(data)


class _Parser:
    """Checks the parsed TOML and finds the line of each key in the text (tomllib gives
    lines for syntax errors only)."""

    def __init__(self, text: str, path: Path, prefix: str) -> None:
        self.lines = text.splitlines()
        self.path = path
        self.prefix = prefix

    def config(self, data: Mapping[str, Any]) -> AuditConfig:
        table = self.prefix.rstrip(".")
        self._unknown(data, _TOP_KEYS, table, None, "")
        raw_budgets = data.get("budget")
        if not isinstance(raw_budgets, list) or not raw_budgets:
            line = self._line(table, None, "budget") if "budget" in data else 1
            shown = f"budget = {raw_budgets!r} is not valid: expected" if raw_budgets else "needs"
            raise BudgetConfigError(
                self.path,
                line,
                f"{shown} one or more [[{self.prefix}budget]] tables, e.g.\n"
                + _EXAMPLE.replace("[[budget]]", f"[[{self.prefix}budget]]"),
            )
        budgets: list[Budget] = []
        for index, raw in enumerate(raw_budgets):
            budget = self._budget(index, raw)
            if any(b.name == budget.name for b in budgets):
                self._fail(
                    index, "name", budget.name, "a name used by no other budget", what="name"
                )
            budgets.append(budget)
        return AuditConfig(self.path, tuple(budgets), self._rules(data.get("audit", {})))

    # --- a budget ----------------------------------------------------------------------------

    def _budget(self, index: int, raw: Any) -> Budget:
        table = self.prefix + "budget"
        if not isinstance(raw, dict):
            raise BudgetConfigError(
                self.path,
                self._line(table, index, None),
                f"budget #{index + 1} = {raw!r} is not valid: expected a [[{table}]] table",
            )
        label = f"budget #{index + 1}"
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            self._fail(index, "name", name, 'a non-empty string, e.g. name = "vision-q4"', label)
        label = f"budget {name!r}"
        self._unknown(raw, _BUDGET_KEYS, table, index, label)
        experiments = raw.get("experiments", [])
        if not isinstance(experiments, list) or not all(
            isinstance(e, str) and _glob_ok(e) for e in experiments
        ):
            self._fail(
                index,
                "experiments",
                experiments,
                'a list of experiment names or globs (* ? [abc]), e.g. ["resnet-*"]',
                label,
            )
        tags = raw.get("tags", {})
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            self._fail(
                index,
                "tags",
                tags,
                'a table of tag = "value" strings, e.g. { team = "vision" }',
                label,
            )
        if not experiments and not tags:
            raise BudgetConfigError(
                self.path,
                self._line(table, index, None),
                f'{label} counts no runs: give experiments (globs, e.g. ["resnet-*"]; '
                '["*"] for all) and/or tags (e.g. { team = "vision" })',
            )
        period = raw.get("period")
        if period not in PERIODS:
            self._fail(
                index,
                "period",
                period,
                f"one of {', '.join(PERIODS)} (calendar periods in UTC)",
                label,
            )
        limits: dict[str, float] = {}
        for key in LIMITS:
            if key not in raw:
                continue
            value = raw[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                self._fail(index, key, value, f"a number > 0: {LIMITS[key]}", label)
            limits[key] = float(value)
        if not limits:
            raise BudgetConfigError(
                self.path,
                self._line(table, index, None),
                f"{label} has no limit: set one or more of {', '.join(LIMITS)} (numbers > 0)",
            )
        units = raw.get("units")
        if units is not None and (
            not isinstance(units, str) or not units.strip() or "kwh_per_unit" not in limits
        ):
            self._fail(
                index,
                "units",
                units,
                "the name of a metric, param or tag with each run's number of functional units"
                ", with kwh_per_unit",
                label,
            )
        return Budget(
            name=name,
            period=str(period),
            limits=limits,
            experiments=tuple(experiments),
            tags={str(k): v for k, v in tags.items()},
            units=units,
            line=self._line(table, index, None),
        )

    def _rules(self, raw: Any) -> AuditRules:
        table = self.prefix + "audit"
        if not isinstance(raw, dict):
            raise BudgetConfigError(
                self.path,
                self._line(self.prefix.rstrip("."), None, "audit"),
                f"audit = {raw!r} is not valid: expected an [{table}] table",
            )
        self._unknown(raw, _AUDIT_KEYS, table, None, "[audit]")
        for key in _AUDIT_KEYS:
            if key in raw and not isinstance(raw[key], bool):
                raise BudgetConfigError(
                    self.path,
                    self._line(table, None, key),
                    f"[audit] {key} = {raw[key]!r} is not valid: expected true or false",
                )
        return AuditRules(**{k: raw[k] for k in _AUDIT_KEYS if k in raw})

    # --- messages ------------------------------------------------------------------------------

    def _fail(self, index: int, key: str, value: Any, accepted: str, what: str = "") -> NoReturn:
        line = self._line(self.prefix + "budget", index, key)
        shown = "(missing)" if value is None else repr(value)
        where = f"{what}: " if what and what != key else ""
        raise BudgetConfigError(
            self.path, line, f"{where}{key} = {shown} is not valid: expected {accepted}"
        )

    def _unknown(
        self,
        raw: Mapping[str, Any],
        accepted: tuple[str, ...],
        table: str,
        index: int | None,
        label: str,
    ) -> None:
        for key, value in raw.items():
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise BudgetConfigError(
                    self.path,
                    self._line(table, index, key),
                    f"{label + ': ' if label else ''}unknown key {key!r} = {value!r}{hint}; "
                    f"accepted: {', '.join(accepted)}",
                )

    def _line(self, table: str, index: int | None, key: str | None) -> int:
        """The line of ``key`` in table ``table`` (the ``index``-th of an array of tables);
        without ``key``, or when not found, the table's header line (1 when there is none)."""
        key_re = re.compile(rf"""^\s*(["']?){re.escape(key)}\1\s*[=.]""") if key else None
        inside = table == ""
        seen = -1
        header = 1
        for number, text in enumerate(self.lines, 1):
            found = _HEADER.match(text)
            if found:
                name = re.sub(r"""\s|["']""", "", found.group(2))
                array = found.group(1) == "[["
                if name == table and array == (index is not None):
                    seen += 1 if array else 0
                    inside = index is None or seen == index
                    if inside:
                        header = number
                else:
                    inside = False
                continue
            if inside and key_re is not None and key_re.match(text):
                return number
        return header


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _glob_ok(pattern: str) -> bool:
    """Not empty, and every ``[`` closed by a ``]`` (fnmatch would match it literally)."""
    return (
        bool(pattern.strip()) and re.fullmatch(r"([^\[\]]|\[!?\]?[^\]]*\])*", pattern) is not None
    )


def period_window(period: str, now: float) -> tuple[float, float] | None:
    """The calendar period (UTC) that contains ``now`` as (start, end) Unix seconds; None for
    ``run`` and ``total``, which have no window. Weeks start on Monday."""
    if period in ("run", "total"):
        return None
    t = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    day = dt.datetime(t.year, t.month, t.day, tzinfo=dt.timezone.utc)
    if period == "day":
        start, end = day, day + dt.timedelta(days=1)
    elif period == "week":
        start = day - dt.timedelta(days=t.weekday())
        end = start + dt.timedelta(days=7)
    elif period == "year":
        start, end = day.replace(month=1, day=1), day.replace(year=t.year + 1, month=1, day=1)
    elif period in ("month", "quarter"):
        months = 1 if period == "month" else 3
        first = (t.month - 1) // months * months + 1
        start = day.replace(month=first, day=1)
        after = first - 1 + months
        end = start.replace(year=t.year + after // 12, month=after % 12 + 1)
    else:
        raise ValueError(f"period={period!r} is not valid: expected one of {', '.join(PERIODS)}")
    return start.timestamp(), end.timestamp()
