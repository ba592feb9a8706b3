"""Adaptive validation with a tolerance (an indifference zone) and a known horizon.

``tolerance=eps``: a decision may differ from full validation's only for a pair whose full-set
difference lies within ``eps`` of the decision threshold; otherwise with probability <= alpha.
Checked by simulation at the zone's edges (fixed populations, many random orders), on a
validator replay against the exact per-pair decisions, and in a real Lightning fit.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from green_mlops.adaptive import AdaptiveValidator, Decision, PairedComparison, alpha_spending
from green_mlops.integrations.lightning import AdaptiveValidation

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning.*",
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
)


def feed(test: PairedComparison, candidate: np.ndarray, batch: int) -> Decision:
    for start in range(0, candidate.size, batch):
        if test.update(candidate[start : start + batch]) is not Decision.UNDECIDED:
            break
    return test.decision


def population(rng: np.random.Generator, n: int, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """An incumbent (clamped CE-like losses) and a candidate whose full-set mean is
    ``mean(incumbent) + gap`` exactly (paired differences sd ~0.15)."""
    incumbent = 0.3 + np.minimum(rng.exponential(0.5, n), 4.0)  # in [0.3, 4.3]
    candidate = incumbent + 0.15 * np.clip(rng.standard_normal(n), -1.5, 1.5)
    candidate += incumbent.mean() + gap - candidate.mean()  # still in [0, 5]
    return incumbent, candidate


def test_a_tie_is_decided_early_with_a_tolerance_and_not_without() -> None:
    rng = np.random.default_rng(1)
    incumbent, candidate = population(rng, 4000, 0.0)
    strict = PairedComparison(incumbent, 0.01, upper=5.0, early="both")
    assert feed(strict, candidate, 100) is not Decision.UNDECIDED
    assert strict.n == 4000  # a tie: only the full set decides
    tolerant = PairedComparison(incumbent, 0.01, upper=5.0, early="both", tolerance=0.05)
    assert feed(tolerant, candidate, 100) is not Decision.UNDECIDED
    # both calls are allowed after 700 examples; a tie's side never becomes sure, so it is
    # called TIE_CAP (4) times later, by the running mean's side: capped, well before N
    assert tolerant.n <= 3000


def test_an_in_zone_call_waits_until_the_running_mean_is_sure_of_its_side() -> None:
    """A near tie inside the zone (the candidate better by 0.002, eps 0.01) whose first half
    leans the other way (+0.001): both tests allow a call early, but the running mean is well
    within two standard errors of 0, so no call is made on it; the call waits for the second
    half and agrees with full validation ("improved")."""
    n, eps = 4000, 0.01
    incumbent = np.full(n, 1.0)
    swing = 0.05 * np.where(np.arange(n) % 2 == 0, 1.0, -1.0)  # sd 0.05, mean 0 per pair
    offset = np.where(np.arange(n) < n // 2, 0.001, -0.005)  # full-set gap: -0.002
    candidate = incumbent + swing + offset
    assert float(np.mean(candidate - incumbent)) == pytest.approx(-0.002, abs=1e-12)
    test = PairedComparison(incumbent, 0.05, upper=5.0, early="both", tolerance=eps)
    for start in range(0, n, 64):
        decision = test.update(candidate[start : start + 64])
        if test.n <= n // 2:
            assert decision is Decision.UNDECIDED, test.n  # sure only of |mu| < eps there
        if decision is not Decision.UNDECIDED:
            break
    assert test.decision is Decision.IMPROVED
    assert n // 2 < test.n < n  # decided early, once the sign is clear
    # the running mean's side alone (sign_z=0) calls "not improved" in the first half
    blind = PairedComparison(incumbent, 0.05, upper=5.0, early="both", tolerance=eps, sign_z=0.0)
    assert feed(blind, candidate, 64) is Decision.NOT_IMPROVED
    assert blind.n <= n // 2


def test_in_zone_calls_agree_with_full_validation_far_more_often() -> None:
    """Random orders of a near tie inside the zone: calls on the running mean's side alone
    often differ from the full set's; held back to two standard errors, rarely."""
    n, eps, reps = 2000, 0.01, 60
    rng = np.random.default_rng(5)
    incumbent, candidate = population(rng, n, -0.002)
    differ = {}
    for sign_z in (0.0, None):
        wrong = 0
        for _ in range(reps):
            order = rng.permutation(n)
            test = PairedComparison(
                incumbent[order], 0.05, upper=5.0, early="both", tolerance=eps, sign_z=sign_z
            )
            wrong += feed(test, candidate[order], 64) is not Decision.IMPROVED
        differ[sign_z] = wrong / reps
    assert differ[0.0] > 0.1  # measured: 23 % (0 % held back)
    assert differ[None] <= 0.05


