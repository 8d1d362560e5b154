"""`studio demo`: the scripted people and preferences (fast), and the whole loop end to end on the
packaged model in its quick configuration (slow, under the heavy lock)."""

from __future__ import annotations

import io
import json
import os
import random
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from studio import demo
from trainers import configs

ROOT = Path(__file__).resolve().parents[1]


# -- preferences ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "question", "lists"),
    [
        ("Sure. What would you like to cook?", True, False),
        ('He asked "why?"', True, False),
        ("Why not? Because it is late.", False, False),
        ("Steps:\n1. Boil water.\n2. Add tea.", False, True),
        ("You could:\n- walk\n- read", False, True),
        ("Try these: * not a list item because it is inline", False, False),
        ("\u2022 one bullet\nWhat else do you need?", True, True),
    ],
)
def test_properties(text: str, question: bool, lists: bool) -> None:
    assert demo.ends_with_question(text) is question
    assert demo.has_list(text) is lists
    assert demo.PREFERENCES["question"].has(text) is question
    assert demo.PREFERENCES["no_lists"].has(text) is (not lists)


@pytest.mark.parametrize(
    ("text", "you"),
    [
        ("You can boil it for ten minutes.", True),
        ("Add salt to your taste.", True),
        ("Treat yourself.", True),
        ("The youth of today.", False),  # a word that starts with "you" is not "you"
        ("Water boils at 100 degrees.", False),
    ],
)
def test_second_person_finds_you_as_a_whole_word(text: str, you: bool) -> None:
    pref = demo.PREFERENCES["second_person"]
    assert pref.has(text) is you
    assert pref.score(text) == float(you)


def test_second_person_prefers_the_answer_that_says_you_more_often() -> None:
    pref = demo.PREFERENCES["second_person"]
    once, twice = "You can.", "You can do it your way."
    assert pref.score(twice) > pref.score(once) > pref.score("It can.")
    assert pref.score("You, you, you and your yourself.") == 5
    assert pref.score("Your turn.") == pref.score("It is yours.")  # the same count: a tie
    assert "more often wins" in pref.rewards


def test_concise_prefers_fewer_words_in_4_word_buckets() -> None:
    pref = demo.PREFERENCES["concise"]
    short, long_ = "Yes, drink water.", " ".join(["word"] * 40)
    assert pref.score(short) > pref.score(long_)
    assert pref.has(short) and not pref.has(long_)
    assert pref.score("one two three four five") == pref.score("one two three four five six")
    # 4-word buckets, as its description says: 4 and 7 words tie, 7 and 8 do not
    assert pref.score(" ".join(["w"] * 4)) == pref.score(" ".join(["w"] * 7))
    assert pref.score(" ".join(["w"] * 7)) > pref.score(" ".join(["w"] * 8))
    assert "4-word buckets" in pref.rewards


def test_every_preference_is_documented_and_one_is_not_length() -> None:
    assert set(demo.PREFERENCES) >= {"concise", "question", "no_lists", "second_person"}
    assert demo.DEFAULT_PREFERENCE in demo.PREFERENCES
    for pref in demo.PREFERENCES.values():
        assert pref.rewards and pref.measure
    with pytest.raises(ValueError, match="unknown; use one of"):
        demo.preference("polite")


# -- the scripted people ------------------------------------------------------------------------
def test_ranks_by_gives_dense_ranks_with_ties() -> None:
    assert demo.ranks_by([1.0, 0.0, 1.0, 0.5]) == [1, 3, 1, 2]
    assert demo.ranks_by([0.0, 0.0]) == [1, 1]


def test_annotator_ranks_by_the_preference_ties_equal_answers_and_flags() -> None:
    pref = demo.PREFERENCES["question"]
    shown = [
        {"text": "Rice is a grain."},
        {"text": "Rice is a grain. Do you cook it often?"},
        {"text": "I'm sorry, but I can't help with that."},
        {"text": "I am SmolLM, a model by Hugging Face. Anything else?"},
    ]
    spec = demo.annotate(pref, shown, random.Random(0), noise=0.0)
    assert spec is not None
    assert spec.ranks == [2, 1, 2, 1] and spec.strength == 2 and spec.next is False
    assert spec.flags == {2: ["unhelpful_refusal"], 3: ["identity_leak"]}
    tied = demo.annotate(pref, shown[:1] * 3, random.Random(0), noise=0.0)
    assert tied is not None and tied.all_bad and tied.ranks is None and tied.strength is None


