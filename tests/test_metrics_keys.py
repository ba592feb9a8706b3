"""The one definition of additive totals (green_mlops.metrics): what adds up over segments,
stages and ranks, and what a parent run leaves out for its nested runs."""

from __future__ import annotations

import time

import pytest

from green_mlops.meters import Component
from green_mlops.metrics import EXCLUSIVE_KEYS, additive_keys, is_additive
from green_mlops.session import Measurement
from green_mlops.snapshot import OTHER_PHASE
from tests.conftest import ClockMeter

PHASES = ("sanity_check", "data_wait", "train", "validation", "test", "predict", OTHER_PHASE)


@pytest.mark.parametrize(
    "key",
    [
        "green/energy_kwh",
        "green/energy_uncertainty_kwh",
        "green/energy/gpu_kwh",
        "green/duration_s",
        "green/co2e_g",
        "green/co2e_uncertainty_g",
        "green/cost",
        "green/embodied_g",
        "green/sci_g_per_token",
        "green/flops",
        "green/phase/train_kwh",
        "green/phase/train_s",
        "green/phase/train_flops",
        "green/phase/train/cpu_kwh",
        "green/phase/train_co2e_g",
        "green/inclusive/energy_kwh",
    ],
)
def test_amounts_add_up(key: str) -> None:
    assert is_additive(key)


@pytest.mark.parametrize(
    "key",
    [
        "green/intensity_g_per_kwh",
        "green/mfu",
        "green/flops_per_s",
        "green/flops_per_joule",
        "green/energy_to_target_kwh",
        "green/flops_to_target",
        "green/epoch/energy_kwh",
        "green/step/energy_kwh",
        "green/quality/val_acc_per_kwh",
        "green/validation/saved_kwh_estimate",
        "green/forecast/energy_kwh",
        "green/estimate/co2e_g",
        "green/schedule/co2e_if_run_now_g",
        "green/budget/used_kwh",
        "green/node/1/energy_kwh",
        "system/green/power_w",
        "_train_loop_s",
        "val_loss",
    ],
)
def test_rates_series_and_other_keys_do_not(key: str) -> None:
    assert not is_additive(key)


def test_the_enumerated_lists_are_additive_and_distinct() -> None:
    keys = additive_keys("run", PHASES)
    assert len(set(keys)) == len(keys)
    assert all(is_additive(k) for k in keys)
    assert "green/sci_g_per_run" in keys and "green/phase/other/ram_kwh" in keys
    assert set(EXCLUSIVE_KEYS) <= set(keys)
    assert "green/duration_s" not in EXCLUSIVE_KEYS


def test_the_reduced_keys_cover_every_total_a_measurement_reports() -> None:
    """A distributed run sums ``additive_keys`` across ranks: a total a measurement reports
    but the list lacks would be rank 0's only (phase carbon is derived after the sum)."""
    settings = {
        "intensity_providers": "constant",
        "intensity_g_per_kwh": 400,
        "location": "DE",
        "embodied_kgco2e": 1000.0,
        "functional_unit": "epoch",
    }
    measurement = Measurement(
        settings,
        meters=[
            ClockMeter(100.0),
            ClockMeter(20.0, name="ram", component=Component.RAM, device="ram:clock"),
        ],
    )
    measurement.functional_units = 3.0
    measurement.start()
    for phase in ("train", "validation"):
        with measurement.phase(phase):
            time.sleep(0.05)
    result = measurement.stop()
    reported = {k for k in result.metrics if is_additive(k) and not k.endswith("_co2e_g")}
    assert {"green/co2e_g", "green/embodied_g", "green/sci_g_per_epoch"} <= reported
    assert {"green/phase/train/ram_kwh", "green/phase/validation_s"} <= reported
    assert reported <= set(additive_keys("epoch", PHASES))


def test_a_quantity_not_reported_is_added_to_the_runs_list_not_after_its_none() -> None:
    from green_mlops.metrics import add_not_reported

    tags = {"green.not_reported": "none"}  # what the footprint says when nothing is missing
    add_not_reported(tags, "green/schedule/co2e_if_run_now_g: no plan")
    assert tags["green.not_reported"] == "green/schedule/co2e_if_run_now_g: no plan"
    add_not_reported(tags, "green/estimate/error: no energy")
    assert tags["green.not_reported"] == (
        "green/schedule/co2e_if_run_now_g: no plan; green/estimate/error: no energy"
    )
    add_not_reported(tags, "")
    assert tags["green.not_reported"].endswith("no energy")
