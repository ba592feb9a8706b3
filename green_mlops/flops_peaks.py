"""Dense peak FLOP/s of accelerators, from NVIDIA's datasheets, for model FLOPs utilisation.

Dense means without 2:4 sparsity: where a datasheet gives only the sparse figure ("with
sparsity"), the dense one is half of it, as its footnotes state. See docs/flops.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DENSE_PEAKS", "PeakFigure", "compute_dtype", "find_peak", "peak_flops"]

T = 1e12


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
