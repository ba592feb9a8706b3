"""Which process of a distributed Lightning job measures what, and its totals summed over ranks.

See docs/energy-monitor.md ("Distributed runs") for the rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from green_mlops import job
from green_mlops.integrations.lightning.flop_tracking import (
    FlopTracker,
    flop_metrics,
    is_flop_total,
)
from green_mlops.log import warn_once
from green_mlops.meters import Component, Device, Meter, MeterUnavailable, Readings
from green_mlops.nodes import MAX_NODE_BREAKDOWN
from green_mlops.session import Measurement, Result

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "GATHERED_BY",
    "RunTotals",
    "assign_devices",
    "derive",
    "epoch_share",
    "gpu_identity",
    "join_job",
    "local_values",
    "rank0_only",
    "sum_over_ranks",
]


#: ``green.job.gathered_by`` of a run whose ranks' totals this callback sums (a collective): the
#: MLflow plugin then does not gather the nodes' totals into it a second time.
GATHERED_BY = "collective"
#: The per-node breakdown: ``green/node/<n>/<key>`` (the first MAX_NODE_BREAKDOWN nodes, then
#: ``green/node/rest/``), as the MLflow plugin's.
_NODE_KEYS = (
    "green/energy_kwh",
    "green/co2e_g",
    *(f"green/energy/{c.value}_kwh" for c in Component),
)


def join_job(trainer: pl.Trainer) -> None:
    """This process's runs hold every rank's totals (a multi-process fit sums them): the
    "only this node is measured" note is not given. Call in ``setup``, before any meter."""
    if trainer.world_size > 1:
        job.set_gathered(True)


class _Subset(Meter):
    """A meter restricted to some of its devices (the others are read but not counted)."""

    def __init__(self, inner: Meter, devices: Sequence[Device]) -> None:
        super().__init__(list(devices))
        self.inner = inner
        self.name = inner.name
        self.max_interval_s = inner.max_interval_s

    def start(self) -> None:
        self.inner.start()

    def sample(self, now: float) -> Readings:
        return self.inner.sample(now)

    def close(self) -> None:
        self.inner.close()

    def notes(self) -> list[str]:
        return self.inner.notes()


def assign_devices(
    offers: Sequence[Meter | MeterUnavailable],
    *,
    local_rank: int,
    gpu_index: int | None = None,
    gpu_uuid: str | None = None,
) -> list[Meter | MeterUnavailable]:
    """The offers restricted to the devices this process measures in a multi-process run.

    A process training on CUDA device ``gpu_index`` measures that GPU: the device whose label
    holds ``gpu_uuid``, else the ``gpu_index``-th GPU device of its meter (NVML lists GPUs in
    ``CUDA_VISIBLE_DEVICES`` order). Node devices (CPU, RAM, other, and GPUs of a process that
    does not train on a GPU) are measured by local rank 0 only. Unavailable meters are kept for
    provenance.
    """
    kept: list[Meter | MeterUnavailable] = []
    for offer in offers:
        if isinstance(offer, MeterUnavailable):
            kept.append(offer)
            continue
        gpus = [d for d in offer.devices if d.component is Component.GPU]
        devices = []
        for device in offer.devices:
            if device.component is Component.GPU and gpu_index is not None:
                if gpu_uuid and any(gpu_uuid in g.label for g in gpus):
                    mine = gpu_uuid in device.label
                else:
                    mine = gpus.index(device) == gpu_index
            else:
                mine = job.Job(local_rank=local_rank).measures_node  # the node's one measurer
            if mine:
                devices.append(device)
        if len(devices) == len(offer.devices):
            kept.append(offer)
        elif devices:
            kept.append(_Subset(offer, devices))
    return kept


def gpu_identity(trainer: pl.Trainer) -> tuple[int | None, str | None]:
    """(CUDA index, UUID) of the GPU this process trains on; (None, None) off CUDA."""
    root = trainer.strategy.root_device
    if root.type != "cuda":
        return None, None
    import torch

    index = root.index if root.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:
        uuid = None
    return index, uuid or None


def rank0_only(key: str) -> bool:
    """Durations: every rank lives through the same wall-clock time; rank 0's is reported."""
    return key.endswith("_s") and key != "_peak_x_s"


