"""``EnergyBudget``: warn once, or stop a fit cleanly, when its energy, carbon or cost passes a
budget: on the measured total, or on the forecast's low end (stop before the money is spent).

It reads the run totals and the forecast of the ``EnergyMonitor`` among the callbacks at each
of its progress marks (epoch ends; quarter epochs and ``log_every_n_steps`` in one process).
See docs/forecasts.md ("Budget guard").
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from green_mlops.integrations.lightning._namespaces import Callback, Misconfiguration
from green_mlops.log import warn_user
from green_mlops.units import J_PER_KWH

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from green_mlops.forecast import Forecast

log = logging.getLogger(__name__)

__all__ = ["ACTIONS", "BASES", "EnergyBudget"]

ACTIONS = ("warn", "stop")
BASES = ("measured", "forecast")
#: Limit -> what it limits (the metric compared).
LIMITS = {
    "energy_kwh": "kWh of IT energy (green/energy_kwh)",
    "co2e_g": "grams CO2e, location-based (green/co2e_g)",
    "cost": "electricity cost in the run's currency (green/cost)",
}
#: A named budget's limits (budget.py) -> ours, and the factor between their units.
_FROM_CONFIG = {
    "energy_kwh": ("energy_kwh", 1.0),
    "co2e_kg": ("co2e_g", 1000.0),
    "cost": ("cost", 1.0),
}


def _positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise Misconfiguration(
            f"EnergyBudget({name}={value!r}) is not valid: expected a finite number > 0: "
            f"{LIMITS[name]}"
        )
    return float(value)


def _path(name: str, value: Any) -> str | None:
    """A path argument (None: the default), refused now rather than when it is used."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise Misconfiguration(
            f"EnergyBudget({name}={value!r}) is not valid: expected a path (str or os.PathLike), "
            f"e.g. {name}={_EXAMPLE_PATHS[name]!r}"
        )
    return str(os.fspath(value))


_EXAMPLE_PATHS = {"checkpoint": "checkpoints/budget-stop.ckpt", "config": "green-mlops.toml"}


def _check_kinds(budget: Any, tracking_uri: Any, used: Any) -> None:
    """The named budget's arguments: a name, a tracking URI, what its period used."""
    if budget is not None and (not isinstance(budget, str) or not budget.strip()):
        raise Misconfiguration(
            f"EnergyBudget(budget={budget!r}) is not valid: expected the name of a [[budget]] "
            "of green-mlops.toml (a non-empty str), e.g. budget='vision-q4'"
        )
    if tracking_uri is not None and (not isinstance(tracking_uri, str) or not tracking_uri):
        raise Misconfiguration(
            f"EnergyBudget(tracking_uri={tracking_uri!r}) is not valid: expected an MLflow "
            "tracking URI (a non-empty str), e.g. tracking_uri='http://127.0.0.1:5000'"
        )
    if used is None:
        return
    if not isinstance(used, Mapping):
        raise Misconfiguration(
            f"EnergyBudget(used={used!r}) is not valid: expected a mapping of what the budget's "
            "period already used, e.g. used={'energy_kwh': 12.5, 'co2e_g': 4000}"
        )
    if not all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
        for v in used.values()
    ):
        raise Misconfiguration(
            f"EnergyBudget(used={dict(used)!r}) is not valid: expected finite numbers >= 0 "
            "(kWh, g CO2e, cost already spent), e.g. used={'energy_kwh': 12.5}"
        )


