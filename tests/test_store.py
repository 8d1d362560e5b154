from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from studio import migrations as migrations_module
from studio.importer import messages_hash
from studio.store import ImportedPrompt, Store, StoreError


def prompt(text: str, where: str = "test") -> ImportedPrompt:
    messages = [{"role": "user", "content": text}]
    return ImportedPrompt(where, messages, messages_hash(messages))


def test_migrations_apply_once_and_only_new_ones_on_reopen(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "s.duckdb"
    names = [name for name, _ in migrations_module.MIGRATIONS]
    first = Store(db)
    assert first.applied_now == names
    first.close()

    again = Store(db)
    assert again.applied_now == []
    assert again.migrations() == names
    again.close()

    extra = ("002_test_extra", "CREATE TABLE extra_table (x INTEGER);")
    monkeypatch.setattr(migrations_module, "MIGRATIONS", [*migrations_module.MIGRATIONS, extra])
    monkeypatch.setattr("studio.store.MIGRATIONS", migrations_module.MIGRATIONS)
    upgraded = Store(db)
    assert upgraded.applied_now == ["002_test_extra"]
    assert upgraded.query("SELECT count(*) AS n FROM extra_table")[0]["n"] == 0
    upgraded.close()
    reopened = Store(db)
    assert reopened.applied_now == []
    reopened.close()


def test_a_failing_migration_leaves_nothing_half_applied(tmp_path: Path, monkeypatch) -> None:
    bad = ("002_broken", "CREATE TABLE half (x INTEGER); THIS IS NOT SQL;")
    monkeypatch.setattr("studio.store.MIGRATIONS", [*migrations_module.MIGRATIONS, bad])
    with pytest.raises(Exception, match="syntax"):
        Store(tmp_path / "s.duckdb")
    monkeypatch.setattr("studio.store.MIGRATIONS", migrations_module.MIGRATIONS)
    store = Store(tmp_path / "s.duckdb")
    assert store.migrations() == [name for name, _ in migrations_module.MIGRATIONS]
    assert not store.query("SELECT * FROM duckdb_tables() WHERE table_name = 'half'")
    store.close()


def test_second_process_gets_a_message_not_a_lock_error(store: Store) -> None:
    db = store.path  # held open by the fixture's store
    code = (
        "import sys\nfrom studio.store import Store, StoreLockedError\n"
        f"try:\n    Store({str(db)!r})\nexcept StoreLockedError as e:\n    print(e); sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert f"in use by process {os.getpid()}" in out.stdout
    assert "studio serve" in out.stdout and "--url" in out.stdout


def test_duplicates_are_stored_once_and_reported(store: Store) -> None:
    result = store.import_prompts(
        "set", [prompt("a", "line 1"), prompt("b", "line 2"), prompt("a", "line 3")], source="t"
    )
    assert result.added == 2
    assert result.duplicates == ["line 3 repeats line 1"]
    again = store.import_prompts("set", [prompt("b", "line 1"), prompt("c", "line 2")], source="t")
    assert again.added == 1
    assert "already in set 'set'" in again.duplicates[0]
    assert [p["messages"][0]["content"] for p in store.prompts("set")] == ["a", "b", "c"]
    assert [p["position"] for p in store.prompts("set")] == [0, 1, 2]
    # the same prompt in another set is a different prompt
    assert store.import_prompts("other", [prompt("a")], source="t").added == 1


def test_empty_set_name_stores_nothing(store: Store) -> None:
    with pytest.raises(StoreError, match="--set"):
        store.import_prompts("  ", [prompt("a")], source="t")
    assert store.count("prompts") == 0 and store.count("prompt_sets") == 0


def test_model_version_conflict_is_refused(store: Store) -> None:
    store.register_model_version("base", path="/m", content_hash="aaa", source="x")
    assert store.register_model_version("base", path="/m", content_hash="aaa", source="x")["name"] == "base"
    with pytest.raises(StoreError, match="already exists with other weights"):
        store.register_model_version("base", path="/n", content_hash="bbb", source="y")
    with pytest.raises(StoreError, match="not registered"):
        store.model_version("nope")


def test_threads_write_through_their_own_cursors(store: Store) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(20):
                store.import_prompts(f"set{i}", [prompt(f"{i}-{j}")], source="t")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.count("prompts") == 80
