"""Agreement and annotator quality, computed from judgments.

A unit is one pair of completions of one task; an annotator's value on it is
+1 (first of the pair preferred), -1 (second preferred) or 0 (tie, including
"all bad"). Pairwise agreement is the share of annotator pairs that give a
unit the same value; Krippendorff's alpha (ordinal, the `krippendorff`
package) corrects that for chance.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from statistics import median
from typing import Any

import numpy as np

from studio.store import Store


def _judgments(store: Store, campaign: str | None) -> list[dict[str, Any]]:
    return store.query(
        "SELECT j.id, j.task_id, j.annotator, j.generation_ids, j.ranks, j.all_bad, j.duration_ms"
        " FROM judgments j WHERE ? IS NULL OR j.campaign = ? ORDER BY j.submitted_at",
        [campaign, campaign],
    )


def unit_values(judgments: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, int]]:
    """(task, gen a, gen b) with a < b -> {annotator: +1 | 0 | -1}."""
    units: dict[tuple[str, str, str], dict[str, int]] = defaultdict(dict)
    for j in judgments:
        rank = dict(zip(j["generation_ids"], j["ranks"], strict=True))
        for a, b in combinations(sorted(rank), 2):
            value = 0 if j["all_bad"] else int(np.sign(rank[b] - rank[a]))
            units[(j["task_id"], a, b)][j["annotator"]] = value
    return units


def campaign_agreement(store: Store, campaign: str | None) -> dict[str, Any]:
    import krippendorff

    units = {k: v for k, v in unit_values(_judgments(store, campaign)).items() if len(v) >= 2}
    pairs = agree = 0
    for values in units.values():
        for x, y in combinations(values.values(), 2):
            pairs += 1
            agree += x == y
    alpha = None
    if units:
        annotators = sorted({a for v in units.values() for a in v})
        matrix = np.full((len(annotators), len(units)), np.nan)
        for col, values in enumerate(units.values()):
            for name, value in values.items():
                matrix[annotators.index(name), col] = value
        if len(np.unique(matrix[~np.isnan(matrix)])) > 1:
            alpha = float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal"))
    tasks = {k[0] for k in units}
    return {
        "tasks_with_2plus": len(tasks),
        "units": len(units),
        "pairwise_agreement": agree / pairs if pairs else None,
        "krippendorff_alpha": alpha,
    }


def annotator_quality(store: Store, campaign: str | None) -> list[dict[str, Any]]:
    judgments = _judgments(store, campaign)
    units = unit_values(judgments)
    lengths = {}
    gen_ids = sorted({g for j in judgments for g in j["generation_ids"]})
    if gen_ids:
        lengths = {
            r["id"]: r["n"]
            for r in store.query(
                "SELECT id, length(text) AS n FROM generations WHERE list_contains(?, id)", [gen_ids]
            )
        }
    stats: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "judgments": 0,
            "majority_n": 0,
            "majority_agree": 0,
            "strict_pairs": 0,
            "first_shown_chosen": 0,
            "length_pairs": 0,
            "longer_chosen": 0,
            "durations": [],
        }
    )
    for values in units.values():
        for name, value in values.items():
            others = Counter(v for other, v in values.items() if other != name)
            if not others:
                continue
            top = others.most_common(2)
            if len(top) == 2 and top[0][1] == top[1][1]:
                continue  # no majority among the others
            stats[name]["majority_n"] += 1
            stats[name]["majority_agree"] += top[0][0] == value
    for j in judgments:
        s = stats[j["annotator"]]
        s["judgments"] += 1
        if j["duration_ms"] is not None:
            s["durations"].append(j["duration_ms"])
        if j["all_bad"]:
            continue
        shown = list(zip(j["generation_ids"], j["ranks"], strict=True))
        for (ga, ra), (gb, rb) in combinations(shown, 2):  # ga was shown before gb
            if ra == rb:
                continue
            s["strict_pairs"] += 1
            s["first_shown_chosen"] += ra < rb
            la, lb = lengths.get(ga), lengths.get(gb)
            if la is not None and lb is not None and la != lb:
                s["length_pairs"] += 1
                s["longer_chosen"] += (la > lb) == (ra < rb)
    out = []
    for name, s in sorted(stats.items()):
        out.append(
            {
                "annotator": name,
                "judgments": s["judgments"],
                "agreement_with_majority": s["majority_agree"] / s["majority_n"] if s["majority_n"] else None,
                # 0.5 is no bias: the share of strict preferences that went to the completion shown first
                "position_bias_first_shown": (
                    s["first_shown_chosen"] / s["strict_pairs"] if s["strict_pairs"] else None
                ),
                # 0.5 is no bias: the share that went to the longer completion
                "length_bias_longer": s["longer_chosen"] / s["length_pairs"] if s["length_pairs"] else None,
                "median_seconds": median(s["durations"]) / 1000.0 if s["durations"] else None,
            }
        )
    return out
