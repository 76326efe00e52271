"""Percentile-bootstrap confidence intervals over evaluation items.

Items (questions, passages) are the unit of resampling: tokens within an item are not independent, so a per-token
metric is passed as per-item means with per-item token counts as weights, and the ratio estimator
sum(w·v) / sum(w) is recomputed on every resample.

Items that are not independent of each other (the thought positions of one text window) can be given ``groups``:
then whole groups are resampled (a cluster bootstrap), each group entering as its sums sum(w·v) and sum(w). The
point estimate is the same; only the interval widens to what the groups' correlation implies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Bound the (boots × items) index matrix to ~32 MB of int64 whatever the number of items.
_MAX_CELLS = 4_000_000


def _clean(
    values: Sequence[float], weights: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Drop items whose value (or weight) is NaN; also returns the mask of the items kept."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if weights is None:
        keep = ~np.isnan(v)
        return v[keep], None, keep
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != v.shape:
        raise ValueError(f"bootstrap_ci: {v.size} values but {w.size} weights")
    keep = ~(np.isnan(v) | np.isnan(w))
    v, w = v[keep], w[keep]
    if (w < 0).any():
        raise ValueError("bootstrap_ci: weights must be non-negative")
    return v, w, keep


def _by_group(v: np.ndarray, w: np.ndarray | None, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (value, weight) per group, (sum(w·v) / sum(w), sum(w)), so the ratio estimator over resampled groups is
    sum of the groups' sum(w·v) over the sum of their sum(w)."""
    w = np.ones_like(v) if w is None else w
    _, first, index = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    index = rank[index.ravel()]  # groups numbered in order of first appearance
    weight = np.bincount(index, weights=w)
    total = np.bincount(index, weights=w * v)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(weight > 0, total / weight, 0.0)
    return value, weight


def _point(v: np.ndarray, w: np.ndarray | None) -> float:
    if w is None:
        return float(v.mean())
    total = w.sum()
    return float((w * v).sum() / total) if total > 0 else float("nan")


def _resampled_means(v: np.ndarray, w: np.ndarray | None, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """The estimator on ``n_boot`` resamples (with replacement) of the items, drawn in memory-bounded chunks."""
    n = v.size
    chunk = max(1, _MAX_CELLS // n)
    wv = None if w is None else w * v
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        if w is None:
            out[start:stop] = v[idx].mean(axis=1)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):  # a resample of only zero-weight items → NaN
                out[start:stop] = wv[idx].sum(axis=1) / w[idx].sum(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    n_boot: int = 1000,
    groups: Sequence | None = None,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Mean (or weighted mean sum(w·v)/sum(w)) of ``values`` with a percentile-bootstrap interval over items.

    NaN values are dropped with their weights; ``n`` counts the items kept. No items: NaN value and interval. One
    item: the interval collapses to the value. Deterministic for a given ``seed``.
    ``groups`` (one label per value): resample whole groups instead of items (see the module docstring); one
    group collapses the interval like one item does.
    Returns ``{"value", "ci_low", "ci_high", "n"}``, plus ``"groups"`` (how many) when groups are given.
    """
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    v, w, keep = _clean(values, weights)
    n = int(v.size)
    extra = {}
    if groups is not None:
        labels = np.asarray(groups, dtype=object).ravel()
        if labels.size != keep.size:
            raise ValueError(f"bootstrap_ci: {keep.size} values but {labels.size} group labels")
        labels = labels[keep].astype(str)
        extra = {"groups": int(np.unique(labels).size)}
    if n == 0:
        nan = float("nan")
        return {"value": nan, "ci_low": nan, "ci_high": nan, "n": 0, **extra}
    value = _point(v, w)
    if groups is not None:
        v, w = _by_group(v, w, labels)
    if v.size == 1 or np.isnan(value):
        return {"value": value, "ci_low": value, "ci_high": value, "n": n, **extra}
    boots = _resampled_means(v, w, n_boot, np.random.default_rng(seed))
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(boots, [alpha, 1.0 - alpha])
    return {"value": value, "ci_low": float(low), "ci_high": float(high), "n": n, **extra}


def summarise(
    per_item: dict[str, list[float]],
    weights: dict[str, list[float]] | None = None,
    groups: dict[str, list] | None = None,
    **kw,
) -> dict[str, dict]:
    """``bootstrap_ci`` for every metric in ``per_item``; ``weights`` and ``groups`` may cover only some metrics.

    All metrics share the seed, so metrics over the same items are resampled with the same item draws.
    ``kw`` goes to ``bootstrap_ci`` (n_boot, seed, level).
    """
    weights, groups = weights or {}, groups or {}
    return {
        key: bootstrap_ci(values, weights.get(key), groups=groups.get(key), **kw) for key, values in per_item.items()
    }
