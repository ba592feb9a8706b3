"""Slurm's ConsumedEnergy as the job's reference figure, read by fake ``sstat``/``sacct``
commands on PATH that print the documented ``--noheader --parsable2
--format=ConsumedEnergyRaw`` output (joules, one line per step) of a node drawing a known power.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking.client import MlflowClient

from green_mlops import references
from green_mlops.log import GreenMlopsWarning
from green_mlops.session import Measurement
from tests.conftest import ClockMeter
from tests.mlflow_server import MlflowServer
from tests.test_energy_monitor import Classifier, loader, monitor, totals, trainer
from tests.test_mlflow import experiment, run_script
from tests.test_multinode import COUNTER, rapl_tree

SETTINGS = {"intensity_providers": "constant", "intensity_g_per_kwh": 400, "location": "DE"}
FLAGS = "--jobs=4242.0 --noheader --parsable2 --format=ConsumedEnergyRaw"

#: The fake: a node's energy since the step began at FAKE_SLURM_WATTS; FAKE_SLURM_MODE picks
#: a cluster without energy accounting ("none"), a failing daemon ("fail"), a hang ("hang"),
#: a busy daemon ("slow", 2 s), sacct's database record of a step that has not ended yet
#: ("sacct:running": 0 joules).
FAKE = """#!{python}
import os, sys, time
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write(name + " " + " ".join(sys.argv[1:]) + "\\n")
mode = os.environ.get("FAKE_SLURM_MODE", "ipmi").split(",")
if " ".join(sys.argv[1:]) != "{flags}":
    sys.exit("%s: error: unexpected arguments" % name)
if name + ":fail" in mode:
    sys.exit("%s: error: couldn't get steps for job 4242.0: Connection refused" % name)
if name + ":hang" in mode:
    time.sleep(60)
if name + ":slow" in mode:  # a busy slurmctld: answers after 2 s
    time.sleep(2.0)
if "none" in mode or name + ":running" in mode:
    print("0")
else:
    start = float(os.environ["FAKE_SLURM_STEP_START"])
    print(int((time.time() - start) * float(os.environ["FAKE_SLURM_WATTS"])))
