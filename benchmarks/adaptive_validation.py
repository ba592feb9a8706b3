"""Adaptive validation: validation compute saved, and decisions kept, against simpler policies.

Method. For each seed, a small MLP is trained once for a fixed number of epochs with full
validation, recording every validation example's loss at every epoch and the test error of
every epoch's model. Validation policies are then *replayed* on these identical trajectories,
each driving the same EarlyStopping (patience 3, min_delta 0) + ModelCheckpoint(save_top_k=1)
logic: full validation; a fixed random 50 % / 25 % subset every epoch; validation every second
epoch (``check_val_every_n_epoch=2``); and ``AdaptiveValidation`` (the
``green_mlops.adaptive.AdaptiveValidator`` the callback runs, batch size 64, examples in a
random order fixed once per seed). Reported, per problem, over the evaluation seeds:

* ``val cost``: validation forward passes until the policy stops, / those of full validation;
* ``same best`` / ``same stop``: share of seeds whose best epoch (kept checkpoint) / stop epoch
  equals full validation's;
* ``test regret``: test error of the kept checkpoint minus the lowest test error among all
  recorded epochs, in percentage points (mean over seeds);
* ``train epochs``: epochs trained, relative to full validation (a later stop costs training);
* a ceiling: the share of full validation's runs that do not improve on the best so far.
  AdaptiveValidation completes every improving run (the next comparisons need the new best's
  every value), so no setting of it can save more than this share.

Problems: scikit-learn's bundled digits (697 train / 700 validation / 400 test) and a
synthetic 4-class problem (``make_classification``, 20 features, 5 % label noise; 2,000 train
/ 5,000 validation / 5,000 test), each in two regimes: Adam at lr 1e-3 (default, smooth
curves) and 1e-2 (noisier curves). Seeds 0-23 are the evaluation seeds; design choices
(bet-size rule, scale, no clipping of the incumbent) were made on seeds 100-109 only.

Finally a few live Lightning fits (lr 1e-2) check that the callback decides exactly as its
replay: each seed is fitted with ``AdaptiveValidation(enabled=False)`` (recording every
per-example loss) and with ``AdaptiveValidation()``; the stop epoch and kept checkpoint must be
equal, and each run's logged value and fraction evaluated must equal the replay of the first
fit's recorded losses. It ends with a PASS/FAIL line per target of issue 6 (exit status 0
when all pass).

    python benchmarks/adaptive_validation.py                 # ~2-3 min on 2 cores
    python benchmarks/adaptive_validation.py --quick         # smoke run, indicative only
    python benchmarks/adaptive_validation.py --output benchmarks/results/adaptive_validation.md
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from green_mlops.adaptive import AdaptiveValidator

Array = npt.NDArray[np.float64]

PATIENCE = 3
MAX_EPOCHS = 40
VAL_BATCH = 64
TRAIN_BATCH = 32
HIDDEN = 64
EVAL_SEEDS = tuple(range(24))
REGIMES = (1e-3, 1e-2)


# -- data and training -------------------------------------------------------------------------


def problem_data(problem: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train, validation, test) as (features, labels) tensors."""
    if problem == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        idx = np.random.default_rng(seed).permutation(len(y))
        parts = [idx[:697], idx[697:1397], idx[1397:]]
        x = x / 16.0
    else:
        from sklearn.datasets import make_classification

        x, y = make_classification(
            n_samples=12_000,
            n_features=20,
            n_informative=8,
            n_redundant=4,
            n_classes=4,
            flip_y=0.05,
            random_state=seed,
        )
        parts = [np.arange(2000), np.arange(2000, 7000), np.arange(7000, 12_000)]
        x = (x - x[parts[0]].mean(0)) / x[parts[0]].std(0)
    return [
        (torch.as_tensor(x[p], dtype=torch.float32), torch.as_tensor(y[p], dtype=torch.long))
        for p in parts
    ]


def mlp(inputs: int, classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, classes),
    )


@dataclass
class Trajectory:
    val: Array  # [epochs, N] per-example validation loss, in the fixed random order
    test_error: Array  # [epochs]


