"""Blend several datasets in fixed proportions.

Like Megatron's greedy blending, every prefix of the blended sequence holds each dataset in (almost) exactly its
weight: after n samples, dataset d has contributed within about one sample of w_d * n. We get that without a
Python loop per sample: dataset d's k-th sample is given the ideal time (k + phase_d) / w_d, and samples are served
in order of that time (a stable merge). The per-dataset phase in [0, 1) comes from `seed`, so which dataset goes
first is not biased towards the first one listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def build_blending_indices(weights: Sequence[float], num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) for `num_samples` blended samples."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative, finite and not all zero, got {list(weights)}")
    w = w / w.sum()
    phase = np.random.Generator(np.random.PCG64(seed)).uniform(0.0, 1.0, size=len(w))
    times, owners, ranks = [], [], []
    for d in np.flatnonzero(w):
        # The n-th merged time is below n + len(w), so dataset d supplies fewer than w_d * (n + len(w)) + 1 of
        # the first n: these candidates always suffice.
        k = np.arange(int(np.ceil(num_samples * w[d])) + len(w) + 2, dtype=np.int64)
        times.append((k + phase[d]) / w[d])
        owners.append(np.full(len(k), d, dtype=np.int64))
        ranks.append(k)
    order = np.argsort(np.concatenate(times), kind="stable")[:num_samples]
    return np.concatenate(owners)[order], np.concatenate(ranks)[order]


class BlendableDataset:
    """Sample i is `datasets[dataset_index[i]][dataset_sample_index[i]]`."""

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], num_samples: int, seed: int,
                 indices: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """`indices`: `build_blending_indices(weights, num_samples, seed)` when the caller already has them (it
        needed them to size the datasets), so a large blend is not merged twice."""
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.num_samples = num_samples
        if indices is None:
            indices = build_blending_indices(weights, num_samples, seed)
        self.dataset_index, self.dataset_sample_index = indices
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (dataset, count) in enumerate(zip(self.datasets, counts)):
            if count > len(dataset):
                raise ValueError(f"blend needs {count} samples from dataset {d} but it has only {len(dataset)}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Any:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
