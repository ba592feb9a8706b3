"""EnergyBudget: warn once or stop a real Lightning fit (CPU) on its measured total or on the
forecast's low end; bad settings refused with the fix; a named budget of green-mlops.toml."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import EarlyStopping

from green_mlops.integrations.lightning import EnergyBudget, EnergyMonitor
from green_mlops.integrations.lightning._namespaces import Misconfiguration
from green_mlops.log import GreenMlopsWarning
from green_mlops.meters import Readings
from tests.conftest import ClockMeter
from tests.test_energy_monitor import SETTINGS, Classifier, loader, rows, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning.*",
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
)


#: Energy per training batch: the budget tests' energy counts work done, not time, so what
#: they stop at is the same on a loaded machine (wall-time energy made them flaky there).
JOULES_PER_BATCH = 50.0


class WorkMeter(ClockMeter):
    """A counter that the fit advances by :data:`JOULES_PER_BATCH` per training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.joules = 0.0

    def sample(self, now: float) -> Readings:
        return {self.devices[0].id: self.joules}


class WorkMonitor(EnergyMonitor):
    """EnergyMonitor over a :class:`WorkMeter`, advanced before each batch's bookkeeping."""

    def __init__(self, **kwargs: Any) -> None:
        self.meter = WorkMeter()
        super().__init__(settings=SETTINGS, meters=lambda: [self.meter], **kwargs)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.meter.joules += JOULES_PER_BATCH
        super().on_train_batch_end(*args, **kwargs)


def monitor(**kwargs: Any) -> EnergyMonitor:
    return WorkMonitor(**kwargs)


def final_kwh(table: list[dict[str, float]]) -> float:
    return [r["green/energy_kwh"] for r in table if "green/energy_kwh" in r][-1]


