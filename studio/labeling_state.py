"""The labeling pool's rules, in memory: who holds which task, free places, counts.

A task is one prompt of a campaign with its n sampled completions. It goes to
`overlap` (k) different annotators; an annotator never gets a task they already
had (done or skipped); an assignment not submitted within the campaign's
timeout stops holding its place, so the task goes back to the pool, yet a late
submit is still accepted. Each annotator holds at most one open assignment per
campaign, which `take` resumes.

Nothing here touches the database, a lock or the wall clock: `PoolState` takes a
clock, a random generator and an id maker, so its tests drive it with plain
objects. The studio's `LabelingPool` (labeling_store.py) loads it from DuckDB,
guards it with one lock and writes its changes. `build_campaign` turns the rows
of a campaign back into its state (a restart resumes where it was).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from studio.store import StoreError, new_id

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


# checking a submission ------------------------------------------------------------------
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


def check_flags(sub: Submission, order: list[str]) -> dict[str, list[str]]:
    """The submission's flags by generation id; positions and names checked."""
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


def judgment_row(
    a: Assignment, key: str, annotator: str, sub: Submission, shown_at: float | None
) -> dict[str, Any]:
    """The judgment `sub` makes of assignment `a`, as a row; raises before anything changes."""
    order = a.order
    ranks = normalize_ranks(sub, len(order))
    if sub.strength is not None and sub.strength not in STRENGTHS:
        raise StoreError("strength: 1 (slight), 2 (clear) or 3 (strong)")
    flags = check_flags(sub, order)
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


# the state ----------------------------------------------------------------------------
class Task:
    __slots__ = ("campaign", "content", "done", "generation_ids", "holders", "id", "open", "ready")

    def __init__(self, task_id: str, campaign: CampaignState, generation_ids: list[str]):
        self.id = task_id
        self.campaign = campaign
        self.generation_ids = generation_ids
        self.holders: dict[str, Assignment] = {}  # annotator -> their assignment, any status
        self.open: set[Assignment] = set()
        self.done = 0
        self.ready = False  # had a free place when last counted (see CampaignState.account)
        self.content: tuple[Any, dict[str, dict[str, Any]]] | None = None  # prompt, completions by id

    def taken(self, now: float) -> int:
        """Places used: judgments plus assignments still within their timeout."""
        return self.done + sum(1 for a in self.open if a.expires > now)


class Assignment:
    __slots__ = ("annotator", "expires", "id", "judgment", "order", "status", "task")

    def __init__(self, assignment_id: str, task: Task, annotator: str, order: list[str], expires: float):
        self.id = assignment_id
        self.task = task
        self.annotator = annotator
        self.order = order
        self.expires = expires
        self.status = "open"
        self.judgment: Key | None = None  # its judgment once done


@dataclass
class Key:
    """An idempotency key seen in this process: its judgment, and the commit it waits for."""

    judgment_id: str
    annotator: str
    committed: Future[None] | None = None
    row: dict[str, Any] | None = None  # until committed; then it is read back if asked again
    # the assignment it judged: a retry names the same one, a new judgment under an old key does not
    assignment_id: str | None = None


@dataclass
class Person:
    open: Assignment | None = None  # at most one per campaign: `take` resumes it
    done: int = 0
    held_ready: int = 0  # tasks they hold that still have a free place (for "remaining")
    cursor: int = 0  # every task before it is theirs already or has all its judgments


class CampaignState:
    """One campaign's tasks and people, with counts kept up to date on every change.

    Counting free places is what every response needs ("remaining", "ready"), so it is
    kept incrementally: each change to a task takes the task's share out of the counts
    and puts it back after. Time alone frees places (an assignment's timeout), so the
    counts are redone from scratch when the soonest timeout passes.
    """

    def __init__(self, name: str, overlap: int):
        self.name = name
        self.overlap = overlap
        self.tasks: list[Task] = []
        self.by_id: dict[str, Task] = {}
        self.index: dict[str, int] = {}
        self.full = 0  # tasks[:full] have all their judgments: no scan looks at them again
        self.people: dict[str, Person] = {}
        self.judgments = 0
        self.ready = 0
        self.recount_at = float("inf")

    def person(self, name: str) -> Person:
        p = self.people.get(name)
        if p is None:
            p = self.people[name] = Person()
        return p

    def append(self, task: Task) -> None:
        """Add a task without counting it (loading; `fresh` counts them all after)."""
        self.by_id[task.id] = task
        self.index[task.id] = len(self.tasks)
        self.tasks.append(task)

    def add(self, task: Task, now: float) -> None:
        if task.id not in self.by_id:
            self.append(task)
            self.account(task, now)

    def unaccount(self, task: Task) -> None:
        if task.ready:
            task.ready = False
            self.ready -= 1
            for name in task.holders:
                self.people[name].held_ready -= 1

    def account(self, task: Task, now: float) -> None:
        if task.done >= self.overlap:
            while self.full < len(self.tasks) and self.tasks[self.full].done >= self.overlap:
                self.full += 1
        else:
            self.full = min(self.full, self.index[task.id])  # only after an undo
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

    def needs_content(self) -> list[Task]:
        """Tasks that may still be shown: not full, or with an open assignment to resume."""
        return [t for t in self.tasks[: self.full] if t.open] + self.tasks[self.full :]


