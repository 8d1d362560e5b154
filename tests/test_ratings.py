from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from studio.ratings import SCALE, Battles, battles_from_log, bootstrap, fit, leaderboard, win_matrix


def simulate(true: np.ndarray, battles: int, rng: np.random.Generator) -> Battles:
    """Battles drawn from the Bradley-Terry model itself (no ties)."""
    m = len(true)
    a = rng.integers(0, m, battles)
    b = (a + rng.integers(1, m, battles)) % m
    y = (rng.random(battles) < 1 / (1 + np.exp(-(true[a] - true[b])))).astype(float)
    names = [f"v{i}" for i in range(m)]
    return Battles.from_outcomes([names[i] for i in a], [names[i] for i in b], list(y))


def test_recovers_the_true_order_and_scale() -> None:
    rng = np.random.default_rng(0)
    true = np.array([-1.0, -0.3, 0.0, 0.4, 1.2])
    battles = simulate(true, 20_000, rng)
    theta = fit(battles)
    assert list(np.argsort(theta)) == list(np.argsort(true))
    assert np.allclose(theta, true - true.mean(), atol=0.08)
    board = leaderboard(battles, rounds=50)
    assert [r["version"] for r in board] == ["v4", "v3", "v2", "v1", "v0"]
    assert np.mean([r["rating"] for r in board]) == pytest.approx(1000.0, abs=0.1)
    # 400 Elo points per factor of ten in odds
    assert SCALE * np.log(10) == pytest.approx(400.0)


def test_intervals_cover_the_truth_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    true = np.array([-0.6, -0.2, 0.1, 0.3, 0.4])
    centred = true - true.mean()
    hits = total = 0
    for trial in range(40):
        battles = simulate(true, 1500, rng)
        boots = bootstrap(battles, rounds=60, seed=trial)
        lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
        hits += int(np.sum((lo <= centred) & (centred <= hi)))
        total += len(true)
    assert 0.88 <= hits / total <= 0.99, hits / total


def test_ties_count_half_and_matrices() -> None:
    battles = Battles.from_outcomes(["x", "x", "y", "x"], ["y", "y", "x", "y"], [1.0, 0.5, 1.0, 1.0])
    assert battles.total == 4 and len(battles.w) == 3  # two identical x-beats-y rows merged
    rate, count = win_matrix(battles)
    assert count[0, 1] == count[1, 0] == 4
    assert rate[0, 1] == pytest.approx((2 + 0.5) / 4) and rate[1, 0] == pytest.approx((1 + 0.5) / 4)


def test_rank_only_when_intervals_separate() -> None:
    rows = leaderboard(
        simulate(np.array([0.0, 0.02, 3.0]), 600, np.random.default_rng(2)), rounds=60, min_battles=500
    )
    by = {r["version"]: r for r in rows}
    assert by["v2"]["rank"] == 1
    assert by["v0"]["rank"] == by["v1"]["rank"] == 2  # too close to tell apart
    assert all(r["provisional"] for r in rows)  # about 400 battles each, below the gate


def test_battle_log_parsing_and_errors() -> None:
    rows = [
        {"model_a": "a", "model_b": "b", "winner": "model_a"},
        {"model_a": "a", "model_b": "b", "winner": "tie (bothbad)"},
    ]
    assert battles_from_log(rows).total == 2
    assert battles_from_log(rows, both_bad_as_tie=False).total == 1
    with pytest.raises(ValueError, match="row 1: winner 'a' is not one of"):
        battles_from_log([{"model_a": "a", "model_b": "b", "winner": "a"}], where="log.jsonl")
    with pytest.raises(ValueError, match="row 1: field 'model_b' is missing"):
        battles_from_log([{"model_a": "a", "winner": "tie"}])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_cli_rates_an_external_battle_log(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(3)
    names = ["alpha", "beta", "gamma"]
    rows = []
    for _ in range(600):
        i, j = rng.choice(3, 2, replace=False)
        p = 1 / (1 + np.exp(-(i - j)))  # gamma > beta > alpha
        winner = "model_a" if rng.random() < p else "model_b"
        rows.append({"model_a": names[i], "model_b": names[j], "winner": winner, "judge": "x"})
    path = tmp_path / f"battles{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    out = subprocess.run(
        [sys.executable, "-m", "studio.cli", "leaderboard", "--battles", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    board = json.loads(out.stdout)
    assert [r["version"] for r in board] == ["gamma", "beta", "alpha"]
    assert set(board[0]) >= {"version", "rating", "lower", "upper", "battles"}
    assert board[0]["lower"] <= board[0]["rating"] <= board[0]["upper"]
    table = subprocess.run(
        [sys.executable, "-m", "studio.cli", "leaderboard", "--battles", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0 and "gamma" in table.stdout.splitlines()[1]


def test_cli_bad_battle_log_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"model_a": "a", "model_b": "b", "winner": "model_a"}\n{"model_a": "a"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "studio.cli", "leaderboard", "--battles", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "b.jsonl row 2: field 'model_b' is missing" in out.stderr and "Traceback" not in out.stderr


def test_style_control_separates_length_from_quality() -> None:
    """Two equally good versions; one writes longer answers and raters like length.
    Plain ratings favour the verbose one; style-controlled ratings do not, and gamma is positive."""
    from studio.ratings import style_controlled

    rng = np.random.default_rng(4)
    n = 3000
    a_is_verbose = rng.random(n) < 0.5
    model_a = np.where(a_is_verbose, "verbose", "terse").tolist()
    model_b = np.where(a_is_verbose, "terse", "verbose").tolist()
    len_a = np.where(a_is_verbose, 300, 100) * rng.uniform(0.8, 1.2, n)
    len_b = np.where(a_is_verbose, 100, 300) * rng.uniform(0.8, 1.2, n)
    z = (len_a - len_b) / (len_a + len_b)
    y = (rng.random(n) < 1 / (1 + np.exp(-2.0 * z))).astype(float)  # only length matters
    plain = {
        r["version"]: r for r in leaderboard(Battles.from_outcomes(model_a, model_b, list(y)), rounds=20)
    }
    assert plain["verbose"]["lower"] > plain["terse"]["upper"]
    styled = style_controlled(model_a, model_b, list(y), list(len_a), list(len_b), rounds=30)
    rows = {r["version"]: r for r in styled["leaderboard"]}
    assert styled["length_coefficient"] == pytest.approx(2.0, abs=0.4)
    assert rows["verbose"]["lower"] <= rows["terse"]["upper"]  # no longer separable
    assert abs(rows["verbose"]["rating"] - rows["terse"]["rating"]) < 30
