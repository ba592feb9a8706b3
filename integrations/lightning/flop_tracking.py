"""FLOPs of a Lightning stage: counted once per batch shape, scaled beyond, and the MFU peak.

See docs/energy-monitor.md ("FLOPs" and "MFU") for the method.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

from green_mlops.flops import FlopCountError, LiveCount, count_flops, signature
from green_mlops.flops_peaks import compute_dtype, find_peak, peak_flops
from green_mlops.units import J_PER_KWH, clip

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["FLOP_RATES", "FlopTracker", "counted_here", "elements", "flop_metrics", "is_flop_total"]

#: Rates derived from FLOPs and the totals.
FLOP_RATES = frozenset({"green/mfu", "green/flops_per_s", "green/flops_per_joule"})
_STEPS = {
    "train": "training_step",
    "validation": "validation_step",
    "sanity_check": "validation_step",
    "test": "test_step",
    "predict": "predict_step",
}
_MISSING: Any = object()


def is_flop_total(key: str) -> bool:
    return key == "green/flops" or key.endswith("_flops")


def counted_here(key: str) -> bool:
    """Totals the callback counts itself (FLOPs), not the measurement it shares."""
    return is_flop_total(key) or key.endswith("_batches")


class FlopTracker:
    """The FLOPs of one stage, by phase, with how they were obtained (for the tags).

    ``methods`` is the callback's set of counting methods (every stage's, checkpointed): this
    tracker adds to it. ``live``: count the first step of each batch shape as it runs (no copy,
    no extra step); False counts on a meta-device copy of the module (one extra step per shape).
    """

    def __init__(self, max_signatures: int, *, methods: set[str], live: bool = True) -> None:
        self.max_signatures = max_signatures
        self.methods = methods
        self.live = live
        #: FLOPs per phase (``train``, ``validation``, ...).
        self.by_phase: dict[str, float] = {}
        self.counted = 0
        self.uncounted = 0
        self.scaled = 0
        self.problems: dict[str, None] = {}
        self.uncounted_ops: set[str] = set()
        #: Dense peak FLOP/s of this process's device (None: unknown), and how it was found.
        self.peak: float | None = None
        self.peak_text = ""
        self._cache: dict[tuple[str, Hashable], int | None] = {}
        #: The step being counted live: (counter, cache key, phase, kind, batch elements).
        self._live: tuple[LiveCount, Any, str, str, float] | None = None
        self._per_element: dict[str, tuple[float, float]] = {}
        self._trainable: int | None = None

    @property
    def total(self) -> float:
        return sum(self.by_phase.values())

    def add(self, phase: str, flops: float, method: str) -> None:
        """Credit ``flops`` given by the user (the module's ``flops_per_batch``)."""
        self.by_phase[phase] = self.by_phase.get(phase, 0.0) + flops
        self.counted += 1
        self.methods.add(method)

    def check_trainable(self, pl_module: pl.LightningModule) -> None:
        """(Un)freezing parameters changes the backward FLOPs: recount training shapes."""
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if trainable != self._trainable:
            self._trainable = trainable
            for key in [k for k in self._cache if k[0] == "train"]:
                del self._cache[key]

    def count(
        self,
        pl_module: pl.LightningModule,
        batch: Any,
        phase: str,
        kind: str,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Add the batch's FLOPs (counted once per signature). Never raises."""
        try:
            key = (kind, signature(batch))
            flops = self._cache.get(key, _MISSING)
            if flops is _MISSING:
                if sum(1 for k in self._cache if k[0] == kind) >= self.max_signatures:
                    self._count_scaled(batch, phase, kind)
                    return
                if self._live is None and self.live:
                    # count the real step as it runs (ended in the batch-end hook): no copy
                    self._live = (LiveCount(), key, phase, kind, elements(batch))
                    return
                flops = self._count_new(pl_module, batch, phase, kind, batch_idx, dataloader_idx)
                self._record(key, kind, flops, elements(batch))
            if flops is None:
                self.uncounted += 1
            else:
                self.by_phase[phase] = self.by_phase.get(phase, 0.0) + flops
                self.counted += 1
        except Exception as exc:  # never raise into training
            self.uncounted += 1
            self.problems[f"{type(exc).__name__}: {exc}"] = None

    def live_end(self, *, completed: bool = True) -> None:
        """Stop counting the step begun in a batch-start hook; credit it when it completed."""
        live, self._live = self._live, None
        if live is None:
            return
        counter, key, phase, kind, n = live
        try:
            found = counter.stop()
        except Exception as exc:
            self.problems[f"live count: {type(exc).__name__}: {exc}"] = None
            return
        if not completed:
            return  # interrupted step: count the next batch of this shape instead
        self.methods.add(f"{kind}: FlopCounterMode on the real step (first of each shape)")
        self.uncounted_ops.update(found.uncounted_ops)
        self._record(key, kind, found.flops, n)
        self.by_phase[phase] = self.by_phase.get(phase, 0.0) + found.flops
        self.counted += 1

    def set_peak(self, trainer: pl.Trainer) -> None:
        """The dense peak of the device for the Trainer's precision (None when unknown)."""
        root = trainer.strategy.root_device
        dtype = compute_dtype(trainer.precision, float32_matmul_precision=_matmul_precision())
        if root.type != "cuda":
            self.peak, self.peak_text = None, f"not reported: no dense peak for a {root.type}"
            return
        import torch

        name = torch.cuda.get_device_name(root)
        peak = peak_flops(name, dtype) if dtype else None
        figure = find_peak(name)
        if peak is None:
            why = "device not in the peak table" if figure is None else f"no {dtype} figure"
            self.peak_text = (
                f"not reported: {why} ({name}, precision {trainer.precision}); "
                "see green_mlops.flops_peaks.DENSE_PEAKS"
            )
        else:
            assert figure is not None
            self.peak_text = f"{name}: {dtype} dense peak {peak / 1e12:g} TFLOP/s ({figure.source})"
        self.peak = peak

    def additive(self, loop_s: float) -> dict[str, float]:
        """This process's FLOP totals for the cross-rank sum (``loop_s``: its training time)."""
        values = {f"green/phase/{phase}_flops": flops for phase, flops in self.by_phase.items()}
        values["green/flops"] = self.total
        values["_counted_batches"] = float(self.counted)
        values["_uncounted_batches"] = float(self.uncounted)
        values["_peak_x_s"] = (self.peak or 0.0) * loop_s
        values["_peak_unknown"] = 0.0 if self.peak else 1.0
        return values

    def tags(self, *, enabled: bool) -> dict[str, str]:
        """``green.flops.*`` and ``green.mfu``: how the FLOPs and the MFU were obtained."""
        methods = sorted(self.methods) or (["off (count_flops=False)"] if not enabled else ["none"])
        tags = {
            "green.flops.method": "; ".join(methods)
            + " (FlopCounterMode counts matmul, convolution and attention; other ops count 0)",
            "green.mfu": self.peak_text or "not reported",
        }
        problems = list(self.problems)
        if self.uncounted:
            problems.insert(0, f"{self.uncounted} batch(es) of this stage not counted")
        if problems:
            tags["green.flops.uncounted"] = clip("; ".join(problems))
        if self.scaled:
            tags["green.flops.scaled"] = (
                f"{self.scaled} batch(es) with more than {self.max_signatures} distinct "
                "shapes: FLOPs scaled from counted shapes by the number of input elements"
            )
        if self.uncounted_ops:
            tags["green.flops.uncounted_ops"] = clip(
                ", ".join(sorted(self.uncounted_ops)) + ": custom ops, counted as 0 FLOPs"
            )
        return tags

    def _record(self, key: Any, kind: str, flops: int | None, n: float) -> None:
        self._cache[key] = flops
        if flops is not None:
            total, seen = self._per_element.get(kind, (0.0, 0.0))
            self._per_element[kind] = (total + flops, seen + n)

    def _count_new(
        self,
        pl_module: pl.LightningModule,
        batch: Any,
        phase: str,
        kind: str,
        batch_idx: int,
        dataloader_idx: int,
    ) -> int | None:
        name = _STEPS[phase]

        def step(module: Any, moved: Any) -> Any:
            if hasattr(module, "_device"):  # LightningModule.device follows the copy
                module._device = next(
                    (p.device for p in module.parameters()), getattr(module, "_device", None)
                )
            args = (moved, batch_idx) if dataloader_idx == 0 else (moved, batch_idx, dataloader_idx)
            return getattr(module, name)(*args)

        try:
            found = count_flops(pl_module, step, batch, backward=kind == "train")
        except FlopCountError as exc:
            self.problems[f"{name}: {exc}"] = None
            return None
        method = "meta-device copy" if found.method == "meta" else "CPU copy with the real batch"
        self.methods.add(f"{name}: FlopCounterMode on a {method}")
        self.uncounted_ops.update(found.uncounted_ops)
        return found.flops

    def _count_scaled(self, batch: Any, phase: str, kind: str) -> None:
        total, seen = self._per_element.get(kind, (0.0, 0.0))
        if seen <= 0:
            self.uncounted += 1
            return
        self.by_phase[phase] = self.by_phase.get(phase, 0.0) + total / seen * elements(batch)
        self.counted += 1
        self.scaled += 1


def flop_metrics(additive: Mapping[str, float]) -> dict[str, float]:
    """FLOP metrics from additive totals (summed over ranks and stages); none when nothing
    was counted. MFU only when every rank's device peak is known."""
    if additive.get("_counted_batches", 0) <= 0:
        return {}
    out = {k: v for k, v in additive.items() if k.startswith("green/") and is_flop_total(k)}
    flops = additive.get("green/flops", 0.0)
    train_flops = additive.get("green/phase/train_flops", 0.0)
    kwh = additive.get("green/energy_kwh", 0.0)
    if kwh > 0:
        out["green/flops_per_joule"] = flops / (kwh * J_PER_KWH)
    loop_s = additive.get("_train_loop_s", 0.0)
    if train_flops > 0 and loop_s > 0:
        out["green/flops_per_s"] = train_flops / loop_s
        peak_s = additive.get("_peak_x_s", 0.0)
        if peak_s > 0 and additive.get("_peak_unknown", 0.0) == 0:
            out["green/mfu"] = train_flops / peak_s
    return out


def elements(batch: Any) -> int:
    """Number of tensor elements in a batch (nested lists, tuples and mappings)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, (list, tuple)):
        return sum(elements(item) for item in batch)
    if isinstance(batch, Mapping):
        return sum(elements(item) for item in batch.values())
    return 0


def _matmul_precision() -> str:
    import torch

    return str(torch.get_float32_matmul_precision())