def test_a_full_tie_of_answers_with_the_property_is_skipped_not_called_all_bad() -> None:
    pref = demo.PREFERENCES["second_person"]
    alike = [{"text": "You can do it."}, {"text": "Do what you like."}]
    assert demo.annotate(pref, alike, random.Random(0), noise=0.5) is None


def test_the_annotators_skip_good_full_ties_and_labeling_ends_on_the_tasks_left(tmp_path: Path) -> None:
    # three annotators at k = 2: a task that each of them skips can never be judged, so the loop
    # must end on "nothing offered, everything sampled", not on the campaign's judgment count
    from studio.users import bootstrap_admin
    from tests.conftest import NoModelStudio
    from tests.helpers import seed_campaign

    tasks = [
        ("Say hi.", ["You said hi.", "Hi to you."]),  # alike, both say "you" once: skipped
        ("Name a fruit.", ["Apple.", "Pear."]),  # alike, neither: all bad
        ("Name a colour.", ["Red, for you.", "Red."]),  # ranked
    ]
    with NoModelStudio(tmp_path) as served:
        store = served.studio.store
        bootstrap_admin(store, tmp_path)
        run = demo.Demo(demo.PREFERENCES["second_person"], tmp_path, demo.QUICK, io.StringIO())
        run.studio = served.studio
        run.create_people()
        seed_campaign(store, demo.LABEL_CAMPAIGN, prompts=3, n=2, overlap=2, content=lambda i: tasks[i])
        stop = threading.Event()
        timer = threading.Timer(60, stop.set)  # a loop that never ends fails below, not hangs
        timer.start()
        run.label_until_done(stop)
        timer.cancel()
        assert not stop.is_set(), "labeling did not end"
        rows = store.query(
            "SELECT p.messages->>'$[0].content' AS question, j.all_bad FROM judgments j "
            "JOIN tasks t ON t.id = j.task_id JOIN prompts p ON p.id = t.prompt_id"
        )
        skipped = store.query("SELECT count(*) AS n FROM assignments WHERE status = 'skipped'")[0]["n"]
    all_bad: dict[str, list[bool]] = {}
    for row in rows:
        all_bad.setdefault(row["question"], []).append(row["all_bad"])
    assert all_bad == {"Name a fruit.": [True, True], "Name a colour.": [False, False]}, rows
    assert skipped == 3  # each annotator passed on it once


def test_label_noise_swaps_some_rankings_at_about_its_rate() -> None:
    pref = demo.PREFERENCES["no_lists"]
    shown = [{"text": "Prose."}, {"text": "- a\n- b"}]
    rng = random.Random(1)
    specs = [demo.annotate(pref, shown, rng, noise=0.1) for _ in range(2000)]
    swapped = sum(s is not None and s.ranks == [2, 1] for s in specs)
    assert 140 <= swapped <= 260  # 10% of 2000, with room for chance
    assert all(s is not None and (s.strength == 1) == (s.ranks == [2, 1]) for s in specs)


def test_expert_votes_by_the_preference_with_some_noise() -> None:
    pref = demo.PREFERENCES["question"]
    rng = random.Random(2)
    assert demo.expert_vote(pref, "Ok?", "Ok.", rng, 0.0) == "a"
    assert demo.expert_vote(pref, "Ok.", "Ok?", rng, 0.0) == "b"
    assert demo.expert_vote(pref, "Ok.", "Fine.", rng, 0.0) == "tie"
    votes = [demo.expert_vote(pref, "Ok?", "Ok.", rng, 0.3) for _ in range(3000)]
    assert 0.75 <= votes.count("a") / len(votes) <= 0.85  # 0.7 + 0.3 / 3


# -- the prompt set and the recipes ------------------------------------------------------------
def test_the_demo_prompt_set_has_enough_training_and_held_out_prompts() -> None:
    from studio.importer import read_prompts

    prompts = read_prompts(demo.PROMPTS_FILE)
    splits = [p.metadata["split"] for p in prompts]
    assert set(splits) == {"train", "heldout"}
    assert splits.count("train") >= demo.FULL.train_prompts
    assert splits.count("heldout") >= demo.FULL.heldout_prompts
    assert len({p.content_hash for p in prompts}) == len(prompts)  # no prompt in both splits


@pytest.mark.parametrize("path", sorted((ROOT / "data" / "recipes" / "demo").glob("*.yaml")), ids=str)
def test_demo_recipes_validate(path: Path) -> None:
    config = configs.validate(path.stem, path, {})
    assert config.stage == path.stem


