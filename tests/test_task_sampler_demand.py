"""The task sampler sizes buffers from demand and keeps in flight what the server's curve says.

A real store file, the real Sampler and labeling code; the model server is a small in-process
stand-in that answers chat requests after a delay, so the test is about the sampler's rules
(the real vLLM is exercised by the live tests and benchmarks/sampling.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from studio import campaigns, labeling, task_sampler
from studio import services as svc
from studio.buffering import FLOOR_TASKS, pick_concurrency
from studio.importer import ImportedPrompt, messages_hash
from studio.labeling import Submission
from studio.probe import ProbeStopped, probe_concurrency
from studio.sampling import Sampler
from studio.serving.client import ChatResult, Completion, SamplingParams
from studio.store import Store
from studio.task_sampler import SEEDED_PREFILL_BUDGET, TaskSampler, prompt_tokens
from studio.users import User
from tests.helpers import add_sampled_task, make_users


class SlowServer:
    """Answers after `base + per_seq * sequences in flight` seconds per token: a batching
    server whose throughput saturates as more sequences run at once. With `slots`, at most that
    many requests run at once and the rest queue (vLLM's max_num_seqs): throughput flattens."""

    def __init__(self, base: float = 0.002, per_seq: float = 0.001, tokens: int = 8, slots: int = 0):
        self.base, self.per_seq, self.tokens = base, per_seq, tokens
        self.slots = threading.BoundedSemaphore(slots) if slots else contextlib.nullcontext()
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.requests: list[int] = []

    def chat(self, model: str, messages: list[dict[str, str]], params: SamplingParams) -> ChatResult:
        with self.slots:
            return self._run(params)

    def _run(self, params: SamplingParams) -> ChatResult:
        with self.lock:
            self.now += params.n
            self.most = max(self.most, self.now)
            self.requests.append(params.n)
            load = self.now
        try:
            tokens = min(params.max_tokens, self.tokens)
            time.sleep(tokens * (self.base + self.per_seq * load))
            completions = [Completion(i, f"answer {i}", "length", 5, tokens) for i in range(params.n)]
            return ChatResult(completions, 1.0, {})
        finally:
            with self.lock:
                self.now -= params.n


def campaign(
    store: Store, name: str, prompts: int, n: int = 2, overlap: int = 1, seed: int | None = None, pad: int = 0
) -> None:
    if not store.query("SELECT 1 FROM model_versions WHERE name = 'base'"):
        store.register_model_version("base", path="/m", content_hash="h" * 64, source="test")
        campaigns.ensure_policy_alias(store, "base")
    items = []
    for i in range(prompts):
        msgs = [{"role": "user", "content": f"{name} question {i}? " + "x" * pad}]
        items.append(ImportedPrompt(f"row {i}", msgs, messages_hash(msgs)))
    store.import_prompts(f"{name}-set", items, source="test")
    campaigns.create_campaign(store, name, prompt_set=f"{name}-set", n=n, overlap=overlap, seed=seed)


def judged_recently(store: Store, name: str, annotators: int, seconds: float) -> None:
    """Each annotator took a task of the campaign and judged it just now, after `seconds` on it."""
    people = [f"{name}-ann{a}" for a in range(annotators)]
    make_users(store, *[(p, "annotator") for p in people])
    for prompt in store.prompts(f"{name}-set")[:annotators]:
        add_sampled_task(store, name, prompt, ["one", "two"])
    for p in people:
        task = labeling.next_task(store, name, p)
        assert task is not None
        labeling.submit(store, p, Submission(task["assignment_id"], ranks=[1, 2]), time.time() - seconds)


@pytest.fixture()
def server() -> SlowServer:
    return SlowServer()


@pytest.fixture()
def running(store: Store, server: SlowServer) -> Iterator[list[TaskSampler]]:
    made: list[TaskSampler] = []
    yield made
    for ts in made:
        ts.stop()


def start(store: Store, server: SlowServer, made: list[TaskSampler], **kwargs) -> TaskSampler:
    ts = TaskSampler(store, Sampler(store, server), interval=0.05, **kwargs)
    made.append(ts)
    ts.start()
    return ts


def settle(ts: TaskSampler, names: list[str], timeout: float = 30.0) -> dict:
    """Wait until every campaign's buffer is at its target and nothing is in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ts.overview()
        camps = state["campaigns"]
        if (
            all(
                n in camps and "target" in camps[n] and camps[n]["ready"] >= camps[n]["target"] for n in names
            )
            and state["in_flight_now"] == 0
        ):
            time.sleep(0.3)  # one more round: nothing more may be sampled
            return ts.overview()
        time.sleep(0.05)
    raise AssertionError(f"buffers did not fill: {ts.overview()}")


def test_the_buffer_follows_active_annotators_and_their_pace(
    store: Store, server: SlowServer, running: list[TaskSampler]
) -> None:
    campaign(store, "busy", prompts=40)
    campaign(store, "cold", prompts=40)
    judged_recently(store, "busy", annotators=6, seconds=20)
    ts = start(store, server, running, in_flight=8)
    camps = settle(ts, ["busy", "cold"])["campaigns"]
    assert camps["busy"]["workers"] == 6 and camps["busy"]["pace_s"] == pytest.approx(20, abs=0.5)
    assert camps["cold"]["workers"] == 0 and camps["cold"]["target"] == FLOOR_TASKS
    assert camps["busy"]["target"] >= 6  # one in hand for each active annotator
    assert camps["busy"]["ready"] >= camps["busy"]["target"]  # (more while the lead time was unknown)
    assert camps["cold"]["ready"] == FLOOR_TASKS
    assert camps["busy"]["expected_wait_s"] == 0.0  # the stand-in server outpaces 6 annotators
    assert store.count("tasks") == 6 + camps["busy"]["ready"] + camps["cold"]["ready"]  # 6 judged


def test_holding_a_task_counts_and_pace_falls_back_to_the_hand_out_time(
    store: Store, server: SlowServer, running: list[TaskSampler]
) -> None:
    campaign(store, "held", prompts=40)
    people = [f"held-ann{a}" for a in range(5)]
    make_users(store, *[(p, "annotator") for p in people])
    for prompt in store.prompts("held-set")[:5]:
        add_sampled_task(store, "held", prompt, ["one", "two"])
    tasks = {p: labeling.next_task(store, "held", p) for p in people}
    time.sleep(1.5)
    # two judge without saying when the task was shown (the time it was handed out counts)
    for p in people[:2]:
        labeling.submit(store, p, Submission(tasks[p]["assignment_id"], ranks=[1, 2]))
    camps = settle(start(store, server, running, in_flight=8), ["held"])["campaigns"]
    assert camps["held"]["workers"] == 5  # 3 hold a task, 2 just judged
    assert 1.0 <= camps["held"]["pace_s"] < 10


class GatedServer(SlowServer):
    """A SlowServer whose answers wait until `gate` is set: nothing sampled gets ready meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def chat(self, model: str, messages: list[dict[str, str]], params: SamplingParams) -> ChatResult:
        self.gate.wait(30)
        return super().chat(model, messages, params)


@pytest.fixture()
def dry(tmp_path: Path) -> Iterator[tuple[svc.OfflineContext, GatedServer]]:
    """A context whose task sampler's requests hang until the test ends: asks find no task."""
    ctx = svc.OfflineContext(tmp_path)
    gated = GatedServer()
    yield ctx, gated
    gated.gate.set()
    if ctx.task_sampler is not None:
        ctx.task_sampler.stop()
    ctx.close()


def test_annotators_waiting_without_a_task_count_in_demand(
    dry: tuple[svc.OfflineContext, GatedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Who asked and got none holds nothing and judged nothing, yet is the demand that matters
    most: counted beside the annotators the store knows, once each, for the same window."""
    ctx, gated = dry
    store = ctx.store
    assert store is not None
    monkeypatch.setattr(task_sampler, "DEMAND_EVERY_S", 0.1)
    campaign(store, "dry", prompts=40)
    judged_recently(store, "dry", annotators=2, seconds=20)  # their tasks are used up
    waiting = [f"dry-wait{i}" for i in range(5)]
    make_users(store, *[(p, "annotator") for p in waiting])
    ts = ctx.task_sampler = TaskSampler(store, Sampler(store, gated), interval=0.05, in_flight=4)
    ts.start()
    for _ in range(2):  # asking again is still one worker
        for p in waiting:
            got = svc.next_task(ctx, User(p, "annotator"), "dry")
            assert got["task"] is None and got["status"] == "no_server"

    def dry_state() -> dict:
        return ts.overview()["campaigns"].get("dry", {})

    until(lambda: dry_state().get("workers") == 7)
    assert dry_state()["workers"] == 7  # 2 who judged + 5 waiting
    assert dry_state()["target"] >= 7  # a task in hand for each of them
    # the window ends for both alike: with a window of 0 s every judgment and ask is past it
    monkeypatch.setattr(task_sampler, "ACTIVE_WINDOW_S", 0)
    until(lambda: dry_state().get("workers") == 0)
    assert dry_state()["workers"] == 0


@pytest.mark.parametrize(
    ("prompts", "in_flight", "every_s"),
    [(40, 4, task_sampler.ROUND_EVERY_S), (2, 64, task_sampler.POKE_GAP_S)],
    ids=["requests-at-the-level", "nothing-left-to-send"],
)
def test_a_burst_of_no_task_asks_runs_few_sampler_rounds(
    dry: tuple[svc.OfflineContext, GatedServer], prompts: int, in_flight: int, every_s: float
) -> None:
    """Every "no task" answer pokes the sampler, but a round that cannot send anything is not
    run for each: while the requests in flight fill the level, only the interval's rounds run;
    else (here: every prompt is being sampled) one per POKE_GAP_S at most. The demand query
    keeps its own pace, starved or not."""
    ctx, gated = dry
    store = ctx.store
    assert store is not None
    campaign(store, "rush", prompts=prompts)  # n=2
    people = [User(f"rush-ann{i}", "annotator") for i in range(8)]
    make_users(store, *[(u.name, "annotator") for u in people])
    ts = ctx.task_sampler = TaskSampler(store, Sampler(store, gated), in_flight=in_flight)  # default interval
    counts = {"rounds": 0, "demand": 0}

    def counted(fn: Callable[[], object], key: str) -> Callable[[], object]:
        def wrapper() -> object:
            counts[key] += 1
            return fn()

        return wrapper

    ts._tick = counted(ts._tick, "rounds")  # type: ignore[method-assign]
    ts._measure_demand = counted(ts._measure_demand, "demand")  # type: ignore[method-assign,assignment]
    ts.start()
    until(lambda: ts.overview()["in_flight_now"] == min(in_flight, 2 * prompts))
    assert ts.overview()["in_flight_now"] == min(in_flight, 2 * prompts)
    time.sleep(0.2)  # the round that sent them is over
    rounds, demand = counts["rounds"], counts["demand"]
    asks, burst_s = 0, 1.5
    start_at = time.monotonic()
    while time.monotonic() - start_at < burst_s:
        for user in people:
            got = svc.next_task(ctx, user, "rush")
            assert got["task"] is None and got["status"] != "done"
            asks += 1
        time.sleep(0.01)  # 8 annotators asking every 10 ms: far more often than any client polls
    took = time.monotonic() - start_at
    assert asks >= 100, asks  # a burst (about 1,100 on a quiet machine): each poked the sampler, starved
    assert counts["rounds"] - rounds <= took / every_s + 1, (counts, asks)
    assert counts["demand"] - demand <= 1, (counts, asks)  # every DEMAND_EVERY_S, starved or not
    until(lambda: ts.overview()["campaigns"]["rush"].get("workers") == 8)
    assert ts.overview()["campaigns"]["rush"]["workers"] == 8  # the waiting all count


def test_two_campaigns_share_a_memory_cap_by_demand(
    store: Store, server: SlowServer, running: list[TaskSampler]
) -> None:
    campaign(store, "big", prompts=60)
    campaign(store, "small", prompts=60)
    judged_recently(store, "big", annotators=30, seconds=10)
    judged_recently(store, "small", annotators=10, seconds=10)
    ts = start(store, server, running, in_flight=8, memory_cap=64)  # 32 tasks of n=2
    camps = settle(ts, ["big", "small"])["campaigns"]
    big, small = camps["big"]["target"], camps["small"]["target"]
    assert 2 * (big + small) <= 64
    assert big + small >= 30  # the cap is used
    # past the floors, three times the demand has three times the buffer: 2 + 21 and 2 + 7
    assert big - FLOOR_TASKS == pytest.approx(3 * (small - FLOOR_TASKS), abs=1), repr(camps)


def test_in_flight_stays_at_the_level_and_n_goes_in_one_request(
    store: Store, server: SlowServer, running: list[TaskSampler]
) -> None:
    campaign(store, "wide", prompts=30, n=4)
    judged_recently(store, "wide", annotators=20, seconds=5)
    ts = start(store, server, running, in_flight=8)
    settle(ts, ["wide"])
    assert server.most <= 8
    assert server.most == 8  # it does fill the level: two requests of 4 at once
    assert set(server.requests) == {4}  # one request per prompt carries its n completions


def test_seeded_requests_keep_their_prompts_under_the_prefill_budget(
    store: Store, server: SlowServer, running: list[TaskSampler]
) -> None:
    # ~140 prompt tokens x n=2 per request: 4 requests fit SEEDED_PREFILL_BUDGET's 1,200, not 5
    campaign(store, "seeded", prompts=30, n=2, seed=7, pad=280)
    judged_recently(store, "seeded", annotators=20, seconds=5)
    ts = start(store, server, running, in_flight=32)
    settle(ts, ["seeded"])
    per_request = prompt_tokens([{"content": "seeded question 10? " + "x" * 280}]) * 2
    assert 4 * per_request <= SEEDED_PREFILL_BUDGET < 5 * per_request
    assert server.most == 8  # 4 requests of 2, though 32 sequences were allowed


def test_the_probe_curve_sets_the_level(store: Store, running: list[TaskSampler]) -> None:
    # A fixed cost per token ten times the cost per sequence in flight, and 16 slots: 8 in
    # flight run 4.9x as fast as 1, and past 16 the rate is flat, so the knee is clear. The
    # fixture's server (2:1, no slots) gave 2.4x and a curve still rising at 64; on a CI machine
    # busy with the vLLM lane, eight threads waking late from their sleeps measured 1.9x.
    server = SlowServer(base=0.01, per_seq=0.001, slots=16)
    curve = probe_concurrency(server, "base", levels=(1, 2, 4, 8, 16, 32, 64), max_tokens=8)
    rates = [p["tok_s"] for p in curve]
    assert [p["in_flight"] for p in curve] == [1, 2, 4, 8, 16, 32, 64]
    assert rates[3] > 2 * rates[0]  # batching pays at first...
    assert rates[-1] < 1.5 * rates[-2]  # ...and saturates
    campaign(store, "c", prompts=10)
    ts = start(store, server, running, probe=lambda: curve)
    deadline = time.monotonic() + 10
    while ts.curve is None and time.monotonic() < deadline:
        time.sleep(0.05)
    expected = pick_concurrency([(p["in_flight"], p["tok_s"]) for p in curve])
    assert ts.in_flight == expected and 1 < expected < 64
    assert ts.overview()["curve"] == curve


CURVE = [{"in_flight": 1.0, "tok_s": 10.0}, {"in_flight": 4.0, "tok_s": 30.0}]


def held_probe() -> tuple[Callable[[], list[dict[str, float]]], threading.Event]:
    """A probe that returns CURVE once the event is set (up to 10 s)."""
    release = threading.Event()

    def probe() -> list[dict[str, float]]:
        release.wait(10)
        return CURVE

    return probe, release


def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_start_probe_is_shown_while_it_runs(
    store: Store, server: SlowServer, running: list[TaskSampler]
) -> None:
    probe, release = held_probe()
    ts = start(store, server, running, probe=probe)
    until(lambda: ts.measuring)
    assert ts.overview()["measuring"] is True and ts.curve is None
    release.set()
    until(lambda: not ts.measuring)
    assert not ts.measuring and ts.curve == CURVE


def test_a_probe_gives_up_at_the_next_round_once_the_studio_stops(server: SlowServer) -> None:
    """A Ctrl-C during the start's probe: the probe stops before its next round (a studio's
    stop no longer waits for the whole half minute), and no curve comes out of it."""
    stop = threading.Event()
    levels = (1, 2, 4, 8, 16, 32, 64)
    seen: list[int] = []

    def one_round(model: str, messages: list[dict[str, str]], params: SamplingParams) -> ChatResult:
        seen.append(1)
        if len(seen) == 4:  # the warm-up, then the rounds of 1 and 2: the studio stops now
            stop.set()
        return SlowServer.chat(server, model, messages, params)

    server.chat = one_round  # type: ignore[method-assign]
    with pytest.raises(ProbeStopped, match="stopped before the round of 4 in flight"):
        probe_concurrency(server, "base", levels=levels, max_tokens=8, stop=stop)
    assert len(seen) == 4 < 1 + sum(levels)


def test_a_probe_on_demand_is_shown_while_it_runs(
    store: Store, server: SlowServer, running: list[TaskSampler]
) -> None:
    """`measure` (after the switch to runtime LoRA): the overview and the Admin line say so while
    the probe runs, and stop saying it once its curve is in use."""
    from studio.ui.admin import sampler_summary

    ts = start(store, server, running)
    probe, release = held_probe()
    worker = threading.Thread(target=ts.measure, args=(probe,))
    worker.start()
    until(lambda: ts.measuring)
    assert ts.overview()["measuring"] is True
    assert "Measuring the model server's throughput now" in sampler_summary(ts.overview())
    release.set()
    worker.join(10)
    assert ts.overview()["measuring"] is False and ts.curve == CURVE
    assert "Measuring" not in sampler_summary(ts.overview())


def test_the_admin_tab_shows_buffer_rate_and_wait(tmp_path: Path, server: SlowServer) -> None:
    import gradio as gr

    from studio import services as svc
    from studio.ui import build_ui

    ctx = svc.OfflineContext(tmp_path)
    store = ctx.store
    assert store is not None
    make_users(store, ("boss", "admin"), ("ann", "annotator"))
    campaign(store, "shown", prompts=20)
    judged_recently(store, "shown", annotators=3, seconds=30)
    demo = build_ui(ctx)
    ctx.task_sampler = TaskSampler(store, Sampler(store, server), interval=0.05, in_flight=4)
    ctx.task_sampler.start()
    try:
        settle(ctx.task_sampler, ["shown"])
        fn = next(f for f in demo.fns.values() if f.api_name == "admin_sampler")
        summary, table = fn.fn(gr.Request(username="boss"))
        row = table.set_index("campaign").loc["shown"]
        assert row["workers"] == 3 and row["pace_s"] == pytest.approx(30, abs=1)
        assert row["ready"] >= row["buffer_target"] >= 3
        assert row["demand_tasks_min"] == pytest.approx(6.0) and row["expected_wait_s"] == 0.0
        assert row["supply_tasks_min"] > 0 and row["sampler"] == "ok"
        assert "Sequences in flight" in summary and "of 4" in summary
        with pytest.raises(gr.Error, match="may not admin"):
            fn.fn(gr.Request(username="ann"))
        measure = next(f for f in demo.fns.values() if f.api_name == "admin_measure_serving")
        with pytest.raises(gr.Error, match="needs a running studio"):
            measure.fn(gr.Request(username="boss"))  # no model server here
    finally:
        ctx.task_sampler.stop()
        ctx.close()


def test_a_measured_curve_is_kept_per_server_model_and_lora(tmp_path: Path) -> None:
    from studio.probe import curve_file, curve_key, load_curve, save_curve

    path = curve_file(tmp_path)
    plain, lora = curve_key(None, "h1", False), curve_key(None, "h1", True)
    assert load_curve(path, plain) is None  # nothing measured yet
    save_curve(path, plain, [{"in_flight": 1, "tok_s": 10.0}])
    save_curve(path, lora, [{"in_flight": 1, "tok_s": 7.0}])
    assert load_curve(path, plain) == [{"in_flight": 1, "tok_s": 10.0}]
    assert load_curve(path, lora) == [{"in_flight": 1, "tok_s": 7.0}]
    assert load_curve(path, curve_key("http://gpu:8000", "h1", False)) is None
    path.write_text("{not json")
    assert load_curve(path, plain) is None  # a broken file means: measure again
