"""The parts EnergyMonitor delegates to, one by one: ranks (per-process numbers, sums, the hand-over
to a shared measurement), flop_tracking (FLOPs per shape, scaling, live counts), quality, output
tags; and the callback's Lightning conventions (@override, Misconfiguration, settings).

Real parts: a real Measurement with meters of known power, a real LightningModule and Trainer,
FlopCounterMode on real steps. The full fits are in test_energy_monitor.py.
"""

from __future__ import annotations

import math
import pickle
import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from green_mlops.config import Settings
from green_mlops.integrations.lightning import EnergyMonitor
from green_mlops.integrations.lightning._namespaces import Callback, Misconfiguration
from green_mlops.integrations.lightning.flop_tracking import FlopTracker, flop_metrics
from green_mlops.integrations.lightning.output import callback_tags
from green_mlops.integrations.lightning.quality import Quality
from green_mlops.integrations.lightning.ranks import (
    RunTotals,
    derive,
    epoch_share,
    local_values,
    sum_over_ranks,
)
from green_mlops.log import GreenMlopsWarning
from green_mlops.meters import Component
from green_mlops.session import Measurement, Result
from tests.conftest import ClockMeter
from tests.test_energy_monitor import FWD, IN, OUT, SETTINGS, TRAIN, B, Classifier, H

PHASES = ("train", "validation", "data_wait", "other")


def batch(n: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, IN, generator=g), torch.randint(0, 2, (n,), generator=g)


def one_process_trainer() -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def measured(**settings: Any) -> Result:
    """A finished measurement of a CPU and RAM meter through a train and a validation phase."""
    measurement = Measurement(
        {**SETTINGS, **settings},
        meters=[
            ClockMeter(100.0),
            ClockMeter(20.0, name="ram", component=Component.RAM, device="ram:clock"),
        ],
    )
    measurement.functional_units = 4.0
    measurement.start()
    for phase in ("train", "validation"):
        with measurement.phase(phase):
            time.sleep(0.03)
    return measurement.stop()


# --- ranks ---------------------------------------------------------------------------------------


def test_a_ranks_own_numbers_weight_intensity_and_leave_node_figures_to_the_leader() -> None:
    result = measured(embodied_kgco2e=1000.0, functional_unit="epoch")
    m = result.metrics
    flops = FlopTracker(16, methods=set())
    flops.add("train", 1e9, "test")
    leader = local_values(result, flops, rank=0, zero_embodied=False, exclude={})
    assert leader["_intensity_x_kwh"] == pytest.approx(400 * m["green/energy_kwh"])
    assert "green/intensity_g_per_kwh" not in leader
    loop_s = m["green/phase/train_s"] + m.get("green/phase/data_wait_s", 0.0)
    assert leader["_train_loop_s"] == loop_s > 0
    assert leader["green/flops"] == leader["green/phase/train_flops"] == 1e9
    assert leader["_peak_unknown"] == 1.0 and leader["_counted_batches"] == 1.0

    other = local_values(result, flops, rank=1, zero_embodied=True, exclude={})
    assert "green/embodied_g" not in other  # the machine's: counted by the node leader
    assert other["green/sci_g_per_epoch"] == pytest.approx(
        m["green/sci_g_per_epoch"] - m["green/embodied_g"] / 4.0
    )
    assert other["green/duration_s"] == other["green/phase/train_s"] == other["_train_loop_s"] == 0
    assert other["green/energy_kwh"] == m["green/energy_kwh"]

    less = local_values(result, flops, rank=0, zero_embodied=False, exclude={"green/cost": 1.0})
    assert less.get("green/cost", 0.0) == leader.get("green/cost", 0.0) - (
        1.0 if "green/cost" in m else 0.0
    )


def test_one_process_sums_nothing_and_keeps_the_keys_it_reported() -> None:
    trainer = one_process_trainer()
    local = {"green/energy_kwh": 2.0, "green/cost": 0.0}
    keys = ["green/energy_kwh", "green/cost", "green/co2e_g"]
    assert sum_over_ranks(trainer, local, keys, collective=True) == local  # co2e: absent