def test_demo_recipes_keep_answers_as_long_as_the_demo_samples() -> None:
    ppo = configs.validate("ppo", demo.RECIPES_DIR / "ppo.yaml", {})
    assert ppo.ppo.max_new_tokens == demo.FULL.max_tokens == demo.QUICK.max_tokens


# -- the table and the checks ---------------------------------------------------------------------
def report(
    rates: list[float], win: float, lower: float, accuracy: float, reasons: list[str]
) -> demo.DemoReport:
    gate = {"passed": not reasons, "reasons": reasons}
    guards = [r for r in reasons if not r.startswith("re-battle")]  # what demo.guard_reasons finds
    deltas = {"refusal_rate": {"delta": 0.0}, "capability_accuracy": {"delta": -0.01}}
    rows = [
        demo.VersionRow("base", "base", None, rates[0], 100),
        demo.VersionRow(
            "ppo-1",
            "ppo",
            "base",
            rates[1],
            100,
            win,
            (lower, 0.9),
            {"wins": 9, "losses": 2, "ties": 3},
            gate,
            not reasons,
            deltas,
            guard_reasons=guards,
        ),
        demo.VersionRow(
            "dpo-1",
            "dpo",
            "ppo-1",
            rates[2],
            100,
            win,
            (lower, 0.95),
            {"wins": 12, "losses": 2, "ties": 1},
            gate,
            not reasons,
            deltas,
            guard_reasons=guards,
        ),
    ]
    reward = {
        "version": "reward-1",
        "heldout_split_accuracy": 0.85,
        "heldout_split_pairs": 40,
        "heldout_prompts_accuracy": accuracy,
        "heldout_prompts_pairs": 30,
    }
    return demo.DemoReport(
        "question", asdict(demo.QUICK), "/tmp/x", rows, reward, {}, {"start": 30.0}, 600.0, {}
    )


def test_checks_pass_on_a_working_loop_and_name_what_fails() -> None:
    good = report([0.1, 0.3, 0.5], 0.8, 0.6, 0.95, [])
    assert demo.checks(good, "dpo-1") == {"wins": True, "rises": True, "reward_model": True, "guards": True}
    flat = report([0.1, 0.3, 0.3], 0.6, 0.45, 0.8, ["factual_accuracy: down 5.0 points (...)"])
    assert demo.checks(flat, "dpo-1") == {
        "wins": False,
        "rises": False,
        "reward_model": False,
        "guards": False,
    }
    # a held version whose only failing rule is the re-battle is no guard failure
    undecided = report(
        [0.1, 0.3, 0.5], 0.6, 0.45, 0.95, ["re-battle: no verdict yet; an engineer may waive this"]
    )
    assert demo.checks(undecided, "base")["guards"] is True
    assert demo.checks(undecided, "base")["wins"] is False  # nothing was promoted


def test_guard_reasons_read_data_gate_yaml_on_the_evaluation_alone() -> None:
    def m(version: float, against: float) -> dict[str, object]:
        return {"version": version, "against": against, "delta": version - against, "ci": None}

    fine = {
        "refusal_rate": m(0.05, 0.04),
        "capability_accuracy": m(0.30, 0.31),
        "factual_accuracy": m(0.20, 0.21),
        "consistency": m(0.50, 0.52),
    }
    assert demo.guard_reasons(fine) == []  # no re-battle reason: only the guards are read
    worse = fine | {"factual_accuracy": m(0.10, 0.20)}
    (reason,) = demo.guard_reasons(worse)
    assert reason.startswith("factual_accuracy: down 10.0 points")
    assert demo.guard_reasons({k: v for k, v in fine.items() if k != "consistency"}) == [
        "consistency: not measured; run the 'consistency' suite"
    ]


def test_table_has_a_row_per_version_with_rate_win_rate_gate_and_deltas() -> None:
    r = report([0.1, 0.3, 0.5], 0.8, 0.6, 0.95, [])
    r.checks = demo.checks(r, "dpo-1")
    lines = demo.format_table(demo.PREFERENCES["question"], r)
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert set(rows) == {"base", "ppo-1", "dpo-1"}
    assert "10% [" in rows["base"] and rows["base"].count(" - ") >= 3
    assert "80% [60%, 95%]" in rows["dpo-1"] and "12-2-1" in rows["dpo-1"] and "promoted" in rows["dpo-1"]
    assert "refusal +0.00, capability -0.01" in rows["ppo-1"]
    assert any(line.startswith("checks: wins ok, rises ok") for line in lines)


