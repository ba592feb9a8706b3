"""FLOP counting (green_mlops.flops) against counts computed by hand, and the dense-peak table.

Hand counts follow torch's FlopCounterMode exactly: a matmul (m x k) @ (k x n) is 2mkn FLOPs;
backward computes a layer's weight gradient (same cost as its forward) and its input gradient
only when the input requires grad; bias gradients, activations and losses count 0.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import pytest
import torch

from green_mlops.flops import FlopCountError, count_flops, default_loss, signature
from green_mlops.flops_peaks import DENSE_PEAKS, compute_dtype, find_peak, peak_flops

B, IN, H, OUT = 16, 8, 32, 4


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, H), torch.nn.ReLU(), torch.nn.Linear(H, OUT))


def forward(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return module(batch)  # type: ignore[no-any-return]


def loss_step(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(module(x), y)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, IN), torch.randint(0, OUT, (B,))


FWD = 2 * B * IN * H + 2 * B * H * OUT


def test_linear_forward_is_2_in_out_batch() -> None:
    found = count_flops(mlp(), forward, torch.randn(B, IN), backward=False)
    assert found.flops == FWD
    assert found.method == "meta"
    assert found.uncounted_ops == ()


def test_training_step_counts_backward_as_autograd_runs_it() -> None:
    found = count_flops(mlp(), loss_step, batch(), backward=True)
    # backward: layer 2 input grad + layer 2 weight grad + layer 1 weight grad; no layer-1
    # input grad because the batch does not require grad.
    backward = 2 * B * H * OUT + 2 * B * H * OUT + 2 * B * IN * H
    assert found.flops == FWD + backward
    assert found.flops < 3 * FWD  # the "3x forward" rule overcounts the first layer


def test_input_that_requires_grad_adds_the_first_layers_input_gradient() -> None:
    x = torch.randn(B, IN, requires_grad=True)
    found = count_flops(mlp(), lambda m, b: m(b).sum(), x, backward=True)
    assert found.flops == 3 * FWD
    assert x.grad is None  # the real batch is never touched


def test_frozen_first_layer_has_no_gradient_matmuls_of_its_own() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    found = count_flops(model, loss_step, batch(), backward=True)
    assert found.flops == FWD + 2 * B * H * OUT  # only layer 2's weight gradient


def test_conv2d_forward_and_weight_gradient() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Flatten())
    x = torch.randn(2, 3, 10, 10)
    fwd = 2 * (2 * 6 * 10 * 10) * (3 * 3 * 3)  # 2 x outputs x (C_in x k x k)
    assert count_flops(conv, forward, x, backward=False).flops == fwd
    assert count_flops(conv, lambda m, b: m(b).sum(), x, backward=True).flops == 2 * fwd


def test_attention_is_counted() -> None:
    attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(3, 5, 16)
    found = count_flops(attn.eval(), lambda m, b: m(b, b, b)[0], x, backward=False)
    projections = 2 * 3 * 5 * 16 * 16 * 4  # q, k, v, out
    scores = 2 * 2 * (3 * 5 * 5 * 8) * 2  # QK^T and AV, per head (dim 8), 2 heads
    assert found.flops == projections + scores


def test_step_without_loss_counts_forward_only() -> None:
    def skip(module: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> None:
        module(b[0])  # Lightning skips the backward of a step that returns None

    assert count_flops(mlp(), skip, batch(), backward=True).flops == FWD


class ItemModel(torch.nn.Module):
    """Data-dependent Python control flow: cannot run on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum().item() > 0:
            x = self.drop(x)
        return self.net(x)  # type: ignore[no-any-return]


def test_cpu_copy_fallback_leaves_model_batch_and_rng_untouched() -> None:
    model = ItemModel().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch()
    x_before = x.clone()
    rng = torch.get_rng_state()
    found = count_flops(model, loss_step, (x, y), backward=True)
    assert found.method == "cpu-copy"
    assert found.meta_problem == "RuntimeError: Tensor.item() cannot be called on meta tensors"
    assert found.flops == FWD + 2 * B * H * OUT * 2 + 2 * B * IN * H
    assert torch.equal(torch.get_rng_state(), rng)  # dropout ran on the copy's forked RNG
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x_before)


