"""Bradley-Terry fit plus 100 bootstrap rounds on 1,000,000 battles among 50 versions.

python benchmarks/ratings.py [--battles 1000000] [--versions 50] [--rounds 100] [--repeat 3]

The figure against the target is `leaderboard` (the full fit, the bootstrap fits and the
posterior's curvature) on battles already deduplicated: the studio's battles come out of one
query, and deduplicating Python lists of names is reported on its own line. The first call in a
process pays scipy's lazy imports, so it is reported apart from the median of the warm calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.ratings import SCALE, Battles, bootstrap, fit, leaderboard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--battles", type=int, default=1_000_000)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="warm calls after the first")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    true = rng.normal(0, 1, args.versions)
    a = rng.integers(0, args.versions, args.battles)
    b = (a + rng.integers(1, args.versions, args.battles)) % args.versions
    p = 1 / (1 + np.exp(-(true[a] - true[b])))
    u = rng.random(args.battles)
    y = np.where(u < 0.9 * p, 1.0, np.where(u > 1 - 0.9 * (1 - p), 0.0, 0.5))  # 10% ties
    names = [f"v{i:02d}" for i in range(args.versions)]
    model_a, model_b, outcomes = [names[i] for i in a], [names[i] for i in b], list(y)

    start = time.perf_counter()
    battles = Battles.from_outcomes(model_a, model_b, outcomes)
    dedup = time.perf_counter() - start

    start = time.perf_counter()
    board = leaderboard(battles, rounds=args.rounds)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        board = leaderboard(battles, rounds=args.rounds)
        warm.append(time.perf_counter() - start)
    # where the time goes (warm): one full fit, then the bootstrap (resampling and its fits)
    start = time.perf_counter()
    fit(battles)
    one_fit = time.perf_counter() - start
    start = time.perf_counter()
    bootstrap(battles, rounds=args.rounds)
    boot = time.perf_counter() - start
    start = time.perf_counter()
    np.random.default_rng(0).multinomial(battles.total, battles.w / battles.total, size=args.rounds)
    resample = time.perf_counter() - start

    by = {r["version"]: r for r in board}
    rating = np.array([by[n]["rating"] for n in names])
    # what the prior moves at this size: the posterior mode against the maximum likelihood
    shift = SCALE * np.abs(fit(battles) - fit(battles, prior_sd=None)).max()
    median = float(np.median(warm)) if warm else cold
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}",
                "battles": args.battles,
                "versions": args.versions,
                "bootstrap_rounds": args.rounds,
                "unique_rows": len(battles.w),
                "pairs": len(battles.pairs[0]),
                "dedup_s": round(dedup, 3),
                "fit_and_bootstrap_first_call_s": round(cold, 3),
                "fit_and_bootstrap_warm_median_s": round(median, 3),
                "one_fit_s": round(one_fit, 4),
                "bootstrap_s": round(boot, 3),
                "of_which_multinomial_resampling_s": round(resample, 3),
                # ties shrink every win rate towards 1/2, so the truth is compared by order only
                "spearman_with_true_strengths": round(float(spearmanr(rating, true).statistic), 4),
                "largest_shift_by_the_prior_elo": round(float(shift), 3),
                "median_interval_width_elo": round(
                    float(np.median([r["upper"] - r["lower"] for r in board])), 1
                ),
            },
            indent=2,
        )
    )
    print(
        f"\nfit + {args.rounds} bootstrap rounds on {args.battles} battles, {args.versions} versions: "
        f"{median:.2f} s warm, {cold:.2f} s first call (target <= 2 s); dedup {dedup:.2f} s"
    )


if __name__ == "__main__":
    main()