@pytest.mark.parametrize("side", ["better by eps", "worse by eps"])
def test_no_out_of_zone_decision_beyond_alpha_at_the_zone_edge(side: str) -> None:
    """At the edge of the zone (|mu| = eps, min_delta 0) the wrong call is out of the zone:
    'not improved' for a candidate better by eps, 'improved' for one worse by eps."""
    eps, alpha, reps, n = 0.02, 0.1, 300, 1000
    rng = np.random.default_rng(21)
    gap = -eps if side == "better by eps" else eps
    incumbent, candidate = population(rng, n, gap)
    assert float(np.mean(candidate - incumbent)) == pytest.approx(gap, abs=1e-12)
    wrong_call = Decision.NOT_IMPROVED if gap < 0 else Decision.IMPROVED
    wrong = early = 0
    for _ in range(reps):
        order = rng.permutation(n)
        test = PairedComparison(incumbent[order], alpha, upper=5.0, early="both", tolerance=eps)
        decision = feed(test, candidate[order], 20)
        early += test.n < n
        wrong += decision is wrong_call and test.n < n
    # each side may spend alpha (tests/test_adaptive_alpha.py); checked at the stricter
    # alpha / 2 it still meets, with 3 binomial standard errors of slack
    assert wrong / reps <= alpha / 2 + 3 * math.sqrt(alpha / 2 * (1 - alpha / 2) / reps)
    assert early / reps > 0.9  # and the zone does make it stop early


def test_tolerance_zero_is_the_strict_test() -> None:
    rng = np.random.default_rng(4)
    incumbent, candidate = population(rng, 2000, 0.004)
    a = PairedComparison(incumbent, 0.05, upper=5.0, early="both")
    b = PairedComparison(incumbent, 0.05, upper=5.0, early="both", tolerance=0.0)
    for start in range(0, 2000, 50):
        assert a.update(candidate[start : start + 50]) is b.update(candidate[start : start + 50])
        assert a.interval == b.interval


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tolerance": -0.1}, r"tolerance=-0\.1.*>= 0"),
        ({"tolerance": math.nan}, r"tolerance=nan"),
        ({"tolerance": 5.0, "upper": 5.0}, r"tolerance=5\.0.*less than the range"),
        ({"tolerance": 1.5, "mode": "max", "upper": 1.0}, r"tolerance=1\.5.*range"),
        ({"horizon": 0}, r"horizon=0.*>= 1"),
    ],
)
def test_bad_tolerance_or_horizon_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptiveValidator(**kwargs)  # type: ignore[arg-type]


# -- the validator across a fit ----------------------------------------------------------------


def near_ties(seed: int, epochs: int = 16, n: int = 3000) -> np.ndarray:
    """A smoothly converging fit: each epoch better by a hair, then a plateau (clamped at 5)."""
    rng = np.random.default_rng(seed)
    base = rng.exponential(0.5, n)
    means = [0.9, 0.6, 0.5, 0.45, 0.43, 0.42, 0.415, 0.412, 0.41, 0.409, 0.4085, 0.4088]
    means += [0.4083, 0.409, 0.4095, 0.41][: epochs - len(means)]
    rows = [np.clip(base * m / 0.5 + 0.1 * rng.standard_normal(n), 0.0, 5.0) for m in means]
    return np.array(rows)


