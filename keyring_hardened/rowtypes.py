"""The Python types of stored columns, checked on every row an engine reads.

A tampered store may hold anything (SQLite lets any column hold any type),
so each engine checks each row against these before the core sees it; the
core then checks the values against the vault's authenticated state.
"""

from __future__ import annotations

from typing import Any

from .errors import IntegrityError

_N = type(None)
_VAULT_TYPES = (bytes, float, str, bytes, bytes, int, int)
_KEK_TYPES = (int, str, float, (bytes, _N), int)
_HEAD_TYPES = (int, str, str, (int, _N), int, float, float, bytes, (float, int, _N), (bytes, _N),
               (bytes, _N))
_VERSION_TYPES = (int, int, bytes, bytes, float, (float, int, _N), (float, int, _N), (bytes, _N))
_REWRAP_TYPES = (int, str, str, int, int, bytes)
_BUCKET_TYPES = (str, str, (float, int), (float, int))
_EVENT_TYPES = (int, int, str, str, (str, _N), (str, _N), str, (int, _N), (str, _N), bytes,
                (int, _N), (bytes, _N))


def _typed(row: tuple[Any, ...] | Any, types: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    """Check each column's Python type: SQLite lets a tampered row hold any type."""
    if all(map(isinstance, row, types)):  # the common case, checked at C speed
        return tuple(row)
    for value, expected in zip(row, types, strict=True):
        # bool is never stored; exact int checks keep True/False out anyway.
        if not isinstance(value, expected) or (expected is float and isinstance(value, bool)):
            if expected is float and type(value) is int:
                continue  # SQLite returns whole REAL values as int after some edits
            raise IntegrityError(f"stored {what} holds a value of the wrong type (tampered?)",
                                 "column-type")
    return tuple(row)
