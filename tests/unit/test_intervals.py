"""The report's bootstrap intervals against numbers computed by hand: zero width where nothing varies, the exact
percentiles of a vector small enough to enumerate every resample, the normal approximation for a large one, and
the verdicts a clear improvement and pure noise get."""

from __future__ import annotations

import itertools

import pytest

from stagelm.intervals import Interval, difference_interval, mean_interval, verdict


def exact_percentile(items: list[float], q: float) -> float:
    """The q-quantile of the mean over all n^n equally likely resamples (the smallest value whose cdf >= q)."""
    means = sorted(sum(r) / len(r) for r in itertools.product(items, repeat=len(items)))
    return means[int(q * len(means) - 1e-9)]


def test_a_constant_vector_has_a_zero_width_interval() -> None:
    assert mean_interval([0.5] * 10) == Interval(0.5, 0.5, 0.5, 10)
    # and a constant per-item change (the items themselves vary): pairing removes the items' own spread
    before = [0.0, 1.0, 0.25, 0.75]
    change = difference_interval([b + 0.5 for b in before], before)
    assert change.paired and change.n == 4
    assert (change.estimate, change.low, change.high) == (0.5, 0.5, 0.5)


def test_a_tiny_vector_matches_the_enumerated_resamples() -> None:
    # [0, 0, 1]: the resample mean is k/3 with k ~ Binomial(3, 1/3): P = 8/27, 12/27, 6/27, 1/27 for k = 0..3,
    # so the cdf is 0.296, 0.741, 0.963, 1: the 5% point is 0, the 95% point 2/3, the 97.5% point 1
    items = [0.0, 0.0, 1.0]
    assert exact_percentile(items, 0.05) == 0.0
    assert exact_percentile(items, 0.95) == pytest.approx(2 / 3)
    interval = mean_interval(items, level=0.90)
    assert interval.estimate == pytest.approx(1 / 3)
    assert (interval.low, interval.high) == (0.0, pytest.approx(2 / 3))
    assert mean_interval(items).as_list() == [0.0, 1.0]  # 95%: 0.963 < 0.975, the upper end is k = 3


def test_a_large_vector_matches_the_normal_approximation() -> None:
    # 100 coin flips, half right: 0.5 +- 1.96 * sqrt(0.25 / 100) = [0.402, 0.598]
    interval = mean_interval([0.0, 1.0] * 50)
    assert interval.low == pytest.approx(0.402, abs=0.012)
    assert interval.high == pytest.approx(0.598, abs=0.012)


def test_the_same_seed_gives_the_same_interval() -> None:
    items = [i**2 / 7 for i in range(20)]
    assert mean_interval(items, seed=3) == mean_interval(items, seed=3)
    assert mean_interval(items, seed=3) != mean_interval(items, seed=4)


def test_a_clear_improvement_excludes_zero_and_noise_does_not() -> None:
    # 40 of 50 items go from wrong to right, 10 from right to wrong: a change of +0.6
    before = [0.0] * 40 + [1.0] * 10
    after = [1.0] * 40 + [0.0] * 10
    change = difference_interval(after, before)
    assert change.estimate == pytest.approx(0.6) and change.paired
    assert change.low > 0.35 and change.excludes_zero()
    assert verdict(change, "max") == "yes" and verdict(change, "min") == "worse"
    assert verdict(difference_interval(before, after), "min") == "yes"
    # as many items flip one way as the other (5 each): no change, and the interval says so
    noise_after = [1.0] * 5 + [0.0] * 35 + [1.0] * 5 + [0.0] * 5
    noise = difference_interval(noise_after, before)
    assert noise.estimate == 0.0 and noise.low < 0 < noise.high
    assert verdict(noise, "max") == verdict(noise, "min") == "within noise"


def test_lists_of_different_lengths_are_compared_unpaired() -> None:
    # two different sets: resampled each on its own, so the interval is that of a difference of two means
    change = difference_interval([1.0] * 30, [0.0, 1.0] * 10)
    assert not change.paired and change.n == 20
    assert change.estimate == pytest.approx(0.5)
    # the before side alone varies: its interval (about 0.5 +- 0.22) mirrored around the change
    assert change.low == pytest.approx(0.5 - 0.22, abs=0.03) and change.high == pytest.approx(0.5 + 0.22, abs=0.03)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="direction"):
        verdict(Interval(0.1, 0.05, 0.2, 10), "up")
