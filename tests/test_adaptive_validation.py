"""AdaptiveValidation in real Lightning fits on the CPU.

Two kinds of module: a real MLP (decisions compared with full validation), and a *scripted*
module whose per-example losses follow a fixed table per epoch (exact control of the
trajectory: early stops happen where expected, resumes and replays are deterministic). Both run
through the real Trainer, EarlyStopping and ModelCheckpoint.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from green_mlops import GreenMlopsWarning
from green_mlops.adaptive import AdaptiveValidator
from green_mlops.integrations.lightning import AdaptiveValidation, EnergyMonitor
from green_mlops.integrations.lightning.adaptive_validation import PermutedDataset
from tests.conftest import ClockMeter

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning.*",
    "ignore::UserWarning:pytorch_lightning.*",
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
    "ignore::lightning_fabric.utilities.warnings.PossibleUserWarning",
)

#: Lightning's namespaces: the ``lightning`` package's and the standalone ``pytorch_lightning``.
NAMESPACES = ("lightning.pytorch", "pytorch_lightning")

N_VAL, BATCH = 2000, 100


# -- modules -----------------------------------------------------------------------------------


class ScriptedSteps:
    """Validation losses come from ``table[epoch]`` (examples identified by their index); the
    code of ``Scripted``, for a LightningModule of either namespace (see ``scripted``)."""

    current_epoch: int

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.steps: list[tuple[int, int]] = []  # (epoch, batch_idx) of every validation_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.weight**2).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (index,) = batch
        self.steps.append((self.current_epoch, batch_idx))
        row = min(self.current_epoch, self.table.shape[0] - 1)
        return {"per_example_loss": self.table[row][index] + 0 * self.weight}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)  # type: ignore[attr-defined]


class Scripted(ScriptedSteps, pl.LightningModule):
    pass


def scripted(ns: ModuleType = pl) -> type[Any]:
    """``Scripted`` as a LightningModule of namespace ``ns``."""
    if ns is pl:
        return Scripted
    return type("Scripted", (ScriptedSteps, ns.LightningModule), {})


@pytest.fixture(params=NAMESPACES)
def ns(request: pytest.FixtureRequest) -> ModuleType:
    """Each Lightning namespace in turn: its Trainer, callbacks, strategies and modules."""
    return importlib.import_module(request.param)


def refusal(ns: ModuleType) -> type[Exception]:
    """The namespace's MisconfigurationException (each namespace has its own class)."""
    fabric = "lightning.fabric" if ns is pl else "lightning_fabric"
    module = importlib.import_module(f"{fabric}.utilities.exceptions")
    return module.MisconfigurationException  # type: ignore[no-any-return]


class MLP(pl.LightningModule):
    def __init__(self, lr: float = 0.03) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"per_example_loss": F.cross_entropy(self.net(x), y, reduction="none")}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Versioned(Scripted):
    """Like ``Scripted``, but the table's row is a buffer set at each training epoch: it is part
    of the weights, so a copy loaded with an earlier epoch's weights (the incumbent's shadow)
    returns that epoch's losses."""

    row: torch.Tensor

    def __init__(self, table: np.ndarray) -> None:
        super().__init__(table)
        self.register_buffer("row", torch.zeros((), dtype=torch.long))

    def on_train_epoch_start(self) -> None:
        self.row.fill_(self.current_epoch)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (index,) = batch
        self.steps.append((int(self.row), batch_idx))
        row = min(int(self.row), self.table.shape[0] - 1)
        return {"per_example_loss": self.table[row][index] + 0 * self.weight}


def table(seed: int = 0, n: int = N_VAL) -> np.ndarray:
    """Per-epoch per-example losses: improving, a clear degradation, a near-tie, overfitting."""
    rng = np.random.default_rng(seed)
    base = rng.exponential(0.5, n)
    means = [0.9, 0.6, 0.45, 0.4, 0.55, 0.39, 0.70, 0.80, 0.90, 1.0]
    return np.array([np.maximum(base * m / 0.5 + 0.05 * rng.standard_normal(n), 0) for m in means])


def index_loader(n: int = N_VAL, batch: int = BATCH, *, permute: bool = True) -> DataLoader[Any]:
    data = TensorDataset(torch.arange(n))
    return DataLoader(AdaptiveValidation.permute_once(data) if permute else data, batch_size=batch)


def train_loader() -> DataLoader[Any]:
    return DataLoader(TensorDataset(torch.arange(4)), batch_size=2)


