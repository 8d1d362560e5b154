"""Group commit (studio/batch_writer.py) on a real DuckDB file."""

from __future__ import annotations

import time

import duckdb
import pytest

from studio.batch_writer import BatchWriter
from studio.store import Store, StoreError


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
