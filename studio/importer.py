"""Read prompt sets from JSONL, CSV, Parquet or a `datasets` save_to_disk folder.

Every record is validated before anything is stored, so a bad file stores
nothing, and the error names the file, the line or row, and the field.

A record holds a prompt as either
  - `prompt`: a string, or a list of chat messages, or
  - `messages`: a list of chat messages ({"role": ..., "content": ...}),
plus an optional `id`. Every other column is kept as metadata.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from studio.store import ImportedPrompt

ROLES = ("system", "user", "assistant")
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
    """A prompt string becomes one user message; a message list is checked item by item."""
    if isinstance(value, str):
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
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise PromptFileError(
                f"{where}: field '{field}' item {i} is {type(msg).__name__} "
                "(expected an object with 'role' and 'content')"
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise PromptFileError(
                f"{where}: field '{field}' item {i}: role {role!r} is not one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str) or not content.strip():
            raise PromptFileError(f"{where}: field '{field}' item {i}: 'content' must be a non-empty string")
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
    metadata = {k: v for k, v in record.items() if k not in (*PROMPT_FIELDS, "id")}
    return ImportedPrompt(
        location=where,
        messages=messages,
        content_hash=messages_hash(messages),
        external_id=None if raw_id is None else str(raw_id),
        metadata=_plain(metadata),
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
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(
                    f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one JSON object"
                ) from None


def _csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
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
                try:
                    record["messages"] = json.loads(record["messages"])
                except json.JSONDecodeError:
                    raise PromptFileError(
                        f"{where}: field 'messages' is not valid JSON "
                        "(a CSV 'messages' cell holds a JSON list of chat messages)"
                    ) from None
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
