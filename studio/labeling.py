"""The labeling task pool and judgments.

A task is one prompt of a campaign with its n sampled completions. It goes to
`overlap` different annotators; an annotator never gets a task they already
had (done or skipped); an assignment not submitted within the campaign's
timeout stops holding its place, so the task goes back to the pool. Each
submitted judgment is one row that keeps the whole ranking; pairs are a view.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import duckdb

from studio.campaigns import get_campaign
from studio.store import Store, StoreError, new_id

FLAGS = ("unsafe", "hallucination", "unhelpful_refusal", "identity_leak", "other")
STRENGTHS = {1: "slight", 2: "clear", 3: "strong"}

# Capacity of a task: submitted judgments plus assignments still within their timeout.
_TAKEN = """
    (SELECT count(*) FROM assignments a
      WHERE a.task_id = t.id
        AND (a.status = 'done' OR (a.status = 'open' AND a.expires_at > now())))
"""


@dataclass
class Submission:
    """What an annotator sends. `ranks` follows the order shown (1 = best; equal = tie)."""

    assignment_id: str
    ranks: list[int] | None = None
    best: int | None = None  # quick mode: position of the best completion ...
    worst: int | None = None  # ... and of the worst
    all_bad: bool = False
    strength: int | None = None
    flags: dict[int, list[str]] = field(default_factory=dict)  # position -> flags
    rationale: str | None = None
    edited_text: str | None = None
    idempotency_key: str | None = None


def _task_payload(store: Store, assignment_id: str, campaign: dict[str, Any]) -> dict[str, Any]:
    row = store.query(
        "SELECT a.id, a.display_order, a.expires_at, p.messages FROM assignments a"
        " JOIN tasks t ON t.id = a.task_id JOIN prompts p ON p.id = t.prompt_id WHERE a.id = ?",
        [assignment_id],
    )[0]
    order = list(row["display_order"])
    texts = dict(
        store.cursor()
        .execute("SELECT id, text FROM generations WHERE list_contains(?, id)", [order])
        .fetchall()
    )
    return {
        "assignment_id": assignment_id,
        "campaign": campaign["name"],
        "prompt": json.loads(row["messages"]),
        # only what the annotator needs, in the shuffled order they will see
        "completions": [{"position": i, "text": texts[g]} for i, g in enumerate(order)],
        "guidelines": campaign["guidelines"],
        "expires_at": str(row["expires_at"]),
    }


def next_task(store: Store, campaign_name: str, annotator: str) -> dict[str, Any] | None:
    """The annotator's open task in the campaign, or a new one; None when none is ready for them."""
    campaign = get_campaign(store, campaign_name)
    if campaign["status"] != "active":
        raise StoreError(f"campaign '{campaign_name}' is {campaign['status']}; no tasks are handed out")
    with store.transaction() as cur:
        open_row = cur.execute(
            "SELECT a.id FROM assignments a JOIN tasks t ON t.id = a.task_id"
            " WHERE t.campaign = ? AND a.annotator = ? AND a.status = 'open'"
            " ORDER BY a.assigned_at LIMIT 1",
            [campaign_name, annotator],
        ).fetchone()
        if open_row:
            # resuming (a reload, a second tab): same task, fresh timeout
            cur.execute(
                "UPDATE assignments SET expires_at = now() + to_seconds(?) WHERE id = ?",
                [campaign["task_timeout_s"], open_row[0]],
            )
            assignment_id = open_row[0]
        else:
            row = cur.execute(
                f"SELECT t.id, t.generation_ids FROM tasks t WHERE t.campaign = ?"
                f" AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.task_id = t.id AND a.annotator = ?)"
                f" AND {_TAKEN} < ? ORDER BY t.created_at, t.id LIMIT 1",
                [campaign_name, annotator, campaign["overlap"]],
            ).fetchone()
            if row is None:
                return None
            order = list(row[1])
            random.shuffle(order)
            assignment_id = new_id()
            cur.execute(
                "INSERT INTO assignments (id, task_id, annotator, display_order, expires_at)"
                " VALUES (?, ?, ?, ?, now() + to_seconds(?))",
                [assignment_id, row[0], annotator, order, campaign["task_timeout_s"]],
            )
    return _task_payload(store, assignment_id, campaign)


