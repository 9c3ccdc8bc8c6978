"""Uncertainty of an accuracy and of the difference between two runs on the same questions.

- wilson_interval: the Wilson score interval (Wilson 1927), the interval AstroSage's plots use; unlike the normal
  approximation it stays inside [0, 1] and is sensible at 0% and 100%.
- paired_difference: run B minus run A on the same questions. Because the questions are shared, the difference is
  judged from the discordant pairs only: McNemar's exact test (two-sided binomial on b vs c) for "is there a
  difference", and a paired bootstrap (questions resampled, both runs together) for its 95% interval.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _binom_two_sided(b: int, c: int) -> float:
    """Exact two-sided p-value of McNemar's test: b successes of b + c trials at p = 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


def paired_difference(a: Sequence[bool], b: Sequence[bool], resamples: int = 10000, seed: int = 0) -> dict:
    """Accuracy of B minus accuracy of A on the same questions (a[i], b[i]: question i right in each run)."""
    a_arr, b_arr = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a_arr.shape != b_arr.shape or a_arr.size == 0:
        raise ValueError("paired_difference needs two equally long, non-empty lists")
    n = a_arr.size
    only_a, only_b = int((a_arr & ~b_arr).sum()), int((~a_arr & b_arr).sum())
    diff = b_arr.astype(np.float64) - a_arr.astype(np.float64)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: bounded memory on 4,425 questions
        idx = rng.integers(0, n, size=(min(1000, resamples - start), n))
        boot[start:start + len(idx)] = diff[idx].mean(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"n": n, "accuracy_a": float(a_arr.mean()), "accuracy_b": float(b_arr.mean()),
            "difference": float(diff.mean()), "ci95": [float(lo), float(hi)],
            "only_a_correct": only_a, "only_b_correct": only_b, "mcnemar_p": _binom_two_sided(only_a, only_b),
            "bootstrap_resamples": resamples}
