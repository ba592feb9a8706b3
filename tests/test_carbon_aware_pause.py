"""CarbonAwarePause on real, deterministic CPU fits: a pause in-process (in the tracker's
``paused`` phase) or an exit for a requeue, then the same final weights as a fit never paused.
Time is the test's: the callback's clock advances only when it sleeps."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from green_mlops.integrations.lightning import EnergyMonitor
from green_mlops.integrations.lightning._namespaces import Misconfiguration
from green_mlops.integrations.lightning.carbon_aware_pause import EXIT_CODE, CarbonAwarePause
from green_mlops.intensity import IntensityPoint
from green_mlops.scheduling import Forecast
from tests.conftest import ClockMeter

H = 3600.0


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)


def fit(root: Path, callbacks: list[Any], ckpt: str | None = None) -> torch.Tensor:
    pl.seed_everything(0, verbose=False)
    model = Net()
    trainer = pl.Trainer(
        max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, data(), ckpt_path=ckpt)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class Time:
    """Wall time plus whatever the callback slept (each sleep also lasts 20 real ms, so the
    paused phase has energy to measure)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.offset += seconds
        time.sleep(0.02)


def dirty_for(hours: float, clock: Time) -> Any:
    """A forecast: 500 g/kWh for ``hours`` after the first call, then 100."""
    first: list[float] = []

    def forecast(now: float, end: float) -> Forecast:
        t0 = first[0] if first else first.append(now) or now
        return Forecast.from_points(
            [
                IntensityPoint(t0 - H, t0 + hours * H, 500.0),
                IntensityPoint(t0 + hours * H, t0 + 48 * H, 100.0),
            ]
        )

    return forecast


class Probe(pl.Callback):
    """The paused phase as the EnergyMonitor's tracker saw it, at the end of training."""

    def __init__(self, monitor: EnergyMonitor) -> None:
        self.monitor = monitor
        self.paused_j: float | None = None
        self.totals: dict[str, float] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        phase = self.monitor._measurement.tracker.snapshot().phases.get("paused")  # type: ignore[union-attr]
        self.paused_j = None if phase is None else phase.joules
        self.totals = dict(self.monitor._totals.latest or {})  # what the callback reports


