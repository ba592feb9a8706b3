"""``green-mlops run``: the wait (re-planning, with a clock the test controls), exit status and
signals passed through (real subprocesses), ``--print-sbatch-begin``, and the plan on a real
MLflow run of the launched command."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking.client import MlflowClient
from pytest_httpserver import HTTPServer

from green_mlops.intensity import IntensityPoint
from green_mlops.scheduling import Forecast, Job, PlanError, plan
from green_mlops.scheduling.launcher import wait_for_start
from tests.mlflow_server import MlflowServer
from tests.test_scheduling_forecasts import TOKEN, serve_electricitymaps

H = 3600.0


class Clock:
    """Time moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps += 1
        self.t += seconds


def forecast(*values: float) -> Forecast:
    return Forecast.from_points(
        [IntensityPoint(i * H, (i + 1) * H, v) for i, v in enumerate(values)]
    )


def test_the_wait_replans_when_a_fresher_forecast_moves_the_start() -> None:
    clock = Clock()
    versions = [forecast(300, 300, 100, 300, 300, 300), forecast(300, 300, 300, 50, 300, 300)]
    seen: list[float] = []

    def planner(now: float):  # type: ignore[no-untyped-def]
        seen.append(now)
        latest = versions[min(len(seen), 1)]
        return plan(latest, Job(H), earliest=now, finish_by=6 * H, min_saving=0)

    first = plan(versions[0], Job(H), earliest=0.0, finish_by=6 * H, min_saving=0)
    assert first.chosen.start == 2 * H
    waited = wait_for_start(planner, first, clock=clock, sleep=clock.sleep, replan_every_s=H)
    assert waited.plan.chosen.start == 3 * H and clock.t == 3 * H
    assert waited.replans == 1 and seen[0] == H
    assert clock.sleeps < 3 * 3600 + 10  # it slept in steps, never past the start


def test_a_failed_replan_keeps_the_plan_in_force() -> None:
    clock = Clock()

    def planner(now: float):  # type: ignore[no-untyped-def]
        raise PlanError("electricitymaps: cannot reach api (ReadTimeout)")

    first = plan(forecast(300, 100, 300), Job(H), earliest=0.0, finish_by=3 * H, min_saving=0)
    waited = wait_for_start(planner, first, clock=clock, sleep=clock.sleep, replan_every_s=600)
    assert waited.plan is first and clock.t == H
    assert waited.failures and "ReadTimeout" in waited.failures[0]


@pytest.fixture
def launcher_env(httpserver: HTTPServer, tmp_path: Path) -> dict[str, str]:
    hour = math.floor(time.time() / H) * H
    serve_electricitymaps(httpserver, hour, [200.0] * 48)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))}
    env.update(
        GREEN_MLOPS_ELECTRICITYMAPS_TOKEN=TOKEN,
        GREEN_MLOPS_ELECTRICITYMAPS_URL=httpserver.url_for("/"),
        GREEN_MLOPS_INTENSITY_PROVIDERS="static",  # the launched runs price with the table
        GREEN_MLOPS_CACHE_DIR=str(tmp_path / "cache"),
        GREEN_MLOPS_LOCATION="DE",
        PYTHONUNBUFFERED="1",
    )
    return env


def launch(env: dict[str, str], *child: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "green_mlops", "run", "--duration", "1h", "--start-by", "+0s",
            "--provider", "electricitymaps", *extra, "--", *child]  # fmt: skip


