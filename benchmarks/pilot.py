"""Does a pilot price the full run? Three MLPs of one family on the same data (``--family
wide``: widths w/2, w, 2w; ``deep``: 2, 4, 14 hidden layers): real Lightning fits on the CPU,
each measured with ``EnergyMonitor`` (FLOPs counted) and logged to an MLflow store. The full
(largest, ~4x the second) is priced with ``green-mlops estimate --scale params=<R>x`` (R: the
ratio of one training step's FLOPs, counted before it runs; the same data, tokens=1x) from the
second pilot alone ("one pilot": J/FLOP held) and from both pilots ("two pilots": per-batch
overhead + J/FLOP fitted through both), each ``--save``d; the full fit is started with
``GREEN_MLOPS_ESTIMATE=FILE`` (two pilots; ``--one-pilot``: one), so it logs
``green/estimate/error`` = (measured - estimate) / estimate itself. Target: within 25 %.

One pilot's error is split into the change of the average power and of the throughput: ``(1 +
error) = (P_large / P_small) / (FLOP/s_large / FLOP/s_small)``, and each phase's J/FLOP ratio is
printed, so what dominated is seen. The CPU/RAM estimates count this process's share (``share=
"process"``, as in benchmarks/forecast.py: the fits' own energy, not the other tenants' load).

    python benchmarks/pilot.py [--family wide|deep] [--width 384] [--pairs 3] [--first-seed 0]
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


#: (width, depth) of the second pilot's model -> (the first pilot's, the full run's): "wide"
#: doubles the width (parameters ~ width^2: ~3.7x), "deep" adds hidden layers (~4x).
FAMILIES = {
    "wide": lambda w: ((w // 2, DEPTH), (w, DEPTH), (2 * w, DEPTH)),
    "deep": lambda w: ((w, 2), (w, 4), (w, 14)),
}


class MLP(pl.LightningModule):
    """``depth`` hidden layers of ``width``."""

    def __init__(self, width: int, depth: int = DEPTH) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(FEATURES, width), torch.nn.ReLU()]
        for _ in range(depth - 1):
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


def fit(
    shape: tuple[int, int], seed: int, epochs: int, uri: str, root: Path, name: str
) -> dict[str, Any]:
    """One measured fit of ``MLP(*shape)``, logged to ``uri``; run id, metrics, parameters."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    pl.seed_everything(seed, verbose=False)
    module = MLP(*shape)
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


def step_flops(shape: tuple[int, int]) -> float:
    """FLOPs of one training step (forward and backward) of ``MLP(*shape)``."""
    batch = next(iter(data(0)[0]))
    module = MLP(*shape)
    return count_flops(module, lambda m, b: m.training_step(b, 0), batch, backward=True).flops


def phases(metrics: dict[str, float]) -> str:
    total = metrics["green/energy_kwh"]
    return ", ".join(
        f"{k[len('green/phase/') : -4]} {100 * v / total:.0f} %"
        for k, v in sorted(metrics.items())
        if k.startswith("green/phase/") and k.endswith("_kwh") and k.count("/") == 2 and v > 0
    )


