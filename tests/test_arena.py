from __future__ import annotations

import json

import pytest

from studio import arena
from studio.ratings import battles_from_log
from studio.store import Store, StoreError
from tests.helpers import make_users, seed_battles


@pytest.fixture()
def store(store: Store) -> Store:
    make_users(store, ("exp1", "expert"), ("exp2", "expert"))
    return store


def test_payload_is_blind_until_the_vote_then_revealed(store: Store) -> None:
    seed_battles(store, "b1", [("base", "other", "first answer", "second answer")])
    battle = arena.next_battle(store, "b1", "exp1")
    text = json.dumps(battle)
    assert "base" not in text and "other" not in text
    assert set(battle) == {"battle_id", "prompt", "a", "b"}
    assert len(battle["battle_id"]) == 32  # random hex
    reveal = arena.vote(
        store, "exp1", battle["battle_id"], "a", scores={"helpful": {"a": 5, "b": 2}}, rationale=" clearer "
    )
    assert {reveal["a"], reveal["b"]} == {"base", "other"} and reveal["winner"] == "a"
    # retries are idempotent, the battle is locked
    assert arena.vote(store, "exp1", battle["battle_id"], "b")["vote_id"] == reveal["vote_id"]
    with pytest.raises(StoreError, match="already judged by someone else"):
        arena.vote(store, "exp2", battle["battle_id"], "b")
    assert store.query("SELECT status FROM battles")[0]["status"] == "voted"
    vote_row = store.query("SELECT * FROM votes")[0]
    assert json.loads(vote_row["scores"]) == {"helpful": {"a": 5, "b": 2}}
    assert vote_row["rationale"] == "clearer"


def test_bad_votes_are_refused(store: Store) -> None:
    ids = seed_battles(store, "b1", [("base", "other", "x1", "y1"), ("other", "base", "x2", "y2")])
    battle = arena.next_battle(store, "b1", "exp1")
    with pytest.raises(StoreError, match="winner 'c'"):
        arena.vote(store, "exp1", battle["battle_id"], "c")
    with pytest.raises(StoreError, match="unknown criterion 'speed'"):
        arena.vote(store, "exp1", battle["battle_id"], "a", scores={"speed": {"a": 1, "b": 2}})
    with pytest.raises(StoreError, match="whole numbers 1-5"):
        arena.vote(store, "exp1", battle["battle_id"], "a", scores={"helpful": {"a": 9, "b": 2}})
    other = next(i for i in ids if i != battle["battle_id"])
    with pytest.raises(StoreError, match="not assigned to you"):
        arena.vote(store, "exp1", other, "a")
    assert store.count("votes") == 0


def test_identity_leaks_are_never_served_and_counted(store: Store) -> None:
    seed_battles(
        store,
        "b1",
        [
            ("base", "other", "I am SmolLM, trained by Hugging Face.", "Paris."),
            ("other", "base", "Paris.", "The capital is Paris."),
        ],
    )
    assert arena.find_leak(["I'm smollm"], ["smollm"], []) == "smollm"
    assert arena.find_leak(["basement"], [], ["base"]) is None  # whole words only
    assert arena.find_leak(["as the other model"], [], ["other"]) == "other"
    battle = arena.next_battle(store, "b1", "exp1")
    assert "SmolLM" not in json.dumps(battle)
    arena.vote(store, "exp1", battle["battle_id"], "a")
    assert arena.next_battle(store, "b1", "exp1") is None
    board = arena.campaign_leaderboard(store, "b1", rounds=10)
    assert board["leaked_battles_excluded"] == 1 and board["votes"] == 1


def test_two_version_campaign_stops_when_the_interval_excludes_half(store: Store) -> None:
    outcomes = [
        ("base", "other", f"a{i}", f"b{i}") if i % 2 else ("other", "base", f"c{i}", f"d{i}")
        for i in range(60)
    ]
    seed_battles(store, "b1", outcomes)
    # base always wins, whichever side it is on
    votes = 0
    while (battle := arena.next_battle(store, "b1", "exp1")) is not None:
        side = store.query("SELECT version_a FROM battles WHERE id = ?", [battle["battle_id"]])[0]
        arena.vote(store, "exp1", battle["battle_id"], "a" if side["version_a"] == "base" else "b")
        votes += 1
        if arena.battle_campaign(store, "b1")["status"] != "active":
            break
    campaign = arena.battle_campaign(store, "b1")
    assert campaign["status"] == "closed"
    assert campaign["verdict"].startswith("base beats other") and "excludes 0.5" in campaign["verdict"]
    assert votes < 60  # it stopped by itself before the battles ran out
    with pytest.raises(StoreError, match="closed: base beats other"):
        arena.next_battle(store, "b1", "exp1")


