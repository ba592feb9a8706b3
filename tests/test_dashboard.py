"""The green dashboard (``mlflow server --app-name green-mlops``) and the reports that open in
MLflow, against real servers started as a user starts them, with runs made by the real plugin
and the real ``EnergyMonitor`` callback, read in a real browser (Debian's chromium through
Playwright; nothing is downloaded, and no request may leave 127.0.0.1).

Screenshots go to docs/img/dashboard-*.png with ``GREEN_MLOPS_UPDATE_SCREENSHOTS=1``, else to
the module's tmp dir.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from mlflow.tracking.client import MlflowClient

from green_mlops.extras import install_command, missing_modules
from tests.dashboard_server import DashboardServer
from tests.green_runs import LightningRun, RunSpec, make_lightning_run, make_runs
from tests.test_mlflow import ROOT
from tests.test_mlflow_ui import launch_chromium, require_chromium

SWEEP = "vision-sweep"
LIGHTNING = "lightning-fit"
#: (name, busy seconds, val_acc): "wide" costs the most for the least accuracy (off the front)
RUNS = (("baseline", 0.9, 0.90), ("small", 0.3, 0.88), ("wide", 1.2, 0.86))
BUDGET = """
[[budget]]
name = "vision-team"
experiments = ["vision-*"]
period = "month"
energy_kwh = 1e-4
"""
SCREENSHOTS = ROOT / "docs" / "img"
ADMIN = ("admin", "green-Admin-pass-2026!")
ALICE = ("alice", "alice-Pass-word-2026!")


@dataclass
class Dashboard:
    server: DashboardServer
    ids: dict[str, str]
    lightning: LightningRun
    experiments: dict[str, str]  # name -> id
    client: MlflowClient


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def post(url: str, body: dict[str, Any], auth: tuple[str, str]) -> dict[str, Any]:
    token = base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        answer: dict[str, Any] = json.loads(r.read() or b"{}")
        return answer


# --- the servers -------------------------------------------------------------------------------


def _auth_server(root: Path) -> DashboardServer:
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = {ADMIN[0]}\n"
        f"admin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # one password hash per user, not one per request
    )
    return DashboardServer(
        root,
        app="green-mlops-auth",
        env={
            "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
        },
    )


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DashboardServer, DashboardServer | None]]:
    """Both servers, started at once: ``green-mlops``, and ``green-mlops-auth`` (None without
    Flask-WTF, which MLflow's basic-auth needs)."""
    root = tmp_path_factory.mktemp("green-dashboard")
    (root / "green-mlops.toml").write_text(BUDGET)
    started = [DashboardServer(root)]
    if not missing_modules("dashboard-auth") or os.environ.get("CI"):  # the test extra has it
        started.append(_auth_server(tmp_path_factory.mktemp("green-auth")))
    failures: list[BaseException] = []

    def start(server: DashboardServer) -> None:
        try:
            server.start()
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=start, args=(s,)) for s in started]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    try:
        if failures:
            raise failures[0]
        yield started[0], (started[1] if len(started) > 1 else None)
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def auth_server(servers: tuple[DashboardServer, DashboardServer | None]) -> DashboardServer:
    if servers[1] is None:
        pytest.skip(f"basic-auth needs Flask-WTF: {install_command('dashboard-auth')}")
    return servers[1]


