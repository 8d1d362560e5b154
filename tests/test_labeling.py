from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from studio import campaigns, labeling, labeling_state, labeling_store, quality
from studio.app import create_app
from studio.config import Settings
from studio.importer import messages_hash
from studio.labeling import Submission
from studio.runtime import Studio
from studio.store import ImportedPrompt, Store, StoreError
from tests.helpers import StoreFile, add_sampled_task, make_users, seed_campaign


@pytest.fixture()
def store(store: Store) -> Store:
    make_users(store, ("ann1", "annotator"), ("ann2", "annotator"), ("ann3", "annotator"))
    return store


def test_each_task_goes_to_k_different_annotators_never_twice(store: Store) -> None:
    tasks = seed_campaign(store, prompts=3, overlap=2)
    seen: dict[str, list[str]] = {}
    for name in ("ann1", "ann2", "ann3"):
        while (task := labeling.next_task(store, "c1", name)) is not None:
            assignment = store.query("SELECT task_id FROM assignments WHERE id = ?", [task["assignment_id"]])[
                0
            ]
            seen.setdefault(name, []).append(assignment["task_id"])
            labeling.submit(store, name, Submission(task["assignment_id"], ranks=[1, 2, 3]))
    for name, got in seen.items():
        assert len(got) == len(set(got)), f"{name} got a task twice"
    per_task = store.query("SELECT task_id, count(DISTINCT annotator) AS k FROM judgments GROUP BY 1")
    assert sorted(r["k"] for r in per_task) == [2, 2, 2]
    assert {r["task_id"] for r in per_task} == set(tasks)
    assert len(seen["ann1"]) == 3 and len(seen["ann2"]) == 3 and "ann3" not in seen


def test_open_task_is_resumed_and_expired_one_returns_to_the_pool(store: Store) -> None:
    seed_campaign(store, prompts=1, overlap=1)
    first = labeling.next_task(store, "c1", "ann1")
    assert labeling.next_task(store, "c1", "ann1")["assignment_id"] == first["assignment_id"]
    assert labeling.next_task(store, "c1", "ann2") is None  # the only place is taken
    pool = labeling.pool(store)
    pool.clock = lambda: time.time() + 1801  # ann1 walked away: the 30-minute timeout passes
    second = labeling.next_task(store, "c1", "ann2")
    assert second is not None and second["assignment_id"] != first["assignment_id"]
    # a late submit from ann1 is still accepted: an acknowledged judgment is never lost
    labeling.submit(store, "ann1", Submission(first["assignment_id"], best=0, worst=1))
    assert store.count("judgments") == 1


def test_shuffled_order_is_recorded_and_ranks_follow_it(store: Store) -> None:
    seed_campaign(store, prompts=1, overlap=1)
    task = labeling.next_task(store, "c1", "ann1")
    order = store.query("SELECT display_order FROM assignments")[0]["display_order"]
    texts = {g["id"]: g["text"] for g in store.generations(list(order))}
    assert [c["text"] for c in task["completions"]] == [texts[g] for g in order]
    j = labeling.submit(store, "ann1", Submission(task["assignment_id"], ranks=[3, 1, 1]))
    assert j["generation_ids"] == list(order)
    assert j["ranks"] == [2, 1, 1]  # made dense, tie kept
    pairs = store.query("SELECT chosen_id, rejected_id, is_tie FROM judgment_pairs ORDER BY is_tie")
    assert [(p["chosen_id"], p["rejected_id"], p["is_tie"]) for p in pairs] == [
        (order[1], order[0], False),
        (order[2], order[0], False),
        (order[1], order[2], True),
    ]


def test_double_submit_stores_one_judgment(store: Store) -> None:
    seed_campaign(store, prompts=2, overlap=1)
    task = labeling.next_task(store, "c1", "ann1")
    sub = Submission(task["assignment_id"], ranks=[1, 2, 3], idempotency_key="click-1")
    a = labeling.submit(store, "ann1", sub)
    b = labeling.submit(store, "ann1", sub)
    c = labeling.submit(store, "ann1", Submission(task["assignment_id"], ranks=[3, 2, 1]))
    assert a["id"] == b["id"] == c["id"]
    assert store.count("judgments") == 1


