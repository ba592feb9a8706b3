"""Overhead of ``EnergyMonitor`` on a Lightning fit, side by side with ``ThroughputMonitor``.

    python benchmarks/lightning_overhead.py              # 5 rounds x 4 fits x 600 steps, ~2 min
    python benchmarks/lightning_overhead.py --quick      # ~20 s smoke run, indicative only
    python benchmarks/lightning_overhead.py --accelerator cuda --precision bf16-mixed --width 4096

Workload: a 3-layer MLP (``--width`` 512: 512-512-512-10, batch 128, SGD) on synthetic batches
already collated in memory (data loading costs ~nothing), ``torch.set_num_threads(1)`` on the
CPU: ~5-9 ms per training step on the 2-core development machine.
Every epoch is ``--steps`` / 3 training batches plus 10 validation batches; 3 epochs per fit.
The conditions are the same fit (same seed, same data) with these callbacks:

* ``baseline``: none;
* ``EnergyMonitor``: ``EnergyMonitor()`` with the meters this machine offers, FLOP counting on,
  ``monitor="val_loss"`` (quality metrics at each validation), a CSVLogger receiving its metrics;
* ``ThroughputMonitor``: Lightning's ``ThroughputMonitor(batch_size_fn=...)``, the module
  declaring ``flops_per_batch`` as that callback requires;
* ``baseline-A/A`` (unless ``--no-control``): the baseline again, whose ratio to ``baseline`` is
  the noise floor of the run: ratios inside its band are not a result.

Every fit has the same CSVLogger. Method (noisy shared machines: only ratios measured side by
side in one run are reported):

1. One untimed warm-up fit per condition. Then ``--repeats`` rounds; each round runs every
   condition once, in an order rotated from round to round.
2. Per fit: the median training-step time, taken between consecutive ``on_train_batch_start``
   calls of a timing callback placed first (so it includes every callback's per-batch hooks,
   the data wait and the optimiser step), over steps within an epoch; and the wall time of the
   whole ``trainer.fit`` (one-time costs included: measurement start/stop, FLOP counting,
   per-epoch reductions and logging, carbon accounting at the end).
3. Per round: each condition's values divided by the baseline's *of the same round*; reported:
   the median of these ratios over rounds with their min..max.
4. FLOP counting: the extra time of one real training step counted live (as EnergyMonitor
   counts the first step of each batch shape) over the same step uncounted
   (cold: first call in the process; warm: median of 10), in steps of the median baseline step.

Targets (PASS/FAIL): EnergyMonitor's median-step overhead <= 1 %; one FLOP count <= 1 step
(warm). Exit status 0 when both pass. With ``--accelerator cuda`` it also prints the MFU, the
dense peak used and the GPU energy of the last EnergyMonitor fit.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

CLASSES, VAL_STEPS, EPOCHS = 10, 10, 3
BATCH = 128  # --batch
BASELINE, ENERGY, THROUGHPUT, CONTROL = (
    "baseline",
    "EnergyMonitor",
    "ThroughputMonitor",
    "baseline-A/A",
)
TARGET_OVERHEAD = 0.01


def build(width: int, steps: int, device: str) -> tuple[Any, Any, Any]:
    import lightning.pytorch as pl

    gen = torch.Generator().manual_seed(1234)

    def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Pre-collated batches (DataLoader with batch_size=None): data loading costs ~nothing,
        # so the step time is the model's, not per-sample indexing and collation.
        return [
            (
                torch.randn(BATCH, width, generator=gen),
                torch.randint(0, CLASSES, (BATCH,), generator=gen),
            )
            for _ in range(n)
        ]

    train = torch.utils.data.DataLoader(batches(max(1, steps // EPOCHS)), batch_size=None)
    val = torch.utils.data.DataLoader(batches(VAL_STEPS), batch_size=None)

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1234)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(width, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, CLASSES),
            )
            # ThroughputMonitor needs it; EnergyMonitor would use it too, so it is set only
            # for the ThroughputMonitor condition (EnergyMonitor counts by itself).
            self.flops_per_batch: float | None = None

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return MLP, train, val


class StepTimer:
    """Times between consecutive training-batch starts within an epoch (first callback)."""

    def __init__(self) -> None:
        from lightning.pytorch.callbacks import Callback

        timer = self

        class _Timer(Callback):
            def on_train_epoch_start(self, *args: Any) -> None:
                timer.last = None

            def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
                if trainer.strategy.root_device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if timer.last is not None:
                    timer.steps.append(now - timer.last)
                timer.last = now

        self.callback = _Timer()
        self.steps: list[float] = []
        self.last: float | None = None


def fit(condition: str, args: argparse.Namespace, workdir: Path) -> tuple[float, float, Path]:
    """(median step s, fit wall s, CSV log dir) of one fit."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger

    from green_mlops.integrations.lightning import EnergyMonitor

    model_cls, train, val = build(args.width, args.steps, args.accelerator)
    model = model_cls()
    timer = StepTimer()
    callbacks: list[Any] = [timer.callback]
    if condition == ENERGY:
        callbacks.append(EnergyMonitor(monitor="val_loss", mode="min", settings=args.settings))
    elif condition == THROUGHPUT:
        from lightning.fabric.utilities.throughput import measure_flops

        with torch.device("meta"):
            meta = model_cls()
            xb = torch.randn(BATCH, args.width)
            model.flops_per_batch = measure_flops(meta, lambda: meta.net(xb), lambda out: out.sum())
        callbacks.append(ThroughputMonitor(batch_size_fn=lambda b: b[0].shape[0]))
    logger = CSVLogger(workdir, name=condition.replace("/", "_"))
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=2,
        log_every_n_steps=50,
    )
    t0 = time.perf_counter()
    trainer.fit(model, train, val)
    wall = time.perf_counter() - t0
    return statistics.median(timer.steps), wall, Path(logger.log_dir)


