"""Uncertainty of the figures a report shows: seeded percentile-bootstrap intervals over held-out items.

Every headline metric of a stage is a mean over held-out items (conversations, preference pairs, prompts,
problems, validation windows), and `metrics.json` keeps the per-item values of the validation before training
and of the last one, in the same order. From them:

- `mean_interval(items)`: the interval of the mean (how far the figure could move on another draw of the
  held-out set of the same size);
- `difference_interval(after, before)`: the interval of the change `mean(after) - mean(before)`, paired (the
  mean of per-item differences, resampling items) when both hold the same number of items, i.e. the same
  held-out set; unpaired (each side resampled on its own) otherwise;
- `verdict(change, direction)`: "yes" only when the change's interval excludes 0 in the metric's good
  direction, "worse" when it excludes 0 in the other, "within noise" when it contains 0.

Pure functions of lists of floats (numpy only): the report, the sweep summary and tests call them alike. The
same seed gives the same interval, so a report regenerated from the same run prints the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 4000  # enough for the 2.5% / 97.5% percentiles to be stable to about a tenth of the interval's width


@dataclass(frozen=True)
class Interval:
    estimate: float  # the mean (or the change of means) as measured on the items themselves
    low: float
    high: float
    n: int  # items (pairs, for a paired change; the smaller side for an unpaired one)
    paired: bool = False

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def _as_array(items: Sequence[float], what: str) -> np.ndarray:
    values = np.asarray(items, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{what}: expected a non-empty list of numbers, got {len(values)} items")
    return values


def _resampled_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of `resamples` resamples with replacement (in chunks: a few MB at a time, whatever the size)."""
    n = values.size
    chunk = max(1, 2_000_000 // n)
    sizes = [min(chunk, resamples - start) for start in range(0, resamples, chunk)]
    return np.concatenate([values[rng.integers(0, n, size=(size, n))].mean(1) for size in sizes])


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mean_interval(items: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of `items`."""
    values = _as_array(items, "mean_interval")
    rng = np.random.default_rng(seed)
    low, high = _percentiles(_resampled_means(values, rng, resamples), level)
    return Interval(float(values.mean()), low, high, values.size)


def difference_interval(
    after: Sequence[float], before: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of mean(after) - mean(before): paired over items when the two lists are the
    same length (the same held-out items in the same order), unpaired otherwise."""
    a, b = _as_array(after, "difference_interval (after)"), _as_array(before, "difference_interval (before)")
    rng = np.random.default_rng(seed)
    if a.size == b.size:
        low, high = _percentiles(_resampled_means(a - b, rng, resamples), level)
        return Interval(float((a - b).mean()), low, high, a.size, paired=True)
    diffs = _resampled_means(a, rng, resamples) - _resampled_means(b, rng, resamples)
    low, high = _percentiles(diffs, level)
    return Interval(float(a.mean() - b.mean()), low, high, min(a.size, b.size), paired=False)


def verdict(change: Interval, direction: str) -> str:
    """ "yes" when the change's interval lies wholly on the good side of 0 (`direction`: "max" or "min"), "worse"
    when it lies wholly on the other, "within noise" when it contains 0."""
    if direction not in ("max", "min"):
        raise ValueError(f"direction: expected 'max' or 'min', got {direction!r}")
    if not change.excludes_zero():
        return "within noise"
    up = change.low > 0
    return "yes" if up == (direction == "max") else "worse"
