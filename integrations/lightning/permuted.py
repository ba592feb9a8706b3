"""``PermutedDataset``: a validation set in one random order drawn once (what
``AdaptiveValidation``'s guarantee rests on; see docs/adaptive-validation.md)."""

from __future__ import annotations

from typing import Generic, TypeVar

import numpy as np
from torch.utils.data import Dataset, IterableDataset

__all__ = ["PermutedDataset"]

T = TypeVar("T")


class PermutedDataset(Dataset[T], Generic[T]):
    """``dataset`` in one random order drawn once from ``seed`` (numpy's generator, so the
    global torch RNG, and with it training, is untouched). The order is what the guarantee of
    ``AdaptiveValidation`` rests on: keep the seed fixed for the whole run (and resumes).
    """

    def __init__(self, dataset: Dataset[T], seed: int = 0) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "PermutedDataset needs a map-style dataset (with __len__ and __getitem__); "
                "shuffle an iterable dataset once at its source and pass "
                "AdaptiveValidation(trust_order=True)"
            )
        self.dataset = dataset
        self.seed = seed
        self.indices: list[int] = np.random.default_rng(seed).permutation(len(dataset)).tolist()  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> T:
        return self.dataset[self.indices[index]]
