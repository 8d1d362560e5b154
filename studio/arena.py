"""Blind side-by-side battles between model versions, and their ratings.

A battle is one prompt answered by two versions with the same sampling
parameters, sides assigned at random and recorded. Until the vote nothing an
expert receives names a version: the battle id is random, the payload holds
the prompt and the two texts only. An answer that reveals an identity (a
version name or a word from the campaign's list) marks the battle as a leak:
it is never served and never rated, and the leaderboard counts it.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import replace
from itertools import combinations
from typing import Any

import numpy as np

from studio import campaigns as camp
from studio.ratings import Battles, bootstrap, fit, leaderboard, style_controlled, win_matrix
from studio.serving.client import SamplingParams
from studio.store import Store, StoreError, new_id

WINNERS = ("a", "b", "tie", "both_bad")
MIN_VOTES_TO_STOP = 10
# Battles sample a little cooler than labeling (SamplingParams' 0.8): two answers compared side
# by side should differ by the model more than by the luck of the draw.
BATTLE_TEMPERATURE = 0.7

# SmolLM introduces itself by name; other families do the same.
DEFAULT_LEAK_WORDS = (
    "smollm",
    "hugging face",
    "huggingface",
    "trained by",
    "openai",
    "chatgpt",
    "gpt-4",
    "claude",
    "anthropic",
    "llama",
    "mistral",
    "gemini",
    "qwen",
)
FASTCHAT_WINNER = {"a": "model_a", "b": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}


def create_battle_campaign(
    store: Store,
    name: str,
    *,
    prompt_set: str,
    versions: list[str],
    budget: int = 200,
    temperature: float = BATTLE_TEMPERATURE,
    top_p: float = SamplingParams.top_p,
    max_tokens: int = SamplingParams.max_tokens,
    both_bad_as_tie: bool = True,
    leak_words: list[str] | None = None,
    criteria: list[str] | None = None,
    created_by: str | None = None,
) -> dict[str, Any]:
    versions = list(dict.fromkeys(v.strip() for v in versions if v.strip()))
    if len(versions) < 2:
        raise StoreError("versions: a battle campaign needs at least two different versions or aliases")
    resolved = {camp.resolve_policy(store, v) for v in versions}
    if len(resolved) < 2:
        raise StoreError(
            f"versions: {', '.join(versions)} all resolve to {resolved.pop()}; "
            "a battle campaign needs at least two different versions"
        )

    if not 1 <= budget <= 100_000:
        raise StoreError(f"budget={budget}: the vote budget must be between 1 and 100000")
    camp.create_campaign(
        store,
        name,
        prompt_set=prompt_set,
        model=versions[0],
        n=2,
        overlap=1,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        created_by=created_by,
        status="paused",
        kind="battle",
    )
    words = [w.lower() for w in (leak_words if leak_words is not None else DEFAULT_LEAK_WORDS) if w]
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO battle_campaigns (name, versions, budget, both_bad_as_tie, leak_words, criteria)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [name, versions, budget, both_bad_as_tie, words, list(criteria or [])],
        )
    camp.set_status(store, name, "active")
    return battle_campaign(store, name)


def battle_campaign(store: Store, name: str) -> dict[str, Any]:
    base = camp.get_campaign(store, name)
    rows = store.query("SELECT * FROM battle_campaigns WHERE name = ?", [name])
    if not rows:
        raise StoreError(f"campaign '{name}' is not a battle campaign")
    extra = rows[0]
    return {**base, **{k: (list(v) if isinstance(v, np.ndarray | list) else v) for k, v in extra.items()}}


def find_leak(texts: list[str], words: list[str], names: list[str]) -> str | None:
    """The first identity-revealing word in any of the texts, or None."""
    needles = [w.lower() for w in words] + [n.lower() for n in names if len(n) >= 3]
    for text in texts:
        low = text.lower()
        for needle in needles:
            if re.search(rf"(?<![a-z0-9]){re.escape(needle)}(?![a-z0-9])", low):
                return needle
    return None


# -- choosing and sampling battles ---------------------------------------------------------
def _vote_rows(store: Store, name: str, both_bad_as_tie: bool = True) -> list[dict[str, Any]]:
    """Rated votes of a campaign (leaks left out): versions, outcome for A, answer lengths, scores."""
    rows = store.query(
        "SELECT b.version_a, b.version_b, v.winner, v.scores, length(ga.text) AS len_a,"
        " length(gb.text) AS len_b FROM votes v JOIN battles b ON b.id = v.battle_id"
        " JOIN generations ga ON ga.id = b.generation_a JOIN generations gb ON gb.id = b.generation_b"
        " WHERE v.campaign = ? AND b.leak IS NULL ORDER BY v.created_at",
        [name],
    )
    ys = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
    for r in rows:
        r["y"] = ys[r["winner"]]
        r["scores"] = json.loads(r["scores"]) if isinstance(r["scores"], str) else r["scores"]
    return [r for r in rows if both_bad_as_tie or r["winner"] != "both_bad"]


def _outcomes(
    store: Store, name: str, both_bad_as_tie: bool = True
) -> tuple[list[str], list[str], list[float]]:
    rows = _vote_rows(store, name, both_bad_as_tie)
    return [r["version_a"] for r in rows], [r["version_b"] for r in rows], [r["y"] for r in rows]


def next_pair(store: Store, campaign: dict[str, Any]) -> tuple[str, str]:
    """The pair whose comparison is least decided: largest p(1-p)/(n+1) under the current fit."""
    versions = [camp.resolve_model(store, v) for v in campaign["versions"]]
    a, b, y = _outcomes(store, campaign["name"], campaign["both_bad_as_tie"])
    counts: Counter[tuple[str, str]] = Counter(tuple(sorted(p)) for p in zip(a, b, strict=True))
    strength = {v: 0.0 for v in versions}
    if y:
        battles = Battles.from_outcomes(a, b, y)
        theta = fit(battles)
        strength.update({n: float(t) for n, t in zip(battles.names, theta, strict=True)})
    pending = Counter(
        tuple(sorted((r["version_a"], r["version_b"])))
        for r in store.query(
            "SELECT version_a, version_b FROM battles WHERE campaign = ? AND status IN ('ready', 'assigned')"
            " AND leak IS NULL",
            [campaign["name"]],
        )
    )
    best, best_score = None, -1.0
    for x, z in combinations(sorted(set(versions)), 2):
        p = 1 / (1 + np.exp(-(strength[x] - strength[z])))
        score = p * (1 - p) / (counts[(x, z)] + pending[(x, z)] + 1)
        if score > best_score:
            best, best_score = (x, z), score
    assert best is not None
    return best


def make_battle(store: Store, sampler: Any, campaign_name: str) -> dict[str, Any]:
    """Sample one battle: a prompt, the least decided pair, both answers, random sides."""
    campaign = battle_campaign(store, campaign_name)
    x, z = next_pair(store, campaign)
    prompt = store.query(
        "SELECT p.id, p.messages FROM prompts p WHERE p.set_name = ?"
        " ORDER BY (SELECT count(*) FROM battles b WHERE b.prompt_id = p.id AND b.campaign = ?),"
        " random() LIMIT 1",
        [campaign["prompt_set"], campaign_name],
    )[0]
    messages = json.loads(prompt["messages"]) if isinstance(prompt["messages"], str) else prompt["messages"]
    params = camp.sampling_params(campaign)
    params = replace(params, n=1, seed=random.randrange(2**31))  # same seed for both sides
    rows_x = sampler.sample(messages, params, version=x, prompt_id=prompt["id"])
    rows_z = sampler.sample(messages, params, version=z, prompt_id=prompt["id"])
    (va, ga), (vb, gb) = random.sample([(x, rows_x[0]), (z, rows_z[0])], 2)
    leak = find_leak([ga["text"], gb["text"]], campaign["leak_words"], [x, z])
    battle_id = new_id()
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO battles (id, campaign, prompt_id, version_a, version_b, generation_a,"
            " generation_b, leak) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [battle_id, campaign_name, prompt["id"], va, vb, ga["id"], gb["id"], leak],
        )
    return {"id": battle_id, "leak": leak}


def ready_battles(store: Store, campaign_name: str) -> int:
    return store.query(
        "SELECT count(*) AS n FROM battles WHERE campaign = ? AND status = 'ready' AND leak IS NULL",
        [campaign_name],
    )[0]["n"]


# -- experts -------------------------------------------------------------------------------
def _payload(store: Store, battle_id: str) -> dict[str, Any]:
    row = store.query(
        "SELECT b.id, p.messages, ga.text AS text_a, gb.text AS text_b,"
        " ga.finish_reason AS finish_a, gb.finish_reason AS finish_b FROM battles b"
        " JOIN prompts p ON p.id = b.prompt_id JOIN generations ga ON ga.id = b.generation_a"
        " JOIN generations gb ON gb.id = b.generation_b WHERE b.id = ?",
        [battle_id],
    )[0]
    # Blind: the battle id is random and nothing here names a version. The finish reasons
    # ("length": cut off at max_tokens) are the campaign's one setting for both sides, not an identity.
    return {
        "battle_id": row["id"],
        "prompt": json.loads(row["messages"]),
        "a": row["text_a"],
        "b": row["text_b"],
        "a_finish_reason": row["finish_a"],
        "b_finish_reason": row["finish_b"],
    }


def next_battle(
    store: Store, campaign_name: str, expert: str, timeout_s: int = 1800
) -> dict[str, Any] | None:
    campaign = battle_campaign(store, campaign_name)
    if campaign["status"] != "active":
        raise StoreError(
            f"campaign '{campaign_name}' is {campaign['status']}"
            + (f": {campaign['verdict']}" if campaign.get("verdict") else "")
        )
    with store.transaction() as cur:
        row = cur.execute(
            "SELECT id FROM battles WHERE campaign = ? AND status = 'assigned' AND expert = ? LIMIT 1",
            [campaign_name, expert],
        ).fetchone()
        if row is None:
            row = cur.execute(
                "SELECT id FROM battles WHERE campaign = ? AND leak IS NULL AND (status = 'ready' OR"
                " (status = 'assigned' AND assigned_at < now() - to_seconds(?)))"
                " ORDER BY created_at LIMIT 1",
                [campaign_name, timeout_s],
            ).fetchone()
            if row is None:
                return None
            cur.execute(
                "UPDATE battles SET status = 'assigned', expert = ?, assigned_at = now() WHERE id = ?",
                [expert, row[0]],
            )
    return _payload(store, row[0])


def vote(
    store: Store,
    expert: str,
    battle_id: str,
    winner: str,
    *,
    scores: dict | None = None,
    rationale: str | None = None,
    idempotency_key: str | None = None,
    duration_ms: float | None = None,
) -> dict[str, Any]:
    """Record the vote, lock the battle and reveal the versions. Retries return the same reveal."""
    if winner not in WINNERS:
        raise StoreError(f"winner {winner!r}: use one of {', '.join(WINNERS)}")
    key = idempotency_key or f"{battle_id}:{expert}"
    rows = store.query("SELECT * FROM battles WHERE id = ?", [battle_id])
    if not rows:
        raise StoreError(f"battle '{battle_id}' does not exist; ask for the next battle")
    battle = rows[0]
    existing = store.query("SELECT * FROM votes WHERE battle_id = ?", [battle_id])
    if existing:
        if existing[0]["expert"] != expert:
            raise StoreError(f"battle '{battle_id}' was already judged by someone else")
        return _reveal(store, battle, existing[0])
    if battle["expert"] != expert or battle["status"] != "assigned":
        raise StoreError(f"battle '{battle_id}' is not assigned to you; ask for the next battle")
    campaign = battle_campaign(store, battle["campaign"])
    checked: dict[str, dict[str, int]] = {}
    for criterion, pair in (scores or {}).items():
        if criterion not in campaign["criteria"]:
            raise StoreError(
                f"scores: unknown criterion {criterion!r}; use {', '.join(campaign['criteria'])}"
            )
        if not all(isinstance(pair.get(s), int) and 1 <= pair[s] <= 5 for s in ("a", "b")):
            raise StoreError(f"scores: {criterion} needs whole numbers 1-5 for 'a' and 'b'")
        checked[criterion] = {"a": pair["a"], "b": pair["b"]}
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO votes (id, idempotency_key, battle_id, campaign, expert, winner, scores,"
            " rationale, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                new_id(),
                key,
                battle_id,
                battle["campaign"],
                expert,
                winner,
                json.dumps(checked),
                (rationale or "").strip() or None,
                duration_ms,
            ],
        )
        cur.execute("UPDATE battles SET status = 'voted' WHERE id = ?", [battle_id])
    check_stop(store, battle["campaign"])
    return _reveal(store, battle, store.query("SELECT * FROM votes WHERE battle_id = ?", [battle_id])[0])


def _reveal(store: Store, battle: dict[str, Any], vote_row: dict[str, Any]) -> dict[str, Any]:
    return {
        "battle_id": battle["id"],
        "winner": vote_row["winner"],
        "a": battle["version_a"],
        "b": battle["version_b"],
        "vote_id": vote_row["id"],
    }


# -- ratings and stopping ------------------------------------------------------------------------
def two_version_interval(
    store: Store, name: str, rounds: int = 200
) -> tuple[str, str, float, float, float] | None:
    """(x, z, p, lo, hi): P(x beats z) and its 95% bootstrap interval, for a two-version campaign."""
    campaign = battle_campaign(store, name)
    a, b, y = _outcomes(store, name, campaign["both_bad_as_tie"])
    if not y or len(set(a) | set(b)) != 2:
        return None
    battles = Battles.from_outcomes(a, b, y)
    theta = fit(battles)
    boots = bootstrap(battles, rounds=rounds, seed=len(y))
    diff = boots[:, 0] - boots[:, 1]
    lo, hi = np.quantile(1 / (1 + np.exp(-diff)), [0.025, 0.975])
    p = float(1 / (1 + np.exp(-(theta[0] - theta[1]))))
    return battles.names[0], battles.names[1], p, float(lo), float(hi)


def check_stop(store: Store, name: str) -> str | None:
    """Stop a campaign when its budget is spent, or (two versions) when the verdict is clear."""
    campaign = battle_campaign(store, name)
    votes = store.query("SELECT count(*) AS n FROM votes WHERE campaign = ?", [name])[0]["n"]
    verdict = None
    # With a handful of votes the bootstrap is degenerate (every resample agrees), so the
    # interval rule waits for a minimum; 10 is where a 10-0 sweep first excludes 0.5 by a margin.
    enough = votes >= MIN_VOTES_TO_STOP
    spent = votes >= campaign["budget"]
    # the bootstrap runs on every vote, so only when its answer can change the outcome
    two = len(set(campaign["versions"])) == 2
    interval = two_version_interval(store, name) if two and (enough or spent) else None
    if interval is not None:
        x, z, p, lo, hi = interval
        if enough and (lo > 0.5 or hi < 0.5):
            better, worse = (x, z) if lo > 0.5 else (z, x)
            pw = p if lo > 0.5 else 1 - p
            verdict = (
                f"{better} beats {worse}: P(win) {pw:.2f}, 95% interval excludes 0.5 after {votes} votes"
            )
    if verdict is None and spent:
        verdict = f"budget of {campaign['budget']} votes spent without a clear winner"
        if interval is not None:
            verdict += f" (P({interval[0]} beats {interval[1]}) {interval[2]:.2f})"
    if verdict:
        with store.transaction() as cur:
            cur.execute("UPDATE battle_campaigns SET verdict = ? WHERE name = ?", [verdict, name])
        camp.set_status(store, name, "closed")
    return verdict


def campaign_leaderboard(
    store: Store,
    name: str | None = None,
    rounds: int = 100,
    min_battles: int = 0,
    style_control: bool = False,
) -> dict[str, Any]:
    """Ratings over one battle campaign (or all), with leak and vote counts, the win-rate and
    battle-count matrices, mean per-criterion scores, and (optionally) length-controlled ratings."""
    names = [name] if name else [c["name"] for c in camp.list_campaigns(store, kind="battle")]
    rows: list[dict[str, Any]] = []
    for n in names:
        rows += _vote_rows(store, n, battle_campaign(store, n)["both_bad_as_tie"])
    leaks = store.query(
        "SELECT count(*) AS n FROM battles WHERE leak IS NOT NULL AND list_contains(?, campaign)", [names]
    )[0]["n"]
    out: dict[str, Any] = {
        "campaigns": names,
        "votes": len(rows),
        "leaked_battles_excluded": leaks,
        "leaderboard": [],
        "win_rate": {},
        "battle_count": {},
        "criteria": {},
    }
    if not rows:
        return out
    battles = Battles.from_outcomes(
        [r["version_a"] for r in rows], [r["version_b"] for r in rows], [r["y"] for r in rows]
    )
    out["leaderboard"] = leaderboard(battles, rounds=rounds, min_battles=min_battles)
    rate, count = win_matrix(battles)
    out["win_rate"] = {
        x: {
            z: (None if np.isnan(rate[i, j]) else round(float(rate[i, j]), 3))
            for j, z in enumerate(battles.names)
            if i != j
        }
        for i, x in enumerate(battles.names)
    }
    out["battle_count"] = {
        x: {z: int(count[i, j]) for j, z in enumerate(battles.names) if i != j}
        for i, x in enumerate(battles.names)
    }
    scores: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for criterion, pair in (r["scores"] or {}).items():
            scores[criterion][r["version_a"]].append(pair["a"])
            scores[criterion][r["version_b"]].append(pair["b"])
    out["criteria"] = {
        c: {v: round(float(np.mean(xs)), 2) for v, xs in per.items()} for c, per in scores.items()
    }
    if style_control:
        out["style_controlled"] = style_controlled(
            [r["version_a"] for r in rows],
            [r["version_b"] for r in rows],
            [r["y"] for r in rows],
            [r["len_a"] for r in rows],
            [r["len_b"] for r in rows],
            rounds=rounds,
        )
    return out


def regenerate(store: Store, expert: str, battle_id: str) -> None:
    """Drop the battle on screen and let a new one be sampled: always both sides together, so the
    expert never sees one answer replaced while the other stays (which would hint at the sides)."""
    with store.transaction() as cur:
        row = cur.execute("SELECT expert, status FROM battles WHERE id = ?", [battle_id]).fetchone()
        if row is None or row[0] != expert or row[1] != "assigned":
            raise StoreError(f"battle '{battle_id}' is not assigned to you")
        cur.execute("UPDATE battles SET status = 'discarded' WHERE id = ?", [battle_id])


def battle_log(store: Store, name: str | None = None) -> list[dict[str, Any]]:
    """Votes in FastChat's battle-log columns, plus ours."""
    rows = store.query(
        "SELECT v.*, b.version_a, b.version_b, b.prompt_id, ga.text AS answer_a, gb.text AS answer_b"
        " FROM votes v JOIN battles b ON b.id = v.battle_id JOIN generations ga ON ga.id = b.generation_a"
        " JOIN generations gb ON gb.id = b.generation_b WHERE ? IS NULL OR v.campaign = ?"
        " ORDER BY v.created_at",
        [name, name],
    )
    return [
        {
            "model_a": r["version_a"],
            "model_b": r["version_b"],
            "winner": FASTCHAT_WINNER[r["winner"]],
            "judge": r["expert"],
            "tstamp": r["created_at"].timestamp(),
            "battle_id": r["battle_id"],
            "campaign": r["campaign"],
            "prompt_id": r["prompt_id"],
            "answer_a": r["answer_a"],
            "answer_b": r["answer_b"],
            "scores": r["scores"],
            "rationale": r["rationale"],
        }
        for r in rows
    ]