def test_dpo_makes_as_many_passes_over_few_pairs_as_over_many() -> None:
    # second_person's 1,234 and concise's 1,768 pairs keep the recipe's 64 steps (the runs that
    # held every guard); no_lists' 368 get 20 steps, not 64 (1.4 passes, full run 14)
    assert demo.dpo_steps(1234) == {} and demo.dpo_steps(1768) == {}
    assert demo.dpo_steps(368) == {"train.max_steps": 20}
    assert demo.dpo_steps(3) == {"train.max_steps": demo.DPO_MIN_STEPS}


def test_the_demo_needs_a_fresh_data_dir(tmp_path: Path) -> None:
    (tmp_path / "studio.duckdb").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        demo.fresh_data_dir(tmp_path)
    folder, temporary = demo.fresh_data_dir(tmp_path / "new")
    assert folder == tmp_path / "new" and not temporary
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="a file, not a folder"):
        demo.fresh_data_dir(tmp_path / "a-file")
    folder, temporary = demo.fresh_data_dir(None)
    assert temporary and folder.is_dir() and not any(folder.iterdir())
    folder.rmdir()


# -- the whole loop ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.vllm
# The quick run takes 14-22 minutes here (its three training runs about 10 of them): in CI it
# would take the suite from about 30 minutes to 45, past its 30-minute budget, so it runs only
# when asked for.
@pytest.mark.skipif(
    os.environ.get("STUDIO_TEST_DEMO") != "1",
    reason="the demo's whole loop takes 14-22 minutes: run it with STUDIO_TEST_DEMO=1",
)
# its own vLLM start, three training runs, three evaluations and battles: past the suite's 900 s
# default on a loaded 2-core machine (vLLM alone once took 566 s to start there)
@pytest.mark.timeout(2400)
def test_the_demo_runs_the_loop_and_the_last_version_beats_base_on_the_property(tmp_path: Path) -> None:
    from tests.conftest import free_port

    data_dir = tmp_path / "demo"
    out = io.StringIO()
    # the default preference: with 'question' the quick run's 48 prompts give about 18 ranked
    # pairs and no signal to move (docs/demo.md, quick runs 1-2 and 2026-12-02)
    r = demo.run_demo(demo.DEFAULT_PREFERENCE, data_dir, config=demo.QUICK, port=free_port(), out=out)
    text = out.getvalue()
    for index in range(1, 9):
        assert f"[{index}/8]" in text, text
    assert "[studio]" not in text, text  # the studio's own messages go to logs/demo-studio.log
    assert "advisor asks for" in text, text  # about 140 ranked pairs: said after labeling
    table = json.loads((data_dir / "demo.json").read_text())
    rows = {row["stage"]: row for row in table["rows"]}
    assert set(rows) == {"base", "ppo", "dpo"}
    assert rows["dpo"]["property_rate"] > rows["base"]["property_rate"], text
    assert rows["ppo"]["deltas"] and rows["dpo"]["deltas"] and rows["dpo"]["gate"] is not None
    # the studio's own gate read the quick run's evaluations, and held the versions for them
    assert not rows["dpo"]["gate"]["passed"] and not rows["dpo"]["promoted"]
    assert any("ran only" in reason for reason in rows["dpo"]["gate"]["reasons"]), rows["dpo"]["gate"]
    assert r.reward_model["heldout_prompts_pairs"] > 0
    # everything the table says was made through the studio and stays in its database
    from studio.store import Store

    store = Store(data_dir / "studio.duckdb")
    try:
        # each task judged by both of its annotators, or skipped by all three (a full tie of
        # answers that all have the property)
        per_task = store.query(
            "SELECT t.id, count(j.id) AS n FROM tasks t LEFT JOIN judgments j ON j.task_id = t.id "
            "WHERE t.campaign = ? GROUP BY t.id",
            [demo.LABEL_CAMPAIGN],
        )
        assert len(per_task) == demo.QUICK.train_prompts
        assert {row["n"] for row in per_task} <= {0, 2} and any(row["n"] == 2 for row in per_task)
        assert store.query("SELECT count(*) AS n FROM runs WHERE status = 'succeeded'")[0]["n"] == 3
        # PPO against base, DPO against PPO and against base
        assert store.query("SELECT count(*) AS n FROM evals WHERE status = 'succeeded'")[0]["n"] == 3
        assert store.query("SELECT count(*) AS n FROM votes")[0]["n"] > 0
    finally:
        store.close()