@pytest.mark.parametrize(
    ("sub", "message"),
    [
        (dict(ranks=[1, 2]), "2 given for 3 completions"),
        (dict(ranks=[1, 2, 9]), r"from 1 \(best\) to 3"),
        (dict(ranks=[2, 2, 2]), "all completions tied"),
        (dict(best=1, worst=1), "two different positions"),
        (dict(), "no ranking"),
        (dict(ranks=[1, 2, 3], strength=7), "strength"),
        (dict(ranks=[1, 2, 3], flags={0: ["rude"]}), "unknown rude"),
        (dict(ranks=[1, 2, 3], flags={5: ["unsafe"]}), "position 5 is not shown"),
    ],
)
def test_bad_submissions_store_nothing(store: Store, sub: dict, message: str) -> None:
    seed_campaign(store, prompts=1, overlap=1)
    task = labeling.next_task(store, "c1", "ann1")
    with pytest.raises(StoreError, match=message):
        labeling.submit(store, "ann1", Submission(task["assignment_id"], **sub))
    assert store.count("judgments") == 0
    assert store.query("SELECT status FROM assignments")[0]["status"] == "open"


def test_someone_elses_assignment_is_refused(store: Store) -> None:
    seed_campaign(store, prompts=1, overlap=2)
    task = labeling.next_task(store, "c1", "ann1")
    with pytest.raises(StoreError, match="not one of yours"):
        labeling.submit(store, "ann2", Submission(task["assignment_id"], ranks=[1, 2, 3]))


def test_quick_mode_all_bad_flags_edit_and_skip(store: Store) -> None:
    seed_campaign(store, prompts=3, overlap=1)
    t1 = labeling.next_task(store, "c1", "ann1")
    j1 = labeling.submit(
        store,
        "ann1",
        Submission(
            t1["assignment_id"],
            best=2,
            worst=0,
            strength=3,
            flags={0: ["unsafe", "unsafe"]},
            rationale="  third is right ",
            edited_text="An ideal answer.",
        ),
    )
    assert j1["ranks"] == [3, 2, 1] and j1["strength"] == 3
    assert j1["flags"] == {j1["generation_ids"][0]: ["unsafe"]}
    assert j1["rationale"] == "third is right"
    assert j1["edited_text"] == "An ideal answer." and j1["edited_from"] == j1["generation_ids"][2]
    t2 = labeling.next_task(store, "c1", "ann1")
    j2 = labeling.submit(store, "ann1", Submission(t2["assignment_id"], all_bad=True))
    assert j2["all_bad"] and j2["ranks"] == [1, 1, 1]
    t3 = labeling.next_task(store, "c1", "ann1")
    labeling.skip(store, "ann1", t3["assignment_id"])
    assert labeling.next_task(store, "c1", "ann1") is None  # skipped is not handed back
    assert labeling.progress(store, "c1", "ann1")["done"] == 2


def test_campaign_validation(store: Store) -> None:
    seed_campaign(store, prompts=1)
    with pytest.raises(StoreError, match="prompt set 'nope' does not exist"):
        campaigns.create_campaign(store, "c2", prompt_set="nope")
    with pytest.raises(StoreError, match="n=1"):
        campaigns.create_campaign(store, "c2", prompt_set="c1-set", n=1)
    with pytest.raises(StoreError, match="model version 'ghost' is not registered"):
        campaigns.create_campaign(store, "c2", prompt_set="c1-set", model="ghost")
    with pytest.raises(StoreError, match="already exists"):
        campaigns.create_campaign(store, "c1", prompt_set="c1-set")
    with pytest.raises(StoreError, match="campaign name"):
        campaigns.create_campaign(store, "bad name!", prompt_set="c1-set")
    assert campaigns.resolve_model(store, "policy") == "base"