def expert_quality(store: Store, name: str | None = None) -> list[dict[str, Any]]:
    """Per expert: agreement with the majority of other experts on the same prompt and pair,
    and position bias (share of decisive votes that went to side A; 0.5 is none)."""
    rows = store.query(
        "SELECT v.expert, v.winner, b.prompt_id, b.version_a, b.version_b FROM votes v"
        " JOIN battles b ON b.id = v.battle_id WHERE ? IS NULL OR v.campaign = ?",
        [name, name],
    )
    groups: dict[tuple, list[tuple[str, str]]] = defaultdict(list)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: Counter())
    for r in rows:
        x, z = sorted((r["version_a"], r["version_b"]))
        w = r["winner"]
        outcome = w if w in ("tie", "both_bad") else (r[f"version_{w}"])
        groups[(r["prompt_id"], x, z)].append((r["expert"], outcome))
        s = stats[r["expert"]]
        s["votes"] += 1
        if w in ("a", "b"):
            s["decisive"] += 1
            s["side_a"] += w == "a"
    for entries in groups.values():
        for expert, outcome in entries:
            others = Counter(o for e, o in entries if e != expert)
            top = others.most_common(2)
            if not top or (len(top) == 2 and top[0][1] == top[1][1]):
                continue
            stats[expert]["majority_n"] += 1
            stats[expert]["majority_agree"] += top[0][0] == outcome
    return [
        {
            "expert": e,
            "votes": s["votes"],
            "agreement_with_majority": s["majority_agree"] / s["majority_n"] if s["majority_n"] else None,
            "position_bias_side_a": s["side_a"] / s["decisive"] if s["decisive"] else None,
        }
        for e, s in sorted(stats.items())
    ]
