from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from studio import arena
from studio import campaigns as camp
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
    # the finish reasons say whether an answer was cut at max_tokens, which names no version
    assert set(battle) == {"battle_id", "prompt", "a", "b", "a_finish_reason", "b_finish_reason"}
    assert battle["a_finish_reason"] == battle["b_finish_reason"] == "stop"
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
    assert arena.find_leak(["basement"], [], ["lora-test"]) is None  # whole words only
    assert arena.find_leak(["as the lora-test model"], [], ["lora-test"]) == "lora-test"
    battle = arena.next_battle(store, "b1", "exp1")
    assert "SmolLM" not in json.dumps(battle)
    arena.vote(store, "exp1", battle["battle_id"], "a")
    assert arena.next_battle(store, "b1", "exp1") is None
    board = arena.campaign_leaderboard(store, "b1", rounds=10)
    assert board["leaked_battles_excluded"] == 1 and board["votes"] == 1
    assert board["leak_reasons"] == {"smollm": 1}


def test_only_names_that_could_identify_a_version_are_screened(store: Store) -> None:
    """`base` and `policy` are ordinary words: an answer about a database is no leak. Names no one
    writes by chance (digits, punctuation, rare words) and the configured words still are."""
    assert not arena.identifies("base") and not arena.identifies("policy") and not arena.identifies("other")
    assert arena.identifies("lora-test") and arena.identifies("dpo3") and arena.identifies("zephyr")
    assert not arena.identifies("v2")  # too short to screen: it occurs everywhere
    assert (
        arena.find_leak(["Use a base of 10 and the other policy."], [], ["base", "other", "policy"]) is None
    )
    assert arena.find_leak(["I am Zephyr."], [], ["base", "zephyr"]) == "zephyr"
    # a family name with its generation number is caught by the family's leak word
    assert arena.find_leak(["I'm SmolLM2, a small model."], ["smollm"], []) == "smollm"
    assert arena.find_leak(["Llama3 here"], ["llama"], []) == "llama"
    assert arena.find_leak(["smollmx"], ["smollm"], []) is None
    seed_battles(
        store,
        "b1",
        [
            ("base", "other", "The base case of the recursion is n = 0.", "Start from n = 0."),
            ("other", "base", "Paris.", "I am SmolLM."),
        ],
    )
    battle = arena.next_battle(store, "b1", "exp1")
    assert "base case" in battle["a"] + battle["b"]  # served: "base" names no version here
    arena.vote(store, "exp1", battle["battle_id"], "tie")
    board = arena.campaign_leaderboard(store, "b1", rounds=10)
    assert board["votes"] == 1 and board["leaked_battles_excluded"] == 1
    assert board["leak_reasons"] == {"smollm": 1}
    assert {r["version"] for r in board["leaderboard"]} == {"base", "other"}
    styled = arena.campaign_leaderboard(store, "b1", rounds=5, style_control=True)
    assert styled["style_controlled"]["leaked_battles_excluded"] == 1


def _duel(store: Store, name: str, outcomes: list[str], budget: int = 1000, alpha: float = 0.05) -> int:
    """Vote through a base-vs-other campaign: 'base', 'other' (the winner) or 'tie', in order.
    Returns the number of votes cast before the campaign closed (or the outcomes ran out)."""
    seed_battles(
        store,
        name,
        [
            ("base", "other", f"a{i}", f"b{i}") if i % 2 else ("other", "base", f"c{i}", f"d{i}")
            for i in range(len(outcomes))
        ],
        budget=budget,
    )
    store.write("UPDATE battle_campaigns SET alpha = ? WHERE name = ?", [alpha, name])
    votes = 0
    for outcome in outcomes:
        battle = arena.next_battle(store, name, "exp1")
        assert battle is not None
        side = store.query("SELECT version_a FROM battles WHERE id = ?", [battle["battle_id"]])[0]
        winner = "tie" if outcome == "tie" else ("a" if side["version_a"] == outcome else "b")
        arena.vote(store, "exp1", battle["battle_id"], winner)
        votes += 1
        if arena.battle_campaign(store, name)["status"] != "active":
            break
    return votes


