"""Across-seed statistics of a study: mean, sample sd and a Student-t interval; curves as mean ± sd bands.

Seeds are the unit: a run's value is one number (its held-out evaluation), and the interval says where the mean
over seeds of this recipe lies, mean ± t_{(1+level)/2, n-1} · sd / √n. With n = 3 seeds the t quantile is 4.30, so
the interval is wide by design; a bootstrap over three values would be narrower and wrong. Pure Python (no scipy):
the t quantile inverts the exact closed-form CDF for integer degrees of freedom (Abramowitz & Stegun 26.7.3–4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

NAN = float("nan")


def finite(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers and finite (None is a NaN that went through JSON)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else NAN


def sample_sd(values: Sequence[float]) -> float:
    """Standard deviation with n − 1 in the denominator; NaN below two values."""
    n = len(values)
    if n < 2:
        return NAN
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def t_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` >= 1 (Abramowitz & Stegun 26.7.3 odd df, 26.7.4 even)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"t_mass: df must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # (2/π)(θ + sinθ (cosθ + 2/3 cos³θ + 2·4/(3·5) cos⁵θ + ... up to cos^{df-2}θ))
        if df == 1:
            return 2 * theta / math.pi
        term = total = math.cos(theta)
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + s * total)
    term = total = 1.0  # sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ... up to cos^{df-2}θ)
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return s * total


def t_critical(df: int, level: float = 0.95) -> float:
    """The t with P(|T| <= t) = ``level`` (two-sided), by bisection on ``t_mass`` to 1e-12."""
    if not 0 < level < 1:
        raise ValueError(f"t_critical: level must be in (0, 1), got {level}")
    low, high = 0.0, 1.0
    while t_mass(high, df) < level:
        low, high = high, high * 2
    while high - low > 1e-12 * max(1.0, high):
        mid = (low + high) / 2
        if t_mass(mid, df) < level:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """mean ± t_crit(n-1) · sd / √n; (NaN, NaN) below two values."""
    n = len(values)
    if n < 2:
        return NAN, NAN
    m, half = mean(values), t_critical(n - 1, level) * sample_sd(values) / math.sqrt(n)
    return m - half, m + half


def describe(values: Iterable[float | None], level: float = 0.95) -> dict:
    """{"mean", "sd", "ci_low", "ci_high", "n"} over the finite values (n counts those)."""
    kept = finite(values)
    low, high = t_interval(kept, level)
    return {"mean": mean(kept), "sd": sample_sd(kept), "ci_low": low, "ci_high": high, "n": len(kept)}


def band(curves: Sequence[dict[int, float]]) -> dict:
    """Mean and sd across curves ({step: value}) at every step where all of them have a finite value.

    Returns {"steps", "mean", "sd", "n"} with n = the number of curves (sd NaN with one curve)."""
    if not curves:
        return {"steps": [], "mean": [], "sd": [], "n": 0}
    steps = sorted(set.intersection(*(set(s for s, v in c.items() if finite([v])) for c in curves)))
    rows = [[c[s] for c in curves] for s in steps]
    return {"steps": steps, "mean": [mean(r) for r in rows], "sd": [sample_sd(r) for r in rows], "n": len(curves)}
