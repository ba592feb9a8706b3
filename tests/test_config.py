"""Settings: precedence, validation messages, secrets, documentation."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest

from green_mlops.config import ConfigError, Settings, settings_table
from tests.mlflow_server import MlflowServer

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_env_and_keyword_precedence() -> None:
    assert Settings.load(environ={}).sample_interval_s == 0.5
    env = {"GREEN_MLOPS_SAMPLE_INTERVAL_S": "0.2", "GREEN_MLOPS_ENABLE": "yes"}
    from_env = Settings.load(environ=env)
    assert from_env.sample_interval_s == 0.2 and from_env.enable is True
    assert Settings.load(environ=env, sample_interval_s=1.5).sample_interval_s == 1.5


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("GREEN_MLOPS_ENABLE", "maybe", "1/0, true/false"),
        ("GREEN_MLOPS_SAMPLE_INTERVAL_S", "-1", "[0.01, 60]"),
        ("GREEN_MLOPS_SAMPLE_INTERVAL_S", "fast", "[0.01, 60]"),
        ("GREEN_MLOPS_SAMPLE_INTERVAL_S", "nan", "[0.01, 60]"),
        ("GREEN_MLOPS_LOG_INTERVAL_S", "0", "[0.5, 3600]"),
        ("GREEN_MLOPS_SHARE", "everyone", "machine or process"),
        ("GREEN_MLOPS_CPU_TDP_W", "0", "> 0"),
        ("GREEN_MLOPS_RAM_W_PER_GB", "-0.3", "[0, 100]"),
        ("GREEN_MLOPS_DISABLE_PLUGINS", "rapl;nvml", "comma-separated"),
        ("GREEN_MLOPS_RAPL_ROOT", "  ", "a directory path"),
    ],
)
def test_bad_environment_values_name_variable_value_and_form(
    variable: str, value: str, accepted: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={variable: value})
    message = str(info.value)
    assert variable in message and repr(value) in message and accepted in message


def test_bad_keyword_names_the_argument() -> None:
    with pytest.raises(ConfigError, match=r"argument share='all' is not valid: expected machine"):
        Settings.load(environ={}, share="all")
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.load(environ={}, sample_interval=1)


def test_typed_values_and_lists() -> None:
    s = Settings.load(
        environ={"GREEN_MLOPS_DISABLE_PLUGINS": " rapl, nvml ,", "GREEN_MLOPS_CPU_TDP_W": ""},
        rapl_root="/tmp/x",
    )
    assert s.disable_plugins == frozenset({"rapl", "nvml"})
    assert s.cpu_tdp_w is None and s.rapl_root == Path("/tmp/x")
    assert s.replace(cpu_tdp_w="125").cpu_tdp_w == 125.0
    with pytest.raises(ConfigError):
        s.replace(ram_w_per_gb=True)


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    variables = [row[0] for row in settings_table()]
    assert len(variables) == len(dataclasses.fields(Settings))
    missing = [v for v in variables if not re.search(rf"`{v}`", readme)]
    assert missing == []


# --- provider names come from plugins: a typo is refused before anything runs ----------------


def test_a_misspelled_provider_is_a_configuration_error_with_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={"GREEN_MLOPS_INTENSITY_PROVIDERS": "electricitymaps,statc"})
    message = str(info.value)
    assert "GREEN_MLOPS_INTENSITY_PROVIDERS='electricitymaps,statc' is not valid" in message
    assert "'statc' (did you mean 'static'?)" in message
    assert "constant, electricitymaps, static, uk, watttime" in message
    with pytest.raises(ConfigError, match=r"argument intensity_providers='nope'"):
        Settings.load(environ={}, intensity_providers="nope")
    # a valid list of installed providers loads
    assert Settings.load(environ={}, intensity_providers="uk,static").intensity_providers == (
        "uk",
        "static",
    )


def test_a_provider_of_a_disabled_plugin_is_refused_when_named_and_skipped_by_default() -> None:
    from green_mlops.carbon import CarbonAccountant

    with pytest.raises(ConfigError, match="no installed plugin offers 'static'"):
        Settings.load(
            environ={
                "GREEN_MLOPS_DISABLE_PLUGINS": "static_intensity",
                "GREEN_MLOPS_INTENSITY_PROVIDERS": "uk,static",
            }
        )
    # the default list names the built-ins: one switched off is skipped, and provenance says so
    settings = Settings.load(environ={"GREEN_MLOPS_DISABLE_PLUGINS": "watttime"})
    accountant = CarbonAccountant(settings)
    assert [p.name for p in accountant.providers] == ["constant", "electricitymaps", "static"]
    assert "disabled plugins: watttime" in accountant.skipped["watttime"]
    accountant.close()


def test_mlflow_run_is_not_created_with_a_misspelled_provider(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from mlflow.tracking.client import MlflowClient

    code = (
        "import json, mlflow\n"
        "mlflow.set_experiment('typo-provider')\n"
        "try:\n"
        "    mlflow.start_run()\n"
        "    print(json.dumps({'error': None}))\n"
        "except Exception as exc:\n"
        "    print(json.dumps({'error': f'{type(exc).__name__}: {exc}'}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GREEN_MLOPS_", "MLFLOW_"))}
    env.update(
        GREEN_MLOPS_ENABLE="1",
        GREEN_MLOPS_INTENSITY_PROVIDERS="statc",
        GREEN_MLOPS_CACHE_DIR=str(tmp_path / "cache"),
        MLFLOW_TRACKING_URI=mlflow_server.url,
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    import json

    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stderr
    error = json.loads(lines[-1])["error"]
    assert error.startswith("ConfigError: GREEN_MLOPS_INTENSITY_PROVIDERS='statc' is not valid")
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("typo-provider")
    assert experiment is not None
    assert client.search_runs([experiment.experiment_id]) == []


def test_cache_dir_default_follows_xdg_cache_home_when_settings_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # set after import
    assert Settings.load().cache_dir == tmp_path / "xdg" / "green-mlops"
    other = {"XDG_CACHE_HOME": str(tmp_path / "other")}
    assert Settings.load(environ=other).cache_dir == tmp_path / "other" / "green-mlops"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings.load().cache_dir == tmp_path / "home" / ".cache" / "green-mlops"
    # an explicit setting wins; the table shows the rule, not this machine's path
    assert Settings.load(environ={"GREEN_MLOPS_CACHE_DIR": "/x"}).cache_dir == Path("/x")
    rows = {row[0]: row[1] for row in settings_table()}
    assert rows["GREEN_MLOPS_CACHE_DIR"] == "$XDG_CACHE_HOME/green-mlops (~/.cache/green-mlops)"


def test_a_misspelled_variable_is_said_once_with_the_setting_it_meant() -> None:
    # GREEN_MLOPS_LOCATON=DE was ignored without a word (the world average priced the run)
    from green_mlops.log import GreenMlopsWarning

    env = {"GREEN_MLOPS_LOCATON": "DE", "GREEN_MLOPS_MY_PLUGIN_KEY": "x"}
    with pytest.warns(GreenMlopsWarning) as caught:
        assert Settings.load(environ=env).location is None
    said = [str(w.message) for w in caught if issubclass(w.category, GreenMlopsWarning)]
    assert said == [
        "green-mlops: GREEN_MLOPS_LOCATON is not a setting, and is ignored: did you mean "
        "GREEN_MLOPS_LOCATION?"
    ]  # a third-party plugin's own variable (close to no setting) is left alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Settings.load(environ=env)  # said once


def test_messages_quote_the_value_given_and_the_accepted_form_once() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={"GREEN_MLOPS_INTENSITY_BASIS": "market"})
    assert str(info.value).startswith("GREEN_MLOPS_INTENSITY_BASIS=market (market-based) names")
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={"GREEN_MLOPS_LOCATION": "XX"})
    assert str(info.value).startswith("GREEN_MLOPS_LOCATION='XX' is not valid: unknown location")
    assert str(info.value).count("expected") == 1