@pytest.fixture(scope="module")
def dashboard(
    servers: tuple[DashboardServer, DashboardServer | None],
) -> Dashboard:
    server = servers[0]
    root = server.root
    made: dict[str, Any] = {}

    def plugin() -> None:
        specs = [
            RunSpec(SWEEP, name, metrics={"val_acc": acc}, busy_s=busy) for name, busy, acc in RUNS
        ]
        made["ids"] = make_runs(server, specs, root / "plugin")

    def callback() -> None:
        made["lightning"] = make_lightning_run(
            server, root / "callback", name="fit", experiment=LIGHTNING, epochs=1
        )

    workers = [threading.Thread(target=f) for f in (plugin, callback)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert "ids" in made and "lightning" in made, "making the runs failed (see above)"
    client = MlflowClient(server.url)
    experiments = {
        name: client.get_experiment_by_name(name).experiment_id for name in (SWEEP, LIGHTNING)
    }
    return Dashboard(server, made["ids"], made["lightning"], experiments, client)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = launch_chromium(playwright, tmp_path_factory.mktemp("chromium"), chromium)
        try:
            yield context
        finally:
            context.close()


@dataclass
class Visit:
    page: Any
    errors: list[str]
    outside: list[str]


def visit(browser: Any, url: str, *, idle: bool = True) -> Visit:
    """Open ``url`` in a fresh page that records console errors and refuses (and records)
    every request leaving 127.0.0.1."""
    page = browser.new_page()
    page.set_default_timeout(30_000)
    seen = Visit(page, [], [])
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.errors.append(str(e)))

    def route(r: Any) -> None:
        host = urlsplit(r.request.url).hostname
        if r.request.url.startswith(("data:", "blob:", "about:")) or host == "127.0.0.1":
            r.continue_()
        else:
            seen.outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(url)
    page.wait_for_load_state("networkidle" if idle else "load")  # MLflow's UI keeps polling
    return seen


def shot(page: Any, name: str, tmp_path: Path) -> None:
    update = os.environ.get("GREEN_MLOPS_UPDATE_SCREENSHOTS") == "1"
    path = (SCREENSHOTS if update else tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def cells(page: Any, table: str) -> list[dict[str, str]]:
    """Rows of ``table`` as {header: data-value} (header texts as shown)."""
    rows: list[dict[str, str]] = page.evaluate(
        """(selector) => {
          const t = document.querySelector(selector);
          const heads = [...t.tHead.rows[0].cells].map(c => c.innerText.trim());
          return [...t.tBodies[0].rows].map(r => Object.fromEntries(
            [...r.cells].map((c, i) => [heads[i], c.dataset.value ?? c.innerText.trim()])
            .concat([["_run_id", r.dataset.runId || ""]])));
        }""",
        table,
    )
    return rows


# --- reports that open inside MLflow -----------------------------------------------------------


def test_every_tracked_run_logs_its_html_report_and_chart_image(dashboard: Dashboard) -> None:
    client = dashboard.client
    runs = {"plugin": dashboard.ids["baseline"], "callback": dashboard.lightning.run_id}
    for who, run_id in runs.items():
        assert run_id is not None
        green = {a.path for a in client.list_artifacts(run_id, "green")}
        assert {"green/report.json", "green/report.html", "green/power.png"} <= green, who
        images = [a.path for a in client.list_artifacts(run_id, "images")]
        assert any(
            re.fullmatch(r"images/green~power\+step\+0\+timestamp\+\d+\+[-\w]+\.png", p)
            for p in images
        ), (who, images)
        assert any(p.endswith("+compressed.webp") for p in images), (who, images)
        run = client.get_run(run_id)
        assert run.data.tags.get("mlflow.loggedImages") == "true", who
        html = Path(client.download_artifacts(run_id, "green/report.html")).read_text()
        assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'' in html
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), who  # nothing external
        energy = run.data.metrics["green/energy_kwh"]
        cell = re.search(r'data-key="green/energy_kwh" data-value="([^"]+)"', html)
        assert cell and float(cell.group(1)) == pytest.approx(energy, rel=1e-9), who
        assert f"<h2>{run.info.run_name}</h2>" in html, who