def train(problem: str, seed: int, lr: float, epochs: int = MAX_EPOCHS) -> Trajectory:
    (xtr, ytr), (xva, yva), (xte, yte) = problem_data(problem, seed)
    torch.manual_seed(seed)
    model = mlp(xtr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(yva))  # = PermutedDataset(seed=seed)
    val, err = [], []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=shuffle)
        for start in range(0, len(ytr), TRAIN_BATCH):
            b = perm[start : start + TRAIN_BATCH]
            loss = F.cross_entropy(model(xtr[b]), ytr[b])
            opt.zero_grad()
            torch.autograd.backward(loss)
            opt.step()
        model.eval()
        with torch.no_grad():
            losses = F.cross_entropy(model(xva), yva, reduction="none")
            val.append(losses.to(torch.float64).numpy()[order])
            err.append(float((model(xte).argmax(1) != yte).float().mean()))
    return Trajectory(np.array(val), np.array(err))


# -- policies (replayed) -----------------------------------------------------------------------


@dataclass
class Run:
    best: int  # epoch of the kept checkpoint
    stop: int  # last epoch trained
    cost: int  # validation forward passes until the stop


def early_stopping(logged: Sequence[tuple[int, float]], last_epoch: int) -> tuple[int, int]:
    """(best epoch, stop epoch) of EarlyStopping(patience, min_delta=0) acting at validation
    end + ModelCheckpoint(save_top_k=1), given (epoch, value) of each validation run."""
    best, wait, best_epoch = math.inf, 0, -1
    for epoch, value in logged:
        if value < best:
            best, wait, best_epoch = value, 0, epoch
        else:
            wait += 1
            if wait >= PATIENCE:
                return best_epoch, epoch
    return best_epoch, last_epoch


def full_policy(t: Trajectory) -> Run:
    values = [(e, float(np.mean(row))) for e, row in enumerate(t.val)]
    best, stop = early_stopping(values, len(t.val) - 1)
    return Run(best, stop, t.val.shape[1] * (stop + 1))


def subset_policy(fraction: float) -> Callable[[Trajectory], Run]:
    def policy(t: Trajectory) -> Run:
        n = round(fraction * t.val.shape[1])  # the first n of a random order: a random subset
        values = [(e, float(np.mean(row[:n]))) for e, row in enumerate(t.val)]
        best, stop = early_stopping(values, len(t.val) - 1)
        return Run(best, stop, n * (stop + 1))

    return policy


def every_second_epoch(t: Trajectory) -> Run:
    epochs = [e for e in range(len(t.val)) if (e + 1) % 2 == 0]  # Lightning's schedule
    values = [(e, float(np.mean(t.val[e]))) for e in epochs]
    best, stop = early_stopping(values, len(t.val) - 1)
    return Run(best, stop, t.val.shape[1] * sum(1 for e in epochs if e <= stop))


def adaptive_policy(alpha: float) -> Callable[[Trajectory], Run]:
    def policy(t: Trajectory) -> Run:
        validator = AdaptiveValidator(alpha=alpha)
        logged, cost = [], 0
        for epoch, row in enumerate(t.val):
            validator.begin()
            for start in range(0, row.size, VAL_BATCH):
                if validator.should_stop:
                    break
                validator.observe(row[start : start + VAL_BATCH])
            outcome = validator.end()
            logged.append((epoch, outcome.value))
            cost += outcome.evaluated
            best, stop = early_stopping(logged, len(t.val) - 1)
            if stop == epoch:
                return Run(best, stop, cost)
        best, stop = early_stopping(logged, len(t.val) - 1)
        return Run(best, stop, cost)

    return policy


POLICIES: dict[str, Callable[[Trajectory], Run]] = {
    "full validation": full_policy,
    "fixed 50% subset": subset_policy(0.5),
    "fixed 25% subset": subset_policy(0.25),
    "check_val_every_n_epoch=2": every_second_epoch,
    "AdaptiveValidation (alpha=0.05, default)": adaptive_policy(0.05),
    "AdaptiveValidation (alpha=0.01)": adaptive_policy(0.01),
}


def non_improving_share(t: Trajectory, run: Run) -> tuple[int, int]:
    """(runs with an incumbent that do not improve, runs with an incumbent) up to the stop."""
    best, bad = math.inf, 0
    for row in t.val[: run.stop + 1]:
        mean = float(np.mean(row))
        if mean < best:
            best = mean
        else:
            bad += 1
    return bad, run.stop


