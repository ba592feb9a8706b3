"""The MLflow UI shows green-mlops' metrics when two tracked runs are compared.

A real MLflow server (the ``mlflow_server`` fixture), two runs made by user-style scripts with
``GREEN_MLOPS_ENABLE=1``, and a real browser: Playwright drives Debian's chromium
(``/usr/bin/chromium``; ``scripts/install-browser.sh`` installs it, nothing is downloaded) through
the compare view, reads the metric table the user sees and checks every green metric of both
runs against the values stored in MLflow, allowing for the UI's display rounding.

The screenshot goes to ``docs/img/mlflow-compare.png`` when ``GREEN_MLOPS_UPDATE_SCREENSHOTS=1``,
otherwise to the test's tmp dir, so ordinary test runs leave the tree clean.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking.client import MlflowClient

from tests.mlflow_server import MlflowServer
from tests.test_mlflow import ROOT, experiment, run_script

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "img" / "mlflow-compare.png"
REQUIRED = ("green/energy_kwh", "green/co2e_g")

# Two runs of different length, so that their energies differ and a swapped column would show.
TRAIN = """
    import json, time, mlflow
    mlflow.set_experiment("{exp}")
    with mlflow.start_run(run_name="{name}") as run:
        t0, step = time.monotonic(), 0
        while time.monotonic() - t0 < {seconds}:
            sum(i * i for i in range(20_000))  # a CPU-bound "training step"
            step += 1
            if step % 20 == 0:
                mlflow.log_metric("loss", 1 / step, step=step)
    print(json.dumps({{"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}}))
"""

# The metric table of the compare view is two react-virtualized grids (names | values, one
# column per run), which render only the rows near the visible ones: scroll the value grid
# through its whole height and collect cells by their row offset (``top``) and column (``left``).
# Both grids are scrolled: the UI syncs the name grid to the value grid's *previous* position.
METRIC_GRIDS_JS = """
() => {
  const header = [...document.querySelectorAll('[role=button][aria-expanded]')]
      .find(h => h.textContent.trim() === 'Metrics');
  const grids = header ? [...header.parentElement.querySelectorAll('.ReactVirtualized__Grid')] : [];
  return grids.length < 2 ? null : [grids[0], grids[grids.length - 1]];
}
"""
COLLECT_JS = f"""
async () => {{
  const grids = ({METRIC_GRIDS_JS})();
  if (!grids) return null;
  const [names, values] = grids;
  const frames = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const scrollTo = async (top) => {{
    values.scrollTop = top;
    names.scrollTop = top;
    await frames();
  }};
  const cells = {{names: {{}}, values: {{}}}};
  const collect = (grid, into) => {{
    for (const c of grid.firstElementChild.children)
      into[`${{parseFloat(c.style.top)}}|${{parseFloat(c.style.left)}}`] = c.innerText.trim();
  }};
  const step = Math.max(1, Math.floor(values.clientHeight / 2));
  for (let top = 0; ; top += step) {{
    await scrollTo(top);
    collect(names, cells.names);
    collect(values, cells.values);
    if (top + values.clientHeight >= values.scrollHeight) break;
  }}
  await scrollTo(0);
  return cells;
}}
"""
IN_SYNC_JS = f"""
() => {{
  const grids = ({METRIC_GRIDS_JS})();
  return grids && grids.map(g => g.scrollTop);
}}
"""


def displayed_table(cells: dict[str, dict[str, str]], n_runs: int) -> dict[str, list[str]]:
    """{metric name: [displayed value per run column, left to right]} from the grid cells."""
    names = {float(k.split("|")[0]): v for k, v in cells["names"].items()}
    rows: dict[float, dict[float, str]] = {}
    for key, text in cells["values"].items():
        top, left = (float(x) for x in key.split("|"))
        rows.setdefault(top, {})[left] = text
    table = {}
    for top, name in names.items():
        columns = rows.get(top, {})
        assert len(columns) == n_runs, f"row {name!r}: {columns}"
        table[name] = [columns[left] for left in sorted(columns)]
    return table


def rounding_tolerance(shown: str) -> float:
    """Half a unit of the last digit shown (MLflow's ``Utils.formatMetric`` rounds to 3 decimals
    below 10, 2 below 100, 1 above, and writes ``toExponential(3)`` below 0.001)."""
    match = re.fullmatch(r"-?\d+(?:\.(\d+))?(?:e([+-]?\d+))?", shown)
    assert match, f"not a number as MLflow displays them: {shown!r}"
    decimals = len(match.group(1) or "")
    exponent = int(match.group(2) or 0)
    return 0.5 * 10.0 ** (exponent - decimals)


def launch_chromium(playwright: Any, profile: Path, executable: Path = CHROMIUM) -> Any:
    return playwright.chromium.launch_persistent_context(
        str(profile),  # a fresh --user-data-dir
        executable_path=str(executable),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1200, "height": 1020},
    )


def missing(reason: str) -> None:
    """A missing browser fails the test where ``CI`` is set (CI installs it: missing there
    means broken) and skips it elsewhere (a machine without root), saying how to install it."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium and Playwright, checked before the MLflow server is started."""
    return require_chromium()


def require_chromium() -> Path:
    """:data:`CHROMIUM`, once it and Playwright are known to be there (else :func:`missing`)."""
    if not CHROMIUM.exists():
        missing(
            f"{CHROMIUM} is missing: this test drives Debian's chromium. "
            "Install it with scripts/install-browser.sh (as root, or with sudo)."
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing('playwright is not installed: pip install -e ".[test]"')
    return CHROMIUM


def test_compare_view_shows_green_metrics_of_both_runs(
    chromium: Path, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    client = MlflowClient(mlflow_server.url)
    exp = experiment()
    # created up front: two scripts racing on set_experiment's create are not what is tested
    exp_id = client.create_experiment(exp)

    outs: dict[str, dict[str, Any]] = {}

    def train(name: str, seconds: float) -> None:
        code = TRAIN.format(exp=exp, name=name, seconds=seconds)
        outs[name] = run_script(code, tmp_path, mlflow_server, timeout=60, GREEN_MLOPS_ENABLE="1")

    workers = [threading.Thread(target=train, args=a) for a in (("short", 0.6), ("long", 2.4))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for name, out in outs.items():
        assert out["_returncode"] == 0 and out.get("experiment_id") == exp_id, (
            name,
            out.get("experiment_id"),
            out["_stderr"][-3000:],
        )
    run_ids = [outs["short"]["run_id"], outs["long"]["run_id"]]
    stored = [
        {k: v for k, v in client.get_run(r).data.metrics.items() if k.startswith("green/")}
        for r in run_ids
    ]
    for metrics in stored:
        assert all(metrics.get(k, 0) > 0 for k in REQUIRED), metrics
    # the long run used clearly more energy: a swapped column cannot pass unnoticed
    assert stored[1]["green/energy_kwh"] > 1.5 * stored[0]["green/energy_kwh"], stored

    # the compare view's route in MLflow 3.x (Routes.getCompareRunPageRoute)
    url = (
        f"{mlflow_server.url}/#/compare-runs?runs={json.dumps(run_ids)}"
        f"&experiments={json.dumps([exp_id])}"
    )
    shot = SCREENSHOT if os.environ.get("GREEN_MLOPS_UPDATE_SCREENSHOTS") == "1" else None
    shot = shot or tmp_path / "mlflow-compare.png"
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, tmp_path / "chromium-profile", chromium)
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for()
            header_ids = page.locator("table.mlflow-compare-run-table thead a").all_inner_texts()
            page.get_by_text("green/energy_kwh", exact=True).first.wait_for()
            # a picture of what a user sees: the run table and the metric table (framing only:
            # collapse the other sections and MLflow 3.x's assistant panel where they exist)
            for name in ("Visualizations", "Parameters", "Artifacts", "Tags", "Close"):
                button = page.get_by_role("button", name=name, exact=True)
                if button.count() == 1:
                    button.click()
            page.get_by_text("Comparing 2 Runs from 1 Experiment").scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            grid_scroll = page.evaluate(IN_SYNC_JS)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
            cells = page.evaluate(COLLECT_JS)
        finally:
            browser.close()

    assert [t.strip() for t in header_ids] == run_ids  # columns are in the order asked for
    assert cells is not None, "no metric table in the compare view"
    assert grid_scroll == [0, 0], f"metric names and values out of line: {grid_scroll}"
    table = displayed_table(cells, n_runs=2)
    for metrics in stored:
        assert set(metrics) <= set(table), sorted(set(metrics) - set(table))
    for key in REQUIRED:
        assert key in table
    for column, metrics in enumerate(stored):
        for key, value in metrics.items():
            shown = table[key][column]
            assert abs(float(shown) - value) <= rounding_tolerance(shown) * (1 + 1e-9), (
                f"{key} of run {run_ids[column]}: the UI shows {shown}, MLflow holds {value}"
            )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


# --- without the browser: skipped with the install command on a machine without root, failed in CI


HIDE_CHROMIUM = """
import pathlib


def pytest_collection_modifyitems(items):
    for item in items:
        item.module.CHROMIUM = pathlib.Path("/nonexistent/chromium")
"""


# (a fixture's failure is reported as an error: the run fails all the same)
@pytest.mark.parametrize(("ci", "outcome"), [(None, "skipped"), ("true", "error")])
def test_a_missing_browser_skips_with_the_install_command_or_fails_in_ci(
    tmp_path: Path, ci: str | None, outcome: str
) -> None:
    import subprocess
    import sys

    (tmp_path / "hide_chromium.py").write_text(HIDE_CHROMIUM)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    if ci is not None:
        env["CI"] = ci
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "hide_chromium", "-p", "no:cacheprovider"),
            *(
                "-rsfE",
                "-q",
                "tests/test_mlflow_ui.py::test_compare_view_shows_green_metrics_of_both_runs",
            ),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = proc.stdout.strip().splitlines()
    assert summary[-1].startswith(f"1 {outcome} in "), proc.stdout
    said = " ".join(proc.stdout.split())
    assert "/nonexistent/chromium is missing" in said
    assert "Install it with scripts/install-browser.sh (as root, or with sudo)." in said
    assert proc.returncode == (0 if ci is None else 1)
