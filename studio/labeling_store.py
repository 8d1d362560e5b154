"""The labeling pool's persistence: loading campaigns from DuckDB and writing every change.

The pool lives in the studio process, which is the database's only writer (see
store.py), so it keeps who-has-what in memory (labeling_state.py) and answers
"next task" without a query. DuckDB stays the truth: a campaign is loaded from it
on first use (so a restart resumes where it was), and writes go through a group
commit (`BatchWriter`). A judgment is answered only once its row is committed, so
an acknowledged judgment is on disk; assignment rows may follow it under load (see
`LabelingPool._flush`). Changes made in memory before a failed commit are taken back.

One lock guards the state, and `POST /judgments` takes it on the event loop, which
Gradio shares. So no DuckDB query ever runs under that lock: rows are read before
it is taken and only memory changes under it, a campaign is loaded outside it and
then installed, and a judgment on the loop that needs the database (an assignment
the pool does not know, a campaign row not cached, a retry whose judgment must be
read back) is handed to a worker thread that the route awaits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import duckdb

from studio.batch_writer import BatchWriter
from studio.campaigns import cached_campaign, get_campaign
from studio.labeling_state import (
    Assignment,
    AssignmentRecord,
    CampaignState,
    JudgmentRecord,
    Key,
    Loaded,
    PoolState,
    Submission,
    Task,
    build_campaign,
    judgment_row,
)
from studio.store import Store, StoreError

log = logging.getLogger(__name__)

# a task's prompt messages, and its completions (text and finish reason) by id
Content = tuple[Any, dict[str, dict[str, Any]]]
Finish = Callable[[], tuple[dict[str, Any], dict[str, Any] | None]]


# reading ---------------------------------------------------------------------------------
@dataclass
class CampaignRows:
    overlap: int
    tasks: list[tuple[str, list[str]]]
    assignments: list[AssignmentRecord]
    judgments: list[JudgmentRecord]


def read_campaign(store: Store, name: str) -> CampaignRows:
    """The rows a campaign's pool state is built from (tasks by creation, assignments by hand-out)."""
    overlap = get_campaign(store, name)["overlap"]
    cur = store.cursor()
    tasks = cur.execute(
        "SELECT id, generation_ids FROM tasks WHERE campaign = ? ORDER BY created_at, id", [name]
    ).fetchall()
    judgments = cur.execute(
        "SELECT idempotency_key, id, assignment_id, annotator, task_id, generation_ids,"
        " epoch_us(submitted_at) / 1e6 FROM judgments WHERE campaign = ?",
        [name],
    ).fetchall()
    assignments = cur.execute(
        "SELECT a.id, a.task_id, a.annotator, a.display_order, epoch_us(a.expires_at) / 1e6, a.status"
        " FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE t.campaign = ?"
        " ORDER BY a.assigned_at",
        [name],
    ).fetchall()
    return CampaignRows(
        overlap,
        [(tid, list(gids)) for tid, gids in tasks],
        [AssignmentRecord(aid, tid, who, list(o), exp, st) for aid, tid, who, o, exp, st in assignments],
        [JudgmentRecord(k, jid, aid, who, tid, list(o), at) for k, jid, aid, who, tid, o, at in judgments],
    )


def read_content(store: Store, tasks: Sequence[tuple[str, Sequence[str]]]) -> dict[str, Content]:
    """Prompt and completion texts of tasks (id, generation ids), in two queries."""
    if not tasks:
        return {}
    cur = store.cursor()
    messages = dict(
        cur.execute(
            "SELECT t.id, p.messages FROM tasks t JOIN prompts p ON p.id = t.prompt_id"
            " WHERE list_contains(?, t.id)",
            [[tid for tid, _ in tasks]],
        ).fetchall()
    )
    # the finish reason travels with the text: "length" means cut off at max_tokens
    texts = {
        g: {"text": text, "finish_reason": reason}
        for g, text, reason in cur.execute(
            "SELECT id, text, finish_reason FROM generations WHERE list_contains(?, id)",
            [[g for _, gids in tasks for g in gids]],
        ).fetchall()
    }
    return {tid: (json.loads(messages[tid]), {g: texts[g] for g in gids}) for tid, gids in tasks}


def campaign_of_assignment(store: Store, assignment_id: str) -> str | None:
    row = (
        store.cursor()
        .execute(
            "SELECT t.campaign FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE a.id = ?",
            [assignment_id],
        )
        .fetchone()
    )
    return None if row is None else row[0]


# writing ---------------------------------------------------------------------------------
@dataclass
class _Write:
    """What one caller changes: rows for the group commit."""

    new_assignments: list[Assignment] = field(default_factory=list)
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


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@dataclass
class _Load:
    """A campaign being loaded: others wait on `done`; tasks added meanwhile wait in `pending`."""

    done: Future[None] = field(default_factory=Future)
    pending: list[tuple[str, list[str], Content]] = field(default_factory=list)


