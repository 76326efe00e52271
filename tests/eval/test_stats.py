"""Bootstrap intervals: point estimates, widths against the normal approximation, coverage, NaN, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thinkrl.eval.stats import bootstrap_ci, summarise


def _bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def _width(ci: dict) -> float:
    return ci["ci_high"] - ci["ci_low"]


def test_plain_mean_and_interval_contains_it():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    ci = bootstrap_ci(values)
    assert ci["value"] == pytest.approx(5 / 8)
    assert ci["n"] == 8
    assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
    assert 0.0 <= ci["ci_low"] < ci["ci_high"] <= 1.0


def test_weighted_mean_is_the_ratio_of_sums():
    # Per-item mean NLL with token counts as weights: the per-token NLL over all tokens.
    ci = bootstrap_ci([1.0, 2.0, 4.0], weights=[1, 1, 2])
    assert ci["value"] == pytest.approx((1 + 2 + 8) / 4)
    token_nll = [[1.0], [2.0], [3.0, 5.0]]
    ci = bootstrap_ci([np.mean(t) for t in token_nll], weights=[len(t) for t in token_nll])
    assert ci["value"] == pytest.approx(11 / 4)
    assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]


def test_weighted_resampling_stays_within_item_range():
    rng = np.random.default_rng(1)
    values, weights = rng.normal(3.0, 1.0, 300), rng.integers(1, 50, 300)
    ci = bootstrap_ci(values, weights=weights)
    assert ci["value"] == pytest.approx(np.average(values, weights=weights))
    assert values.min() < ci["ci_low"] < ci["value"] < ci["ci_high"] < values.max()


def test_interval_shrinks_with_more_items():
    small = bootstrap_ci(_bernoulli(0.3, 50, seed=1))
    large = bootstrap_ci(_bernoulli(0.3, 2000, seed=2))
    ratio = _width(small) / _width(large)
    assert 4.5 < ratio < 9.0  # sqrt(2000 / 50) ≈ 6.3


@pytest.mark.parametrize(("p", "n"), [(0.3, 2000), (0.5, 400), (0.1, 1000)])
def test_width_matches_normal_approximation(p, n):
    values = _bernoulli(p, n, seed=3)
    p_hat = values.mean()
    expected = 2 * 1.96 * math.sqrt(p_hat * (1 - p_hat) / n)
    assert _width(bootstrap_ci(values)) == pytest.approx(expected, rel=0.25)


def test_coverage_of_the_true_mean():
    # 200 independent data sets of 100 Bernoulli(0.3) items: about 95% of the intervals hold p.
    hits = 0
    for rep in range(200):
        ci = bootstrap_ci(_bernoulli(0.3, 100, seed=100 + rep), n_boot=500, seed=rep)
        hits += ci["ci_low"] <= 0.3 <= ci["ci_high"]
    assert 0.88 <= hits / 200 <= 0.99


def test_level_controls_the_width():
    values = _bernoulli(0.4, 500, seed=4)
    assert _width(bootstrap_ci(values, level=0.5)) < _width(bootstrap_ci(values, level=0.95))


def test_nan_values_are_dropped_with_their_weights():
    ci = bootstrap_ci([1.0, float("nan"), 3.0], weights=[1.0, 100.0, 3.0])
    assert ci["n"] == 2
    assert ci["value"] == pytest.approx((1 + 9) / 4)
    ci = bootstrap_ci([1.0, float("nan"), 3.0])
    assert ci["n"] == 2 and ci["value"] == pytest.approx(2.0)


@pytest.mark.parametrize("values", [[], [float("nan")], [float("nan")] * 3])
def test_no_items(values):
    ci = bootstrap_ci(values)
    assert ci["n"] == 0
    assert all(math.isnan(ci[k]) for k in ("value", "ci_low", "ci_high"))


def test_one_item_interval_is_the_value():
    assert bootstrap_ci([0.7]) == {"value": 0.7, "ci_low": 0.7, "ci_high": 0.7, "n": 1}
    assert bootstrap_ci([2.0, float("nan")], weights=[5, 1]) == {"value": 2.0, "ci_low": 2.0, "ci_high": 2.0, "n": 1}


def test_constant_values_give_a_point_interval():
    ci = bootstrap_ci([0.25] * 40)
    assert ci["ci_low"] == ci["value"] == ci["ci_high"] == 0.25


def test_deterministic_for_a_seed():
    values = _bernoulli(0.3, 300, seed=5)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_large_inputs_are_chunked_without_changing_the_estimate():
    # 10k items × 1000 boots is 10M draws: more than one chunk.
    values = _bernoulli(0.3, 10_000, seed=6)
    ci = bootstrap_ci(values)
    assert ci["n"] == 10_000
    assert ci["ci_low"] < ci["value"] < ci["ci_high"]
    assert _width(ci) == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 10_000), rel=0.25)


def test_bad_arguments():
    with pytest.raises(ValueError, match="weights"):
        bootstrap_ci([1.0, 2.0], weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        bootstrap_ci([1.0, 2.0], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=1.5)


def test_summarise_applies_per_metric_weights():
    out = summarise(
        {"accuracy": [1.0, 0.0, 1.0, 1.0], "nll": [2.0, 4.0, 1.0, 1.0]},
        weights={"nll": [1, 3, 0, 0]},
        n_boot=200,
        seed=3,
    )
    assert set(out) == {"accuracy", "nll"}
    assert out["accuracy"]["value"] == pytest.approx(0.75)
    assert out["nll"]["value"] == pytest.approx((2 + 12) / 4)
    assert out["accuracy"] == bootstrap_ci([1.0, 0.0, 1.0, 1.0], n_boot=200, seed=3)


def test_groups_resample_whole_windows():
    # 40 windows of 10 positions; positions of a window share most of their value (one window-level effect).
    rng = np.random.default_rng(9)
    groups = np.repeat(np.arange(40), 10)
    values = rng.normal(0, 1, 40)[groups] + rng.normal(0, 0.1, 400)
    weights = rng.integers(1, 4, 400).astype(float)
    plain = bootstrap_ci(values, weights, seed=2)
    grouped = bootstrap_ci(values, weights, groups=groups.tolist(), seed=2)
    assert grouped["value"] == pytest.approx(plain["value"])  # the point estimate does not change
    assert grouped["n"] == 400 and grouped["groups"] == 40 and "groups" not in plain
    assert _width(grouped) > 2 * _width(plain)  # positions of one window are not independent evidence
    # The same as bootstrapping the windows' ratio estimates weighted by their summed weights.
    sums = np.bincount(groups, weights=weights * values)
    totals = np.bincount(groups, weights=weights)
    by_window = bootstrap_ci(sums / totals, totals, seed=2)
    assert {k: grouped[k] for k in ("value", "ci_low", "ci_high")} == pytest.approx(
        {k: by_window[k] for k in ("value", "ci_low", "ci_high")}
    )


def test_groups_drop_with_nan_values_and_one_group_collapses():
    ci = bootstrap_ci([1.0, math.nan, 3.0], groups=["a", "b", "a"])
    assert ci == {"value": 2.0, "ci_low": 2.0, "ci_high": 2.0, "n": 2, "groups": 1}
    with pytest.raises(ValueError, match="group labels"):
        bootstrap_ci([1.0, 2.0], groups=["a"])
    out = summarise({"x": [1.0, 2.0, 3.0, 4.0], "y": [1.0, 1.0, 0.0, 0.0]}, groups={"x": [0, 0, 1, 1]}, seed=1)
    assert out["x"]["groups"] == 2 and "groups" not in out["y"]