DEFAULT = "AdaptiveValidation (alpha=0.05, default)"


@dataclass
class Summary:
    saved: float  # 1 - mean validation cost of the default AdaptiveValidation
    same_best: float
    same_stop: float
    regret: float
    full_regret: float


def evaluate(trajectories: Sequence[Trajectory]) -> tuple[list[list[str]], str, Summary]:
    runs = {name: [policy(t) for t in trajectories] for name, policy in POLICIES.items()}
    full = runs["full validation"]
    rows = []
    summary: dict[str, tuple[float, float, float, float]] = {}
    for name, policy_runs in runs.items():
        cost = [r.cost / f.cost for r, f in zip(policy_runs, full, strict=True)]
        best = np.mean([r.best == f.best for r, f in zip(policy_runs, full, strict=True)])
        stop = np.mean([r.stop == f.stop for r, f in zip(policy_runs, full, strict=True)])
        regret = [
            100 * (t.test_error[r.best] - t.test_error.min())
            for r, t in zip(policy_runs, trajectories, strict=True)
        ]
        epochs = [(r.stop + 1) / (f.stop + 1) for r, f in zip(policy_runs, full, strict=True)]
        summary[name] = (1 - float(np.mean(cost)), float(best), float(stop), float(np.mean(regret)))
        rows.append(
            [
                name,
                f"{np.mean(cost):.3f} ({min(cost):.2f}-{max(cost):.2f})",
                f"{best:.0%}",
                f"{stop:.0%}",
                f"{np.mean(regret):.2f}",
                f"{np.mean(epochs):.2f}",
            ]
        )
    bad = [non_improving_share(t, r) for t, r in zip(trajectories, full, strict=True)]
    share = sum(b for b, _ in bad) / max(1, sum(n for _, n in bad))
    stops = [r.stop + 1 for r in full]
    note = (
        f"Full validation trained {np.mean(stops):.1f} epochs on average ({min(stops)}-"
        f"{max(stops)}); {share:.0%} of its validation runs after the first did not improve "
        f"on the best so far (ceiling on AdaptiveValidation's saving: {share:.0%})."
    )
    return rows, note, Summary(*summary[DEFAULT], full_regret=summary["full validation"][3])


# -- live Lightning fits -----------------------------------------------------------------------


