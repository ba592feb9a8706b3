"""FLOPs of a model step, and the dense peak FLOP/s of accelerators (for MFU).

Counting: :func:`count_flops` runs one step of a *copy* of a ``torch.nn.Module`` under
``torch.utils.flop_counter.FlopCounterMode``, first on the ``meta`` device (no memory, no
compute: the copy's parameters are meta tensors made without copying a byte), and, when the step
cannot run on meta (``.item()``, data-dependent shapes, tensors created on a real device inside
the step), on a CPU copy with the real batch, under ``torch.random.fork_rng`` so that the global
RNG is left as it was. The real module, its gradients, the optimizer and the RNG are never
touched. What is counted is what ``FlopCounterMode`` counts: matrix multiplications,
convolutions and attention, forward and (for training) backward, exactly as autograd runs them
(e.g. no input-gradient matmul for a first layer whose input does not require grad).
Elementwise ops, normalisations and reductions count 0, and so do custom (non-``aten``) ops,
which :class:`FlopCount` lists in ``uncounted_ops`` so that a report can say so.

Peaks: :data:`DENSE_PEAKS` holds dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's own
datasheets. Where a datasheet gives only the sparse figure (marked "with sparsity"), the dense
figure is half of it, as the datasheets' footnotes state. Model FLOPs utilisation (MFU) is
achieved model FLOP/s divided by the sum of the devices' dense peaks for the compute dtype.

torch is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DENSE_PEAKS",
    "FlopCount",
    "FlopCountError",
    "LiveCount",
    "PeakFigure",
    "compute_dtype",
    "count_flops",
    "default_loss",
    "find_peak",
    "peak_flops",
    "signature",
]

T = 1e12

#: Largest module (parameters + buffers, bytes) copied to the CPU to count FLOPs with the real
#: batch when the meta device fails and the module does not already live on the CPU.
CPU_COPY_MAX_BYTES = 256 * 2**20


# --- dense peaks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakFigure:
    """Dense peak FLOP/s of one accelerator model, per compute dtype."""

    model: str
    #: dtype key (``fp64``, ``fp32``, ``tf32``, ``bf16``, ``fp16``, ``fp8``, ``int8``) -> FLOP/s.
    flops: Mapping[str, float]
    source: str


def _hopper(
    model: str, fp64: float, tf32_sparse: float, bf16_sparse: float, src: str
) -> PeakFigure:
    return PeakFigure(
        model,
        {
            "fp64": fp64 * T,  # FP64 Tensor Core
            "fp32": fp64 * T,  # the datasheets give FP32 = FP64 Tensor Core on Hopper
            "tf32": tf32_sparse / 2 * T,
            "bf16": bf16_sparse / 2 * T,
            "fp16": bf16_sparse / 2 * T,
            "fp8": bf16_sparse * T,  # FP8 sparse = 2 x BF16 sparse; dense = half of that
            "int8": bf16_sparse * T,
        },
        src,
    )


_H100_DS = (
    "NVIDIA H100 Tensor Core GPU datasheet (Hopper), table 'Technical Specifications', "
    "'* With sparsity' figures halved"
)
_H100_PCIE_DS = (
    "NVIDIA H100 Tensor Core GPU datasheet, 2022 edition (H100 SXM / H100 PCIe), "
    "'* With sparsity' figures halved"
)
_H200_DS = (
    "NVIDIA H200 Tensor Core GPU datasheet, table 'Technical Specifications' (H200 SXM / "
    "H200 NVL), '* With sparsity' figures halved"
)

#: (regular expression on the lower-cased device name, figure), first match wins. Names as
#: NVML and ``torch.cuda.get_device_name`` give them: "NVIDIA H100 80GB HBM3" (SXM5),
#: "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
#: "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA L4", "Tesla V100-SXM2-16GB", ...
#: Not listed (no NVIDIA datasheet figure we could check): A10G, H800, H20, Blackwell parts.
DENSE_PEAKS: tuple[tuple[str, PeakFigure], ...] = (
    (r"\bh100\b.*\bpcie\b", _hopper("NVIDIA H100 PCIe", 51, 756, 1513, _H100_PCIE_DS)),
    (r"\bh100\b.*\bnvl\b", _hopper("NVIDIA H100 NVL", 60, 835, 1671, _H100_DS)),
    (r"\bh100\b", _hopper("NVIDIA H100 SXM", 67, 989, 1979, _H100_DS)),
    (r"\bh200\b.*\bnvl\b", _hopper("NVIDIA H200 NVL", 60, 835, 1671, _H200_DS)),
    (r"\bh200\b", _hopper("NVIDIA H200 SXM", 67, 989, 1979, _H200_DS)),
    (
        r"\bgh200\b",
        _hopper(
            "NVIDIA GH200 (Hopper GPU)",
            67,
            989,
            1979,
            "NVIDIA GH200 Grace Hopper Superchip datasheet, GPU figures, "
            "'* With sparsity' figures halved",
        ),
    ),
    (
        r"\ba100\b",
        PeakFigure(
            "NVIDIA A100",
            {
                "fp64": 19.5 * T,
                "fp32": 19.5 * T,
                "tf32": 156 * T,
                "bf16": 312 * T,
                "fp16": 312 * T,
                "int8": 624 * T,
            },
            "NVIDIA A100 Tensor Core GPU datasheet (same figures for SXM and PCIe, 40 and "
            "80 GB), dense figures (without '*')",
        ),
    ),
    (
        r"\bl40s\b",
        PeakFigure(
            "NVIDIA L40S",
            {
                "fp32": 91.6 * T,
                "tf32": 183 * T,
                "bf16": 362.05 * T,
                "fp16": 362.05 * T,
                "fp8": 733 * T,
            },
            "NVIDIA L40S datasheet, dense figures (without '*')",
        ),
    ),
    (
        r"\bl40\b",
        PeakFigure(
            "NVIDIA L40",
            {
                "fp32": 90.5 * T,
                "tf32": 90.5 * T,
                "bf16": 181.05 * T,
                "fp16": 181.05 * T,
                "fp8": 362 * T,
                "int8": 362 * T,
            },
            "NVIDIA L40 datasheet, dense figures (without '*')",
        ),
    ),
    (
        r"\bl4\b",
        PeakFigure(
            "NVIDIA L4",
            {
                "fp32": 30.3 * T,
                "tf32": 60 * T,
                "bf16": 121 * T,
                "fp16": 121 * T,
                "fp8": 242.5 * T,
                "int8": 242.5 * T,
            },
            "NVIDIA L4 Tensor Core GPU datasheet, '* With sparsity' figures halved",
        ),
    ),
    (
        r"\ba10\b",
        PeakFigure(
            "NVIDIA A10",
            {
                "fp32": 31.2 * T,
                "tf32": 62.5 * T,
                "bf16": 125 * T,
                "fp16": 125 * T,
                "int8": 250 * T,
            },
            "NVIDIA A10 Tensor Core GPU datasheet, dense figures (without '*')",
        ),
    ),
    (
        r"\bv100\b.*\bpcie\b",
        PeakFigure(
            "NVIDIA V100 PCIe",
            {"fp64": 7 * T, "fp32": 14 * T, "fp16": 112 * T},
            "NVIDIA Tesla V100 datasheet (PCIe column; 'Tensor Performance' for fp16)",
        ),
    ),
    (
        r"\bv100\b",
        PeakFigure(
            "NVIDIA V100 SXM2",
            {"fp64": 7.8 * T, "fp32": 15.7 * T, "fp16": 125 * T},
            "NVIDIA Tesla V100 datasheet (SXM2 column; 'Tensor Performance' for fp16)",
        ),
    ),
    (
        r"\bt4\b",
        PeakFigure(
            "NVIDIA T4",
            {"fp32": 8.1 * T, "fp16": 65 * T, "int8": 130 * T},
            "NVIDIA T4 Tensor Core GPU datasheet ('Mixed Precision (FP16/FP32)' for fp16)",
        ),
    ),
)

_COMPILED = tuple((re.compile(pattern), figure) for pattern, figure in DENSE_PEAKS)


def find_peak(device_name: str) -> PeakFigure | None:
    """The peak figure for a device name (NVML's or ``torch.cuda.get_device_name``'s)."""
    name = device_name.lower()
    for pattern, figure in _COMPILED:
        if pattern.search(name):
            return figure
    return None


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of ``device_name`` for ``dtype`` (see :func:`compute_dtype`).

    ``tf32`` falls back to ``fp32`` on devices without TF32 (pre-Ampere). ``None`` when the
    device or the dtype is not in the table.
    """
    figure = find_peak(device_name)
    if figure is None:
        return None
    value = figure.flops.get(dtype)
    if value is None and dtype == "tf32":
        value = figure.flops.get("fp32")
    return value