def test_a_view_that_cannot_be_made_is_said_in_green_notes(
    dashboard: Dashboard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from green_mlops.integrations.mlflow import views

    client = dashboard.client
    run_id = dashboard.ids["small"]
    good = json.loads(Path(client.download_artifacts(run_id, "green/report.json")).read_text())
    # a report the HTML and the chart choke on: written without them, never raising
    broken = {**good, "energy": {**good["energy"], "timeline": [{"time": "x"}, {"time": None}]}}
    (tmp_path / "a" / "green").mkdir(parents=True)
    tags = views.write(client, run_id, broken, tmp_path / "a")
    assert "green/report.html not written (" in tags["green.notes"]
    assert "no power chart (" in tags["green.notes"]
    assert tags["green.notes"].startswith(good["tags"]["green.notes"])  # the run's notes kept
    assert not (tmp_path / "a" / "green" / "report.html").exists()
    # no matplotlib: the HTML report still goes; the note says how to get the chart
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    (tmp_path / "b" / "green").mkdir(parents=True)
    tags = views.write(client, run_id, good, tmp_path / "b")
    assert "no power chart: matplotlib is missing (pip install" in tags["green.notes"]
    assert "mlflow.loggedImages" not in tags
    assert (tmp_path / "b" / "green" / "report.html").stat().st_size > 1000


# --- the dashboard -----------------------------------------------------------------------------


def test_bad_input_is_a_clear_4xx_page_never_a_traceback(dashboard: Dashboard) -> None:
    url = dashboard.server.url
    sweep = dashboard.experiments[SWEEP]
    cases = {
        "/green/experiment": (400, "missing query parameter 'experiment_id'"),
        "/green/experiment?experiment_id=abc": (400, "an experiment id is a number"),
        "/green/experiment?experiment_id=98765": (404, "no experiment with id '98765'"),
        f"/green/experiment?experiment_id={sweep}&mode=best": (400, "mode='best'"),
        f"/green/experiment?experiment_id={sweep}&metric=nope": (400, "no run of 'vision-sweep'"),
        f"/green/experiment?experiment_id={sweep}&baseline=nope": (400, "baseline 'nope'"),
        "/green/run?run_id=0123456789abcdef": (404, "no run with id '0123456789abcdef'"),
        "/green/run?run_id=../../etc": (400, "a run id is letters and digits"),
    }
    for path, (status, said) in cases.items():
        code, body = get(url + path)
        assert code == status, (path, code, body[:300])
        assert said.replace("'", "&#x27;") in body, (path, body[:500])
        assert "Traceback" not in body
    code, body = get(url + "/green/api/compare?experiment_id=abc")
    assert code == 400 and json.loads(body)["error"].startswith("experiment_id='abc'")


def test_the_numbers_shown_are_the_runs_metrics(
    dashboard: Dashboard, browser: Any, tmp_path: Path
) -> None:
    url, client = dashboard.server.url, dashboard.client
    sweep = dashboard.experiments[SWEEP]
    metrics = {name: client.get_run(run_id).data.metrics for name, run_id in dashboard.ids.items()}
    seen = visit(browser, f"{url}/green/experiment?experiment_id={sweep}&metric=val_acc")
    try:
        rows = {r["run"]: r for r in cells(seen.page, "#comparison")}
        assert set(rows) == {name for name, _, _ in RUNS}
        for name, m in metrics.items():
            row = rows[name]
            assert float(row["energy (kWh)"]) == m["green/energy_kwh"]
            assert float(row["CO2e (g)"]) == m["green/co2e_g"]
            assert float(row["cost"]) == m["green/cost"]
            assert float(row["val_acc"]) == m["val_acc"]
            assert float(row["val_acc per kWh"]) == pytest.approx(
                m["val_acc"] / m["green/energy_kwh"], rel=1e-12
            )
        # the front: "wide" used the most energy for the least accuracy
        assert rows["wide"]["Pareto front"] == "" and rows["small"]["Pareto front"] == "yes"
        assert seen.page.locator("#scatter circle.on-front").count() == sum(
            r["Pareto front"] == "yes" for r in rows.values()
        )
        shot(seen.page, "dashboard-experiment.png", tmp_path)
        assert not seen.errors and not seen.outside, (seen.errors, seen.outside)
    finally:
        seen.page.close()

    seen = visit(browser, f"{url}/green/")
    try:
        months = [r for r in cells(seen.page, "table.overview") if r["experiment"] == SWEEP]
        assert len(months) == 1
        total = math.fsum(m["green/energy_kwh"] for m in metrics.values())
        assert float(months[0]["energy (kWh)"]) == pytest.approx(total, rel=1e-12)
        co2e = math.fsum(m["green/co2e_g"] for m in metrics.values()) / 1000
        assert float(months[0]["CO2e (kg)"]) == pytest.approx(co2e, rel=1e-12)
        assert float(months[0]["measured share (%)"]) == 0.0  # estimate meters only
        budget = cells(seen.page, "table.budgets")[0]
        assert budget["budget"] == "vision-team" and budget["limit"] == "energy_kwh"
        assert float(budget["used"]) == pytest.approx(total, rel=1e-12)
        used, limit, projected = (float(budget[k]) for k in ("used", "of", "projected"))
        assert limit == 1e-4
        expected = "exceeded" if used > limit else "at risk" if projected > limit else "within"
        assert budget["status"] == expected
        shot(seen.page, "dashboard-overview.png", tmp_path)
        assert not seen.errors and not seen.outside, (seen.errors, seen.outside)
    finally:
        seen.page.close()


def test_sorting_and_the_baseline_choice(dashboard: Dashboard, browser: Any) -> None:
    url = dashboard.server.url
    sweep = dashboard.experiments[SWEEP]
    seen = visit(browser, f"{url}/green/experiment?experiment_id={sweep}&metric=val_acc")
    page = seen.page
    try:

        def header(text: str) -> Any:
            return page.locator("#comparison th button.sort").filter(
                has_text=re.compile(f"^{re.escape(text)}$")
            )

        energy = header("energy (kWh)")
        energy.click()
        up = [float(r["energy (kWh)"]) for r in cells(page, "#comparison")]
        assert up == sorted(up) and len(set(up)) == 3
        energy.click()
        down = [float(r["energy (kWh)"]) for r in cells(page, "#comparison")]
        assert down == sorted(up, reverse=True)
        header("run").click()
        assert [r["run"] for r in cells(page, "#comparison")] == ["baseline", "small", "wide"]

        base = dashboard.ids["baseline"]
        with page.expect_navigation():
            page.select_option("select[name=baseline]", base)
        assert f"baseline={base}" in page.url
        rows = {r["run"]: r for r in cells(page, "#comparison")}
        kwh = {name: float(r["energy (kWh)"]) for name, r in rows.items()}
        assert rows["baseline"]["saving vs baseline (kWh)"] == ""
        for name in ("small", "wide"):
            saved = float(rows[name]["saving vs baseline (kWh)"])
            assert saved == pytest.approx(kwh["baseline"] - kwh[name], rel=1e-9, abs=1e-15)
        assert float(rows["small"]["saving vs baseline (kWh)"]) > 0  # it used less
        assert page.locator("#baseline b").inner_text() == "baseline"
        assert not seen.errors and not seen.outside, (seen.errors, seen.outside)
    finally:
        page.close()


def test_the_run_page_and_the_report_in_mlflows_artifact_viewer(
    dashboard: Dashboard, browser: Any, tmp_path: Path
) -> None:
    url, client = dashboard.server.url, dashboard.client
    run_id = dashboard.lightning.run_id
    assert run_id is not None
    run = client.get_run(run_id)
    seen = visit(browser, f"{url}/green/run?run_id={run_id}")
    try:
        page = seen.page
        shown = page.locator('td[data-key="green/energy_kwh"]').get_attribute("data-value")
        assert float(shown or "nan") == run.data.metrics["green/energy_kwh"]
        provenance = page.locator("table.provenance").inner_text()
        assert run.data.tags["green.meters"] in provenance
        assert page.locator("svg rect.power").count() > 0  # the power chart from the report
        shot(page, "dashboard-run.png", tmp_path)
        assert not seen.errors and not seen.outside, (seen.errors, seen.outside)
    finally:
        seen.page.close()

    exp_id = run.info.experiment_id
    seen = visit(browser, f"{url}/#/experiments/{exp_id}/runs/{run_id}/artifacts", idle=False)
    try:
        page = seen.page
        page.get_by_text("green", exact=True).first.click()
        page.get_by_text("report.html", exact=True).first.click()
        frame = page.frame_locator("iframe").first
        frame.get_by_text(f"Energy and carbon: run {run.info.run_name}").wait_for()
        assert frame.locator("svg rect.power").count() > 0
        assert not seen.outside, seen.outside
    finally:
        seen.page.close()


# --- with MLflow's basic-auth ------------------------------------------------------------------


def test_with_basic_auth_the_pages_need_the_login_and_show_readable_experiments(
    auth_server: DashboardServer,
) -> None:
    url = auth_server.url
    ids = {}
    for name in ("team-a", "team-b"):
        ids[name] = post(f"{url}/api/2.0/mlflow/experiments/create", {"name": name}, ADMIN)[
            "experiment_id"
        ]
        run = post(
            f"{url}/api/2.0/mlflow/runs/create",
            {
                "experiment_id": ids[name],
                "run_name": f"{name}-run",
                "start_time": 1_796_000_000_000,
            },
            ADMIN,
        )["run"]["info"]
        post(
            f"{url}/api/2.0/mlflow/runs/log-batch",
            {
                "run_id": run["run_id"],
                "metrics": [{"key": "green/energy_kwh", "value": 0.25, "timestamp": 0, "step": 0}],
            },
            ADMIN,
        )
    post(f"{url}/api/2.0/mlflow/users/create", {"username": ALICE[0], "password": ALICE[1]}, ADMIN)
    post(
        f"{url}/api/3.0/mlflow/users/permissions/grant",
        {
            "username": ALICE[0],
            "resource_type": "experiment",
            "resource_id": ids["team-a"],
            "permission": "READ",
        },
        ADMIN,
    )
    for path in (
        "/green/",
        "/green/api/experiments",
        f"/green/experiment?experiment_id={ids['team-a']}",
    ):
        code, _ = get(url + path)
        assert code == 401, path  # no login
        assert get(url + path, ("alice", "wrong-password-123"))[0] == 401, path
    code, body = get(url + "/green/", ALICE)
    assert code == 200 and "team-a" in body and "team-b" not in body
    listed = json.loads(get(url + "/green/api/experiments", ALICE)[1])["experiments"]
    assert [e["name"] for e in listed] == ["team-a"]
    assert get(url + f"/green/experiment?experiment_id={ids['team-a']}", ALICE)[0] == 200
    code, body = get(url + f"/green/experiment?experiment_id={ids['team-b']}", ALICE)
    assert code == 403 and "team-b" not in body
    assert get(url + f"/green/api/compare?experiment_id={ids['team-b']}", ALICE)[0] == 403
    code, body = get(url + "/green/", ADMIN)  # the admin reads every experiment
    assert code == 200 and "team-a" in body and "team-b" in body
    assert get(url + "/green/static/green.js", ALICE)[0] == 200


# --- make demo ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_make_demo_trains_a_sweep_compares_it_and_says_how_to_open_the_dashboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from green_mlops.integrations.demo import EXPERIMENT, SWEEP, main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GREEN_MLOPS_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["--epochs", "1", "--samples", "512"]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(SWEEP)
    for run in runs:
        assert run.data.metrics["green/energy_kwh"] > 0 and 0 < run.data.metrics["test_acc"] <= 1
        assert run.info.run_name in out
    adaptive = next(r for r in runs if r.info.run_name == "adaptive-validation")
    assert "green/validation/fraction_evaluated_total" in adaptive.data.metrics  # it ran
    said = " ".join(out.split())
    assert f"server --app-name green-mlops --backend-store-uri {uri}" in said
    base = next(r for r in runs if r.info.run_name == "baseline").info.run_id
    assert (
        f"http://127.0.0.1:5000/green/experiment?experiment_id={exp.experiment_id}"
        f"&metric=test_acc&baseline={base}" in out.replace("\n", "").replace(" ", "")
    )


def _green_client() -> Any:
    from flask import Flask

    from green_mlops.integrations.mlflow.app.routes import blueprint

    app = Flask("green-test")
    app.register_blueprint(blueprint)
    return app.test_client()


def test_a_failure_page_names_the_exception_only_no_paths_or_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from green_mlops.integrations.mlflow.app import data

    def broken() -> dict[str, str]:
        raise RuntimeError(
            "(sqlite3.OperationalError) unable to open postgresql://ml:s3cret@db/mlflow "
            "at /srv/secret/mlflow.db"
        )

    monkeypatch.setattr(data, "experiments", broken)
    client = _green_client()
    for path in ("/green/", "/green/api/experiments"):
        response = client.get(path)
        body = response.get_data(as_text=True)
        assert response.status_code == 500, body
        assert "RuntimeError" in body
        assert "s3cret" not in body and "/srv/secret" not in body, body


def test_the_overview_does_not_show_the_servers_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from green_mlops.integrations.mlflow.app import data

    monkeypatch.setattr(data, "experiments", lambda: {})
    monkeypatch.setattr(data, "runs", lambda chosen: [])
    where = tmp_path / "srv-private-dir"
    where.mkdir()
    monkeypatch.chdir(where)
    client = _green_client()
    for path in ("/green/", "/green/api/experiments"):
        body = client.get(path).get_data(as_text=True)
        assert "No budgets" in body
        assert "srv-private-dir" not in body, body
    (where / "green-mlops.toml").write_text(BUDGET)
    for path in ("/green/", "/green/api/experiments"):
        body = client.get(path).get_data(as_text=True)
        assert "Budgets of green-mlops.toml" in body
        assert "srv-private-dir" not in body, body
    (where / "green-mlops.toml").write_text("[[budget]]\nname = 1\n")
    for path in ("/green/", "/green/api/experiments"):
        body = client.get(path).get_data(as_text=True)
        assert "The budgets cannot be read" in body
        assert "srv-private-dir" not in body, body


def test_run_names_tags_params_and_metric_names_are_escaped_in_every_page(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from green_mlops.integrations.mlflow.app import data
    from green_mlops.runs import RunRecord

    evil = "<script>alert(1)</script>"
    exp_name, metric = f'"><img src=x onerror=alert(2)>{evil}', '"><svg onload=alert(3)>'
    records = [
        RunRecord(
            f"abc{i}",
            f"{evil}{i}",
            exp_name,
            "FINISHED",
            1.7e9 + i,
            1.7e9 + 60 + i,
            {"green/energy_kwh": 0.1 * (i + 1), "green/co2e_g": 10.0 * (i + 1), metric: 0.5 + i},
            {"green.quality": f"{metric} (max)", "green.notes": evil, "mlflow.note": evil},
            {"lr": evil},
        )
        for i in range(2)
    ]
    monkeypatch.setattr(data, "experiments", lambda: {"1": exp_name})
    monkeypatch.setattr(data, "runs", lambda chosen: records)
    monkeypatch.setattr(
        data,
        "run",
        lambda run_id: (records[0], SimpleNamespace(info=SimpleNamespace(experiment_id="1"))),
    )
    monkeypatch.setattr(data, "read_report", lambda entity: None)
    monkeypatch.chdir(tmp_path)
    client = _green_client()
    for path in (
        "/green/",
        "/green/experiment?experiment_id=1",
        "/green/experiment?experiment_id=1&baseline=abc0",
        "/green/run?run_id=abc0",
        f"/green/experiment?experiment_id=1&metric={evil}",
    ):
        response = client.get(path)
        body = response.get_data(as_text=True)
        assert response.status_code in (200, 400), (path, body[:300])
        for raw in ("<script>alert", "<img src=x", "<svg onload"):
            assert raw not in body, (path, raw)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;0" in client.get(
        "/green/run?run_id=abc0"
    ).get_data(as_text=True)


def test_an_experiment_whose_quality_tag_names_an_unlogged_metric_still_opens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The page picks the metric the runs say they were monitored by (green.quality); when
    no run logged it (a fit stopped before validating), the page opens without it, not a 400
    the user did not ask for."""
    from green_mlops.integrations.mlflow.app import data
    from green_mlops.runs import RunRecord

    records = [
        RunRecord(
            "abc0", "early-stop", "exp", "FAILED", 1.7e9, 1.7e9 + 60,
            {"green/energy_kwh": 0.1, "train_loss": 0.5},
            {"green.quality": "val_acc (max); quality = val_acc"},
        )
    ]  # fmt: skip
    monkeypatch.setattr(data, "experiments", lambda: {"1": "exp"})
    monkeypatch.setattr(data, "runs", lambda chosen: records)
    monkeypatch.chdir(tmp_path)
    client = _green_client()
    response = client.get("/green/experiment?experiment_id=1")
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    assert "Choose a quality metric" in response.get_data(as_text=True)
    # asked for by name, it is still a clear 400
    assert client.get("/green/experiment?experiment_id=1&metric=val_acc").status_code == 400