class EnergyBudget(Callback):
    """Warns once, or stops the fit, when its energy, carbon or cost passes a limit.

    Example::

        Trainer(callbacks=[EnergyMonitor(), EnergyBudget(energy_kwh=50, action="stop",
                                                         on="forecast")])

    Args:
        energy_kwh, co2e_g, cost: limits (numbers > 0) on the fit's ``green/energy_kwh``,
            ``green/co2e_g`` and ``green/cost``.
        action: ``"warn"`` (a ``GreenMlopsWarning``, once) or ``"stop"``
            (``trainer.should_stop``, after saving a checkpoint to resume from).
        on: ``"measured"``: the totals so far; ``"forecast"``: the low end of the fit's
            forecast (``green/forecast/energy_low_kwh``): it acts as soon as the fit cannot
            stay within the budget. Before the forecast's steady state the measured totals
            are checked, and that is said once.
        budget: the name of a ``[[budget]]`` of ``green-mlops.toml`` (``config``: its path;
            default the nearest one): its limits less what its period already used (its runs
            read from MLflow at ``tracking_uri``, or ``used``: kWh, g, cost already spent).
        checkpoint: where ``action="stop"`` saves (default
            ``green-budget-stop.ckpt`` in the Trainer's ``log_dir``, else its
            ``default_root_dir``).

    Tags (MLflow, the JSON report): ``green.budget.limits``, ``green.budget.basis``,
    ``green.budget.action``, ``green.budget.exceeded`` (what passed, when); the metric
    ``green/budget/fraction`` (the largest share of a limit used, on the chosen basis) at each
    check and ``green/budget/exceeded`` = 1 when it passed. Under DDP rank 0 decides and
    broadcasts: every rank stops at the same step.
    """

    def __init__(
        self,
        energy_kwh: float | None = None,
        co2e_g: float | None = None,
        cost: float | None = None,
        *,
        action: str = "warn",
        on: str = "measured",
        budget: str | None = None,
        config: str | os.PathLike[str] | None = None,
        tracking_uri: str | None = None,
        used: Mapping[str, float] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if action not in ACTIONS:
            raise Misconfiguration(
                f"EnergyBudget(action={action!r}) is not valid: expected 'warn' or 'stop'"
            )
        if on not in BASES:
            raise Misconfiguration(
                f"EnergyBudget(on={on!r}) is not valid: expected 'measured' or 'forecast' "
                "(the forecast's low end)"
            )
        checkpoint_path = _path("checkpoint", checkpoint)
        config_path = _path("config", config)
        _check_kinds(budget, tracking_uri, used)
        given = {"energy_kwh": energy_kwh, "co2e_g": co2e_g, "cost": cost}
        limits = {
            k: v for k, v in ((k, _positive(k, v)) for k, v in given.items()) if v is not None
        }
        self.budget_name = budget
        self.notes: list[str] = []
        self._given = dict(limits)
        #: A named budget whose period's use was read from MLflow: (config, budget, tracking
        #: URI), to read it again without a resumed fit's own runs (they are in its totals).
        self._period: tuple[Any, Any, str | None] | None = None
        if budget is not None:
            for key, value in self._named(budget, config_path, tracking_uri, used).items():
                limits[key] = min(limits.get(key, math.inf), value)
        elif used is not None:
            raise Misconfiguration(
                f"EnergyBudget(used={dict(used)!r}) is not valid without budget=: used= is what "
                "a named budget's period already spent, e.g. EnergyBudget(budget='team', used=...)"
            )
        if not limits:
            raise Misconfiguration(
                "EnergyBudget() has no limit: set energy_kwh=, co2e_g=, cost= or budget= "
                "(a [[budget]] name of green-mlops.toml), e.g. EnergyBudget(energy_kwh=50)"
            )
        self.limits = limits
        self.action, self.on = action, on
        self.checkpoint: str | None = None
        self._checkpoint_path = checkpoint_path
        self.exceeded: str | None = None
        self._no_forecast_said = False
        self._basis = "measured totals"
        self._basis_now = "measured"
        self._save_failed = ""
        #: The EnergyMonitor whose totals are checked (found in ``setup``).
        self._monitor: Any = None
        #: The last check on the forecast (checkpointed); a resumed fit's checkpoint state.
        self._last: dict[str, Any] = {}
        self._carried: dict[str, Any] = {}
        self._carried_low: dict[str, float] = {}

    def _named(
        self,
        name: str,
        config: str | None,
        tracking_uri: str | None,
        used: Mapping[str, float] | None,
    ) -> dict[str, float]:
        """The named budget's limits in our units, less what its period used."""
        from green_mlops.budget import load_config
        from green_mlops.config import ConfigError

        try:
            loaded = load_config(config, hint="EnergyBudget(config='path/to/green-mlops.toml')")
        except ConfigError as exc:
            raise Misconfiguration(f"EnergyBudget(budget={name!r}): {exc}") from None
        found = {b.name: b for b in loaded.budgets}
        if name not in found:
            raise Misconfiguration(
                f"EnergyBudget(budget={name!r}) is not valid: budget={name!r} is not in "
                f"{loaded.path}: its budgets are {', '.join(found)}"
            )
        chosen = found[name]
        unknown = sorted(set(used or ()) - {ours for ours, _ in _FROM_CONFIG.values()})
        if unknown:
            raise Misconfiguration(
                f"EnergyBudget(used={dict(used or {})!r}) is not valid: {', '.join(unknown)} "
                "is not a key: expected energy_kwh, co2e_g or cost (what the period used)"
            )
        if "kwh_per_unit" in chosen.limits:
            self.notes.append(f"budget {name!r}: kwh_per_unit is not guarded (per functional unit)")
        if used is None and chosen.period != "run":
            self._period = (loaded, chosen, tracking_uri)
        spent = dict(used) if used is not None else self._spent(loaded, chosen, tracking_uri)
        return self._left(chosen, spent)

    def _left(self, chosen: Any, spent: Mapping[str, float]) -> dict[str, float]:
        """The named budget's limits in our units, less ``spent`` (what its period used)."""
        name = chosen.name
        out: dict[str, float] = {}
        for key, (ours, factor) in _FROM_CONFIG.items():
            if key in chosen.limits:
                already = 0.0 if chosen.period == "run" else spent.get(ours, 0.0)
                out[ours] = max(0.0, chosen.limits[key] * factor - already)
                if out[ours] == 0:  # said now, acted on at the fit's first check
                    self.notes.append(
                        f"budget {name!r}: its period already used {already:.4g} of "
                        f"{chosen.limits[key] * factor:.4g} ({ours}): nothing is left for this fit"
                    )
                    warn_user(f"EnergyBudget: {self.notes[-1]}")
        return out

    def _spent(
        self, loaded: Any, chosen: Any, tracking_uri: str | None, without: Sequence[str] = ()
    ) -> dict[str, float]:
        """What the budget's period already used, from its MLflow runs (0 if unreadable),
        leaving out the runs ``without``."""
        if chosen.period == "run":
            return {}
        try:
            from green_mlops.audit import audit
            from green_mlops.budget import AuditConfig
            from green_mlops.integrations.mlflow.reader import read_runs

            records = [
                r for r in read_runs(tracking_uri, chosen.experiments) if r.run_id not in without
            ]
            result = audit(AuditConfig(loaded.path, (chosen,)), records).budgets[0]
        except Exception as exc:  # the guard still guards this run's own figures
            self.notes.append(f"what budget {chosen.name!r} already used is unknown ({exc})")
            warn_user(f"EnergyBudget: {self.notes[-1]}: only this fit's use is counted")
            return {}
        spent: dict[str, float] = {}
        for check in result.checks:
            if check.limit in _FROM_CONFIG and check.used is not None:
                ours, factor = _FROM_CONFIG[check.limit]
                spent[ours] = check.used * factor
        return spent

    # -- hooks -----------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if str(getattr(stage, "value", stage)) != "fit":
            return
        from green_mlops.integrations.lightning.validation_energy import _energy_monitor

        monitor = _energy_monitor(trainer)
        if monitor is None:
            raise Misconfiguration(
                "EnergyBudget needs an EnergyMonitor among the callbacks (it reads its totals "
                "and forecast): Trainer(callbacks=[EnergyMonitor(), EnergyBudget(...)])"
            )
        self._monitor = monitor
        if self not in monitor.guards:
            monitor.guards.append(self)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(budget=self.budget_name, on=self.on)

    @override
    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs: the last forecast's low end and the plan it was made for
        (the measured totals are the EnergyMonitor's), what the fit stopped on, and the MLflow
        runs it logged to (a named budget leaves them out of its period's use: they are in
        the fit's totals)."""
        return {"version": 1, **self._last, "exceeded": self.exceeded, "runs": self._runs()}

    def _runs(self) -> list[str]:
        """The MLflow runs of this fit: the checkpoint's, its loggers', the active run."""
        runs = dict.fromkeys(str(r) for r in self._carried.get("runs") or ())
        monitor = self._monitor
        runs.update(dict.fromkeys(getattr(getattr(monitor, "_output", None), "run_ids", ())))
        mlflow = sys.modules.get("mlflow")
        active = mlflow.active_run() if mlflow is not None else None
        if active is not None:
            runs[str(active.info.run_id)] = None
        return list(runs)

    def _recount(self) -> None:
        """A resumed fit: the named budget's period read again without the fit's own runs
        (its totals count them: counted twice, the fit would stop before its share)."""
        if self._period is None:
            return
        loaded, chosen, tracking_uri = self._period
        runs = self._runs()
        left = self._left(chosen, self._spent(loaded, chosen, tracking_uri, without=runs))
        for key, value in left.items():
            self.limits[key] = min(self._given.get(key, math.inf), value)
        self.notes.append(f"the period's use leaves out this fit's own {len(runs)} run(s)")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._carried = dict(state_dict)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The check at the fit's start: a fit resumed while its budget is still spent stops
        before training a batch (every rank: rank 0 decides)."""
        try:
            self._start(trainer)
        except Exception as exc:  # never into training: the progress marks still guard it
            log.warning("green-mlops: EnergyBudget's check at the fit's start failed: %s", exc)

    def _start(self, trainer: pl.Trainer) -> None:
        monitor = self._monitor
        totals: Mapping[str, float] = {}
        try:
            totals = monitor.state_dict()["totals"] if monitor is not None else {}
        except Exception as exc:  # the checks at the progress marks still guard the fit
            log.warning("green-mlops: EnergyBudget could not read the totals: %s", exc)
        plan = self._plan(trainer)
        low = self._carried.get("forecast_low") or {}
        if self.on == "forecast" and low and self._carried.get("plan") == plan:
            self._carried_low = {str(k): float(v) for k, v in low.items()}
        resumed = trainer.ckpt_path is not None
        if resumed and self._carried.get("runs"):
            self._recount()
        if resumed and self._carried.get("exceeded"):
            self.notes.append(f"resumed from a budget stop ({self._carried['exceeded']})")
        decided = self._decide(trainer, self._values(totals, None), start=True, resumed=resumed)
        if decided and trainer.global_rank == 0:  # no progress mark follows: logged here
            for logger in trainer.loggers:
                try:
                    logger.log_metrics({"green/budget/exceeded": 1.0}, trainer.global_step)
                except Exception as exc:
                    log.warning("green-mlops: EnergyBudget could not log: %s", exc)

    def check(
        self, trainer: pl.Trainer, metrics: Mapping[str, float], forecast: Forecast | None
    ) -> dict[str, float]:
        """Called by EnergyMonitor at each progress mark, on every rank (rank 0 decides)."""
        values = self._values(metrics, forecast)
        shares = [values[k] / v for k, v in self.limits.items() if k in values and v > 0]
        fraction = max(shares, default=0.0)  # a spent budget (limit 0) passes at once, no share
        out = {"green/budget/fraction": fraction}
        if self._decide(trainer, values, start=False, resumed=False):
            out["green/budget/exceeded"] = 1.0
        return out

    def _decide(
        self, trainer: pl.Trainer, values: Mapping[str, float], *, start: bool, resumed: bool
    ) -> bool:
        """Acts (warns, or stops) when a limit is passed, the first time; a collective."""
        basis = self._basis_now
        if self.on == "forecast" and basis != "measured":
            self._last = {"forecast_low": dict(values), "plan": self._plan(trainer)}
        over = [
            f"{k} {basis} {values.get(k, 0.0):.4g} > {v:.4g}"
            if v > 0
            else f"{k}: nothing left (the budget's period used it all)"
            for k, v in self.limits.items()
            if values.get(k, 0.0) > v or v == 0
        ]
        decided = bool(over) and self.exceeded is None
        if trainer.world_size > 1:
            decided = bool(trainer.strategy.broadcast(decided, src=0))
        if not decided:
            return False
        if start and resumed:
            where = f"at the resumed fit's start (step {trainer.global_step}): no batch trained"
        else:
            where = f"at step {trainer.global_step}"
        self.exceeded = f"{'; '.join(over) or 'on rank 0'} {where}"
        what = f"budget passed: {self.exceeded}" + (
            f" (budget {self.budget_name!r})" if self.budget_name else ""
        )
        if self.action == "stop" and start and resumed:  # nothing trained: nothing to save
            trainer.should_stop = True
            self.checkpoint = str(trainer.ckpt_path)
            what += (
                f"; the fit stops, its checkpoint is still {self.checkpoint}: to go on, resume "
                f"from it with a raised limit ({self._how_to_raise()}) or another budget"
            )
        elif self.action == "stop":
            self._stop(trainer)
            what += (
                f"; the fit stops, resume from {self.checkpoint}"
                if self.checkpoint
                else f"; the fit stops, {self._save_failed}"
            )
        elif start and resumed:
            what += f"; the resumed fit runs on (action='warn'): raise {self._how_to_raise()}"
        if trainer.global_rank == 0:
            warn_user(f"EnergyBudget: {what}")
        log.warning("green-mlops: EnergyBudget: %s", what)
        return True

    def _stop(self, trainer: pl.Trainer) -> None:
        """Stops the fit, with a checkpoint to resume from (if it can be saved)."""
        folder = trainer.log_dir or trainer.default_root_dir
        path = self._checkpoint_path or os.path.join(folder, "green-budget-stop.ckpt")
        trainer.should_stop = True  # first: a checkpoint that fails must not keep it going
        try:
            trainer.save_checkpoint(path)  # every rank: the strategy writes once
            self.checkpoint = path
        except Exception as exc:
            if trainer.world_size > 1:  # the ranks that wrote nothing wait at its barrier
                trainer.strategy.barrier("EnergyBudget.save_checkpoint")
            self._save_failed = f"its checkpoint could not be saved to {path} ({exc})"
            self.exceeded = (
                f"{self.exceeded}; the stop checkpoint could not be saved ({type(exc).__name__})"
            )

    def _how_to_raise(self) -> str:
        if self.budget_name:
            return f"the limits of [[budget]] {self.budget_name!r} in green-mlops.toml"
        return "EnergyBudget(" + ", ".join(f"{k}=..." for k in self.limits) + ")"

    @staticmethod
    def _plan(trainer: pl.Trainer) -> list[str]:
        """What the fit's forecast is a forecast of (the Trainer's limits)."""
        return [
            repr(getattr(trainer, name, None))
            for name in (
                "max_epochs",
                "max_steps",
                "limit_train_batches",
                "accumulate_grad_batches",
            )
        ]

    def _values(self, metrics: Mapping[str, float], forecast: Forecast | None) -> dict[str, float]:
        measured = {k: metrics[f"green/{k}"] for k in LIMITS if f"green/{k}" in metrics}
        self._basis_now = "measured"
        if self.on != "forecast":
            return measured
        if forecast is None and self._carried_low:  # a resumed fit: the checkpoint's forecast
            self._basis = self._basis_now = "forecast low end (the checkpoint's)"
            return {
                **measured,
                **{k: max(v, measured.get(k, v)) for k, v in self._carried_low.items()},
            }
        if forecast is None:
            if not self._no_forecast_said:
                self._no_forecast_said = True
                self._basis = "measured totals (no forecast yet: no steady state seen)"
                warn_user(
                    "EnergyBudget(on='forecast'): no forecast yet (no steady state seen): the "
                    "measured totals are checked until there is one"
                )
            return measured
        self._carried_low = {}
        self._basis = "the forecast's low end"
        self._basis_now = "forecast low end"
        low_kwh = forecast.low_j / J_PER_KWH
        values = dict(measured)
        values["energy_kwh"] = low_kwh
        if forecast.co2e_low_g is not None:
            values["co2e_g"] = forecast.co2e_low_g
        kwh = metrics.get("green/energy_kwh", 0.0)
        if "cost" in measured and kwh > 0:
            values["cost"] = measured["cost"] / kwh * low_kwh
        return values

    def tags(self) -> dict[str, str]:
        """``green.budget.*`` for the run's tags."""
        limits = ", ".join(f"{k}={v:.4g}" for k, v in self.limits.items())
        if self.budget_name:
            limits += f" (budget {self.budget_name!r}, less what its period used)"
        tags = {
            "green.budget.limits": limits,
            "green.budget.basis": self._basis if self.on == "forecast" else "measured totals",
            "green.budget.action": self.action,
        }
        if self.exceeded:
            tags["green.budget.exceeded"] = self.exceeded
        if self.notes:
            tags["green.budget.notes"] = "; ".join(self.notes)
        return tags
