"""The one rule for names people give things: model versions, aliases, prompt sets, campaigns, users.

A name is 1 to 64 characters: letters, digits, '.', '_' and '-', starting with a letter or a
digit (user names may also hold '@', for e-mail style names). So a name is safe as a file or
folder name, in a URL path and in HTML, and short enough to list. Names stored before this
rule existed stay readable; only new ones are checked.

A served model id of an external OpenAI-compatible server (`--backend-url`) is the one
exception: requests must name the model exactly as that server does ("org/model", say), so
such a version may also hold '/' and ':' (but no '..' and no leading '/').
"""

from __future__ import annotations

import re
from collections.abc import Callable

from studio.errors import StoreError
from studio.textcheck import shorten, unencodable

MAX_NAME = 64
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
USER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
SERVED_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
KINDS = ("version", "alias", "prompt set", "campaign", "user", "served model")

_RULES = {
    "user": (USER_NAME_RE, "1-64 letters, digits, '.', '_', '@' or '-'"),
    "served model": (SERVED_ID_RE, "1-128 letters, digits, '.', '_', ':', '/' or '-', without '..'"),
}
_DEFAULT_RULE = (NAME_RE, "1-64 letters, digits, '.', '_' or '-'")


def is_valid(kind: str, value: object) -> bool:
    pattern = _RULES.get(kind, _DEFAULT_RULE)[0]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        return False
    return kind != "served model" or ".." not in value


def check_name(kind: str, value: object) -> str:
    """Return `value` if it is a valid name for `kind` (one of KINDS), else raise StoreError.

    The message echoes at most the first 40 characters of what was given.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind of name {kind!r}")
    if not isinstance(value, str):
        raise StoreError(f"{kind} name: expected text, got {type(value).__name__}")
    if not is_valid(kind, value):
        rule = _RULES.get(kind, _DEFAULT_RULE)[1]
        raise StoreError(
            f"{kind} name {shorten(value)!r}: use {rule}, starting with a letter or digit "
            "(for example 'dpo-run.2')"
        )
    return value


def check_new_name(kind: str, value: object, exists: Callable[[str], bool]) -> str:
    """`check_name` for a name about to be written, except that a name already stored (before
    the rule existed) passes: old data stays usable. `exists` looks the name up."""
    if is_valid(kind, value):
        return value  # type: ignore[return-value]
    if isinstance(value, str) and unencodable(value) is None and exists(value):
        return value
    return check_name(kind, value)
