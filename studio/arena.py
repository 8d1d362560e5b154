"""Blind side-by-side battles between model versions, and their ratings.

A battle is one prompt answered by two versions with the same sampling
parameters, sides assigned at random and recorded. Until the vote nothing an
expert receives names a version: the battle id is random, the payload holds
the prompt and the two texts only. An answer that reveals an identity (a
version name that could identify it, or a word from the campaign's list) marks
the battle as a leak: it is never served and never rated, and the leaderboard
counts it. A two-version campaign stops as soon as an always-valid confidence
sequence decides it (studio/sequential.py), or when its vote budget is spent.
"""

from __future__ import annotations

import functools
import json
import random
import re
import threading
from collections import Counter, defaultdict
from dataclasses import replace
from itertools import combinations
from typing import Any

import numpy as np
from wordfreq import zipf_frequency

from studio import campaigns as camp
from studio import sequential
from studio.names import check_name
from studio.ratings import PROVISIONAL_BATTLES, Battles, fit, leaderboard, style_controlled, win_matrix
from studio.serving.client import SamplingParams
from studio.store import Store, StoreError, new_id
from studio.textcheck import MAX_KEY_CHARS, MAX_RATIONALE_CHARS, check_text, listing, shorten

WINNERS = ("a", "b", "tie", "both_bad")
# A letters-only version name at least this common in English (wordfreq's Zipf scale: 4 is ten
# uses per million words; base 5.1, policy 5.2, champion 4.6) is an ordinary word that answers
# use by chance, so it does not mark a leak. Rarer ones (zephyr 2.9, smollm 0) do.
ORDINARY_WORD_ZIPF = 4.0
_STOP_LOCK = threading.Lock()  # one stopping decision at a time, so two votes cannot both close

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
# Limits of a battle campaign's settings: a leak word or a criterion is a short phrase.
MAX_WORD_CHARS = 100
MAX_VERSION_CHARS = 128  # a version or alias name (a served model id may have 128: studio.names)
MAX_WORDS = 1000
MAX_CRITERIA = 20
FASTCHAT_WINNER = {"a": "model_a", "b": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}


def create_battle_campaign(
    store: Store,
    name: str,
    *,
    prompt_set: str,
    versions: list[str],
    budget: int = 200,
    temperature: float = camp.BATTLE_TEMPERATURE,
    top_p: float = SamplingParams.top_p,
    max_tokens: int = SamplingParams.max_tokens,
    both_bad_as_tie: bool = True,
    leak_words: list[str] | None = None,
    criteria: list[str] | None = None,
    created_by: str | None = None,
    alpha: float = sequential.ALPHA,
    max_model_len: int | None = None,
) -> dict[str, Any]:
    """Store a battle campaign (its `campaigns` row and its `battle_campaigns` row, in one
    transaction: the task sampler never sees one without the other). Everything is checked
    first; a refused campaign stores nothing.

    `alpha`: the error level of a two-version duel's verdict. The duel is looked at after
    every vote and stops the first time its confidence sequence excludes an even split; the
    chance that it names a winner between two equally good versions is at most alpha.
    `max_model_len`: the served context in tokens, when known (see campaigns.create_campaign)."""
    check_name("campaign", name)
    for i, v in enumerate(versions):
        check_text(v, f"versions[{i}]", max_chars=MAX_VERSION_CHARS)
    versions = list(dict.fromkeys(v.strip() for v in versions if v.strip()))
    if len(versions) < 2:
        raise StoreError("versions: a battle campaign needs at least two different versions or aliases")
    resolved = {camp.resolve_policy(store, v) for v in versions}
    if len(resolved) < 2:
        raise StoreError(
            f"versions: {listing(versions)} all resolve to {resolved.pop()}; "
            "a battle campaign needs at least two different versions"
        )

    if not 1 <= budget <= 100_000:
        raise StoreError(f"budget={budget}: the vote budget must be between 1 and 100000")
    if not 0.001 <= alpha <= 0.2:
        raise StoreError(
            f"alpha={alpha}: the duel's error level must be between 0.001 and 0.2 (default 0.05)"
        )
    words = _checked_words(leak_words if leak_words is not None else DEFAULT_LEAK_WORDS)
    criteria = _checked_criteria(criteria or [])
    row = camp.checked_campaign(
        store,
        name,
        prompt_set=prompt_set,
        model=versions[0],
        n=2,
        overlap=1,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=None,
        task_timeout_s=1800,
        guidelines="",
        created_by=created_by,
        status="active",
        kind="battle",
        max_model_len=max_model_len,
    )
    with store.transaction() as cur:
        camp.insert_campaign(cur, row)
        cur.execute(
            "INSERT INTO battle_campaigns (name, versions, budget, both_bad_as_tie, leak_words, criteria,"
            " alpha) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [name, versions, budget, both_bad_as_tie, words, criteria, alpha],
        )
    return battle_campaign(store, name)


