"""Across-seed statistics against hand-computed values."""

import math

import pytest

from thinkrl.study.stats import band, describe, sample_sd, t_critical, t_interval, t_mass


@pytest.mark.parametrize(
    "df, level, expected",
    [  # two-sided Student-t quantiles from printed tables
        (1, 0.95, 12.706204736),
        (2, 0.95, 4.302652730),
        (3, 0.95, 3.182446305),
        (4, 0.95, 2.776445105),
        (10, 0.95, 2.228138852),
        (30, 0.95, 2.042272456),
        (2, 0.90, 2.919985580),
        (5, 0.99, 4.032142984),
    ],
)
def test_t_critical_matches_tables(df, level, expected):
    assert t_critical(df, level) == pytest.approx(expected, abs=1e-8)


def test_t_mass_closed_forms():
    assert t_mass(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| <= 1) = 2·atan(1)/π
    assert t_mass(2.0, 2) == pytest.approx(2 / math.sqrt(6))  # df 2: t / sqrt(2 + t²)
    assert t_mass(0.0, 7) == 0.0


def test_describe_three_seeds_by_hand():
    # mean 0.3; deviations -0.2, -0.1, 0.3 → sum of squares 0.14, variance 0.07, sd 0.264575
    # half width 4.302653 · 0.264575 / sqrt(3) = 0.657241
    stats = describe([0.1, 0.2, 0.6])
    assert stats["mean"] == pytest.approx(0.3)
    assert stats["sd"] == pytest.approx(math.sqrt(0.07))
    assert stats["ci_low"] == pytest.approx(0.3 - 0.657241, abs=1e-6)
    assert stats["ci_high"] == pytest.approx(0.3 + 0.657241, abs=1e-6)
    assert stats["n"] == 3


def test_describe_four_values_and_missing_ones():
    # [1, 2, 3, 4]: mean 2.5, sd sqrt(5/3) = 1.290994, half width 3.182446 · 1.290994 / 2 = 2.054260
    stats = describe([1, None, 2, 3, float("nan"), 4])
    assert (stats["mean"], stats["n"]) == (2.5, 4)
    assert stats["sd"] == pytest.approx(1.290994, abs=1e-6)
    assert (stats["ci_low"], stats["ci_high"]) == pytest.approx((0.445740, 4.554260), abs=1e-6)


def test_one_value_has_no_spread_and_none_has_no_mean():
    one = describe([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["sd"]) and math.isnan(one["ci_low"]) and one["n"] == 1
    assert math.isnan(describe([])["mean"]) and math.isnan(sample_sd([]))
    assert all(math.isnan(x) for x in t_interval([1.0]))


def test_band_keeps_the_steps_every_curve_has():
    result = band([{0: 1.0, 1: 2.0, 2: 3.0}, {1: 4.0, 2: 5.0, 3: 1.0}, {1: 0.0, 2: float("nan")}])
    assert result["steps"] == [1] and result["n"] == 3
    assert result["mean"] == [2.0] and result["sd"] == [pytest.approx(2.0)]
    assert band([]) == {"steps": [], "mean": [], "sd": [], "n": 0}
