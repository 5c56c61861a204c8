"""Which storage engine a vault opens with: the one place the core names an engine.

Everything else types against :class:`keyring_hardened.port.Storage`, so a
second engine plugs in here and nowhere else. Today there is one, SQLite;
its module (and :mod:`sqlite3`) loads only when a vault is opened.
"""

from __future__ import annotations

from .port import Engine

__all__ = ["engine"]


def engine() -> Engine:
    """The engine that opens and creates vaults (SQLite, at ``<home>/vault.db``)."""
    from .storage import SQLiteStorage

    return SQLiteStorage