@dataclass
class _Shown:
    """What a task payload needs, copied under the lock."""

    assignment_id: str
    order: list[str]
    expires: float
    task: Task
    content: Content | None


class LabelingPool:
    """Who has which task, in memory; every change committed before it is answered."""

    def __init__(self, store: Store):
        self.store = store
        self.state = PoolState()
        self._lock = threading.Lock()  # guards self.state and self._loads; never held over a query
        self._loads: dict[str, _Load] = {}
        self._db_workers: ThreadPoolExecutor | None = None  # made on first need (see begin_submit)
        self._closed = False
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

    @property
    def clock(self) -> Callable[[], float]:
        return self.state.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:  # tests move it to expire assignments
        self.state.clock = clock

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = self._db_workers
        if workers is not None:
            workers.shutdown(wait=True)
        self._writer.close()

    # writing ---------------------------------------------------------------------
    def _flush(self, writes: list[_Write]) -> None:
        """Write what the callers waiting on the writer thread changed.

        Judgments go in one INSERT, which DuckDB commits as its own transaction; callers
        are answered only after it (for callers on the event loop, `_flush_on_loop` does
        this part on a thread of its own).
        Assignment rows (handed out, judged, skipped, timeout renewed) collect in a backlog
        written in one transaction: before the answer when 1-3 callers wait on this batch
        (a worker thread's call: the UI, the CLI), otherwise once 256 have collected, the
        oldest is a second old, or the writer has had nothing to do for 0.2 s. A judgment
        row names its task, annotator and order, so loading a campaign rebuilds the
        assignment row of any judgment whose row was not written yet, and marks done a
        row left open. What a crash can lose is an assignment handed out in its last
        second: its holder is told to ask for the next task.
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
            # conflict with another transaction: it takes no write lock, and the event
            # loop's judgments never wait behind an import or a snapshot.
            params = [[j[c] for j in judgments] for c in _JUDGMENT_COLS]
            self.store.write(_INSERT_JUDGMENTS, params, exclusive=False)

    def _flush_on_loop(self, writes: list[_Write]) -> None:
        """The share of judgments submitted on the event loop (BatchWriter's awaited lane):
        the judgments; their assignment rows go to the writer thread's backlog, which nobody
        waits for."""
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
    def _loaded(self, name: str) -> CampaignState:
        """The campaign's state, loaded from the database on first use.

        The rows are read and the state built outside the lock, then installed under it:
        the event loop, which takes the lock for each judgment, never waits for a load.
        One thread loads a campaign; others asking for it meanwhile wait for that load."""
        with self._lock:
            state = self.state.campaigns.get(name)
            if state is not None:
                return state
            load = self._loads.get(name)
            mine = load is None
            if load is None:
                load = self._loads[name] = _Load()
        if not mine:
            load.done.result()
            return self.state.campaigns[name]
        try:
            rows = read_campaign(self.store, name)
            loaded = build_campaign(
                name, rows.overlap, rows.tasks, rows.assignments, rows.judgments, self.state.clock()
            )
            shown = loaded.state.needs_content()
            contents = read_content(self.store, [(t.id, t.generation_ids) for t in shown])
            for t in shown:
                t.content = contents[t.id]
        except BaseException as exc:
            with self._lock:
                self._loads.pop(name, None)
            load.done.set_exception(exc)
            raise
        with self._lock:
            self._loads.pop(name, None)
            self.state.install(loaded)
            for task_id, generation_ids, content in load.pending:  # added while it loaded
                self.state.add_task(name, task_id, generation_ids, content)
            state = self.state.campaigns[name]
        load.done.set_result(None)
        self._write_repairs(loaded)
        return state

    def _write_repairs(self, loaded: Loaded) -> None:
        """Write back what a crash left behind (see build_campaign); nobody waits for it."""
        rows = _Write(background=True)
        for a in loaded.rebuilt:
            rows.new_assignments.append(a)
            rows.assignment_states.append((a.id, "done", a.expires))
        for a in loaded.repaired:
            rows.assignment_states.append((a.id, "done", a.expires))
        if rows.new_assignments or rows.assignment_states:
            log.info(
                "labeling: campaign '%s': %d judged assignment row(s) rebuilt, %d marked done",
                loaded.state.name,
                len(loaded.rebuilt),
                len(loaded.repaired),
            )
            self._writer.submit(rows, in_background=True)

    def _find(self, assignment_id: str) -> Assignment | None:
        """The assignment, loading its campaign first if it is not loaded (a restart)."""
        a = self.state.assignments.get(assignment_id)
        if a is None:
            name = campaign_of_assignment(self.store, assignment_id)
            if name is not None:
                self._loaded(name)
                a = self.state.assignments.get(assignment_id)
        return a

    def task_added(self, name: str, task_id: str, generation_ids: list[str]) -> None:
        """Offer a newly stored task; its texts are read here, off the annotators' path."""
        with self._lock:
            wanted = name in self.state.campaigns or name in self._loads
        if not wanted:
            return  # not loaded: its first use reads it
        content = read_content(self.store, [(task_id, generation_ids)])[task_id]
        with self._lock:
            if name in self.state.campaigns:
                self.state.add_task(name, task_id, generation_ids, content)
            elif name in self._loads:
                self._loads[name].pending.append((task_id, list(generation_ids), content))
            # else its load failed: the next one reads the task

    # handing out tasks ------------------------------------------------------------
    def _open_campaign(self, name: str) -> dict[str, Any]:
        campaign = get_campaign(self.store, name)
        if campaign["status"] != "active":
            raise StoreError(f"campaign '{name}' is {campaign['status']}; no tasks are handed out")
        return campaign

    def _take(self, campaign: dict[str, Any], annotator: str, write: _Write) -> _Shown | None:
        """Take the annotator's task and note its row (caller holds the lock)."""
        taken = self.state.take(campaign["name"], annotator, campaign["task_timeout_s"])
        if taken is None:
            return None
        a, new = taken
        if new:
            write.new_assignments.append(a)
        else:
            write.assignment_states.append((a.id, a.status, a.expires))
        return _Shown(a.id, list(a.order), a.expires, a.task, a.task.content)

    def _payload(self, shown: _Shown, campaign: dict[str, Any]) -> dict[str, Any]:
        """The task as the annotator sees it (outside the lock)."""
        content = shown.content
        if content is None:  # only after a failed commit let a finished task back in
            task = shown.task
            content = read_content(self.store, [(task.id, task.generation_ids)])[task.id]
            with self._lock:
                task.content = task.content or content
        messages, texts = content
        return {
            "assignment_id": shown.assignment_id,
            "campaign": campaign["name"],
            "prompt": messages,
            # only what the annotator needs, in the shuffled order they will see
            "completions": [{"position": i, **texts[g]} for i, g in enumerate(shown.order)],
            "guidelines": campaign["guidelines"],
            "expires_at": _iso(shown.expires),
        }

    def next_task(self, name: str, annotator: str) -> dict[str, Any] | None:
        campaign = self._open_campaign(name)
        self._loaded(name)
        write = _Write()
        with self._lock:
            shown = self._take(campaign, annotator, write)
        if shown is None:
            return None
        payload = self._payload(shown, campaign)
        try:
            self._writer.write(write)
        except Exception:
            with self._lock:
                for made in write.new_assignments:
                    self.state.untake(made)
            raise
        return payload

    # judgments -----------------------------------------------------------------------
    def _stored(self, entry: Key, annotator: str, assignment_id: str) -> dict[str, Any]:
        """The judgment a key already stands for (a retry, a double click)."""
        if entry.annotator != annotator:
            raise StoreError("idempotency key belongs to another annotator's judgment")
        if entry.assignment_id is not None and entry.assignment_id != assignment_id:
            # answering with the old judgment would acknowledge one that was never stored
            raise StoreError(
                f"idempotency_key already stands for your judgment of assignment '{entry.assignment_id}', "
                f"not '{assignment_id}': a retry sends the same assignment; send a new key (or none) "
                "with a new judgment"
            )
        if entry.committed is not None:
            entry.committed.result()  # the first attempt is still being written: its outcome is ours
        row = entry.row
        if row is None:
            row = self.store.query("SELECT * FROM judgments WHERE id = ?", [entry.judgment_id])[0]
        return _public(row)

    def _needs_database(self, key: str, assignment_id: str) -> bool:
        """Whether a judgment needs a query before it can be applied (a guess: no lock taken)."""
        a = self.state.assignments.get(assignment_id)
        if a is None:
            return True  # a restart, or a bogus id: its campaign is looked up
        entry = self.state.keys.get(key)
        if entry is not None:
            return entry.row is None  # the judgment is read back
        if a.status == "done" and a.judgment is not None and a.judgment.row is None:
            return True
        return cached_campaign(self.store, a.task.campaign.name) is None

    def _in_worker(
        self, annotator: str, sub: Submission, shown_at: float | None, then_next: bool
    ) -> Future[Any]:
        with self._lock:
            if self._closed:
                raise StoreError("the studio is shutting down; nothing was stored, try again in a moment")
            if self._db_workers is None:
                self._db_workers = ThreadPoolExecutor(2, thread_name_prefix="labeling-db")
            return self._db_workers.submit(self.submit, annotator, sub, shown_at, then_next)

    def begin_submit(
        self,
        annotator: str,
        sub: Submission,
        shown_at: float | None = None,
        then_next: bool = False,
        awaited: bool = True,
    ) -> tuple[Future[None], Finish]:
        """Check and apply a judgment in memory and queue its commit.

        Returns the commit's future and `finish`, which (once the future is done) gives the
        judgment and the next task, or takes the change back and raises if the commit failed.
        Split in two so the REST route can await the commit without holding a thread. On an
        event loop, a judgment that needs a query first is done whole by a worker thread,
        and the future is that thread's.
        """
        key = sub.idempotency_key or sub.assignment_id
        if awaited and _on_event_loop() and self._needs_database(key, sub.assignment_id):
            worked = self._in_worker(annotator, sub, shown_at, then_next)
            return cast(Future[None], worked), worked.result
        a = self._find(sub.assignment_id)  # loads its campaign, and so its keys
        campaign = None if a is None else get_campaign(self.store, a.task.campaign.name)
        write = _Write()
        with self._lock:
            entry = self.state.keys.get(key)
            if entry is None:
                if a is None or a.annotator != annotator:
                    raise StoreError(
                        f"assignment '{sub.assignment_id}' is not one of yours; ask for the next task"
                    )
                # a different key for an assignment already judged hands back that judgment
                entry = a.judgment if a.status == "done" else None
            if entry is not None:
                old = entry
                return old.committed or _done_future(), lambda: (
                    self._stored(old, annotator, sub.assignment_id),
                    None,
                )
            assert a is not None and campaign is not None
            row = judgment_row(a, key, annotator, sub, shown_at)  # raises before any change
            entry = Key(row["id"], annotator, row=row, assignment_id=a.id)
            undo = self.state.judge(a, key, entry)
            write.judgments.append(row)
            write.assignment_states.append((a.id, "done", a.expires))
            shown = None
            if then_next and campaign["status"] == "active":
                shown = self._take(campaign, annotator, write)
            # `awaited`: the caller awaits the future on its loop, so only its judgment is
            # written first; a caller that blocks on it has the writer thread write all of it
            entry.committed = committed = self._writer.submit(write, in_background=not awaited)
        nxt = None if shown is None else self._payload(shown, campaign)

        def finish() -> tuple[dict[str, Any], dict[str, Any] | None]:
            try:
                committed.result()
            except Exception as exc:
                with self._lock:
                    self.state.unjudge(a, key, undo)
                    for made in write.new_assignments:
                        self.state.untake(made)
                if isinstance(exc, duckdb.ConstraintException):
                    # the key was used in a campaign this process has not loaded
                    rows = self.store.query(
                        "SELECT id, annotator, assignment_id FROM judgments WHERE idempotency_key = ?", [key]
                    )
                    if rows:
                        r = rows[0]
                        found = Key(r["id"], r["annotator"], assignment_id=r["assignment_id"])
                        return self._stored(found, annotator, sub.assignment_id), None
                raise
            # Committed: a retry reads it back from the database, and has no commit to wait
            # for. The key outlives the request, and its done future with it would keep the
            # future's lock, condition and the callbacks the route chained to it: about 25
            # objects per judgment that every full pass of the garbage collector walked
            # (250 ms pauses once 17,000 judgments were held; benchmarks/README.md).
            entry.row = None
            entry.committed = None
            return _public(row), nxt

        return committed, finish

    def submit(
        self, annotator: str, sub: Submission, shown_at: float | None = None, then_next: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return self.begin_submit(annotator, sub, shown_at, then_next, awaited=False)[1]()

    def skip(self, annotator: str, assignment_id: str) -> None:
        a = self._find(assignment_id)
        write = _Write()
        with self._lock:
            if a is None or a.annotator != annotator:
                raise StoreError(f"assignment '{assignment_id}' is not one of yours")
            if not self.state.skip(a):
                return
            write.assignment_states.append((a.id, "skipped", a.expires))
        try:
            self._writer.write(write)
        except Exception:
            with self._lock:
                self.state.unskip(a)
            raise

    # counts ------------------------------------------------------------------------------
    def progress(self, name: str, annotator: str | None = None) -> dict[str, int]:
        campaign = get_campaign(self.store, name)
        prompts = self.store.memo.get(("prompt_count", campaign["prompt_set"]))
        if prompts is None:
            prompts = self.store.query(
                "SELECT count(*) AS n FROM prompts WHERE set_name = ?", [campaign["prompt_set"]]
            )[0]["n"]
            self.store.memo[("prompt_count", campaign["prompt_set"])] = prompts
        self._loaded(name)
        with self._lock:
            return self.state.progress(name, prompts, annotator)


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
