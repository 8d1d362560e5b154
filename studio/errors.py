"""The error every check of user input raises: the REST layer answers it with a 4xx, the CLI prints it.

It lives apart from the store so that small validators (names, text) can raise it without
importing the database layer, which itself calls them.
"""

from __future__ import annotations


class StoreError(ValueError):
    """A write was refused; nothing was stored."""


class StorageFullError(RuntimeError):
    """The disk under the data directory is full: the write was refused and nothing was stored.

    Not the user's input (so not a 4xx), not a part that is down (not a 503): REST answers 507
    (Insufficient Storage). The studio keeps serving what only reads, and writes again as soon
    as there is space (DuckDB rolls the failed transaction back and stays usable)."""


NO_SPACE = "No space left on device"


def storage_full(exc: BaseException) -> StorageFullError | None:
    """The StorageFullError `exc` stands for (a DuckDB commit or a file write that found the disk
    full), or None when it is another error."""
    import errno

    if isinstance(exc, StorageFullError):
        return exc
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or NO_SPACE in str(exc):
        return StorageFullError(
            "the disk under the studio's data directory is full, so this was not stored (nothing "
            "was changed); free some space there and try again: the studio resumes by itself"
        )
    return None