class Record(Callback):
    """What EarlyStopping/ModelCheckpoint saw at each validation of the fit."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def trainer(
    tmp_path: Path, callbacks: list[Callback], ns: ModuleType = pl, **kwargs: Any
) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": 10,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    options.update(kwargs)
    return ns.Trainer(callbacks=callbacks, **options)  # type: ignore[no-any-return]


def stock(
    tmp_path: Path, patience: int = 3, ns: ModuleType = pl
) -> tuple[EarlyStopping, ModelCheckpoint]:
    cb = ns.callbacks
    return (
        cb.EarlyStopping(monitor="val_loss", mode="min", patience=patience),
        cb.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", mode="min", save_top_k=1),
    )


def decisions(es: EarlyStopping, mc: ModelCheckpoint) -> tuple[int, str]:
    return es.stopped_epoch, Path(mc.best_model_path).name.split("-")[0]


# -- decisions equal full validation -----------------------------------------------------------


def fit_scripted(
    tmp_path: Path, enabled: bool, rows: np.ndarray, ns: ModuleType = pl
) -> tuple[Any, ...]:
    es, mc = stock(tmp_path / str(enabled), ns=ns)
    record = Record()
    callback = AdaptiveValidation(enabled=enabled)
    module = scripted(ns)(rows)
    trainer(tmp_path, [callback, es, mc, record], ns).fit(module, train_loader(), index_loader())
    return decisions(es, mc), record.rows, module.steps, callback


def test_scripted_fit_decides_like_full_validation_and_like_its_replay(
    tmp_path: Path, ns: ModuleType
) -> None:
    rows = table()
    full_decisions, full_rows, _, _ = fit_scripted(tmp_path, False, rows, ns)
    got_decisions, got_rows, steps, callback = fit_scripted(tmp_path, True, rows, ns)
    assert got_decisions == full_decisions == (8, "epoch=5")
    fractions = [r["green/validation/fraction_evaluated"] for r in got_rows]
    assert [r["green/validation/fraction_evaluated"] for r in full_rows] == [1.0] * 9
    assert min(fractions) < 0.5  # the clear degradations stop early
    # StopIteration really skipped the forward passes: validation_step ran only as logged
    evaluated = sum(r["green/validation/examples_evaluated"] for r in got_rows)
    assert len([s for s in steps if s[0] >= 0]) - 2 == evaluated / BATCH  # minus 2 sanity steps
    # Exact runs log the exact mean; early-stopped ones an estimate, flagged and worse than best
    best = math.inf
    for full, got in zip(full_rows, got_rows, strict=True):
        if got["green/validation/exact"]:
            assert got["val_loss"] == full["val_loss"]
        else:
            assert got["val_loss"] > best and full["val_loss"] >= best
        best = min(best, got["val_loss"])
    # The live fit decides exactly as a replay of the same trajectory by the core
    order = np.asarray(PermutedDataset(TensorDataset(torch.arange(N_VAL))).indices)
    validator = AdaptiveValidator()
    replayed = []
    for row in rows[: len(got_rows)].astype(np.float32).astype(np.float64):
        validator.begin()
        for start in range(0, N_VAL, BATCH):
            if validator.should_stop:
                break
            validator.observe(row[order][start : start + BATCH])
        outcome = validator.end()
        replayed.append((outcome.value, outcome.fraction_evaluated))
    assert replayed == [(r["val_loss"], r["green/validation/fraction_evaluated"]) for r in got_rows]
    assert callback.validator.state_dict()["best"] == validator.best


def fit_mlp(tmp_path: Path, enabled: bool) -> tuple[Any, ...]:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 16, generator=g)
    y = (x[:, 0] + x[:, 1] * x[:, 2] + 0.8 * torch.randn(5000, generator=g) > 0).long()
    train = DataLoader(
        TensorDataset(x[:600], y[:600]),
        batch_size=50,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    val = DataLoader(
        AdaptiveValidation.permute_once(TensorDataset(x[600:], y[600:])), batch_size=200
    )
    es, mc = stock(tmp_path / f"mlp{enabled}")
    record = Record()
    fit = trainer(tmp_path, [AdaptiveValidation(enabled=enabled), es, mc, record], max_epochs=25)
    fit.fit(MLP(), train, val)
    return decisions(es, mc), record.rows


def test_real_model_fit_decides_like_full_validation(tmp_path: Path) -> None:
    full, full_rows = fit_mlp(tmp_path, False)
    got, got_rows = fit_mlp(tmp_path, True)
    assert got == full
    assert len(got_rows) == len(full_rows) > 4
    fractions = [r["green/validation/fraction_evaluated"] for r in got_rows]
    assert min(fractions) < 1.0  # at least one run stopped early
    for f, g in zip(full_rows, got_rows, strict=True):
        assert (g["val_loss"] == f["val_loss"]) == bool(g["green/validation/exact"])


def lazy_replay(
    rows: np.ndarray, order: Any, n: int, batch: int, upper: float = 5.0
) -> list[tuple[float, float, float]]:
    """The core's replay of a Versioned fit: (value, fraction, incumbent passes) per run."""
    validator = AdaptiveValidator(upper=upper)
    incumbent, out = -1, []
    for epoch, row in enumerate(rows):
        validator.begin()
        for start in range(0, n, batch):
            if validator.should_stop:
                break
            size = min(batch, n - start)
            if validator.incumbent_missing(size):
                validator.extend_incumbent(rows[incumbent][order][start : start + size])
            validator.observe(row[order][start : start + size])
        outcome = validator.end()
        incumbent = epoch if outcome.improved else incumbent
        out.append((outcome.value, outcome.fraction_evaluated, float(outcome.incumbent_evaluated)))
    return out


