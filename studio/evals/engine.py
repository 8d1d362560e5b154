"""Evaluate a version against another: run the suites (or reuse cached runs), compare, gate, store.

`evaluate` does the work and returns the comparison; `start_eval` records an evaluation and runs
it on the store's evaluation worker (one at a time), so a REST route can answer with its id at
once; `get_eval` and `list_evals` read them back. Every number traces to stored item outputs:
evals -> details.suites[*].version_run/against_run -> eval_runs -> eval_items.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import duckdb
import pandas as pd

from studio import campaigns as camp
from studio.evals import gate as gating
from studio.evals.judge import Judge, JudgeError, JudgeSpec, judge_human_agreement
from studio.evals.runners import RUNNERS, Context, EvalCancelled, ItemResult, limited
from studio.evals.stats import compare
from studio.evals.suites import Suite, pick_suites
from studio.serving.client import OpenAIChatBackend
from studio.store import Store, StoreError, decode_json_columns, new_id

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
DEFAULT_CONCURRENCY = 32


class EvalError(ValueError):
    """An evaluation cannot start: the message names the input that is wrong."""


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    """Everything an evaluation needs, checked before anything is stored."""

    version: str
    against: str
    suites: list[Suite]
    seed: int
    judge: JudgeSpec | None
    temperature: float | None
    limit: int | None
    refusal_judge: bool
    waived: bool
    gate: gating.GateConfig

    def settings(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "limit": self.limit,
            "judge": self.judge.as_dict() if self.judge else None,
            "refusal_judge": self.refusal_judge,
            "waived": self.waived,
            "gate": self.gate.as_dict(),
        }


def lineage_root(store: Store, name: str) -> str:
    """The first version of `name`'s lineage (the base it was first trained from); `name` itself
    for a version without a parent."""
    seen = set()
    version = store.model_version(name)
    while version["parent"] and version["name"] not in seen:
        seen.add(version["name"])
        version = store.model_version(version["parent"])
    return version["name"]


def plan_eval(
    store: Store,
    backend: OpenAIChatBackend | None,
    version: str,
    against: str | None = None,
    suites: list[str] | None = None,
    seed: int = 0,
    judge: JudgeSpec | dict[str, Any] | None = None,
    *,
    temperature: float | None = None,
    limit: int | None = None,
    refusal_judge: bool = False,
    waived: bool = False,
    gate: gating.GateConfig | None = None,
) -> Plan:
    """Check the request; raise EvalError naming the bad input. Stores nothing."""
    try:
        name = camp.resolve_model(store, version)
        store.model_version(name)
    except StoreError as exc:
        raise EvalError(f"version: {exc}") from None
    if against is None:
        parent = store.model_version(name)["parent"]
        if parent is None:
            raise EvalError(f"version '{name}' has no parent; pass against=VERSION to compare it with")
        against = parent
    try:
        other = camp.resolve_model(store, against)
        store.model_version(other)
    except StoreError as exc:
        raise EvalError(f"against: {exc}") from None
    if other == name:
        raise EvalError(f"version and against are both '{name}'; compare a version with another one")
    for role, v in (("version", name), ("against", other)):
        if store.model_version(v)["kind"] == "reward":
            raise EvalError(
                f"{role} '{v}' is a reward model: it scores answers but writes none, so there is "
                "nothing to evaluate"
            )
    try:
        chosen = pick_suites(suites)
    except ValueError as exc:
        raise EvalError(f"suites: {exc}") from None
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise EvalError(f"seed {seed!r}: use a whole number from 0 to 2147483647")
    if temperature is not None and not 0 < temperature <= 2:
        raise EvalError(f"temperature {temperature}: the campaign temperature must be above 0 and at most 2")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise EvalError(f"limit {limit!r}: use a whole number of items per suite, at least 1")
    if isinstance(judge, dict):
        unknown = set(judge) - {"model", "url", "max_tokens"}
        if unknown or not judge.get("model"):
            raise EvalError("judge: give {'model': NAME, 'url': OPTIONAL_BASE_URL}")
        judge = JudgeSpec(**judge)
    needs_judge = refusal_judge or any(s.scorer == "pairwise_judge" for s in chosen)
    if judge is None and needs_judge:
        # the default judge is the served base model (the root of the lineage) on the same server
        judge = JudgeSpec(model=lineage_root(store, other))
    if backend is not None:
        try:
            served = backend.models()
        except Exception as exc:
            raise EvalError(
                f"the serving backend at {backend.base_url} did not answer /v1/models ({exc})"
            ) from None
        for role, v in (("version", name), ("against", other)):
            if v not in served:
                raise EvalError(
                    f"{role} '{v}' is not served by the backend (serving: {', '.join(served)}); "
                    "load it first (a LoRA version is hot-loaded when its run finishes)"
                )
    if backend is not None and needs_judge and judge is not None:
        try:  # a bad judge URL or model is an input error, said before anything is stored
            Judge.connect(judge, backend).close()
        except JudgeError as exc:
            raise EvalError(str(exc)) from None
    return Plan(
        name,
        other,
        chosen,
        seed,
        judge if needs_judge else None,
        temperature,
        limit,
        refusal_judge,
        waived,
        gate or gating.load_gate_config(),
    )


# ------------------------------------------------------------------ suite runs (the cache)


def suite_settings(plan: Plan, suite: Suite) -> dict[str, Any]:
    """What changes a suite's numbers besides the suite file, the version and the seed."""
    settings: dict[str, Any] = {"scorer": suite.scorer, **suite.generation, "limit": plan.limit}
    if suite.scorer == "consistency" and plan.temperature is not None:
        settings["temperature"] = plan.temperature
    if suite.scorer == "multiple_choice":
        settings["normalise"] = suite.header.get("normalise", "per_token")
        settings["context"] = suite.header.get("context", "chat")
    if suite.scorer == "refusal" and plan.refusal_judge and plan.judge:
        settings |= {"refusal_judge": True, "judge": plan.judge.as_dict()}
    if suite.scorer == "pairwise_judge" and plan.judge:
        settings["judge"] = plan.judge.as_dict()  # its max_tokens (8) is the verdict's length
    return settings


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _find_run(store: Store, key: dict[str, Any]) -> dict[str, Any] | None:
    rows = store.query(
        "SELECT * FROM eval_runs WHERE version = ? AND version_hash = ? AND suite = ? AND suite_hash = ?"
        " AND seed = ? AND settings_hash = ?",
        [
            key["version"],
            key["version_hash"],
            key["suite"],
            key["suite_hash"],
            key["seed"],
            key["settings_hash"],
        ],
    )
    return decode_json_columns(rows[0], "settings", "metrics") if rows else None


