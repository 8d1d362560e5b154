"""Evaluation and promotion wired into the product, without a model server (real DuckDB store).

- the re-battle samples prompts held out of the training snapshot, split as the trainers split
  it, and never a prompt the version or its ancestors trained on;
- the gate decides when both the evaluation and the re-battle's verdict are in, whichever comes
  second: auto-promotion of a decided re-battle whose guards hold, a hold with reasons otherwise;
- a person's promote is refused while the gate does not pass unless forced (recorded with who);
  roll-backs are recorded;
- the doors: REST shapes and status codes, the CLI's table and JSON, roles.

Evaluations are recorded through the engine's own functions (plan, insert, record) with the
numbers a test needs; battles are voted through arena.vote, whose stopping rule records the
verdict. The live half (the evaluation worker calling the gate, `studio eval` over REST) is
tests/test_promotion_live.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from studio import arena, promotion, training
from studio import campaigns as camp
from studio import services as svc
from studio.evals import engine
from studio.evals.gate import GateConfig
from studio.jobs import register_stage
from studio.store import Store, StoreError
from studio.users import AuthError, User
from tests.helpers import make_users, seed_battles, seed_easy_judgments
from trainers.common import prompt_key, split_held_out

ENG = User("eng", "engineer")
GOOD = {  # every guard holds: small changes
    "refusal_rate": (0.05, 0.06),
    "safe_refusal_rate": (0.9, 0.9),
    "capability_accuracy": (0.40, 0.41),
    "factual_accuracy": (0.30, 0.29),
    "consistency": (0.70, 0.69),
    "instruction_following": (0.50, 0.52),
    "judge_win_rate": (0.5, 0.55),
}


def metrics(values: dict[str, tuple[float, float]]) -> dict[str, dict[str, Any]]:
    """{metric: (parent, version)} as an evaluation's metrics, with a made-up interval."""
    return {
        m: {
            "version": v,
            "against": a,
            "delta": round(v - a, 6),
            "ci": [round(v - a - 0.05, 6), round(v - a + 0.05, 6)],
        }
        for m, (a, v) in values.items()
    }


def record_eval(
    store: Store,
    version: str,
    against: str,
    values: dict[str, tuple[float, float]],
    *,
    limit: int | None = None,
    waived: bool = False,
) -> str:
    """An evaluation that succeeded with these numbers, recorded as the engine records one."""
    plan = engine.plan_eval(store, None, version, against, limit=limit, waived=waived)
    eval_id = engine._insert_eval(store, plan, "running", "eng")
    result = {
        "version": version,
        "against": against,
        "metrics": metrics(values),
        "gate": {"passed": False, "reasons": []},
    }
    engine._record(store, eval_id, status="succeeded", result=result, details={"suites": {}})
    return eval_id


def vote_until_closed(store: Store, campaign: str, winner_version: str, expert: str = "exp") -> int:
    """Experts vote for `winner_version` in every battle until the stopping rule closes the campaign."""
    votes = 0
    while camp.get_campaign(store, campaign)["status"] == "active":
        battle = arena.next_battle(store, campaign, expert)
        assert battle is not None, "ran out of battles before the verdict"
        row = store.query("SELECT version_a FROM battles WHERE id = ?", [battle["battle_id"]])[0]
        arena.vote(store, expert, battle["battle_id"], "a" if row["version_a"] == winner_version else "b")
        votes += 1
    return votes


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "studio.duckdb")
    s.register_model_version("base", path="/m/base", content_hash="b" * 64, source="test")
    camp.ensure_policy_alias(s, "base")
    make_users(s, ("exp", "expert"), ("eng", "engineer"), ("ann", "annotator"))
    yield s
    s.close()


def child(store: Store, name: str = "dpo-1", parent: str = "base") -> str:
    store.register_model_version(
        name, path=f"/m/{name}", content_hash=name * 8, source="test", kind="lora", parent=parent
    )
    return name


def duel(store: Store, version: str, parent: str = "base", battles: int = 40, name: str | None = None) -> str:
    """The re-battle of `version` against `parent` (or the duel `name`), with `battles` battles
    ready to vote on."""
    name = name or f"rebattle-{version}"
    seed_battles(
        store,
        name,
        [(version, parent, "an answer", "another")] * battles,
        versions=(version, parent),
        budget=100,
    )
    return name