def live_check(problem: str, seed: int, lr: float) -> tuple[bool, str]:
    """Fit with full and adaptive validation; compare decisions, and the adaptive fit with the
    replay of the full fit's recorded per-example losses."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from green_mlops.integrations.lightning import AdaptiveValidation

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    (xtr, ytr), (xva, yva), _ = problem_data(problem, seed)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(xtr.shape[1], int(ytr.max()) + 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            x, y = batch
            return {"per_example_loss": F.cross_entropy(self.net(x), y, reduction="none")}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=lr)

    class Record(Callback):
        def __init__(self) -> None:
            self.values: list[list[Array]] = []
            self.logged: list[tuple[float, float]] = []

        def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                self.values.append([])

        def on_validation_batch_end(
            self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any
        ) -> None:
            if not trainer.sanity_checking:
                self.values[-1].append(outputs["per_example_loss"].double().numpy())

        def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                m = trainer.callback_metrics
                fraction = float(m["green/validation/fraction_evaluated"])
                self.logged.append((float(m["val_loss"]), fraction))

    def fit(enabled: bool, root: str) -> tuple[int, str, Record]:
        pl.seed_everything(seed, verbose=False)
        train_loader = DataLoader(
            TensorDataset(xtr, ytr),
            batch_size=TRAIN_BATCH,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        val = AdaptiveValidation.permute_once(TensorDataset(xva, yva), seed=seed)
        record = Record()
        es = EarlyStopping("val_loss", patience=PATIENCE)
        mc = ModelCheckpoint(dirpath=root, monitor="val_loss", save_top_k=1)
        trainer = pl.Trainer(
            max_epochs=MAX_EPOCHS,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[AdaptiveValidation(enabled=enabled), es, mc, record],
        )
        trainer.fit(Module(), train_loader, DataLoader(val, batch_size=VAL_BATCH))
        return es.stopped_epoch, Path(mc.best_model_path).name.split("-")[0], record

    with tempfile.TemporaryDirectory() as tmp:
        full = fit(False, f"{tmp}/full")
        adaptive = fit(True, f"{tmp}/adaptive")
    validator = AdaptiveValidator()
    replayed = []
    for batches in full[2].values:
        validator.begin()
        for batch in batches:
            if validator.should_stop:
                break
            validator.observe(batch)
        outcome = validator.end()
        replayed.append((outcome.value, outcome.fraction_evaluated))
    same = full[:2] == adaptive[:2] and replayed == adaptive[2].logged
    saved = 1 - np.mean([f for _, f in adaptive[2].logged])
    detail = (
        f"{problem} seed {seed}: stop epoch {adaptive[0]} / {full[0]}, best {adaptive[1]} / "
        f"{full[1]}, {len(adaptive[2].logged)} runs match the replay: "
        f"{replayed == adaptive[2].logged}, {saved:.0%} of validation forward passes saved"
    )
    return same, detail


# -- main --------------------------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    header = [
        "policy",
        "val cost (min-max)",
        "same best",
        "same stop",
        "test regret (pp)",
        "train epochs",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 seeds, 1 live fit")
    parser.add_argument("--seeds", type=int, default=len(EVAL_SEEDS))
    parser.add_argument("--live-seeds", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    seeds = EVAL_SEEDS[: 4 if args.quick else args.seeds]
    live_seeds = EVAL_SEEDS[: 1 if args.quick else args.live_seeds]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    started = time.monotonic()
    out = [
        "# Adaptive validation benchmark",
        "",
        f"`python benchmarks/adaptive_validation.py` — {len(seeds)} evaluation seeds per problem, "
        f"EarlyStopping patience {PATIENCE}, up to {MAX_EPOCHS} epochs, validation batch "
        f"{VAL_BATCH}. Method and definitions: the script's docstring.",
        "",
    ]
    summaries: dict[tuple[str, float], Summary] = {}
    for problem, n_val in (("digits", 700), ("synthetic", 5000)):
        for lr in REGIMES:
            trajectories = [train(problem, seed, lr) for seed in seeds]
            rows, note, summaries[problem, lr] = evaluate(trajectories)
            out += [f"## {problem}, N = {n_val} validation examples, Adam lr {lr:g}", ""]
            out += [table(rows), "", note, ""]
            print("\n".join(out[-6:]), flush=True)
    out += ["## Live Lightning fits (lr 0.01): callback vs its replay vs full validation", ""]
    ok = True
    for problem in ("digits", "synthetic"):
        for seed in live_seeds:
            same, detail = live_check(problem, seed, 1e-2)
            ok &= same
            out.append(f"- {'identical' if same else 'DIFFERENT'}: {detail}")
            print(out[-1], flush=True)
    title = "## Targets (default AdaptiveValidation, alpha = 0.05)"
    out += ["", title, ""]
    verdicts = [ok]
    out.append(
        f"- {'PASS' if ok else 'FAIL'}: live Lightning fits decide exactly as their replay and "
        "as full validation"
    )
    for (problem, lr), result in summaries.items():
        big = problem == "synthetic"
        checks = [
            (
                result.same_best >= 0.95 and result.same_stop >= 0.95,
                f"same best epoch in {result.same_best:.0%}, same stop epoch in "
                f"{result.same_stop:.0%} of seeds (target >= 95%)",
            ),
            (
                result.regret <= result.full_regret + 1e-9,
                f"test regret {result.regret:.2f} pp vs {result.full_regret:.2f} pp with full "
                "validation (target: no worse)",
            ),
        ]
        if big:
            checks.append(
                (
                    result.saved >= 0.5,
                    f"{result.saved:.1%} of validation forward passes saved (target >= 50% at "
                    "N >= 5,000)",
                )
            )
        for passed, text in checks:
            verdicts.append(passed)
            out.append(f"- {'PASS' if passed else 'FAIL'}: {problem}, lr {lr:g}: {text}")
        if not big:
            out.append(
                f"- (reported) {problem}, lr {lr:g}: {result.saved:.1%} of validation forward "
                "passes saved"
            )
    out += ["", f"Total time {time.monotonic() - started:.0f} s."]
    print("\n".join(out[out.index(title) :]), flush=True)
    report = "\n".join(out) + "\n"
    if args.output:
        args.output.write_text(report, encoding="utf-8")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