def test_weights_mode_fit_stops_improving_runs_and_decides_like_full_validation(
    tmp_path: Path,
) -> None:
    rows = np.minimum(table(), 5.0)
    results = []
    for enabled in (False, True):
        es, mc = stock(tmp_path / str(enabled))
        record, module = Record(), Versioned(rows)
        callback = AdaptiveValidation(upper=5.0, enabled=enabled)
        trainer(tmp_path, [callback, es, mc, record]).fit(module, train_loader(), index_loader())
        results.append((decisions(es, mc), record.rows, module.steps, callback))
    (full, full_rows, _, _), (got, got_rows, steps, callback) = results
    assert got == full == (8, "epoch=5") and callback.early_improved_off is None
    best, early_improved = math.inf, 0
    for f, g in zip(full_rows, got_rows, strict=True):
        early_improved += g["val_loss"] < best and not g["green/validation/exact"]
        assert (g["val_loss"] < best) == (f["val_loss"] < min(best, math.inf))
        assert (g["val_loss"] == f["val_loss"]) == bool(g["green/validation/exact"])
        best = min(best, g["val_loss"])
    assert early_improved >= 2
    lazy = [r["green/validation/incumbent_examples_evaluated"] for r in got_rows]
    passes = [r["green/validation/examples_evaluated"] for r in got_rows]
    assert sum(lazy) > 0 and sum(passes) < N_VAL * len(got_rows)
    # the training module's validation_step ran for the candidate's examples only
    assert (len(steps) - 2) * BATCH == sum(passes) - sum(lazy)  # minus 2 sanity steps
    # and the live fit decides exactly as the core's replay, lazy evaluations included
    order = np.asarray(PermutedDataset(TensorDataset(torch.arange(N_VAL))).indices)
    rows32 = rows[: len(got_rows)].astype(np.float32).astype(np.float64)
    assert lazy_replay(rows32, order, N_VAL, BATCH) == [
        (
            r["val_loss"],
            r["green/validation/fraction_evaluated"],
            r["green/validation/incumbent_examples_evaluated"],
        )
        for r in got_rows
    ]


class BatchNormMLP(MLP):
    """BatchNorm (running statistics) and dropout (RNG) in training; a bounded loss."""

    def __init__(self) -> None:
        super().__init__(lr=0.02)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64),
            torch.nn.BatchNorm1d(64),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(64, 2),
        )
        self.train_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.train_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        out = super().validation_step(batch, batch_idx)
        return {"per_example_loss": out["per_example_loss"].clamp(max=5.0)}