def compute_dtype(precision: str | int, *, float32_matmul_precision: str = "highest") -> str | None:
    """The dtype key of Lightning's ``Trainer(precision=...)`` for the peak table.

    ``32-true`` is ``tf32`` unless ``torch.get_float32_matmul_precision()`` is ``highest``.
    ``None`` for precisions whose matmul dtype is not known here (e.g. transformer-engine).
    """
    text = str(precision).lower()
    if text.startswith("bf16"):
        return "bf16"
    if text in {"16", "16-mixed", "16-true"}:
        return "fp16"
    if text in {"32", "32-true"}:
        return "fp32" if float32_matmul_precision == "highest" else "tf32"
    if text in {"64", "64-true"}:
        return "fp64"
    return None


# --- counting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one step, and how they were counted."""

    flops: int
    #: ``live`` (the real step, counted as it ran), ``meta`` (a meta-device copy) or
    #: ``cpu-copy`` (a CPU copy run on the real batch).
    method: str
    #: Custom (non-aten) ops that ran during the step: their FLOPs are not in :attr:`flops`.
    uncounted_ops: tuple[str, ...] = ()
    #: Why the meta device could not be used, when ``method`` is ``cpu-copy``.
    meta_problem: str = ""


class FlopCountError(Exception):
    """The step's FLOPs could not be counted; the message says why (and what to do)."""