def test_agreement_and_annotator_quality(store: Store) -> None:
    seed_campaign(store, prompts=4, overlap=3)
    # ann1 and ann2 always agree (by text order); ann3 always reverses them
    for name, reverse in (("ann1", False), ("ann2", False), ("ann3", True)):
        while (task := labeling.next_task(store, "c1", name)) is not None:
            by_answer = [int(c["text"].split()[1]) for c in task["completions"]]  # "answer K to ..."
            ranks = [(3 - k if reverse else k + 1) for k in by_answer]
            labeling.submit(store, name, Submission(task["assignment_id"], ranks=ranks))
    agreement = quality.campaign_agreement(store, "c1")
    assert agreement["tasks_with_2plus"] == 4 and agreement["units"] == 12
    assert agreement["pairwise_agreement"] == pytest.approx(1 / 3)
    assert agreement["krippendorff_alpha"] < 0
    per = {q["annotator"]: q for q in quality.annotator_quality(store, "c1")}
    assert per["ann1"]["agreement_with_majority"] is None  # the others split 1-1: no majority...
    assert per["ann3"]["agreement_with_majority"] == 0.0  # ...but ann1 and ann2 outvote ann3
    # answer k is 10*k characters longer: ann1 prefers shorter, ann3 longer
    assert per["ann1"]["length_bias_longer"] == 0.0 and per["ann3"]["length_bias_longer"] == 1.0
    assert per["ann1"]["judgments"] == 4


def test_pool_state_survives_a_restart(store: Store, store_file: StoreFile) -> None:
    """The pool lives in memory; reopening the file must give back the same picture."""
    seed_campaign(store, prompts=3, overlap=1)
    done = labeling.next_task(store, "c1", "ann1")
    labeling.submit(store, "ann1", Submission(done["assignment_id"], ranks=[1, 2, 3]))
    held = labeling.next_task(store, "c1", "ann1")

    store = store_file.reopen()
    assert labeling.next_task(store, "c1", "ann1")["assignment_id"] == held["assignment_id"]  # resumed
    assert labeling.progress(store, "c1", "ann1") | {"done": 1, "remaining": 1} == labeling.progress(
        store, "c1", "ann1"
    )
    other = labeling.next_task(store, "c1", "ann2")  # the last free task, not the judged or held one
    assert other["assignment_id"] not in (done["assignment_id"], held["assignment_id"])
    assert labeling.next_task(store, "c1", "ann2")["assignment_id"] == other["assignment_id"]


def test_a_judgment_whose_assignment_row_was_never_written_rebuilds_it(
    store: Store, store_file: StoreFile
) -> None:
    # Under load the assignment rows are written up to a second after the judgment (see
    # LabelingPool._flush); a crash in between leaves a judgment without its row.
    seed_campaign(store, prompts=2, overlap=1)
    task = labeling.next_task(store, "c1", "ann1")
    judgment = labeling.submit(store, "ann1", Submission(task["assignment_id"], ranks=[2, 1, 3]))
    store = store_file.reopen()
    with store.transaction() as cur:
        cur.execute("DELETE FROM assignments")  # the crash: no assignment row was written

    store = store_file.reopen()
    assert labeling.progress(store, "c1", "ann1")["done"] == 1
    following = labeling.next_task(store, "c1", "ann1")
    assert following is not None and following["assignment_id"] != task["assignment_id"]
    assert labeling.next_task(store, "c1", "ann1")["assignment_id"] == following["assignment_id"]
    store = store_file.reopen()  # the close writes what the load rebuilt
    row = store.query("SELECT * FROM assignments WHERE id = ?", [task["assignment_id"]])[0]
    assert row["status"] == "done" and list(row["display_order"]) == judgment["generation_ids"]