def test_lazy_incumbent_evaluation_leaves_training_untouched(tmp_path: Path) -> None:
    """A weights-mode fit trains bit for bit like a full-validation fit (weights, optimizer
    state, BatchNorm statistics, RNG streams) and decides the same."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4600, 16, generator=g)
    y = (x[:, 0] + x[:, 1] * x[:, 2] + 0.8 * torch.randn(4600, generator=g) > 0).long()
    val = AdaptiveValidation.permute_once(TensorDataset(x[600:], y[600:]))
    results = []
    for enabled in (False, True):
        pl.seed_everything(0, verbose=False)
        train = DataLoader(
            TensorDataset(x[:600], y[:600]),
            batch_size=50,
            shuffle=True,
            generator=torch.Generator().manual_seed(1),
        )
        es, mc = stock(tmp_path / f"bn{enabled}")
        record, module = Record(), BatchNormMLP()
        fit = trainer(tmp_path, [AdaptiveValidation(upper=5.0, enabled=enabled), es, mc, record])
        fit.fit(module, train, DataLoader(val, batch_size=200))
        results.append(
            (
                decisions(es, mc),
                module.train_losses,
                module.state_dict(),
                fit.optimizers[0].state_dict()["state"],
                torch.get_rng_state(),
                record.rows,
            )
        )
    full, got = results
    assert got[0] == full[0] and got[1] == full[1]
    assert got[2].keys() == full[2].keys()
    assert all(torch.equal(got[2][k], full[2][k]) for k in full[2])  # incl. running_mean/var
    for state, ref in zip(got[3].values(), full[3].values(), strict=True):
        assert all(torch.equal(state[k], ref[k]) for k in ref)
    assert torch.equal(got[4], full[4])
    lazy = [r["green/validation/incumbent_examples_evaluated"] for r in got[5]]
    assert sum(lazy) > 0  # the shadow copy did run


def other_state_key(cb: ModuleType, *args: Any, **kwargs: Any) -> EarlyStopping:
    """An EarlyStopping of namespace ``cb`` with a state key of its own (a second instance)."""

    class OtherStateKey(cb.EarlyStopping):  # type: ignore[name-defined, misc]
        @property
        def state_key(self) -> str:
            return "other-" + super().state_key  # type: ignore[no-any-return]

    return OtherStateKey(*args, **kwargs)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("callbacks", "fix"),
    [
        (lambda p, cb: [AdaptiveValidation()], "no upper= bound"),
        (lambda p, cb: [AdaptiveValidation(upper=5.0, incumbent="values")], "incumbent='values'"),
        (
            lambda p, cb: [
                AdaptiveValidation(upper=5.0),
                cb.EarlyStopping("val_loss", stopping_threshold=0.1),
            ],
            "stopping_threshold",
        ),
        (
            lambda p, cb: [
                AdaptiveValidation(upper=5.0),
                cb.EarlyStopping("val_loss", min_delta=0.1),
                other_state_key(cb, "val_loss", min_delta=0.2),
            ],
            "different min_delta",
        ),
        (
            lambda p, cb: [
                AdaptiveValidation(upper=5.0),
                cb.EarlyStopping("val_loss", min_delta=0.1),
            ],
            "",
        ),
    ],
)
def test_when_early_improved_is_off_the_callback_says_why(
    tmp_path: Path,
    callbacks: Callable[[Path, ModuleType], list[Callback]],
    fix: str,
    ns: ModuleType,
) -> None:
    made = callbacks(tmp_path, ns.callbacks)
    trainer(tmp_path, made, ns, max_epochs=1).fit(
        scripted(ns)(np.minimum(table(n=200), 5.0)), train_loader(), index_loader(200)
    )
    callback = made[0]
    assert isinstance(callback, AdaptiveValidation)
    if fix:
        assert callback.early_improved_off is not None and fix in callback.early_improved_off
        assert not callback.validator.improves_early
    else:
        assert callback.early_improved_off is None and callback.validator.min_delta == 0.1


def test_plateau_threshold_turns_early_improved_off(tmp_path: Path) -> None:
    callback = AdaptiveValidation(upper=5.0)
    trainer(tmp_path, [callback], max_epochs=1).fit(
        Plateau(np.minimum(table(n=200), 5.0), "min"), train_loader(), index_loader(200)
    )
    assert (
        callback.early_improved_off is not None
        and "threshold=0.0001" in callback.early_improved_off
    )


# -- Lightning's behaviour we rely on ---------------------------------------------------------


class StopAt(Callback):
    """Raise StopIteration before batch ``k`` of every validation run (not the sanity check)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.hooks: list[str] = []

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking and batch_idx == self.k:
            raise StopIteration

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.hooks.append("batch_end")

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.hooks.append("epoch_end")
            pl_module.log("val_loss", float(trainer.current_epoch))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.hooks.append("end")


@pytest.mark.parametrize("profiler", [None, "simple"])
def test_stop_iteration_in_on_validation_batch_start_ends_the_run_cleanly(
    tmp_path: Path, profiler: str | None
) -> None:
    """Pins Lightning-internal behaviour AdaptiveValidation depends on (evaluation_loop.run
    catches StopIteration around the step hooks, then runs the epoch-end hooks as usual)."""
    stop = StopAt(3)
    es = EarlyStopping(monitor="val_loss", patience=2)
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    module = Scripted(table(n=1000))
    fit = trainer(tmp_path, [stop, es, mc], max_epochs=4, num_sanity_val_steps=0, profiler=profiler)
    fit.fit(module, train_loader(), index_loader(1000))
    assert module.steps == [(e, b) for e in range(3) for b in range(3)]  # 3 of 10 batches
    assert (
        stop.hooks
        == ["batch_end"] * 3 + ["epoch_end", "end"] + (["batch_end"] * 3 + ["epoch_end", "end"]) * 2
    )
    assert es.stopped_epoch == 2  # EarlyStopping ran on the logged values (0, 1, 2)
    assert Path(mc.best_model_path).name.startswith("epoch=0")
    assert fit.current_epoch == 3 and fit.state.finished


# -- refusals and errors -----------------------------------------------------------------------

