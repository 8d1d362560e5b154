"""The labeling task pool and judgments.

A task is one prompt of a campaign with its n sampled completions. It goes to
`overlap` different annotators; an annotator never gets a task they already
had (done or skipped); an assignment not submitted within the campaign's
timeout stops holding its place, so the task goes back to the pool. Each
submitted judgment is one row that keeps the whole ranking; pairs are a view.

The pool lives in the studio process, which is the database's only writer (see
store.py), so it can keep who-has-what in memory and answer "next task" without
a query. DuckDB stays the truth: the pool loads a campaign from it on first use
(so a restart resumes where it was), and writes go through a group commit
(`BatchWriter`). A judgment is answered only once its row is committed, so an
acknowledged judgment is on disk; assignment rows may follow it under load (see
`LabelingPool._flush`). Changes made in memory before a failed commit are taken
back.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb

from studio.batch_writer import BatchWriter
from studio.campaigns import get_campaign
from studio.store import Store, StoreError, new_id

log = logging.getLogger(__name__)

FLAGS = ("unsafe", "hallucination", "unhelpful_refusal", "identity_leak", "other")
STRENGTHS = {1: "slight", 2: "clear", 3: "strong"}


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


# the public functions ---------------------------------------------------------------
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
    """`submit` in two steps, for callers that wait on the commit without a thread (see the pool)."""
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


def _check_flags(sub: Submission, order: list[str]) -> dict[str, list[str]]:
    n = len(order)
    flags: dict[str, list[str]] = {}
    for pos, names in sub.flags.items():
        if not 0 <= int(pos) < n:
            raise StoreError(f"flags: position {pos} is not shown (0 to {n - 1})")
        bad = [f for f in names if f not in FLAGS]
        if bad:
            raise StoreError(f"flags: unknown {', '.join(bad)}; use {', '.join(FLAGS)}")
        if names:
            flags[order[int(pos)]] = sorted(set(names))
    return flags


# the pool's state ---------------------------------------------------------------------
class _Task:
    __slots__ = ("campaign", "content", "done", "generation_ids", "holders", "id", "open", "ready")

    def __init__(self, task_id: str, campaign: _Campaign, generation_ids: list[str]):
        self.id = task_id
        self.campaign = campaign
        self.generation_ids = generation_ids
        self.holders: dict[str, _Assignment] = {}  # annotator -> their assignment, any status
        self.open: set[_Assignment] = set()
        self.done = 0
        self.ready = False  # had a free place when last counted (see _Campaign.account)
        self.content: tuple[Any, dict[str, str]] | None = None  # prompt messages, texts by id

    def taken(self, now: float) -> int:
        """Places used: judgments plus assignments still within their timeout."""
        return self.done + sum(1 for a in self.open if a.expires > now)


class _Assignment:
    __slots__ = ("annotator", "expires", "id", "judgment", "order", "status", "task")

    def __init__(self, assignment_id: str, task: _Task, annotator: str, order: list[str], expires: float):
        self.id = assignment_id
        self.task = task
        self.annotator = annotator
        self.order = order
        self.expires = expires
        self.status = "open"
        self.judgment: _Key | None = None  # its judgment once done


@dataclass
class _Person:
    open: _Assignment | None = None  # at most one per campaign: next_task resumes it
    done: int = 0
    held_ready: int = 0  # tasks they hold that still have a free place (for "remaining")
    cursor: int = 0  # every task before it is theirs already or has all its judgments


class _Campaign:
    """One campaign's tasks and people, with counts kept up to date on every change.

    Counting free places is what every response needs ("remaining", "ready"), so it is
    kept incrementally: each change to a task takes the task's share out of the counts
    and puts it back after. Time alone frees places (an assignment's timeout), so the
    counts are redone from scratch when the soonest timeout passes.
    """

    def __init__(self, name: str, overlap: int):
        self.name = name
        self.overlap = overlap
        self.tasks: list[_Task] = []
        self.by_id: dict[str, _Task] = {}
        self.index: dict[str, int] = {}
        self.full = 0  # tasks[:full] have all their judgments: no scan looks at them again
        self.people: dict[str, _Person] = {}
        self.judgments = 0
        self.ready = 0
        self.recount_at = float("inf")

    def person(self, name: str) -> _Person:
        p = self.people.get(name)
        if p is None:
            p = self.people[name] = _Person()
        return p

    def add(self, task: _Task, now: float) -> None:
        if task.id not in self.by_id:
            self.by_id[task.id] = task
            self.index[task.id] = len(self.tasks)
            self.tasks.append(task)
            self.account(task, now)

    def unaccount(self, task: _Task) -> None:
        if task.ready:
            task.ready = False
            self.ready -= 1
            for name in task.holders:
                self.people[name].held_ready -= 1

    def account(self, task: _Task, now: float) -> None:
        if task.done >= self.overlap:
            while self.full < len(self.tasks) and self.tasks[self.full].done >= self.overlap:
                self.full += 1
        else:
            self.full = min(self.full, self.index[task.id])  # only after a failed commit
        for a in task.open:
            if a.expires > now:
                self.recount_at = min(self.recount_at, a.expires)
        if task.taken(now) < self.overlap:
            task.ready = True
            self.ready += 1
            for name in task.holders:
                self.person(name).held_ready += 1

    def fresh(self, now: float) -> None:
        """Redo the counts if an assignment timed out since they were made."""
        if now < self.recount_at:
            return
        self.recount_at = float("inf")
        self.ready = 0
        for p in self.people.values():
            p.held_ready = 0
        for task in self.tasks[self.full :]:
            task.ready = False
            self.account(task, now)


@dataclass
class _Key:
    """An idempotency key seen in this process: its judgment, and the commit it waits for."""

    judgment_id: str
    annotator: str
    committed: Future[None] | None = None
    row: dict[str, Any] | None = None  # until committed; then it is read back if asked again


@dataclass
class _Write:
    """What one caller changes: rows for the group commit."""

    new_assignments: list[_Assignment] = field(default_factory=list)
    assignment_states: list[tuple[str, str, float]] = field(default_factory=list)  # id, status, expires
    judgments: list[dict[str, Any]] = field(default_factory=list)
    background: bool = False  # nobody waits for it: its rows may wait in the backlog


_JUDGMENT_COLS = (
    "id",
    "idempotency_key",
    "assignment_id",
    "campaign",
    "task_id",
    "annotator",
    "generation_ids",
    "ranks",
    "all_bad",
    "strength",
    "flags",
    "rationale",
    "edited_text",
    "edited_from",
    "shown_at",
    "submitted_at",
    "duration_ms",
)


def _unnest(params: int, lists: Sequence[int] = (), times: Sequence[int] = ()) -> str:
    """SELECT list turning column lists (one parameter each) back into rows.

    One parameter per column instead of one per value: DuckDB binds a few lists much
    faster than hundreds of scalars, and the statement is the same for any batch size.
    """
    cols = []
    for i in range(1, params + 1):
        col = f"unnest(${i}, max_depth := 1)" if i in lists else f"unnest(${i})"
        cols.append(f"to_timestamp({col})" if i in times else col)
    return "SELECT " + ", ".join(cols)


_INSERT_ASSIGNMENTS = (
    "INSERT INTO assignments (id, task_id, annotator, display_order, status, expires_at) "
    + _unnest(6, lists=(4,), times=(6,))
)
_INSERT_JUDGMENTS = f"INSERT INTO judgments ({', '.join(_JUDGMENT_COLS)}) " + _unnest(
    len(_JUDGMENT_COLS), lists=(7, 8), times=(15, 16)
)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz=UTC).isoformat()


def _done_future() -> Future[None]:
    f: Future[None] = Future()
    f.set_result(None)
    return f


class LabelingPool:
    """Who has which task, in memory; every change committed before it is answered."""

    def __init__(self, store: Store):
        self.store = store
        self.clock: Callable[[], float] = time.time  # tests move it to expire assignments
        self._lock = threading.Lock()
        self._campaigns: dict[str, _Campaign] = {}
        self._assignments: dict[str, _Assignment] = {}
        self._keys: dict[str, _Key] = {}
        # Assignment rows not written yet, by id (see _flush); touched only by the writer's thread.
        self._backlog_new: dict[str, list[Any]] = {}
        self._backlog_states: dict[str, tuple[str, float]] = {}
        self._backlog_since = 0.0
        self._writer = BatchWriter(
            store,
            self._flush,
            name="labeling-writer",
            idle=self._flush_backlog,
            loop_flush=self._flush_on_loop,
        )

    def close(self) -> None:
        self._writer.close()

    # writing ---------------------------------------------------------------------
    def _flush(self, writes: list[_Write]) -> None:
        """Write what the callers waiting on the writer thread changed.

        Judgments go in one INSERT, which DuckDB commits as its own transaction; callers
        are answered only after it (on the event loop, `_flush_on_loop` does this part).
        Assignment rows (handed out, judged, skipped, timeout renewed) collect in a backlog
        written in one transaction: before the answer when 1-3 callers wait on this batch
        (a worker thread's call: the UI, the CLI), otherwise once 256 have collected, the
        oldest is a second old, or the writer has had nothing to do for 0.2 s. A judgment
        row names its task, annotator and order, so loading a campaign rebuilds the
        assignment row of any judgment whose row was not written yet. What a crash can
        lose is an assignment handed out in its last second: its holder is told to ask
        for the next task.
        """
        waiting = sum(1 for w in writes if not w.background)
        self._write_judgments(writes)
        if not self._backlog:
            self._backlog_since = time.monotonic()
        for w in writes:  # only now: a unit whose judgment failed leaves no assignment rows
            for a in w.new_assignments:
                self._backlog_new[a.id] = [a.id, a.task.id, a.annotator, a.order, "open", a.expires]
            for aid, status, expires in w.assignment_states:
                self._backlog_states[aid] = (status, expires)
        due = self._backlog >= 256 or time.monotonic() - self._backlog_since >= 1.0
        if self._backlog and (due or 0 < waiting < 4):
            self._flush_backlog()

    def _write_judgments(self, writes: list[_Write]) -> None:
        judgments = [j for w in writes for j in w.judgments]
        if judgments:
            # Only this pool writes judgments, and only by appending, so the INSERT cannot
            # conflict with another transaction: it takes no write lock, and the event loop
            # never waits behind an import or a snapshot.
            params = [[j[c] for j in judgments] for c in _JUDGMENT_COLS]
            self.store.write(_INSERT_JUDGMENTS, params, exclusive=False)

    def _flush_on_loop(self, writes: list[_Write]) -> None:
        """The event loop's share (see BatchWriter): the judgments; their assignment rows go
        to the writer thread's backlog, which nobody waits for."""
        self._write_judgments(writes)
        rows = _Write(background=True)
        for w in writes:
            rows.new_assignments += w.new_assignments
            rows.assignment_states += w.assignment_states
        if rows.new_assignments or rows.assignment_states:
            self._writer.submit(rows, in_background=True)

    @property
    def _backlog(self) -> int:
        return len(self._backlog_new) + len(self._backlog_states)

    def _flush_backlog(self) -> None:
        """Write the assignment backlog in one transaction; on failure keep it for the next turn."""
        if not self._backlog:
            return
        new, states = self._backlog_new, self._backlog_states
        self._backlog_new, self._backlog_states = {}, {}
        for aid in [aid for aid in states if aid in new]:  # made and changed since: insert its last state
            new[aid][4:6] = states.pop(aid)
        try:
            with self.store.transaction() as cur:
                if new:
                    cur.execute(_INSERT_ASSIGNMENTS, [list(c) for c in zip(*new.values(), strict=True)])
                if states:
                    rows = [(aid, status, expires) for aid, (status, expires) in states.items()]
                    cur.execute(
                        "UPDATE assignments SET status = s.status, expires_at = to_timestamp(s.expires)"
                        " FROM (SELECT unnest($1) AS id, unnest($2) AS status, unnest($3) AS expires) s"
                        " WHERE assignments.id = s.id",
                        [list(c) for c in zip(*rows, strict=True)],
                    )
        except Exception:
            log.exception("labeling: could not write %d assignment row(s); retrying", len(new) + len(states))
            self._backlog_new = {**new, **self._backlog_new}
            self._backlog_states = {**states, **self._backlog_states}

    # loading --------------------------------------------------------------------
    def _state(self, name: str) -> _Campaign:
        """The campaign's state, loaded from the database on first use (caller holds the lock)."""
        state = self._campaigns.get(name)
        if state is not None:
            return state
        state = _Campaign(name, get_campaign(self.store, name)["overlap"])
        cur = self.store.cursor()
        tasks = cur.execute(
            "SELECT id, generation_ids FROM tasks WHERE campaign = ? ORDER BY created_at, id", [name]
        ).fetchall()
        for tid, gids in tasks:
            task = _Task(tid, state, list(gids))
            state.by_id[tid] = task
            state.index[tid] = len(state.tasks)
            state.tasks.append(task)
        judged = {}  # assignment id -> its judgment row's key and what it says of the assignment
        for key, jid, aid, who, tid, order, expires in cur.execute(
            "SELECT idempotency_key, id, assignment_id, annotator, task_id, generation_ids,"
            " epoch_us(submitted_at) / 1e6 FROM judgments WHERE campaign = ?",
            [name],
        ).fetchall():
            judged[aid] = (self._keys.setdefault(key, _Key(jid, who)), tid, who, list(order), expires)
            state.judgments += 1
        rows = cur.execute(
            "SELECT a.id, a.task_id, a.annotator, a.display_order, epoch_us(a.expires_at) / 1e6, a.status"
            " FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE t.campaign = ?"
            " ORDER BY a.assigned_at",
            [name],
        ).fetchall()
        known = {r[0] for r in rows}
        # a judgment whose assignment row was not written before a crash (see _flush)
        lost = [(aid, *j[1:], "done") for aid, j in judged.items() if aid not in known]
        rewrite = _Write(background=True)
        for aid, tid, who, order, expires, status in rows + lost:
            task = state.by_id[tid]
            a = _Assignment(aid, task, who, list(order), expires)
            a.judgment = judged[aid][0] if aid in judged else None
            a.status = "done" if a.judgment is not None else status
            task.holders[who] = a
            self._assignments[aid] = a
            if a.status == "done":
                task.done += 1
                state.person(who).done += 1
            elif a.status == "open":
                task.open.add(a)
                state.person(who).open = a
            if aid not in known:
                rewrite.new_assignments.append(a)
                rewrite.assignment_states.append((aid, "done", expires))
        if rewrite.new_assignments:
            self._writer.submit(rewrite, in_background=True)
        state.recount_at = float("-inf")
        state.fresh(self.clock())
        self._load_content(state.tasks[state.full :])
        self._campaigns[name] = state
        return state

    def _assignment(self, assignment_id: str) -> _Assignment | None:
        """Caller holds the lock."""
        a = self._assignments.get(assignment_id)
        if a is None:
            # its campaign may not be loaded yet (a restart, or the first call after one)
            row = (
                self.store.cursor()
                .execute(
                    "SELECT t.campaign FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE a.id = ?",
                    [assignment_id],
                )
                .fetchone()
            )
            if row is not None and row[0] not in self._campaigns:
                self._state(row[0])
                a = self._assignments.get(assignment_id)
        return a

    def _load_content(self, tasks: list[_Task]) -> None:
        """Prompt and completion texts of tasks that may be shown, in two queries."""
        if not tasks:
            return
        cur = self.store.cursor()
        messages = dict(
            cur.execute(
                "SELECT t.id, p.messages FROM tasks t JOIN prompts p ON p.id = t.prompt_id"
                " WHERE list_contains(?, t.id)",
                [[t.id for t in tasks]],
            ).fetchall()
        )
        texts = dict(
            cur.execute(
                "SELECT id, text FROM generations WHERE list_contains(?, id)",
                [[g for t in tasks for g in t.generation_ids]],
            ).fetchall()
        )
        for t in tasks:
            t.content = (json.loads(messages[t.id]), {g: texts[g] for g in t.generation_ids})

    def _content(self, task: _Task) -> tuple[Any, dict[str, str]]:
        if task.content is None:
            self._load_content([task])
        return task.content

    def task_added(self, name: str, task_id: str, generation_ids: list[str]) -> None:
        with self._lock:
            state = self._campaigns.get(name)
            if state is not None and task_id not in state.by_id:  # else its first use reads it
                task = _Task(task_id, state, generation_ids)
                self._load_content([task])  # here, off the annotators' path
                state.add(task, self.clock())

    # handing out tasks ------------------------------------------------------------
    def _open_campaign(self, name: str) -> dict[str, Any]:
        campaign = get_campaign(self.store, name)
        if campaign["status"] != "active":
            raise StoreError(f"campaign '{name}' is {campaign['status']}; no tasks are handed out")
        return campaign

    def _take(self, campaign: dict[str, Any], annotator: str, write: _Write) -> _Assignment | None:
        """The annotator's open assignment or a new one (caller holds the lock)."""
        state = self._state(campaign["name"])
        person = state.person(annotator)
        now = self.clock()
        state.fresh(now)
        expires = now + campaign["task_timeout_s"]
        a = person.open
        if a is not None:
            # resuming (a reload, a second tab): same task, fresh timeout
            state.unaccount(a.task)
            a.expires = expires
            state.account(a.task, now)
            write.assignment_states.append((a.id, a.status, expires))
            return a
        tasks = state.tasks
        i = max(person.cursor, state.full)
        while i < len(tasks) and (annotator in tasks[i].holders or tasks[i].done >= state.overlap):
            i += 1
        person.cursor = i
        for task in tasks[i:]:
            if task.ready and annotator not in task.holders:
                break
        else:
            return None
        order = list(task.generation_ids)
        random.shuffle(order)
        a = _Assignment(new_id(), task, annotator, order, expires)
        state.unaccount(task)
        task.holders[annotator] = a
        task.open.add(a)
        state.account(task, now)
        self._assignments[a.id] = a
        person.open = a
        write.new_assignments.append(a)
        return a

    def _untake(self, a: _Assignment) -> None:
        """Take back a new assignment whose commit failed (caller holds the lock)."""
        state = a.task.campaign
        state.unaccount(a.task)
        a.task.holders.pop(a.annotator, None)
        a.task.open.discard(a)
        state.account(a.task, self.clock())
        self._assignments.pop(a.id, None)
        person = state.person(a.annotator)
        person.cursor = min(person.cursor, state.index[a.task.id])
        if person.open is a:
            person.open = None

    def _payload(self, a: _Assignment, campaign: dict[str, Any]) -> dict[str, Any]:
        messages, texts = self._content(a.task)
        return {
            "assignment_id": a.id,
            "campaign": campaign["name"],
            "prompt": messages,
            # only what the annotator needs, in the shuffled order they will see
            "completions": [{"position": i, "text": texts[g]} for i, g in enumerate(a.order)],
            "guidelines": campaign["guidelines"],
            "expires_at": _iso(a.expires),
        }

    def next_task(self, name: str, annotator: str) -> dict[str, Any] | None:
        campaign = self._open_campaign(name)
        write = _Write()
        with self._lock:
            a = self._take(campaign, annotator, write)
            if a is None:
                return None
            payload = self._payload(a, campaign)
        try:
            self._writer.write(write)
        except Exception:
            with self._lock:
                for made in write.new_assignments:
                    self._untake(made)
            raise
        return payload

    # judgments -----------------------------------------------------------------------
    def _stored(self, entry: _Key, annotator: str) -> dict[str, Any]:
        """The judgment a key already stands for (a retry, a double click)."""
        if entry.annotator != annotator:
            raise StoreError("idempotency key belongs to another annotator's judgment")
        if entry.committed is not None:
            entry.committed.result()  # the first attempt is still being written: its outcome is ours
        row = entry.row
        if row is None:
            row = self.store.query("SELECT * FROM judgments WHERE id = ?", [entry.judgment_id])[0]
        return _public(row)

    def begin_submit(
        self,
        annotator: str,
        sub: Submission,
        shown_at: float | None = None,
        then_next: bool = False,
        awaited: bool = True,
    ) -> tuple[Future[None], Callable[[], tuple[dict[str, Any], dict[str, Any] | None]]]:
        """Check and apply a judgment in memory and queue its commit.

        Returns the commit's future and `finish`, which (once the future is done) gives the
        judgment and the next task, or takes the change back and raises if the commit failed.
        Split in two so the REST route can await the commit without holding a thread.
        """
        key = sub.idempotency_key or sub.assignment_id
        write = _Write()
        with self._lock:
            a = self._assignment(sub.assignment_id)  # loads its campaign, and so its keys
            entry = self._keys.get(key)
            if entry is None:
                if a is None or a.annotator != annotator:
                    raise StoreError(
                        f"assignment '{sub.assignment_id}' is not one of yours; ask for the next task"
                    )
                # a different key for an assignment already judged hands back that judgment
                entry = a.judgment if a.status == "done" else None
            if entry is not None:
                old = entry
                return old.committed or _done_future(), lambda: (self._stored(old, annotator), None)
            row = self._judgment_row(a, key, annotator, sub, shown_at)  # raises before any change
            campaign = get_campaign(self.store, a.task.campaign.name)
            previous = a.status
            entry = self._keys[key] = _Key(row["id"], annotator, row=row)
            self._mark_done(a, entry)
            write.judgments.append(row)
            write.assignment_states.append((a.id, "done", a.expires))
            following = None
            if then_next and campaign["status"] == "active":
                following = self._take(campaign, annotator, write)
            nxt = None if following is None else self._payload(following, campaign)
            # `awaited`: the caller awaits the future on its loop, so the loop may write it;
            # a caller that blocks on it must have the writer thread do it
            entry.committed = committed = self._writer.submit(write, in_background=not awaited)

        def finish() -> tuple[dict[str, Any], dict[str, Any] | None]:
            try:
                committed.result()
            except Exception as exc:
                with self._lock:
                    self._keys.pop(key, None)
                    self._unmark_done(a, previous)
                    for made in write.new_assignments:
                        self._untake(made)
                if isinstance(exc, duckdb.ConstraintException):
                    # the key was used in a campaign this process has not loaded
                    rows = self.store.query(
                        "SELECT id, annotator FROM judgments WHERE idempotency_key = ?", [key]
                    )
                    if rows:
                        return self._stored(_Key(rows[0]["id"], rows[0]["annotator"]), annotator), None
                raise
            entry.row = None  # committed: a retry reads it back from the database
            return _public(row), nxt

        return committed, finish

    def submit(
        self, annotator: str, sub: Submission, shown_at: float | None = None, then_next: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return self.begin_submit(annotator, sub, shown_at, then_next, awaited=False)[1]()

    def _mark_done(self, a: _Assignment, entry: _Key) -> None:
        state = a.task.campaign
        person = state.person(a.annotator)
        state.unaccount(a.task)
        a.status, a.judgment = "done", entry
        a.task.open.discard(a)
        a.task.done += 1
        state.account(a.task, self.clock())
        person.done += 1
        state.judgments += 1
        if person.open is a:
            person.open = None
        if a.task.done >= state.overlap and not a.task.open:
            a.task.content = None  # nobody will be shown it again

    def _unmark_done(self, a: _Assignment, previous: str) -> None:
        """Take a judgment back out after its commit failed (caller holds the lock)."""
        state = a.task.campaign
        person = state.person(a.annotator)
        state.unaccount(a.task)
        a.status, a.judgment = previous, None
        a.task.done -= 1
        if previous == "open":
            a.task.open.add(a)
            if person.open is None:
                person.open = a
        state.account(a.task, self.clock())
        person.done -= 1
        state.judgments -= 1

    def _judgment_row(
        self, a: _Assignment, key: str, annotator: str, sub: Submission, shown_at: float | None
    ) -> dict[str, Any]:
        order = a.order
        ranks = normalize_ranks(sub, len(order))
        if sub.strength is not None and sub.strength not in STRENGTHS:
            raise StoreError("strength: 1 (slight), 2 (clear) or 3 (strong)")
        flags = _check_flags(sub, order)
        edited = (sub.edited_text or "").strip() or None
        now = time.time()
        return {
            "id": new_id(),
            "idempotency_key": key,
            "assignment_id": a.id,
            "campaign": a.task.campaign.name,
            "task_id": a.task.id,
            "annotator": annotator,
            "generation_ids": list(order),
            "ranks": ranks,
            "all_bad": sub.all_bad,
            "strength": sub.strength,
            "flags": json.dumps(flags),
            "rationale": (sub.rationale or "").strip() or None,
            "edited_text": edited,
            # with "all bad" the ideal is written from scratch, so it is edited from no answer
            "edited_from": order[ranks.index(1)] if edited and not sub.all_bad else None,
            "shown_at": shown_at,
            "submitted_at": now,
            "duration_ms": None if shown_at is None else (now - shown_at) * 1000.0,
        }

    def skip(self, annotator: str, assignment_id: str) -> None:
        write = _Write()
        with self._lock:
            a = self._assignment(assignment_id)
            if a is None or a.annotator != annotator:
                raise StoreError(f"assignment '{assignment_id}' is not one of yours")
            if a.status != "open":
                return
            self._set_open(a, False)
            write.assignment_states.append((a.id, "skipped", a.expires))
        try:
            self._writer.write(write)
        except Exception:
            with self._lock:
                self._set_open(a, True)
            raise

    def _set_open(self, a: _Assignment, is_open: bool) -> None:
        """Skip an assignment, or undo the skip (caller holds the lock)."""
        state = a.task.campaign
        person = state.person(a.annotator)
        state.unaccount(a.task)
        a.status = "open" if is_open else "skipped"
        if is_open:
            a.task.open.add(a)
            person.open = person.open or a
        else:
            a.task.open.discard(a)
            if person.open is a:
                person.open = None
        state.account(a.task, self.clock())

    # counts ------------------------------------------------------------------------------
    def progress(self, name: str, annotator: str | None = None) -> dict[str, int]:
        campaign = get_campaign(self.store, name)
        prompts = self.store.memo.get(("prompt_count", campaign["prompt_set"]))
        if prompts is None:
            prompts = self.store.query(
                "SELECT count(*) AS n FROM prompts WHERE set_name = ?", [campaign["prompt_set"]]
            )[0]["n"]
            self.store.memo[("prompt_count", campaign["prompt_set"])] = prompts
        with self._lock:
            state = self._state(name)
            state.fresh(self.clock())
            out = {
                "prompts": prompts,
                "tasks_sampled": len(state.tasks),
                "judgments": state.judgments,
                "judgments_needed": prompts * state.overlap,
                "ready": state.ready,
            }
            if annotator is not None:
                person = state.people.get(annotator) or _Person()
                out["done"] = person.done
                # prompts not sampled yet, plus sampled tasks with a place they have not had
                out["remaining"] = max(prompts - len(state.tasks), 0) + state.ready - person.held_ready
        return out


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A judgment as callers get it: flags decoded, times in ISO 8601 (from memory or the database)."""
    out = dict(row)
    if isinstance(out["flags"], str):
        out["flags"] = json.loads(out["flags"])
    out["generation_ids"] = list(out["generation_ids"])
    out["ranks"] = list(out["ranks"])
    for k in ("shown_at", "submitted_at"):
        out[k] = _iso(out[k]) if isinstance(out[k], float | int) or out[k] is None else out[k].isoformat()
    return out