def report_tags(tr: Any) -> dict[str, str]:
    path = Path(tr.logger.log_dir) / "green_report.json"
    return json.loads(path.read_text())["tags"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def epoch_kwh(tmp_path_factory: pytest.TempPathFactory) -> float:
    """What one epoch of the test fit costs (the work meter: a fixed amount per batch)."""
    tr = trainer(tmp_path_factory.mktemp("ref"), [monitor()], max_epochs=3)
    tr.fit(Classifier(), loader(), loader())
    return final_kwh(rows(tr)) / 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"energy_kwh": 0}, r"energy_kwh=0\) is not valid: expected a finite number > 0"),
        ({"co2e_g": -5.0}, r"co2e_g=-5.0\) is not valid: expected a finite number > 0"),
        (
            {"energy_kwh": 1, "action": "halt"},
            r"action='halt'\) is not valid: expected 'warn' or 'stop'",
        ),
        ({"energy_kwh": 1, "on": "guess"}, r"on='guess'\) is not valid: expected 'measured' or"),
        ({}, r"no limit: set energy_kwh=, co2e_g=, cost= or budget="),
    ],
)
def test_bad_settings_fail_early_with_the_accepted_form(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(Misconfiguration, match=message):
        EnergyBudget(**kwargs)


def test_stop_on_the_measured_total_stops_cleanly_with_a_checkpoint_to_resume(
    tmp_path: Path, epoch_kwh: float
) -> None:
    guard = EnergyBudget(energy_kwh=2.5 * epoch_kwh, action="stop")
    tr = trainer(tmp_path, [monitor(), guard], max_epochs=20)
    tr.fit(Classifier(), loader(), loader())
    assert 1 <= tr.current_epoch < 10  # stopped, not run to 20 epochs
    assert guard.checkpoint is not None and Path(guard.checkpoint).is_file()
    tags = report_tags(tr)
    assert tags["green.budget.action"] == "stop"
    assert (
        "energy_kwh" in tags["green.budget.exceeded"]
        and "measured" in tags["green.budget.exceeded"]
    )
    assert any(r.get("green/budget/exceeded") == 1.0 for r in rows(tr))
    # it resumes from the checkpoint (and the budget, passed again, stops it again at once)
    again = trainer(tmp_path / "resume", [monitor()], max_epochs=tr.current_epoch + 2)
    again.fit(Classifier(), loader(), loader(), ckpt_path=guard.checkpoint)
    assert again.current_epoch == tr.current_epoch + 2


def test_stop_on_the_forecast_stops_before_the_budget_is_spent(
    tmp_path: Path, epoch_kwh: float
) -> None:
    limit = 8 * epoch_kwh  # of a 30-epoch fit
    guard = EnergyBudget(energy_kwh=limit, action="stop", on="forecast")
    tr = trainer(tmp_path, [guard, monitor()], max_epochs=30)  # order does not matter
    tr.fit(Classifier(), loader(), loader())
    assert tr.current_epoch < 8
    assert final_kwh(rows(tr)) < limit  # stopped early, not after the energy was spent
    assert "forecast low end" in report_tags(tr)["green.budget.exceeded"]


def test_warn_warns_once_and_the_fit_runs_to_its_end(tmp_path: Path, epoch_kwh: float) -> None:
    guard = EnergyBudget(energy_kwh=epoch_kwh, action="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = trainer(tmp_path, [monitor(), guard], max_epochs=4)
        tr.fit(Classifier(), loader(), loader())
    assert tr.current_epoch == 4
    said = [
        w
        for w in caught
        if issubclass(w.category, GreenMlopsWarning) and "budget" in str(w.message)
    ]
    assert len(said) == 1 and "energy_kwh" in str(said[0].message)
    assert report_tags(tr)["green.budget.action"] == "warn"


def test_on_forecast_before_a_steady_state_is_said_not_ignored(tmp_path: Path) -> None:
    guard = EnergyBudget(energy_kwh=1.0, on="forecast")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = trainer(tmp_path, [monitor(), guard], max_epochs=1, limit_train_batches=2)
        tr.fit(Classifier(), loader(), loader())
    said = [str(w.message) for w in caught if issubclass(w.category, GreenMlopsWarning)]
    assert any("no forecast yet" in m and "measured total" in m for m in said)
    assert "no forecast yet" in report_tags(tr)["green.budget.basis"]


def test_without_energy_monitor_it_says_what_to_add(tmp_path: Path) -> None:
    tr = trainer(tmp_path, [EnergyBudget(energy_kwh=1.0)], max_epochs=1)
    with pytest.raises(Misconfiguration, match="needs an EnergyMonitor among the callbacks"):
        tr.fit(Classifier(), loader(), loader())


def test_a_named_budget_counts_what_its_period_used(tmp_path: Path) -> None:
    config = tmp_path / "green-mlops.toml"
    config.write_text(
        '[[budget]]\nname = "team"\nexperiments = ["*"]\nperiod = "total"\nenergy_kwh = 0.5\n'
        "co2e_kg = 2\n"
    )
    guard = EnergyBudget(budget="team", config=config, used={"energy_kwh": 0.2})
    assert guard.limits == {"energy_kwh": pytest.approx(0.3), "co2e_g": 2000.0}
    with pytest.raises(
        Misconfiguration, match=r"budget='nope' is not in .*green-mlops.toml: its budgets are team"
    ):
        EnergyBudget(budget="nope", config=config)


def test_a_named_budget_already_spent_stops_the_fit_at_its_first_check(tmp_path: Path) -> None:
    # the last days of a team's month: its period used more than the budget
    config = tmp_path / "green-mlops.toml"
    config.write_text(
        '[[budget]]\nname = "month"\nexperiments = ["*"]\nperiod = "total"\nenergy_kwh = 0.001\n'
    )
    with pytest.warns(GreenMlopsWarning, match=r"already used 0.002 of 0.001 \(energy_kwh\)"):
        guard = EnergyBudget(
            budget="month", config=config, used={"energy_kwh": 0.002}, action="stop"
        )
    assert guard.limits == {"energy_kwh": 0.0}
    tr = trainer(tmp_path, [monitor(), guard], max_epochs=20)
    tr.fit(Classifier(), loader(), loader())
    assert tr.global_step <= 4  # the first mark (a quarter epoch), not 20 epochs
    assert guard.exceeded is not None and guard.checkpoint is not None
    assert Path(guard.checkpoint).is_file()
    assert any(r.get("green/budget/exceeded") == 1.0 for r in rows(tr))
    assert "nothing is left for this fit" in report_tags(tr)["green.budget.notes"]
    with pytest.raises(Misconfiguration, match=r"energy is not a key: expected energy_kwh"):
        EnergyBudget(budget="month", config=config, used={"energy": 1.0})
    with pytest.raises(Misconfiguration, match=r"not valid without budget="):
        EnergyBudget(energy_kwh=1.0, used={"energy_kwh": 0.5})


def test_stop_stops_even_where_its_checkpoint_cannot_be_written(
    tmp_path: Path, epoch_kwh: float
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # unwritable under it, even for root
    guard = EnergyBudget(
        energy_kwh=1.5 * epoch_kwh, action="stop", checkpoint=blocked / "stop.ckpt"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = trainer(tmp_path, [monitor(), guard], max_epochs=20)
        tr.fit(Classifier(), loader(), loader())
    assert 1 <= tr.current_epoch < 10  # stopped all the same
    assert guard.checkpoint is None
    said = [str(w.message) for w in caught if issubclass(w.category, GreenMlopsWarning)]
    assert any("the fit stops" in m and "could not be saved" in m for m in said), said
    assert "could not be saved" in report_tags(tr)["green.budget.exceeded"]


class OddStopping(EarlyStopping):
    """An EarlyStopping whose wait count is not a number (the forecast's plan cannot use it)."""

    @property  # type: ignore[override]
    def wait_count(self) -> Any:
        return None

    @wait_count.setter
    def wait_count(self, value: Any) -> None:
        pass


def test_a_forecast_that_fails_does_not_turn_the_guard_off(
    tmp_path: Path, epoch_kwh: float
) -> None:
    guard = EnergyBudget(energy_kwh=2.5 * epoch_kwh, action="stop")
    es = OddStopping(monitor="not_logged", strict=False, patience=1000)  # it never acts
    tr = trainer(tmp_path, [monitor(), guard, es], max_epochs=20)
    tr.fit(Classifier(), loader(), loader())
    assert 1 <= tr.current_epoch < 10 and guard.exceeded is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"checkpoint": 123},
            r"checkpoint=123\) is not valid: expected a path \(str or os.PathLike\)",
        ),
        ({"checkpoint": ""}, r"checkpoint=''\) is not valid: expected a path"),
        ({"config": 3.5}, r"config=3.5\) is not valid: expected a path \(str or os.PathLike\)"),
        ({"budget": 5}, r"budget=5\) is not valid: expected the name of a \[\[budget\]\]"),
        ({"budget": " "}, r"budget=' '\) is not valid: expected the name"),
        ({"tracking_uri": 42}, r"tracking_uri=42\) is not valid: expected an MLflow tracking"),
        (
            {"budget": "team", "used": {"energy_kwh": -1.0}},
            r"used=\{'energy_kwh': -1.0\}\) is not valid: expected finite numbers >= 0",
        ),
        (
            {"budget": "team", "used": {"co2e_g": float("nan")}},
            r"used=\{'co2e_g': nan\}\) is not valid: expected finite numbers >= 0",
        ),
        (
            {"budget": "team", "used": {"cost": True}},
            r"used=\{'cost': True\}\) is not valid: expected finite numbers >= 0",
        ),
        (
            {"budget": "team", "used": [("energy_kwh", 1.0)]},
            r"used=\[\('energy_kwh', 1.0\)\]\) is not valid: expected a mapping",
        ),
    ],
)
def test_bad_paths_names_and_used_fail_at_construction_not_mid_fit(
    kwargs: dict[str, Any], message: str, tmp_path: Path
) -> None:
    # a user's typo must not wait for the stop (mid-fit) to fail; the config file is valid
    config = tmp_path / "green-mlops.toml"
    config.write_text(
        '[[budget]]\nname = "team"\nexperiments = ["*"]\nperiod = "run"\nenergy_kwh = 1\n'
    )
    given = {"config": config, **kwargs} if "budget" in kwargs else {"energy_kwh": 1.0, **kwargs}
    with pytest.raises(Misconfiguration, match=message):
        EnergyBudget(**given)