def local_values(
    result: Result,
    flops: FlopTracker,
    *,
    rank: int,
    zero_embodied: bool,
    exclude: Mapping[str, float],
) -> dict[str, float]:
    """This process's additive numbers of a stage (before the cross-rank sum).

    The intensity becomes intensity x kWh (summed, then divided by the summed kWh); with
    ``zero_embodied`` the machine's embodied carbon is left to the node leader; ``exclude``
    is subtracted (what was already handed to a shared measurement); durations are rank 0's.
    """
    values = dict(result.metrics)
    values.pop("green/intensity_g_per_kwh", None)
    intensity = result.metrics.get("green/intensity_g_per_kwh")
    if intensity is not None:
        values["_intensity_x_kwh"] = intensity * result.metrics.get("green/energy_kwh", 0.0)
    if zero_embodied and "green/embodied_g" in values:  # the machine's figure: node leader's
        embodied = values.pop("green/embodied_g")
        fp = result.footprint
        for key in [k for k in values if k.startswith("green/sci_g_per_")]:
            units = getattr(fp, "functional_units", None) or 1.0
            values[key] -= embodied / units
    for key, value in exclude.items():
        if key in values:
            values[key] -= value
    loop_s = result.metrics.get("green/phase/train_s", 0.0)
    loop_s += result.metrics.get("green/phase/data_wait_s", 0.0)
    values.update(flops.additive(loop_s))
    values["_train_loop_s"] = loop_s
    if rank != 0:
        for key in [k for k in values if rank0_only(k)]:
            values[key] = 0.0
    return values


def hand_over(
    stage: Mapping[str, float], local: Mapping[str, float], base: Mapping[str, float]
) -> dict[str, float]:
    """What a shared measurement (rank 0's) cannot see of the totals: the other ranks' share
    of this stage and the earlier stages' (and a checkpoint's) totals; durations are its own."""
    return {
        k: stage.get(k, 0.0) - local.get(k, 0.0) + base.get(k, 0.0)
        for k in set(stage) | set(base)
        if k.startswith("green/") and not rank0_only(k)
    }