REFUSED: dict[str, tuple[Callable[[Path, ModuleType], list[Callback]], dict[str, Any], str]] = {
    "es mode": (lambda p, cb: [cb.EarlyStopping("val_loss", mode="max")], {}, "same mode"),
    "es other key": (lambda p, cb: [cb.EarlyStopping("val_acc")], {}, "allow_monitors"),
    "es divergence": (
        lambda p, cb: [cb.EarlyStopping("val_loss", divergence_threshold=5.0)],
        {},
        "divergence_threshold",
    ),
    "es negative min_delta": (
        lambda p, cb: [cb.EarlyStopping("val_loss", min_delta=-0.1)],
        {},
        "min_delta",
    ),
    "es at train epoch end": (
        lambda p, cb: [cb.EarlyStopping("val_loss", check_on_train_epoch_end=True)],
        {"val_check_interval": 0.5},
        "check_on_train_epoch_end=False",
    ),
    "energy monitor other key": (  # its quality per kWh would rest on a prefix's val_acc
        lambda p, cb: [EnergyMonitor(monitor="val_acc", mode="max", meters=lambda: [ClockMeter()])],
        {},
        "allow_monitors",
    ),
    "mc top 2": (
        lambda p, cb: [cb.ModelCheckpoint(dirpath=p, monitor="val_loss", save_top_k=2)],
        {},
        "save_top_k=1",
    ),
    "mc top 3": (
        lambda p, cb: [cb.ModelCheckpoint(dirpath=p, monitor="val_loss", save_top_k=3)],
        {},
        "save_top_k=1",
    ),
    "mc mode": (
        lambda p, cb: [cb.ModelCheckpoint(dirpath=p, monitor="val_loss", mode="max")],
        {},
        "same mode",
    ),
    "mc at train epoch end": (
        lambda p, cb: [
            cb.ModelCheckpoint(dirpath=p, monitor="val_loss", save_on_train_epoch_end=True)
        ],
        {"val_check_interval": 0.5},
        "save_on_train_epoch_end=False",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_configurations_that_would_change_decisions_are_refused(
    tmp_path: Path, case: str, ns: ModuleType
) -> None:
    make, kwargs, fix = REFUSED[case]
    callbacks = [AdaptiveValidation(), *make(tmp_path, ns.callbacks)]
    fit = trainer(tmp_path, callbacks, ns, max_epochs=1, **kwargs)
    with pytest.raises(refusal(ns), match=fix):
        fit.fit(
            scripted(ns)(table(n=200)),
            DataLoader(TensorDataset(torch.arange(8)), batch_size=2),
            index_loader(200),
        )


def test_allowed_monitors_and_default_callbacks_are_accepted(
    tmp_path: Path, ns: ModuleType
) -> None:
    cb = ns.callbacks
    callbacks: list[Callback] = [
        AdaptiveValidation(allow_monitors=["train_loss"]),
        cb.EarlyStopping("val_loss", min_delta=0.01, stopping_threshold=0.01),  # defaults else
        cb.EarlyStopping("train_loss", check_on_train_epoch_end=True),
        cb.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1),
        cb.ModelCheckpoint(dirpath=tmp_path / "every", every_n_epochs=1),  # no monitor
    ]

    class Logged(scripted(ns)):  # type: ignore[misc]
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss, on_epoch=True)
            return loss

    trainer(tmp_path, callbacks, ns, max_epochs=2).fit(
        Logged(table(n=200)), train_loader(), index_loader(200)
    )


def test_a_callback_of_either_namespace(ns: ModuleType) -> None:
    callback = AdaptiveValidation()
    assert isinstance(callback, ns.Callback)
    fit = ns.Trainer(callbacks=callback, logger=False, enable_checkpointing=False)
    assert callback in fit.callbacks
    with pytest.raises(refusal(ns), match="mode"):  # refusals are the namespace's exception
        AdaptiveValidation(mode="maximum")  # type: ignore[arg-type]


def test_every_hook_is_marked_override() -> None:
    own = vars(AdaptiveValidation)
    hooks = [name for name in own if hasattr(Callback, name) and not name.startswith("__")]
    assert {"setup", "on_validation_batch_end", "state_dict", "state_key"} <= set(hooks)
    for name in hooks:
        attr = own[name]
        function = attr.fget if isinstance(attr, property) else attr
        assert getattr(function, "__override__", False), f"{name} lacks @override"


class Plateau(Scripted):
    def __init__(self, rows: np.ndarray, mode: Literal["min", "max"]) -> None:
        super().__init__(rows)
        self.mode = mode

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=self.mode)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


def test_reduce_lr_on_plateau_is_checked(tmp_path: Path) -> None:
    trainer(tmp_path, [AdaptiveValidation()], max_epochs=2).fit(
        Plateau(table(n=200), "min"), train_loader(), index_loader(200)
    )
    with pytest.raises(MisconfigurationException, match="same mode"):
        trainer(tmp_path, [AdaptiveValidation()], max_epochs=1).fit(
            Plateau(table(n=200), "max"), train_loader(), index_loader(200)
        )