def test_a_missing_config_file_names_the_argument_to_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no green-mlops.toml here or above
    with pytest.raises(Misconfiguration) as caught:
        EnergyBudget(budget="team")
    said = str(caught.value)
    assert "no green-mlops.toml" in said and "EnergyBudget(config=" in said, said
    assert "--config" not in said  # a CLI flag means nothing to a Python caller


def budget_said(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, GreenMlopsWarning) and "budget" in str(w.message)
    ]


@pytest.mark.parametrize("on", ["measured", "forecast"])
def test_a_fit_resumed_over_budget_stops_before_training_a_batch(
    tmp_path: Path, epoch_kwh: float, on: str
) -> None:
    # a user resumes a fit that EnergyBudget stopped, with the same budget: it is still spent
    stop = tmp_path / "stop.ckpt"
    limit = (2.5 if on == "measured" else 6) * epoch_kwh  # 6: well under the forecast's 10
    first = trainer(
        tmp_path / "first",
        [monitor(), EnergyBudget(energy_kwh=limit, action="stop", on=on, checkpoint=stop)],
        max_epochs=12,
    )
    first.fit(Classifier(), loader(), loader())
    stopped_at, saved = first.global_step, stop.read_bytes()
    assert 0 < stopped_at < 6 * 4
    guard = EnergyBudget(energy_kwh=limit, action="stop", on=on, checkpoint=stop)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = trainer(tmp_path / "again", [guard, monitor()], max_epochs=12)
        again.fit(Classifier(), loader(), loader(), ckpt_path=stop)
    assert again.global_step == stopped_at  # not one batch more
    assert stop.read_bytes() == saved  # still the checkpoint it stopped at, not a later one
    assert guard.checkpoint == str(stop)  # where to resume from
    said = budget_said(caught)
    assert len(said) == 1, said
    assert "resumed" in said[0] and str(stop) in said[0] and "raise" in said[0], said
    assert "the resumed fit's start" in report_tags(again)["green.budget.exceeded"]
    # with a raised limit the resumed fit runs on, from the checkpoint's totals: measured, to
    # the new limit; on the forecast, to its end (12 epochs, within 18 epochs' energy)
    raised = EnergyBudget(energy_kwh=(2 if on == "measured" else 3) * limit, action="stop", on=on)
    more = trainer(tmp_path / "more", [monitor(), raised], max_epochs=12)
    more.fit(Classifier(), loader(), loader(), ckpt_path=stop)
    assert final_kwh(rows(more)) > limit
    if on == "measured":
        assert stopped_at < more.global_step < 12 * 4 and raised.exceeded is not None
    else:
        assert more.global_step == 12 * 4 and raised.exceeded is None


