"""The one object that owns the studio's DuckDB file.

DuckDB lets a single process open a file read-write, and no other process may
open it at all while it does (not even read-only). So the studio process is
the only writer: it owns one `Store`, threads take their own cursor, and every
other process goes through the studio's REST API or reads a Parquet snapshot.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from studio.errors import StoreError
from studio.migrations import MIGRATIONS
from studio.names import check_new_name
from studio.textcheck import listing, shorten

DB_FILE = "studio.duckdb"
log = logging.getLogger(__name__)


class StoreLockedError(RuntimeError):
    """Another process holds the database file."""


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class ImportedPrompt:
    """One validated prompt, before it is stored. `location` names where it came from."""

    location: str
    messages: list[dict[str, str]]
    content_hash: str
    external_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportResult:
    set_name: str
    added: int
    duplicates: list[str]  # "line 7 repeats line 2", one entry per prompt stored once

    def summary(self) -> str:
        text = f"prompt set '{self.set_name}': {self.added} prompt(s) added"
        if self.duplicates:
            text += f", {len(self.duplicates)} duplicate(s) stored once:\n  " + "\n  ".join(self.duplicates)
        return text


def _locked_message(path: Path, raw: str) -> str:
    pid = re.search(r"PID (\d+)", raw)
    holder = f"process {pid.group(1)}" if pid else "another process"
    return (
        f"{path} is in use by {holder} (most likely a running `studio serve`). "
        "DuckDB allows one process per database file, and the studio is its only writer. "
        "While the studio runs, go through it: the web UI, the REST API under /api/v1, or "
        "the same CLI command with --url pointing at the studio. "
        "Otherwise stop that process and run the command again."
    )


class Store:
    """Owns the DuckDB file; applies migrations on open."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path))
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise StoreLockedError(_locked_message(self.path, str(exc))) from None
            raise
        self._local = threading.local()
        # Small read-through caches of rows only the studio changes (see campaigns.get_campaign).
        self.memo: dict[Any, Any] = {}
        # DuckDB's optimistic concurrency would abort one of two conflicting
        # transactions; one lock around writes makes them wait instead.
        self._write_lock = threading.RLock()
        self._services: dict[str, Any] = {}
        self._services_lock = threading.Lock()
        self.applied_now = self._migrate()

    @classmethod
    def in_dir(cls, data_dir: Path | str) -> Store:
        return cls(Path(data_dir) / DB_FILE)

    # connection handling ----------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's own cursor (DuckDB connections are not shared across threads)."""
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._con.cursor()
            self._local.cursor = cur
        return cur

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self.cursor()
        with self._write_lock:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException as exc:
                cur.execute("ROLLBACK")
                if _is_unencodable(exc):
                    raise _unencodable_error(exc) from None
                raise
            cur.execute("COMMIT")

    def write(self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *, exclusive: bool = True) -> None:
        """One statement as its own transaction (DuckDB commits it when it returns).

        `exclusive=False` skips the write lock, for a caller that must never wait on it (the
        event loop) and whose statement cannot conflict with another transaction: an append
        to a table no other code changes (DuckDB lets transactions append concurrently)."""
        values = params if isinstance(params, dict) else list(params)
        try:
            if not exclusive:
                self.cursor().execute(sql, values)
                return
            with self._write_lock:
                self.cursor().execute(sql, values)
        except duckdb.InvalidInputException as exc:
            if _is_unencodable(exc):
                raise _unencodable_error(exc) from None
            raise

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        try:
            cur = self.cursor().execute(sql, params if isinstance(params, dict) else list(params))
        except duckdb.InvalidInputException as exc:
            if _is_unencodable(exc):
                raise _unencodable_error(exc) from None
            raise
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def service(self, name: str, factory: Callable[[Store], Any]) -> Any:
        """One long-lived helper per store (the labeling pool, say); closed before the store."""
        with self._services_lock:
            svc = self._services.get(name)
            if svc is None:
                svc = self._services[name] = factory(self)
            return svc

    def close(self) -> None:
        with self._services_lock:
            services, self._services = list(self._services.values()), {}
        for svc in services:
            svc.close()  # a service with a writer commits what it acknowledged first
        self._con.close()

    # migrations ---------------------------------------------------------------
    def _migrate(self) -> list[str]:
        with self.transaction() as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in cur.execute("SELECT name FROM schema_migrations").fetchall()}
            applied = []
            for name, sql in MIGRATIONS:
                if name in done:
                    continue
                cur.execute(sql)
                cur.execute("INSERT INTO schema_migrations (name) VALUES (?)", [name])
                applied.append(name)
        return applied

    def migrations(self) -> list[str]:
        return [r["name"] for r in self.query("SELECT name FROM schema_migrations ORDER BY name")]

    # model versions -----------------------------------------------------------
    def register_model_version(
        self,
        name: str,
        *,
        path: str,
        content_hash: str,
        source: str,
        kind: str = "full",
        parent: str | None = None,
        meta: dict[str, Any] | None = None,
        served_id: bool = False,
    ) -> dict[str, Any]:
        """Register a version, or return it unchanged when the same content is registered again.

        A new name must follow studio.names' rule (`served_id`: the wider rule for an
        external server's own model id) and may not be an alias's name."""
        with self.transaction() as cur:
            check_new_name(
                "served model" if served_id else "version",
                name,
                lambda n: bool(cur.execute("SELECT 1 FROM model_versions WHERE name = ?", [n]).fetchone()),
            )
            row = cur.execute("SELECT content_hash FROM model_versions WHERE name = ?", [name]).fetchone()
            if row is not None and row[0] != content_hash:
                raise StoreError(
                    f"model version '{name}' already exists with other weights "
                    f"(hash {row[0][:12]}, new {content_hash[:12]}); pick another name"
                )
            if row is None:
                if cur.execute("SELECT 1 FROM aliases WHERE name = ?", [name]).fetchone():
                    raise StoreError(
                        f"version name '{name}' is an alias's name (aliases point at versions: "
                        "a name must say which one it is); pick another name"
                    )
                cur.execute(
                    "INSERT INTO model_versions (name, kind, path, content_hash, source, parent, meta)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [name, kind, path, content_hash, source, parent, json.dumps(meta or {})],
                )
        return self.model_version(name)

    def model_version(self, name: str) -> dict[str, Any]:
        rows = self.query("SELECT * FROM model_versions WHERE name = ?", [name])
        if not rows:
            known = listing([v["name"] for v in self.model_versions()]) or "none"
            raise StoreError(f"model version '{shorten(name)}' is not registered (known: {known})")
        return decode_json_columns(rows[0], "meta")

    def model_versions(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM model_versions ORDER BY created_at, name")
        return [decode_json_columns(r, "meta") for r in rows]

    # prompts ------------------------------------------------------------------
    def import_prompts(
        self, set_name: str, prompts: Sequence[ImportedPrompt], *, source: str
    ) -> ImportResult:
        """Store validated prompts in one transaction; duplicates are stored once and reported."""
        if not set_name.strip():
            raise StoreError("prompt set name is empty; pass --set NAME")
        with self.transaction() as cur:
            check_new_name(  # sets named before the rule stay usable
                "prompt set",
                set_name,
                lambda n: bool(cur.execute("SELECT 1 FROM prompt_sets WHERE name = ?", [n]).fetchone()),
            )
            existing = dict(
                cur.execute(
                    "SELECT content_hash, coalesce(external_id, '#' || position::VARCHAR)"
                    " FROM prompts WHERE set_name = ?",
                    [set_name],
                ).fetchall()
            )
            seen: dict[str, str] = {}
            duplicates: list[str] = []
            rows = []
            start = cur.execute(
                "SELECT coalesce(max(position) + 1, 0) FROM prompts WHERE set_name = ?", [set_name]
            ).fetchone()[0]
            for p in prompts:
                if p.content_hash in seen:
                    duplicates.append(f"{p.location} repeats {seen[p.content_hash]}")
                    continue
                if p.content_hash in existing:
                    duplicates.append(
                        f"{p.location} is already in set '{set_name}' (prompt {existing[p.content_hash]})"
                    )
                    continue
                seen[p.content_hash] = p.location
                rows.append(
                    {
                        "id": new_id(),
                        "set_name": set_name,
                        "position": start + len(rows),
                        "external_id": p.external_id,
                        "messages": json.dumps(p.messages, ensure_ascii=False),
                        "content_hash": p.content_hash,
                        "metadata": json.dumps(p.metadata, ensure_ascii=False, default=str),
                    }
                )
            cur.execute(
                "INSERT INTO prompt_sets (name, source) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [set_name, source],
            )
            if rows:
                frame = pd.DataFrame(rows)
                cur.register("incoming_prompts", frame)
                try:
                    cur.execute(
                        "INSERT INTO prompts (id, set_name, position, external_id, messages,"
                        " content_hash, metadata) SELECT id, set_name, position, external_id,"
                        " messages::JSON, content_hash, metadata::JSON FROM incoming_prompts"
                    )
                finally:
                    cur.unregister("incoming_prompts")
        self.memo.pop(("prompt_count", set_name), None)
        return ImportResult(set_name, len(rows), duplicates)

    def prompt_sets(self) -> list[dict[str, Any]]:
        return self.query(
            "SELECT s.name, s.source, s.created_at, count(p.id) AS prompts"
            " FROM prompt_sets s LEFT JOIN prompts p ON p.set_name = s.name"
            " GROUP BY ALL ORDER BY s.created_at"
        )

    def prompts(self, set_name: str) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM prompts WHERE set_name = ? ORDER BY position", [set_name])
        return [decode_json_columns(r, "messages", "metadata") for r in rows]

    def prompt(self, prompt_id: str) -> dict[str, Any]:
        rows = self.query("SELECT * FROM prompts WHERE id = ?", [prompt_id])
        if not rows:
            raise StoreError(f"prompt '{shorten(prompt_id)}' does not exist")
        return decode_json_columns(rows[0], "messages", "metadata")

    # generations --------------------------------------------------------------
    def add_generations(self, rows: Sequence[dict[str, Any]]) -> None:
        """Store the completions of one sampling call together, or none of them."""
        if not rows:
            return
        frame = pd.DataFrame(
            [
                {
                    **r,
                    "messages": json.dumps(r["messages"], ensure_ascii=False),
                    "sampling": json.dumps(r.get("sampling") or {}),
                }
                for r in rows
            ]
        )
        cols = [
            "id",
            "request_id",
            "choice_index",
            "prompt_id",
            "messages",
            "model_version",
            "text",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "latency_ms",
            "temperature",
            "top_p",
            "max_tokens",
            "seed",
            "sampling",
        ]
        select = ", ".join(f"{c}::JSON" if c in ("messages", "sampling") else c for c in cols)
        with self.transaction() as cur:
            cur.register("incoming_generations", frame[cols])
            try:
                cur.execute(
                    f"INSERT INTO generations ({', '.join(cols)}) SELECT {select} FROM incoming_generations"
                )
            finally:
                cur.unregister("incoming_generations")

    def generations(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        rows = self.query(
            "SELECT * FROM generations WHERE list_contains(?, id) ORDER BY request_id, choice_index",
            [list(ids)],
        )
        return [decode_json_columns(r, "messages", "sampling") for r in rows]

    def count(self, table: str) -> int:
        """Rows in one of the studio's tables (the name is checked against the catalog)."""
        known = {r[0] for r in self.cursor().execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if table not in known:
            raise ValueError(f"unknown table {table}")
        return self.cursor().execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def _is_unencodable(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.InvalidInputException) and "cannot encode str as UTF-8" in str(exc)


def _unencodable_error(exc: BaseException) -> StoreError:
    # The last line of defence: inputs are checked by name where they enter (studio.textcheck),
    # but a lone surrogate that slips past them is a bad input (4xx), not a server failure.
    return StoreError(
        "a text value holds a lone surrogate (such as a JSON '\\ud800' escape without its pair), "
        "which is not valid Unicode and cannot be stored; nothing was stored, fix the text's encoding"
    )


def decode_json_columns(row: dict[str, Any], *json_cols: str) -> dict[str, Any]:
    """`row` with the named JSON columns parsed (DuckDB hands JSON back as text); changed in place."""
    for col in json_cols:
        if isinstance(row.get(col), str):
            row[col] = json.loads(row[col])
    return row
