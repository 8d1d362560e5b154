from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from studio.ratings import (
    PROVISIONAL_BATTLES,
    SCALE,
    Battles,
    battles_from_log,
    bootstrap,
    fit,
    leaderboard,
    win_matrix,
)


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


def test_a_sweep_is_finite_uncertain_and_provisional() -> None:
    """5-0 between two versions: maximum likelihood diverges (the old 2117.9 against -117.9 with
    zero-width intervals); the prior keeps it finite and the intervals wide, and so few battles
    are provisional without anyone asking for --min-battles."""
    sweep = Battles.from_outcomes(["x", "y", "x", "y", "x"], ["y", "x", "y", "x", "y"], [1, 0, 1, 0, 1])
    unregularised = {r["version"]: r for r in leaderboard(sweep, rounds=20, prior_sd=None)}
    assert unregularised["x"]["rating"] > 2000 and unregularised["x"]["lower"] == unregularised["x"]["upper"]
    rows = {r["version"]: r for r in leaderboard(sweep, rounds=50)}
    x, y = rows["x"], rows["y"]
    assert 1150 < x["rating"] < 1300 and x["rating"] + y["rating"] == pytest.approx(2000, abs=0.2)
    for r in (x, y):
        assert r["lower"] < r["rating"] < r["upper"]
        assert r["upper"] - r["lower"] > 300  # five battles say little
        assert r["provisional"] and r["battles"] == 5
    assert x["lower"] < y["upper"]  # so neither outranks the other yet
    assert x["rank"] == y["rank"] == 1


def test_provisional_below_the_documented_number_by_default() -> None:
    rng = np.random.default_rng(6)
    battles = simulate(np.array([0.0, 0.5, 1.0]), 40, rng)  # about 27 battles each
    rows = leaderboard(battles, rounds=10)  # min_battles left at 0
    assert any(r["provisional"] for r in rows)
    assert all(r["provisional"] == (r["battles"] < PROVISIONAL_BATTLES) for r in rows)
    many = leaderboard(simulate(np.array([0.0, 0.5, 1.0]), 600, rng), rounds=10)
    assert not any(r["provisional"] for r in many)
    # --min-battles raises the bar, never lowers it
    assert all(
        r["provisional"] for r in leaderboard(simulate(np.zeros(3), 600, rng), rounds=0, min_battles=1000)
    )


def test_the_prior_changes_nothing_with_many_battles() -> None:
    rng = np.random.default_rng(7)
    true = np.array([-1.0, -0.3, 0.0, 0.4, 1.2])
    battles = simulate(true, 20_000, rng)
    mle = fit(battles, prior_sd=None)
    assert np.abs(SCALE * (fit(battles) - mle)).max() < 1.0  # Elo points
    plain = {r["version"]: r for r in leaderboard(battles, rounds=40, prior_sd=None)}
    for r in leaderboard(battles, rounds=40):
        p = plain[r["version"]]
        assert abs(r["rating"] - p["rating"]) < 1.0
        assert r["upper"] - r["lower"] == pytest.approx(p["upper"] - p["lower"], rel=0.25)
        assert r["rank"] == p["rank"] and not r["provisional"]


def test_deduplication_and_pair_totals() -> None:
    battles = Battles.from_outcomes(
        ["x", "y", "x", "z", "x"], ["y", "x", "y", "x", "z"], [1.0, 1.0, 0.5, 0.0, 0.0]
    )
    assert battles.total == 5 and len(battles.w) == 5
    i, j, _, _ = battles.pairs
    score, count = battles.pair_totals()
    by_pair = {
        (battles.names[a], battles.names[b]): (s, n) for a, b, s, n in zip(i, j, score, count, strict=True)
    }
    # x-y: x won, y won, a tie; x-z: z won twice (once on each side)
    assert by_pair == {("x", "y"): (1.5, 3.0), ("x", "z"): (1.0, 2.0)}
    # outcomes other than win, tie and loss are kept as they are
    odd = Battles.from_outcomes(["x", "x"], ["y", "y"], [0.25, 0.25])
    assert odd.y.tolist() == [0.25] and odd.w.tolist() == [2.0]
    with pytest.raises(ValueError, match="2 model_a, 1 model_b"):
        Battles.from_outcomes(["x", "x"], ["y"], [1.0, 0.0])


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


@pytest.mark.parametrize("flag", [None, "--drop-both-bad", "--both-bad-is-loss-for-both"])
def test_cli_both_bad_votes_count_as_ties_unless_dropped(tmp_path: Path, flag: str | None) -> None:
    rows = [{"model_a": "alpha", "model_b": "beta", "winner": w} for w in ["model_a"] * 6 + ["model_b"] * 4]
    rows += [{"model_a": "alpha", "model_b": "beta", "winner": "tie (bothbad)"}] * 5
    path = tmp_path / "battles.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "studio.cli",
            "leaderboard",
            "--battles",
            str(path),
            "--json",
            *([flag] if flag else []),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    battles = {r["version"]: r["battles"] for r in json.loads(out.stdout)}
    assert battles == ({"alpha": 15, "beta": 15} if flag is None else {"alpha": 10, "beta": 10})