def test_shuffled_or_unpermuted_validation_loader_is_refused(tmp_path: Path) -> None:
    data = TensorDataset(torch.arange(200))
    shuffled = DataLoader(AdaptiveValidation.permute_once(data), batch_size=50, shuffle=True)
    with pytest.raises(MisconfigurationException, match="shuffles"):
        trainer(tmp_path, [AdaptiveValidation()]).fit(
            Scripted(table(n=200)), train_loader(), shuffled
        )
    with pytest.raises(MisconfigurationException, match=r"permute_once\(dataset, seed=0\)"):
        trainer(tmp_path, [AdaptiveValidation()]).fit(
            Scripted(table(n=200)), train_loader(), index_loader(200, permute=False)
        )
    # an explicit promise that the stored order is already random is accepted
    trainer(tmp_path, [AdaptiveValidation(trust_order=True)], max_epochs=1).fit(
        Scripted(table(n=200)), train_loader(), index_loader(200, permute=False)
    )


class Returns(Scripted):
    def __init__(self, output: Any) -> None:
        super().__init__(table(n=200))
        self.output = output

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().validation_step(batch, batch_idx)["per_example_loss"]
        return self.output(out)


@pytest.mark.parametrize(
    ("output", "got"),
    [
        (lambda v: v.mean(), "Tensor"),
        (lambda v: None, "NoneType"),
        (lambda v: {"loss": v}, "keys ['loss']"),
        (lambda v: {"per_example_loss": v.mean()}, "shape ()"),
    ],
)
def test_missing_per_example_output_says_what_to_return(
    tmp_path: Path, output: Any, got: str
) -> None:
    with pytest.raises(MisconfigurationException, match="reduction='none'") as info:
        trainer(tmp_path, [AdaptiveValidation()]).fit(
            Returns(output), train_loader(), index_loader(200)
        )
    assert got in str(info.value)
    assert "sanity" not in str(info.value)  # (raised during the sanity check, before training)


def test_the_callback_owns_the_monitored_key(tmp_path: Path) -> None:
    class AlsoLogs(Scripted):
        def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            out = super().validation_step(batch, batch_idx)
            self.log("val_loss", 123.0)  # a batch-mean of its own: replaced by the callback's
            return out

    record = Record()
    rows = table(n=200)
    trainer(tmp_path, [AdaptiveValidation(), record], max_epochs=1).fit(
        AlsoLogs(rows), train_loader(), index_loader(200)
    )
    assert record.rows[0]["val_loss"] == float(
        np.mean(rows[0].astype(np.float32).astype(np.float64))
    )

    class Overwrites(Callback):  # logs the same key later, with the same arguments
        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                value = torch.tensor(123.0, dtype=torch.float64)
                pl_module.log("val_loss", value, prog_bar=True, sync_dist=True, reduce_fx="max")

    with pytest.raises(MisconfigurationException, match="Only AdaptiveValidation may log"):
        trainer(tmp_path, [AdaptiveValidation(), Overwrites()]).fit(
            Scripted(rows), train_loader(), index_loader(200)
        )


def test_a_validation_order_that_changes_during_the_fit_is_refused(tmp_path: Path) -> None:
    class Reshuffles(Scripted):
        def val_dataloader(self) -> DataLoader[Any]:
            data = TensorDataset(torch.arange(200))  # a new seed each epoch: pairs break
            return DataLoader(PermutedDataset(data, seed=self.current_epoch), batch_size=50)

    fit = trainer(tmp_path, [AdaptiveValidation()], reload_dataloaders_every_n_epochs=1)
    with pytest.raises(MisconfigurationException, match="validation order changed"):
        fit.fit(Reshuffles(table(n=200)), train_loader())


def test_an_incumbent_copy_of_another_shape_is_refused_with_one_prefix(tmp_path: Path) -> None:
    class ShortCopy(Versioned):  # the shadow copy (no trainer) returns one value too few
        def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            out = super().validation_step(batch, batch_idx)
            if self._trainer is None:
                return {"per_example_loss": out["per_example_loss"][:-1]}
            return out

    fit = trainer(tmp_path, [AdaptiveValidation(upper=5.0)])
    with pytest.raises(MisconfigurationException, match="incumbent's copy returned") as info:
        fit.fit(ShortCopy(np.minimum(table(), 5.0)), train_loader(), index_loader())
    assert str(info.value).startswith("AdaptiveValidation: the incumbent's copy returned (99,)")
    assert str(info.value).count("AdaptiveValidation") == 1


# -- edge cases --------------------------------------------------------------------------------


def test_validation_set_smaller_than_one_batch(tmp_path: Path) -> None:
    record = Record()
    rows = table(n=30)
    trainer(tmp_path, [AdaptiveValidation(), record], max_epochs=4).fit(
        Scripted(rows), train_loader(), index_loader(30, batch=64)
    )
    assert [r["green/validation/fraction_evaluated"] for r in record.rows] == [1.0] * 4
    assert [r["val_loss"] for r in record.rows] == [
        float(np.mean(r.astype(np.float32).astype(np.float64))) for r in rows[:4]
    ]