def normalize_ranks(sub: Submission, n: int) -> list[int]:
    """Turn a full ranking, quick best/worst, or all-bad into dense ranks (1 = best)."""
    if sub.all_bad:
        return [1] * n  # nothing is preferred: a tie among all, marked all_bad
    if sub.ranks is not None:
        if len(sub.ranks) != n:
            raise StoreError(f"ranks: {len(sub.ranks)} given for {n} completions; rank every one")
        if any(not isinstance(r, int) or not 1 <= r <= n for r in sub.ranks):
            raise StoreError(f"ranks: each rank must be a whole number from 1 (best) to {n}")
        if len(set(sub.ranks)) == 1:
            raise StoreError("ranks: all completions tied; mark 'all bad' or rank at least one higher")
        distinct = sorted(set(sub.ranks))
        return [distinct.index(r) + 1 for r in sub.ranks]
    if sub.best is None or sub.worst is None:
        raise StoreError("no ranking: give ranks, or best and worst, or mark all bad")
    if not (0 <= sub.best < n and 0 <= sub.worst < n) or sub.best == sub.worst:
        raise StoreError(f"best/worst: two different positions from 0 to {n - 1}")
    ranks = [2] * n  # everything between best and worst ties in the middle
    ranks[sub.best] = 1
    ranks[sub.worst] = 3 if n > 2 else 2
    return ranks


def submit(store: Store, annotator: str, sub: Submission, shown_at: float | None = None) -> dict[str, Any]:
    """Store one judgment. Retries with the same idempotency key return the stored judgment."""
    key = sub.idempotency_key or sub.assignment_id
    existing = store.query("SELECT * FROM judgments WHERE idempotency_key = ?", [key])
    if existing:
        if existing[0]["annotator"] != annotator:
            raise StoreError("idempotency key belongs to another annotator's judgment")
        return _decode_judgment(existing[0])
    rows = store.query(
        "SELECT a.*, t.campaign FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE a.id = ?",
        [sub.assignment_id],
    )
    if not rows or rows[0]["annotator"] != annotator:
        raise StoreError(f"assignment '{sub.assignment_id}' is not one of yours; ask for the next task")
    assignment = rows[0]
    if assignment["status"] == "done":
        # a different key for an assignment already judged: hand back that judgment
        done = store.query("SELECT * FROM judgments WHERE assignment_id = ?", [assignment["id"]])
        return _decode_judgment(done[0])
    order = list(assignment["display_order"])
    n = len(order)
    ranks = normalize_ranks(sub, n)
    if sub.strength is not None and sub.strength not in STRENGTHS:
        raise StoreError("strength: 1 (slight), 2 (clear) or 3 (strong)")
    flags: dict[str, list[str]] = {}
    for pos, names in sub.flags.items():
        if not 0 <= int(pos) < n:
            raise StoreError(f"flags: position {pos} is not shown (0 to {n - 1})")
        bad = [f for f in names if f not in FLAGS]
        if bad:
            raise StoreError(f"flags: unknown {', '.join(bad)}; use {', '.join(FLAGS)}")
        if names:
            flags[order[int(pos)]] = sorted(set(names))
    edited = (sub.edited_text or "").strip() or None
    # with "all bad" the ideal is written from scratch, so it is edited from no answer
    edited_from = order[ranks.index(1)] if edited and not sub.all_bad else None
    judgment_id = new_id()
    now = time.time()
    try:
        with store.transaction() as cur:
            cur.execute(
                "INSERT INTO judgments (id, idempotency_key, assignment_id, campaign, task_id, annotator,"
                " generation_ids, ranks, all_bad, strength, flags, rationale, edited_text, edited_from,"
                " shown_at, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                " to_timestamp(?), ?)",
                [
                    judgment_id,
                    key,
                    assignment["id"],
                    assignment["campaign"],
                    assignment["task_id"],
                    annotator,
                    order,
                    ranks,
                    sub.all_bad,
                    sub.strength,
                    json.dumps(flags),
                    (sub.rationale or "").strip() or None,
                    edited,
                    edited_from,
                    shown_at,
                    None if shown_at is None else (now - shown_at) * 1000.0,
                ],
            )
            cur.execute("UPDATE assignments SET status = 'done' WHERE id = ?", [assignment["id"]])
    except duckdb.ConstraintException:
        # a concurrent retry with the same key won the race: return its judgment
        row = store.query("SELECT * FROM judgments WHERE idempotency_key = ?", [key])
        if not row:
            raise
        return _decode_judgment(row[0])
    return _decode_judgment(store.query("SELECT * FROM judgments WHERE id = ?", [judgment_id])[0])