# -- the re-battle's prompts --------------------------------------------------------------------
class OfflineStudio:
    """What register_stage uses of a Studio; the adapter is registered, not served (no vLLM)."""

    backend = None

    def __init__(self, store: Store):
        self.store, self.task_sampler = store, None

    def add_adapter(self, name: str, path: Path, source: str, meta: dict, parent: str) -> dict:
        return self.store.register_model_version(
            name, path=str(path), content_hash=name, source=source, kind="lora", parent=parent, meta=meta
        )


def snapshot_rows(run: dict[str, Any], store: Store) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = store.query("SELECT path FROM snapshots WHERE id = ?", [run["snapshot_id"]])[0]["path"]
    return pq.read_table(path).to_pylist()


def set_messages(store: Store, set_name: str) -> set[str]:
    return {prompt_key({"prompt": p["messages"]}) for p in store.prompts(set_name)}


def test_the_rebattle_samples_held_out_prompts_and_never_training_ones(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed_easy_judgments(store, n=20)
    run = training.submit_run(
        store, tmp_path, stage="dpo", created_by="eng", campaigns=["easy"], held_out=0.25
    )
    assert run["rebattle_prompts"] == f"heldout-{run['id']}" and run["notes"] == []
    # the trainer's own split of the snapshot file
    train_rows, held_rows = split_held_out(snapshot_rows(run, store), 0.25)
    trained = {prompt_key(r) for r in train_rows}
    rebattle = set_messages(store, run["rebattle_prompts"])
    assert rebattle == {prompt_key(r) for r in held_rows} and len(rebattle) == 5
    assert not rebattle & trained
    assert run["trained_prompt_count"] == 15

    # the run finishes: the re-battle campaign samples that set, and only that set
    meta = {"kind": "lora", "run_id": run["id"], "parent_version": "base", "stage": "dpo"}
    name = register_stage(OfflineStudio(store), run, "dpo", tmp_path / "adapter", meta)
    battle = arena.battle_campaign(store, f"rebattle-{name}")
    assert battle["prompt_set"] == run["rebattle_prompts"] and set(battle["versions"]) == {name, "base"}
    assert training.get_run(store, run["id"])["rebattle"] == f"rebattle-{name}"
    # no model server here: the automatic evaluation could not start, and the gate says so
    (hold,) = promotion.history(store, name)
    assert hold["action"] == "hold" and "could not start" in hold["reasons"][0]
    (logged,) = [r for r in caplog.records if "could not start" in r.getMessage()]
    assert "no model server" in logged.getMessage() and logged.exc_info is None  # a reason, no traceback

    # a child of that version, trained on more data: its re-battle excludes what the parent trained on
    seed_easy_judgments(store, name="more", n=40)
    again = training.submit_run(store, tmp_path, stage="dpo", created_by="eng", parent=name, held_out=0.25)
    later = set_messages(store, again["rebattle_prompts"])
    assert later and not later & trained
    train_rows, _ = split_held_out(snapshot_rows(again, store), 0.25)
    assert not later & {prompt_key(r) for r in train_rows}


def test_without_held_out_prompts_the_run_says_so_and_gets_no_rebattle(store: Store, tmp_path: Path) -> None:
    seed_easy_judgments(store, n=6)
    run = training.submit_run(store, tmp_path, stage="dpo", created_by="eng", held_out=0.0)
    assert run["rebattle_prompts"] is None
    (note,) = run["notes"]
    assert "no held-out prompts for the blind re-battle (held_out is dpo 0)" in note
    assert "eval_prompt_set" in note
    meta = {"kind": "lora", "run_id": run["id"], "parent_version": "base", "stage": "dpo"}
    name = register_stage(OfflineStudio(store), run, "dpo", tmp_path / "adapter", meta)
    assert not store.query("SELECT 1 FROM battle_campaigns WHERE name = ?", [f"rebattle-{name}"])
    # PPO rolls out on every prompt: nothing held out either
    store.register_model_version("rm", path="/rm", content_hash="r" * 64, source="t", kind="reward")
    ppo = training.submit_run(store, tmp_path, stage="ppo", created_by="eng")
    assert "ppo rolls out on every prompt" in ppo["notes"][0]


def test_a_prompt_set_marked_for_evaluation_loses_the_prompts_trained_on(
    store: Store, tmp_path: Path
) -> None:
    from studio.importer import messages_hash
    from studio.store import ImportedPrompt

    seed_easy_judgments(store, n=8)
    trained = store.prompts("easy-set")
    fresh = [[{"role": "user", "content": f"A question never labelled, number {i}?"}] for i in range(3)]
    mixed = [ImportedPrompt(f"row {i}", p["messages"], p["content_hash"]) for i, p in enumerate(trained[:2])]
    mixed += [ImportedPrompt(f"new {i}", m, messages_hash(m)) for i, m in enumerate(fresh)]
    store.import_prompts("evalset", mixed, source="test")
    run = training.submit_run(
        store, tmp_path, stage="dpo", created_by="eng", held_out=0.0, eval_prompt_set="evalset"
    )
    assert run["eval_prompt_set"] == "evalset" and run["notes"] == []
    assert set_messages(store, run["rebattle_prompts"]) == {prompt_key({"prompt": m}) for m in fresh}
    # a set made only of trained prompts, or no such set: refused before any run is stored
    store.import_prompts("seen", mixed[:2], source="test")
    runs = store.count("runs")
    with pytest.raises(StoreError, match="eval_prompt_set 'seen': all 2 of its prompts are trained on"):
        training.submit_run(
            store, tmp_path, stage="dpo", created_by="eng", held_out=0.0, eval_prompt_set="seen"
        )
    with pytest.raises(StoreError, match="eval_prompt_set 'nope': no such prompt set"):
        training.submit_run(store, tmp_path, stage="dpo", created_by="eng", eval_prompt_set="nope")
    assert store.count("runs") == runs


# -- the gate's decisions -----------------------------------------------------------------------
def test_auto_promotion_follows_a_decided_rebattle_whose_guards_hold(store: Store) -> None:
    name = child(store)
    campaign = duel(store, name)
    eval_id = record_eval(store, name, "base", GOOD)
    # the evaluation finished first: the gate waits for the re-battle
    assert promotion.decide(store, name) is None and store.count("promotions") == 0
    state = promotion.gate_state(store, name)
    assert not state["ready"] and state["reasons"][0].startswith("re-battle: no verdict yet")
    votes = vote_until_closed(store, campaign, name)  # the verdict's vote calls the gate
    assert 5 <= votes < 40
    assert camp.aliases(store)["policy"] == name
    (row,) = promotion.history(store, name)
    assert (row["action"], row["decided_by"], row["forced"], row["passed"]) == (
        "promote",
        "gate",
        False,
        True,
    )
    assert (row["eval_id"], row["battle_campaign"], row["verdict"], row["from_version"]) == (
        eval_id,
        campaign,
        "better",
        "base",
    )
    # the same evidence decides once
    assert promotion.decide(store, name)["id"] == row["id"] and store.count("promotions") == 1


def test_the_verdict_first_then_the_evaluation_decides(store: Store) -> None:
    name = child(store)
    vote_until_closed(store, duel(store, name), name)
    assert camp.aliases(store)["policy"] == "base" and store.count("promotions") == 0  # no evaluation yet
    record_eval(store, name, "base", GOOD, limit=5)  # a quick look is not evidence
    assert promotion.decide(store, name) is None
    record_eval(store, name, "base", GOOD)
    assert promotion.decide(store, name)["action"] == "promote"
    assert camp.aliases(store)["policy"] == name


def test_a_failed_guard_holds_the_version_and_promote_needs_force(store: Store) -> None:
    name = child(store)
    vote_until_closed(store, duel(store, name), name)
    worse = GOOD | {"refusal_rate": (0.05, 0.25), "factual_accuracy": (0.30, 0.20)}
    record_eval(store, name, "base", worse)
    held = promotion.decide(store, name)
    assert held["action"] == "hold" and held["passed"] is False and camp.aliases(store)["policy"] == "base"
    assert [r.split(":")[0] for r in held["reasons"]] == ["refusal_rate", "factual_accuracy"]
    assert "up 20.0 points (0.050 -> 0.250" in held["reasons"][0]
    # a person may not promote it without forcing: every failing metric is named with its numbers
    with pytest.raises(promotion.PromotionRefused) as refused:
        svc.promote(svc_ctx(store), ENG, name, svc.PromoteSpec())
    message = str(refused.value)
    assert "may not be promoted to policy" in message and "--force" in message
    assert "refusal_rate: up 20.0 points (0.050 -> 0.250" in message
    assert "factual_accuracy: down 10.0 points (0.300 -> 0.200" in message
    assert camp.aliases(store)["policy"] == "base"
    done = svc.promote(svc_ctx(store), ENG, name, svc.PromoteSpec(force=True))
    assert done["forced"] and done["version"] == name and camp.aliases(store)["policy"] == name
    forced = promotion.history(store, name)[0]
    assert (forced["action"], forced["decided_by"], forced["forced"], forced["passed"]) == (
        "promote",
        "eng",
        True,
        False,
    )
    assert forced["reasons"] == held["reasons"]
    # rolled back by a person: recorded, and the gate never overrules it later
    back = svc.rollback(svc_ctx(store), ENG)
    assert back["version"] == "base" and back["previous"] == name
    assert promotion.history(store, name)[0]["action"] == "rollback"
    record_eval(store, name, "base", GOOD)
    again = promotion.decide(store, name)
    assert (
        again["action"] == "hold" and again["passed"] is True and "eng already chose" in again["reasons"][0]
    )
    assert camp.aliases(store)["policy"] == "base"


def test_the_gate_holds_when_switched_off_or_when_policy_moved_on(store: Store) -> None:
    first, second = child(store, "dpo-1"), child(store, "dpo-2")
    for name in (first, second):
        record_eval(store, name, "base", GOOD)
    vote_until_closed(store, duel(store, first), first)
    promoted = promotion.history(store, first)[0]
    assert promoted["action"] == "promote" and camp.aliases(store)["policy"] == first
    # dpo-2 was compared with base, but policy is at dpo-1 now: a person decides
    vote_until_closed(store, duel(store, second), second)
    held = promotion.history(store, second)[0]
    assert (
        held["action"] == "hold"
        and held["passed"]
        and "policy points at dpo-1, not at base" in held["reasons"][0]
    )
    third = child(store, "dpo-3", parent=first)
    record_eval(store, third, first, GOOD)
    record_eval(store, third, "base", GOOD)  # the guards hold against the lineage's root too
    vote_until_closed(store, duel(store, third, first), third)
    assert camp.aliases(store)["policy"] == third  # policy was at its parent
    # with auto_promote off the gate only says it passed
    fourth = child(store, "dpo-4", parent=third)
    record_eval(store, fourth, third, GOOD)
    record_eval(store, fourth, "base", GOOD)
    vote_until_closed(store, duel(store, fourth, third), fourth)
    promotion.after_verdict(store, f"rebattle-{fourth}")  # already decided: the same record
    assert camp.aliases(store)["policy"] == fourth
    fifth = child(store, "dpo-5", parent=fourth)
    record_eval(store, fifth, fourth, GOOD)
    record_eval(store, fifth, "base", GOOD)
    off = promotion.decide(store, fifth, GateConfig(auto_promote=False, require_rebattle=False))
    assert off["action"] == "hold" and off["passed"] and "auto_promote is off" in off["reasons"][0]


def test_a_version_over_a_held_parent_is_judged_against_where_policy_points(store: Store) -> None:
    """PPO held (policy stays at base), DPO trained on top of it: beating its parent does not move
    policy, since DPO was never shown better than base; with its own evaluation and duel against
    base the gate decides over base itself, and says so. Losing that duel holds it."""
    ppo = child(store, "ppo-1")
    record_eval(store, ppo, "base", GOOD)
    vote_until_closed(store, duel(store, ppo), "base")  # base wins: PPO held
    assert promotion.history(store, ppo)[0]["action"] == "hold" and camp.aliases(store)["policy"] == "base"
    dpo = child(store, "dpo-1", parent=ppo)
    assert promotion.ancestors(store, dpo) == [ppo, "base"]
    record_eval(store, dpo, ppo, GOOD)
    vote_until_closed(store, duel(store, dpo, ppo), dpo)
    # the guards hold against the lineage's root (base) too: no decision until that evaluation is in
    assert promotion.history(store, dpo) == []
    # (the evaluation worker calls decide when it records one; record_eval does not)
    over_eval = record_eval(store, dpo, "base", GOOD)
    held = promotion.decide(store, dpo)
    assert held["action"] == "hold" and held["passed"] and camp.aliases(store)["policy"] == "base"
    assert "policy points at base, not at ppo-1" in held["reasons"][0]
    assert "or evaluate and re-battle it against base" in held["reasons"][0]
    # an evaluation against base alone asks nothing new: the same hold
    assert promotion.decide(store, dpo)["id"] == held["id"]
    state = promotion.gate_state(store, dpo, against="base")
    assert state["against"] == "base" and state["parent"] == ppo and state["eval_id"] == over_eval
    campaign = duel(store, dpo, "base", name=f"vsbase-{dpo}")
    vote_until_closed(store, campaign, dpo)  # the verdict's vote calls the gate: an ancestor's duel
    promoted = promotion.history(store, dpo)[0]
    assert camp.aliases(store)["policy"] == dpo
    assert (promoted["action"], promoted["decided_by"], promoted["from_version"]) == (
        "promote",
        "gate",
        "base",
    )
    assert (promoted["eval_id"], promoted["battle_campaign"], promoted["verdict"]) == (
        over_eval,
        campaign,
        "better",
    )
    assert promoted["reasons"] == ["judged against base, where policy points, not its parent ppo-1"]

    # the same, but DPO loses its duel with base: held on that evidence, policy stays
    other_ppo = child(store, "ppo-2", parent=dpo)
    camp.set_alias(store, "policy", "base")  # as if rolled back past both
    other = child(store, "dpo-2", parent=other_ppo)
    record_eval(store, other, other_ppo, GOOD)
    vote_until_closed(store, duel(store, other, other_ppo), other)
    record_eval(store, other, "base", GOOD)
    lost = duel(store, other, "base", name=f"vsbase-{other}")
    vote_until_closed(store, lost, "base")
    decision = promotion.history(store, other)[0]
    assert decision["action"] == "hold" and not decision["passed"] and decision["battle_campaign"] == lost
    assert (
        any(r.startswith("re-battle:") for r in decision["reasons"])
        and camp.aliases(store)["policy"] == "base"
    )

    # a third, whose re-battle against its parent never decided but which beat base in its duel:
    # the gate promotes it over base, and a person's promote is judged the same way (unforced)
    third = child(store, "dpo-3", parent=other_ppo)
    record_eval(store, third, other_ppo, GOOD)
    duel(store, third, other_ppo)  # open, no verdict
    assert not promotion.gate_state(store, third)["passed"]
    record_eval(store, third, "base", GOOD)
    vote_until_closed(store, duel(store, third, "base", name=f"vsbase-{third}"), third)
    assert camp.aliases(store)["policy"] == third
    # its card shows the gate where it decided (against base), not "does not pass" against the
    # parent beside its own promotion (full run 12's report said both)
    shown = promotion.card(store, third)["gate"]
    assert (shown["against"], shown["passed"], shown["reasons"]) == ("base", True, [])
    assert not promotion.gate_state(store, third)["passed"]  # the parent's duel is still open
    camp.set_alias(store, "policy", "base")
    done = svc.promote(svc_ctx(store), ENG, third, svc.PromoteSpec())
    assert not done["forced"] and camp.aliases(store)["policy"] == third


def test_the_guards_hold_against_the_lineage_root_so_tolerances_do_not_add_up(store: Store) -> None:
    """Full run 8 (docs/demo.md): PPO cost 1.8 points of factual accuracy and DPO on top of it 2.7
    more, each inside the 3 allowed against its parent and 4.5 together against base. The gate
    reads the version's evaluation against the root as well: it waits for it, then holds on it."""
    ppo = child(store, "ppo-1")
    record_eval(store, ppo, "base", GOOD | {"factual_accuracy": (0.30, 0.28)})
    vote_until_closed(store, duel(store, ppo), ppo)
    assert camp.aliases(store)["policy"] == ppo  # 2 points down: inside the 3 allowed
    dpo = child(store, "dpo-1", parent=ppo)
    record_eval(store, dpo, ppo, GOOD | {"factual_accuracy": (0.28, 0.255)})  # 2.5 more
    vote_until_closed(store, duel(store, dpo, ppo), dpo)
    assert promotion.history(store, dpo) == [] and camp.aliases(store)["policy"] == ppo
    waiting = promotion.gate_state(store, dpo)
    assert not waiting["ready"] and not waiting["passed"]
    assert waiting["reasons"] == [
        "guards against base, the lineage's root: no complete evaluation against base yet; run "
        "`studio eval dpo-1 --against base` (the tolerances hold against the root too, so that "
        "they do not add up along the chain; data/gate.yaml)"
    ]
    root_eval = record_eval(store, dpo, "base", GOOD | {"factual_accuracy": (0.30, 0.255)})
    held = promotion.decide(store, dpo)
    assert (held["action"], held["passed"], camp.aliases(store)["policy"]) == ("hold", False, ppo)
    assert held["reasons"] == [
        "against base, the lineage's root: factual_accuracy: down 4.5 points (0.300 -> 0.255, 95% "
        "interval of the change [-0.095, +0.005]), more than the allowed 3.0 points"
    ]
    assert promotion.gate_state(store, dpo)["root_eval_id"] == root_eval
    # a person's promote is refused on the same reason, unless forced
    with pytest.raises(promotion.PromotionRefused, match="against base, the lineage's root: factual"):
        promotion.promote(store, dpo, "policy", "eng")
    # switched off, each version answers to its parent alone (the old rule)
    assert promotion.gate_state(store, dpo, GateConfig(guard_against_root=False))["passed"]
    # the re-battle read stays the one against the parent: a duel with the root is not asked for
    fine = child(store, "dpo-2", parent=ppo)
    record_eval(store, fine, ppo, GOOD)
    record_eval(store, fine, "base", GOOD)
    vote_until_closed(store, duel(store, fine, ppo), fine)
    assert camp.aliases(store)["policy"] == fine
    assert promotion.history(store, fine)[0]["action"] == "promote"
    # a new evaluation against the root is new evidence: decided again (passed now; policy moved on)
    again_eval = record_eval(store, dpo, "base", GOOD)
    again = promotion.decide(store, dpo)
    assert again["id"] != held["id"] and again["passed"] and again["root_eval_id"] == again_eval
    assert "policy points at dpo-2, not at ppo-1" in again["reasons"][0]


def test_a_waived_rebattle_and_a_version_without_one(store: Store) -> None:
    name = child(store)
    record_eval(store, name, "base", GOOD)  # no re-battle was opened (no held-out prompts)
    held = promotion.decide(store, name)
    assert held["action"] == "hold" and "re-battle: none was opened against base" in held["reasons"][0]
    record_eval(store, name, "base", GOOD, waived=True)  # an engineer waived it in a new evaluation
    done = promotion.decide(store, name)
    assert done["action"] == "promote" and done["reasons"][0].startswith("re-battle waived in evaluation")


def test_a_version_without_evaluation_is_refused_and_the_base_is_not_gated(store: Store) -> None:
    name = child(store)
    with pytest.raises(
        promotion.PromotionRefused, match=r"evaluation: no complete evaluation against its parent base yet"
    ):
        promotion.promote(store, name, "policy", "eng")
    promotion.promote(store, name, "policy", "eng", force=True)
    assert promotion.promote(store, "base", "policy", "eng")["forced"] is False  # the reference


# -- the card -------------------------------------------------------------------------------------
def test_the_card_has_metrics_rebattle_gate_promotions_and_lineage(store: Store) -> None:
    name = child(store)
    campaign = duel(store, name)
    eval_id = record_eval(store, name, "base", GOOD)
    vote_until_closed(store, campaign, name)
    card = svc.model_card(svc_ctx(store), ENG, name)
    json.dumps(card)  # what REST sends
    assert card["version"] == name and card["parent"] == "base" and card["aliases"] == ["policy"]
    assert card["evaluation"]["id"] == eval_id and card["evaluation"]["status"] == "succeeded"
    by_name = {m["metric"]: m for m in card["metrics"]}
    assert set(by_name) == set(GOOD) and by_name["refusal_rate"]["against"] == 0.05
    battle = card["rebattle"]
    assert (
        battle["campaign"] == campaign and battle["status"] == "closed" and battle["verdict"].startswith(name)
    )
    assert battle["wins"] == battle["votes"] and battle["win_rate"] == 1.0 and battle["interval"][0] > 0.5
    assert card["gate"]["passed"] and card["promotions"][0]["action"] == "promote"
    assert [s["version"] for s in card["lineage"]] == [name, "base"]
    # the Models tab renders it, names as text
    from studio.ui.models import card_html

    page = card_html(card)
    assert "refusal_rate" in page and page.count("<svg") == 2 and "promote" in page
    with pytest.raises(AuthError):
        svc.model_card(svc_ctx(store), User("ann", "annotator"), name)


def svc_ctx(store: Store) -> Any:
    """The services' context over this store (no studio running)."""

    class Ctx:
        settings = None
        backend = sampler = task_sampler = runner = None
        base_version = "base"

    ctx = Ctx()
    ctx.store = store
    return ctx


# -- the doors ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    from tests.conftest import NoModelStudio

    with NoModelStudio(tmp_path_factory.mktemp("evals-api")) as studio:
        store = studio.studio.store
        store.register_model_version("base", path="/m/base", content_hash="b" * 64, source="test")
        camp.ensure_policy_alias(store, "base")
        child(store, "kid")
        tokens = make_users(store, ("ann", "annotator"), ("eng", "engineer"))
        yield studio, tokens


def rest(served: tuple[Any, dict], who: str, method: str, route: str, **kw: Any) -> httpx.Response:
    studio, tokens = served
    return httpx.request(
        method,
        f"{studio.url}/api/v1{route}",
        headers={"Authorization": f"Bearer {tokens[who]}"},
        timeout=60,
        **kw,
    )


EXACT = {"version", "against", "metrics", "gate"}


def test_rest_reads_an_evaluation_in_exactly_the_issue_shape(served: tuple[Any, dict]) -> None:
    store = served[0].studio.store
    eval_id = record_eval(store, "kid", "base", {"refusal_rate": (0.1, 0.2)})
    got = rest(served, "eng", "GET", f"/evals/{eval_id}")
    assert got.status_code == 200, got.text
    result = got.json()["result"]
    assert set(result) == EXACT and set(result["gate"]) == {"passed", "reasons"}
    assert set(result["metrics"]["refusal_rate"]) == {"version", "against", "delta", "ci"}
    assert [e["id"] for e in rest(served, "eng", "GET", "/evals", params={"version": "kid"}).json()] == [
        eval_id
    ]
    assert rest(served, "eng", "GET", "/evals/eval-nope").status_code == 422


def test_rest_eval_and_promotion_errors(served: tuple[Any, dict]) -> None:
    bad = rest(served, "eng", "POST", "/evals", json={"version": "ghost"})
    assert (
        bad.status_code == 422 and "version: model version 'ghost' is not registered" in bad.json()["detail"]
    )
    bad = rest(served, "eng", "POST", "/evals", json={"version": "kid", "suites": ["bogus"]})
    assert bad.status_code == 422 and "unknown suite" in bad.json()["detail"]
    judge = rest(served, "eng", "POST", "/evals", json={"version": "kid", "judge_url": "http://x"})
    assert judge.status_code == 422 and "give the judge's model too" in judge.json()["detail"]
    down = rest(served, "eng", "POST", "/evals", json={"version": "kid"})
    assert (
        down.status_code == 503 and "evaluating runs the suites on the model server" in down.json()["detail"]
    )
    refused = rest(served, "eng", "POST", "/models/kid/promote", json={})
    assert (
        refused.status_code == 422
        and "its gate did not pass: re-battle: none was opened against base" in refused.json()["detail"]
    )
    forced = rest(served, "eng", "POST", "/models/kid/promote", json={"force": True})
    assert forced.status_code == 200 and forced.json()["forced"] is True
    card = rest(served, "eng", "GET", "/models/kid/card").json()
    assert card["promotions"][0]["decided_by"] == "eng" and card["promotions"][0]["forced"] is True
    back = rest(served, "eng", "POST", "/models/policy/rollback")
    assert back.status_code == 200 and back.json()["version"] == "base"


@pytest.mark.parametrize(
    ("method", "route", "body"),
    [
        ("POST", "/evals", {"version": "kid"}),
        ("GET", "/evals", None),
        ("GET", "/evals/eval-x", None),
        ("GET", "/models/kid/card", None),
        ("POST", "/models/kid/promote", {"force": True}),
    ],
)
def test_an_annotator_may_not_evaluate_read_cards_or_promote(
    served: tuple[Any, dict], method: str, route: str, body: dict | None
) -> None:
    store = served[0].studio.store
    before = store.count("evals"), store.count("promotions"), camp.aliases(store)
    resp = rest(served, "ann", method, route, json=body)
    assert resp.status_code == 403 and resp.json()["detail"].startswith(
        "user 'ann' (annotator) may not train"
    )
    assert (store.count("evals"), store.count("promotions"), camp.aliases(store)) == before


def test_cli_promote_refuses_then_forces_and_the_card_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from studio.cli import main

    s = Store(tmp_path / "studio.duckdb")
    s.register_model_version("base", path="/m/base", content_hash="b" * 64, source="test")
    camp.ensure_policy_alias(s, "base")
    child(s, "kid")
    record_eval(s, "kid", "base", GOOD | {"capability_accuracy": (0.40, 0.30)})
    s.close()
    data = ["--data-dir", str(tmp_path)]
    assert main(["models", "promote", "kid", *data]) == 1
    err = capsys.readouterr().err
    assert "capability_accuracy: down 10.0 points (0.400 -> 0.300" in err and "--force" in err
    assert main(["models", "promote", "kid", "--force", *data]) == 0
    out = capsys.readouterr().out
    assert out.startswith("'policy' now points at kid\nforced (recorded): the gate did not pass:\n")
    assert main(["models", "card", "kid", *data]) == 0
    out = capsys.readouterr().out
    assert (
        "capability_accuracy" in out and "-0.100" in out and "promote  policy -> kid  by cli (forced)" in out
    )
    assert main(["models", "card", "kid", "--json", *data]) == 0
    assert json.loads(capsys.readouterr().out)["promotions"][0]["forced"] is True
    # evaluating needs the model server: said after the input is checked
    assert main(["eval", "ghost", *data]) == 1
    assert "version: model version 'ghost'" in capsys.readouterr().err
    assert main(["eval", "kid", "--suite", "factual", *data]) == 1
    assert "evaluating runs the suites on the model server" in capsys.readouterr().err


def test_the_models_tab_shows_the_card_and_promotes_only_when_confirmed(tmp_path: Path) -> None:
    import gradio as gr

    from studio.ui import build_ui

    with svc.OfflineContext(tmp_path) as ctx:
        store = ctx.store
        store.register_model_version("base", path="/m/base", content_hash="b" * 64, source="test")
        camp.ensure_policy_alias(store, "base")
        child(store, "kid")
        make_users(store, ("eng", "engineer"), ("ann", "annotator"))
        record_eval(store, "kid", "base", GOOD | {"refusal_rate": (0.05, 0.30)})
        demo = build_ui(ctx)

        def call(api_name: str, user: str, *inputs: Any) -> Any:
            fn = next(f for f in demo.fns.values() if f.api_name == api_name)
            return fn.fn(*inputs, gr.Request(username=user))

        page, lineage = call("model_card", "eng", "kid")
        assert "refusal_rate" in page and "+0.250" in page and page.count("<svg") == 1
        assert "Gate: does not pass" in page and "refusal_rate: up 25.0 points" in page
        assert "**kid**" in lineage
        with pytest.raises(gr.Error, match=r"refusal_rate: up 25\.0 points"):
            call("promote", "eng", "kid", False)
        assert camp.aliases(store)["policy"] == "base"
        call("promote", "eng", "kid", True)  # the confirmation box ticked
        assert camp.aliases(store)["policy"] == "kid"
        assert promotion.history(store, "kid")[0]["forced"] is True
        with pytest.raises(gr.Error, match="evaluating runs the suites on the model server"):
            call("model_evaluate", "eng", "kid")
        for event, inputs in (
            ("model_card", ["kid"]),
            ("promote", ["kid", True]),
            ("model_evaluate", ["kid"]),
        ):
            with pytest.raises(gr.Error, match=r"user 'ann' \(annotator\) may not train"):
                call(event, "ann", *inputs)