def test_nan_from_the_model_is_logged_and_stops_like_full_validation(tmp_path: Path) -> None:
    rows = table(n=400)
    rows[2][377] = np.nan  # one example, late in the order
    results = []
    for enabled in (False, True):
        es = EarlyStopping("val_loss", patience=3, check_finite=True)
        record = Record()
        trainer(tmp_path, [AdaptiveValidation(enabled=enabled), es, record]).fit(
            Scripted(rows), train_loader(), index_loader(400)
        )
        results.append((es.stopped_epoch, es.stopping_reason, len(record.rows)))
        assert math.isnan(record.rows[-1]["val_loss"])
        assert record.rows[-1]["green/validation/fraction_evaluated"] == 1.0
    assert results[0] == results[1] and results[0][0] == 2


def test_values_outside_the_bounds_switch_to_full_validation_with_a_warning(tmp_path: Path) -> None:
    rows = table(n=400) - 0.2  # "losses" that go negative
    record = Record()
    callback = AdaptiveValidation()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [callback, record]).fit(Scripted(rows), train_loader(), index_loader(400))
    assert any("outside the declared bounds" in str(w.message) for w in caught)
    assert all(r["green/validation/fraction_evaluated"] == 1.0 for r in record.rows)
    assert callback.validator.problem is not None


def test_values_outside_the_bounds_warn_with_green_mlops_warning(tmp_path: Path) -> None:
    rows = table(n=200) - 0.2  # "losses" that go negative: the user must set lower=
    with pytest.warns(GreenMlopsWarning, match="outside the declared bounds.*Set lower=/upper="):
        trainer(tmp_path, [AdaptiveValidation()], max_epochs=2).fit(
            Scripted(rows), train_loader(), index_loader(200)
        )


def test_trainer_validate_logs_the_full_mean(tmp_path: Path) -> None:
    rows = table(n=300)
    fit = trainer(tmp_path, [AdaptiveValidation()])
    (result,) = fit.validate(Scripted(rows), index_loader(300), verbose=False)
    assert result["val_loss"] == pytest.approx(float(np.mean(rows[0])), rel=1e-6)


# -- checkpoints -------------------------------------------------------------------------------


def test_state_dict_round_trip_and_resume_decide_like_an_uninterrupted_fit(tmp_path: Path) -> None:
    rows = table(seed=3)
    straight, stopped = Record(), EarlyStopping("val_loss", patience=3)
    trainer(tmp_path / "a", [AdaptiveValidation(), stopped, straight]).fit(
        Scripted(rows), train_loader(), index_loader()
    )
    # interrupted after 5 epochs, resumed from the checkpoint Lightning wrote at the end
    first = AdaptiveValidation()
    head = Record()
    part = trainer(
        tmp_path / "b", [first, EarlyStopping("val_loss", patience=3), head], max_epochs=5
    )
    part.fit(Scripted(rows), train_loader(), index_loader())
    path = tmp_path / "b" / "resume.ckpt"
    part.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # the state is plain tensors and numbers
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("AdaptiveValidation")]
    assert state["incumbent"].dtype == torch.float64 and state["incumbent"].shape == (N_VAL,)
    clone = AdaptiveValidation()
    clone.load_state_dict(state)
    assert clone.state_dict()["best"] == first.state_dict()["best"]
    assert torch.equal(clone.state_dict()["incumbent"], first.state_dict()["incumbent"])
    tail, resumed = Record(), EarlyStopping("val_loss", patience=3)
    trainer(tmp_path / "b", [AdaptiveValidation(), resumed, tail]).fit(
        Scripted(rows), train_loader(), index_loader(), ckpt_path=path
    )
    keys = ("val_loss", "green/validation/fraction_evaluated", "green/validation/exact")
    assert [[r[k] for k in keys] for r in head.rows + tail.rows] == [
        [r[k] for k in keys] for r in straight.rows
    ]
    assert resumed.stopped_epoch == stopped.stopped_epoch


