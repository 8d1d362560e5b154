"""Campaigns (what to label, from which model, how often) and model aliases."""

from __future__ import annotations

import json
import re
from typing import Any

from studio.serving.client import SamplingParams
from studio.store import Store, StoreError

POLICY = "policy"
CAMPAIGN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def set_alias(store: Store, alias: str, version: str) -> None:
    if store.model_version(version)["kind"] == "reward":  # must exist, and must answer prompts
        raise StoreError(f"version '{version}' is a reward model; only policy versions can be promoted")
    with store.transaction() as cur:
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
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_tokens: int = 128,
    seed: int | None = None,
    task_timeout_s: int = 1800,
    guidelines: str = "",
    created_by: str | None = None,
    status: str = "active",
    kind: str = "label",
) -> dict[str, Any]:
    if not CAMPAIGN_RE.match(name):
        raise StoreError(
            f"campaign name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not 2 <= n <= 8:
        raise StoreError(f"n={n}: a labeling task shows 2 to 8 completions to rank")
    if not 1 <= overlap <= 50:
        raise StoreError(f"overlap={overlap}: each task goes to 1 to 50 different annotators")
    if status not in ("active", "paused", "closed"):
        raise StoreError(f"status {status!r}: use active, paused or closed")
    if task_timeout_s < 30:
        raise StoreError(f"task_timeout_s={task_timeout_s}: give annotators at least 30 s")
    try:
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    resolve_policy(store, model)  # an unknown model or a reward model fails now, not in the sampler
    sets = {s["name"]: s["prompts"] for s in store.prompt_sets()}
    if prompt_set not in sets:
        known = ", ".join(sets) or "none yet; import one with `studio import FILE --set NAME`"
        raise StoreError(f"prompt set '{prompt_set}' does not exist (known: {known})")
    if not sets[prompt_set]:
        raise StoreError(f"prompt set '{prompt_set}' is empty")
    sampling = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
    }
    with store.transaction() as cur:
        if cur.execute("SELECT 1 FROM campaigns WHERE name = ?", [name]).fetchone():
            raise StoreError(f"campaign '{name}' already exists; pick another name")
        cur.execute(
            "INSERT INTO campaigns (name, kind, prompt_set, model, n, sampling, overlap,"
            " task_timeout_s, guidelines, created_by, status)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                name,
                kind,
                prompt_set,
                model,
                n,
                json.dumps(sampling),
                overlap,
                task_timeout_s,
                guidelines,
                created_by,
                status,
            ],
        )
    return get_campaign(store, name)


def get_campaign(store: Store, name: str) -> dict[str, Any]:
    # Read on every task handed out; campaigns change only through this module
    # in the studio process (the only writer), which drops the memo on change.
    cached = store.memo.get(("campaign", name))
    if cached is not None:
        return dict(cached)
    rows = store.query("SELECT * FROM campaigns WHERE name = ?", [name])
    if not rows:
        known = ", ".join(c["name"] for c in list_campaigns(store)) or "none"
        raise StoreError(f"campaign '{name}' does not exist (known: {known})")
    row = rows[0]
    row["sampling"] = json.loads(row["sampling"])
    store.memo[("campaign", name)] = row
    return dict(row)


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
    get_campaign(store, name)
    store.memo.pop(("campaign", name), None)
    with store.transaction() as cur:
        cur.execute("UPDATE campaigns SET guidelines = ? WHERE name = ?", [text, name])


def set_status(store: Store, name: str, status: str) -> None:
    if status not in ("active", "paused", "closed"):
        raise StoreError(f"status {status!r}: use active, paused or closed")
    get_campaign(store, name)
    store.memo.pop(("campaign", name), None)
    with store.transaction() as cur:
        cur.execute("UPDATE campaigns SET status = ? WHERE name = ?", [status, name])