def test_exit_status_and_signals_pass_through(launcher_env: dict[str, str], tmp_path: Path) -> None:
    py = sys.executable
    cases = {  # launched together: each is a few seconds of imports
        "exit 3": launch(launcher_env, py, "-c", "import sys; sys.exit(3)"),
        "SIGTERM": launch(
            launcher_env, py, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
        ),
        "sbatch": launch(
            launcher_env, py, "-c", "raise SystemExit(9)", extra=("--print-sbatch-begin",)
        ),
    }
    procs = {
        name: subprocess.Popen(
            argv, env=launcher_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, argv in cases.items()
    }
    done = {name: (p.communicate(timeout=60), p.returncode) for name, p in procs.items()}
    assert done["exit 3"][1] == 3, done["exit 3"][0][1]
    assert done["SIGTERM"][1] == -signal.SIGTERM, done["SIGTERM"][0][1]
    (out, err), code = done["sbatch"]
    assert code == 0 and out.startswith("--begin=20"), err  # and the command did not run


def test_a_signal_to_the_launcher_reaches_the_command(
    launcher_env: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "child.pid"
    body = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    proc = subprocess.Popen(launch(launcher_env, sys.executable, "-c", body), env=launcher_env)
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(marker.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_launched_mlflow_run_carries_the_plan(
    launcher_env: dict[str, str], tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        import json, time, mlflow
        mlflow.set_experiment("scheduled")
        with mlflow.start_run() as run:
            mlflow.log_metric("loss", 1.0)
            time.sleep(0.6)
        print(json.dumps({"run_id": run.info.run_id}))
    """)
    )
    env = {**launcher_env, "GREEN_MLOPS_ENABLE": "1", "MLFLOW_TRACKING_URI": mlflow_server.url}
    argv = launch(env, sys.executable, str(script), extra=("--energy-kwh", "1"))
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    run = MlflowClient(mlflow_server.url).get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["green.schedule.decision"] == "run-now"
    assert tags["green.schedule.forecast"].startswith("electricitymaps/")
    assert tags["green.schedule.planned_mean_g_per_kwh"] == "200.0"
    assert float(tags["green.schedule.waited_s"]) < 60
    # the run and its run-now counterfactual are priced by the same (static) chain
    assert metrics["green/schedule/co2e_if_run_now_g"] == pytest.approx(metrics["green/co2e_g"])


def test_run_now_carbon_needs_the_same_sources_as_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from green_mlops.carbon import CarbonResult
    from green_mlops.config import Settings
    from green_mlops.scheduling.handoff import ENV, RUN_NOW_KEY, Schedule, attach_schedule

    t0 = time.time() - 2 * H
    schedule = Schedule(t0 - H, t0, t0 + H, t0, t0 + 5 * H, "wait", "why", "DE",
                        "electricitymaps/api-v3", "average", 300.0, 400.0, 0.25, 0.05)  # fmt: skip
    monkeypatch.setenv(ENV, schedule.to_env())
    settings = Settings.load(environ={}, intensity_providers=("static",), location="DE")
    timeline = [(t0, 0.0), (t0 + H, 3.6e6)]  # 1 kWh
    # the run was priced by Electricity Maps; its run-now window would be by the yearly table
    other = CarbonResult(300.0, 1.0, {"electricitymaps/api-v3 history zone DE, ...": 1.0})
    metrics: dict[str, float] = {"green/co2e_g": 330.0}
    tags: dict[str, str] = {}
    attach_schedule(settings, timeline, other, metrics, tags)
    assert RUN_NOW_KEY not in metrics
    assert "priced by static" in tags["green.not_reported"]
    assert tags["green.schedule.decision"] == "wait"
    # the same source: the run-now grid carbon scaled by the run's own factor (here PUE 1.1)
    same = CarbonResult(300.0, 1.0, {"static/ember-yearly zone DE, ...": 1.0})
    metrics = {"green/co2e_g": 330.0}
    attach_schedule(settings, timeline, same, metrics, {})
    static_g = metrics[RUN_NOW_KEY] / 1.1
    assert 100 < static_g < 1000  # Germany's yearly average, g/kWh x 1 kWh


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"submitted_at": 1}', '{"a": 1e999}'])
def test_a_malformed_schedule_hand_off_degrades_and_says_so(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    from green_mlops.carbon import CarbonResult
    from green_mlops.config import Settings
    from green_mlops.scheduling.handoff import ENV, RUN_NOW_KEY, attach_schedule

    monkeypatch.setenv(ENV, text)
    settings = Settings.load(environ={}, intensity_providers=("static",), location="DE")
    t0 = time.time() - 2 * H
    metrics: dict[str, float] = {"green/co2e_g": 330.0}
    tags: dict[str, str] = {"green.problems": "earlier"}
    attach_schedule(
        settings, [(t0, 0.0), (t0 + H, 3.6e6)], CarbonResult(300.0, 1.0, {}), metrics, tags
    )
    assert RUN_NOW_KEY not in metrics
    assert tags["green.problems"].startswith("earlier; ")
    assert f"malformed {ENV}" in tags["green.problems"]
    assert f"{RUN_NOW_KEY}: malformed {ENV}" in tags["green.not_reported"]
    assert not any(k.startswith("green.schedule.") for k in tags)


def test_a_schedule_with_wrong_types_degrades(monkeypatch: pytest.MonkeyPatch) -> None:
    from green_mlops.carbon import CarbonResult
    from green_mlops.config import Settings
    from green_mlops.scheduling.handoff import ENV, RUN_NOW_KEY, Schedule, attach_schedule

    t0 = time.time() - 2 * H
    good = json.loads(
        Schedule(
            t0 - H,
            t0,
            t0 + H,
            t0,
            t0 + 5 * H,
            "wait",
            "why",
            "DE",
            "s",
            "average",
            300.0,
            400.0,
            0.25,
            0.05,
        ).to_env()
    )
    monkeypatch.setenv(ENV, json.dumps({**good, "started_at": "soon"}))
    settings = Settings.load(environ={}, intensity_providers=("static",), location="DE")
    metrics: dict[str, float] = {"green/co2e_g": 330.0}
    tags: dict[str, str] = {}
    attach_schedule(
        settings, [(t0, 0.0), (t0 + H, 3.6e6)], CarbonResult(300.0, 1.0, {}), metrics, tags
    )
    assert RUN_NOW_KEY not in metrics
    assert f"malformed {ENV}" in tags["green.problems"]
    assert "started_at" in tags["green.problems"]


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--max-wait", "8x"], "--max-wait '8x': expected e.g. 6h"),
        (["--replan-every", "soon"], "--replan-every 'soon': expected e.g. 6h"),
        (["--replan-every", "0s"], "--replan-every '0s': expected at least 1m"),
        (["--finish-by", "2020-01-01T00:00Z"], "--finish-by '2020-01-01T00:00Z': in the past"),
    ],
)
def test_bad_run_options_fail_early_and_run_nothing(
    extra: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from green_mlops import cli

    monkeypatch.setenv("GREEN_MLOPS_INTENSITY_PROVIDERS", "static")  # no forecast: never asked
    marker = tmp_path / "ran"
    deadline = [] if "--finish-by" in extra else ["--finish-by", "+8h"]
    argv = ["run", "--duration", "1h", *deadline, *extra, "--location", "DE", "--",
            sys.executable, "-c", f"open({str(marker)!r}, 'w')"]  # fmt: skip
    assert cli.main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert said in err, err
    assert "does not vary" not in err and not marker.exists()


def test_max_wait_keeps_the_users_deadline_in_the_hand_off(
    launcher_env: dict[str, str], tmp_path: Path
) -> None:
    """--max-wait bounds the start; the deadline the runs record is still --finish-by's."""
    child = "import os; print(os.environ['GREEN_MLOPS_SCHEDULE'])"
    argv = [sys.executable, "-m", "green_mlops", "run", "--duration", "1h", "--finish-by", "+10h",
            "--max-wait", "1m", "--provider", "electricitymaps", "--", sys.executable, "-c",
            child]  # fmt: skip
    before = time.time()
    out = subprocess.run(argv, env=launcher_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    handed = json.loads(out.stdout.strip().splitlines()[-1])
    assert before + 10 * H - 5 <= handed["deadline"] <= time.time() + 10 * H + 5
