"""``green-mlops audit``: budgets and provenance rules against a real MLflow server with runs made
by the real plugin (tests/green_runs.py), bad config files, the period clock injected."""

from __future__ import annotations

import datetime as dt
import uuid
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from green_mlops.audit import audit
from green_mlops.budget import AuditConfig, AuditRules, Budget, load_config, period_window
from green_mlops.cli import main
from green_mlops.config import ConfigError
from green_mlops.integrations.mlflow.reader import read_runs
from green_mlops.runs import RunRecord
from tests.green_runs import RunSpec, make_runs
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

UID = uuid.uuid4().hex[:6]
VISION = f"vision-resnet-{UID}"  # two top-level runs, one with a nested run
NLP = f"nlp-{UID}"
EDGE = f"edge-{UID}"  # priced without a location
ENERGY = "green/energy_kwh"


@pytest.fixture(scope="module")
def runs(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("audit-runs")
    ids = make_runs(
        mlflow_server,
        [
            RunSpec(
                VISION,
                "big",
                tags={"team": "vision"},
                metrics={"samples": 1000},
                busy_s=0.5,
                children=[RunSpec(VISION, "big-child", busy_s=0.4)],
            ),
            RunSpec(VISION, "small", tags={"team": "vision"}, metrics={"samples": 500}),
            RunSpec(NLP, "nlp", tags={"team": "nlp"}),
        ],
        work / "de",
    )
    ids |= make_runs(mlflow_server, [RunSpec(EDGE, "edge")], work / "edge", GREEN_MLOPS_LOCATION="")
    return ids


@pytest.fixture(scope="module")
def records(mlflow_server: MlflowServer, runs: dict[str, str]) -> dict[str, RunRecord]:
    by_id = {r.run_id: r for r in read_runs(mlflow_server.url, [VISION, NLP, EDGE])}
    return {name: by_id[run_id] for name, run_id in runs.items()}


def metric(server: MlflowServer, run_id: str, key: str) -> float:
    return float(MlflowClient(server.url).get_run(run_id).data.metrics[key])


def write(tmp_path: Path, text: str, name: str = "green-mlops.toml") -> Path:
    path = tmp_path / name
    path.write_text(text.strip() + "\n", encoding="utf-8")
    return path


def audit_cli(
    path: Path, server: MlflowServer | None, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str]:
    argv = ["audit", "--config", str(path), *extra]
    if server is not None:
        argv += ["--tracking-uri", server.url]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps table cells at the terminal width


# --- exit codes on real runs -----------------------------------------------------------------


def test_within_budget_exits_0_with_used_budget_and_percent(
    mlflow_server: MlflowServer,
    runs: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    used = sum(metric(mlflow_server, runs[n], ENERGY) for n in ("big", "big-child", "small"))
    path = write(
        tmp_path,
        f"""
        [[budget]]
        name = "vision-total"
        experiments = ["vision-resnet-{UID}"]
        period = "total"
        energy_kwh = {used * 4}
        co2e_kg = 1

        [audit]
        require_location = true
        """,
    )
    junit, summary = tmp_path / "audit.xml", tmp_path / "summary.md"
    code, out, _ = audit_cli(
        path, mlflow_server, capsys, "--junit", str(junit), "--markdown", str(summary)
    )
    assert code == 0, out
    row = next(line for line in out.splitlines() if "energy_kwh" in line)
    assert "vision-total" in row and f"{used:.4g} kWh" in row and "25%" in row, row
    assert "within" in row
    assert "rule require_location: passed (3 runs)" in out
    suite = ET.fromstring(junit.read_text()).find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "0", "1")
    assert len(suite.findall("testcase")) == 3
    text = summary.read_text()
    assert text.startswith("## ✅ green-mlops audit: all 1 budget(s) within")
    assert f"| vision-total | total | 3 | energy_kwh | {used:.4g} kWh |" in text


def test_exceeded_budget_exits_1_and_junit_fails_that_budget(
    mlflow_server: MlflowServer,
    runs: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nlp = metric(mlflow_server, runs["nlp"], ENERGY)
    path = write(
        tmp_path,
        f"""
[[budget]]
name = "nlp-month"
experiments = ["nlp-*{UID}"]
period = "total"
energy_kwh = {nlp / 2}

[[budget]]
name = "vision"
tags = {{ team = "vision" }}
period = "total"
energy_kwh = 1
""",
    )
    junit = tmp_path / "audit.xml"
    code, out, _ = audit_cli(path, mlflow_server, capsys, "--junit", str(junit))
    assert code == 1, out
    assert "exceeded: nlp-month (exit 1)" in out
    root = ET.fromstring(junit.read_text())
    assert (root.get("tests"), root.get("failures")) == ("4", "1")
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"nlp-month", "vision", "require_location", "require_measured"}
    failure = cases["nlp-month"].find("failure")
    assert failure is not None and "energy_kwh" in failure.get("message", "")
    assert "200%" in failure.get("message", "")
    assert cases["vision"].find("failure") is None
    assert all(
        cases[r].find("skipped") is not None for r in ("require_location", "require_measured")
    )


def test_run_priced_without_location_fails_require_location_with_exit_2(
    mlflow_server: MlflowServer,
    records: dict[str, RunRecord],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    edge = records["edge"]
    assert edge.tags["green.location"] == "unknown"  # what the plugin tags such a run with
    path = write(
        tmp_path,
        f"""
[[budget]]
name = "all"
experiments = ["*-{UID}"]
period = "total"
energy_kwh = 1

[audit]
require_location = true
""",
    )
    junit = tmp_path / "audit.xml"
    code, out, _ = audit_cli(path, mlflow_server, capsys, "--junit", str(junit))
    assert code == 2, out
    assert "rule require_location: 1 of 5 runs fail" in out
    assert f"({edge.run_id}) of '{EDGE}': green.location = 'unknown'" in out
    assert "GREEN_MLOPS_LOCATION" in out
    cases = {c.get("name"): c for c in ET.fromstring(junit.read_text()).iter("testcase")}
    failure = cases["require_location"].find("failure")
    assert failure is not None and edge.run_id in (failure.text or "")
    assert cases["all"].find("failure") is None


def test_estimated_meters_fail_require_measured(
    mlflow_server: MlflowServer,
    records: dict[str, RunRecord],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nlp = records["nlp"]
    assert nlp.tags["green.measured"] == "false"  # CPU and RAM estimated (green_runs: no RAPL)
    path = write(
        tmp_path,
        f"""
[[budget]]
name = "nlp"
experiments = ["{NLP}"]
period = "total"
energy_kwh = 1
[audit]
require_measured = true
""",
    )
    code, out, _ = audit_cli(path, mlflow_server, capsys)
    assert code == 2, out
    assert f"({nlp.run_id}) of '{NLP}': green.measured = 'false' (" in out
    # the same run, measured: the rule passes
    config = load_config(path)
    measured = replace(nlp, tags={**nlp.tags, "green.measured": "true"})
    result = audit(config, [measured])
    assert result.exit_code == 0 and result.rules[1].checked == 1 and not result.rules[1].failures


def test_exceeded_and_provenance_failure_exit_2(
    mlflow_server: MlflowServer, records: dict[str, RunRecord], tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        f"""
[[budget]]
name = "edge"
experiments = ["{EDGE}"]
period = "total"
energy_kwh = 1e-12
[audit]
require_location = true
""",
    )
    result = audit(load_config(path), list(records.values()))
    assert result.budgets[0].status == "exceeded"
    assert result.exit_code == 2  # figures that cannot be trusted come first


def test_unreachable_tracking_server_exits_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    path = write(tmp_path, '[[budget]]\nname = "a"\nexperiments = ["x"]\nperiod = "day"\ncost = 1')
    code, _, err = audit_cli(path, None, capsys, "--tracking-uri", "http://127.0.0.1:9")
    assert code == 4
    assert "runs unavailable: MLflow at http://127.0.0.1:9" in err


# --- what is counted -------------------------------------------------------------------------


def test_nested_runs_are_counted_once(
    mlflow_server: MlflowServer, runs: dict[str, str], records: dict[str, RunRecord]
) -> None:
    big, child, small = (
        metric(mlflow_server, runs[n], ENERGY) for n in ("big", "big-child", "small")
    )
    inclusive = metric(mlflow_server, runs["big"], "green/inclusive/energy_kwh")
    assert inclusive == pytest.approx(big + child, rel=1e-9)  # the parent's own figure
    # by tags: the nested run has no `team` tag (MLflow does not copy it) and is still counted
    assert "team" not in records["big-child"].tags
    budget = Budget("vision", "total", {"energy_kwh": 1.0}, tags={"team": "vision"})
    result = audit(AuditConfig(Path("x.toml"), (budget,)), list(records.values()))
    (checked,) = result.budgets
    assert {r.name for r in checked.runs} == {"big", "big-child", "small"}
    assert checked.checks[0].used == pytest.approx(big + child + small, rel=1e-12)
    assert checked.checks[0].used == pytest.approx(inclusive + small, rel=1e-9)
    # per run: the parent with its nested run is one run, the worst
    per_run = replace(budget, period="run", limits={"energy_kwh": (inclusive + small) / 2})
    check = (
        audit(AuditConfig(Path("x.toml"), (per_run,)), list(records.values())).budgets[0].checks[0]
    )
    assert check.used == pytest.approx(inclusive, rel=1e-9)
    assert check.status == "exceeded" and f"worst: run 'big' ({runs['big']})" in check.note
    assert "1 of 2 runs over" in check.note


def test_co2e_cost_and_kwh_per_unit(
    mlflow_server: MlflowServer, runs: dict[str, str], records: dict[str, RunRecord]
) -> None:
    names = ("big", "big-child", "small")
    energy = {n: metric(mlflow_server, runs[n], ENERGY) for n in names}
    co2e = sum(metric(mlflow_server, runs[n], "green/co2e_g") for n in names) / 1000
    cost = sum(metric(mlflow_server, runs[n], "green/cost") for n in names)
    budget = Budget(
        "vision",
        "total",
        {"co2e_kg": 1.0, "cost": 1.0, "kwh_per_unit": 1.0},
        experiments=(VISION,),
        units="samples",
    )
    result = audit(AuditConfig(Path("x.toml"), (budget,)), list(records.values())).budgets[0]
    used = {c.limit: c.used for c in result.checks}
    assert used["co2e_kg"] == pytest.approx(co2e, rel=1e-12)
    assert used["cost"] == pytest.approx(cost, rel=1e-12)
    assert used["kwh_per_unit"] == pytest.approx(sum(energy.values()) / 1500, rel=1e-12)
    assert result.currency == "EUR"
    per_run = audit(
        AuditConfig(Path("x.toml"), (replace(budget, period="run"),)), list(records.values())
    ).budgets[0]
    worst = {c.limit: c.used for c in per_run.checks}["kwh_per_unit"]
    assert worst == pytest.approx(
        max((energy["big"] + energy["big-child"]) / 1000, energy["small"] / 500), rel=1e-12
    )


def test_at_risk_when_the_burn_rate_projects_past_the_budget(
    records: dict[str, RunRecord],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mlflow_server: MlflowServer,
) -> None:
    vision = [records[n] for n in ("big", "big-child", "small")]
    used = sum(r.metrics[ENERGY] for r in vision)
    now = max(r.end_time or 0.0 for r in vision) + 1.0
    start, end = period_window("year", now) or (0.0, 0.0)
    elapsed = (now - start) / (end - start)
    projected = used / elapsed
    between = used + (projected - used) / 2  # within so far, past it at the year's end

    def check(limit: float, when: float) -> tuple[str, float | None]:
        budget = Budget("v", "year", {"energy_kwh": limit}, experiments=(VISION,))
        result = audit(AuditConfig(Path("x.toml"), (budget,)), list(records.values()), now=when)
        assert result.exit_code == 0
        c = result.budgets[0].checks[0]
        return c.status, c.projected

    status, shown = check(between, now)
    assert status == "at risk" and shown == pytest.approx(projected, rel=1e-12)
    assert check(projected * 1.5, now)[0] == "within"
    # a year later, none of these runs is in the period
    later = end + 1.0
    budget = Budget("v", "year", {"energy_kwh": between}, experiments=(VISION,))
    result = audit(AuditConfig(Path("x.toml"), (budget,)), list(records.values()), now=later)
    assert result.budgets[0].runs == () and result.budgets[0].checks[0].used == 0.0
    # the command, with the clock given
    path = write(
        tmp_path,
        f'[[budget]]\nname = "v"\nexperiments = ["{VISION}"]\nperiod = "year"\n'
        f"energy_kwh = {between!r}",
    )
    iso = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat()
    code, out, _ = audit_cli(path, mlflow_server, capsys, "--now", iso)
    assert code == 0, out
    assert f"at risk: projected {projected:.4g} kWh by the period's end" in out
    assert "at risk: v (exit 0)" in out


def test_calendar_periods_are_utc() -> None:
    def window(period: str, when: str) -> tuple[str, str]:
        now = dt.datetime.fromisoformat(when).timestamp()
        found = period_window(period, now)
        assert found is not None
        start, end = (
            dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M") for t in found
        )
        return start, end

    # 23:30 on 2026-11-29 in New York is 04:30 on Monday 2026-11-30 UTC
    assert window("day", "2026-11-29T23:30:00-05:00") == ("2026-11-30 00:00", "2026-12-01 00:00")
    assert window("week", "2026-11-29T23:30:00-05:00") == ("2026-11-30 00:00", "2026-12-07 00:00")
    assert window("week", "2026-11-29T12:00:00+00:00") == ("2026-11-23 00:00", "2026-11-30 00:00")
    assert window("month", "2026-12-31T23:59:59+00:00") == ("2026-12-01 00:00", "2027-01-01 00:00")
    assert window("quarter", "2026-11-15T00:00:00+00:00") == (
        "2026-10-01 00:00",
        "2027-01-01 00:00",
    )
    assert window("quarter", "2026-04-01T00:00:00+00:00") == (
        "2026-04-01 00:00",
        "2026-07-01 00:00",
    )
    assert window("year", "2026-06-30T00:00:00+00:00") == ("2026-01-01 00:00", "2027-01-01 00:00")
    assert period_window("run", 0.0) is None and period_window("total", 0.0) is None


# --- bad config files: file, line, key, value and accepted form ------------------------------

GOOD = """
# the team's budgets
[[budget]]
name = "vision-q4"
experiments = ["resnet-*"]
tags = { team = "vision" }
period = "quarter"
energy_kwh = 500

[audit]
require_location = true
"""

# (what to replace in GOOD, its replacement; the line of the replacement, key, value, accepted)
BAD = {
    "unknown key": (
        'period = "quarter"',
        'perod = "quarter"',
        ("perod", "'quarter'", "did you mean 'period'?", "accepted: name, experiments, tags"),
    ),
    "negative budget": (
        "energy_kwh = 500",
        "energy_kwh = -5",
        ("energy_kwh", "-5", "a number > 0"),
    ),
    "bad glob": (
        'experiments = ["resnet-*"]',
        'experiments = ["resnet-["]',
        ("experiments", "['resnet-[']", "a list of experiment names or globs"),
    ),
    "unknown period": (
        'period = "quarter"',
        'period = "fortnight"',
        ("period", "'fortnight'", "one of run, day, week, month, quarter, year, total"),
    ),
    "period of wrong type": ('period = "quarter"', "period = 3", ("period", "3", "one of run")),
    "limit of wrong type": (
        "energy_kwh = 500",
        'energy_kwh = "500"',
        ("energy_kwh", "'500'", "a number > 0"),
    ),
    "tags of wrong type": (
        'tags = { team = "vision" }',
        'tags = "vision"',
        ("tags", "'vision'", 'a table of tag = "value" strings'),
    ),
    "rule of wrong type": (
        "require_location = true",
        'require_location = "yes"',
        ("require_location", "'yes'", "true or false"),
    ),
    "unknown rule": (
        "require_location = true",
        "require_locaton = true",
        ("require_locaton", "True", "accepted: require_location, require_measured"),
    ),
    "not TOML": ("energy_kwh = 500", "energy_kwh = 500 kWh", ("not valid TOML",)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_3_naming_line_key_value_and_accepted_form(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new, expected = BAD[case]
    text = GOOD.strip().replace(old, new)
    path = write(tmp_path, text)
    line = text.splitlines().index(new) + 1
    code, out, err = audit_cli(path, None, capsys)
    assert code == 3 and out == ""
    assert err.startswith(f"green-mlops audit: {path}:{line}: "), err
    for part in expected:
        assert part in err, (part, err)


@pytest.mark.parametrize(
    ("text", "line", "parts"),
    [
        # no limit: the budget's header line, every limit named
        (
            GOOD.strip().replace("energy_kwh = 500", ""),
            2,
            ("has no limit", "energy_kwh, co2e_kg, cost, kwh_per_unit"),
        ),
        # neither experiments nor tags
        (
            GOOD.strip()
            .replace('experiments = ["resnet-*"]\n', "")
            .replace('tags = { team = "vision" }\n', ""),
            2,
            ("counts no runs", "experiments", "tags"),
        ),
        # the second budget has the first one's name
        (
            GOOD.strip()
            + '\n[[budget]]\nname = "vision-q4"\ntags = { a = "b" }\nperiod = "day"\ncost = 1\n',
            12,
            ("name = 'vision-q4'", "a name used by no other budget"),
        ),
        ("[audit]\nrequire_location = true\n", 1, ("one or more [[budget]] tables",)),
    ],
)
def test_bad_config_without_a_single_bad_value(
    text: str, line: int, parts: tuple[str, ...], tmp_path: Path
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    for part in parts:
        assert part in str(info.value)


def test_pyproject_table_found_from_a_subdirectory_with_its_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path,
        '[project]\nname = "x"\n\n[[tool.green-mlops.budget]]\nname = "q"\n'
        'experiments = ["*"]\nperiod = "year"\ncost = 2\n\n[tool.green-mlops.audit]\n'
        "require_measured = true\n",
        "pyproject.toml",
    )
    sub = tmp_path / "src" / "pkg"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    config = load_config()
    assert config.path == tmp_path / "pyproject.toml"
    assert config.budgets == (Budget("q", "year", {"cost": 2.0}, ("*",), line=4),)
    assert config.rules == AuditRules(require_measured=True)
    # a green-mlops.toml nearer the working directory wins
    write(
        sub.parent, '[[budget]]\nname = "near"\ntags = { a = "b" }\nperiod = "day"\nenergy_kwh = 1'
    )
    assert load_config().budgets[0].name == "near"
    # a bad value in pyproject.toml: its line there
    (sub.parent / "green-mlops.toml").unlink()
    text = (tmp_path / "pyproject.toml").read_text().replace('period = "year"', 'period = "yearly"')
    (tmp_path / "pyproject.toml").write_text(text)
    code = main(["audit"])
    assert code == 3
    err = capsys.readouterr().err
    assert f"{tmp_path / 'pyproject.toml'}:7: budget 'q': period = 'yearly' is not valid" in err


def test_no_config_file_exits_3_with_an_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '[project]\nname = "x"\n', "pyproject.toml")  # no [tool.green-mlops]
    assert main(["audit"]) == 3
    err = capsys.readouterr().err
    assert "no green-mlops.toml (or pyproject.toml with [tool.green-mlops])" in err
    assert '[[budget]]\nname = "vision-q4"' in err and "--config FILE" in err


def test_unwritable_junit_path_and_bad_uri_are_one_line_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path, '[[budget]]\nname = "b"\nexperiments = ["*"]\nperiod = "total"\nenergy_kwh = 1'
    )
    code, _, err = audit_cli(path, None, capsys, "--tracking-uri", "bogus://u:s3cret@h/x")
    assert code == 4 and "s3cret" not in err and "Traceback" not in err
    code, _, err = audit_cli(
        path,
        None,
        capsys,
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--junit",
        str(tmp_path / "no" / "such" / "dir" / "audit.xml"),
    )
    assert code == 4 and "cannot write" in err and "Traceback" not in err


def test_now_with_a_z_suffix_is_utc() -> None:
    # Python 3.10's fromisoformat rejects "Z", the form the error message itself suggests.
    from green_mlops.commands.audit import _parse_now

    assert (
        _parse_now("2026-12-01T12:00:00Z")
        == dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc).timestamp()
    )