def test_budget_stops_an_undecided_campaign(store: Store) -> None:
    seed_battles(store, "b1", [("base", "other", f"a{i}", f"b{i}") for i in range(10)], budget=4)
    n = 0
    while (battle := arena.next_battle(store, "b1", "exp1")) is not None:
        arena.vote(store, "exp1", battle["battle_id"], "a" if n % 2 else "b")
        n += 1
        if arena.battle_campaign(store, "b1")["status"] != "active":
            break
    assert n == 4
    assert "budget of 4 votes spent" in arena.battle_campaign(store, "b1")["verdict"]


def test_least_decided_pair_is_chosen_next(store: Store) -> None:
    seed_battles(
        store,
        "b1",
        [("base", "other", f"a{i}", f"b{i}") for i in range(6)],
        versions=("base", "other", "third"),
    )
    for _ in range(6):
        battle = arena.next_battle(store, "b1", "exp1")
        arena.vote(store, "exp1", battle["battle_id"], "a")
    pair = arena.next_pair(store, arena.battle_campaign(store, "b1"))
    assert "third" in pair  # never compared: the least decided


def test_battle_log_has_fastchat_columns_and_rates(store: Store) -> None:
    seed_battles(
        store, "b1", [("base", "other", "a", "b"), ("other", "base", "c", "d"), ("base", "other", "e", "f")]
    )
    for winner in ("a", "tie", "both_bad"):
        battle = arena.next_battle(store, "b1", "exp1")
        arena.vote(store, "exp1", battle["battle_id"], winner)
    log = arena.battle_log(store, "b1")
    assert [r["winner"] for r in log] == ["model_a", "tie", "tie (bothbad)"]
    assert {"model_a", "model_b", "winner", "judge", "tstamp"} <= set(log[0])
    assert battles_from_log(log).total == 3
    quality = arena.expert_quality(store, "b1")
    assert quality[0]["expert"] == "exp1" and quality[0]["votes"] == 3
    assert quality[0]["position_bias_side_a"] == 1.0


def test_campaign_needs_two_versions(store: Store) -> None:
    with pytest.raises(StoreError, match="at least two different versions"):
        seed_battles(store, "b1", [], versions=("base",))


def test_regenerate_discards_both_sides_and_stats_carry_matrices_and_criteria(store: Store) -> None:
    ids = seed_battles(
        store,
        "b1",
        [
            ("base", "other", "short", "a much longer answer here"),
            ("other", "base", "x", "y"),
            ("base", "other", "p", "q"),
        ],
    )
    battle = arena.next_battle(store, "b1", "exp1")
    with pytest.raises(StoreError, match="not assigned to you"):
        arena.regenerate(store, "exp2", battle["battle_id"])
    arena.regenerate(store, "exp1", battle["battle_id"])
    assert (
        store.query("SELECT status FROM battles WHERE id = ?", [battle["battle_id"]])[0]["status"]
        == "discarded"
    )
    served = []
    while (b := arena.next_battle(store, "b1", "exp1")) is not None:
        served.append(b["battle_id"])
        arena.vote(store, "exp1", b["battle_id"], "a", scores={"helpful": {"a": 4, "b": 2}})
    assert battle["battle_id"] not in served and len(served) == len(ids) - 1
    stats = arena.campaign_leaderboard(store, "b1", rounds=10, style_control=True)
    assert stats["votes"] == 2
    assert stats["battle_count"]["base"]["other"] == 2
    assert stats["win_rate"]["base"]["other"] + stats["win_rate"]["other"]["base"] == pytest.approx(1.0)
    assert set(stats["criteria"]["helpful"]) == {"base", "other"}
    assert {r["version"] for r in stats["style_controlled"]["leaderboard"]} == {"base", "other"}


def test_aliases_that_resolve_to_one_version_are_refused(store: Store) -> None:
    seed_battles(store, "b1", [])
    with pytest.raises(StoreError, match="all resolve to base"):
        arena.create_battle_campaign(store, "b2", prompt_set="b1-set", versions=["base", "policy"])
