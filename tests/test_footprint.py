"""Footprint: PUE, cost, embodied emissions (SCI M), SCI per functional unit, metrics and tags.

Carbon inputs come from the real `account()` on real intensity series; settings from the real
`Settings.load` (bad values must fail there, before anything is measured).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from green_mlops import __version__
from green_mlops.carbon import CarbonResult, account
from green_mlops.config import ConfigError, Settings
from green_mlops.facility import CLOUD_PUE, KNOWN_EMBODIED
from green_mlops.footprint import (
    Footprint,
    footprint,
    footprint_metrics,
    footprint_tags,
    reporting_sentence,
)
from green_mlops.intensity import FOREVER, IntensityPoint, IntensitySeries
from green_mlops.location import Location
from green_mlops.snapshot import DeviceEnergy, Snapshot

T0 = 1_767_225_600.0
KWH = 3.6e6
YEAR_S = 365.25 * 86400
H100 = "NVIDIA H100 80GB HBM3"


def settings(**kw: Any) -> Settings:
    return Settings.load(environ={}, **kw)


def snapshot(
    kwh: float = 2.0,
    hours: float = 1.0,
    *,
    labels: tuple[str, ...] = ("RAPL package-0 (intel-rapl:0)",),
    uncertainty: float = 0.05,
) -> Snapshot:
    """Energy split evenly over one device per label, ``hours`` long."""
    joules = kwh * KWH / len(labels)
    devices = tuple(
        DeviceEnergy(
            device=f"dev:{i}",
            component="gpu" if "NVIDIA" in label else "cpu",
            meter="test",
            method="counter",
            joules=joules,
            uncertainty=uncertainty,
            label=label,
        )
        for i, label in enumerate(labels)
    )
    return Snapshot(started_at=T0, duration_s=hours * 3600, devices=devices, phases={})


def grid(g: float, source: str = "static", *, basis: str = "average") -> IntensitySeries:
    return IntensitySeries(
        points=(IntensityPoint(FOREVER[0], FOREVER[1], g),),
        source=source,
        dataset="ember-yearly",
        zone="DE",
        basis=basis,
        scope="lifecycle",
        estimated=False,
        vintage="2024",
    )


def priced(snap: Snapshot, chain: list[IntensitySeries]) -> CarbonResult:
    """account() on a two-point timeline carrying the snapshot's energy."""
    return account([(T0, 0.0), (T0 + snap.duration_s, snap.joules)], chain)


# --- PUE -------------------------------------------------------------------------------------


def test_cloud_pue_table_has_cited_published_figures() -> None:
    # Azure is left out: its fleet PUE could not be verified from a Microsoft publication.
    assert {name: fig.value for name, fig in CLOUD_PUE.items()} == {"aws": 1.14, "gcp": 1.10}
    for name, fig in CLOUD_PUE.items():
        assert name == name.lower()
        assert "https://" in fig.source
        assert 2020 <= fig.year <= 2026


@pytest.mark.parametrize(
    ("text", "value"),
    [("gcp", 1.10), ("aws", 1.14), (" GCP ", 1.10), ("1.25", 1.25), ("1", 1.0), ("5", 5.0)],
)
def test_pue_by_name_or_number(text: str, value: float) -> None:
    assert Settings.load(environ={"GREEN_MLOPS_PUE": text}).pue == value


def test_default_pue_is_one() -> None:
    assert settings().pue == 1.0


@pytest.mark.parametrize("text", ["-1.2", "0.9", "0", "5.5", "efficient", "nan", "1,2"])
def test_bad_pue_is_refused_with_variable_value_and_form(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={"GREEN_MLOPS_PUE": text})
    message = str(info.value)
    assert "GREEN_MLOPS_PUE" in message
    assert repr(text) in message
    assert "[1, 5]" in message


def test_bad_pue_keyword_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"argument pue=0\.5 .*\[1, 5\]"):
        settings(pue=0.5)


@pytest.mark.parametrize("text", ["-0.01", "cheap", "101", "inf"])
def test_bad_price_is_refused_with_variable_value_and_form(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={"GREEN_MLOPS_PRICE_PER_KWH": text})
    message = str(info.value)
    assert "GREEN_MLOPS_PRICE_PER_KWH" in message
    assert repr(text) in message
    assert "[0, 100]" in message