def test_derived_metrics_from_additive_totals() -> None:
    additive = {
        "green/energy_kwh": 2.0,
        "green/co2e_g": 800.0,
        "green/phase/train_kwh": 1.5,
        "_intensity_x_kwh": 2.0 * 400,
        "green/flops": 7.2e15,
        "green/phase/train_flops": 6e15,
        "_train_loop_s": 100.0,
        "_peak_x_s": 1e14 * 100.0,
        "_peak_unknown": 0.0,
        "_counted_batches": 10.0,
    }
    got = derive(additive, PHASES)
    assert not any(k.startswith("_") for k in got)
    assert got["green/intensity_g_per_kwh"] == 400.0
    assert got["green/phase/train_co2e_g"] == 600.0
    assert got["green/flops_per_joule"] == 7.2e15 / (2.0 * 3.6e6)
    assert got["green/flops_per_s"] == 6e13
    assert got["green/mfu"] == 0.6
    unknown = derive({**additive, "_peak_unknown": 1.0}, PHASES)  # one rank's peak unknown
    assert "green/mfu" not in unknown and "green/flops_per_s" in unknown
    nothing = derive({**additive, "_counted_batches": 0.0}, PHASES)
    assert not any("flops" in k or k == "green/mfu" for k in nothing)
    assert nothing["green/energy_kwh"] == 2.0
    assert flop_metrics({"_counted_batches": 0.0, "green/flops": 1.0}) == {}


def test_epoch_share_is_the_growth_since_the_mark() -> None:
    metrics = {"green/energy_kwh": 3.0, "green/flops": 10.0, "green/phase/train_kwh": 2.0}
    mark = {"green/energy_kwh": 1.0, "green/phase/train_kwh": 0.5}
    assert epoch_share(metrics, mark) == {
        "green/epoch/energy_kwh": 2.0,
        "green/epoch/flops": 10.0,
        "green/epoch/phase/train_kwh": 1.5,
    }


def test_a_shared_measurement_and_the_callback_agree_on_the_run_totals() -> None:
    """Rank 0 sharing the MLflow plugin's measurement hands it the earlier totals (not the
    durations, which it measures itself): both report the same cumulative energy."""
    trainer = one_process_trainer()
    shared = Measurement(SETTINGS, meters=[]).start()  # nothing measured: only what it is given
    shared.offsets["green/energy_kwh"] = 0.5  # an earlier segment of its MLflow run
    totals = RunTotals(["green/energy_kwh", "green/duration_s"])
    totals.restore({"green/energy_kwh": 1.0, "green/duration_s": 10.0})  # earlier stages
    totals.share(shared)
    flops = FlopTracker(16, methods=set())
    for _ in range(2):  # the second result already holds what the first update handed over
        result = shared.result()
        got = totals.update(trainer, result, flops, rank=0, zero_embodied=False, collective=True)
        assert got["green/energy_kwh"] == 1.5
        assert shared.result().metrics["green/energy_kwh"] == 1.5
    assert "green/duration_s" not in shared.offsets
    assert got["green/duration_s"] >= 10.0
    totals.end_stage()
    assert totals.base == totals.latest == got
    shared.stop()


# --- FLOPs ---------------------------------------------------------------------------------------


def test_each_shape_is_counted_once_on_a_meta_copy() -> None:
    model, methods = Classifier(), set[str]()
    flops = FlopTracker(16, methods=methods, live=False)
    for i in range(3):
        flops.count(model, batch(), "train", "train", i, 0)
    flops.count(model, batch(), "validation", "eval", 0, 0)
    assert flops.by_phase == {"train": 3 * TRAIN, "validation": FWD}
    assert flops.counted == 4 and flops.uncounted == 0
    assert any("meta-device copy" in m for m in methods)


def test_shapes_beyond_the_limit_are_scaled_by_their_elements() -> None:
    model = Classifier()
    flops = FlopTracker(1, methods=set(), live=False)
    flops.count(model, batch(B), "train", "train", 0, 0)
    flops.count(model, batch(2 * B), "train", "train", 1, 0)  # a second shape: scaled
    assert flops.by_phase["train"] == pytest.approx(3 * TRAIN)  # FLOPs linear in the batch
    assert flops.scaled == 1
    assert "more than 1 distinct shapes" in flops.tags(enabled=True)["green.flops.scaled"]


def test_the_real_step_is_counted_live_and_an_interrupted_one_is_not() -> None:
    model = Classifier()
    flops = FlopTracker(16, methods=set())
    x, y = batch()
    flops.count(model, (x, y), "train", "train", 0, 0)  # starts counting the step below
    torch.nn.functional.cross_entropy(model(x), y).backward()
    flops.live_end()
    assert flops.by_phase["train"] == TRAIN
    flops.count(model, (x, y), "train", "train", 1, 0)  # known shape: a look-up
    assert flops.by_phase["train"] == 2 * TRAIN
    x2, y2 = batch(2 * B)
    flops.count(model, (x2, y2), "train", "train", 2, 0)
    flops.live_end(completed=False)  # an exception in the step: nothing credited
    assert flops.by_phase["train"] == 2 * TRAIN and flops.counted == 2


