"""GREEN_MLOPS_ESTIMATE naming a file that is no `green-mlops estimate --save` file is bad
configuration: under GREEN_MLOPS_ENABLE=1 it fails when the run is about to be created (no run
is left behind), naming the setting, the value and the accepted form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking.client import MlflowClient

from tests.mlflow_server import MlflowServer
from tests.test_mlflow import experiment, run_script

START = """
    import json, mlflow
    mlflow.set_experiment("{exp}")
    try:
        with mlflow.start_run() as run:
            pass
        print(json.dumps({{"error": None, "tags": mlflow.get_run(run.info.run_id).data.tags}}))
    except Exception as exc:
        print(json.dumps({{"error": f"{{type(exc).__name__}}: {{exc}}"}}))
"""


def test_a_missing_or_malformed_estimate_file_fails_before_the_run_is_created(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    exp = experiment()
    missing = tmp_path / "nonexistent.json"
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"pilot_run_id": "p"}')
    for path in (missing, malformed):
        out = run_script(
            START.format(exp=exp),
            tmp_path,
            mlflow_server,
            GREEN_MLOPS_ENABLE="1",
            GREEN_MLOPS_ESTIMATE=str(path),
        )
        error = out["error"]
        assert error is not None, out
        assert error.startswith(f"ConfigError: GREEN_MLOPS_ESTIMATE={str(path)!r}"), error
        assert "`green-mlops estimate --save`" in error, error  # the accepted form
        assert "pilot_run_id" in error and "energy_kwh" in error, error
    client = MlflowClient(mlflow_server.url)
    assert client.search_runs([client.get_experiment_by_name(exp).experiment_id]) == []
    # a readable estimate: the run goes on and carries its pilot
    good = tmp_path / "estimate.json"
    good.write_text(json.dumps({"pilot_run_id": "p1", "energy_kwh": 1e-3, "low_kwh": 5e-4,
                                "high_kwh": 2e-3}))  # fmt: skip
    out = run_script(
        START.format(exp=exp),
        tmp_path,
        mlflow_server,
        GREEN_MLOPS_ENABLE="1",
        GREEN_MLOPS_ESTIMATE=str(good),
    )
    assert out["error"] is None, out
    assert out["tags"]["green.estimate.pilot_run_id"] == "p1"


def test_autolog_raises_at_once_for_a_bad_estimate_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from green_mlops.config import ConfigError
    from green_mlops.integrations.mlflow import autolog, disable, tracked_runs

    monkeypatch.setenv("GREEN_MLOPS_ESTIMATE", str(tmp_path / "missing.json"))
    try:
        with pytest.raises(ConfigError, match="GREEN_MLOPS_ESTIMATE="):
            autolog(location="DE")
        assert tracked_runs() == []
    finally:
        disable()