def replay_pairs(
    validator: AdaptiveValidator, rows: np.ndarray, batch: int = 100, declare: bool = False
) -> list[tuple[int, int, Decision, float]]:
    """Replay lazily (the incumbent from its own row); per run with a comparison: (run,
    incumbent run, decision, the pair's exact full-set mean difference). ``declare``: pass
    N to ``begin`` as the callback does."""
    out, incumbent = [], -1
    for epoch, row in enumerate(rows):
        validator.begin(population=row.size if declare else None)
        for start in range(0, row.size, batch):
            if validator.should_stop:
                break
            size = min(batch, row.size - start)
            if validator.incumbent_missing(size):
                validator.extend_incumbent(rows[incumbent][start : start + size])
            validator.observe(row[start : start + size])
        outcome = validator.end()
        if incumbent >= 0 and outcome.comparison:
            mu = float(np.mean(row) - np.mean(rows[incumbent]))
            out.append((epoch, incumbent, outcome.decision, mu))
        if outcome.improved:
            incumbent = epoch
    return out


def test_every_decision_is_exact_or_within_the_tolerance_and_it_saves_more() -> None:
    eps = 0.01
    saved = {}
    for tolerance in (None, eps):
        zone_calls = 0
        cost = 0.0
        for seed in range(3):
            rows = near_ties(seed)
            validator = AdaptiveValidator(upper=5.0, tolerance=tolerance)
            for _, _, decision, mu in replay_pairs(validator, rows):
                exact = Decision.IMPROVED if mu < 0 else Decision.NOT_IMPROVED
                if decision is not exact:
                    assert tolerance is not None and abs(mu) < tolerance
                    zone_calls += 1
            cost += validator.evaluated_total / validator.population_total
        saved[tolerance] = 1 - cost / 3
        assert tolerance is not None or zone_calls == 0
    # measured: 14 % strict, 23 % (28 % with calls on the running mean's side alone)
    assert saved[eps] > saved[None] + 0.05


def test_with_a_tolerance_the_first_run_stops_after_a_batch_and_decisions_hold() -> None:
    """Given N, the first run (nothing to compare with) stops after its first batch; its
    other values are evaluated lazily, as deep as later comparisons need. The strict mode
    keeps its full first pass."""
    costs = {}
    for tolerance, declare in ((0.01, False), (0.01, True), (None, True)):
        cost = 0.0
        for seed in range(3):
            rows = near_ties(seed)
            validator = AdaptiveValidator(upper=5.0, tolerance=tolerance)
            pairs = replay_pairs(validator, rows, declare=declare)
            for _, _, decision, mu in pairs:
                exact = Decision.IMPROVED if mu < 0 else Decision.NOT_IMPROVED
                assert decision is exact or (tolerance is not None and abs(mu) < tolerance)
            assert pairs[0][0] == 1  # run 1 was compared with run 0
            cost += validator.evaluated_total / validator.population_total
        costs[tolerance, declare] = cost / 3
    first = AdaptiveValidator(upper=5.0, tolerance=0.01)
    first.begin(population=3000)
    first.observe(np.full(100, 0.5))
    assert first.should_stop
    outcome = first.end()
    assert (outcome.evaluated, outcome.exact, outcome.improved) == (100, False, True)
    assert outcome.value == 0.5 and first.needs_weights and first.known == 100
    nan = AdaptiveValidator(upper=5.0, tolerance=0.01)  # a non-finite value: a full pass
    nan.begin(population=300)
    nan.observe(np.array([0.5, np.nan]))
    assert not nan.should_stop
    nan.observe(np.full(298, 0.5))
    assert math.isnan(nan.end().value)
    strict = AdaptiveValidator(upper=5.0)
    strict.begin(population=3000)
    strict.observe(np.full(100, 0.5))
    assert not strict.should_stop
    # measured: 0.766 without N, 0.708 with it; strict 0.849 either way
    assert costs[0.01, True] < costs[0.01, False] - 0.01