def skip(store: Store, annotator: str, assignment_id: str) -> None:
    with store.transaction() as cur:
        row = cur.execute(
            "SELECT annotator, status FROM assignments WHERE id = ?", [assignment_id]
        ).fetchone()
        if row is None or row[0] != annotator:
            raise StoreError(f"assignment '{assignment_id}' is not one of yours")
        if row[1] == "open":
            cur.execute("UPDATE assignments SET status = 'skipped' WHERE id = ?", [assignment_id])


def progress(store: Store, campaign_name: str, annotator: str | None = None) -> dict[str, int]:
    """Counts for a campaign, and for one annotator when given, in one query (it runs per task shown)."""
    campaign = get_campaign(store, campaign_name)
    row = store.query(
        f"""
        WITH t AS (
            SELECT t.id, {_TAKEN} AS taken,
                   EXISTS (SELECT 1 FROM assignments a WHERE a.task_id = t.id AND a.annotator = $who) AS mine
            FROM tasks t WHERE t.campaign = $c
        ), m AS (
            SELECT a.status FROM assignments a JOIN tasks tt ON tt.id = a.task_id
            WHERE tt.campaign = $c AND a.annotator = $who
        )
        SELECT (SELECT count(*) FROM prompts WHERE set_name = $set) AS prompts,
               (SELECT count(*) FROM t) AS tasks_sampled,
               (SELECT count(*) FROM judgments WHERE campaign = $c) AS judgments,
               (SELECT count(*) FROM t WHERE taken < $k) AS ready,
               (SELECT count(*) FROM t WHERE taken >= $k AND NOT mine) AS full_untouched,
               (SELECT count(*) FROM m WHERE status = 'done') AS done,
               (SELECT count(*) FROM m) AS touched
        """,
        {"who": annotator or "", "c": campaign_name, "set": campaign["prompt_set"], "k": campaign["overlap"]},
    )[0]
    out = {
        "prompts": row["prompts"],
        "tasks_sampled": row["tasks_sampled"],
        "judgments": row["judgments"],
        "judgments_needed": row["prompts"] * campaign["overlap"],
        "ready": row["ready"],
    }
    if annotator is not None:
        out["done"] = row["done"]
        out["remaining"] = max(row["prompts"] - row["touched"] - row["full_untouched"], 0)
    return out


def ready_tasks(store: Store, campaign_name: str) -> int:
    """Sampled tasks that still have a place for another annotator."""
    campaign = get_campaign(store, campaign_name)
    return store.query(
        f"SELECT count(*) AS n FROM tasks t WHERE t.campaign = ? AND {_TAKEN} < ?",
        [campaign_name, campaign["overlap"]],
    )[0]["n"]


def _decode_judgment(row: dict[str, Any]) -> dict[str, Any]:
    row["flags"] = json.loads(row["flags"]) if isinstance(row["flags"], str) else row["flags"]
    row["generation_ids"] = list(row["generation_ids"])
    row["ranks"] = list(row["ranks"])
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
