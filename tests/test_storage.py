from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from keyring_hardened import storage
from keyring_hardened.audit import Event
from keyring_hardened.config import Config
from keyring_hardened.errors import ConfigError, IntegrityError, StorageError, UsageError
from keyring_hardened.storage import SQLiteStorage
from keyring_hardened.store import Store


@pytest.fixture
def db(home: Path) -> Path:
    with Store.init(home) as s:
        s.set("svc", "u", "x")
    return home / "vault.db"


def test_pragmas_and_schema(db: Path) -> None:
    st = SQLiteStorage.open(db)
    try:
        conn = st._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert st.schema() == [name for name, _ in storage.MIGRATIONS]
        assert st.schema()[:3] == ["0001_initial", "0002_audit", "0003_ttl"]
        assert conn.isolation_level is None
    finally:
        st.close()
    full = SQLiteStorage.open(db, synchronous="full")
    assert full._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    full.close()


def test_new_migration_is_applied_and_recorded(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    known = storage.MIGRATIONS
    extra = (*known, ("9000_example", ("CREATE TABLE example (x INTEGER)",)))
    monkeypatch.setattr(storage, "MIGRATIONS", extra)
    st = SQLiteStorage.open(db)
    assert st.schema() == [*(name for name, _ in known), "9000_example"]
    assert st._conn.execute("PRAGMA user_version").fetchone()[0] == len(extra)
    st.close()
    monkeypatch.setattr(storage, "MIGRATIONS", known)
    with pytest.raises(UsageError, match="newer than this keyring-hardened supports"):
        SQLiteStorage.open(db)


def test_unknown_migration_is_refused(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES ('9999_future', 0)")
        conn.execute("PRAGMA user_version = 0")
    with pytest.raises(UsageError, match="9999_future"):
        SQLiteStorage.open(db)


def test_busy_beyond_timeout_is_storage_error(db: Path) -> None:
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with Store.open(db.parent, config=Config(busy_timeout=0.2)) as s:
            # Reads append an audit event, so they wait for the writer too.
            with pytest.raises(StorageError, match="busy"):
                s.get("svc", "u")
            with pytest.raises(StorageError, match="busy"):
                s.set("svc", "u", "y")
            blocker.rollback()
            assert s.get("svc", "u").reveal() == "x"
    finally:
        if blocker.in_transaction:
            blocker.rollback()
        blocker.close()


@pytest.mark.parametrize(("name", "message", "kind"), [
    ("SQLITE_CORRUPT", "malformed", IntegrityError),
    ("SQLITE_NOTADB", "not a database", IntegrityError),
    ("SQLITE_BUSY", "database is locked", StorageError),
    ("SQLITE_IOERR", "disk I/O error", StorageError),
    ("SQLITE_FULL", "database or disk is full", StorageError),
    ("", "no such table: credentials", IntegrityError),
])
def test_error_translation(name: str, message: str, kind: type[Exception]) -> None:
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorname = name
    assert isinstance(storage._translate(exc, Path("/v/vault.db")), kind)


def test_dropped_table_is_integrity(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE secret_versions")
    with Store.open(db.parent) as s, pytest.raises(IntegrityError, match="damaged"):
        s.get("svc", "u")


def test_create_loses_race_cleanly(db: Path) -> None:
    vault = storage.VaultRecord(b"x" * 16, 0.0, '{"algorithm": "keyfile"}', b"v", b"k", 1)
    kek = storage.KekRecord(1, "active", 0.0, b"w", 0)
    before = db.read_bytes()
    event = Event(1, 0, "test", "init", None, None, "ok", 1, None, b"m", 1, b"r" * 32)
    assert SQLiteStorage.create(db, vault, kek, event, {(255, 0): b"m" * 32}) is False
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["master.key", "vault.db"]


def test_unreadable_database_file(home: Path) -> None:
    home.mkdir()
    (home / "vault.db").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        SQLiteStorage.open(home / "vault.db")