def test_resume_with_a_partial_incumbent_restores_its_weights(tmp_path: Path) -> None:
    rows = np.minimum(table(seed=3), 5.0)
    straight = Record()
    trainer(tmp_path / "a", [AdaptiveValidation(upper=5.0), straight]).fit(
        Versioned(rows), train_loader(), index_loader()
    )
    for stop in range(2, 8):  # interrupt where the incumbent is known on a prefix only
        first, head = AdaptiveValidation(upper=5.0), Record()
        part = trainer(tmp_path / f"b{stop}", [first, head], max_epochs=stop)
        part.fit(Versioned(rows), train_loader(), index_loader())
        best_epoch = int(np.argmin([r["val_loss"] for r in head.rows]))
        if first.validator.needs_weights and best_epoch < stop - 1:
            break
    else:
        pytest.fail("no partial incumbent to resume from")
    path = tmp_path / "resume.ckpt"
    part.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("AdaptiveValidation")]
    weights = state["incumbent_weights"]
    assert weights.keys() == checkpoint["state_dict"].keys()  # one state_dict's worth
    assert int(weights["row"]) == best_epoch  # the incumbent's, not the last epoch's
    assert int(torch.isnan(state["incumbent"]).sum()) == N_VAL - state["known"] > 0
    tail = Record()
    trainer(tmp_path / f"b{stop}", [AdaptiveValidation(upper=5.0), tail]).fit(
        Versioned(rows), train_loader(), index_loader(), ckpt_path=path
    )
    keys = (
        "val_loss",
        "green/validation/fraction_evaluated",
        "green/validation/incumbent_examples_evaluated",
        "green/validation/exact",
    )
    assert [[r[k] for k in keys] for r in head.rows + tail.rows] == [
        [r[k] for k in keys] for r in straight.rows
    ]
    assert sum(r["green/validation/incumbent_examples_evaluated"] for r in tail.rows) > 0


# -- energy ------------------------------------------------------------------------------------


def test_energy_saved_is_estimated_with_an_energy_monitor(tmp_path: Path) -> None:
    record = Record()
    monitor = EnergyMonitor(
        settings={"intensity_providers": "constant", "intensity_g_per_kwh": 400, "location": "DE"},
        meters=lambda: [ClockMeter(100.0)],
        report=False,
    )
    callback = AdaptiveValidation()
    trainer(tmp_path, [monitor, callback, record], max_epochs=8).fit(
        Scripted(table()), train_loader(), index_loader()
    )
    assert all("green/validation/saved_kwh_estimate" in r for r in record.rows)
    saved = [r["green/validation/saved_kwh_estimate"] for r in record.rows]
    skipped = [1 - r["green/validation/fraction_evaluated"] for r in record.rows]
    assert saved[0] == 0.0 and saved[-1] > 0 and sorted(saved) == saved
    assert (np.diff(saved) > 0).tolist() == (np.array(skipped[1:]) > 0).tolist()


# -- several processes -------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys
from pathlib import Path
import lightning.pytorch as pl
import numpy as np
import torch
sys.path.insert(0, {root!r})
from tests.test_adaptive_validation import Versioned, Record, index_loader, table, train_loader
from green_mlops.integrations.lightning import AdaptiveValidation

out = Path(sys.argv[1])
rows = np.minimum(table(n=301), 5.0)  # odd: DistributedSampler pads one example
callback, record = AdaptiveValidation(upper=5.0), Record()
module = Versioned(rows)
trainer = pl.Trainer(
    max_epochs=8, accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback, record],
    logger=False, enable_progress_bar=False, enable_model_summary=False,
    enable_checkpointing=False, num_sanity_val_steps=0,
)
trainer.fit(module, train_loader(), index_loader(301, batch=10))
state = callback.state_dict()
state["incumbent"] = state["incumbent"].tolist()
weights = state["incumbent_weights"]
state["incumbent_weights"] = None if weights is None else {{
    k: v.tolist() for k, v in weights.items()
}}
(out / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(
    {{"state": state, "rows": record.rows, "steps": len(module.steps)}}
))
if torch.distributed.is_initialized():  # as a DDP script should: gloo's threads end cleanly
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_ranks_decide_identically_on_the_global_order(tmp_path: Path) -> None:
    import json

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
    assert ranks[0]["state"] == ranks[1]["state"] and ranks[0]["rows"] == ranks[1]["rows"]
    assert ranks[0]["steps"] == ranks[1]["steps"]  # both ranks stopped at the same batch
    # the incumbent's known values are its run's losses in the permuted order, padding removed
    rows = np.minimum(table(n=301), 5.0).astype(np.float32).astype(np.float64)
    order = PermutedDataset(TensorDataset(torch.arange(301))).indices
    means = [r["val_loss"] for r in ranks[0]["rows"]]
    best_epoch = int(np.argmin(means))
    state = ranks[0]["state"]
    known = state["known"]
    assert state["incumbent"][:known] == rows[best_epoch][order][:known].tolist()
    # each rank evaluated its shard of the incumbent's batches: the gathered values equal a
    # single-process replay's, and so do the decisions
    lazy = [r["green/validation/incumbent_examples_evaluated"] for r in ranks[0]["rows"]]
    assert sum(lazy) > 0
    replayed = lazy_replay(rows[: len(means)], order, 301, 20)  # 2 ranks x batch 10
    assert replayed == [
        (
            r["val_loss"],
            r["green/validation/fraction_evaluated"],
            r["green/validation/incumbent_examples_evaluated"],
        )
        for r in ranks[0]["rows"]
    ]