def test_two_version_campaign_stops_when_the_confidence_sequence_excludes_half(store: Store) -> None:
    votes = _duel(store, "b1", ["base"] * 60)
    campaign = arena.battle_campaign(store, "b1")
    assert campaign["status"] == "closed" and campaign["alpha"] == 0.05
    # 11 straight wins is where the Beta(4, 4) mixture's evidence first reaches 1/alpha = 20
    assert votes == 11
    assert campaign["verdict"].startswith("base beats other: won 11 of 11 decisive votes (0 ties)")
    assert "95% confidence sequence [" in campaign["verdict"] and "excludes 0.5" in campaign["verdict"]
    # what the leaderboard shows is the interval that decided it
    x, z, p, lo, hi = arena.two_version_interval(store, "b1")
    assert (x, z, p) == ("base", "other", 1.0) and lo > 0.5 and hi == 1.0
    assert f"[{lo:.2f}, {hi:.2f}]" in campaign["verdict"]
    with pytest.raises(StoreError, match="closed: base beats other"):
        arena.next_battle(store, "b1", "exp1")
    # a late vote (a battle handed out before the close) does not decide it again
    assert arena.check_stop(store, "b1") is None
    assert arena.battle_campaign(store, "b1")["verdict"] == campaign["verdict"]


def test_ties_are_no_evidence_and_the_old_false_verdict_is_not_reached(store: Store) -> None:
    """The issue's duel: 7 wins, 2 losses and 15 ties was declared by the old rule; it is not now."""
    outcomes = ["base"] * 7 + ["other"] * 2 + ["tie"] * 15
    assert _duel(store, "b1", outcomes) == 24
    assert arena.battle_campaign(store, "b1")["status"] == "active"
    duel = arena.two_version_duel(store, "b1")
    assert (duel["wins"], duel["losses"], duel["ties"]) == (7, 2, 15)
    assert duel["lower"] < 0.5 < duel["upper"] and not duel["decided"]


def test_a_stricter_level_waits_for_more_evidence(store: Store) -> None:
    seed_battles(store, "b0", [])
    with pytest.raises(StoreError, match=r"alpha=0.5: .* between 0.001 and 0.2"):
        arena.create_battle_campaign(store, "b2", prompt_set="b0-set", versions=["base", "other"], alpha=0.5)
    votes = _duel(store, "b1", ["base"] * 30, alpha=0.01)
    assert votes == 15  # 11 at the default 0.05
    assert "99% confidence sequence" in arena.battle_campaign(store, "b1")["verdict"]


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