def test_freezing_parameters_recounts_the_training_shapes() -> None:
    model = Classifier()
    flops = FlopTracker(16, methods=set(), live=False)
    flops.check_trainable(model)
    flops.count(model, batch(), "train", "train", 0, 0)
    model.net[2].requires_grad_(False)  # no weight gradient of the last layer any more
    flops.check_trainable(model)
    flops.count(model, batch(), "train", "train", 1, 0)
    assert flops.by_phase["train"] == TRAIN + TRAIN - 2 * B * H * OUT


def test_flop_tags_say_how_they_were_obtained() -> None:
    off = FlopTracker(4, methods=set()).tags(enabled=False)
    assert off["green.flops.method"].startswith("off (count_flops=False)")
    assert off["green.mfu"] == "not reported"
    flops = FlopTracker(4, methods=set(), live=False)
    flops.count(Classifier(), "a batch its step cannot unpack", "train", "train", 0, 0)
    assert flops.uncounted == 1 and flops.counted == 0
    uncounted = flops.tags(enabled=True)["green.flops.uncounted"]
    assert uncounted.startswith("1 batch(es) of this stage not counted; training_step: ")
    assert flop_metrics(flops.additive(10.0)) == {}  # nothing counted: no FLOP metric


# --- quality -------------------------------------------------------------------------------------


def test_quality_per_pflop_and_kwh_and_the_target_once() -> None:
    quality = Quality("val_acc", "max", 0.5)
    totals = {"green/energy_kwh": 2.0, "green/flops": 4e15}
    assert quality.update({"val_acc": 0.4}, totals) == {
        "green/quality/val_acc_per_pflop": 0.1,
        "green/quality/val_acc_per_kwh": 0.2,
    }
    got = quality.update({"val_acc": 0.8}, totals)
    assert got["green/energy_to_target_kwh"] == 2.0 and got["green/flops_to_target"] == 4e15
    assert "green/energy_to_target_kwh" not in quality.update({"val_acc": 0.9}, totals)
    assert quality.metrics()["green/energy_to_target_kwh"] == 2.0
    assert (
        Quality("val_loss", "min", None).update({"val_loss": 0.5}, totals)[
            "green/quality/val_loss_per_kwh"
        ]
        == 1.0
    )  # quality 1 / 0.5 = 2 per 2 kWh
    restored = Quality("val_acc", "max", 0.5)
    restored.load_state_dict(quality.state_dict())
    assert restored.state_dict() == quality.state_dict()
    assert restored.validations == 3 and restored.to_target == quality.to_target


def test_problems_the_user_must_fix_are_green_mlops_warnings() -> None:
    with pytest.warns(GreenMlopsWarning, match="did not log 'val_f1'.*val_acc"):
        assert Quality("val_f1", "max", None).update({"val_acc": 1.0}, {}) == {}
    with pytest.warns(GreenMlopsWarning, match="reached at the first validation"):
        Quality("val_acc", "max", 0.0).update({"val_acc": 0.1}, {"green/energy_kwh": 1.0})
    with pytest.warns(GreenMlopsWarning, match="undefined here"):
        Quality("val_loss", "min", None).update({"val_loss": 0.0}, {})


def test_callback_tags() -> None:
    tags = callback_tags({"green.mfu": "x"}, monitor="val_loss", mode="min", world=2)
    assert tags["green.mfu"] == "x"
    assert tags["green.quality"] == "val_loss (min); quality = 1 / metric"
    assert tags["green.ranks"].startswith("2 processes; energy, carbon and FLOPs summed")


# --- the callback's conventions ------------------------------------------------------------------


def test_every_hook_is_marked_override() -> None:
    hooks = [
        name
        for name, value in vars(EnergyMonitor).items()
        if callable(value) and hasattr(Callback, name) and not name.startswith("_")
    ]
    assert len(hooks) >= 20
    missing = [name for name in hooks if not getattr(vars(EnergyMonitor)[name], "__override__", 0)]
    assert missing == []
    assert getattr(vars(EnergyMonitor)["state_key"].fget, "__override__", False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"monitor": "val_acc", "mode": "maximum"}, "mode='max' when"),
        ({"target": 0.9}, "pass monitor="),
        ({"monitor": "a", "target": math.inf}, "finite"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"max_flop_signatures": 0}, "max_flop_signatures"),
    ],
)
def test_bad_arguments_raise_the_callbacks_one_exception_type(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(Misconfiguration, match=match):
        EnergyMonitor(**kwargs)


def test_settings_may_be_a_settings_object_and_still_pickle_for_ddp_spawn() -> None:
    settings = Settings.load(environ={}, **SETTINGS, electricitymaps_token="t0ken")
    mon = EnergyMonitor(settings=settings)
    assert mon.settings is settings
    copy = pickle.loads(pickle.dumps(mon))
    assert copy.settings == settings
    assert copy.settings.electricitymaps_token is not None
    assert copy.settings.electricitymaps_token.reveal() == "t0ken"