def test_uncountable_step_says_why_and_what_to_do() -> None:
    def broken(module: torch.nn.Module, b: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("needs a trainer")

    with pytest.raises(FlopCountError, match=r"needs a trainer.*flops_per_batch"):
        count_flops(mlp(), broken, torch.randn(B, IN), backward=False)


def test_large_module_off_the_cpu_is_not_copied() -> None:
    with torch.device("meta"):
        model = ItemModel()
    with pytest.raises(FlopCountError, match=r"too large to copy to the CPU"):
        count_flops(model, forward, torch.randn(B, IN), backward=False, cpu_copy_max_bytes=0)


@torch.library.custom_op("green_mlops_test::my_mm", mutates_args=())
def _my_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


@_my_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


def test_custom_ops_count_zero_and_are_listed() -> None:
    class Custom(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(IN, H))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _my_mm(x, self.w)

    found = count_flops(Custom(), forward, torch.randn(B, IN), backward=False)
    assert found.flops == 0
    assert found.uncounted_ops == ("green_mlops_test.my_mm",)


def test_signature_distinguishes_shapes_and_dtypes_not_values() -> None:
    Pair = collections.namedtuple("Pair", "x y")

    @dataclasses.dataclass
    class Item:
        x: torch.Tensor
        label: str

    a = (torch.zeros(4, 3), {"mask": torch.ones(4, dtype=torch.bool)}, [1, "s"])
    assert signature(a) == signature(
        (torch.ones(4, 3), {"mask": torch.zeros(4, dtype=torch.bool)}, [2, "t"])
    )
    assert signature(a) != signature(
        (torch.zeros(5, 3), {"mask": torch.ones(5, dtype=torch.bool)}, [1, "s"])
    )
    assert signature(torch.zeros(2)) != signature(torch.zeros(2, dtype=torch.float64))
    assert signature(Pair(torch.zeros(1), 1)) != signature((torch.zeros(1), 1))
    assert signature(Item(torch.zeros(3), "a")) == signature(Item(torch.ones(3), "b"))
    assert signature(Item(torch.zeros(3), "a")) != signature(Item(torch.zeros(4), "a"))
    hash(signature(a))


def test_default_loss_reads_lightning_outputs() -> None:
    t = torch.tensor(1.0)
    assert default_loss(t) is t
    assert default_loss({"loss": t, "other": 1}) is t
    assert default_loss(None) is None
    assert default_loss({"logits": t}) is None


@pytest.mark.parametrize(
    ("name", "model", "bf16_tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.5),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", "NVIDIA H200 SXM", 989.5),
        ("NVIDIA H200 NVL", "NVIDIA H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", "NVIDIA GH200 (Hopper GPU)", 989.5),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100", 312),
        ("NVIDIA A10", "NVIDIA A10", 125),
        ("NVIDIA L4", "NVIDIA L4", 121),
        ("NVIDIA L40", "NVIDIA L40", 181.05),
        ("NVIDIA L40S", "NVIDIA L40S", 362.05),
    ],
)
def test_dense_peaks_match_device_names(name: str, model: str, bf16_tflops: float) -> None:
    figure = find_peak(name)
    assert figure is not None and figure.model == model
    assert peak_flops(name, "bf16") == pytest.approx(bf16_tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA H20", "NVIDIA H800", "cpu", "NVIDIA B200"])
def test_unknown_devices_have_no_peak(name: str) -> None:
    assert find_peak(name) is None
    assert peak_flops(name, "bf16") is None


def test_peak_table_is_dense_sourced_and_consistent() -> None:
    assert peak_flops("Tesla V100-SXM2-16GB", "tf32") == 15.7e12  # no TF32: falls back to FP32
    assert peak_flops("Tesla V100-PCIE-32GB", "fp16") == 112e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp8") == 2 * peak_flops(
        "NVIDIA H100 80GB HBM3", "bf16"
    )  # type: ignore[operator]
    for pattern, figure in DENSE_PEAKS:
        re.compile(pattern)
        assert "datasheet" in figure.source
        f = figure.flops
        assert f.get("fp32", 0) <= f.get("tf32", f.get("fp32", 0)) <= f.get("fp16", 1e30)
        assert all(1e12 <= v < 1e16 for v in f.values())


@pytest.mark.parametrize(
    ("precision", "matmul", "dtype"),
    [
        ("bf16-mixed", "highest", "bf16"),
        ("bf16-true", "highest", "bf16"),
        ("16-mixed", "highest", "fp16"),
        ("32-true", "highest", "fp32"),
        ("32-true", "high", "tf32"),
        (32, "medium", "tf32"),
        ("64-true", "highest", "fp64"),
        ("transformer-engine", "highest", None),
    ],
)
def test_compute_dtype(precision: str | int, matmul: str, dtype: str | None) -> None:
    assert compute_dtype(precision, float32_matmul_precision=matmul) == dtype
