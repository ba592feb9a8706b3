"""What limits adaptive validation's savings with a tolerance: counterfactual replays.

On the trajectories of ``benchmarks/adaptive_validation.py`` (same problems, seeds, CE<=5,
``EarlyStopping(patience=3)``, tolerance 0.01), the default policy is replayed beside variants
of it, each changing one thing in this process only (module attributes patched; the library
is not changed). Variants that are not valid tests are marked so; they bound what a lever
could give, they are not candidates:

* ``hindsight bet`` (not valid): each side's bet is the constant growth-optimal (Kelly) bet
  for that comparison's full-set differences, chosen knowing them, instead of the plug-in bet
  estimated from the examples seen. Measures what a better betting strategy could still gain.
* ``bet cap 0.99``: an example may put 99 % of the wealth at risk instead of 90 %.
* ``spending 1/k^1.5``: alpha spent as ``1 / k^1.5`` over runs (``1 / k^2`` today).
* ``sign_z 2.5`` / ``sign_z 2``: the in-zone agreement rule at fewer standard errors.
* ``oracle relevance`` (not valid): calls inside the zone wait for the running mean's side
  only where flipping that call would change full validation's best or stop epoch (known
  from the full-set means); elsewhere the first call a test allows is made. Measures what
  knowing which calls matter could save.

Then, for the default policy: where the validation forward passes go (first run, candidates,
the incumbent's lazy evaluations; pooled over seeds), and the candidates' examples over those
of the optimistic z-test with the zone (``oracle_cost(tolerance=)``'s stopping rule, at each
comparison's budget) on the same comparisons.

    python benchmarks/adaptive_limits.py --cache /tmp/cache   # ~3 min on 2 cores with a warm cache
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from adaptive_validation import (  # benchmarks/, on the path when run as a script
    CLAMP,
    EVAL_SEEDS,
    PATIENCE,
    TARGET_TOLERANCE,
    VAL_BATCH,
    Array,
    cached_train,
    early_stopping,
    full_policy,
)

from green_mlops.adaptive import AdaptiveValidator, betting, comparison
from green_mlops.adaptive import validator as validator_module

CONFIGS = ((5000, 1e-3), (5000, 1e-2), (20_000, 1e-3), (20_000, 1e-2))


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def outcome(means: Array, patience: int, flip: int | None = None) -> tuple[int, int]:
    """(best, stop) of full validation on exact means, with run ``flip``'s call reversed."""
    incumbent, wait = 0, 0
    for run in range(1, len(means)):
        improved = bool(means[run] < means[incumbent]) != (run == flip)
        if improved:
            incumbent, wait = run, 0
        else:
            wait += 1
            if wait >= patience:
                return incumbent, run
    return incumbent, len(means) - 1


class Replay:
    """One replay of the default tolerant policy, with hooks for the variants; records per
    comparison (run, incumbent run, candidate examples, incumbent examples)."""

    def __init__(self, val: Array, hindsight: bool = False, quiet: set[int] | None = None):
        self.val, self.hindsight, self.quiet = val, hindsight, quiet
        self.rows: list[tuple[int, int, int, int]] = []
        self.cost = 0

    def run(self) -> tuple[int, tuple[int, int]]:
        val, n = self.val, self.val.shape[1]
        validator = AdaptiveValidator(upper=CLAMP, tolerance=TARGET_TOLERANCE)
        logged: list[tuple[int, float]] = []
        cost, best = 0, -1
        for epoch, row in enumerate(val):
            validator.begin(population=n)
            test = validator._test
            if test is not None and best >= 0:
                self._adjust(test, row - val[best], epoch)
            for start in range(0, n, VAL_BATCH):
                if validator.should_stop:
                    break
                size = min(VAL_BATCH, n - start)
                if validator.incumbent_missing(size):
                    validator.extend_incumbent(val[best][start : start + size])
                validator.observe(row[start : start + size])
            result = validator.end()
            cost += result.evaluated + result.incumbent_evaluated
            if best >= 0:
                self.rows.append((epoch, best, result.evaluated, result.incumbent_evaluated))
            if result.improved:
                best = epoch
            logged.append((epoch, result.value))
            decided = early_stopping(logged, len(val) - 1, PATIENCE)
            if decided[1] == epoch:
                break
        self.cost = cost
        return cost, decided

    def _adjust(self, test: comparison.PairedComparison, d: Array, epoch: int) -> None:
        if self.quiet is not None and epoch in self.quiet:
            test.sign_z = 0.0  # this call cannot change the outcome: no waiting
        if self.hindsight:
            for side, y in ((test._low, d), (test._high, -d)):
                if side is not None:
                    excess = y - side.threshold
                    side.constant_bet = max(float(np.mean(excess)), 0.0) / float(
                        np.mean(excess * excess)
                    )


def hindsight_update(original: Callable[..., None]) -> Callable[..., None]:
    """OneSidedTest.update with a fixed bet where ``constant_bet`` is set (else unchanged)."""

    def update(self: betting.OneSidedTest, d: Array, start: int, prefix: float) -> None:
        bet = getattr(self, "constant_bet", None)
        if bet is None:
            original(self, d, start, prefix)
            return
        size = d.size
        self._d[start : start + size] = d
        self.fed = start + size
        excess = d - self._null_means(self.threshold, d, start, prefix)
        least = self.least(start)
        if math.isfinite(least) and start > 0:
            room = (d - excess) - least
            safe = np.where(room > 0, room, 1.0)
            lam = np.where(room > 0, np.minimum(bet, betting.BET_CAP / safe), 0.0)
            self._bet[start : start + size] = lam
            self.log_wealth += float(np.sum(np.log1p(lam * excess)))
            self.rejected = self.rejected or self.log_wealth >= self.log_inv_alpha
        self._x_sum += float(np.sum(excess))
        self._x_sq += float(np.sum(excess * excess))

    return update