def test_concurrent_annotators_each_task_k_times_nothing_lost(store_file: StoreFile) -> None:
    """Twelve threads label at once through the group commit: the pool's rules hold and every
    acknowledged judgment is in the file after it is closed."""
    store = store_file.store
    names = [f"ann{i}" for i in range(12)]
    make_users(store, *[(n, "annotator") for n in names])
    seed_campaign(store, prompts=30, overlap=3)
    acked: dict[str, list[str]] = {n: [] for n in names}

    def work(name: str) -> None:
        task = labeling.next_task(store, "c1", name)
        while task is not None:
            sub = Submission(task["assignment_id"], ranks=[1, 2, 3])
            judgment, task = labeling.submit_and_next(store, name, sub)
            acked[name].append(judgment["id"])

    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(work, names))

    store = store_file.reopen()
    stored = store.query("SELECT id, task_id, annotator FROM judgments")
    assert {r["id"] for r in stored} == {j for ids in acked.values() for j in ids}
    assert len(stored) == 90  # 30 tasks x overlap 3, all judged
    per_task: dict[str, list[str]] = {}
    for r in stored:
        per_task.setdefault(r["task_id"], []).append(r["annotator"])
    assert all(len(who) == 3 == len(set(who)) for who in per_task.values())
    assert store.query("SELECT count(*) AS n FROM assignments WHERE status = 'done'")[0]["n"] == 90