# loading ------------------------------------------------------------------------------
@dataclass
class AssignmentRecord:
    """An assignment as stored: `expires` in seconds since the epoch."""

    id: str
    task_id: str
    annotator: str
    order: list[str]
    expires: float
    status: str


@dataclass
class JudgmentRecord:
    """What a stored judgment says of its assignment (enough to rebuild a lost assignment row)."""

    key: str
    id: str
    assignment_id: str
    annotator: str
    task_id: str
    order: list[str]
    submitted_at: float


@dataclass
class Loaded:
    """A campaign rebuilt from its rows, and the assignment rows that must be written back."""

    state: CampaignState
    assignments: dict[str, Assignment]
    keyed: list[tuple[str, Assignment]]  # the judged ones, by their judgment's idempotency key
    rebuilt: list[Assignment]  # judged, but their row was never written (a crash): insert them
    repaired: list[Assignment]  # judged, but their row still says open or skipped (a crash): mark done


def build_campaign(
    name: str,
    overlap: int,
    tasks: Sequence[tuple[str, Sequence[str]]],
    assignments: Sequence[AssignmentRecord],
    judgments: Sequence[JudgmentRecord],
    now: float,
) -> Loaded:
    """A campaign's state from its rows: tasks in creation order, assignments in hand-out order.

    A judgment is the truth about its assignment. Assignment rows are written after the
    judgment they follow (see LabelingPool._flush), so after a crash a judged assignment
    may have no row, or a row still open; both are rebuilt as done and listed for writing.
    """
    state = CampaignState(name, overlap)
    for tid, gids in tasks:
        state.append(Task(tid, state, list(gids)))
    judged = {j.assignment_id: j for j in judgments}
    state.judgments = len(judgments)
    known = {r.id for r in assignments}
    lost = [
        AssignmentRecord(j.assignment_id, j.task_id, j.annotator, list(j.order), j.submitted_at, "done")
        for j in judgments
        if j.assignment_id not in known
    ]
    out = Loaded(state, {}, [], [], [])
    for r in [*assignments, *lost]:
        task = state.by_id[r.task_id]
        a = Assignment(r.id, task, r.annotator, list(r.order), r.expires)
        j = judged.get(r.id)
        if j is not None:
            a.judgment = Key(j.id, j.annotator, assignment_id=r.id)
            a.status = "done"
            out.keyed.append((j.key, a))
            if r.id not in known:
                out.rebuilt.append(a)
            elif r.status != "done":
                out.repaired.append(a)
        else:
            a.status = r.status
        task.holders[r.annotator] = a
        out.assignments[a.id] = a
        if a.status == "done":
            task.done += 1
            state.person(r.annotator).done += 1
        elif a.status == "open":
            task.open.add(a)
            state.person(r.annotator).open = a
    state.recount_at = float("-inf")
    state.fresh(now)
    return out


