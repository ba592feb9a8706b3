"""Does a small pilot price the full run? A small and a ~4x-larger MLP of the same family on the
same data: real Lightning fits on the CPU, each measured with ``EnergyMonitor`` (FLOPs counted)
and logged to an MLflow store. ``green-mlops estimate --pilot SMALL --scale params=<R>x --save
FILE`` prices the large one (R: the ratio of one training step's FLOPs, counted before it runs;
the same data, so tokens=1x), and the large fit is started with ``GREEN_MLOPS_ESTIMATE=FILE``,
so it logs ``green/estimate/error`` = (measured - estimate) / estimate itself. Target: within
25 %. ``--flops`` prices it the older way (every phase x the FLOPs), for comparison.

The error is split into the change of the average power and of the throughput: ``(1 + error
of FLOPs-only) = (P_large / P_small) / (FLOP/s_large / FLOP/s_small)``; with each phase's share,
so what dominated is seen. The CPU/RAM estimates count this process's share (``share=
"process"``, as in benchmarks/forecast.py: the fits' own energy, not the other tenants' load).

    python benchmarks/pilot.py [--width 384] [--pairs 3] [--epochs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from green_mlops.cli import main as cli
from green_mlops.flops import count_flops
from green_mlops.integrations.lightning import EnergyMonitor
from green_mlops.pilot import ESTIMATE_ENV

SETTINGS = {
    "intensity_providers": "constant",
    "intensity_g_per_kwh": 300,
    "location": "DE",
    "share": "process",
}
BATCH, BATCHES, FEATURES, DEPTH = 256, 24, 128, 3


class MLP(pl.LightningModule):
    """``DEPTH`` hidden layers of ``width``: parameters ~ width^2, so 2x the width ~ 4x."""

    def __init__(self, width: int) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(FEATURES, width), torch.nn.ReLU()]
        for _ in range(DEPTH - 1):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(seed: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH * BATCHES, FEATURES, generator=g)
    y = (x[:, :10] + 0.5 * torch.randn(len(x), 10, generator=g)).argmax(1)
    train = DataLoader(TensorDataset(x, y), BATCH, shuffle=True)
    val = DataLoader(TensorDataset(x[: BATCH * 4], y[: BATCH * 4]), BATCH)
    return train, val


def fit(width: int, seed: int, epochs: int, uri: str, root: Path, name: str) -> dict[str, Any]:
    """One measured fit, logged to ``uri``; its run id, metrics and parameter count."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    pl.seed_everything(seed, verbose=False)
    module = MLP(width)
    logger = MLFlowLogger(experiment_name="pilot-benchmark", run_name=name, tracking_uri=uri)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[EnergyMonitor(settings=SETTINGS, report=False)],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(root),
    )
    trainer.fit(module, *data(seed))
    run = MlflowClient(uri).get_run(logger.run_id)  # type: ignore[arg-type]
    params = sum(p.numel() for p in module.parameters())
    return {"id": logger.run_id, "metrics": dict(run.data.metrics), "params": params}


def step_flops(width: int) -> float:
    """FLOPs of one training step (forward and backward) of the model of ``width``."""
    batch = next(iter(data(0)[0]))
    module = MLP(width)
    return count_flops(module, lambda m, b: m.training_step(b, 0), batch, backward=True).flops


def phases(metrics: dict[str, float]) -> str:
    total = metrics["green/energy_kwh"]
    return ", ".join(
        f"{k[len('green/phase/') : -4]} {100 * v / total:.0f} %"
        for k, v in sorted(metrics.items())
        if k.startswith("green/phase/") and k.endswith("_kwh") and k.count("/") == 2 and v > 0
    )