def _checked_texts(value: Any, field: str, noun: str, limit: int) -> list[str]:
    """A list of at most `limit` storable texts of at most MAX_WORD_CHARS, for `field`."""
    if not isinstance(value, list | tuple):
        raise StoreError(f"{field}: expected a list of {noun}, got {type(value).__name__}")
    if len(value) > limit:
        raise StoreError(f"{field}: {len(value)} {noun}, over the limit of {limit}")
    for i, text in enumerate(value):
        check_text(text, f"{field}[{i}]", max_chars=MAX_WORD_CHARS)
    return list(value)


def _checked_words(words: Any) -> list[str]:
    """Leak words, lower-cased, each storable text of at most MAX_WORD_CHARS, at most MAX_WORDS."""
    words = _checked_texts(words, "leak_words", "words", MAX_WORDS)
    return list(dict.fromkeys(w.strip().lower() for w in words if w.strip()))


def _checked_criteria(criteria: Any) -> list[str]:
    """Criteria to score 1-5: distinct non-empty storable texts of at most MAX_WORD_CHARS."""
    criteria = _checked_texts(criteria, "criteria", "criteria", MAX_CRITERIA)
    for i, c in enumerate(criteria):
        if not c.strip():
            raise StoreError(f"criteria[{i}]: empty; name each criterion, e.g. 'helpful'")
    out = [c.strip() for c in criteria]
    if len(set(out)) < len(out):
        raise StoreError(f"criteria: {listing(out)} names one criterion twice")
    return out


def battle_campaign(store: Store, name: str) -> dict[str, Any]:
    base = camp.get_campaign(store, name)
    rows = store.query("SELECT * FROM battle_campaigns WHERE name = ?", [name])
    if not rows:
        raise StoreError(f"campaign '{name}' is not a battle campaign")
    extra = rows[0]
    return {**base, **{k: (list(v) if isinstance(v, np.ndarray | list) else v) for k, v in extra.items()}}


@functools.lru_cache(maxsize=1024)
def identifies(name: str) -> bool:
    """Whether an answer naming `name` reveals the version. Names shorter than 3 characters never
    do (they occur everywhere), names with a digit or punctuation always do (`lora-test`,
    `dpo-3`: nobody writes them by chance), and a letters-only name does unless it is an
    ordinary English word (`base`, `policy`, `other`; see ORDINARY_WORD_ZIPF)."""
    low = name.lower()
    if len(low) < 3:
        return False
    if not low.isalpha():
        return True
    return zipf_frequency(low, "en") < ORDINARY_WORD_ZIPF