@pytest.fixture(scope="module")
def unpaused(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    return fit(tmp_path_factory.mktemp("plain"), [])


def test_a_pause_in_process_ends_with_the_same_weights(
    tmp_path: Path, unpaused: torch.Tensor
) -> None:
    clock = Time()
    pause = CarbonAwarePause(
        finish_by=clock() + 24 * H, threshold_g_per_kwh=300, check_every_s=H,
        forecast=dirty_for(2, clock), clock=clock, sleep=clock.sleep,
    )  # fmt: skip
    settings = {"intensity_providers": "static", "location": "DE"}
    monitor = EnergyMonitor(settings=settings, meters=lambda: [ClockMeter(100.0)])
    probe = Probe(monitor)
    weights = fit(tmp_path, [monitor, pause, probe])
    assert torch.equal(weights, unpaused)
    assert len(pause.pauses) == 1  # after epoch 0; clean from then on
    start, end, why = pause.pauses[0]
    assert end - start == pytest.approx(2 * H, abs=60) and "above 300" in why
    assert probe.paused_j is not None and probe.paused_j > 0  # idle power is counted
    assert probe.totals["green/phase/paused_kwh"] > 0  # and reported as its own phase


def test_no_pause_when_the_deadline_does_not_allow_it(
    tmp_path: Path, unpaused: torch.Tensor
) -> None:
    clock = Time()
    pause = CarbonAwarePause(
        finish_by=clock() - 1.0, threshold_g_per_kwh=300, forecast=dirty_for(2, clock),
        clock=clock, sleep=clock.sleep,
    )  # fmt: skip
    assert torch.equal(fit(tmp_path, [pause]), unpaused)
    assert pause.pauses == [] and clock.offset == 0


def test_exit_for_a_requeue_then_resume_to_the_same_weights(
    tmp_path: Path, unpaused: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Time()
    ckpt = tmp_path / "pause.ckpt"
    pause = CarbonAwarePause(
        finish_by=clock() + 24 * H, plan=True, mode="exit", checkpoint_path=ckpt,
        forecast=dirty_for(3, clock), clock=clock, sleep=clock.sleep, min_saving=0.0,
    )  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        fit(tmp_path, [pause])
    assert exited.value.code == EXIT_CODE and ckpt.exists()
    assert "--begin=" in capsys.readouterr().err
    assert torch.equal(fit(tmp_path, [], ckpt=str(ckpt)), unpaused)


def test_bad_arguments_are_refused_by_name() -> None:
    with pytest.raises(Misconfiguration, match="threshold_g_per_kwh=<g/kWh> or plan=True"):
        CarbonAwarePause(finish_by=0.0)
    with pytest.raises(Misconfiguration, match="mode='later'"):
        CarbonAwarePause(finish_by=0.0, plan=True, mode="later")
    with pytest.raises(Misconfiguration, match="finish_by='tomorrow'"):
        CarbonAwarePause(finish_by="tomorrow", plan=True)


def test_n_step_boundaries_once_per_optimizer_step_under_gradient_accumulation(
    tmp_path: Path,
) -> None:
    """With accumulate_grad_batches, global_step stays the same over several batches: each
    N-step boundary is decided once (a repeat would measure one batch as the N steps' time
    and so under-estimate the remaining work, pausing past the deadline)."""
    clock = Time()
    asked: list[float] = []

    def clean(now: float, end: float) -> Forecast:
        asked.append(now)
        return Forecast.from_points([IntensityPoint(now - H, now + 48 * H, 100.0)])

    pause = CarbonAwarePause(
        finish_by=clock() + 24 * H, threshold_g_per_kwh=300, every_n_steps=2,
        forecast=clean, clock=clock, sleep=clock.sleep,
    )  # fmt: skip
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=8, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[pause],
    )  # fmt: skip
    trainer.fit(Net(), data())
    assert trainer.global_step == 8
    assert len(asked) == 3  # at steps 2, 4 and 6 (at 8 nothing is left)
    assert pause.pauses == []


def test_a_bad_min_saving_or_deadline_is_refused_at_once() -> None:
    with pytest.raises(Misconfiguration, match=r"min_saving=5\): a fraction in \[0, 1\)"):
        CarbonAwarePause(finish_by=0.0, plan=True, min_saving=5)
    with pytest.raises(Misconfiguration, match="finish_by=nan"):
        CarbonAwarePause(finish_by=float("nan"), plan=True)


# -- several processes -------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys
from pathlib import Path
import lightning.pytorch as pl
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from tests.test_carbon_aware_pause import H, Net, Time, data, dirty_for
from green_mlops.integrations.lightning.carbon_aware_pause import CarbonAwarePause
from green_mlops.intensity import IntensityPoint
from green_mlops.scheduling import Forecast

out = Path(sys.argv[1])
clock = Time()
dirty = dirty_for(2, clock)
asked = []

def forecast(now, end):  # rank 0: dirty for 2 h; any other rank: clean (it must not ask)
    asked.append(now)
    if dist.get_rank() == 0:
        return dirty(now, end)
    return Forecast.from_points([IntensityPoint(now - H, now + 48 * H, 100.0)])

pause = CarbonAwarePause(
    finish_by=clock() + 24 * H, threshold_g_per_kwh=300, check_every_s=H, forecast=forecast,
    clock=clock, sleep=clock.sleep,
)
pl.seed_everything(0, verbose=False)
model = Net()
trainer = pl.Trainer(
    max_epochs=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    deterministic=True, callbacks=[pause],
)
trainer.fit(model, data())
weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
(out / f"rank{{trainer.global_rank}}.json").write_text(json.dumps({{
    "pauses": pause.pauses, "asked": len(asked), "slept": clock.offset,
    "step": trainer.global_step, "weights": weights,
}}))
if dist.is_initialized():  # as a DDP script should: gloo's threads end cleanly
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_ranks_pause_together_on_rank_0s_decision(tmp_path: Path) -> None:
    """Two gloo processes: only rank 0 reads the forecast (dirty for 2 h; rank 1's own would
    be clean); the decision is broadcast, so both ranks pause once, after epoch 0, until the
    same time, and finish the fit with the same weights."""
    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=root))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # rank 0 asks at each boundary with work left (epochs 0-2); rank 1 never does
    assert ranks[0]["asked"] == 3 and ranks[1]["asked"] == 0
    for r in ranks:
        assert len(r["pauses"]) == 1 and "above 300" in r["pauses"][0][2]
        start, end, _ = r["pauses"][0]
        assert end - start == pytest.approx(2 * H, abs=60)
    # the same resume time on both ranks (their clocks are the wall clock plus what they slept)
    assert ranks[1]["pauses"][0][1] == pytest.approx(ranks[0]["pauses"][0][1], abs=30)
    assert ranks[0]["slept"] == pytest.approx(ranks[1]["slept"], abs=30)
    assert ranks[0]["step"] == ranks[1]["step"] == 8  # 4 epochs x 2 batches per rank
    assert ranks[0]["weights"] == ranks[1]["weights"]
