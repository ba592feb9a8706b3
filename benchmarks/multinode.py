"""End-of-run aggregation overhead of a multi-node job, on loopback.

    python benchmarks/multinode.py                 # 2, 4, 8 simulated nodes, 15 runs each
    python benchmarks/multinode.py --nodes 2 4 8 16 --runs 25

A real torch.distributed ``TCPStore`` on 127.0.0.1 (as torchrun's agent store), one
:class:`~green_mlops.nodes.NodeAgent` per simulated node other than rank 0's (threads of this
process, each with its own real ``Measurement`` of a constant 100 W counter meter), and rank 0's
:class:`~green_mlops.nodes.RunGather` for each run. Timed per run: ``close()`` (announce the end,
wait for every node's final totals) plus ``merge()`` into rank 0's result: what ending a run adds
in the thread that ends it. The agents share this process (and its GIL) and this machine's
cores, so the figure is an upper bound of a real cluster's, where nodes answer in parallel.

Prints the median and max per node count, the ratio to the 2-node median per added node, and
PASS/FAIL against the targets: < 100 ms at 2 nodes, growth no worse than linear in the nodes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

from green_mlops.job import Job
from green_mlops.meters import Component, Device, Meter, Method, Readings
from green_mlops.nodes import NodeAgent, RunGather, merge
from green_mlops.session import Measurement

TARGET_MS = 100.0
SETTINGS = {"intensity_providers": "static", "location": "DE", "log_interval_s": 0.5}
#: The stores stay up until the process ends (their agents' threads wait on them).
_MASTERS: list[Any] = []


class ConstantMeter(Meter):
    """A 100 W energy counter."""

    name = "constant"
    max_interval_s = 0.1

    def __init__(self) -> None:
        super().__init__([Device("cpu:bench", Component.CPU, Method.COUNTER, 0.02)])
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()

    def sample(self, now: float) -> Readings:
        return {"cpu:bench": 100.0 * (now - self._t0)}


def one_size(nodes: int, runs: int) -> list[float]:
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    _MASTERS.append(master)
    port = master.port

    def client() -> Any:
        return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))

    agents = []
    for node in range(1, nodes):
        job = Job("bench", rank=node, local_rank=0, world_size=nodes, node_rank=node, nodes=nodes)
        agent = NodeAgent(
            job,
            lambda: Measurement(SETTINGS, meters=[ConstantMeter()]).start(),
            interval_s=0.5,
            location="DE",
            store_factory=client,
        )
        agent.start()
        agents.append(agent)
    for agent in agents:
        agent.ready.wait(60)
    rank0 = Job("bench", rank=0, local_rank=0, world_size=nodes, node_rank=0, nodes=nodes)
    own = Measurement(SETTINGS, meters=[ConstantMeter()]).start()
    times = []
    for _ in range(runs + 1):  # the first is a warm-up
        gather = RunGather(rank0, interval_s=0.5, store_factory=client).open()
        deadline = time.monotonic() + 30
        while len(gather.live()) < nodes - 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # every node answered once: a run in progress
        result = own.result()
        began = time.perf_counter()
        blobs = gather.close()
        merged = merge(result, blobs, rank0, final=True)
        times.append((time.perf_counter() - began) * 1000)
        assert merged.tags["green.job.nodes_reported"] == str(nodes), merged.tags
    own.close()
    return times[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    medians: dict[int, float] = {}
    print(f"{'nodes':>5}  {'median ms':>9}  {'max ms':>7}  {'per extra node ms':>17}")
    for nodes in args.nodes:
        times = one_size(nodes, args.runs)
        medians[nodes] = statistics.median(times)
        extra = (medians[nodes] - medians[args.nodes[0]]) / max(1, nodes - args.nodes[0])
        print(f"{nodes:>5}  {medians[nodes]:>9.1f}  {max(times):>7.1f}  {extra:>17.2f}")
    first, last = args.nodes[0], args.nodes[-1]
    ok_small = medians.get(2, medians[first]) < TARGET_MS
    linear = medians[last] <= medians[first] * last / first * 1.1 + 5.0
    print(
        f"{'PASS' if ok_small else 'FAIL'}: {medians.get(2, medians[first]):.1f} ms at 2 nodes "
        f"(target < {TARGET_MS:.0f} ms)"
    )
    print(
        f"{'PASS' if linear else 'FAIL'}: {medians[last]:.1f} ms at {last} nodes vs "
        f"{medians[first]:.1f} ms x {last}/{first} (no worse than linear)"
    )
    return 0 if ok_small and linear else 1


if __name__ == "__main__":
    sys.exit(main())