def spending(power: float) -> Callable[..., float | None]:
    zeta = sum(1.0 / k**power for k in range(1, 200_000))

    def budget(alpha: float, k: int, *, horizon: int | None, pair: Any) -> float | None:
        run, incumbent = pair
        run = max(1, run)
        return alpha / (zeta * run**power) * betting.alpha_spending(1.0, max(1, run - incumbent))

    return budget


def trajectories(n: int, lr: float, seeds: Sequence[int], cache: Path | None) -> list[Array]:
    return [np.minimum(cached_train("synthetic", n, s, lr, cache).val, CLAMP) for s in seeds]


def variant(vals: list[Array], **replay: Any) -> tuple[float, float, list[Replay]]:
    """(saved: the mean over seeds, as adaptive_validation.py reports it; share of seeds
    with full validation's best and stop epochs; the replays)."""
    saved, same = 0.0, 0
    replays = []
    for val in vals:
        quiet = None
        if replay.get("relevance"):
            means = val.mean(axis=1)
            base = outcome(means, PATIENCE)
            quiet = {r for r in range(1, base[1] + 1) if outcome(means, PATIENCE, r) == base}
        r = Replay(val, hindsight=replay.get("hindsight", False), quiet=quiet)
        spent, decided = r.run()
        reference = full_policy(val, CLAMP, PATIENCE)
        saved += 1 - spent / reference.cost
        same += decided == (reference.best, reference.stop)
        replays.append(r)
    return saved / len(vals), same / len(vals), replays


def z_test_stop(d: Array, alpha: float) -> int:
    """Where the optimistic tolerant z-test (oracle_cost's rule) stops on differences d."""
    n, gap, sd = d.size, abs(float(np.mean(d))) + TARGET_TOLERANCE, float(np.std(d))
    z = NormalDist().inv_cdf(1 - alpha)
    for m in range(VAL_BATCH, n, VAL_BATCH):
        if gap > z * sd * math.sqrt((1 - m / n) / m):
            return m
    return n


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seeds", type=int, default=len(EVAL_SEEDS))
    parser.add_argument("--cache", type=Path, help="adaptive_validation.py's trajectory cache")
    args = parser.parse_args(argv)
    seeds = EVAL_SEEDS[: args.seeds]
    update = betting.OneSidedTest.update
    variants: list[tuple[str, Callable[[list[Array]], tuple[float, float, list[Replay]]]]] = [
        ("default (sign_z 3)", lambda v: variant(v)),
        ("hindsight bet (not valid)", lambda v: variant(v, hindsight=True)),
    ]

    def with_patch(obj: Any, name: str, value: Any) -> Callable[[list[Array]], Any]:
        def run(v: list[Array]) -> Any:
            with patched(obj, name, value):
                return variant(v)

        return run

    variants += [
        ("bet cap 0.99", with_patch(betting, "BET_CAP", 0.99)),
        ("spending 1/k^1.5", with_patch(validator_module, "comparison_budget", spending(1.5))),
        ("sign_z 2.5", with_patch(comparison, "SIGN_Z", 2.5)),
        ("sign_z 2", with_patch(comparison, "SIGN_Z", 2.0)),
        ("oracle relevance (not valid)", lambda v: variant(v, relevance=True)),
    ]
    print(
        f"# Adaptive validation, tolerance {TARGET_TOLERANCE:g}: what limits the savings\n\n"
        f"`python benchmarks/adaptive_limits.py {' '.join(argv or sys.argv[1:])}`".rstrip()
        + f" — {len(seeds)} seeds, CE<={CLAMP:g}, EarlyStopping(patience={PATIENCE}).\n"
    )
    print("| variant | " + " | ".join(f"N={n}, lr {lr:g}" for n, lr in CONFIGS) + " |")
    print("|---|" + "---|" * len(CONFIGS))
    data = {(n, lr): trajectories(n, lr, seeds, args.cache) for n, lr in CONFIGS}
    default: dict[tuple[int, float], list[Replay]] = {}
    betting.OneSidedTest.update = hindsight_update(update)  # type: ignore[method-assign]
    try:
        for name, run in variants:
            cells = []
            for key, vals in data.items():
                saved, same, replays = run(vals)
                if name.startswith("default"):
                    default[key] = replays
                cells.append(f"{saved:.1%} ({same:.0%})")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    finally:
        betting.OneSidedTest.update = update  # type: ignore[method-assign]
    print(
        "\nCells: validation forward passes saved (share of seeds with full validation's best "
        "and stop epochs).\n\nWhere the default's forward passes go (share of full validation's), "
        "and its candidate examples over the optimistic tolerant z-test's on the same "
        "comparisons (its alpha: the comparison's budget):\n"
    )
    print("| N, lr | first runs | candidates | incumbents (lazy) | candidates / z-test |")
    print("|---|---|---|---|---|")
    for (n, lr), replays in default.items():
        full = first = cand = inc = ours = ztest = 0.0
        for val, r in zip(data[n, lr], replays, strict=True):
            reference = full_policy(val, CLAMP, PATIENCE)
            full += reference.cost
            spent = sum(c + i for _, _, c, i in r.rows)
            first += r.cost - spent
            for k, (run, incumbent, c, i) in enumerate(r.rows, start=1):
                cand, inc = cand + c, inc + i
                budget = validator_module.comparison_budget(
                    0.05, k, horizon=None, pair=(run, incumbent)
                )
                ours += c
                ztest += z_test_stop(val[run] - val[incumbent], budget or 0.05)
        print(
            f"| {n}, {lr:g} | {first / full:.1%} | {cand / full:.1%} | {inc / full:.1%} | "
            f"{ours / ztest:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