#: Namespaces of ops that are not compute (communication, profiling, primitives).
_NOT_COMPUTE = frozenset({"aten", "prim", "prims", "profiler", "c10d", "_c10d_functional"})

_tensor_type: Any = None


def signature(batch: Any) -> Hashable:
    """A hashable key of a batch's structure: tensors by shape and dtype, containers by
    content, anything else by type. Two batches with equal signatures cost the same FLOPs."""
    global _tensor_type
    if _tensor_type is None:
        import torch

        _tensor_type = torch.Tensor
    if isinstance(batch, _tensor_type):
        return (tuple(batch.shape), batch.dtype)
    if isinstance(batch, (list, tuple)):
        return (type(batch), *(signature(item) for item in batch))
    if isinstance(batch, Mapping):
        return (type(batch), *((key, signature(value)) for key, value in batch.items()))
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return (
            type(batch),
            *((f.name, signature(getattr(batch, f.name))) for f in dataclasses.fields(batch)),
        )
    return (type(batch),)


def default_loss(output: Any) -> torch.Tensor | None:
    """The loss of a step's output, as Lightning reads it: the output itself if it is a tensor,
    ``output["loss"]`` for a mapping; ``None`` (no backward) otherwise."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]  # type: ignore[no-any-return]
    return None


def count_flops(
    module: torch.nn.Module,
    step: Callable[[Any, Any], Any],
    batch: Any,
    *,
    backward: bool,
    loss: Callable[[Any], torch.Tensor | None] = default_loss,
    cpu_copy_max_bytes: int = CPU_COPY_MAX_BYTES,
) -> FlopCount:
    """FLOPs of ``step(copy_of_module, batch)`` (and of the loss's backward if ``backward``).

    The module and batch are copied (meta device first, then CPU; see the module docstring);
    evaluation steps (``backward=False``) run under ``torch.no_grad``. A step whose output has
    no loss (``loss(output) is None``, e.g. Lightning's "skip this batch") counts its forward
    only. Warnings raised by the step on the copy (e.g. ``self.log`` without a trainer) are
    suppressed.

    Raises:
        FlopCountError: neither copy could run the step; the message gives both reasons.
    """
    try:
        flops, uncounted = _run_counted(module, step, batch, "meta", backward=backward, loss=loss)
        return FlopCount(flops, "meta", uncounted)
    except Exception as exc:
        meta_problem = _describe(exc)
    size = _module_bytes(module)
    on_cpu = all(t.device.type == "cpu" for t in _tensors(module))
    if not on_cpu and size > cpu_copy_max_bytes:
        raise FlopCountError(
            f"the step cannot run on the meta device ({meta_problem}), and the module "
            f"({size / 2**20:.0f} MiB) is too large to copy to the CPU: set "
            "`flops_per_batch` on the module"
        )
    import torch

    try:
        with torch.random.fork_rng(devices=[]):
            flops, uncounted = _run_counted(
                module, step, batch, "cpu", backward=backward, loss=loss
            )
    except Exception as exc:
        raise FlopCountError(
            f"the step cannot run on a meta-device copy ({meta_problem}) nor on a CPU copy "
            f"({_describe(exc)}): set `flops_per_batch` on the module"
        ) from None
    return FlopCount(flops, "cpu-copy", uncounted, meta_problem)


class LiveCount:
    """Counts the FLOPs of the real work done in this thread from construction to :meth:`stop`.

    No copy and no extra step: the step that runs anyway is counted as it runs (forward,
    backward and optimizer; elementwise ops count 0). Counting slows that one step down: about
    0.6 of a step for a small MLP on a CPU, less for larger kernels. Always call :meth:`stop`
    (also on an exception), or the counting mode stays active.
    """

    def __init__(self) -> None:
        self._counter = _Counter(display=False)
        self._counter.__enter__()
        self._active = True

    def stop(self) -> FlopCount:
        if self._active:
            self._active = False
            self._counter.__exit__(None, None, None)
        uncounted = tuple(sorted(self._counter.uncounted))
        return FlopCount(int(self._counter.get_total_flops()), "live", uncounted)


def _run_counted(
    module: torch.nn.Module,
    step: Callable[[Any, Any], Any],
    batch: Any,
    device: str,
    *,
    backward: bool,
    loss: Callable[[Any], torch.Tensor | None],
) -> tuple[int, tuple[str, ...]]:
    import torch

    clone = _copy_module(module, device)
    moved = _move(batch, device)
    counter = _Counter(display=False)
    with warnings.catch_warnings(), counter:
        warnings.simplefilter("ignore")
        if backward:
            output = step(clone, moved)
            value = loss(output)
            if value is not None and value.requires_grad:
                (value.sum() if value.ndim else value).backward()  # type: ignore[no-untyped-call]
        else:
            with torch.no_grad():
                step(clone, moved)
    return int(counter.get_total_flops()), tuple(sorted(counter.uncounted))


def _counter_class() -> type:
    from torch.utils.flop_counter import FlopCounterMode

    class Counter(FlopCounterMode):
        """FlopCounterMode that also notes the custom ops it could not count."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.uncounted: set[str] = set()

        def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
            if func_packet not in self.flop_registry:
                name = str(func_packet)
                if name.split(".", 1)[0] not in _NOT_COMPUTE:
                    self.uncounted.add(name)
            return super()._count_flops(func_packet, out, args, kwargs)  # type: ignore[no-untyped-call]

    return Counter


def _Counter(**kwargs: Any) -> Any:
    global _counter_cls
    if _counter_cls is None:
        _counter_cls = _counter_class()
    return _counter_cls(**kwargs)


_counter_cls: type | None = None


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _module_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in _tensors(module):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _copy_module(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """A deep copy whose parameters and buffers are new tensors on ``device``.

    The memo makes ``deepcopy`` use those tensors instead of copying the real ones, so a meta
    copy allocates nothing and a CPU copy copies each tensor once, straight to the CPU.
    Lightning modules drop their trainer reference when copied (``__getstate__``).
    """
    import torch

    memo: dict[int, Any] = {}
    for p in module.parameters():
        if id(p) not in memo:
            data = _to(p.detach(), device)
            memo[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
    for b in module.buffers():
        if id(b) not in memo:
            memo[id(b)] = _to(b.detach(), device)
    clone = copy.deepcopy(module, memo)
    return clone


def _to(t: torch.Tensor, device: str) -> torch.Tensor:
    import torch

    if device == "meta":
        return torch.empty_like(t, device="meta")
    return t.to(device, copy=True)


def _move(batch: Any, device: str) -> Any:
    """The batch on ``device``: tensors copied (the step may modify them in place), containers
    rebuilt, anything else shared."""
    import torch

    if isinstance(batch, torch.Tensor):
        moved = _to(batch.detach(), device)
        return moved.requires_grad_() if batch.requires_grad else moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_move(item, device) for item in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(item, device) for item in batch)
    if isinstance(batch, Mapping):
        with contextlib.suppress(Exception):
            return type(batch)({key: _move(value, device) for key, value in batch.items()})  # type: ignore[call-arg]
        return {key: _move(value, device) for key, value in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: _move(getattr(batch, f.name), device) for f in dataclasses.fields(batch)}
        with contextlib.suppress(Exception):
            return dataclasses.replace(batch, **changes)
    return batch


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 200 else text[:199] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