def run_items(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The stored items of one suite run, with their outputs."""
    rows = store.query("SELECT * FROM eval_items WHERE run_id = ? ORDER BY item_id", [run_id])
    return [decode_json_columns(r, "prompt", "parsed", "logprobs", "detail") for r in rows]


def _store_run(
    store: Store,
    key: dict[str, Any],
    settings: dict[str, Any],
    results: list[ItemResult],
    duration_s: float,
    generate_s: float,
) -> str:
    metrics: dict[str, list[float]] = {}
    for r in results:
        metrics.setdefault(r.metric, []).append(r.score)
    means = {m: sum(v) / len(v) for m, v in metrics.items()}
    run_id = "er-" + new_id()[:16]
    frame = pd.DataFrame(
        [
            {
                "run_id": run_id,
                "item_id": r.item_id,
                "metric": r.metric,
                "score": float(r.score),
                "prompt": json.dumps(r.prompt, ensure_ascii=False),
                "outputs": list(r.outputs),
                "parsed": json.dumps(r.parsed, ensure_ascii=False, default=str),
                "logprobs": json.dumps(r.logprobs) if r.logprobs is not None else None,
                "detail": json.dumps(r.detail, ensure_ascii=False, default=str),
            }
            for r in results
        ]
    )
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO eval_runs (id, version, version_hash, suite, suite_hash, seed, settings_hash,"
            " settings, metrics, items, duration_s, generate_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                key["version"],
                key["version_hash"],
                key["suite"],
                key["suite_hash"],
                key["seed"],
                key["settings_hash"],
                json.dumps(settings, default=str),
                json.dumps(means),
                len(results),
                duration_s,
                generate_s,
            ],
        )
        cur.register("incoming_eval_items", frame)
        try:
            cur.execute(
                "INSERT INTO eval_items (run_id, item_id, metric, score, prompt, outputs, parsed, logprobs,"
                " detail) SELECT run_id, item_id, metric, score, prompt::JSON, outputs, parsed::JSON,"
                " logprobs::JSON, detail::JSON FROM incoming_eval_items"
            )
        finally:
            cur.unregister("incoming_eval_items")
    return run_id


def run_suite(
    store: Store,
    ctx: Context,
    plan: Plan,
    suite: Suite,
    model: str,
    *,
    use_cache: bool = True,
) -> dict[str, Any]:
    """One suite on one model, or its cached run. Returns the eval_runs row plus `cached` and `scores`."""
    settings = suite_settings(plan, suite)
    if suite.scorer == "pairwise_judge":
        other = plan.against if model == plan.version else plan.version
        settings |= {"against": other, "against_hash": store.model_version(other)["content_hash"]}
    key = {
        "version": model,
        "version_hash": store.model_version(model)["content_hash"],
        "suite": suite.name,
        "suite_hash": suite.content_hash,
        "seed": plan.seed,
        "settings_hash": _hash(settings),
    }
    found = _find_run(store, key) if use_cache else None
    if found is None:
        started = time.perf_counter()
        ctx.generate_s = 0.0
        items = limited(suite.items, plan.limit)
        results = RUNNERS[suite.scorer](ctx, suite, model, items, settings)
        duration = time.perf_counter() - started
        if not use_cache and _find_run(store, key) is not None:
            # a fresh run beside the cached one: stored under its own key, never reused
            key["settings_hash"] = _hash({**settings, "fresh_run": new_id()})
        try:
            run_id = _store_run(store, key, settings, results, duration, ctx.generate_s)
        except duckdb.ConstraintException:
            # another evaluation stored the same run meanwhile: same inputs, so use that one
            existing = _find_run(store, key)
            if existing is None:
                raise
            run_id = existing["id"]
        found = decode_json_columns(
            store.query("SELECT * FROM eval_runs WHERE id = ?", [run_id])[0], "settings", "metrics"
        )
        found["cached"] = False
    else:
        found["cached"] = True
    found["scores"] = {}
    for row in store.query("SELECT item_id, metric, score FROM eval_items WHERE run_id = ?", [found["id"]]):
        found["scores"].setdefault(row["metric"], {})[row["item_id"]] = row["score"]
    return found


# ------------------------------------------------------------------ evaluate


def _record(store: Store, eval_id: str, **fields: Any) -> None:
    sets = ", ".join(f"{k} = ?" for k in fields)
    values = [
        json.dumps(v, default=str) if k in ("result", "details", "settings") else v for k, v in fields.items()
    ]
    with store.transaction() as cur:
        cur.execute(f"UPDATE evals SET {sets} WHERE id = ?", [*values, eval_id])


def _insert_eval(store: Store, plan: Plan, status: str, created_by: str | None) -> str:
    eval_id = "eval-" + new_id()[:12]
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO evals (id, version, against, suites, seed, settings, status, created_by, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, CASE WHEN ? = 'running' THEN now() END)",
            [
                eval_id,
                plan.version,
                plan.against,
                [s.name for s in plan.suites],
                plan.seed,
                json.dumps(plan.settings(), default=str),
                status,
                created_by,
                status,
            ],
        )
    return eval_id


_running_here: set[str] = set()  # evaluations this process is running (not stale after a crash)


def execute(
    store: Store,
    backend: OpenAIChatBackend,
    plan: Plan,
    eval_id: str,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    use_cache: bool = True,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Run a planned evaluation recorded as `eval_id`; store and return its result."""
    say = progress or (lambda _msg: None)
    _running_here.add(eval_id)
    judge: Judge | None = None
    try:
        _record(store, eval_id, status="running")
        store.write("UPDATE evals SET started_at = coalesce(started_at, now()) WHERE id = ?", [eval_id])
        if plan.judge is not None:
            try:
                judge = Judge.connect(plan.judge, backend)
            except JudgeError as exc:
                raise EvalError(str(exc)) from None
        ctx = Context(backend, seed=plan.seed, concurrency=concurrency, judge=judge, should_stop=should_stop)
        metrics: dict[str, dict[str, Any]] = {}
        details: dict[str, Any] = {"suites": {}}
        for suite in plan.suites:
            started = time.perf_counter()
            say(f"{suite.name}: {plan.version}")
            mine = run_suite(store, ctx, plan, suite, plan.version, use_cache=use_cache)
            info: dict[str, Any] = {
                "version_run": mine["id"],
                "cached": {"version": mine["cached"]},
                "duration_s": {"version": round(mine["duration_s"], 2)},
                "generate_s": {"version": round(mine["generate_s"], 2)},
                "items": mine["items"],
            }
            if suite.scorer == "pairwise_judge":
                # one run judges the pair; the other side's item score is what the version lost
                theirs_scores = {m: {i: 1.0 - s for i, s in v.items()} for m, v in mine["scores"].items()}
            else:
                say(f"{suite.name}: {plan.against}")
                theirs = run_suite(store, ctx, plan, suite, plan.against, use_cache=use_cache)
                theirs_scores = theirs["scores"]
                info["against_run"] = theirs["id"]
                info["cached"]["against"] = theirs["cached"]
                info["duration_s"]["against"] = round(theirs["duration_s"], 2)
                info["generate_s"]["against"] = round(theirs["generate_s"], 2)
            for metric in suite.metrics:
                if mine["scores"].get(metric) and theirs_scores.get(metric):
                    metrics[metric] = compare(mine["scores"][metric], theirs_scores[metric], seed=plan.seed)
            info["seconds"] = round(time.perf_counter() - started, 2)
            details["suites"][suite.name] = info
            say(f"{suite.name}: done in {info['seconds']:.0f} s")
        if judge is not None and any(s.scorer == "pairwise_judge" for s in plan.suites):
            # where experts voted on battles of these two versions, how often the judge agrees
            details["judge_agreement"] = judge_human_agreement(
                store, judge, plan.version, plan.against, limit=50, seed=plan.seed
            )
        verdict = gating.rebattle_verdict(store, plan.version, plan.against)
        decision = gating.gate_decision(metrics, verdict, plan.gate, waived=plan.waived)
        details["rebattle_verdict"] = verdict
        result = {"version": plan.version, "against": plan.against, "metrics": metrics, "gate": decision}
        _record(store, eval_id, status="succeeded", result=result, details=details)
        store.write("UPDATE evals SET finished_at = now() WHERE id = ?", [eval_id])
        return result
    except BaseException as exc:
        reason = (
            "stopped: the studio shut down"
            if isinstance(exc, EvalCancelled)
            else f"{type(exc).__name__}: {exc}"
        )
        try:
            _record(store, eval_id, status="failed", error=reason[:2000])
            store.write("UPDATE evals SET finished_at = now() WHERE id = ?", [eval_id])
        except Exception:  # the store may be closing; the error still reaches the caller
            log.exception("could not record the failure of evaluation %s", eval_id)
        raise
    finally:
        _running_here.discard(eval_id)
        if judge is not None:
            judge.close()


def evaluate(
    store: Store,
    backend: OpenAIChatBackend,
    version: str,
    against: str | None = None,
    suites: list[str] | None = None,
    seed: int = 0,
    judge: JudgeSpec | dict[str, Any] | None = None,
    *,
    temperature: float | None = None,
    limit: int | None = None,
    refusal_judge: bool = False,
    waived: bool = False,
    gate: gating.GateConfig | None = None,
    created_by: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate `version` against `against` (default: its parent) and return the comparison.

    Returns exactly {"version": V, "against": P, "metrics": {NAME: {"version": x, "against": y,
    "delta": d, "ci": [lo, hi]}}, "gate": {"passed": bool, "reasons": [str, ...]}}, with `ci`
    a paired bootstrap interval of the delta over items (seeded by `seed`). The evaluation is
    recorded in `evals` (get_eval reads it back); each suite run is cached per (version weights,
    suite file, seed, settings), so a child evaluated against the same parent again reuses the
    parent's runs. `suites`: names in data/evals (all by default). `judge`: JudgeSpec or
    {"model", "url"} (default: the served base model). `temperature`: the campaign temperature
    for the consistency suite (default the suite's 0.8). `limit`: the first N items per suite.
    """
    plan = plan_eval(
        store,
        backend,
        version,
        against,
        suites,
        seed,
        judge,
        temperature=temperature,
        limit=limit,
        refusal_judge=refusal_judge,
        waived=waived,
        gate=gate,
    )
    eval_id = _insert_eval(store, plan, "running", created_by)
    return execute(
        store, backend, plan, eval_id, concurrency=concurrency, use_cache=use_cache, progress=progress
    )


# ------------------------------------------------------------------ background evaluations


class EvalWorker:
    """Runs queued evaluations one at a time on a thread (the CPU has room for one)."""

    def __init__(self, store: Store):
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-worker")
        self._stopping = threading.Event()
        self.futures: dict[str, Future[dict[str, Any]]] = {}
        # evaluations left queued or running by a studio that died will never finish: say so
        stale = [
            r["id"]
            for r in store.query("SELECT id FROM evals WHERE status IN ('queued', 'running')")
            if r["id"] not in _running_here
        ]
        if stale:
            with store.transaction() as cur:
                cur.execute(
                    "UPDATE evals SET status = 'failed', finished_at = now(), error = 'the studio stopped"
                    " before this evaluation finished; start it again' WHERE list_contains(?, id)",
                    [stale],
                )

    def submit(
        self,
        backend: OpenAIChatBackend,
        plan: Plan,
        eval_id: str,
        on_done: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> Future[dict[str, Any]]:
        """Queue one evaluation; `on_done(eval_id)` runs on the worker after it succeeded (the
        promotion gate decides there); its failure is logged, the evaluation stays succeeded."""

        def run() -> dict[str, Any]:
            result = execute(self.store, backend, plan, eval_id, should_stop=self._stopping.is_set, **kwargs)
            if on_done is not None:
                try:
                    on_done(eval_id)
                except Exception:
                    log.exception("after evaluation %s: the follow-up failed", eval_id)
            return result

        future = self._pool.submit(run)
        self.futures[eval_id] = future
        return future

    def close(self) -> None:
        """Stop between two requests; a queued evaluation is marked failed."""
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for eval_id, future in self.futures.items():
            if future.cancelled():
                _record(self.store, eval_id, status="failed", error="the studio shut down before it started")


def _worker(store: Store) -> EvalWorker:
    return store.service("evals", EvalWorker)


def start_eval(
    store: Store,
    backend: OpenAIChatBackend,
    version: str,
    against: str | None = None,
    suites: list[str] | None = None,
    seed: int = 0,
    judge: JudgeSpec | dict[str, Any] | None = None,
    *,
    temperature: float | None = None,
    limit: int | None = None,
    refusal_judge: bool = False,
    waived: bool = False,
    gate: gating.GateConfig | None = None,
    created_by: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    wait: bool = False,
    progress: Progress | None = None,
    on_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Check the request, record it as queued and run it on the store's evaluation worker.

    Returns the evals record at once (status 'queued'), so a route can answer with its id; with
    `wait=True`, returns it when the evaluation has finished (status 'succeeded' or 'failed').
    Bad input raises EvalError before anything is stored. `on_done(eval_id)` runs on the worker
    once the evaluation succeeded (studio.promotion lets the gate decide there).
    """
    plan = plan_eval(
        store,
        backend,
        version,
        against,
        suites,
        seed,
        judge,
        temperature=temperature,
        limit=limit,
        refusal_judge=refusal_judge,
        waived=waived,
        gate=gate,
    )
    worker = _worker(store)
    eval_id = _insert_eval(store, plan, "queued", created_by)
    future = worker.submit(backend, plan, eval_id, on_done, concurrency=concurrency, progress=progress)
    if wait:
        with contextlib.suppress(Exception):  # a failure is recorded in the row, read below
            future.result()
    return get_eval(store, eval_id)


def get_eval(store: Store, eval_id: str) -> dict[str, Any]:
    """One evaluation: its request, status, result (the comparison) and details."""
    rows = store.query("SELECT * FROM evals WHERE id = ?", [eval_id])
    if not rows:
        raise StoreError(f"evaluation '{eval_id}' does not exist")
    row = decode_json_columns(rows[0], "settings", "result", "details")
    row["suites"] = list(row["suites"])
    return row


def list_evals(store: Store, version: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first; only those of `version` (as the version evaluated) when given."""
    if version is None:
        rows = store.query("SELECT id FROM evals ORDER BY created_at DESC, id LIMIT ?", [limit])
    else:
        rows = store.query(
            "SELECT id FROM evals WHERE version = ? ORDER BY created_at DESC, id LIMIT ?", [version, limit]
        )
    return [get_eval(store, r["id"]) for r in rows]
