"""The comparison of two versions on one metric: means, their difference, and a paired interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_ROUNDS = 2000
CONFIDENCE = 0.95


def paired_bootstrap(
    version: Sequence[float],
    against: Sequence[float],
    *,
    seed: int = 0,
    rounds: int = BOOTSTRAP_ROUNDS,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of mean(version) - mean(against), resampling items with replacement.

    Paired: item i of both lists is the same prompt, so each resample keeps both scores of an
    item together and the item-to-item spread that both versions share cancels out. scipy's
    bootstrap does the resampling (seeded: same scores, same seed, same interval).
    """
    from scipy.stats import bootstrap

    v = np.asarray(version, dtype=np.float64)
    a = np.asarray(against, dtype=np.float64)
    if v.shape != a.shape:
        raise ValueError(f"paired scores need the same items: {v.shape} vs {a.shape}")
    if v.size == 0:
        raise ValueError("no items to compare")
    diff = v - a
    if v.size == 1 or np.all(diff == diff[0]):
        # every resample gives the same difference (scipy would warn about a degenerate sample)
        d = float(diff.mean())
        return d, d
    result = bootstrap(
        (v, a),
        lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=rounds,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare(
    version: dict[str, float], against: dict[str, float], *, seed: int = 0
) -> dict[str, float | list[float]]:
    """Compare per-item scores keyed by item id, over the items both versions have.

    Returns {"version", "against", "delta", "ci": [lo, hi]}: means over the shared items.
    """
    shared = sorted(set(version) & set(against))
    if not shared:
        raise ValueError("the two versions have no item in common")
    v = [version[i] for i in shared]
    a = [against[i] for i in shared]
    lo, hi = paired_bootstrap(v, a, seed=seed)
    mv, ma = float(np.mean(v)), float(np.mean(a))
    return {
        "version": round(mv, 6),
        "against": round(ma, 6),
        "delta": round(mv - ma, 6),
        "ci": [round(lo, 6), round(hi, 6)],
    }