def flop_count_cost(args: argparse.Namespace) -> tuple[float, float]:
    """(cold, warm median) extra seconds of one training step counted live by EnergyMonitor
    (``LiveCount`` around the real forward, backward and optimizer step) over the same step
    uncounted: the whole cost of counting a new batch shape."""
    import warnings

    import torch

    from green_mlops.flops import LiveCount

    model_cls, train, _ = build(args.width, args.steps, args.accelerator)
    device = "cuda" if args.accelerator == "cuda" else "cpu"
    model = model_cls().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = tuple(t.to(device) for t in next(iter(train)))

    def step() -> None:
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(counted: bool) -> float:
        t0 = time.perf_counter()
        live = LiveCount() if counted else None
        step()
        if live is not None:
            live.stop()
        return time.perf_counter() - t0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        cold = timed(True)
        for _ in range(10):
            timed(False)
        plain = [timed(False) for _ in range(30)]
        counted = [timed(True) for _ in range(10)]
    base = statistics.median(plain)
    return cold - base, statistics.median(counted) - base


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} [{min(values):.4f} .. {max(values):.4f}]"


def last_metrics(log_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(log_dir / "metrics.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out.update({k: v for k, v in row.items() if v and k.startswith("green/")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600, help="training steps per fit")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--no-control", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 150 steps")
    args = parser.parse_args(argv)
    global BATCH
    BATCH = args.batch
    if args.quick:
        args.repeats, args.steps = 2, 150
    args.settings = {"location": os.environ.get("GREEN_MLOPS_LOCATION", "DE")}
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    conditions = [BASELINE, ENERGY, THROUGHPUT] + ([] if args.no_control else [CONTROL])
    workdir = Path(tempfile.mkdtemp(prefix="green-lightning-bench-"))
    cold, warm = flop_count_cost(args)
    for condition in conditions:  # warm-up: imports, allocator, first FLOP count
        fit(condition, args, workdir)
    step_ratios: dict[str, list[float]] = {c: [] for c in conditions if c != BASELINE}
    wall_ratios: dict[str, list[float]] = {c: [] for c in conditions if c != BASELINE}
    steps: dict[str, list[float]] = {c: [] for c in conditions}
    energy_dir: Path | None = None
    for r in range(args.repeats):
        order = conditions[r % len(conditions) :] + conditions[: r % len(conditions)]
        results = {}
        for condition in order:
            step_s, wall_s, log_dir = fit(condition, args, workdir)
            results[condition] = (step_s, wall_s)
            steps[condition].append(step_s)
            if condition == ENERGY:
                energy_dir = log_dir
        base_step, base_wall = results[BASELINE]
        for condition in step_ratios:
            step_ratios[condition].append(results[condition][0] / base_step)
            wall_ratios[condition].append(results[condition][1] / base_wall)
        print(
            f"round {r + 1}/{args.repeats}: "
            + ", ".join(f"{c} {results[c][0] * 1e3:.3f} ms" for c in conditions),
            flush=True,
        )

    base_ms = statistics.median(steps[BASELINE]) * 1e3
    print()
    cuda = args.accelerator == "cuda"
    where = torch.cuda.get_device_name() if cuda else f"{args.threads} thread(s)"
    print(
        f"device: {args.accelerator} ({where}), "
        f"width {args.width}, batch {BATCH}, precision {args.precision}, "
        f"{args.steps} steps x {args.repeats} rounds; median baseline step {base_ms:.3f} ms"
    )
    print(
        f"{'condition':<20} {'median step ratio [min .. max]':<34} fit wall-time ratio [min .. max]"
    )
    for condition in step_ratios:
        steps_text = summary(step_ratios[condition])
        print(f"{condition:<20} {steps_text:<34} {summary(wall_ratios[condition])}")
    flop_steps = warm / (base_ms / 1e3)
    print(
        f"FLOP count of a new batch shape (the real step counted live): extra cold "
        f"{cold * 1e3:.1f} ms, warm {warm * 1e3:.2f} ms = {flop_steps:.2f} baseline steps"
    )
    if energy_dir is not None:
        got = last_metrics(energy_dir)
        keys = (
            "green/flops",
            "green/flops_per_s",
            "green/mfu",
            "green/energy_kwh",
            "green/energy/gpu_kwh",
            "green/energy/cpu_kwh",
            "green/phase/data_wait_kwh",
        )
        print("last EnergyMonitor fit: " + ", ".join(f"{k}={got[k]}" for k in keys if k in got))
        report = energy_dir / "green_report.json"
        if report.exists():
            import json

            tags = json.loads(report.read_text())["tags"]
            print(f"green.mfu: {tags.get('green.mfu')}")
            print(f"green.meters: {tags.get('green.meters')}")

    energy = statistics.median(step_ratios[ENERGY]) - 1
    ok_overhead = energy <= TARGET_OVERHEAD
    ok_flops = flop_steps <= 1.0
    print(
        f"{'PASS' if ok_overhead else 'FAIL'}: EnergyMonitor median-step overhead "
        f"{energy * 100:+.2f} % (target <= {TARGET_OVERHEAD * 100:.0f} %)"
    )
    print(f"{'PASS' if ok_flops else 'FAIL'}: one FLOP count {flop_steps:.2f} steps (target <= 1)")
    return 0 if ok_overhead and ok_flops else 1


if __name__ == "__main__":
    sys.exit(main())