class RunTotals:
    """A run's additive totals: the earlier stages' (and a resumed checkpoint's) plus the
    running stage's, summed over ranks.

    Rank 0 of a stage measured by another integration (the MLflow plugin, whose measurement
    logs the totals) hands that measurement what it cannot see in its ``offsets``: the other
    ranks' numbers and the earlier totals.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        #: The keys summed across ranks, in one order on every rank.
        self.keys = tuple(keys)
        #: Totals of the earlier stages (and of the checkpoint a run resumed from).
        self.base: dict[str, float] = {}
        #: Latest totals: ``base`` + the running stage, summed over ranks.
        self.latest: dict[str, float] = {}
        self._shared: Measurement | None = None
        self._owner_offsets: dict[str, float] = {}
        self._pushed: dict[str, float] = {}

    def restore(self, totals: Mapping[str, float]) -> None:
        """Continue from ``totals`` (a checkpoint's)."""
        self.base = {str(k): float(v) for k, v in totals.items()}
        self.latest = dict(self.base)

    def share(self, measurement: Measurement) -> None:
        """The running stage's totals come from ``measurement``, another integration's (which
        then leaves the summing over ranks and nodes to this callback)."""
        measurement.extra_tags["green.job.gathered_by"] = GATHERED_BY
        self._shared = measurement
        self._owner_offsets = dict(measurement.offsets)

    def update(
        self,
        trainer: pl.Trainer,
        result: Result | None,
        flops: FlopTracker,
        *,
        rank: int,
        zero_embodied: bool,
        collective: bool,
    ) -> dict[str, float]:
        """The run totals with the running stage's ``result`` (this process's), summed over
        ranks if ``collective``: then every rank must call it at the same points, and it always
        takes part in the reduction, whatever went wrong locally."""
        local: dict[str, float] = {}
        try:
            if result is not None:
                exclude = self._pushed if self._shared is not None else {}
                local = local_values(
                    result, flops, rank=rank, zero_embodied=zero_embodied, exclude=exclude
                )
        except Exception as exc:
            warn_once(f"EnergyMonitor could not read this process's totals: {exc}")
        stage = sum_over_ranks(trainer, local, self.keys, collective=collective)
        if self._shared is not None:
            pushed = hand_over(stage, local, self.base)
            for key, value in pushed.items():
                self._shared.offsets[key] = self._owner_offsets.get(key, 0.0) + value
            self._pushed = {k: v for k, v in pushed.items() if v}
        totals = dict(self.base)
        for key, value in stage.items():
            totals[key] = totals.get(key, 0.0) + value
        self.latest = totals
        return totals

    def end_stage(self) -> None:
        """The latest totals become the base of the next stage."""
        self.base = dict(self.latest)
        self._shared = None
        self._owner_offsets = {}
        self._pushed = {}


def sum_over_ranks(
    trainer: pl.Trainer, local: Mapping[str, float], keys: Sequence[str], *, collective: bool
) -> dict[str, float]:
    """``local``'s ``keys`` summed over the ranks (a collective when ``collective`` and the
    job has several processes: every rank must call it at the same point). A key is kept
    when some rank reported it."""
    vector = [local.get(k, 0.0) for k in keys] + [1.0 if k in local else 0.0 for k in keys]
    nodes = int(getattr(trainer, "num_nodes", 1) or 1) if collective else 1
    slots = min(nodes, MAX_NODE_BREAKDOWN) + (nodes > MAX_NODE_BREAKDOWN)
    if nodes > 1:  # this rank's numbers in its node's slot: the per-node breakdown
        mine = min(int(trainer.node_rank), MAX_NODE_BREAKDOWN)
        for slot in range(slots):
            vector += [local.get(k, 0.0) if slot == mine else 0.0 for k in _NODE_KEYS]
    if collective and trainer.world_size > 1:
        vector = _reduce(trainer, vector)
    n = len(keys)
    out = {k: vector[i] for i, k in enumerate(keys) if vector[n + i] > 0}
    if nodes > 1:
        for slot in range(slots):
            name = "rest" if slot == MAX_NODE_BREAKDOWN else str(slot)
            for i, key in enumerate(_NODE_KEYS):
                if key in out:
                    node_key = f"green/node/{name}/{key.removeprefix('green/')}"
                    out[node_key] = vector[2 * n + slot * len(_NODE_KEYS) + i]
    return out


def derive(additive: Mapping[str, float], phases: Iterable[str]) -> dict[str, float]:
    """The metrics to log from additive totals (summed over ranks and segments)."""
    out = {k: v for k, v in additive.items() if not k.startswith("_") and not is_flop_total(k)}
    kwh = additive.get("green/energy_kwh", 0.0)
    if additive.get("_intensity_x_kwh") and kwh > 0:
        out["green/intensity_g_per_kwh"] = additive["_intensity_x_kwh"] / kwh
    co2e = additive.get("green/co2e_g")
    if co2e is not None and kwh > 0:
        for p in phases:
            phase_kwh = additive.get(f"green/phase/{p}_kwh")
            if phase_kwh is not None:
                out[f"green/phase/{p}_co2e_g"] = co2e * phase_kwh / kwh
    out.update(flop_metrics(additive))
    return out


def epoch_share(metrics: Mapping[str, float], mark: Mapping[str, float]) -> dict[str, float]:
    """``green/epoch/...``: the growth of a few totals since ``mark`` (the previous epoch's)."""
    keys = ["green/energy_kwh", "green/co2e_g", "green/flops"]
    keys += [f"green/phase/{p}_kwh" for p in ("train", "validation", "data_wait")]
    return {
        f"green/epoch/{key.removeprefix('green/')}": metrics[key] - mark.get(key, 0)
        for key in keys
        if key in metrics
    }


def _reduce(trainer: pl.Trainer, vector: list[float]) -> list[float]:
    import torch

    tensor = torch.tensor(vector, dtype=torch.float64, device=trainer.strategy.root_device)
    reduced = trainer.strategy.reduce(tensor, reduce_op="sum")
    return [float(v) for v in reduced.cpu().tolist()]