"""


@pytest.fixture()
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A Slurm job step (4242.0, rank 0 of 1) with fake sstat and sacct first on PATH."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    for name in ("sstat", "sacct"):
        tool = bin_dir / name
        tool.write_text(FAKE.format(python=sys.executable, flags=FLAGS))
        tool.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_NUM_TASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "FAKE_SLURM_LOG": str(tmp_path / "calls.log"),
        "FAKE_SLURM_WATTS": "80",
        "FAKE_SLURM_STEP_START": str(time.time()),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_SLURM_LOG"])
    return path.read_text().splitlines() if path.exists() else []


def measure(seconds: float, watts: float = 50.0) -> tuple[dict[str, float], dict[str, str]]:
    m = Measurement(SETTINGS, meters=[ClockMeter(watts)]).start()
    time.sleep(seconds)
    result = m.stop()
    return result.metrics, result.tags


def test_an_mlflow_run_under_slurm_gets_slurms_figure_beside_the_measured_total(
    tmp_path: Path, mlflow_server: MlflowServer, slurm: dict[str, str]
) -> None:
    """The user's path: GREEN_MLOPS_ENABLE=1 in a Slurm step whose node draws 80 W while
    RAPL sees a 50 W package: Slurm's figure is logged apart, the totals stay RAPL's."""
    counter = subprocess.Popen([sys.executable, "-c", COUNTER, "50"])
    try:
        deadline = time.monotonic() + 30
        while not Path(f"/proc/{counter.pid}/comm").read_text().strip().isdigit():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        code = f"""
            import json, time, mlflow
            mlflow.set_experiment("{experiment()}")
            with mlflow.start_run() as run:
                time.sleep(3.0)
            print(json.dumps({{"run_id": run.info.run_id}}))
        """
        out = run_script(
            code,
            tmp_path,
            mlflow_server,
            GREEN_MLOPS_ENABLE="1",
            GREEN_MLOPS_RAPL_ROOT=str(rapl_tree(tmp_path / "rapl", counter.pid)),
            GREEN_MLOPS_INTENSITY_PROVIDERS="static",
            **slurm,
        )
    finally:
        counter.kill()
        counter.wait()
    assert out["_returncode"] == 0, out["_stderr"]
    run = MlflowClient(mlflow_server.url).get_run(out["run_id"])
    metrics, tags = run.data.metrics, run.data.tags
    seconds = metrics["green/duration_s"]
    cpu_j = metrics["green/energy/cpu_kwh"] * 3.6e6
    assert cpu_j == pytest.approx(50.0 * seconds, rel=0.05)  # the totals: RAPL's, unchanged
    slurm_j = metrics["green/reference/slurm/energy_kwh"] * 3.6e6
    assert slurm_j == pytest.approx(80.0 * seconds, rel=0.15)  # the node's, over the run
    fraction = metrics["green/reference/slurm/measured_fraction"]
    assert fraction == pytest.approx(metrics["green/energy_kwh"] * 3.6e6 / slurm_j, rel=1e-6)
    assert "job step 4242.0" in tags["green.reference.slurm"]
    assert "not added to the totals" in tags["green.reference.slurm"]
    assert calls(slurm) == [f"sstat {FLAGS}"] * 2  # read at the start and the end, once each


def test_a_resumed_run_compares_slurms_figure_with_its_own_segments_energy(
    tmp_path: Path, mlflow_server: MlflowServer, slurm: dict[str, str]
) -> None:
    """The run's first segment ran where Slurm kept no figure (a workstation); resumed in a
    Slurm step, its totals add the first segment's, Slurm's figure covers the second only:
    the fraction is the second segment's measured energy over it, not the run's."""
    first = f"""
        import json, time, mlflow
        mlflow.set_experiment("{experiment()}")
        with mlflow.start_run() as run:
            time.sleep(1.0)
        print(json.dumps({{"run_id": run.info.run_id}}))
    """
    env = {**slurm, "GREEN_MLOPS_ENABLE": "1", "GREEN_MLOPS_INTENSITY_PROVIDERS": "static"}
    out = run_script(first, tmp_path, mlflow_server, **{**env, "SLURM_JOB_ID": ""})
    assert out["_returncode"] == 0, out["_stderr"]
    client = MlflowClient(mlflow_server.url)
    before = client.get_run(out["run_id"]).data.metrics
    assert "green/reference/slurm/energy_kwh" not in before
    again = f"""
        import json, time, mlflow
        with mlflow.start_run(run_id="{out["run_id"]}"):
            time.sleep(2.0)
        print("{{}}")
    """
    done = run_script(again, tmp_path, mlflow_server, **env)
    assert done["_returncode"] == 0, done["_stderr"]
    metrics = client.get_run(out["run_id"]).data.metrics
    assert metrics["green/energy_kwh"] > before["green/energy_kwh"]  # the segments' sum
    second = metrics["green/energy_kwh"] - before["green/energy_kwh"]
    assert metrics["green/reference/slurm/measured_fraction"] == pytest.approx(
        second / metrics["green/reference/slurm/energy_kwh"], rel=1e-6
    )


def test_a_cluster_without_energy_accounting_is_said_with_the_fix(
    slurm: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SLURM_MODE", "none")
    with pytest.warns(GreenMlopsWarning, match="Slurm records no energy"):
        metrics, tags = measure(0.3)
    assert not any(k.startswith("green/reference/") for k in metrics)
    assert "green.reference.slurm" not in tags
    said = tags["green.not_reported"]
    assert "green/reference/slurm/energy_kwh: Slurm records no energy for job step 4242.0" in said
    assert "AcctGatherEnergyType" in said
    assert metrics["green/energy_kwh"] > 0  # the measured totals are there as always


def test_sacct_answers_when_sstat_fails(
    slurm: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SLURM_MODE", "sstat:fail")
    metrics, tags = measure(0.5)
    assert metrics["green/reference/slurm/energy_kwh"] * 3.6e6 > 0
    assert "read with sacct" in tags["green.reference.slurm"]
    # the end is read with the tool that read the start (sstat is not asked again)
    assert [c.split()[0] for c in calls(slurm)] == ["sstat", "sacct", "sacct"]


def test_the_end_is_read_with_the_tool_that_read_the_start(
    slurm: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """sstat (the step's live figure) fails at the start, sacct answers with its database
    record of the running step (0 J); sstat answers at the end with the step's energy since
    it began an hour ago: their difference is not the run's energy and is not reported."""
    monkeypatch.setenv("FAKE_SLURM_STEP_START", str(time.time() - 3600))
    monkeypatch.setenv("FAKE_SLURM_MODE", "sstat:fail,sacct:running")
    m = Measurement(SETTINGS, meters=[ClockMeter(50.0)]).start()
    deadline = time.monotonic() + 30
    while len(calls(slurm)) < 2:  # the start readings: sstat failed, sacct answered
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    monkeypatch.setenv("FAKE_SLURM_MODE", "sacct:running")  # sstat answers again
    result = m.stop()
    assert "green/reference/slurm/energy_kwh" not in result.metrics  # not 80 W x 1 hour
    assert [c.split()[0] for c in calls(slurm)] == ["sstat", "sacct", "sacct"]
    said = result.tags["green.not_reported"]
    assert "green/reference/slurm/energy_kwh: sacct reports ConsumedEnergyRaw 0" in said
    monkeypatch.setenv("FAKE_SLURM_MODE", "sacct:fail")  # and the other way round
    m = Measurement(SETTINGS, meters=[ClockMeter(50.0)]).start()
    while len(calls(slurm)) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    monkeypatch.setenv("FAKE_SLURM_MODE", "sstat:fail,sacct:running")
    result = m.stop()
    assert "green/reference/slurm/energy_kwh" not in result.metrics
    assert [c.split()[0] for c in calls(slurm)][3:] == ["sstat", "sstat"]
    said = result.tags["green.not_reported"]
    assert "sstat -j 4242.0 failed: sstat: error: couldn't get steps" in said
    assert "Slurm records no energy" not in said  # sacct's 0 for a running step is no proof


def test_a_hanging_slurm_daemon_delays_the_end_a_bounded_time(
    slurm: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SLURM_MODE", "sstat:hang,sacct:hang")
    monkeypatch.setattr(references, "END_TIMEOUT_S", 0.5)
    m = Measurement(SETTINGS, meters=[ClockMeter(50.0)]).start()
    began = time.monotonic()
    result = m.stop()  # while the start readings still wait
    assert time.monotonic() - began < 2.0  # one timeout's wait, not the daemon's minute
    said = result.tags["green.not_reported"]
    assert "green/reference/slurm/energy_kwh: the start reading did not answer in time" in said
    m = Measurement(SETTINGS, meters=[ClockMeter(50.0)]).start()
    time.sleep(1.5)  # the start readings have timed out meanwhile
    began = time.monotonic()
    result = m.stop()
    assert time.monotonic() - began < 0.5
    said = result.tags["green.not_reported"]
    assert "sstat did not answer in 0.5 s; sacct did not answer in 0.5 s" in said
    assert result.metrics["green/energy_kwh"] > 0


def test_the_end_waits_for_slurm_at_most_the_end_timeout_in_all(
    slurm: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow start reading that arrives within the wait leaves only the rest of it for the
    end reading: the run's end waits END_TIMEOUT_S in all, not that twice."""
    monkeypatch.setenv("FAKE_SLURM_MODE", "sstat:slow")
    monkeypatch.setattr(references, "END_TIMEOUT_S", 3.0)
    m = Measurement(SETTINGS, meters=[ClockMeter(50.0)]).start()
    began = time.monotonic()
    result = m.stop()  # the start reading answers after ~2 s, the end one would take 2 s more
    assert time.monotonic() - began < 3.5
    said = result.tags["green.not_reported"]
    assert "green/reference/slurm/energy_kwh: sstat did not answer in" in said
    assert [c.split()[0] for c in calls(slurm)] == ["sstat", "sstat"]  # not sacct: pinned


def test_only_the_process_that_reports_the_job_asks_slurm(
    slurm: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    metrics, _ = measure(0.2)
    assert calls(slurm) == []  # 1,000 ranks must not each call slurmctld
    assert not any(k.startswith("green/reference/") for k in metrics)


def test_outside_slurm_nothing_is_read_or_said(tmp_path: Path) -> None:
    assert "SLURM_JOB_ID" not in os.environ
    metrics, tags = measure(0.2)
    assert not any(k.startswith("green/reference/") for k in metrics)
    assert "reference" not in tags.get("green.not_reported", "")


def test_no_fraction_is_given_for_a_partial_job() -> None:
    metrics = {"green/energy_kwh": 1.0, "green/reference/slurm/energy_kwh": 2.0}
    whole = {"green.job.scope": "all 2 nodes of the job (each node measured once)"}
    assert references.compare(metrics, whole) == {"green/reference/slurm/measured_fraction": 0.5}
    partial = {"green.job.partial": "true", "green.job.scope": "partial: 1 of 2 nodes reported"}
    assert references.compare(metrics, partial) == {}
    nested = {**metrics, "green/inclusive/energy_kwh": 1.5}  # a parent of nested runs
    assert references.compare(nested, {}) == {"green/reference/slurm/measured_fraction": 0.75}


def test_a_lightning_fit_logs_the_reference_against_the_summed_totals(
    tmp_path: Path, slurm: dict[str, str]
) -> None:
    tr = trainer(tmp_path, [monitor()], max_epochs=3)
    tr.fit(Classifier(), loader(), loader(1))
    logged = totals_of(tr)
    assert logged["green/reference/slurm/energy_kwh"] > 0
    assert logged["green/reference/slurm/measured_fraction"] == pytest.approx(
        logged["green/energy_kwh"] / logged["green/reference/slurm/energy_kwh"], rel=1e-4
    )


def totals_of(tr: object) -> dict[str, float]:
    from tests.test_energy_monitor import rows

    return totals(rows(tr))  # type: ignore[arg-type]


def test_a_two_node_job_compares_slurms_step_total_with_every_nodes_energy(
    slurm: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slurm sums the step's nodes: rank 0's figure is compared with the gathered job total,
    and not at all when a node is missing from it."""
    from green_mlops.job import Job
    from green_mlops.nodes import merge

    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")
    job = Job("slurm", rank=0, local_rank=0, world_size=2, node_rank=0, nodes=2)
    m = Measurement(SETTINGS, meters=[ClockMeter(50.0)]).start()
    time.sleep(0.5)
    own = m.stop()
    node1 = own.metrics["green/energy_kwh"] * 1.6  # the other node drew 80 W
    blob = {"final": True, "at": time.time(), "metrics": {"green/energy_kwh": node1}, "power": []}
    whole = merge(own, {1: blob}, job, final=True).metrics
    reference = whole["green/reference/slurm/energy_kwh"]
    assert reference == own.metrics["green/reference/slurm/energy_kwh"]  # never summed
    assert whole["green/reference/slurm/measured_fraction"] == pytest.approx(
        (own.metrics["green/energy_kwh"] + node1) / reference
    )
    partial = merge(own, {}, job, final=True).metrics
    assert "green/reference/slurm/measured_fraction" not in partial
    assert partial["green/reference/slurm/energy_kwh"] == reference


def test_a_fit_resumed_from_a_checkpoint_says_why_it_has_no_slurm_figure(
    tmp_path: Path, slurm: dict[str, str]
) -> None:
    """The Slurm requeue case: the second job's figure covers its own stage only, while the
    fit's totals continue the checkpoint's: no fraction of the two, and no tag for a figure
    that is not there."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.test_energy_monitor import report

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(tmp_path, [monitor(), ckpt], max_epochs=1, enable_checkpointing=True)
    first.fit(Classifier(), loader(), loader(1))
    second = trainer(tmp_path, [monitor()], max_epochs=2, enable_checkpointing=True)
    second.fit(Classifier(), loader(), loader(1), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    logged = totals_of(second)
    assert "green/reference/slurm/measured_fraction" not in logged
    assert "green/reference/slurm/energy_kwh" not in logged
    tags = report(second)["tags"]
    assert "green.reference.slurm" not in tags
    assert (
        "green/reference/slurm/energy_kwh: it covers this stage only" in tags["green.not_reported"]
    )
