"""The labeling pool's rules on plain objects: no database, a clock the test moves."""

from __future__ import annotations

import random
from itertools import count

import pytest

from studio.labeling_state import (
    AssignmentRecord,
    JudgmentRecord,
    Key,
    PoolState,
    build_campaign,
)

TIMEOUT = 1800.0


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def pool(tasks: int, overlap: int, clock: Clock, name: str = "c1") -> PoolState:
    ids = count()
    state = PoolState(clock=clock, rng=random.Random(0), make_id=lambda: f"a{next(ids)}")
    rows = [(f"t{i}", [f"t{i}g0", f"t{i}g1", f"t{i}g2"]) for i in range(tasks)]
    assert state.install(build_campaign(name, overlap, rows, [], [], clock()))
    return state


def judge(state: PoolState, a, key: str | None = None) -> None:
    state.judge(a, key or a.id, Key(f"j-{a.id}", a.annotator))


def test_each_task_goes_to_k_different_annotators_never_twice() -> None:
    clock = Clock()
    state = pool(tasks=3, overlap=2, clock=clock)
    seen: dict[str, list[str]] = {}
    for name in ("ann1", "ann2", "ann3"):
        while (taken := state.take("c1", name, TIMEOUT)) is not None:
            a, new = taken
            assert new
            assert sorted(a.order) == sorted(a.task.generation_ids)  # a shuffle of the task's completions
            seen.setdefault(name, []).append(a.task.id)
            judge(state, a)
    assert seen == {"ann1": ["t0", "t1", "t2"], "ann2": ["t0", "t1", "t2"]}  # ann3: every task has k
    campaign = state.campaigns["c1"]
    assert [t.done for t in campaign.tasks] == [2, 2, 2]
    assert campaign.full == 3 and campaign.ready == 0 and campaign.judgments == 6


def test_an_open_assignment_is_resumed_with_a_fresh_timeout() -> None:
    clock = Clock()
    state = pool(tasks=2, overlap=1, clock=clock)
    first, new = state.take("c1", "ann1", TIMEOUT)
    assert new and first.expires == clock.now + TIMEOUT
    clock.now += 60
    again, new = state.take("c1", "ann1", TIMEOUT)
    assert again is first and not new
    assert first.expires == clock.now + TIMEOUT
    other, _ = state.take("c1", "ann2", TIMEOUT)
    assert other.task is not first.task  # the held task has no free place


def test_an_expired_assignment_returns_its_place_and_a_late_submit_is_kept() -> None:
    clock = Clock()
    state = pool(tasks=1, overlap=1, clock=clock)
    first, _ = state.take("c1", "ann1", TIMEOUT)
    assert state.take("c1", "ann2", TIMEOUT) is None  # the only place is taken
    assert state.progress("c1", prompts=1)["ready"] == 0
    clock.now += TIMEOUT + 1  # ann1 walked away
    assert state.progress("c1", prompts=1)["ready"] == 1
    second, new = state.take("c1", "ann2", TIMEOUT)
    assert new and second.task is first.task and second is not first
    judge(state, first)  # late, after the place went to ann2: still accepted
    judge(state, second)
    assert first.status == second.status == "done"
    assert first.task.done == 2
    assert state.progress("c1", prompts=1, annotator="ann1") | {"done": 1} == state.progress(
        "c1", prompts=1, annotator="ann1"
    )
    assert state.take("c1", "ann1", TIMEOUT) is None  # done: never handed back


def test_skip_frees_the_place_and_is_never_handed_back() -> None:
    clock = Clock()
    state = pool(tasks=1, overlap=1, clock=clock)
    a, _ = state.take("c1", "ann1", TIMEOUT)
    assert state.skip(a) and a.status == "skipped"
    assert not state.skip(a)  # only an open assignment can be skipped
    assert state.take("c1", "ann1", TIMEOUT) is None
    b, new = state.take("c1", "ann2", TIMEOUT)
    assert new and b.task is a.task
    state.unskip(a)  # the skip's write failed: ann1 holds it again
    assert a.status == "open" and state.take("c1", "ann1", TIMEOUT)[0] is a


def test_counts_follow_each_change() -> None:
    clock = Clock()
    state = pool(tasks=2, overlap=2, clock=clock)
    assert state.progress("c1", prompts=5, annotator="ann1") == {
        "prompts": 5,
        "tasks_sampled": 2,
        "judgments": 0,
        "judgments_needed": 10,
        "ready": 2,
        "done": 0,
        "remaining": 5,  # 3 prompts not sampled yet, 2 tasks with a place
    }
    a, _ = state.take("c1", "ann1", TIMEOUT)
    judge(state, a)
    mine = state.progress("c1", prompts=5, annotator="ann1")
    assert mine["judgments"] == 1 and mine["done"] == 1 and mine["ready"] == 2 and mine["remaining"] == 4
    theirs = state.progress("c1", prompts=5, annotator="ann2")
    assert theirs["done"] == 0 and theirs["remaining"] == 5
    b, _ = state.take("c1", "ann2", TIMEOUT)
    assert b.task is a.task  # the oldest task with a place
    judge(state, b)
    assert state.progress("c1", prompts=5)["ready"] == 1  # the first task has its k judgments
    assert state.add_task("c1", "t9", ["x", "y"], content=None)
    assert not state.add_task("c1", "t9", ["x", "y"], content=None)  # once
    assert state.progress("c1", prompts=5)["ready"] == 2 and state.progress("c1", 5)["tasks_sampled"] == 3


