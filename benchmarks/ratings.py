"""Bradley-Terry fit plus 100 bootstrap rounds on 100,000 battles among 20 versions.

python benchmarks/ratings.py [--battles 100000] [--versions 20] [--rounds 100]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.ratings import Battles, leaderboard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--battles", type=int, default=100_000)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    true = rng.normal(0, 1, args.versions)
    a = rng.integers(0, args.versions, args.battles)
    b = (a + rng.integers(1, args.versions, args.battles)) % args.versions
    p = 1 / (1 + np.exp(-(true[a] - true[b])))
    u = rng.random(args.battles)
    y = np.where(u < 0.9 * p, 1.0, np.where(u > 1 - 0.9 * (1 - p), 0.0, 0.5))  # 10% ties
    names = [f"v{i:02d}" for i in range(args.versions)]
    model_a, model_b = [names[i] for i in a], [names[i] for i in b]

    start = time.perf_counter()
    battles = Battles.from_outcomes(model_a, model_b, list(y))
    dedup = time.perf_counter() - start
    board = leaderboard(battles, rounds=args.rounds)
    total = time.perf_counter() - start
    order_ok = [r["version"] for r in board] == [names[i] for i in np.argsort(-true)]
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
                "battles": args.battles,
                "versions": args.versions,
                "bootstrap_rounds": args.rounds,
                "unique_rows": len(battles.w),
                "dedup_s": round(dedup, 3),
                "total_s": round(total, 3),
                "true_order_recovered": order_ok,
            },
            indent=2,
        )
    )
    print(
        f"\nfit + {args.rounds} bootstrap rounds on {args.battles} battles, {args.versions} versions: "
        f"{total:.2f} s (target <= 2 s)"
    )


if __name__ == "__main__":
    main()