def test_polling_annotators_get_every_task_as_the_sampler_adds_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/feeding.py's starved annotators: tasks arrive one at a time (stored and offered
    as the task sampler does) while twelve annotators poll, judge and sometimes skip. No ask is
    answered "none" while a task they never had has a free place, and no task is left ready."""
    names = [f"poller{i}" for i in range(12)]
    make_users(store, *[(n, "annotator") for n in names])
    store.register_model_version("base", path="/models/base", content_hash="h" * 64, source="test")
    campaigns.ensure_policy_alias(store, "base")
    msgs = [[{"role": "user", "content": f"question {i}?"}] for i in range(24)]
    items = [ImportedPrompt(f"row {i}", m, messages_hash(m)) for i, m in enumerate(msgs)]
    store.import_prompts("drip-set", items, source="test")
    campaigns.create_campaign(store, "drip", prompt_set="drip-set", n=2, overlap=2)

    missed: list[tuple[str, int]] = []
    take = labeling_state.PoolState.take

    def checked(self: labeling_state.PoolState, name: str, annotator: str, timeout_s: float) -> Any:
        taken = take(self, name, annotator, timeout_s)
        if taken is None:  # under the pool's lock: nothing may have a place for them
            state, now = self.campaigns[name], self.clock()
            free = [t for t in state.tasks if t.taken(now) < state.overlap and annotator not in t.holders]
            if free:
                missed.append((annotator, len(free)))
        return taken

    monkeypatch.setattr(labeling_state.PoolState, "take", checked)
    labeling.progress(store, "drip")  # loaded, as the sampler's first count loads it
    deadline = time.monotonic() + 30

    def done() -> bool:
        return labeling.progress(store, "drip")["judgments"] == 48 or time.monotonic() > deadline

    def produce() -> None:
        for prompt in store.prompts("drip-set"):
            add_sampled_task(store, "drip", prompt, ["one", "two"])
            time.sleep(0.005)

    def annotate(name: str) -> None:
        seen = 0
        task = labeling.next_task(store, "drip", name)
        while not done():
            if task is None:
                time.sleep(0.002)
                task = labeling.next_task(store, "drip", name)
                continue
            seen += 1
            if seen % 5 == 0:
                labeling.skip(store, name, task["assignment_id"])
                task = labeling.next_task(store, "drip", name)
            else:
                sub = Submission(task["assignment_id"], ranks=[1, 2])
                task = labeling.submit_and_next(store, name, sub)[1]
        if task is not None:
            labeling.skip(store, name, task["assignment_id"])

    with ThreadPoolExecutor(len(names) + 1) as workers:
        list(workers.map(lambda f: f(), [produce, *[partial(annotate, n) for n in names]]))

    counts = labeling.progress(store, "drip")
    assert counts["judgments"] == 48 and counts["tasks_sampled"] == 24  # all judged, in time
    assert counts["ready"] == 0
    assert missed == []


def test_a_key_reused_for_another_assignment_is_refused_and_stores_nothing(store: Store) -> None:
    # Answering with the key's old judgment would acknowledge a judgment that was never stored
    # (found by tests/fuzz_rest.py: two fuzzed bodies drew the same key).
    seed_campaign(store, prompts=2, overlap=1)
    first = labeling.next_task(store, "c1", "ann1")
    stored = labeling.submit(
        store, "ann1", Submission(first["assignment_id"], ranks=[1, 2, 3], idempotency_key="k")
    )
    second = labeling.next_task(store, "c1", "ann1")
    with pytest.raises(StoreError, match=r"idempotency_key already stands for your judgment of assignment"):
        labeling.submit(
            store, "ann1", Submission(second["assignment_id"], ranks=[3, 2, 1], idempotency_key="k")
        )
    assert store.count("judgments") == 1
    assert labeling.next_task(store, "c1", "ann1")["assignment_id"] == second["assignment_id"]  # still open
    # the retry of the first judgment still answers with it
    again = labeling.submit(
        store, "ann1", Submission(first["assignment_id"], ranks=[3, 2, 1], idempotency_key="k")
    )
    assert again["id"] == stored["id"] and again["ranks"] == [1, 2, 3]


def test_a_key_reused_from_another_campaign_is_refused(store: Store, store_file: StoreFile) -> None:
    # The key is unknown to the pool (its campaign is not loaded), so the database's unique
    # constraint catches it: the caller is told, the pool takes its change back.
    seed_campaign(store, name="c1", prompts=1, overlap=1)
    seed_campaign(store, name="c2", prompts=1, overlap=1)
    first = labeling.next_task(store, "c1", "ann1")
    stored = labeling.submit(
        store, "ann1", Submission(first["assignment_id"], ranks=[1, 2, 3], idempotency_key="k")
    )
    store = store_file.reopen()
    other = labeling.next_task(store, "c2", "ann1")
    with pytest.raises(StoreError, match=f"your judgment of assignment '{first['assignment_id']}'"):
        labeling.submit(
            store, "ann1", Submission(other["assignment_id"], ranks=[3, 2, 1], idempotency_key="k")
        )
    assert store.query("SELECT id FROM judgments")[0]["id"] == stored["id"] and store.count("judgments") == 1
    assert labeling.progress(store, "c2", "ann1")["done"] == 0
    assert labeling.next_task(store, "c2", "ann1")["assignment_id"] == other["assignment_id"]  # still open


def test_a_judged_assignment_left_open_by_a_crash_is_marked_done_on_load(
    store: Store, store_file: StoreFile
) -> None:
    # Under load an assignment's "done" follows its judgment by up to a second (see
    # LabelingPool._flush); a crash in between leaves the judgment with its row still open.
    seed_campaign(store, prompts=2, overlap=1)
    task = labeling.next_task(store, "c1", "ann1")
    labeling.submit(store, "ann1", Submission(task["assignment_id"], ranks=[2, 1, 3]))
    store = store_file.reopen()
    with store.transaction() as cur:  # the crash: the judged row was never updated
        cur.execute("UPDATE assignments SET status = 'open' WHERE id = ?", [task["assignment_id"]])

    store = store_file.reopen()
    assert labeling.progress(store, "c1", "ann1")["done"] == 1  # loads the campaign
    store = store_file.reopen()  # the close writes what the load repaired
    row = store.query("SELECT status FROM assignments WHERE id = ?", [task["assignment_id"]])[0]
    assert row["status"] == "done"
    assert not store.query("SELECT 1 FROM assignments WHERE status = 'open'")


# POST /judgments runs on the event loop and takes the pool's lock: no query may hold it up.
class Gate:
    """Wraps a database read of the pool: its first call is held until released, and the
    order of what happened meanwhile is recorded."""

    def __init__(self, real: Callable[..., Any], events: list[str]):
        self.real, self.events = real, events
        self.entered, self.release = threading.Event(), threading.Event()
        self.armed = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.armed = False
            self.events.append("query held")
            self.entered.set()
            self.release.wait(10)  # if the loop waits on this query, it waits until here
            self.events.append("query done")
        return self.real(*args, **kwargs)


def judge_on_a_loop(store: Store, annotator: str, assignment_id: str) -> dict:
    """A judgment the way POST /judgments makes it: begin_submit on an event loop, the commit
    awaited. (The loop runs in a thread of its own, as in the REST test below.)"""

    async def scenario() -> dict:
        sub = Submission(assignment_id, ranks=[1, 2, 3])
        committed, finish = labeling.begin_submit(store, annotator, sub, then_next=True)
        await asyncio.wrap_future(committed)
        return finish()[0]

    with ThreadPoolExecutor(1) as runner:
        return runner.submit(asyncio.run, scenario()).result()


def judge_while_held(
    gate: Gate, work: Callable[[], object], store: Store, annotator: str, assignment_id: str
) -> dict:
    """Run `work` in a thread until `gate` holds its query, judge on a loop meanwhile, then
    let the query go. The gate's events say whether the judgment had to wait for it."""
    thread = threading.Thread(target=work)
    thread.start()
    assert gate.entered.wait(10)
    judgment = judge_on_a_loop(store, annotator, assignment_id)
    gate.events.append("judged")
    gate.release.set()
    thread.join()
    return judgment


