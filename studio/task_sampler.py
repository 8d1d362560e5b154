"""Background worker that keeps a bounded buffer of ready tasks per active campaign.

Annotators never wait for generation while the buffer is warm: after each
judgment the worker tops the campaign back up to `buffer` tasks that still
have a free place. It samples a few prompts at once so that vLLM batches them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from studio import arena
from studio.campaigns import list_campaigns, resolve_model, sampling_params
from studio.labeling import add_task, ready_tasks
from studio.sampling import Sampler
from studio.store import Store


class TaskSampler:
    def __init__(
        self, store: Store, sampler: Sampler, *, buffer: int = 8, parallel: int = 4, interval: float = 0.5
    ):
        self.store = store
        self.sampler = sampler
        self.buffer = buffer
        self.parallel = parallel
        self.interval = interval
        self.battle_buffer = max(2, buffer // 2)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="task-sampler")
        self.status: dict[str, dict[str, Any]] = {}
        self._starved: set[str] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="task-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def poke(self, campaign: str | None = None, starved: bool = False) -> None:
        """Wake the worker: a task was taken, or an annotator found none ready."""
        if campaign and starved:
            self._starved.add(campaign)
        self._wake.set()

    def last_error(self, campaign: str) -> str | None:
        """Why sampling for the campaign failed last time (None once it samples again)."""
        return self.status.get(campaign, {}).get("error")

    def _failed(self, campaign: str, error: str | None) -> None:
        """Record a campaign's sampling outcome; a new failure also goes to the studio's log."""
        state = self.status.setdefault(campaign, {"error": None})
        if error and error != state.get("error"):
            print(f"[studio] sampling for campaign '{campaign}' failed: {error}", file=sys.stderr, flush=True)
        state["error"] = error

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for campaign in list_campaigns(self.store):
                    if campaign["status"] != "active":
                        continue
                    try:
                        if campaign["kind"] == "battle":
                            self._fill_battles(campaign)
                        else:
                            self._fill(campaign)
                    except Exception as exc:  # e.g. its model was removed: this campaign's failure
                        self._failed(campaign["name"], str(exc) or type(exc).__name__)
            except Exception as exc:  # keep the worker alive; the status shows the error
                self.status.setdefault("_worker", {})["error"] = str(exc)
            self._wake.wait(self.interval)
            self._wake.clear()

    def _fill_battles(self, campaign: dict[str, Any]) -> None:
        """Keep a few unleaked battles ready, never more than the vote budget still needs."""
        name = campaign["name"]
        settings = arena.battle_campaign(self.store, name)
        state = self.status.setdefault(name, {"error": None})
        ready = arena.ready_battles(self.store, name)
        votes = self.store.query("SELECT count(*) AS n FROM votes WHERE campaign = ?", [name])[0]["n"]
        want = min(self.battle_buffer - ready, settings["budget"] - votes - ready)
        if name in self._starved:
            want = max(want, 1)
            self._starved.discard(name)
        state["ready"] = ready
        if want <= 0 or self._stop.is_set():
            return
        futures = [
            self._pool.submit(arena.make_battle, self.store, self.sampler, name)
            for _ in range(min(want, self.parallel))
        ]
        results = [f.result() if f.exception() is None else f.exception() for f in futures]
        failures = [r for r in results if isinstance(r, BaseException)]
        state["leaks"] = state.get("leaks", 0) + sum(1 for r in results if isinstance(r, dict) and r["leak"])
        self._failed(name, str(failures[0]) if failures else None)
        state["ready"] = arena.ready_battles(self.store, name)
        if failures:
            self._stop.wait(5.0)

    def _fill(self, campaign: dict[str, Any]) -> None:
        name = campaign["name"]
        ready = ready_tasks(self.store, name)
        want = self.buffer - ready
        if name in self._starved:
            want = max(want, self.parallel)
            self._starved.discard(name)
        state = self.status.setdefault(name, {"error": None})
        state["ready"] = ready
        if want <= 0 or self._stop.is_set():
            return
        prompts = self.store.query(
            "SELECT p.id, p.messages FROM prompts p WHERE p.set_name = ?"
            " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.campaign = ? AND t.prompt_id = p.id)"
            " ORDER BY p.position LIMIT ?",
            [campaign["prompt_set"], name, min(want, self.parallel)],
        )
        if not prompts:
            state["exhausted"] = True
            return
        state["sampling"] = len(prompts)
        version = resolve_model(self.store, campaign["model"])
        params = sampling_params(campaign)
        started = time.monotonic()
        futures = [self._pool.submit(self._make_task, name, version, params, p) for p in prompts]
        errors = [f.exception() for f in futures]
        failures = [e for e in errors if e is not None]
        state["sampling"] = 0
        self._failed(name, str(failures[0]) if failures else None)
        state["last_batch_s"] = round(time.monotonic() - started, 2)
        state["ready"] = ready_tasks(self.store, name)
        if failures:
            self._stop.wait(5.0)  # the backend is down or restarting: do not spin

    def _make_task(self, campaign: str, version: str, params: Any, prompt: dict[str, Any]) -> None:
        messages = prompt["messages"]
        if isinstance(messages, str):  # DuckDB hands JSON columns back as text
            messages = json.loads(messages)
        rows = self.sampler.sample(messages, params, version=version, prompt_id=prompt["id"])
        add_task(self.store, campaign, prompt["id"], version, [r["id"] for r in rows])