def find_leak(texts: list[str], words: list[str], names: list[str]) -> str | None:
    """The first identity-revealing word in any of the texts, or None.

    A version name counts when `identifies` says it could identify a version, as a whole
    word. A configured leak word counts also when digits follow it, as in a family name with
    its generation (`smollm` in "SmolLM2", `llama` in "Llama3")."""
    patterns = [(w.lower(), rf"(?<![a-z0-9]){re.escape(w.lower())}(?![a-z])") for w in words if w]
    patterns += [
        (n.lower(), rf"(?<![a-z0-9]){re.escape(n.lower())}(?![a-z0-9])") for n in names if identifies(n)
    ]
    for text in texts:
        low = text.lower()
        for needle, pattern in patterns:
            if re.search(pattern, low):
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
    camp.require_kind(store, campaign_name, "battle")
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
    """Record the vote, lock the battle and reveal the versions. Retries return the same reveal,
    also when they race the first attempt: the check and the insert share one write transaction,
    and the store lets one write transaction run at a time, so the second sees the first's row."""
    if winner not in WINNERS:
        raise StoreError(f"winner {shorten(winner)!r}: use one of {', '.join(WINNERS)}")
    check_text(battle_id, "battle_id", max_chars=MAX_KEY_CHARS)
    check_text(idempotency_key, "idempotency_key", max_chars=MAX_KEY_CHARS, optional=True)
    check_text(rationale, "rationale", max_chars=MAX_RATIONALE_CHARS, optional=True)
    key = idempotency_key or f"{battle_id}:{expert}"
    rows = store.query("SELECT * FROM battles WHERE id = ?", [battle_id])
    if not rows:
        raise StoreError(f"battle '{battle_id}' does not exist; ask for the next battle")
    battle = rows[0]
    campaign = battle_campaign(store, battle["campaign"])
    with store.transaction() as cur:
        existing = _fetch(cur, "SELECT * FROM votes WHERE battle_id = ?", [battle_id])
        if existing:
            if existing[0]["expert"] != expert:
                raise StoreError(f"battle '{battle_id}' was already judged by someone else")
            return _reveal(battle, existing[0])
        reused = _fetch(cur, "SELECT battle_id FROM votes WHERE idempotency_key = ?", [key])
        if reused:
            raise StoreError(
                f"idempotency_key {key!r} was already used for another battle; send a new key per vote"
            )
        state = cur.execute("SELECT expert, status FROM battles WHERE id = ?", [battle_id]).fetchone()
        if state is None or state[0] != expert or state[1] != "assigned":
            raise StoreError(f"battle '{battle_id}' is not assigned to you; ask for the next battle")
        checked = _checked_scores(scores, campaign["criteria"])
        row = {
            "id": new_id(),
            "idempotency_key": key,
            "battle_id": battle_id,
            "campaign": battle["campaign"],
            "expert": expert,
            "winner": winner,
            "scores": json.dumps(checked),
            "rationale": (rationale or "").strip() or None,
            "duration_ms": duration_ms,
        }
        cur.execute(
            f"INSERT INTO votes ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", list(row.values())
        )
        cur.execute("UPDATE battles SET status = 'voted' WHERE id = ?", [battle_id])
    if check_stop(store, battle["campaign"]) is not None:
        from studio import promotion  # it reads this module: imported when a verdict needs it

        promotion.after_verdict_quietly(store, battle["campaign"])  # a re-battle's verdict: the gate decides
    return _reveal(battle, row)


