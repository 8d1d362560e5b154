"""Small state bugs: identical concurrent snapshots, and the reason a killed training run gives."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from studio import training
from studio.jobs import Runner, failure_reason
from studio.store import Store
from tests.helpers import seed_easy_judgments


@pytest.fixture()
def judged(tmp_path: Path) -> Store:
    store = Store(tmp_path / "s.duckdb")
    seed_easy_judgments(store, n=6)  # also registers 'base' and points 'policy' at it
    return store


def test_two_identical_concurrent_snapshots_both_succeed_with_one_row(
    judged: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    both_looked = threading.Barrier(2, timeout=30)
    write_table = pq.write_table

    def write_when_both_looked(*args: Any, **kwargs: Any) -> None:
        # both calls have found no snapshot row by now: the race the insert must survive
        both_looked.wait()
        write_table(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_when_both_looked)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def take() -> None:
        try:
            results.append(training.take_snapshot(judged, tmp_path, "preference", ["easy"], "eng"))
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 2 and results[0]["id"] == results[1]["id"] and results[0]["rows"] == 6
    assert judged.count("snapshots") == 1 and judged.count("snapshot_judgments") == 6
    folder = Path(results[0]["path"]).parent
    assert sorted(p.name for p in folder.iterdir()) == ["filter.json", "preference.parquet"]
    assert not Path(results[0]["path"]).stat().st_mode & stat.S_IWUSR


def test_failure_reason_names_the_signal_not_the_last_log_line() -> None:
    log = '{"event": "step", "stage": "dpo", "step": 3, "loss": 0.61}\n'
    assert failure_reason("dpo", -9, log) == (
        "stage dpo was killed by SIGKILL (a kill -9, or the kernel's out-of-memory killer: see `dmesg`); "
        "run.log has its output up to then"
    )
    assert failure_reason("ppo", -15, log).startswith("stage ppo was killed by SIGTERM;")
    crashed = "step 1\nTraceback (most recent call last):\nValueError: learning_rate 'fast'\n"
    assert (
        failure_reason("dpo", 1, crashed) == "stage dpo exited with code 1: ValueError: learning_rate 'fast'"
    )


def test_a_trainer_killed_by_sigkill_fails_its_run_with_the_signal_named(
    judged: Store, tmp_path: Path
) -> None:
    # a stand-in for `python -m trainers.dpo`: logs a metrics line, then dies as kill -9 would end it
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/sh\necho \'{"event": "step", "stage": "dpo", "step": 1}\'\nkill -9 $$\n')
    fake.chmod(0o755)
    registered: list[str] = []
    runner = Runner(judged, tmp_path, lambda *a: registered.append("x") or "x", python=str(fake))
    run = training.submit_run(judged, tmp_path, stage="dpo", created_by="eng", steps=1)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while (done := training.get_run(judged, run["id"]))["status"] not in ("failed", "succeeded"):
            assert time.monotonic() < deadline, done
            time.sleep(0.1)
    finally:
        runner.stop()
    assert done["status"] == "failed"
    assert done["reason"].startswith("stage dpo was killed by SIGKILL"), done["reason"]
    assert registered == [] and done["versions"] == []
