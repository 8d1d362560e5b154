"""Campaigns (what to label, from which model, how often) and model aliases."""

from __future__ import annotations

import json
import threading
from typing import Any

from studio.names import check_name, check_new_name
from studio.serving.client import SamplingParams
from studio.store import Store, StoreError
from studio.textcheck import MAX_GUIDELINES_CHARS, check_text, listing, shorten

POLICY = "policy"
# An assignment not submitted by then goes back to the pool. A week covers a task left open
# over a weekend; the column is a 32-bit INTEGER, so an unbounded value would not even store.
MIN_TASK_TIMEOUT_S = 30
MAX_TASK_TIMEOUT_S = 7 * 24 * 3600
# Guards the campaign memo's compare-and-set (see get_campaign); held for a dict lookup or two.
_MEMO_LOCK = threading.Lock()
# Battles sample a little cooler than labeling (SamplingParams' 0.8): two answers compared side
# by side should differ by the model more than by the luck of the draw.
BATTLE_TEMPERATURE = 0.7


def set_alias(store: Store, alias: str, version: str) -> None:
    """Point `alias` at `version`. A new alias follows studio.names' rule and may not be a version's name."""

    def alias_exists(name: str) -> bool:
        return bool(store.query("SELECT 1 FROM aliases WHERE name = ?", [name]))

    check_new_name("alias", alias, alias_exists)  # aliases named before the rule stay usable
    if store.model_version(version)["kind"] == "reward":  # must exist, and must answer prompts
        raise StoreError(f"version '{version}' is a reward model; only policy versions can be promoted")
    with store.transaction() as cur:
        new = not cur.execute("SELECT 1 FROM aliases WHERE name = ?", [alias]).fetchone()
        if new and cur.execute("SELECT 1 FROM model_versions WHERE name = ?", [alias]).fetchone():
            raise StoreError(
                f"alias '{alias}' is a version's name (a name must say whether it is a version "
                "or an alias); pick another alias name"
            )
        cur.execute(
            "INSERT INTO aliases (name, version) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
            " SET version = excluded.version, updated_at = now()",
            [alias, version],
        )


def ensure_policy_alias(store: Store, base_version: str) -> None:
    """`policy` points at the base until a trained version is promoted."""
    if not store.query("SELECT 1 FROM aliases WHERE name = ?", [POLICY]):
        set_alias(store, POLICY, base_version)


def resolve_model(store: Store, name: str) -> str:
    """An alias resolves to its version; a version name resolves to itself."""
    rows = store.query("SELECT version FROM aliases WHERE name = ?", [name])
    if rows:
        return rows[0]["version"]
    return store.model_version(name)["name"]


def resolve_policy(store: Store, name: str) -> str:
    """Like `resolve_model`, for what generates text: a reward model scores, it cannot answer."""
    version = resolve_model(store, name)
    if store.model_version(version)["kind"] == "reward":
        raise StoreError(f"model '{name}' is a reward model; pick a policy version or alias to sample from")
    return version


def aliases(store: Store) -> dict[str, str]:
    return {r["name"]: r["version"] for r in store.query("SELECT name, version FROM aliases")}


def create_campaign(
    store: Store,
    name: str,
    *,
    prompt_set: str,
    model: str = POLICY,
    n: int = 4,
    overlap: int = 1,
    temperature: float = SamplingParams.temperature,
    top_p: float = SamplingParams.top_p,
    max_tokens: int = SamplingParams.max_tokens,
    seed: int | None = None,
    task_timeout_s: int = 1800,
    guidelines: str = "",
    created_by: str | None = None,
    status: str = "active",
    kind: str = "label",
    max_model_len: int | None = None,
) -> dict[str, Any]:
    """Store a new campaign. Every setting is checked first; a refused campaign stores nothing.

    `max_model_len`: the served model's context in tokens (OpenAIChatBackend.max_model_len),
    when known: max_tokens must leave room in it for the prompt.
    """
    row = checked_campaign(
        store,
        name,
        prompt_set=prompt_set,
        model=model,
        n=n,
        overlap=overlap,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        task_timeout_s=task_timeout_s,
        guidelines=guidelines,
        created_by=created_by,
        status=status,
        kind=kind,
        max_model_len=max_model_len,
    )
    with store.transaction() as cur:
        insert_campaign(cur, row)
    return get_campaign(store, name)


def checked_campaign(
    store: Store,
    name: str,
    *,
    prompt_set: str,
    model: str,
    n: int,
    overlap: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int | None,
    task_timeout_s: int,
    guidelines: str,
    created_by: str | None,
    status: str,
    kind: str,
    max_model_len: int | None,
) -> dict[str, Any]:
    """The `campaigns` row of a new campaign, every setting checked (nothing is written)."""
    check_name("campaign", name)
    if not 2 <= n <= 8:
        raise StoreError(f"n={n}: a labeling task shows 2 to 8 completions to rank")
    if not 1 <= overlap <= 50:
        raise StoreError(f"overlap={overlap}: each task goes to 1 to 50 different annotators")
    if status not in ("active", "paused", "closed"):
        raise StoreError(f"status {status!r}: use active, paused or closed")
    if not MIN_TASK_TIMEOUT_S <= task_timeout_s <= MAX_TASK_TIMEOUT_S:
        raise StoreError(
            f"task_timeout_s={shorten(task_timeout_s)}: give annotators between {MIN_TASK_TIMEOUT_S} s "
            f"and {MAX_TASK_TIMEOUT_S} s (7 days) per task"
        )
    check_text(guidelines, "guidelines", max_chars=MAX_GUIDELINES_CHARS)
    try:
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    if max_model_len is not None and params.max_tokens >= max_model_len:
        raise StoreError(
            f"max_tokens={params.max_tokens}: the served model's context is {max_model_len} tokens, "
            f"prompt and answer together; use a max_tokens below {max_model_len} that leaves room "
            "for the prompts"
        )
    resolve_policy(store, model)  # an unknown model or a reward model fails now, not in the sampler
    sets = {s["name"]: s["prompts"] for s in store.prompt_sets()}
    if prompt_set not in sets:
        known = listing(list(sets)) or "none yet; import one with `studio import FILE --set NAME`"
        raise StoreError(f"prompt set '{shorten(prompt_set)}' does not exist (known: {known})")
    if not sets[prompt_set]:
        raise StoreError(f"prompt set '{prompt_set}' is empty")
    sampling = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
    }
    return {
        "name": name,
        "kind": kind,
        "prompt_set": prompt_set,
        "model": model,
        "n": n,
        "sampling": json.dumps(sampling),
        "overlap": overlap,
        "task_timeout_s": task_timeout_s,
        "guidelines": guidelines,
        "created_by": created_by,
        "status": status,
    }