# -- races -------------------------------------------------------------------------------------
def test_a_read_during_a_status_change_does_not_cache_the_old_row(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread reads the campaign after the UPDATE ran but before it committed. Had the
    memo been dropped before the UPDATE, that read would cache the old row for good, and a
    campaign closed by the stopping rule would keep serving battles."""
    seed_battles(store, "b1", [("base", "other", "x", "y")])
    camp.get_campaign(store, "b1")  # memoised while active
    original = store.transaction

    @contextmanager
    def read_before_commit() -> Iterator[Any]:
        with original() as cur:
            yield cur
            reader = threading.Thread(target=camp.get_campaign, args=(store, "b1"))
            reader.start()
            reader.join()

    monkeypatch.setattr(store, "transaction", read_before_commit)
    camp.set_status(store, "b1", "closed")
    monkeypatch.undo()
    assert camp.get_campaign(store, "b1")["status"] == "closed"
    with pytest.raises(StoreError, match="is closed"):
        arena.next_battle(store, "b1", "exp1")


@pytest.mark.parametrize("change", ["status", "guidelines"])
def test_a_read_that_started_before_a_change_does_not_cache_after_it(
    store: Store, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A reader fetches the old row, stalls, and stores it only after the change committed and
    dropped the memo: the generation count must turn that late store away."""
    seed_battles(store, "b1", [("base", "other", "x", "y")])
    store.memo.pop(("campaign", "b1"), None)
    fetched, resume = threading.Event(), threading.Event()
    original = store.query

    def stalling_query(sql: str, params: Any = ()) -> list[dict[str, Any]]:
        rows = original(sql, params)
        if threading.current_thread().name == "reader" and sql.startswith("SELECT * FROM campaigns"):
            fetched.set()
            resume.wait(10)
        return rows

    monkeypatch.setattr(store, "query", stalling_query)
    reader = threading.Thread(target=camp.get_campaign, args=(store, "b1"), name="reader")
    reader.start()
    assert fetched.wait(10)
    if change == "status":
        camp.set_status(store, "b1", "closed")
    else:
        camp.set_guidelines(store, "b1", "Prefer the shorter answer.")
    resume.set()
    reader.join()
    monkeypatch.undo()
    row = camp.get_campaign(store, "b1")
    assert (row["status"], row["guidelines"]) == (
        ("closed", "") if change == "status" else ("active", "Prefer the shorter answer.")
    )


def test_two_identical_votes_at_once_get_the_same_reveal(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both requests pass every check before either inserts (the barrier holds them there); one
    stores the vote, the other finds it and returns the same reveal, never a constraint error."""
    seed_battles(store, "b1", [("base", "other", "x", "y")])
    battle = arena.next_battle(store, "b1", "exp1")
    barrier = threading.Barrier(2)
    original = arena.battle_campaign
    met = threading.local()

    def meet_then_read(s: Store, name: str) -> dict[str, Any]:
        if not getattr(met, "done", False):
            met.done = True
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=5)
        return original(s, name)

    monkeypatch.setattr(arena, "battle_campaign", meet_then_read)
    results: list[Any] = [None, None]

    def cast(k: int) -> None:
        try:
            results[k] = arena.vote(store, "exp1", battle["battle_id"], "a", idempotency_key="same-key")
        except Exception as exc:  # the assertion below shows it
            results[k] = exc

    threads = [threading.Thread(target=cast, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not barrier.broken  # both really were between the check and the insert together
    assert all(isinstance(r, dict) for r in results), results
    assert results[0] == results[1]
    assert store.count("votes") == 1


# ---------------------------------------------------------------- issue 14: settings and text


def test_a_battle_campaign_is_stored_in_one_transaction(store: Store) -> None:
    # The task sampler reads campaigns without the write lock: with the campaigns row and the
    # battle_campaigns row in two transactions it could meet a battle campaign without settings.
    seed_battles(store, "b0", [])  # the versions and a prompt set
    opened = []
    transaction = store.transaction

    def counted() -> Any:
        opened.append(1)
        return transaction()

    store.transaction = counted  # type: ignore[method-assign]
    try:
        made = arena.create_battle_campaign(store, "b1", prompt_set="b0-set", versions=["base", "other"])
    finally:
        del store.transaction
    assert len(opened) == 1
    assert made["status"] == "active" and made["versions"] == ["base", "other"]
    assert made["kind"] == "battle" and made["budget"] == 200


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"leak_words": ["fine", "bad \ud800"]}, r"leak_words\[1\]: character 5 is a lone surrogate"),
        ({"leak_words": ["x" * 101]}, r"leak_words\[0\]: 101 characters, over the limit of 100"),
        ({"leak_words": [7]}, r"leak_words\[0\]: expected text, got int"),
        ({"leak_words": "smollm"}, "leak_words: expected a list of words, got str"),
        ({"criteria": ["helpful", "\udfff"]}, r"criteria\[1\]: character 1 is a lone surrogate"),
        ({"criteria": ["helpful", " "]}, r"criteria\[1\]: empty"),
        ({"criteria": ["helpful", "helpful"]}, "names one criterion twice"),
        ({"criteria": [f"c{i}" for i in range(21)]}, "21 criteria, over the limit of 20"),
        ({"versions": ["base", "\ud800"]}, r"versions\[1\]: character 1 is a lone surrogate"),
        ({"max_tokens": 4096, "max_model_len": 2048}, "the served model's context is 2048 tokens"),
    ],
)
def test_bad_battle_campaign_settings_are_refused_and_store_nothing(
    store: Store, settings: dict[str, Any], message: str
) -> None:
    seed_battles(store, "b0", [])
    before = store.count("campaigns"), store.count("battle_campaigns")
    with pytest.raises(StoreError, match=message):
        arena.create_battle_campaign(
            store, "b1", prompt_set="b0-set", **{"versions": ["base", "other"], **settings}
        )
    assert (store.count("campaigns"), store.count("battle_campaigns")) == before


def test_a_vote_with_a_lone_surrogate_in_its_rationale_is_refused_and_stores_nothing(store: Store) -> None:
    seed_battles(store, "b1", [("base", "other", "x1", "y1")])
    battle = arena.next_battle(store, "b1", "exp1")
    with pytest.raises(StoreError, match="rationale: character 4 is a lone surrogate"):
        arena.vote(store, "exp1", battle["battle_id"], "a", rationale="abc\ud800")
    with pytest.raises(StoreError, match="rationale: 10,001 characters"):
        arena.vote(store, "exp1", battle["battle_id"], "a", rationale="r" * 10_001)
    assert store.count("votes") == 0
    assert arena.vote(store, "exp1", battle["battle_id"], "a", rationale="fine")["winner"] == "a"


def test_the_next_battle_of_a_labeling_campaign_is_refused_naming_its_kind(store: Store) -> None:
    from tests.helpers import seed_campaign

    seed_campaign(store, "c1", prompts=1)
    with pytest.raises(StoreError, match=r"campaign 'c1' is a labeling campaign \(kind 'label'\)"):
        arena.next_battle(store, "c1", "exp1")
