"""Tests that kill mutants of operation.py which the rest of the suite let live.

An operation starts with a fresh ``_Tx``: nothing of the vault-wide rows
changed, its copy of them exact. That is what lets a session reuse the rows
it verified while the state root has not moved, instead of reading and
checking them again on every request (session.py, ``_meta``); a change of
the root makes it read them again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keyring_hardened.errors import NotFoundError
from keyring_hardened.storage import SQLiteStorage
from keyring_hardened.store import Store


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per read of the vault-wide rows from the database."""
    count: list[int] = []
    real = SQLiteStorage.meta_rows

    def counting(self: SQLiteStorage) -> object:
        count.append(1)
        return real(self)

    monkeypatch.setattr(SQLiteStorage, "meta_rows", counting)
    return count


def test_the_vault_wide_rows_are_read_again_only_when_the_root_moved(
        home: Path, reads: list[int]) -> None:
    with Store.init(home, actor="ops") as s:
        s.set("svc", "user", "v1")
    with Store.open(home, actor="ops") as s:
        assert s.get("svc", "user").reveal() == "v1"
        reads.clear()
        assert s.get("svc", "user").reveal() == "v1"
        assert s.get("svc", "user").reveal() == "v1"
        assert reads == []  # the verified copy, reused
        with Store.open(home, actor="other") as t:
            t.set("svc", "user", "v2")  # another process moves the root
        assert s.get("svc", "user").reveal() == "v2"
        assert reads  # read and checked again


def test_a_failed_operation_leaves_the_verified_copy_usable(home: Path,
                                                          reads: list[int]) -> None:
    with Store.init(home, actor="ops") as s:
        s.set("svc", "user", "v1")
    with Store.open(home, actor="ops") as s:
        assert s.get("svc", "user").reveal() == "v1"
        for _ in range(2):
            with pytest.raises(NotFoundError):
                s.get("svc", "nobody")  # fails in its body: its changes undone
            reads.clear()
            assert s.get("svc", "user").reveal() == "v1"
            with pytest.raises(NotFoundError):
                s.delete("svc", "nobody")  # a write that fails
            assert s.get("svc", "user").reveal() == "v1"
            assert reads == []