# the pool -----------------------------------------------------------------------------
class PoolState:
    """Every loaded campaign, every assignment by id and every idempotency key seen.

    Single-threaded: the caller serialises calls (the studio holds one lock around them).
    Each change has its undo, for a change whose write then fails.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        make_id: Callable[[], str] = new_id,
    ):
        self.clock = clock  # tests move it to expire assignments
        self.rng = rng or random.Random()
        self.make_id = make_id
        self.campaigns: dict[str, CampaignState] = {}
        self.assignments: dict[str, Assignment] = {}
        self.keys: dict[str, Key] = {}

    def install(self, loaded: Loaded) -> bool:
        """Add a loaded campaign; False (nothing changed) if it is here already."""
        name = loaded.state.name
        if name in self.campaigns:
            return False
        for key, a in loaded.keyed:
            a.judgment = self.keys.setdefault(key, a.judgment)
        self.assignments.update(loaded.assignments)
        self.campaigns[name] = loaded.state
        return True

    def add_task(
        self,
        name: str,
        task_id: str,
        generation_ids: list[str],
        content: tuple[Any, dict[str, dict[str, Any]]] | None,
    ) -> bool:
        """Offer a new task of a loaded campaign; False if the campaign is not loaded or has it."""
        state = self.campaigns.get(name)
        if state is None or task_id in state.by_id:
            return False
        task = Task(task_id, state, list(generation_ids))
        task.content = content
        state.add(task, self.clock())
        return True

    def take(self, name: str, annotator: str, timeout_s: float) -> tuple[Assignment, bool] | None:
        """The annotator's open assignment (timeout renewed) or a new one, and whether it is new.

        None when no task they have not had has a free place."""
        state = self.campaigns[name]
        person = state.person(annotator)
        now = self.clock()
        state.fresh(now)
        expires = now + timeout_s
        a = person.open
        if a is not None:
            # resuming (a reload, a second tab): same task, fresh timeout
            state.unaccount(a.task)
            a.expires = expires
            state.account(a.task, now)
            return a, False
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
        self.rng.shuffle(order)
        a = Assignment(self.make_id(), task, annotator, order, expires)
        state.unaccount(task)
        task.holders[annotator] = a
        task.open.add(a)
        state.account(task, now)
        self.assignments[a.id] = a
        person.open = a
        return a, True

    def untake(self, a: Assignment) -> None:
        """Undo `take` of a new assignment."""
        state = a.task.campaign
        state.unaccount(a.task)
        a.task.holders.pop(a.annotator, None)
        a.task.open.discard(a)
        state.account(a.task, self.clock())
        self.assignments.pop(a.id, None)
        person = state.person(a.annotator)
        person.cursor = min(person.cursor, state.index[a.task.id])
        if person.open is a:
            person.open = None

    def judge(self, a: Assignment, key: str, entry: Key) -> tuple[str, Any]:
        """Record `a`'s judgment under its idempotency key; returns what `unjudge` needs.

        Accepted whatever the assignment's status or timeout (a late submit is kept)."""
        undo = (a.status, a.task.content)
        state = a.task.campaign
        person = state.person(a.annotator)
        self.keys[key] = entry
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
        return undo

    def unjudge(self, a: Assignment, key: str, undo: tuple[str, Any]) -> None:
        """Undo `judge`."""
        previous, content = undo
        state = a.task.campaign
        person = state.person(a.annotator)
        self.keys.pop(key, None)
        state.unaccount(a.task)
        a.status, a.judgment = previous, None
        a.task.done -= 1
        if previous == "open":
            a.task.open.add(a)
            if person.open is None:
                person.open = a
        if a.task.content is None:
            a.task.content = content
        state.account(a.task, self.clock())
        person.done -= 1
        state.judgments -= 1

    def skip(self, a: Assignment) -> bool:
        """The annotator passes on an open assignment: its place is free, never handed back to them.

        False (nothing changed) if it is not open."""
        if a.status != "open":
            return False
        self._set_open(a, False)
        return True

    def unskip(self, a: Assignment) -> None:
        """Undo `skip`."""
        self._set_open(a, True)

    def _set_open(self, a: Assignment, is_open: bool) -> None:
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

    def progress(self, name: str, prompts: int, annotator: str | None = None) -> dict[str, int]:
        """Counts for a campaign of `prompts` prompts, and for one annotator when given."""
        state = self.campaigns[name]
        state.fresh(self.clock())
        out = {
            "prompts": prompts,
            "tasks_sampled": len(state.tasks),
            "judgments": state.judgments,
            "judgments_needed": prompts * state.overlap,
            "ready": state.ready,
        }
        if annotator is not None:
            person = state.people.get(annotator) or Person()
            out["done"] = person.done
            # prompts not sampled yet, plus sampled tasks with a place they have not had
            out["remaining"] = max(prompts - len(state.tasks), 0) + state.ready - person.held_ready
        return out