def pair(
    shapes: tuple[tuple[int, int], ...], seed: int, epochs: int, uri: str, root: Path, one: bool
) -> dict[str, float]:
    first, second, full = shapes
    tiny = fit(first, seed, epochs, uri, root, f"tiny-{seed}")
    small = fit(second, seed, epochs, uri, root, f"small-{seed}")
    # the large model's FLOPs per step, known before it runs
    ratio = step_flops(full) / step_flops(second)
    estimates = {}
    for how, pilots in (("one", [small["id"]]), ("two", [tiny["id"], small["id"]])):
        saved = root / f"estimate-{seed}-{how}.json"
        args = ["estimate", "--tracking-uri", uri, "--scale", f"params={ratio:.6g}x"]
        args += [a for p in pilots for a in ("--pilot", p)]
        with contextlib.redirect_stdout(io.StringIO()) as said:
            code = cli([*args, "--save", str(saved)])
        if code != 0:
            raise SystemExit(f"green-mlops estimate exited {code}: {said.getvalue()}")
        estimates[how] = saved
    # the full run is started with the estimate it is checked against (it logs its error)
    saved = estimates["one" if one else "two"]
    os.environ[ESTIMATE_ENV] = str(saved)
    try:
        large = fit(full, seed, epochs, uri, root, f"large-{seed}")
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
    measured = m["green/energy_kwh"]
    found = {h: json.loads(f.read_text()) for h, f in estimates.items()}
    error = {h: e["energy_kwh"] / measured - 1 for h, e in found.items()}  # of the measured
    inside = {h: e["low_kwh"] <= measured <= e["high_kwh"] for h, e in found.items()}
    checked = "one" if one else "two"
    assert abs(logged - (1 / (1 + error[checked]) - 1)) < 1e-6, (logged, error)
    two = found["two"]
    print(
        f"seed {seed}: tiny {tiny['params']:,} / small {small['params']:,} params "
        f"{s['green/energy_kwh'] * 3.6e6:6.1f} J | large {large['params']:,} params "
        f"({large['params'] / small['params']:.2f}x) {measured * 3.6e6:6.1f} J | two pilots "
        f"{two['energy_kwh'] * 3.6e6:6.1f} J [{two['low_kwh'] * 3.6e6:.1f} .. "
        f"{two['high_kwh'] * 3.6e6:.1f}] error {100 * error['two']:+.1f} % "
        f"(inside {inside['two']}) | one pilot {100 * error['one']:+.1f} % (inside "
        f"{inside['one']}) | logged by the large run {100 * logged:+.1f} % | power "
        f"x{power:.3f}, FLOP/s x{throughput:.3f}",
        flush=True,
    )
    per_flop = ", ".join(
        f"{p} x{(m[f'green/phase/{p}_kwh'] / s[f'green/phase/{p}_kwh']) / ratio:.2f}"
        for p in ("train", "validation")
        if s.get(f"green/phase/{p}_kwh") and m.get(f"green/phase/{p}_kwh")
    )
    print(f"         phases small: {phases(s)}; large: {phases(m)}")
    print(f"         energy per FLOP, large / small: {per_flop} (held at x1 by one pilot)")
    return {
        "two": error["two"],
        "one": error["one"],
        "inside": float(inside["two"]),
        "power": power,
        "throughput": throughput,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=384, help="the second pilot's width")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="wide")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--one-pilot", action="store_true", help="the large run checks the one-pilot estimate"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    shapes = FAMILIES[args.family](args.width)
    print(
        f"MLP family {args.family!r}, (width, depth): pilots {shapes[0]} and {shapes[1]}, full "
        f"run {shapes[2]}; {BATCHES} batches of {BATCH}, {args.epochs} epochs, torch threads "
        "1, share=process; estimates with --scale params=<step FLOPs ratio>x from the second "
        "pilot (one pilot) and from both (two pilots)"
    )
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for seed in range(args.first_seed, args.first_seed + args.pairs):
            out.append(pair(shapes, seed, args.epochs, uri, Path(tmp), args.one_pilot))
    power = statistics.median(r["power"] for r in out)
    rate = statistics.median(r["throughput"] for r in out)
    print(
        f"median power x{power:.3f} and FLOP/s x{rate:.3f} (small -> large): one pilot's "
        f"J/FLOP held is off by (power / FLOP/s) - 1 = {100 * (power / rate - 1):+.1f} %"
    )
    ok = True
    for how in ("two", "one"):
        errors = [abs(r[how]) for r in out]
        met = max(errors) <= 0.25
        ok = ok and (met or how == "one")
        print(
            f"{how} pilot(s): median |error| {100 * statistics.median(errors):.1f} %, worst "
            f"{100 * max(errors):.1f} %: {'PASS' if met else 'FAIL'} every pair within 25 %"
        )
    inside = sum(r["inside"] for r in out)
    print(f"two pilots: the measured energy inside the band {inside:.0f} / {len(out)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