def test_pue_scales_facility_energy_and_operational_carbon() -> None:
    snap = snapshot(kwh=2.0)
    carbon = priced(snap, [grid(400.0)])
    fp = footprint(snap, carbon, settings(pue="gcp"))
    assert fp.it_kwh == pytest.approx(2.0, rel=1e-12)
    assert fp.facility_kwh == pytest.approx(2.2, rel=1e-12)
    assert fp.operational_g == pytest.approx(800.0 * 1.10, rel=1e-12)
    assert fp.intensity_g_per_kwh == pytest.approx(400.0, rel=1e-12)  # PUE is not intensity
    assert "google" in fp.pue_source.lower()
    assert "2023" in fp.pue_source


def test_pue_source_says_default_or_user_value() -> None:
    snap = snapshot()
    assert "default" in footprint(snap, None, settings()).pue_source
    assert "user value" in footprint(snap, None, settings(pue=1.3)).pue_source


def test_energy_uncertainty_propagates_to_carbon() -> None:
    snap = snapshot(kwh=2.0, labels=("a", "b"), uncertainty=0.1)
    fp = footprint(snap, priced(snap, [grid(300.0)]), settings(pue=1.5))
    assert fp.energy_uncertainty == pytest.approx(0.1)
    assert fp.operational_uncertainty_g == pytest.approx(2.0 * 300 * 1.5 * 0.1, rel=1e-12)


# --- cost --------------------------------------------------------------------------------------


def test_cost_is_not_reported_without_a_price() -> None:
    snap = snapshot()
    fp = footprint(snap, priced(snap, [grid(300.0)]), settings())
    assert fp.cost is None
    assert "green/cost" not in footprint_metrics(fp)
    assert "GREEN_MLOPS_PRICE_PER_KWH" in footprint_tags(fp)["green.not_reported"]


def test_cost_is_facility_energy_times_price() -> None:
    snap = snapshot(kwh=2.0)
    fp = footprint(snap, None, settings(pue=1.5, price_per_kwh=0.25, currency="usd"))
    assert fp.cost == pytest.approx(2.0 * 1.5 * 0.25, rel=1e-12)
    assert footprint_metrics(fp)["green/cost"] == fp.cost
    assert footprint_tags(fp)["green.currency"] == "USD"


def test_a_price_of_zero_is_reported_as_zero() -> None:
    fp = footprint(snapshot(), None, settings(price_per_kwh=0))
    assert fp.cost == 0.0
    assert footprint_metrics(fp)["green/cost"] == 0.0


# --- embodied emissions (SCI M) --------------------------------------------------------------


def test_embodied_by_hand() -> None:
    # TE 1,200 kg, 4-year life, half the machine, reserved 3 h (run took 1 h):
    # 1,200,000 g x 10,800 s / (4 x 365.25 x 86,400 s) x 0.5 = 51.33... g
    fp = footprint(
        snapshot(hours=1.0),
        None,
        settings(embodied_kgco2e=1200, hardware_lifetime_years=4, resource_share=0.5),
        reserved_s=3 * 3600,
    )
    assert fp.embodied_g == pytest.approx(1_200_000 * 10_800 / (4 * YEAR_S) * 0.5, rel=1e-12)
    assert fp.embodied_g == pytest.approx(51.3347, rel=1e-5)
    assert "GREEN_MLOPS_EMBODIED_KGCO2E" in fp.embodied_source


def test_embodied_reserved_time_defaults_to_the_run() -> None:
    fp = footprint(snapshot(hours=2.0), None, settings(embodied_kgco2e=100))
    assert fp.embodied_g == pytest.approx(100_000 * 7200 / (4 * YEAR_S), rel=1e-12)


def test_embodied_is_not_reported_without_a_figure() -> None:
    fp = footprint(snapshot(labels=("NVIDIA A100-SXM4-40GB (GPU-1)",)), None, settings())
    assert fp.embodied_g is None
    assert "GREEN_MLOPS_EMBODIED_KGCO2E" in fp.embodied_source
    assert "green/embodied_g" not in footprint_metrics(fp)


