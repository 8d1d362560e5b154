"""Group commit (`BatchWriter`): many callers' rows in one write, each caller answered
once its rows are committed. The labeling pool (labeling_store.py) writes through one.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from studio.store import StoreError

if TYPE_CHECKING:
    from studio.store import Store

log = logging.getLogger(__name__)

_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


@atexit.register
def _close_writers() -> None:
    # a writer's thread still running at exit would be frozen holding its DuckDB cursor
    for writer in list(_writers):
        writer.close()


class _Lane:
    """One queue of units and the thread that writes them (started on demand, ended when idle)."""

    __slots__ = ("flush", "idle", "name", "queue", "thread")

    def __init__(self, name: str, flush: Callable[[list[Any]], None], idle: Callable[[], None] | None):
        self.name = name
        self.flush = flush
        self.idle = idle
        self.queue: queue.SimpleQueue[tuple[Any, Future[None]] | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None


class BatchWriter:
    """Group commit: the writes of many callers in one go.

    A DuckDB statement costs a millisecond or more however few rows it touches (several
    under load: the Python client takes the GIL back between its tasks), so per-request
    transactions cap the studio at a few hundred writes a second. Callers hand a unit of
    rows to `write`, which returns only once `flush` has committed it (so an acknowledged
    judgment is on disk). One thread takes every unit waiting and `flush` writes them
    together, in as few statements as it can; units submitted on an event loop have a
    thread of their own (see `loop_flush`). If a batch fails, each of its units is retried
    alone, so one bad unit fails only its own caller.
    """

    IDLE_S = 2.0  # a thread ends after this long without work (a new write starts another)
    IDLE_TICK_S = 0.2  # `idle` runs after this long without work

    def __init__(
        self,
        store: Store,
        flush: Callable[[list[Any]], None],
        name: str,
        idle: Callable[[], None] | None = None,
        loop_flush: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.flush = flush
        self.idle = idle  # called on the writer's thread after IDLE_TICK_S without work, and at close
        # Units submitted on an event loop's thread (their callers await the future) are
        # written by `loop_flush` on a second thread, one batch at a time: what arrives while
        # a batch is written is the next batch. Not on the loop itself: a judgments INSERT
        # costs ~3 ms of CPU however few rows it has, and DuckDB runs it without the GIL, so
        # on the loop it stopped every request for it (40% of the loop's time at 200
        # annotators), while on this thread it runs on the other core as the loop goes on.
        # Not on the writer's thread either, where they would queue behind its idle work.
        # `loop_flush` must never wait on a lock (see Store.write's `exclusive`): the whole
        # server awaits it.
        self.loop_flush = loop_flush
        self.name = name
        self._writer = _Lane(name, flush, idle)
        self._awaited = None if loop_flush is None else _Lane(f"{name}-awaited", loop_flush, None)
        self._closing = False  # the awaited lane drains: new units go to the writer's lane
        self._closed = False
        # Guards the queues' ends: nothing is queued behind a stop marker, and no unit is
        # left behind by a thread that decided to end.
        self._lock = threading.Lock()
        _writers.add(self)

    def write(self, unit: Any) -> None:
        """Commit `unit` (with whatever else is waiting); raises what its write raised.

        Always through the writer thread (`flush`, which writes everything the unit holds
        before it answers)."""
        self.submit(unit, in_background=True).result()

    def submit(self, unit: Any, *, in_background: bool = False) -> Future[None]:
        """Queue `unit`; the future is done once it is written. `in_background`: the writer's
        thread writes it, whoever submits it."""
        done: Future[None] = Future()
        on_loop = False
        if self._awaited is not None and not in_background:
            with contextlib.suppress(RuntimeError):
                on_loop = asyncio.get_running_loop() is not None
        with self._lock:
            if self._closed:
                raise StoreError("the studio is shutting down; nothing was stored, try again in a moment")
            lane = self._awaited if on_loop and not self._closing else self._writer
            assert lane is not None
            lane.queue.put((unit, done))
            self._ensure_thread(lane)
        return done

    def _ensure_thread(self, lane: _Lane) -> None:
        """Caller holds self._lock."""
        if lane.thread is None:
            # Started on demand and ended when idle, so a store nobody closes does not
            # keep a thread (and the thread's DuckDB cursor) alive until exit.
            lane.thread = threading.Thread(target=self._run, args=(lane,), name=lane.name, daemon=True)
            lane.thread.start()

    def _stop(self, lane: _Lane | None) -> threading.Thread | None:
        """Queue the stop marker behind everything queued (caller holds self._lock)."""
        if lane is None:
            return None
        self._ensure_thread(lane)
        lane.queue.put(None)
        return lane.thread

    def close(self) -> None:
        """Write everything queued, then stop."""
        with self._lock:
            if self._closed or self._closing:
                return
            # First the awaited lane: its batches hand their follow-up rows to the writer's
            # lane (see LabelingPool._flush_on_loop), which takes units until it stops.
            self._closing = True
            awaited = self._stop(self._awaited)
        if awaited is not None:
            awaited.join()
        with self._lock:
            self._closed = True
            writer = self._stop(self._writer)
        if writer is not None:
            writer.join()

    def _run(self, lane: _Lane) -> None:
        quiet = 0.0
        while True:
            try:
                first = lane.queue.get(timeout=self.IDLE_TICK_S)
            except queue.Empty:
                quiet += self.IDLE_TICK_S
                self._idle(lane)
                with self._lock:
                    if quiet >= self.IDLE_S and lane.queue.empty():
                        lane.thread = None
                        return
                continue
            quiet = 0.0
            stopped = self._write_waiting(lane, first)
            del first  # written: not kept alive while the next is awaited
            if stopped:
                self._idle(lane)
                return

    def _write_waiting(self, lane: _Lane, item: tuple[Any, Future[None]] | None) -> bool:
        """Commit `item` and every unit queued behind it; True if the stop marker came.

        Its own frame, so that the batch is let go once written: the thread's loop would
        keep the last one (and its callers' futures) alive while it waits for the next."""
        batch = []
        while item is not None:
            batch.append(item)
            try:
                item = lane.queue.get_nowait()
            except queue.Empty:
                break
        if batch:
            # From here on no caller can cancel its future (a request handler cancelled while
            # it awaits the commit cancels the future it awaits). A unit whose future was
            # cancelled before is still written: the pool has already counted it, and its
            # caller retries with the same key. Only its answer is left out.
            for _, done in batch:
                done.set_running_or_notify_cancel()
            self._commit(batch, lane.flush)
        return item is None

    def _idle(self, lane: _Lane) -> None:
        if lane.idle is None:
            return
        try:
            lane.idle()
        except Exception:  # idle work is housekeeping: report it, keep writing
            log.exception("%s: idle work failed", lane.name)

    def _commit(self, batch: list[tuple[Any, Future[None]]], flush: Callable[[list[Any]], None]) -> None:
        try:
            flush([unit for unit, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0][1].cancelled():
                    batch[0][1].set_exception(exc)
                return
            for unit, done in batch:
                self._commit([(unit, done)], flush)
            return
        for _, done in batch:
            if not done.cancelled():  # answering a cancelled one would raise, and leave the rest
                done.set_result(None)
