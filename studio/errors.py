"""The error every check of user input raises: the REST layer answers it with a 4xx, the CLI prints it.

It lives apart from the store so that small validators (names, text) can raise it without
importing the database layer, which itself calls them.
"""

from __future__ import annotations


class StoreError(ValueError):
    """A write was refused; nothing was stored."""