def test_known_device_uses_the_manufacturer_figure_per_visible_gpu() -> None:
    labels = (f"{H100} (GPU-aaaa)", f"{H100} (GPU-bbbb)", "RAPL package-0 (intel-rapl:0)")
    fp = footprint(snapshot(hours=1.0, labels=labels), None, settings())
    per_gpu = KNOWN_EMBODIED[H100].kgco2e
    assert per_gpu == 164.0  # NVIDIA HGX H100 PCF: 1,312 kg for the 8-GPU baseboard
    assert fp.embodied_g == pytest.approx(2 * per_gpu * 1000 * 3600 / (4 * YEAR_S), rel=1e-12)
    assert "HGX H100 PCF" in fp.embodied_source
    assert "host server" in fp.embodied_source  # says what the default leaves out


def test_user_embodied_figure_overrides_known_devices() -> None:
    fp = footprint(snapshot(labels=(f"{H100} (GPU-a)",)), None, settings(embodied_kgco2e=2000))
    assert fp.embodied_g == pytest.approx(2_000_000 * 3600 / (4 * YEAR_S), rel=1e-12)
    assert "HGX" not in fp.embodied_source


def test_bad_reserved_time_is_reported_not_raised() -> None:
    fp = footprint(snapshot(), None, settings(embodied_kgco2e=10), reserved_s=-1.0)
    assert fp.embodied_g is None
    assert any("reserved time" in r for r in fp.not_reported)


# --- SCI -------------------------------------------------------------------------------------


def sci_inputs(**kw: Any) -> tuple[Snapshot, CarbonResult, Settings]:
    snap = snapshot(kwh=2.0, hours=1.0)
    return snap, priced(snap, [grid(250.0)]), settings(embodied_kgco2e=3155.76, **kw)


def expected_sci_total() -> float:
    operational = 2.0 * 250.0  # PUE 1
    embodied = 3_155_760 * 3600 / (4 * YEAR_S)  # 4 years = 126,230,400 s: 90 g
    return operational + embodied


def test_sci_per_run() -> None:
    snap, carbon, s = sci_inputs()
    fp = footprint(snap, carbon, s)
    assert expected_sci_total() == pytest.approx(590.0, rel=1e-12)
    assert fp.sci_g == pytest.approx(590.0, rel=1e-12)
    assert footprint_metrics(fp)["green/sci_g_per_run"] == fp.sci_g


@pytest.mark.parametrize(("unit", "count"), [("sample", 50_000), ("token", 2e6), ("image", 7)])
def test_sci_per_counted_unit(unit: str, count: float) -> None:
    snap, carbon, s = sci_inputs(functional_unit=unit)
    fp = footprint(snap, carbon, s, functional_units=count)
    assert fp.sci_g == pytest.approx(590.0 / count, rel=1e-12)
    assert footprint_metrics(fp)[f"green/sci_g_per_{unit}"] == fp.sci_g
    assert footprint_tags(fp)["green.functional_unit"] == unit


@pytest.mark.parametrize("unit", ["sample", "token"])
def test_sci_without_a_count_is_not_reported_and_says_why(unit: str) -> None:
    snap, carbon, s = sci_inputs(functional_unit=unit)
    fp = footprint(snap, carbon, s)
    assert fp.sci_g is None
    assert not any(k.startswith("green/sci") for k in footprint_metrics(fp))
    assert f"number of {unit}s" in footprint_tags(fp)["green.not_reported"]


@pytest.mark.parametrize("count", [0, -5, math.nan, math.inf])
def test_sci_with_a_bad_count_is_not_reported(count: float) -> None:
    snap, carbon, s = sci_inputs(functional_unit="sample")
    fp = footprint(snap, carbon, s, functional_units=count)
    assert fp.sci_g is None
    assert any("must be > 0" in r for r in fp.not_reported)


def test_sci_needs_embodied_emissions() -> None:
    snap = snapshot()
    fp = footprint(snap, priced(snap, [grid(250.0)]), settings())
    assert fp.sci_g is None
    assert any(r.startswith("sci:") and "embodied" in r for r in fp.not_reported)
    # Setting TE to 0 leaves M out knowingly: SCI is then E x I / R.
    fp = footprint(snap, priced(snap, [grid(250.0)]), settings(embodied_kgco2e=0))
    assert fp.sci_g == pytest.approx(500.0, rel=1e-12)


def test_unpriced_energy_is_reported_and_blocks_sci() -> None:
    snap = snapshot(kwh=1.0, hours=1.0)
    half = IntensitySeries(
        (IntensityPoint(T0, T0 + 1800, 200.0),),
        "api",
        "history",
        "DE",
        "average",
        "direct",
        False,
        "x",
    )
    fp = footprint(snap, priced(snap, [half]), settings(embodied_kgco2e=0))
    assert fp.operational_g == pytest.approx(100.0, rel=1e-12)
    assert fp.sci_g is None
    assert any("0.5 of 1 kWh" in r and "not priced" in r for r in fp.not_reported)


