"""Read prompt sets from JSONL, CSV, Parquet or a `datasets` save_to_disk folder.

Every record is validated before anything is stored, so a bad file stores
nothing, and the error names the file, the line or row, and the field.

A record holds a prompt as either
  - `prompt`: a string, or a list of chat messages, or
  - `messages`: a list of chat messages ({"role": ..., "content": ...}),
plus an optional `id`. Every other column is kept as metadata.

Limits (studio.textcheck): a prompt holds at most MAX_PROMPT_CHARS characters over all its
messages, one JSONL line (or one record's metadata) at most MAX_RECORD_BYTES, metadata nests at
most MAX_JSON_DEPTH deep, and all text must be valid Unicode (no lone surrogates).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from studio.store import ImportedPrompt
from studio.textcheck import (
    MAX_JSON_DEPTH,
    MAX_PROMPT_CHARS,
    MAX_RECORD_BYTES,
    check_json,
    check_text,
    shorten,
)

ROLES = ("system", "user", "assistant")
MAX_ID_CHARS = 1_000
PROMPT_FIELDS = ("prompt", "messages")
FORMATS = ("jsonl", "csv", "parquet", "datasets")


class PromptFileError(ValueError):
    """The file cannot be imported; the message says where and how to fix it."""


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "datasets"
        raise PromptFileError(
            f"{path}: a folder, but not one written by datasets' save_to_disk "
            "(no dataset_info.json or dataset_dict.json); pass a .jsonl, .csv or .parquet file"
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise PromptFileError(
        f"{path}: unknown format '{suffix or '(no suffix)'}'; use .jsonl, .csv, .parquet "
        "or a datasets save_to_disk folder"
    )


def messages_hash(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def normalize_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """A prompt string becomes one user message; a message list is checked item by item.

    The text of all messages together is at most MAX_PROMPT_CHARS characters."""
    if isinstance(value, str):
        check_text(value, f"{where}: field '{field}'", max_chars=MAX_PROMPT_CHARS, error=PromptFileError)
        if not value.strip():
            raise PromptFileError(f"{where}: field '{field}' is an empty string")
        return [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
        value = value.tolist()
    if not isinstance(value, list):
        raise PromptFileError(
            f"{where}: field '{field}' is {type(value).__name__} "
            "(expected a string or a list of chat messages)"
        )
    if not value:
        raise PromptFileError(f"{where}: field '{field}' is an empty list of messages")
    out = []
    total = 0
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise PromptFileError(
                f"{where}: field '{field}' item {i} is {type(msg).__name__} "
                "(expected an object with 'role' and 'content')"
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise PromptFileError(
                f"{where}: field '{field}' item {i}: role {shorten(role)!r} is not one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str) or not content.strip():
            raise PromptFileError(f"{where}: field '{field}' item {i}: 'content' must be a non-empty string")
        check_text(
            content,
            f"{where}: field '{field}' item {i} 'content'",
            max_chars=MAX_PROMPT_CHARS,
            error=PromptFileError,
        )
        total += len(content)
        if total > MAX_PROMPT_CHARS:
            raise PromptFileError(
                f"{where}: field '{field}': the messages hold over {MAX_PROMPT_CHARS:,} characters "
                "together, the limit for one prompt; shorten them"
            )
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise PromptFileError(
            f"{where}: field '{field}': the last message is from the assistant; "
            "a prompt must end with a user (or system) turn for the model to answer"
        )
    return out


def to_prompt(record: Any, where: str) -> ImportedPrompt:
    if not isinstance(record, dict):
        raise PromptFileError(
            f"{where}: expected an object with a 'prompt' or 'messages' field, got {type(record).__name__}"
        )
    present = [f for f in PROMPT_FIELDS if record.get(f) is not None]
    if not present:
        raise PromptFileError(
            f"{where}: field 'prompt' is missing "
            "(expected a string or a list of chat messages, or a 'messages' list)"
        )
    if len(present) == 2:
        raise PromptFileError(f"{where}: both 'prompt' and 'messages' are set; keep one of them")
    field = present[0]
    messages = normalize_messages(record[field], where, field)
    raw_id = record.get("id")
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise PromptFileError(f"{where}: field 'id' must be a string or an integer")
    if isinstance(raw_id, str):
        check_text(raw_id, f"{where}: field 'id'", max_chars=MAX_ID_CHARS, error=PromptFileError)
    metadata = {k: v for k, v in record.items() if k not in (*PROMPT_FIELDS, "id")}
    check_json(metadata, f"{where}: metadata", max_depth=MAX_JSON_DEPTH, error=PromptFileError)
    metadata = _plain(metadata)
    size = len(json.dumps(metadata, ensure_ascii=False, default=str).encode())
    if size > MAX_RECORD_BYTES:
        raise PromptFileError(
            f"{where}: the other fields (kept as metadata) take {size:,} bytes, over the limit of "
            f"{MAX_RECORD_BYTES:,} for one record; drop the big columns before importing"
        )
    return ImportedPrompt(
        location=where,
        messages=messages,
        content_hash=messages_hash(messages),
        external_id=None if raw_id is None else str(raw_id),
        metadata=metadata,
    )


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (from Parquet/datasets) into JSON-friendly Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as fh:
        lineno = 0
        # readline with a limit: a line over the limit is refused without being read whole
        while raw := fh.readline(MAX_RECORD_BYTES + 1):
            lineno += 1
            where = f"{path} line {lineno}"
            if len(raw.rstrip(b"\r\n")) > MAX_RECORD_BYTES:
                raise PromptFileError(
                    f"{where}: longer than {MAX_RECORD_BYTES:,} bytes, the limit for one record; "
                    "shorten the prompt or drop the big fields"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptFileError(
                    f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line)"
                ) from None
            if not line.strip():
                continue
            yield where, _json_record(line, where, "each line must be one JSON object")


def _json_record(text: str, where: str, expected: str, subject: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(
            f"{where}: {subject}not valid JSON ({exc.msg} at column {exc.colno}); {expected}"
        ) from None
    except RecursionError:
        # Python's parser recurses once per level: thousands of nested brackets overflow it
        raise PromptFileError(
            f"{where}: {subject}JSON nested too deep to read (limit {MAX_JSON_DEPTH} levels); {expected}"
        ) from None


def _csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            yield from _csv_rows(path, reader)
        except csv.Error as exc:  # e.g. a cell over the csv module's field size limit (131,072)
            # line_num counts the lines of the records read whole: the bad one starts after them
            raise PromptFileError(f"{path} line {reader.line_num + 1}: not readable as CSV ({exc})") from None


def _csv_rows(path: Path, reader: csv.DictReader) -> Iterator[tuple[str, Any]]:
    if not reader.fieldnames or not set(PROMPT_FIELDS) & set(reader.fieldnames):
        raise PromptFileError(
            f"{path} line 1: the header has no 'prompt' or 'messages' column "
            f"(found: {', '.join(reader.fieldnames or []) or 'nothing'})"
        )
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if None in row:
            raise PromptFileError(f"{where}: more fields than the header has columns")
        record: dict[str, Any] = {k: (v if v != "" else None) for k, v in row.items()}
        if record.get("messages") is not None:
            # CSV has no lists: a 'messages' cell holds the list as JSON.
            record["messages"] = _json_record(
                record["messages"],
                where,
                "a CSV 'messages' cell holds a JSON list of chat messages",
                subject="field 'messages' is ",
            )
        yield where, record


def _rows(path: Path, rows: Iterable[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows, start=1):
        yield f"{path} row {i}", row


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise PromptFileError(f"{path}: not a readable Parquet file ({exc})") from None
    yield from _rows(path, table.to_pylist())


def _datasets(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        names = list(data.keys())
        if split is None and len(names) == 1:
            split = names[0]
        if split not in data:
            raise PromptFileError(
                f"{path}: the dataset has splits {', '.join(names)}; choose one with --split NAME"
            )
        data = data[split]
    elif split is not None:
        raise PromptFileError(f"{path}: --split {split} given, but the dataset has no splits")
    yield from _rows(path, iter(data))


def read_prompts(path: Path | str, fmt: str | None = None, split: str | None = None) -> list[ImportedPrompt]:
    """Parse and validate the whole file; raise PromptFileError at the first bad record."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: no such file or folder")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise PromptFileError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
    readers = {
        "jsonl": lambda: _jsonl(path),
        "csv": lambda: _csv(path),
        "parquet": lambda: _parquet(path),
        "datasets": lambda: _datasets(path, split),
    }
    try:
        prompts = [to_prompt(record, where) for where, record in readers[fmt]()]
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not prompts:
        raise PromptFileError(f"{path}: no prompts found (the file is empty)")
    return prompts