def test_undo_after_a_failed_write_restores_everything() -> None:
    clock = Clock()
    state = pool(tasks=1, overlap=1, clock=clock)
    a, _ = state.take("c1", "ann1", TIMEOUT)
    a.task.content = ("prompt", {})
    before = state.progress("c1", prompts=1, annotator="ann1")
    undo = state.judge(a, "k1", Key("j1", "ann1"))
    assert "k1" in state.keys and a.task.content is None  # full, nobody is shown it again
    state.unjudge(a, "k1", undo)
    assert "k1" not in state.keys and a.status == "open" and a.task.content == ("prompt", {})
    assert state.progress("c1", prompts=1, annotator="ann1") == before
    assert state.take("c1", "ann1", TIMEOUT)[0] is a  # resumed
    state.untake(a)
    assert a.id not in state.assignments
    b, new = state.take("c1", "ann1", TIMEOUT)  # the untaken task can be taken again
    assert new and b.task is a.task


def test_loading_resumes_open_assignments_and_repairs_what_a_crash_left() -> None:
    """Rows as a crash leaves them: one judgment with its row still open, one with no row."""
    clock = Clock()
    tasks = [(f"t{i}", ["g0", "g1"]) for i in range(4)]
    later = clock.now + 600
    rows = [
        AssignmentRecord("a-held", "t0", "ann1", ["g1", "g0"], later, "open"),
        AssignmentRecord("a-stale", "t1", "ann2", ["g0", "g1"], later, "open"),
        AssignmentRecord("a-skipped", "t2", "ann1", ["g0", "g1"], later, "skipped"),
    ]
    judgments = [
        JudgmentRecord("k-stale", "j1", "a-stale", "ann2", "t1", ["g0", "g1"], clock.now - 5),
        JudgmentRecord("k-lost", "j2", "a-lost", "ann3", "t3", ["g1", "g0"], clock.now - 1),
    ]
    loaded = build_campaign("c1", 1, tasks, rows, judgments, clock())
    assert [a.id for a in loaded.repaired] == ["a-stale"]
    assert [a.id for a in loaded.rebuilt] == ["a-lost"] and loaded.rebuilt[0].order == ["g1", "g0"]
    state = PoolState(clock=clock)
    assert state.install(loaded)
    assert not state.install(build_campaign("c1", 1, tasks, [], [], clock()))  # loaded once
    assert state.assignments["a-stale"].status == "done"
    assert state.keys["k-stale"] is state.assignments["a-stale"].judgment
    assert state.take("c1", "ann1", TIMEOUT) == (state.assignments["a-held"], False)
    assert state.progress("c1", prompts=4, annotator="ann2")["done"] == 1
    assert state.progress("c1", prompts=4)["judgments"] == 2
    # t0 held by ann1, t1 and t3 judged, t2 skipped by ann1: the next annotator gets t2
    assert state.take("c1", "ann4", TIMEOUT)[0].task.id == "t2"


def test_loading_keeps_texts_only_for_tasks_that_may_be_shown() -> None:
    clock = Clock()
    tasks = [(f"t{i}", ["g0", "g1"]) for i in range(3)]
    expired = clock.now - 10  # ann1 walked away from t1; ann3 then judged it
    rows = [
        AssignmentRecord("a0", "t0", "ann2", ["g0", "g1"], clock.now, "done"),
        AssignmentRecord("a1", "t1", "ann1", ["g0", "g1"], expired, "open"),
        AssignmentRecord("a2", "t1", "ann3", ["g0", "g1"], clock.now, "done"),
    ]
    judgments = [
        JudgmentRecord("k0", "j0", "a0", "ann2", "t0", ["g0", "g1"], clock.now),
        JudgmentRecord("k2", "j2", "a2", "ann3", "t1", ["g0", "g1"], clock.now),
    ]
    loaded = build_campaign("c1", 1, tasks, rows, judgments, clock())
    assert loaded.state.full == 2 and not loaded.repaired and not loaded.rebuilt
    # t0 is finished; t1 is too, but ann1 may still resume it; t2 is not judged yet
    assert [t.id for t in loaded.state.needs_content()] == ["t1", "t2"]


@pytest.mark.parametrize("overlap", [1, 3])
def test_many_annotators_in_any_order_never_exceed_k(overlap: int) -> None:
    clock = Clock()
    state = pool(tasks=20, overlap=overlap, clock=clock)
    rng = random.Random(1)
    names = [f"ann{i}" for i in range(6)]
    held: dict[str, object] = {}
    for _ in range(400):
        name = rng.choice(names)
        if name in held and rng.random() < 0.7:
            a = held.pop(name)
            judge(state, a) if rng.random() < 0.8 else state.skip(a)
        else:
            taken = state.take("c1", name, TIMEOUT)
            if taken is not None:
                held[name] = taken[0]
    for task in state.campaigns["c1"].tasks:
        judged = [a.annotator for a in task.holders.values() if a.status == "done"]
        assert len(judged) <= overlap and len(set(judged)) == len(judged)