# --- metrics and tags ---------------------------------------------------------------------------

ALL_TAGS = {
    "green.location",
    "green.intensity.source",
    "green.intensity.basis",
    "green.intensity.scope",
    "green.intensity.estimated",
    "green.intensity.vintage",
    "green.intensity.fallbacks",
    "green.intensity.market",
    "green.pue",
    "green.pue.source",
    "green.currency",
    "green.embodied.source",
    "green.functional_unit",
    "green.not_reported",
}


def full_footprint() -> Footprint:
    snap = snapshot(kwh=3.0, hours=2.0, labels=(f"{H100} (GPU-a)", f"{H100} (GPU-b)"))
    forecast = IntensitySeries(
        (IntensityPoint(T0, T0 + 3600, 500.0),),
        "watttime",
        "forecast",
        "DE",
        "marginal",
        "direct",
        True,
        "retrieved 2026-01-01T00:00Z",
    )
    table = grid(300.0)
    chain = [forecast, table]
    return footprint(
        snap,
        priced(snap, chain),
        settings(pue="aws", price_per_kwh=0.2, functional_unit="token"),
        location=Location(raw="DE", zone="DE", country="DE", name="Germany"),
        intensity_sources=chain,
        fallbacks={"electricitymaps": "no token: set GREEN_MLOPS_ELECTRICITYMAPS_TOKEN"},
        functional_units=1e6,
    )


def test_metric_keys_when_everything_is_known() -> None:
    fp = full_footprint()
    assert set(footprint_metrics(fp)) == {
        "green/co2e_g",
        "green/co2e_uncertainty_g",
        "green/energy_facility_kwh",
        "green/intensity_g_per_kwh",
        "green/cost",
        "green/embodied_g",
        "green/sci_g_per_token",
    }
    assert all(isinstance(v, float) and math.isfinite(v) for v in footprint_metrics(fp).values())
    assert set(footprint_tags(fp)) == ALL_TAGS
    assert footprint_tags(fp)["green.not_reported"] == "none"


def test_metric_keys_when_nothing_is_configured() -> None:
    fp = footprint(snapshot(), None, settings())
    assert set(footprint_metrics(fp)) == {"green/energy_facility_kwh"}
    tags = footprint_tags(fp)
    assert set(tags) == ALL_TAGS
    assert tags["green.location"] == "unknown"
    assert tags["green.intensity.source"] == "none"
    reasons = tags["green.not_reported"]
    for what in ("co2e:", "cost:", "embodied:", "sci:"):
        assert what in reasons


def test_intensity_provenance_tags() -> None:
    tags = footprint_tags(full_footprint())
    # 1.5 kWh in the first hour (forecast, marginal), 1.5 kWh in the second (yearly table).
    assert tags["green.intensity.source"] == (
        "watttime/forecast DE (50%), static/ember-yearly DE (50%)"
    )
    assert tags["green.intensity.basis"] == "marginal+average"  # mixed bases are said, not hidden
    assert tags["green.intensity.scope"] == "direct+lifecycle"
    assert tags["green.intensity.estimated"] == "true"
    assert tags["green.intensity.vintage"] == "retrieved 2026-01-01T00:00Z+2024"
    assert tags["green.intensity.fallbacks"].startswith("electricitymaps: no token")
    assert tags["green.location"] == "DE, Germany"
    assert tags["green.pue"] == "1.14"
    assert "aws" in tags["green.pue.source"]
    assert "HGX H100" in tags["green.embodied.source"]


def test_full_footprint_numbers() -> None:
    fp = full_footprint()
    assert fp.facility_kwh == pytest.approx(3.0 * 1.14, rel=1e-12)
    operational = (1.5 * 500 + 1.5 * 300) * 1.14
    assert fp.operational_g == pytest.approx(operational, rel=1e-12)
    assert fp.intensity_g_per_kwh == pytest.approx(400.0, rel=1e-12)
    assert fp.cost == pytest.approx(3.0 * 1.14 * 0.2, rel=1e-12)
    embodied = 2 * 164.0 * 1000 * 7200 / (4 * YEAR_S)
    assert fp.embodied_g == pytest.approx(embodied, rel=1e-12)
    assert fp.sci_g == pytest.approx((operational + embodied) / 1e6, rel=1e-12)