def test_alpha_is_spent_per_pair_of_runs_with_a_tolerance() -> None:
    """With a tolerance the compared pair depends on earlier calls inside the zone, so the
    budget of run r against the incumbent of run j is alpha_r * 6 / (pi^2 (r - j)^2)."""
    rows = near_ties(0)
    validator = AdaptiveValidator(upper=5.0, tolerance=0.01, alpha=0.05)
    incumbent = -1
    for run, row in enumerate(rows):
        validator.begin()
        for start in range(0, row.size, 100):
            if validator.should_stop:
                break
            if validator.incumbent_missing(100):
                validator.extend_incumbent(rows[incumbent][start : start + 100])
            validator.observe(row[start : start + 100])
        outcome = validator.end()
        if run > 0:
            expected = alpha_spending(0.05, run) * alpha_spending(1.0, run - incumbent)
            assert outcome.alpha == pytest.approx(expected, rel=1e-12)
        if outcome.improved:
            incumbent = run


def test_a_known_horizon_spends_alpha_evenly_and_stops_testing_beyond_it() -> None:
    rows = near_ties(1)
    validator = AdaptiveValidator(upper=5.0, incumbent="values", horizon=5)
    alphas = []
    for row in rows[:8]:
        validator.begin()
        for start in range(0, row.size, 100):
            if validator.should_stop:
                break
            validator.observe(row[start : start + 100])
        alphas.append(validator.end().alpha)
    assert alphas[0] == 0.0
    assert alphas[1:6] == [pytest.approx(0.05 / 5)] * 5
    assert alphas[6:] == [0.0] * 2  # beyond the horizon: full passes, no error budget left


# -- the callback in a real fit (CPU) ----------------------------------------------------------


class Recorder(Callback):
    """Per validation run of the fit: the per-example values and what was logged."""

    def __init__(self) -> None:
        self.values: list[list[np.ndarray]] = []
        self.logged: list[dict[str, float]] = []

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.values.append([])

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        if not trainer.sanity_checking:
            self.values[-1].append(outputs["per_example_loss"].double().cpu().numpy())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