def pair(
    width: int, seed: int, epochs: int, uri: str, root: Path, flops_only: bool
) -> dict[str, float]:
    small = fit(width, seed, epochs, uri, root, f"small-{seed}")
    # the large model's FLOPs per step, known before it runs
    ratio = step_flops(2 * width) / step_flops(width)
    saved = root / f"estimate-{seed}.json"
    args = ["estimate", "--tracking-uri", uri, "--pilot", small["id"]]
    if flops_only:
        args += ["--flops", f"{small['metrics']['green/flops'] * ratio:.6g}"]
    else:
        args += ["--scale", f"params={ratio:.6g}x"]
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli([*args, "--save", str(saved)])
    if code != 0:
        raise SystemExit(f"green-mlops estimate exited {code}")
    os.environ[ESTIMATE_ENV] = str(saved)
    try:
        large = fit(2 * width, seed, epochs, uri, root, f"large-{seed}")
    finally:
        del os.environ[ESTIMATE_ENV]
    s, m = small["metrics"], large["metrics"]
    power = (m["green/energy_kwh"] / m["green/duration_s"]) / (
        s["green/energy_kwh"] / s["green/duration_s"]
    )
    throughput = (m["green/flops"] / m["green/duration_s"]) / (
        s["green/flops"] / s["green/duration_s"]
    )
    logged = m["green/estimate/error"]  # (measured - estimate) / estimate, by the large run
    estimate = json.loads(saved.read_text())
    error = estimate["energy_kwh"] / m["green/energy_kwh"] - 1  # relative to the measured
    assert abs(logged - (1 / (1 + error) - 1)) < 1e-6, (logged, error)
    print(
        f"seed {seed}: small {small['params']:,} params {s['green/energy_kwh'] * 3.6e6:7.1f} J "
        f"{s['green/flops']:.3g} FLOPs | large {large['params']:,} params "
        f"({large['params'] / small['params']:.2f}x) {m['green/energy_kwh'] * 3.6e6:7.1f} J "
        f"{m['green/flops']:.3g} FLOPs | estimate {estimate['energy_kwh'] * 3.6e6:7.1f} J "
        f"[{estimate['low_kwh'] * 3.6e6:.1f} .. {estimate['high_kwh'] * 3.6e6:.1f}] "
        f"error {100 * error:+.1f} % of measured (logged {100 * logged:+.1f} %) | "
        f"power x{power:.3f}, FLOP/s x{throughput:.3f}",
        flush=True,
    )
    per_flop = ", ".join(
        f"{p} x{(m[f'green/phase/{p}_kwh'] / s[f'green/phase/{p}_kwh']) / ratio:.2f}"
        for p in ("train", "validation")
        if s.get(f"green/phase/{p}_kwh") and m.get(f"green/phase/{p}_kwh")
    )
    print(f"         phases small: {phases(s)}; large: {phases(m)}")
    print(f"         energy per FLOP, large / small: {per_flop} (held at x1 by the estimate)")
    return {"error": error, "power": power, "throughput": throughput}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=384, help="the small model's width")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--flops", action="store_true", help="estimate with --flops instead")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    print(
        f"MLP {FEATURES}-{args.width}x{DEPTH}-10 vs width {2 * args.width}; {BATCHES} batches "
        f"of {BATCH}, {args.epochs} epochs, torch threads 1, share=process; estimate with "
        f"{'--flops' if args.flops else '--scale params=<step FLOPs ratio>x'}"
    )
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for seed in range(args.first_seed, args.first_seed + args.pairs):
            out.append(pair(args.width, seed, args.epochs, uri, Path(tmp), args.flops))
    errors = [abs(r["error"]) for r in out]
    median = statistics.median(errors)
    power = statistics.median(r["power"] for r in out)
    rate = statistics.median(r["throughput"] for r in out)
    print(
        f"estimate vs measured: median |error| {100 * median:.1f} %, worst "
        f"{100 * max(errors):.1f} %; median power "
        f"x{power:.3f} and FLOP/s x{rate:.3f} (small -> large): the estimate's error is "
        f"(power / FLOP/s) - 1 = {100 * (power / rate - 1):+.1f} % with every phase x the FLOPs "
        f"(--flops), dominated by the "
        f"{'throughput' if abs(rate - 1) > abs(power - 1) else 'power'} change"
    )
    ok = max(errors) <= 0.25
    print(f"{'PASS' if ok else 'FAIL'}: every pair's estimate within 25 % of the measured energy")
    print(f"{'PASS' if median <= 0.25 else 'FAIL'}: the median pair's within 25 %")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
