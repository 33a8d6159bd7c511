"""Intervals for comparing runs: over seeds (Student's t) and over items (a paired bootstrap).

A task's score is the macro average over its UIDs of the per-UID accuracy, as BabyLM reports it
(jaxllava/eval/scoring.py::aggregate). The bootstrap keeps that structure: it resamples items
within each UID, so every resample has the task's UIDs with their sizes, and recomputes the
macro score of both arms on the same resampled items (paired), averaged over each arm's seeds.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # NaN when one value gives no interval
    high: float
    n: int

    def format(self) -> str:
        if math.isnan(self.low):
            return f"{self.mean:.1f} (n={self.n})"
        return f"{self.mean:.1f} [{self.low:.1f}, {self.high:.1f}]"


def seed_interval(values, level: float = 0.95) -> Interval:
    """Mean of per-seed scores with its Student-t interval (NaN bounds for a single seed)."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, len(values))
    half = scipy_stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def macro_accuracy(correct: np.ndarray, groups: np.ndarray) -> float:
    """Percent correct averaged over groups (UIDs) with equal weight; `correct` (items,) in [0, 1]."""
    _, inverse = np.unique(groups, return_inverse=True)
    return float(100.0 * np.mean(np.bincount(inverse, weights=correct) / np.bincount(inverse)))


def paired_bootstrap(first: np.ndarray, second: np.ndarray, groups: np.ndarray, *, samples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> tuple[Interval, float]:
    """The macro-accuracy difference second − first with a percentile interval, and a two-sided p-value.

    first, second: (seeds, items) correctness of each arm on the same items (seed counts may differ);
    groups: (items,) UID of each item. Returns (Interval of the difference in points, p), where p is
    twice the smaller share of resamples on either side of zero (at least 1 / samples).
    """
    first, second = np.atleast_2d(first).mean(axis=0), np.atleast_2d(second).mean(axis=0)
    if first.shape != second.shape or first.shape != np.shape(groups):
        raise ValueError(f"the arms must score the same items: {first.shape}, {second.shape}, {np.shape(groups)}")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    diffs = np.empty(samples)
    for k in range(samples):
        means = [(second[idx] - first[idx]).mean() for idx in
                 (rng.choice(m, size=len(m), replace=True) for m in members)]
        diffs[k] = 100.0 * np.mean(means)
    observed = macro_accuracy(second, groups) - macro_accuracy(first, groups)
    low, high = np.quantile(diffs, [0.5 - level / 2, 0.5 + level / 2])
    p = min(1.0, max(2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)), 1.0 / samples))
    return Interval(observed, float(low), float(high), samples), float(p)