class Net(pl.LightningModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def __init__(self, per_token: bool = False) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
        )
        self.per_token = per_token

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y, reduction="none").clamp(max=5.0)
        return {"per_example_loss": torch.cat([loss, loss]) if self.per_token else loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def fit_net(
    root: Path,
    per_token: bool = False,
    limit_val_batches: int | None = None,
    val_batch: int = 200,
    drop_last: bool = False,
    **adaptive: Any,
) -> tuple[tuple[int, str], Recorder, AdaptiveValidation]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4500, 8, generator=gen)
    y = (x[:, 0] + x[:, 1] ** 2 - 1 + 0.8 * torch.randn(4500, generator=gen) > 0).long()
    pl.seed_everything(0, verbose=False)
    train = DataLoader(
        TensorDataset(x[:500], y[:500]),
        batch_size=50,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    val = DataLoader(
        AdaptiveValidation.permute_once(TensorDataset(x[500:], y[500:])),
        batch_size=val_batch,
        drop_last=drop_last,
    )
    callback = AdaptiveValidation(upper=5.0, **adaptive)
    es = EarlyStopping(monitor="val_loss", patience=3)
    mc = ModelCheckpoint(dirpath=root, monitor="val_loss", save_top_k=1)
    record = Recorder()
    pl.Trainer(
        max_epochs=12,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        limit_val_batches=limit_val_batches,
        callbacks=[callback, es, mc, record],
    ).fit(Net(per_token), train, val)
    return (es.stopped_epoch, Path(mc.best_model_path).name.split("-")[0]), record, callback


def test_a_fit_with_a_tolerance_decides_as_its_replay_and_logs_the_tolerance(
    tmp_path: Path,
) -> None:
    full, full_record, _ = fit_net(tmp_path / "full", enabled=False)
    decided, record, callback = fit_net(tmp_path / "tol", tolerance=0.02)
    validator = AdaptiveValidator(upper=5.0, tolerance=0.02)
    incumbent, replayed = -1, []
    for run, batches in enumerate(full_record.values[: len(record.logged)]):
        validator.begin(population=4000)  # what the callback reads off the dataset
        for i, batch in enumerate(batches):
            if validator.should_stop:
                break
            if validator.incumbent_missing(batch.size):
                validator.extend_incumbent(full_record.values[incumbent][i])
            validator.observe(batch)
        outcome = validator.end()
        incumbent = run if outcome.improved else incumbent
        replayed.append((outcome.value, outcome.fraction_evaluated))
    assert replayed == [
        (r["val_loss"], r["green/validation/fraction_evaluated"]) for r in record.logged
    ]
    assert all(r["green/validation/tolerance"] == 0.02 for r in record.logged)
    assert "green/validation/tolerance" not in full_record.logged[0]  # strict: not logged
    assert callback.validator.skipped_total > 0
    assert decided == full  # (here; in general only up to calls inside the zone)
    # the first run stopped after its first batch (200 of 4000) and logged that estimate
    assert record.logged[0]["green/validation/fraction_evaluated"] == 0.05
    assert record.logged[0]["green/validation/exact"] == 0.0
    assert record.logged[0]["val_loss"] == pytest.approx(float(np.mean(record.values[0][0])))


@pytest.mark.parametrize("cut", ["limit_val_batches", "per_token", "drop_last"])
def test_the_first_run_is_a_full_pass_where_n_is_not_certain(tmp_path: Path, cut: str) -> None:
    """A limit_val_batches cut, a validation_step that does not give one value per example
    (here two per example), or drop_last (13 batches of 300 hold 3,900 of the 4,000
    examples) leave N unknown before the first full pass: it is made."""
    args: dict[str, Any] = {
        "limit_val_batches": {"limit_val_batches": 10},
        "per_token": {"per_token": True},
        "drop_last": {"val_batch": 300, "drop_last": True},
    }[cut]
    _, record, callback = fit_net(tmp_path, tolerance=0.02, **args)
    first = record.logged[0]
    assert first["green/validation/fraction_evaluated"] == 1.0
    assert first["green/validation/exact"] == 1.0
    assert callback.validator.skipped_total > 0  # later runs still stop early


def test_every_value_returned_counts_with_one_process(tmp_path: Path) -> None:
    """With one process nothing pads the set: a validation_step that returns more values than
    examples (two per example here) is averaged over all of them, as Lightning would."""
    _, record, _ = fit_net(tmp_path, per_token=True, enabled=False)
    for logged, batches in zip(record.logged, record.values, strict=True):
        assert logged["val_loss"] == pytest.approx(float(np.mean(np.concatenate(batches))))


def test_a_numpy_tolerance_is_accepted() -> None:
    assert AdaptiveValidation(upper=5.0, tolerance=np.float32(0.01)).tolerance == pytest.approx(
        0.01
    )


def test_bad_tolerance_is_refused_by_the_callback_naming_it() -> None:
    with pytest.raises(MisconfigurationException, match=r"tolerance=-1.*>= 0"):
        AdaptiveValidation(tolerance=-1.0)
    with pytest.raises(MisconfigurationException, match=r"tolerance=2.*range"):
        AdaptiveValidation(mode="max", tolerance=2.0)


def test_an_unbounded_loss_with_a_tolerance_says_once_what_it_can_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="green_mlops")
    callback = AdaptiveValidation(tolerance=0.05, upper=None)  # the unclamped loss
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(600, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    ).fit(
        Net(),
        DataLoader(TensorDataset(x[:100], y[:100]), batch_size=50),
        DataLoader(
            AdaptiveValidation.permute_once(TensorDataset(x[100:], y[100:])), batch_size=100
        ),
    )
    said = [r for r in caplog.records if "tolerance" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING  # seen without configuring
    text = said[0].getMessage()
    assert "not improved" in text and "in full" in text and "upper=" in text
    assert "beat the best by 0.05 or more" in text and "-0.05" not in text
