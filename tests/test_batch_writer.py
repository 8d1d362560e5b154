"""Group commit (studio/batch_writer.py) on a real DuckDB file."""

from __future__ import annotations

import asyncio
import threading
import time

import duckdb
import pytest

from studio.batch_writer import BatchWriter
from studio.store import Store, StoreError
from tests.crashing import run_async


def test_group_commit_fails_only_the_bad_unit_and_drains_on_close(store: Store) -> None:
    store.cursor().execute("CREATE TABLE t (id VARCHAR PRIMARY KEY)")
    store.cursor().execute("INSERT INTO t VALUES ('taken')")
    batches: list[int] = []

    def flush(units: list[str]) -> None:
        batches.append(len(units))
        store.write("INSERT INTO t SELECT unnest(?)", [units])  # one statement for the whole batch

    writer = BatchWriter(store, flush, name="test-writer")
    with store.transaction():  # the writer's first write waits on this, so the rest queue up
        futures = [writer.submit(u) for u in ("a", "b", "taken", "c", "d")]
        time.sleep(0.2)
    writer.close()  # everything queued is written before close returns
    outcomes = [f.exception() for f in futures]
    assert [o is None for o in outcomes] == [True, True, False, True, True]
    assert isinstance(outcomes[2], duckdb.ConstraintException)
    assert sorted(r["id"] for r in store.query("SELECT id FROM t")) == ["a", "b", "c", "d", "taken"]
    # grouped (the first unit may go alone), then the failed group retried one unit at a time
    assert max(batches) >= 4 and batches[-4:] == [1, 1, 1, 1]
    with pytest.raises(StoreError, match="shutting down"):
        writer.submit("e")


def test_units_awaited_on_a_loop_are_written_off_the_loop_and_drained_on_close(store: Store) -> None:
    """A loop's units are written by the awaited lane's thread while the loop goes on (a write
    on the loop stopped every request), and close() writes them, and the writer-lane rows
    they hand on, before it returns."""
    store.cursor().execute("CREATE TABLE t (id VARCHAR PRIMARY KEY, lane VARCHAR)")
    writing, release = threading.Event(), threading.Event()
    writer: BatchWriter
    loop_thread: list[threading.Thread] = []

    def flush(units: list[str]) -> None:  # the writer lane
        store.write("INSERT INTO t SELECT unnest(?), 'writer'", [units])

    def loop_flush(units: list[str]) -> None:
        assert threading.current_thread() is not loop_thread[0]
        writing.set()
        release.wait(10)  # on the loop's thread, the loop would stop here
        store.write("INSERT INTO t SELECT unnest(?), 'awaited'", [units], exclusive=False)
        for u in units:  # rows nobody waits for, as the labeling pool hands on its assignments
            writer.submit(f"{u}-rows", in_background=True)

    writer = BatchWriter(store, flush, name="test-writer", loop_flush=loop_flush)
    closer = threading.Thread(target=writer.close)

    async def scenario() -> int:
        loop_thread.append(threading.current_thread())
        futures = [writer.submit("a")]
        assert await asyncio.to_thread(writing.wait, 10)
        turns = 0
        for _ in range(5):  # the loop still turns while "a" is being written
            await asyncio.sleep(0)
            turns += 1
        futures.append(writer.submit("b"))  # behind the write in progress: the next batch
        closer.start()  # closing while both are still to be written
        await asyncio.sleep(0.1)
        release.set()
        for f in futures:
            await asyncio.wrap_future(f)
        return turns

    assert run_async(scenario()) == 5
    closer.join(10)
    rows = {r["id"]: r["lane"] for r in store.query("SELECT id, lane FROM t")}
    assert rows == {"a": "awaited", "b": "awaited", "a-rows": "writer", "b-rows": "writer"}
    with pytest.raises(StoreError, match="shutting down"):
        writer.submit("c")


def test_a_cancelled_caller_does_not_leave_the_rest_of_its_batch_unanswered(store: Store) -> None:
    """A request handler cancelled while it awaits the commit cancels the future it awaits.
    Its unit is still written (the pool already counted it; a retry with the same key finds
    it), and the other units of its batch are answered: answering the cancelled one used to
    raise in the writer and leave them waiting."""
    store.cursor().execute("CREATE TABLE t (id VARCHAR PRIMARY KEY)")
    written: list[str] = []

    def flush(units: list[str]) -> None:
        store.write("INSERT INTO t SELECT unnest(?)", [units])
        written.extend(units)

    writer = BatchWriter(store, flush, name="test-writer")
    with store.transaction():  # the first write waits on this, so the next ones queue behind it
        first = writer.submit("a")
        time.sleep(0.2)
        cancelled, after = writer.submit("b"), writer.submit("c")
        assert cancelled.cancel()  # still queued: cancellable, as a handler's cancel would do
    after.result(timeout=10)
    first.result(timeout=10)
    writer.close()
    assert sorted(written) == ["a", "b", "c"]
    assert sorted(r["id"] for r in store.query("SELECT id FROM t")) == ["a", "b", "c"]