def insert_campaign(cur: Any, row: dict[str, Any]) -> None:
    """Insert a `checked_campaign` row in the caller's write transaction (refused if the name is taken)."""
    if cur.execute("SELECT 1 FROM campaigns WHERE name = ?", [row["name"]]).fetchone():
        raise StoreError(f"campaign '{row['name']}' already exists; pick another name")
    cur.execute(
        f"INSERT INTO campaigns ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", list(row.values())
    )


def get_campaign(store: Store, name: str) -> dict[str, Any]:
    # Read on every task handed out; campaigns change only through this module in the studio
    # process (the only writer), which calls _changed after each change commits. A reader that
    # read the row before that commit must not put it back after the memo was dropped, so the
    # row is cached only if no change committed since the reader looked (a generation count).
    cached = store.memo.get(("campaign", name))
    if cached is not None:
        return dict(cached)
    seen = store.memo.get(("campaign-generation", name), 0)
    rows = store.query("SELECT * FROM campaigns WHERE name = ?", [name])
    if not rows:
        known = listing([c["name"] for c in list_campaigns(store)]) or "none"
        raise StoreError(f"campaign '{shorten(name)}' does not exist (known: {known})")
    row = rows[0]
    row["sampling"] = json.loads(row["sampling"])
    with _MEMO_LOCK:
        if store.memo.get(("campaign-generation", name), 0) == seen:
            store.memo[("campaign", name)] = row
    return dict(row)


def _changed(store: Store, name: str) -> None:
    """Drop the memoised row. Call only after the change has committed: dropped before, a
    concurrent read could cache the old row again, and a closed campaign would keep serving."""
    with _MEMO_LOCK:
        key = ("campaign-generation", name)
        store.memo[key] = store.memo.get(key, 0) + 1
        store.memo.pop(("campaign", name), None)


def cached_campaign(store: Store, name: str) -> dict[str, Any] | None:
    """The campaign if `get_campaign` would answer it from memory, else None (never a query)."""
    cached = store.memo.get(("campaign", name))
    return None if cached is None else dict(cached)


def list_campaigns(store: Store, kind: str | None = None) -> list[dict[str, Any]]:
    rows = store.query(
        "SELECT * FROM campaigns WHERE ? IS NULL OR kind = ? ORDER BY created_at", [kind, kind]
    )
    for row in rows:
        row["sampling"] = json.loads(row["sampling"])
    return rows


def sampling_params(campaign: dict[str, Any]) -> SamplingParams:
    s = campaign["sampling"]
    return SamplingParams(
        n=campaign["n"],
        temperature=s["temperature"],
        top_p=s["top_p"],
        max_tokens=s["max_tokens"],
        seed=s.get("seed"),
    )


def set_guidelines(store: Store, name: str, text: str) -> None:
    check_text(text, "guidelines", max_chars=MAX_GUIDELINES_CHARS)
    get_campaign(store, name)
    with store.transaction() as cur:
        cur.execute("UPDATE campaigns SET guidelines = ? WHERE name = ?", [text, name])
    _changed(store, name)


def set_status(store: Store, name: str, status: str) -> None:
    if status not in ("active", "paused", "closed"):
        raise StoreError(f"status {status!r}: use active, paused or closed")
    get_campaign(store, name)
    with store.transaction() as cur:
        cur.execute("UPDATE campaigns SET status = ? WHERE name = ?", [status, name])
    _changed(store, name)


KIND_WORDS = {"label": "labeling", "battle": "battle"}
KIND_WAYS = {
    "label": "annotators take its tasks (the Label tab, POST /campaigns/NAME/next)",
    "battle": "experts judge its battles (the Side by side tab, POST /arena/NAME/next)",
}


def require_kind(store: Store, name: str, kind: str) -> dict[str, Any]:
    """The campaign, if it is of `kind` ('label' or 'battle'); else a StoreError naming both.

    A labeling task must never be asked of a battle campaign (or the reverse): its tasks are
    sampled differently, and a request for one must not make the task sampler work for the other."""
    campaign = get_campaign(store, name)
    if campaign["kind"] != kind:
        have = campaign["kind"]
        raise StoreError(
            f"campaign '{shorten(name)}' is a {KIND_WORDS.get(have, have)} campaign (kind '{have}'), "
            f"not a {KIND_WORDS[kind]} campaign: {KIND_WAYS.get(have, 'see its kind')}"
        )
    return campaign
