"""``green-mlops compare`` on real runs: made by the real MLflow plugin and the real Lightning
``EnergyMonitor`` (tests/green_runs.py) on a real MLflow server, and the callback's report
files. Every expected number is computed here from the runs' own metrics, read back with
``MlflowClient``."""

from __future__ import annotations

import csv
import io
import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from green_mlops.cli import main
from green_mlops.compare import EXCLUSIVE_NOTE, Comparison, UnknownBaseline, compare
from green_mlops.integrations.mlflow.reader import read_runs
from green_mlops.runs import read_report_files
from tests.green_runs import LightningRun, RunSpec, make_lightning_run, make_runs
from tests.mlflow_server import MlflowServer, free_port

REL = 1e-9


@dataclass(frozen=True)
class Made:
    server: MlflowServer
    experiment: str
    #: An experiment whose one run the plugin did not measure.
    plain: str
    ids: dict[str, str]
    lit: LightningRun
    csv_dir: Path

    def metrics(self, name: str) -> dict[str, float]:
        return dict(MlflowClient(self.server.url).get_run(self.ids[name]).data.metrics)

    def tags(self, name: str) -> dict[str, str]:
        return dict(MlflowClient(self.server.url).get_run(self.ids[name]).data.tags)


@pytest.fixture(scope="module")
def made(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Made:
    work = tmp_path_factory.mktemp("compare")
    exp = f"cmp-{uuid.uuid4().hex[:8]}"
    plain = f"{exp}-plain"
    ids = make_runs(
        mlflow_server,
        [
            RunSpec(exp, "small", {"lr": "0.1"}, {"team": "a"}, {"val_acc": 0.8, "loss": 0.5}),
            RunSpec(exp, "big", {"lr": "0.01"}, {"team": "a"}, {"val_acc": 0.9, "loss": 0.3}, 0.8),
            RunSpec(
                exp, "worse", {"lr": "0.01"}, {"team": "b"}, {"val_acc": 0.7, "loss": 0.9}, 0.8
            ),
            RunSpec(
                exp,
                "parent",
                {"lr": "0.05"},
                {"team": "b"},
                {"val_acc": 0.85, "loss": 0.35},
                0.2,
                children=[RunSpec(exp, "child", {}, {"team": "b"}, {"val_acc": 0.75}, 0.4)],
            ),
        ],
        work,
    )
    # priced after a provider that was skipped (electricitymaps without a token)
    ids |= make_runs(
        mlflow_server,
        [RunSpec(exp, "fallback", {"lr": "0.1"}, {"team": "c"}, {"val_acc": 0.6, "loss": 1.2})],
        work,
        GREEN_MLOPS_INTENSITY_PROVIDERS="electricitymaps,constant",
    )
    ids |= make_runs(
        mlflow_server,
        [RunSpec(plain, "unmeasured", metrics={"val_acc": 0.5})],
        work,
        GREEN_MLOPS_ENABLE="0",
    )
    csv_dir = work / "csv"
    lit = make_lightning_run(mlflow_server, work, name="lit", experiment=exp, csv_dir=csv_dir)
    assert lit.run_id is not None
    ids["lit"] = lit.run_id
    return Made(mlflow_server, exp, plain, ids, lit, csv_dir)


def _compare(made: Made, **kwargs: object) -> Comparison:
    return compare(read_runs(made.server.url, [made.experiment]), **kwargs)  # type: ignore[arg-type]


def _cli(made: Made, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["compare", "--tracking-uri", made.server.url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=REL)


# --- the rows ----------------------------------------------------------------------------------


def test_rows_carry_the_runs_metrics_sorted_by_quality_per_kwh(made: Made) -> None:
    c = _compare(made, metric="val_acc")
    assert {r.name for r in c.rows} == {
        "small",
        "big",
        "worse",
        "parent",
        "child",
        "fallback",
        "lit",
    }
    for row in c.rows:
        m, tags = made.metrics(row.name), made.tags(row.name)
        assert row.run_id == made.ids[row.name]
        assert row.energy_kwh == m["green/energy_kwh"] > 0
        assert row.energy_uncertainty_kwh == m["green/energy_uncertainty_kwh"]
        assert row.co2e_g == m["green/co2e_g"] > 0
        assert row.cost == m["green/cost"] and row.currency == tags["green.currency"]
        assert row.duration_s == m["green/duration_s"]
        assert row.metric == m["val_acc"]
        inclusive = m.get("green/inclusive/energy_kwh", m["green/energy_kwh"])
        assert row.inclusive_kwh == inclusive
        assert _close(row.quality_per_kwh, m["val_acc"] / inclusive)
        assert row.measured is (tags["green.measured"] == "true")
        estimated = sorted(
            k.split(".")[-1]
            for k, v in tags.items()
            if k.startswith("green.method.") and v == "estimate"
        )
        assert list(row.estimated) == estimated
        assert bool(estimated) == any(mark.startswith("estimated") for mark in row.marks)
    per_kwh = [r.quality_per_kwh for r in c.rows]
    assert per_kwh == sorted(per_kwh, reverse=True)  # type: ignore[type-var]
    assert EXCLUSIVE_NOTE in c.notes


def test_the_lightning_run_has_flops_and_plugin_runs_say_why_not(made: Made) -> None:
    rows = {r.name: r for r in _compare(made, metric="val_acc").rows}
    lit = made.metrics("lit")
    assert rows["lit"].flops == lit["green/flops"] > 0
    assert rows["lit"].metric == made.lit.val_acc
    assert rows["small"].flops is None
    assert "FLOPs not counted" in rows["small"].absent["flops"]


def test_pareto_front_of_quality_vs_energy(made: Made) -> None:
    c = _compare(made, metric="val_acc")
    # by hand: sweep by energy, keep each run that beats the best quality seen so far
    points = sorted(
        (
            made.metrics(r.name).get(
                "green/inclusive/energy_kwh", made.metrics(r.name)["green/energy_kwh"]
            ),
            -made.metrics(r.name)["val_acc"],
            r.name,
        )
        for r in c.rows
    )
    expected, best = set(), -math.inf
    for _, negative, name in points:
        if -negative > best:
            expected.add(name)
            best = -negative
    assert {r.name for r in c.rows if r.on_front} == expected
    assert "big" in expected  # the best val_acc is always on the front
    assert points[0][2] in expected  # so is the least energy


def test_baseline_savings_and_metric_change(made: Made) -> None:
    c = _compare(made, metric="val_acc", baseline=made.ids["small"])
    assert c.baseline is not None and c.baseline.name == "small"
    base = made.metrics("small")
    for row in c.rows:
        m = made.metrics(row.name)
        d = row.vs_baseline
        assert d is not None
        kwh = m.get("green/inclusive/energy_kwh", m["green/energy_kwh"])
        co2e = m.get("green/inclusive/co2e_g", m["green/co2e_g"])
        assert _close(d.saving_kwh, base["green/energy_kwh"] - kwh)
        assert _close(
            d.saving_kwh_pct, 100 * (base["green/energy_kwh"] - kwh) / base["green/energy_kwh"]
        )
        assert _close(d.saving_co2e_g, base["green/co2e_g"] - co2e)
        assert _close(d.saving_co2e_pct, 100 * (base["green/co2e_g"] - co2e) / base["green/co2e_g"])
        assert _close(d.metric_change, m["val_acc"] - base["val_acc"])
    small = c.baseline.vs_baseline
    assert small is not None and small.saving_kwh == 0 and small.metric_change == 0
    # by unique run name too; an unknown one is an error naming it
    assert (
        compare(read_runs(made.server.url, [made.experiment]), baseline="big").baseline.name
        == "big"
    )  # type: ignore[union-attr]
    with pytest.raises(UnknownBaseline, match="nope"):
        _compare(made, baseline="nope")


def test_grouping_sums_exclusive_totals_and_nested_runs_count_once(made: Made) -> None:
    c = _compare(made, metric="val_acc", by="team")
    groups = {g.value: g for g in c.groups}
    names = {
        "a": ["small", "big"],
        "b": ["worse", "parent", "child"],
        "c": ["fallback"],
        None: ["lit"],
    }
    assert set(groups) == set(names)
    for team, members in names.items():
        g = groups[team]
        assert g.runs == len(members)
        for attr, key in (
            ("energy_kwh", "green/energy_kwh"),
            ("co2e_g", "green/co2e_g"),
            ("cost", "green/cost"),
        ):
            assert _close(getattr(g, attr), math.fsum(made.metrics(n)[key] for n in members))
        assert g.best_metric == max(made.metrics(n)["val_acc"] for n in members)
    every = [r.name for r in c.rows]
    assert _close(c.total.energy_kwh, math.fsum(made.metrics(n)["green/energy_kwh"] for n in every))
    # the parent's own total excludes its child: parent + child = the parent's inclusive figure
    parent, child = made.metrics("parent"), made.metrics("child")
    assert parent["green/inclusive/energy_kwh"] > parent["green/energy_kwh"]
    assert _close(
        parent["green/energy_kwh"] + child["green/energy_kwh"], parent["green/inclusive/energy_kwh"]
    )
    assert _close(
        groups["b"].energy_kwh,
        made.metrics("worse")["green/energy_kwh"] + parent["green/inclusive/energy_kwh"],
    )
    # the parent is compared by what its result cost: including the child
    row = next(r for r in c.rows if r.name == "parent")
    assert row.inclusive_kwh == parent["green/inclusive/energy_kwh"]
    assert (
        row.parent_id is None
        and next(r for r in c.rows if r.name == "child").parent_id == made.ids["parent"]
    )


def test_a_parent_without_its_nested_runs_is_noted(made: Made) -> None:
    records = read_runs(
        made.server.url, [made.experiment], filter_string="attributes.run_name = 'parent'"
    )
    c = compare(records, metric="val_acc")
    assert [r.name for r in c.rows] == ["parent"]
    assert any(n.startswith("parent: its nested runs are not among") for n in c.notes)


def test_mode_min_uses_one_over_the_metric(made: Made) -> None:
    c = _compare(made, metric="loss", mode="min", by="team")
    for row in c.rows:
        m = made.metrics(row.name)
        if "loss" not in m:
            assert row.metric is None and row.quality_per_kwh is None and not row.on_front
            assert row.absent["quality_per_kwh"] == "the run has no 'loss'"
            continue
        kwh = m.get("green/inclusive/energy_kwh", m["green/energy_kwh"])
        assert _close(row.quality, 1 / m["loss"])
        assert _close(row.quality_per_kwh, 1 / m["loss"] / kwh)
    assert {g.value: g.best_metric for g in c.groups}["a"] == 0.3  # lower is better


def test_fallback_priced_run_is_marked_not_hidden(
    made: Made, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = {r.name: r for r in _compare(made, metric="val_acc").rows}
    fallback = rows["fallback"]
    assert made.tags("fallback")["green.intensity.fallbacks"] != "none"
    assert fallback.intensity_fallback == made.tags("fallback")["green.intensity.fallbacks"]
    assert "electricitymaps" in (fallback.intensity_fallback or "")
    assert "fallback intensity" in fallback.marks
    assert rows["small"].intensity_fallback is None
    code, out, _ = _cli(made, capsys, "--experiment", made.experiment, "--format", "markdown")
    line = next(line for line in out.splitlines() if "| fallback |" in line)
    assert code == 0 and "fallback intensity" in line


def test_unmeasured_run_is_absent_with_the_reason_never_zero(
    made: Made, capsys: pytest.CaptureFixture[str]
) -> None:
    c = compare(read_runs(made.server.url, [made.plain]), metric="val_acc")
    (row,) = c.rows
    assert row.energy_kwh is None and row.co2e_g is None and row.quality_per_kwh is None
    assert "not measured by green-mlops" in row.absent["energy_kwh"]
    assert (
        c.total.energy_kwh is None
        and "1 of 1 runs without green/energy_kwh" in c.total.absent["energy_kwh"]
    )
    code, out, _ = _cli(
        made, capsys, "--experiment", made.plain, "--metric", "val_acc", "--format", "json"
    )
    plain = json.loads(out)["rows"][0]
    assert code == 0 and plain["energy_kwh"] is None and plain["metric"] == 0.5
    assert "not measured" in plain["absent"]["energy_kwh"]
    code, out, _ = _cli(made, capsys, "--experiment", made.plain, "--format", "csv")
    (record,) = csv.DictReader(io.StringIO(out))
    assert record["energy_kwh"] == "" and "energy_kwh: not measured" in record["absent"]
    code, out, _ = _cli(
        made, capsys, "--experiment", made.plain, "--metric", "val_acc", "--format", "markdown"
    )
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("|  | run |")).split(" | ")
    row = next(line for line in lines if "| unmeasured |" in line).split(" | ")
    cells = dict(zip(header, row, strict=True))
    assert cells["energy kWh"] == "—" and cells["CO2e g"] == "—" and cells["val_acc"] == "0.5"
    assert cells["quality/kWh (val_acc)"] == "—"
    assert "energy_kwh absent for unmeasured: not measured by green-mlops" in out


# --- the command -------------------------------------------------------------------------------


def test_every_format_parses_and_carries_the_numbers(
    made: Made, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [
        "--experiment",
        made.experiment,
        "--metric",
        "val_acc",
        "--baseline",
        made.ids["small"],
        "--by",
        "team",
    ]
    expected = _compare(made, metric="val_acc", baseline=made.ids["small"], by="team")

    code, out, _ = _cli(made, capsys, *args, "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["baseline"] == made.ids["small"] and data["metric"] == "val_acc"
    assert [r["run_id"] for r in data["rows"]] == [r.run_id for r in expected.rows]
    for plain in data["rows"]:
        m = made.metrics(plain["name"])
        assert plain["energy_kwh"] == m["green/energy_kwh"] and plain["co2e_g"] == m["green/co2e_g"]
    assert {g["value"]: g["runs"] for g in data["groups"]} == {"a": 2, "b": 3, "c": 1, None: 1}

    code, out, _ = _cli(made, capsys, *args, "--format", "csv")
    records = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["run_id"] for r in records] == [r.run_id for r in expected.rows]
    for record in records:
        m = made.metrics(record["name"])
        assert float(record["energy_kwh"]) == m["green/energy_kwh"]
        assert float(record["metric"]) == m["val_acc"]
        assert record["on_front"] == (
            "true"
            if next(r for r in expected.rows if r.run_id == record["run_id"]).on_front
            else "false"
        )
    assert [r["baseline"] for r in records].count("true") == 1

    code, out, _ = _cli(made, capsys, *args, "--format", "markdown")
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert code == 0 and EXCLUSIVE_NOTE in out
    assert sum(line.startswith("| front") for line in table) == sum(
        r.on_front for r in expected.rows
    )
    assert any("baseline | small |" in line for line in table)

    plot = tmp_path / "front.png"
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = _cli(made, capsys, *args, "--plot", str(plot))
    assert code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(name in out for name in made.ids if name != "unmeasured") and "front" in out


def test_baseline_outside_the_filter_is_read_by_id(
    made: Made, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(
        made,
        capsys,
        "--experiment",
        made.experiment,
        "--filter",
        "tags.team = 'b'",
        "--baseline",
        made.ids["small"],
        "--metric",
        "val_acc",
        "--format",
        "json",
    )
    data = json.loads(out)
    assert code == 0 and data["baseline"] == made.ids["small"]
    assert {r["name"] for r in data["rows"]} == {"worse", "parent", "child", "small"}


def test_report_files_from_the_callback(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    assert made.lit.report is not None and made.lit.report.is_file()
    report = json.loads(made.lit.report.read_text())
    (row,) = compare(read_report_files([made.csv_dir]), metric="val_acc").rows
    assert row.energy_kwh == report["metrics"]["green/energy_kwh"] > 0
    assert row.co2e_g == report["metrics"]["green/co2e_g"]
    assert row.flops == report["metrics"]["green/flops"]
    assert row.metric == made.lit.val_acc  # from the CSVLogger's metrics.csv beside it
    assert _close(row.quality_per_kwh, made.lit.val_acc / row.energy_kwh)
    # the same fit, as MLflow saw it
    assert _close(row.energy_kwh, made.metrics("lit")["green/energy_kwh"])
    code, out, _ = _cli(
        made, capsys, str(made.lit.report), "--metric", "val_acc", "--format", "csv"
    )
    (record,) = csv.DictReader(io.StringIO(out))
    assert (
        code == 0
        and record["name"] == "lit/version_0"
        and float(record["metric"]) == made.lit.val_acc
    )


# --- errors: one line, exit 1, no traceback, no credentials ------------------------------------


def _one_line(code: int, out: str, err: str) -> str:
    assert code == 1 and out == ""
    assert err.startswith("green-mlops compare: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_unknown_experiment(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line(*_cli(made, capsys, "--experiment", "no-such-*"))
    assert "no experiment matches 'no-such-*'" in err and made.experiment in err


def test_unknown_baseline(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line(*_cli(made, capsys, "--experiment", made.experiment, "--baseline", "0" * 32))
    assert "baseline '" + "0" * 32 + "'" in err


def test_nothing_to_compare(made: Made, capsys: pytest.CaptureFixture[str]) -> None:
    assert "give --experiment NAME" in _one_line(*_cli(made, capsys))


def test_missing_report_path(
    made: Made, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert "no such file or directory" in _one_line(
        *_cli(made, capsys, str(tmp_path / "nope.json"))
    )


def test_server_down_names_the_uri_without_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"http://alice:s3cret-token@127.0.0.1:{free_port()}"
    code = main(["compare", "--tracking-uri", uri, "--experiment", "x"])
    out, err = capsys.readouterr()
    err = _one_line(code, out, err)
    assert "s3cret" not in err and "alice" not in err
    assert f"MLflow at http://***@127.0.0.1:{uri.rsplit(':', 1)[1]} does not answer" in err


def test_a_uri_mlflow_cannot_open_is_one_line_without_credentials(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # MlflowClient raises for an unknown scheme while it is created: that too is one line, with
    # the credentials masked, never a traceback carrying them.
    code = main(["compare", "--tracking-uri", "bogus://bob:s3cret@host/x", "--experiment", "x"])
    out, err = capsys.readouterr()
    err = _one_line(code, out, err)
    assert "s3cret" not in err and "Traceback" not in err
    assert "MLflow at bogus://***@host/x" in err


def test_a_plot_format_matplotlib_cannot_write_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = {
        "schema": "green-mlops/report/v2",
        "final": True,
        "metrics": {"green/energy_kwh": 1e-6, "green/duration_s": 1.0},
        "tags": {"green.measured": "false"},
        "energy": {"started_at": 1.0, "duration_s": 1.0},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    code = main(["compare", str(tmp_path), "--plot", str(tmp_path / "front.xyz")])
    _, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert "--plot" in err and "xyz" in err