def _fetch(cur: Any, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    result = cur.execute(sql, params)
    columns = [c[0] for c in result.description]
    return [dict(zip(columns, r, strict=True)) for r in result.fetchall()]


def _checked_scores(scores: dict | None, criteria: list[str]) -> dict[str, dict[str, int]]:
    checked: dict[str, dict[str, int]] = {}
    for criterion, pair in (scores or {}).items():
        if criterion not in criteria:
            raise StoreError(f"scores: unknown criterion {criterion!r}; use {', '.join(criteria)}")
        if not isinstance(pair, dict) or not all(
            isinstance(pair.get(s), int) and 1 <= pair[s] <= 5 for s in ("a", "b")
        ):
            raise StoreError(f"scores: {criterion} needs whole numbers 1-5 for 'a' and 'b'")
        checked[criterion] = {"a": pair["a"], "b": pair["b"]}
    return checked


def _reveal(battle: dict[str, Any], vote_row: dict[str, Any]) -> dict[str, Any]:
    return {
        "battle_id": battle["id"],
        "winner": vote_row["winner"],
        "a": battle["version_a"],
        "b": battle["version_b"],
        "vote_id": vote_row["id"],
    }


# -- ratings and stopping ------------------------------------------------------------------------
def two_version_duel(store: Store, name: str) -> dict[str, Any] | None:
    """Where a two-version campaign stands under its stopping rule, or None when its votes are not
    between exactly two versions: {x, z, wins, losses, ties, p, lower, upper, alpha, decided,
    log_evidence, rule}. p = P(x wins | the vote is decisive), [lower, upper] the confidence
    sequence's interval at the campaign's alpha (studio/sequential.py); "both bad" is a tie."""
    campaign = battle_campaign(store, name)
    # counts only: this runs after every vote
    rows = store.query(
        "SELECT b.version_a, b.version_b, v.winner, count(*) AS n FROM votes v"
        " JOIN battles b ON b.id = v.battle_id WHERE v.campaign = ? AND b.leak IS NULL GROUP BY ALL",
        [name],
    )
    names = sorted({r["version_a"] for r in rows} | {r["version_b"] for r in rows})
    if len(names) != 2:
        return None
    x, z = names
    won: Counter[str | None] = Counter()
    for r in rows:
        won[r[f"version_{r['winner']}"] if r["winner"] in ("a", "b") else None] += r["n"]
    state = sequential.duel(won[x], won[z], won[None], alpha=campaign["alpha"])
    return {
        "x": x,
        "z": z,
        "wins": state.wins,
        "losses": state.losses,
        "ties": state.ties,
        "p": state.p,
        "lower": state.lower,
        "upper": state.upper,
        "alpha": state.alpha,
        "decided": state.decided,
        "log_evidence": state.log_evidence,
        "rule": "beta-binomial mixture confidence sequence on decisive votes, valid at every vote",
    }


def two_version_interval(
    store: Store, name: str, rounds: int = 200
) -> tuple[str, str, float, float, float] | None:
    """(x, z, p, lo, hi): P(x beats z) on decisive votes and the interval the stopping rule uses
    (a 1 - alpha confidence sequence, see `two_version_duel`). `rounds` is no longer used: the
    interval is exact, not bootstrapped."""
    duel = two_version_duel(store, name)
    if duel is None:
        return None
    return duel["x"], duel["z"], duel["p"], duel["lower"], duel["upper"]


def check_stop(store: Store, name: str) -> str | None:
    """Close a campaign when its budget is spent, or (two versions) as soon as its confidence
    sequence for P(win) excludes 0.5; record the verdict with its numbers. Returns the verdict
    when this call closed the campaign."""
    with _STOP_LOCK:
        campaign = battle_campaign(store, name)
        if campaign["status"] == "closed":
            return None  # decided already; a late vote on a battle handed out before does not reopen it
        votes = store.query("SELECT count(*) AS n FROM votes WHERE campaign = ?", [name])[0]["n"]
        spent = votes >= campaign["budget"]
        duel = two_version_duel(store, name) if len(set(campaign["versions"])) == 2 else None
        verdict = None
        if duel is not None and duel["decided"]:
            x_better = duel["lower"] > 0.5
            better, worse = (duel["x"], duel["z"]) if x_better else (duel["z"], duel["x"])
            won, lost = (duel["wins"], duel["losses"]) if x_better else (duel["losses"], duel["wins"])
            p, lo, hi = (
                (duel["p"], duel["lower"], duel["upper"])
                if x_better
                else (1 - duel["p"], 1 - duel["upper"], 1 - duel["lower"])
            )
            verdict = (
                f"{better} beats {worse}: won {won} of {won + lost} decisive votes ({duel['ties']} ties),"
                f" P(win) {p:.2f}, {1 - duel['alpha']:.0%} confidence sequence [{lo:.2f}, {hi:.2f}]"
                f" excludes 0.5 after {votes} votes"
            )
        elif spent:
            verdict = f"budget of {campaign['budget']} votes spent without a clear winner"
            if duel is not None:
                verdict += (
                    f" ({duel['x']} won {duel['wins']} of {duel['wins'] + duel['losses']} decisive votes,"
                    f" {duel['ties']} ties; P({duel['x']} wins) {duel['p']:.2f},"
                    f" {1 - duel['alpha']:.0%} confidence sequence"
                    f" [{duel['lower']:.2f}, {duel['upper']:.2f}])"
                )
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
    reasons = {
        r["leak"]: r["n"]
        for r in store.query(
            "SELECT leak, count(*) AS n FROM battles WHERE leak IS NOT NULL AND list_contains(?, campaign)"
            " GROUP BY leak ORDER BY n DESC, leak",
            [names],
        )
    }
    leaks = sum(reasons.values())
    out: dict[str, Any] = {
        "campaigns": names,
        "votes": len(rows),
        "leaked_battles_excluded": leaks,
        "leak_reasons": reasons,  # the word that screened each battle out, and how often
        "provisional_below": max(min_battles, PROVISIONAL_BATTLES),
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
        out["style_controlled"]["leaked_battles_excluded"] = leaks
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