def test_tags_metrics_and_sentence_never_contain_secrets() -> None:
    token, password = "em-TOKEN-5f3a9c", "wt-PASSWORD-77e1"
    s = Settings.load(
        environ={
            "GREEN_MLOPS_ELECTRICITYMAPS_TOKEN": token,
            "GREEN_MLOPS_WATTTIME_USERNAME": "someone",
            "GREEN_MLOPS_WATTTIME_PASSWORD": password,
            "GREEN_MLOPS_EMBODIED_KGCO2E": "100",
        }
    )
    assert s.electricitymaps_token is not None and s.electricitymaps_token.reveal() == token
    snap = snapshot()
    fp = footprint(snap, priced(snap, [grid(300.0)]), s, intensity_sources=[grid(300.0)])
    for text in (
        str(footprint_tags(fp)),
        str(footprint_metrics(fp)),
        reporting_sentence(fp),
        repr(fp),
    ):
        assert token not in text
        assert password not in text


def test_reporting_sentence() -> None:
    text = reporting_sentence(full_footprint())
    assert text.startswith("The run took 2.00 h on 2 x NVIDIA H100 80GB HBM3 in DE, Germany")
    assert "3.42 kWh (IT energy 3 kWh x PUE 1.14)" in text
    assert "1.37 kgCO2e" in text  # (750 + 450) x 1.14 = 1368 g
    assert "kgCO2e embodied" in text
    assert text.endswith(f"Measured with green-mlops {__version__}.")


def test_reporting_sentence_without_carbon_or_location() -> None:
    text = reporting_sentence(footprint(snapshot(), None, settings()))
    assert "an unknown location" in text
    assert "carbon emissions were not computed" in text


def test_an_unknown_location_priced_by_a_stand_in_is_an_estimate_and_short_runs_read_in_s() -> None:
    snap = snapshot(kwh=0.001, hours=5.5 / 3600)
    chain = [grid(473.0)]  # a measured average (estimated=False), standing in for "anywhere"
    where = footprint(snap, priced(snap, chain), settings(), intensity_sources=chain, location="DE")
    anywhere = footprint(snap, priced(snap, chain), settings(), intensity_sources=chain)
    assert footprint_tags(where)["green.intensity.estimated"] == "false"
    assert footprint_tags(anywhere)["green.intensity.estimated"] == "true"
    assert reporting_sentence(anywhere).startswith("The run took 5.5 s on ")  # not "0.00 h"
    long = footprint(snapshot(hours=0.7), None, settings())
    assert reporting_sentence(long).startswith("The run took 42 min on ")


def test_energy_that_nothing_priced_has_no_carbon_never_zero() -> None:
    snap = snapshot(kwh=1.0, hours=1.0)
    fp = footprint(snap, priced(snap, []), settings(embodied_kgco2e=0, price_per_kwh=0.3))
    assert fp.operational_g is None and fp.operational_uncertainty_g is None
    assert fp.intensity_g_per_kwh is None and fp.sci_g is None
    metrics = footprint_metrics(fp)
    assert "green/co2e_g" not in metrics and "green/co2e_uncertainty_g" not in metrics
    assert metrics["green/cost"] == pytest.approx(0.3)  # the rest is still reported
    reasons = footprint_tags(fp)["green.not_reported"]
    assert "co2e: 1 of 1 kWh (IT) not priced" in reasons
    assert "GREEN_MLOPS_INTENSITY_PROVIDERS" in reasons
    assert "carbon emissions were not computed" in reporting_sentence(fp)


def test_partly_priced_carbon_is_a_lower_bound_and_says_so() -> None:
    snap = snapshot(kwh=1.0, hours=1.0)
    half = IntensitySeries(
        (IntensityPoint(T0, T0 + 1800, 200.0),), "api", "history", "DE", "average", "direct",
        False, "x",
    )  # fmt: skip
    fp = footprint(snap, priced(snap, [half]), settings())
    assert fp.operational_g == pytest.approx(100.0, rel=1e-12)
    reasons = " ".join(fp.not_reported)
    assert "0.5 of 1 kWh (IT) not priced" in reasons and "lower bound" in reasons
    assert "0.5 of 1 kWh not priced" in reporting_sentence(fp)