@pytest.mark.slow
def test_a_resumed_fit_is_not_counted_twice_against_a_named_budget(
    tmp_path: Path, epoch_kwh: float
) -> None:
    # a team's budget read from MLflow: the stopped run is in the period's use, and the resumed
    # fit's totals count it again (it stopped at once, with half the budget left)
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tmp_path / "green-mlops.toml"
    toml = '[[budget]]\nname = "team"\nexperiments = ["*"]\nperiod = "total"\nenergy_kwh = {}\n'
    config.write_text(toml.format(2.5 * epoch_kwh))
    stop = tmp_path / "stop.ckpt"

    def loggers(name: str) -> list[Any]:
        return [
            CSVLogger(tmp_path / name, name="csv"),
            MLFlowLogger(experiment_name="team", tracking_uri=uri, run_name=name),
        ]

    guard = EnergyBudget(
        budget="team", config=config, tracking_uri=uri, action="stop", checkpoint=stop
    )
    first = trainer(tmp_path / "first", [monitor(), guard], max_epochs=12, logger=loggers("first"))
    first.fit(Classifier(), loader(), loader())
    stopped_at, spent = first.global_step, final_kwh(rows(first))
    assert 0 < stopped_at < 4 * 4 and guard.exceeded is not None
    config.write_text(toml.format(5 * epoch_kwh))  # the team raises its budget: 2.5 epochs left
    raised = EnergyBudget(budget="team", config=config, tracking_uri=uri, action="stop")
    assert raised.limits["energy_kwh"] == pytest.approx(5 * epoch_kwh - spent, rel=0.01)
    again = trainer(tmp_path / "again", [monitor(), raised], max_epochs=12, logger=loggers("again"))
    again.fit(Classifier(), loader(), loader(), ckpt_path=stop)
    assert raised.limits["energy_kwh"] == pytest.approx(5 * epoch_kwh)  # its own runs left out
    assert again.global_step > stopped_at + 4  # it trained on, to the raised budget
    assert 4.5 * epoch_kwh < final_kwh(rows(again)) < 6 * epoch_kwh
    assert "leaves out this fit's own" in report_tags(again)["green.budget.notes"]
