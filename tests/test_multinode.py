"""A two-node torchrun job simulated on this machine: two agents of one static rendezvous, each
"node" with its own fake RAPL tree of known constant power, rank 0 logging to a real MLflow
server with GREEN_MLOPS_ENABLE=1 on every rank. Run 1: both nodes live through it. Run 2 of the
same job: node 1 is killed mid-run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from green_mlops.job import Job
from green_mlops.nodes import MAX_NODE_BREAKDOWN, NodeAgent, RunGather, connect, merge
from green_mlops.session import Measurement
from tests.conftest import ClockMeter
from tests.mlflow_server import MlflowServer, free_port

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
WATTS = {0: 50.0, 1: 80.0}
TRAIN_S = 2.0
SETTINGS = {"intensity_providers": "constant", "intensity_g_per_kwh": 400, "location": "DE"}

#: A RAPL package counter that advances at a constant power: the process writes the counter
#: (in uJ) into its own /proc/self/comm, which energy_uj links to (an atomic read).
COUNTER = """
import sys, time
watts = float(sys.argv[1])
t0 = time.monotonic()
while True:
    uj = 1_000_000 + int((time.monotonic() - t0) * watts * 1e6)
    with open('/proc/self/comm', 'w') as f:
        f.write(str(uj))
    time.sleep(0.002)
"""

TRAIN = """
import json, os, sys, time
from pathlib import Path

import mlflow  # on every rank: GREEN_MLOPS_ENABLE=1 loads the plugin in each
import torch
import torch.distributed as dist

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
dist.barrier()


def wait(name):
    while not (out / name).exists():
        time.sleep(0.01)


def train(seconds):  # no collectives: a dead node must not stop this one
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        torch.ones(64, 64) @ torch.ones(64, 64)
        time.sleep(0.01)


if rank == 0:
    mlflow.set_tracking_uri(os.environ["TRACKING_URI"])
    with mlflow.start_run() as run:
        (out / "run1").write_text(run.info.run_id)
        train(float(sys.argv[2]))
dist.barrier()  # run 1 ended: every node lived through it
if rank == 0:
    with mlflow.start_run() as run:
        (out / "run2").write_text(run.info.run_id)
        wait("killed")
        train(1.0)
        began = time.monotonic()
    (out / "ended").write_text(str(time.monotonic() - began))
    os._exit(0)  # no barrier with the dead node
else:
    wait("never")  # until killed
"""


@pytest.fixture()
def counters() -> Iterator[dict[int, int]]:
    procs = {n: subprocess.Popen([sys.executable, "-c", COUNTER, str(w)]) for n, w in WATTS.items()}
    try:
        deadline = time.monotonic() + 30
        for proc in procs.values():  # the comm holds a counter value once it ran
            while not Path(f"/proc/{proc.pid}/comm").read_text().strip().isdigit():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        yield {n: p.pid for n, p in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def rapl_tree(root: Path, pid: int) -> Path:
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text(f"{10**14}\n")
    (zone / "constraint_0_max_power_uw").write_text(f"{200 * 10**6}\n")
    (zone / "energy_uj").symlink_to(f"/proc/{pid}/comm")
    return root


def kill_node(agent: subprocess.Popen[str]) -> None:
    """SIGKILL a "node": its torchrun agent and its workers (each in a session of its own)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for proc in [
            *psutil.Process(agent.pid).children(recursive=True),
            psutil.Process(agent.pid),
        ]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    agent.wait(timeout=30)