def extra_prompt(store: Store, set_name: str) -> dict:
    msgs = [{"role": "user", "content": "one more question?"}]
    store.import_prompts(set_name, [ImportedPrompt("extra", msgs, messages_hash(msgs))], source="test")
    return store.prompts(set_name)[-1]


def test_a_task_added_with_a_slow_query_does_not_hold_up_judgments_on_the_loop(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_campaign(store, name="c1", prompts=2, overlap=1)
    seed_campaign(store, name="c2", prompts=1, overlap=1)
    task = labeling.next_task(store, "c1", "ann1")
    assert labeling.progress(store, "c2")["tasks_sampled"] == 1  # both loaded
    prompt = extra_prompt(store, "c2-set")
    events: list[str] = []
    gate = Gate(labeling_store.read_content, events)
    monkeypatch.setattr(labeling_store, "read_content", gate)
    add = partial(add_sampled_task, store, "c2", prompt, ["x", "y", "z"])  # held in task_added
    judgment = judge_while_held(gate, add, store, "ann1", task["assignment_id"])
    assert events == ["query held", "judged", "query done"]
    assert judgment["campaign"] == "c1"
    assert labeling.progress(store, "c2")["tasks_sampled"] == 2  # the new task still arrived
    assert labeling.next_task(store, "c2", "ann2")["completions"]  # with its texts


def test_a_campaign_loading_in_another_thread_does_not_hold_up_judgments_on_the_loop(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_campaign(store, name="c1", prompts=2, overlap=1)
    seed_campaign(store, name="c2", prompts=1, overlap=1)
    task = labeling.next_task(store, "c1", "ann1")  # c1 is loaded, c2 not yet
    events: list[str] = []
    gate = Gate(labeling_store.read_campaign, events)
    monkeypatch.setattr(labeling_store, "read_campaign", gate)
    load = partial(labeling.progress, store, "c2")  # c2's first use: held while it loads
    judgment = judge_while_held(gate, load, store, "ann1", task["assignment_id"])
    assert events == ["query held", "judged", "query done"]
    assert judgment["campaign"] == "c1"
    assert labeling.progress(store, "c2")["tasks_sampled"] == 1


def test_a_judgment_on_the_loop_for_a_campaign_not_loaded_loads_it_in_a_worker(
    store: Store, store_file: StoreFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_campaign(store, prompts=2, overlap=1)
    task = labeling.next_task(store, "c1", "ann1")
    store = store_file.reopen()  # a restart: the pool knows no assignment yet
    events: list[str] = []
    gate = Gate(labeling_store.read_campaign, events)
    monkeypatch.setattr(labeling_store, "read_campaign", gate)

    async def scenario() -> tuple[dict, dict | None]:
        sub = Submission(task["assignment_id"], ranks=[1, 2, 3])
        committed, finish = labeling.begin_submit(store, "ann1", sub, then_next=True)
        events.append("begin_submit returned")  # while the load is held, if it is off the loop
        assert await asyncio.to_thread(gate.entered.wait, 10)
        gate.release.set()
        await asyncio.wrap_future(committed)
        return finish()

    with ThreadPoolExecutor(1) as runner:
        judgment, following = runner.submit(asyncio.run, scenario()).result()
    assert events.index("begin_submit returned") < events.index("query done")
    assert judgment["assignment_id"] == task["assignment_id"]
    assert following is not None and following["assignment_id"] != task["assignment_id"]
    assert labeling.progress(store, "c1", "ann1")["done"] == 1


def test_a_committed_judgment_lets_go_of_its_commit_future(store: Store) -> None:
    """The pool keeps each idempotency key for the process's life; once its judgment is
    committed it must not keep the commit's future (with its lock, condition and the loop's
    callbacks): held per judgment, they made every full garbage collection pass longer."""
    seed_campaign(store, prompts=2, overlap=1)
    task = labeling.next_task(store, "c1", "ann1")
    futures: list[weakref.ref] = []

    async def scenario() -> dict:
        sub = Submission(task["assignment_id"], ranks=[1, 2, 3], idempotency_key="k-loop")
        committed, finish = labeling.begin_submit(store, "ann1", sub, then_next=True)
        futures.append(weakref.ref(committed))
        await asyncio.wrap_future(committed)
        return finish()[0]

    with ThreadPoolExecutor(1) as runner:
        judgment = runner.submit(asyncio.run, scenario()).result()
    gc.collect()
    assert futures[0]() is None
    # a retry still answers with the stored judgment
    again = labeling.submit(
        store, "ann1", Submission(task["assignment_id"], ranks=[3, 2, 1], idempotency_key="k-loop")
    )
    assert again["id"] == judgment["id"] and again["ranks"] == [1, 2, 3]


def test_rest_judgments_commit_without_the_write_lock(tmp_path: Path) -> None:
    """POST /judgments writes its batch off the event loop (BatchWriter's awaited lane), and
    never waits for the store's write lock: while another thread holds it (a long import)
    judgments are still stored and answered. (Its loop runs in a thread of its own:
    Playwright's sync API, used by the session's browser fixture, keeps a running loop on the
    main thread.)"""
    settings = Settings(data_dir=tmp_path, ui=False)
    studio = Studio(settings)
    studio.store = Store(settings.db_path)
    tokens = make_users(studio.store, *[(f"ann{i}", "annotator") for i in range(6)])
    seed_campaign(studio.store, prompts=10, overlap=3)
    app = create_app(settings, studio)
    transport = httpx.ASGITransport(app=app)

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(transport=transport, base_url="http://studio") as client:

            async def first_task(name: str) -> dict:
                headers = {"Authorization": f"Bearer {tokens[name]}"}
                return (await client.post("/api/v1/campaigns/c1/next", headers=headers)).json()["task"]

            async def label(name: str, rounds: int, task: dict | None = None) -> list[str]:
                headers = {"Authorization": f"Bearer {tokens[name]}"}
                task = task or await first_task(name)
                ids = []
                for _ in range(rounds):
                    body = {"assignment_id": task["assignment_id"], "ranks": [1, 2, 3], "next": True}
                    r = await client.post("/api/v1/judgments", json=body, headers=headers)
                    assert r.status_code == 200, r.text
                    ids.append(r.json()["judgment"]["id"])
                    task = r.json()["next"]["task"]
                return ids

            acked = [j for ids in await asyncio.gather(*[label(f"ann{i}", 3) for i in range(5)]) for j in ids]

            held, release = threading.Event(), threading.Event()

            def hold_write_lock() -> None:
                with studio.store.transaction():
                    held.set()
                    release.wait(10)

            task = await first_task("ann5")  # handing out a task waits for its row, so before the lock
            holder = threading.Thread(target=hold_write_lock)
            holder.start()
            held.wait(10)
            try:
                acked += await asyncio.wait_for(label("ann5", 1, task), 5)  # while the lock is held
            finally:
                release.set()
                holder.join()
        return acked

    with ThreadPoolExecutor(1) as runner:  # a thread of its own: see the docstring
        acked = runner.submit(asyncio.run, scenario()).result()
    studio.store.close()

    store = Store(settings.db_path)
    assert {r["id"] for r in store.query("SELECT id FROM judgments")} == set(acked)
    assert len(acked) == 16
    done = store.query("SELECT count(*) AS n FROM assignments WHERE status = 'done'")[0]["n"]
    assert done == 16  # the assignment rows followed from the backlog by the close
    store.close()
