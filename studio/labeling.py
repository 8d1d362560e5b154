"""Labeling: hand out tasks, take judgments, count progress. The public functions.

A task is one prompt of a campaign with its n sampled completions. It goes to
`overlap` different annotators; an annotator never gets a task they already
had (done or skipped); an assignment not submitted within the campaign's
timeout stops holding its place, so the task goes back to the pool. Each
submitted judgment is one row that keeps the whole ranking; pairs are a view.

The rules live in labeling_state.py (pure, in memory); loading them from DuckDB
and writing every change (group commit) in labeling_store.py. One pool per store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from studio.labeling_state import FLAGS, STRENGTHS, Submission, normalize_ranks
from studio.labeling_store import LabelingPool
from studio.store import Store, new_id

__all__ = [
    "FLAGS",
    "STRENGTHS",
    "LabelingPool",
    "Submission",
    "add_task",
    "begin_submit",
    "next_task",
    "normalize_ranks",
    "pool",
    "progress",
    "ready_tasks",
    "skip",
    "submit",
    "submit_and_next",
]


def pool(store: Store) -> LabelingPool:
    """The store's labeling pool (one per store, closed with it)."""
    return store.service("labeling", LabelingPool)


def next_task(store: Store, campaign_name: str, annotator: str) -> dict[str, Any] | None:
    """The annotator's open task in the campaign, or a new one; None when none is ready for them."""
    return pool(store).next_task(campaign_name, annotator)


def submit(store: Store, annotator: str, sub: Submission, shown_at: float | None = None) -> dict[str, Any]:
    """Store one judgment. Retries with the same idempotency key return the stored judgment."""
    return pool(store).submit(annotator, sub, shown_at)[0]


def submit_and_next(
    store: Store, annotator: str, sub: Submission, shown_at: float | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Store one judgment and hand out the annotator's next task in the same commit."""
    return pool(store).submit(annotator, sub, shown_at, then_next=True)


def begin_submit(
    store: Store, annotator: str, sub: Submission, shown_at: float | None = None, then_next: bool = False
) -> tuple[Future[None], Callable[[], tuple[dict[str, Any], dict[str, Any] | None]]]:
    """`submit` in two steps, for callers that wait on the commit without a thread (see the pool).

    Safe on an event loop: it never waits there for a query or for a load."""
    return pool(store).begin_submit(annotator, sub, shown_at, then_next)


def skip(store: Store, annotator: str, assignment_id: str) -> None:
    pool(store).skip(annotator, assignment_id)


def progress(store: Store, campaign_name: str, annotator: str | None = None) -> dict[str, int]:
    """Counts for a campaign, and for one annotator when given (it runs per task shown)."""
    return pool(store).progress(campaign_name, annotator)


def ready_tasks(store: Store, campaign_name: str) -> int:
    """Sampled tasks that still have a place for another annotator."""
    return pool(store).progress(campaign_name)["ready"]


def add_task(
    store: Store,
    campaign_name: str,
    prompt_id: str,
    model_version: str,
    generation_ids: Sequence[str],
) -> str | None:
    """Store a sampled task and offer it to annotators; None if the prompt already has one here."""
    task_id = new_id()
    with store.transaction() as cur:
        added = cur.execute(
            "INSERT INTO tasks (id, campaign, prompt_id, model_version, generation_ids)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
            [task_id, campaign_name, prompt_id, model_version, list(generation_ids)],
        ).fetchall()
    if added:
        pool(store).task_added(campaign_name, task_id, list(generation_ids))
        return task_id
    return None
