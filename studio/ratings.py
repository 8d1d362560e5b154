"""Bradley-Terry ratings with bootstrap confidence intervals. Pure array code.

Shapes: B battles, U unique (a, b, outcome) rows, M model versions, R bootstrap rounds.
A battle is (a, b, y) with y = 1 when a won, 0 when b won, 0.5 for a tie
(both-bad counts as a tie by default). The model: P(a beats b) = sigmoid(t_a - t_b),
fitted by maximum likelihood (scipy L-BFGS with the analytic gradient) on
deduplicated rows weighted by their counts; ratings are on the Elo-like scale
(400 points per factor of ten in odds, mean 1000). Intervals come from a
multinomial bootstrap over the unique rows (as FastChat's arena does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

SCALE = 400.0 / math.log(10.0)  # Elo points per unit of log-odds
BASE = 1000.0
RIDGE = 1e-6  # keeps the optimum finite when a version never lost; far below any data term


@dataclass(frozen=True)
class Battles:
    a: np.ndarray  # [U] int, index of the first version
    b: np.ndarray  # [U] int, index of the second version
    y: np.ndarray  # [U] float, 1 / 0.5 / 0: outcome for a
    w: np.ndarray  # [U] float, how many battles share this row
    names: list[str]  # [M]

    @classmethod
    def from_outcomes(cls, model_a: list[str], model_b: list[str], y: list[float]) -> Battles:
        """Deduplicate (a, b, y) triples into weighted rows."""
        names = sorted(set(model_a) | set(model_b))
        index = {n: i for i, n in enumerate(names)}
        triples = np.array(
            [[index[x], index[z], v] for x, z, v in zip(model_a, model_b, y, strict=True)], dtype=float
        ).reshape(-1, 3)
        unique, counts = np.unique(triples, axis=0, return_counts=True)
        return cls(
            unique[:, 0].astype(int), unique[:, 1].astype(int), unique[:, 2], counts.astype(float), names
        )

    @property
    def total(self) -> int:
        return int(self.w.sum())


def _nll_and_grad(
    theta: np.ndarray, a: np.ndarray, b: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[float, np.ndarray]:
    d = theta[a] - theta[b]  # [U]
    # log sigmoid(d) and log sigmoid(-d), stable for large |d|
    log_p = -np.logaddexp(0.0, -d)
    log_q = -np.logaddexp(0.0, d)
    nll = -np.sum(w * (y * log_p + (1.0 - y) * log_q)) + RIDGE * theta @ theta
    p = np.exp(log_p)
    g_d = w * (p - y)  # d nll / d d
    grad = np.bincount(a, g_d, len(theta)) - np.bincount(b, g_d, len(theta)) + 2 * RIDGE * theta
    return float(nll), grad


def fit(battles: Battles, weights: np.ndarray | None = None, start: np.ndarray | None = None) -> np.ndarray:
    """Maximum-likelihood log-strengths [M], centred at 0."""
    m = len(battles.names)
    w = battles.w if weights is None else weights
    x0 = np.zeros(m) if start is None else start
    res = minimize(
        _nll_and_grad,
        x0,
        args=(battles.a, battles.b, battles.y, w),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 500, "gtol": 1e-8},
    )
    theta = res.x
    return theta - theta.mean()


def to_elo(theta: np.ndarray) -> np.ndarray:
    return BASE + SCALE * theta


def bootstrap(battles: Battles, rounds: int = 100, seed: int = 0) -> np.ndarray:
    """[R, M] log-strengths, one fit per multinomial resample of the battles."""
    rng = np.random.default_rng(seed)
    p = battles.w / battles.w.sum()
    counts = rng.multinomial(battles.total, p, size=rounds).astype(float)  # [R, U]
    centre = fit(battles)
    return np.stack([fit(battles, weights=c, start=centre) for c in counts])


def win_matrix(battles: Battles) -> tuple[np.ndarray, np.ndarray]:
    """[M, M] share of wins of row over column (ties half), and [M, M] battle counts."""
    m = len(battles.names)
    wins = np.zeros((m, m))
    count = np.zeros((m, m))
    np.add.at(wins, (battles.a, battles.b), battles.w * battles.y)
    np.add.at(wins, (battles.b, battles.a), battles.w * (1.0 - battles.y))
    np.add.at(count, (battles.a, battles.b), battles.w)
    np.add.at(count, (battles.b, battles.a), battles.w)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(count > 0, wins / count, np.nan)
    return rate, count


def leaderboard(
    battles: Battles, rounds: int = 100, min_battles: int = 0, level: float = 0.95, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows {version, rating, lower, upper, battles, rank, provisional}, best first.

    A version outranks another only when its whole interval lies above the
    other's: rank = 1 + the number of versions whose lower bound exceeds this
    one's upper bound. Versions with fewer than `min_battles` are marked provisional.
    """
    theta = fit(battles)
    boots = bootstrap(battles, rounds, seed) if rounds else theta[None, :]
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    _, count = win_matrix(battles)
    played = count.sum(axis=1)
    rating, lower, upper = to_elo(theta), to_elo(lo), to_elo(hi)
    rows = []
    for i, name in enumerate(battles.names):
        rows.append(
            {
                "version": name,
                "rating": round(float(rating[i]), 1),
                "lower": round(float(lower[i]), 1),
                "upper": round(float(upper[i]), 1),
                "battles": int(played[i]),
                "rank": 1 + int(np.sum(lower > upper[i])),
                "provisional": bool(played[i] < min_battles),
            }
        )
    return sorted(rows, key=lambda r: -r["rating"])