def wait_for(path: Path, agents: list[subprocess.Popen[str]], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if any(a.poll() not in (None, 0) for a in agents) or time.monotonic() > deadline:
            errors = [a.communicate(timeout=30)[1][-3000:] for a in agents if a.poll() is not None]
            pytest.fail(f"no {path.name}: {errors}")
        time.sleep(0.05)


@pytest.mark.slow
def test_two_nodes_are_measured_once_each_and_a_killed_node_is_named(
    tmp_path: Path, mlflow_server: MlflowServer, counters: dict[int, int]
) -> None:
    import torch.distributed as dist
    from mlflow.tracking import MlflowClient

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TRAIN))
    port = free_port()
    agents = []
    for node in (0, 1):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "GREEN_MLOPS_ENABLE": "1",
            "GREEN_MLOPS_RAPL_ROOT": str(rapl_tree(tmp_path / f"rapl{node}", counters[node])),
            "GREEN_MLOPS_LOG_INTERVAL_S": "0.5",
            "GREEN_MLOPS_INTENSITY_PROVIDERS": "static",
            "GREEN_MLOPS_LOCATION": "DE" if node == 0 else "FR",
            "TRACKING_URI": mlflow_server.url,
        }
        command = [str(TORCHRUN), "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2"]
        command += ["--master-addr=127.0.0.1", f"--master-port={port}"]
        command += [str(script), str(tmp_path), str(TRAIN_S)]
        agents.append(
            subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        wait_for(tmp_path / "run2", agents)
        # node 1 has answered run 2 at least once: then it dies with its agent
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        store.wait(["green_mlops/run/2/node/1"])
        kill_node(agents[1])
        (tmp_path / "killed").touch()
        wait_for(tmp_path / "ended", agents[:1])
    finally:
        for agent in agents:
            if agent.poll() is None:
                kill_node(agent)
            agent.communicate(timeout=30)
    client = MlflowClient(mlflow_server.url)

    # run 1: each node's package counted once, at its own power, over the run's time
    run = client.get_run((tmp_path / "run1").read_text())
    metrics, tags = run.data.metrics, run.data.tags
    seconds = metrics["green/duration_s"]
    assert seconds >= TRAIN_S
    joules = {n: metrics[f"green/node/{n}/energy/cpu_kwh"] * 3.6e6 for n in (0, 1)}
    for node, watts in WATTS.items():
        assert joules[node] == pytest.approx(watts * seconds, rel=0.05), node
    assert metrics["green/energy/cpu_kwh"] * 3.6e6 == pytest.approx(130.0 * seconds, rel=0.05)
    assert metrics["green/energy/cpu_kwh"] * 3.6e6 == pytest.approx(sum(joules.values()))
    assert (tags["green.job.nodes"], tags["green.job.nodes_reported"]) == ("2", "2")
    assert tags["green.job.partial"] == "false"
    assert tags["green.job.scope"].startswith("all 2 nodes")
    assert "only this node" not in tags.get("green.notes", "")
    assert "node 1" not in tags.get("green.problems", "")
    assert tags["green.job.locations"] == "0: DE, 1: FR"  # each node priced at its own place
    node_co2e = [metrics[f"green/node/{n}/co2e_g"] for n in (0, 1)]
    assert metrics["green/co2e_g"] == pytest.approx(sum(node_co2e))
    assert node_co2e[0] / joules[0] > node_co2e[1] / joules[1]  # DE's grid is dirtier than FR's
    power = [p.value for p in client.get_metric_history(run.info.run_id, "system/green/power_w")]
    assert max(power) > 100  # the series sums the nodes: above either node alone

    # run 2: node 1 killed mid-run; rank 0's run finishes, partial, node 1 named
    run = client.get_run((tmp_path / "run2").read_text())
    metrics, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    assert float((tmp_path / "ended").read_text()) < 5.0  # ending waited a bounded time
    seconds = metrics["green/duration_s"]
    node1 = metrics["green/node/1/energy/cpu_kwh"] * 3.6e6
    assert 0 < node1 < 0.9 * 80.0 * seconds  # up to its last report only
    node0 = metrics["green/node/0/energy/cpu_kwh"] * 3.6e6
    assert node0 == pytest.approx(50.0 * seconds, rel=0.05)
    assert metrics["green/energy/cpu_kwh"] * 3.6e6 == pytest.approx(node0 + node1)
    assert (tags["green.job.partial"], tags["green.job.nodes_reported"]) == ("true", "1")
    assert "node 1 (" in tags["green.problems"] and "stopped reporting" in tags["green.problems"]
    assert tags["green.job.scope"] == "partial: 1 of 2 nodes reported"


# --- the exchange on its own: a real TCPStore on loopback, no launcher ---------------------------


@pytest.fixture()
def store_client() -> Iterator[Callable[[], Any]]:
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def client() -> Any:
        return dist.TCPStore("127.0.0.1", master.port, is_master=False, wait_for_workers=False)

    yield client


def measurement(watts: float) -> Measurement:
    return Measurement(SETTINGS, meters=[ClockMeter(watts)]).start()


def test_a_node_that_never_answers_is_named_and_the_wait_is_bounded(
    store_client: Callable[[], Any],
) -> None:
    job = Job("torchrun", rank=0, local_rank=0, world_size=3, node_rank=0, nodes=3)
    agent = NodeAgent(
        Job("torchrun", rank=1, local_rank=0, world_size=3, node_rank=1, nodes=3),
        lambda: measurement(80.0),
        interval_s=0.5,
        location="DE",
        store_factory=store_client,
    )
    agent.start()
    assert agent.ready.wait(30)
    own = measurement(50.0)
    gather = RunGather(job, interval_s=0.5, store_factory=store_client, wait_s=3.0).open()
    began = time.monotonic()
    blobs = gather.close()  # node 2 has no measuring process at all
    assert time.monotonic() - began < 3.5
    merged = merge(own.stop(), blobs, job, error=gather.error, final=True)
    assert sorted(blobs) == [1] and blobs[1]["final"]
    tags = merged.tags
    assert (tags["green.job.nodes_reported"], tags["green.job.partial"]) == ("2", "true")
    assert "node 2 never reported: its energy is not included" in tags["green.problems"]
    assert tags["green.job.scope"] == "partial: 2 of 3 nodes reported"
    m = merged.metrics
    assert m["green/energy_kwh"] == pytest.approx(
        m["green/node/0/energy_kwh"] + m["green/node/1/energy_kwh"]
    )
    assert "green/node/2/energy_kwh" not in m  # absent, never 0
    agent.measurement.close()  # the node's measurement lasts as long as its process otherwise


def test_without_a_store_the_run_says_why_and_is_partial() -> None:
    job = Job("env", rank=0, local_rank=0, world_size=2, node_rank=0, nodes=2)
    gather = RunGather(job, interval_s=0.5, store_factory=lambda: connect({})).open()
    merged = merge(measurement(50.0).stop(), gather.close(), job, error=gather.error, final=True)
    problems = merged.tags["green.problems"]
    assert "node totals not gathered: MASTER_ADDR/MASTER_PORT are not set" in problems
    assert "node 1 never reported" in problems
    assert merged.tags["green.job.partial"] == "true"


def test_past_the_breakdown_limit_nodes_are_summed_in_rest() -> None:
    nodes = MAX_NODE_BREAKDOWN + 4
    job = Job("torchrun", rank=0, local_rank=0, world_size=nodes, node_rank=0, nodes=nodes)
    result = measurement(50.0).stop()
    blob = {"final": True, "at": time.time(), "metrics": {"green/energy_kwh": 1.0}, "power": []}
    merged = merge(result, {n: blob for n in range(1, nodes)}, job, final=True)
    m = merged.metrics
    assert m["green/energy_kwh"] == pytest.approx(result.metrics["green/energy_kwh"] + nodes - 1)
    assert f"green/node/{MAX_NODE_BREAKDOWN - 1}/energy_kwh" in m
    assert f"green/node/{MAX_NODE_BREAKDOWN}/energy_kwh" not in m
    assert m["green/node/rest/energy_kwh"] == pytest.approx(4.0)
    assert merged.tags["green.job.nodes_reported"] == str(nodes)


def test_a_jobs_report_is_recomputable_rank_0_from_its_intervals_the_rest_as_summed() -> None:
    """A third party's `green-mlops verify` of a gathered run: rank 0's node from the report's
    intervals, the job's totals as rank 0's plus each node's reported figures (it refused
    every multi-node report before: the totals did not match rank 0's intervals)."""
    import json

    from green_mlops.verify import verify_report

    job = Job("torchrun", rank=0, local_rank=0, world_size=2, node_rank=0, nodes=2)
    own = measurement(50.0).stop()
    node1 = {"green/energy_kwh": 2e-5, "green/energy_facility_kwh": 2e-5, "green/co2e_g": 8e-3}
    blob = {"final": True, "at": time.time(), "metrics": node1, "power": []}
    report = json.loads(json.dumps(merge(own, {1: blob}, job, final=True).report()))
    job_kwh = own.metrics["green/energy_kwh"] + 2e-5
    assert report["footprint"]["it_kwh"] == pytest.approx(job_kwh)  # the job's, not node 0's
    assert f"used {job_kwh:.3g} kWh" in report["reporting_sentence"]
    assert "on 2 nodes (node 0: " in report["reporting_sentence"]
    outcome = verify_report(report)
    assert outcome.mismatches == []
    names = {c.name for c in outcome.checks}
    assert {"green/energy_kwh", "green/energy_kwh (job: rank 0 + nodes)"} <= names
    assert outcome.unverifiable == [
        "metrics: the job's totals add 1 other node(s)' figures as each reported them (nodes); "
        "only rank 0's node's intervals are in this report (rank0_metrics checked)"
    ]
    report["metrics"]["green/co2e_g"] += 1.0  # a job total that is not the nodes' sum
    names = [c.name for c in verify_report(report).mismatches]
    assert names == ["green/co2e_g (job: rank 0 + nodes)", "footprint.operational_g"]


def test_one_process_per_node_measures_it_the_lowest_local_rank_alive(
    store_client: Callable[[], Any],
) -> None:
    def agent(local_rank: int) -> NodeAgent:
        job = Job("torchrun", rank=2 + local_rank, local_rank=local_rank, node_rank=1, nodes=2)
        made = NodeAgent(
            job,
            lambda: measurement(80.0),
            interval_s=0.5,
            location="DE",
            store_factory=store_client,
            claim_delay_s=0.2 * local_rank,
        )
        made.start()
        return made

    later, first = agent(1), agent(0)  # local rank 1 starts first, local rank 0 still wins
    assert first.ready.wait(30) and later.ready.wait(30)
    assert first.measurement is not None and later.measurement is None
    first.measurement.close()
    alone = NodeAgent(  # node 2's local rank 0 is not there: local rank 1 measures it
        Job("torchrun", rank=5, local_rank=1, node_rank=2, nodes=3),
        lambda: measurement(80.0),
        interval_s=0.5,
        location="DE",
        store_factory=store_client,
        claim_delay_s=0.2,
    )
    alone.start()
    assert alone.ready.wait(30) and alone.measurement is not None
    alone.measurement.close()


def test_a_node_whose_clock_is_behind_rank_0s_is_still_waited_for(
    store_client: Callable[[], Any],
) -> None:
    """Clocks of different nodes differ: a node whose wall clock is a minute behind rank 0's
    answers live, then its final totals arrive a moment after the end. Rank 0 judges the node
    alive by when it saw its reports change (its own clock), not by the node's timestamps."""
    import json
    import threading

    skew_s = -60.0
    job = Job("torchrun", rank=0, local_rank=0, world_size=2, node_rank=0, nodes=2)
    gather = RunGather(job, interval_s=0.2, store_factory=store_client, wait_s=3.0).open()
    node = store_client()

    def blob(final: bool) -> str:
        metrics = {"green/energy_kwh": 1e-3}
        at = time.time() + skew_s  # the node's own clock
        return json.dumps({"node": 1, "final": final, "at": at, "metrics": metrics, "power": []})

    def play_node() -> None:  # the protocol of NodeAgent, from a node with another clock
        node.wait(["green_mlops/event/1"], timedelta(seconds=30))
        seq = json.loads(node.get("green_mlops/event/1"))["seq"]
        key = f"green_mlops/run/{seq}/node/1"
        while not node.check(["green_mlops/event/2"]):  # live totals until rank 0's end
            node.set(key, blob(final=False))
            time.sleep(0.05)
        time.sleep(0.5)  # the final measurement takes a moment
        node.set(key, blob(final=True))
        node.add(f"green_mlops/run/{seq}/finals", 1)

    player = threading.Thread(target=play_node, daemon=True)
    player.start()
    deadline = time.monotonic() + 30
    while 1 not in gather.live():  # rank 0 saw the node's live totals
        assert time.monotonic() < deadline
        time.sleep(0.05)
    blobs = gather.close()
    player.join(30)
    assert blobs[1]["final"], "rank 0 gave up on a live node whose clock is behind"
    merged = merge(measurement(50.0).stop(), blobs, job, error=gather.error, final=True)
    assert merged.tags["green.job.partial"] == "false"
    assert "green.problems" not in merged.tags


MASTER = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
time.sleep(600)
"""


def test_a_hung_master_does_not_hold_rank_0s_end_of_run() -> None:
    """The store's host stops answering (a hung machine: the connection stays open, no
    replies): ending rank 0's run still returns within the bounded wait, the run partial."""
    import signal

    import torch.distributed as dist

    master = subprocess.Popen([sys.executable, "-c", MASTER], stdout=subprocess.PIPE, text=True)
    try:
        assert master.stdout is not None
        port = int(master.stdout.readline())

        def client() -> Any:
            return dist.TCPStore(
                "127.0.0.1",
                port,
                is_master=False,
                timeout=timedelta(seconds=20),
                wait_for_workers=False,
            )

        job = Job("torchrun", rank=0, local_rank=0, world_size=2, node_rank=0, nodes=2)
        gather = RunGather(job, interval_s=0.5, store_factory=client, wait_s=2.0).open()
        assert gather._opened.wait(30) and gather.seq is not None
        os.kill(master.pid, signal.SIGSTOP)
        began = time.monotonic()
        blobs = gather.close()
        assert time.monotonic() - began < 2.0 + 1.0
        merged = merge(measurement(50.0).stop(), blobs, job, error=gather.error, final=True)
        assert merged.tags["green.job.partial"] == "true"
        assert "node 1 never reported" in merged.tags["green.problems"]
    finally:
        master.kill()
        master.wait()


def test_a_process_with_the_same_local_rank_does_not_measure_the_node_twice(
    store_client: Callable[[], Any],
) -> None:
    """A process started by a rank (an evaluation script, a tool) inherits its launcher's
    environment, local rank included: the node is still measured by one process only."""
    job = Job("torchrun", rank=2, local_rank=0, node_rank=1, nodes=2)
    agents = [
        NodeAgent(
            job,
            lambda: measurement(80.0),
            interval_s=0.5,
            location="DE",
            store_factory=store_client,
        )
        for _ in range(2)
    ]
    for agent in agents:
        agent.start()
    assert all(agent.ready.wait(30) for agent in agents)
    measuring = [agent for agent in agents if agent.measurement is not None]
    assert len(measuring) == 1
    measuring[0].measurement.close()
