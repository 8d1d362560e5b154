"""Checks for text that enters the studio: prompts, rationales, edits, guidelines, metadata.

Text must be a string that UTF-8 can encode (a lone surrogate such as a JSON "\\ud800" escape
cannot be stored by DuckDB, sent to vLLM or exported) and no longer than its limit. JSON
values (prompt metadata) must also nest no deeper than a limit: Python's JSON and the
studio's own walks recurse, so a value nested thousands deep would end in a RecursionError.

The limits, chosen well above real use and well below what hurts:
- a prompt: MAX_PROMPT_CHARS over all its messages. The served model reads 2,048 tokens
  (about 8,000 characters of English); 100,000 leaves room for a bigger model's context.
- a rationale: MAX_RATIONALE_CHARS; an edited answer: MAX_EDIT_CHARS (max_tokens is at most
  8,192 tokens, about 33,000 characters); campaign guidelines: MAX_GUIDELINES_CHARS.
- one JSONL line (or one CSV/Parquet record's metadata): MAX_RECORD_BYTES.
- nesting of JSON values: MAX_JSON_DEPTH.
- an id or idempotency key sent by a client: MAX_KEY_CHARS.
"""

from __future__ import annotations

from typing import Any

from studio.errors import StoreError

MAX_PROMPT_CHARS = 100_000
MAX_RATIONALE_CHARS = 10_000
MAX_EDIT_CHARS = 100_000
MAX_GUIDELINES_CHARS = 100_000
MAX_RECORD_BYTES = 2 * 1024 * 1024
MAX_JSON_DEPTH = 64
MAX_KEY_CHARS = 200  # an id or an idempotency key a client sends back (ours are 32 hex digits)
SHOWN_CHARS = 40


def shorten(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` as text of at most `limit` characters, for echoing user input in a message."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate, shown escaped
    return text if len(text) <= limit else text[:limit] + "…"


def listing(items: list[str], limit: int = 20) -> str:
    """'a, b, c' for a "known: ..." message, each item shortened and at most `limit` of them."""
    shown = ", ".join(shorten(i) for i in items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def unencodable(value: str) -> int | None:
    """The index of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_text(
    value: object,
    where: str,
    *,
    max_chars: int,
    error: type[Exception] = StoreError,
    optional: bool = False,
) -> Any:
    """Return `value` if it is a storable string of at most `max_chars` characters.

    `where` names the input for the message ("rationale", "prompts.jsonl line 3: field
    'prompt'"); `error` is the exception to raise (the importer raises its own).
    `optional`: None is accepted and returned as it is.
    """
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise error(f"{where}: expected text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise error(f"{where}: {len(value):,} characters, over the limit of {max_chars:,}; shorten it")
    bad = unencodable(value)
    if bad is not None:
        raise error(
            f"{where}: character {bad + 1} is a lone surrogate ({value[bad]!r}), which is not valid "
            "Unicode text; fix the encoding of the source (a JSON '\\ud800' escape needs its pair)"
        )
    return value


def check_json(
    value: Any,
    where: str,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    error: type[Exception] = StoreError,
) -> Any:
    """Return `value` (parsed JSON) if it nests at most `max_depth` deep and all its text is storable.

    Iterative, so that checking a value nested too deep cannot itself overflow the stack.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if unencodable(item) is not None:
                check_text(item, f"{where}: text {shorten(item)!r}", max_chars=len(item), error=error)
            continue
        if isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                raise error(f"{where}: nested more than {max_depth} levels deep; flatten it")
            if isinstance(item, dict):
                for key, sub in item.items():
                    stack.append((key, depth + 1))
                    stack.append((sub, depth + 1))
            else:
                stack.extend((sub, depth + 1) for sub in item)
    return value