# FastChat's battle-log columns: model_a, model_b, winner in {model_a, model_b, tie, tie (bothbad)}
WINNER_Y = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


def battles_from_log(
    rows: list[dict[str, Any]], both_bad_as_tie: bool = True, where: str = "battle log"
) -> Battles:
    model_a, model_b, ys = [], [], []
    for i, row in enumerate(rows, start=1):
        for field in ("model_a", "model_b", "winner"):
            if not row.get(field):
                raise ValueError(f"{where} row {i}: field '{field}' is missing")
        winner = row["winner"]
        if winner not in WINNER_Y:
            raise ValueError(f"{where} row {i}: winner {winner!r} is not one of {', '.join(WINNER_Y)}")
        if winner == "tie (bothbad)" and not both_bad_as_tie:
            continue
        if row["model_a"] == row["model_b"]:
            raise ValueError(f"{where} row {i}: model_a and model_b are both {row['model_a']!r}")
        model_a.append(str(row["model_a"]))
        model_b.append(str(row["model_b"]))
        ys.append(WINNER_Y[winner])
    if not ys:
        raise ValueError(f"{where}: no battles to rate")
    return Battles.from_outcomes(model_a, model_b, ys)


# -- style control ---------------------------------------------------------------------------
def _style_nll(
    params: np.ndarray, a: np.ndarray, b: np.ndarray, y: np.ndarray, z: np.ndarray, m: int
) -> tuple[float, np.ndarray]:
    theta, gamma = params[:m], params[m]
    d = theta[a] - theta[b] + gamma * z  # [B]
    log_p = -np.logaddexp(0.0, -d)
    log_q = -np.logaddexp(0.0, d)
    nll = -np.sum(y * log_p + (1.0 - y) * log_q) + RIDGE * (theta @ theta + gamma * gamma)
    g_d = np.exp(log_p) - y
    grad = np.empty(m + 1)
    grad[:m] = np.bincount(a, g_d, m) - np.bincount(b, g_d, m) + 2 * RIDGE * theta
    grad[m] = g_d @ z + 2 * RIDGE * gamma
    return float(nll), grad


def style_controlled(
    model_a: list[str],
    model_b: list[str],
    y: list[float],
    len_a: list[float],
    len_b: list[float],
    rounds: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Ratings with answer length held fixed: P(a wins) = sigmoid(t_a - t_b + gamma * z), where
    z = (len_a - len_b) / (len_a + len_b) is the normalised length difference (as in LMSYS's
    style control). gamma > 0 means longer answers win more often, whoever wrote them."""
    names = sorted(set(model_a) | set(model_b))
    index = {n: i for i, n in enumerate(names)}
    a = np.array([index[x] for x in model_a])
    b = np.array([index[x] for x in model_b])
    yy = np.asarray(y, dtype=float)
    la, lb = np.asarray(len_a, dtype=float), np.asarray(len_b, dtype=float)
    z = np.where(la + lb > 0, (la - lb) / np.maximum(la + lb, 1e-9), 0.0)
    m = len(names)

    def solve(idx: np.ndarray) -> np.ndarray:
        res = minimize(
            _style_nll,
            np.zeros(m + 1),
            args=(a[idx], b[idx], yy[idx], z[idx], m),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 500},
        )
        return res.x

    full = solve(np.arange(len(yy)))
    rng = np.random.default_rng(seed)
    boots = np.stack([solve(rng.integers(0, len(yy), len(yy))) for _ in range(rounds)])  # [R, M+1]
    theta = full[:m] - full[:m].mean()
    centred = boots[:, :m] - boots[:, :m].mean(axis=1, keepdims=True)
    lo, hi = np.quantile(centred, [0.025, 0.975], axis=0)
    played = np.bincount(a, minlength=m) + np.bincount(b, minlength=m)
    rows = [
        {
            "version": n,
            "rating": round(float(to_elo(theta)[i]), 1),
            "lower": round(float(to_elo(lo)[i]), 1),
            "upper": round(float(to_elo(hi)[i]), 1),
            "battles": int(played[i]),
            "rank": 1 + int(np.sum(lo > hi[i])),
            "provisional": False,
        }
        for i, n in enumerate(names)
    ]

    return {"leaderboard": sorted(rows, key=lambda r: -r["rating"]), "length_coefficient": float(full[m])}
