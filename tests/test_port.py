"""The storage port: SQLite implements it, and the core reaches storage only through it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from keyring_hardened import engines, port, schema, storage
from keyring_hardened.pgstorage import PostgresEngine, PostgresStorage
from keyring_hardened.port import Engine, Storage
from keyring_hardened.storage import SQLiteStorage
from keyring_hardened.store import Store

# Checked by mypy --strict (make lint), not only here at run time: the SQLite
# engine is structurally a Storage, and its class is an Engine.
_ENGINE: Engine = SQLiteStorage
_PG_ENGINE: Engine = PostgresEngine("postgresql://u@h/db")


def _as_port(engine_storage: SQLiteStorage) -> Storage:
    return engine_storage


def _pg_as_port(engine_storage: PostgresStorage) -> Storage:
    return engine_storage


def _members(proto: type) -> list[str]:
    return sorted(name for name, value in vars(proto).items()
                  if not name.startswith("_") and callable(value))


@pytest.fixture
def opened(tmp_path: Path) -> SQLiteStorage:
    with Store.init(tmp_path / "home"):
        pass
    return SQLiteStorage.open(tmp_path / "home" / "vault.db")


def test_sqlite_storage_satisfies_the_port(opened: SQLiteStorage) -> None:
    try:
        assert isinstance(_as_port(opened), Storage)
        assert isinstance(opened.path, Path)
    finally:
        opened.close()


@pytest.mark.parametrize(("proto", "impl"), [(Storage, SQLiteStorage), (Engine, SQLiteStorage),
                                             (Storage, PostgresStorage),
                                             (Engine, PostgresEngine)])
def test_every_port_operation_has_the_same_signature_in_sqlite(proto: type, impl: type) -> None:
    # Names, order, kinds and defaults: a caller written against the port
    # (positional or by keyword) calls the engine the same way.
    members = _members(proto)
    assert members
    for name in members:
        want = inspect.signature(getattr(proto, name))
        have = inspect.signature(getattr(impl, name))
        want_params = [p for p in want.parameters.values() if p.name not in ("self", "cls")]
        have_params = [p for p in have.parameters.values() if p.name not in ("self", "cls")]
        assert [(p.name, p.kind, p.default) for p in want_params] == \
            [(p.name, p.kind, p.default) for p in have_params], name


def test_the_port_names_what_the_core_uses_and_no_engine_internals() -> None:
    members = set(_members(Storage))
    assert {"transaction", "snapshot", "append_event", "audit_head", "put_lease",
            "put_buckets", "versions", "nodes"} <= members
    assert not {"open", "create", "open_copy", "create_from", "discard"} & members
    assert set(_members(Engine)) == {"open", "open_copy", "create", "create_from", "discard"}


def test_sqlite_is_the_default_and_a_url_selects_postgresql(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from keyring_hardened.config import Config
    from keyring_hardened.errors import ConfigError

    assert engines.engine() is SQLiteStorage
    assert engines.engine(Config()) is SQLiteStorage
    chosen = engines.engine(Config(storage_url="postgresql://app@db.example/vault"))
    assert isinstance(chosen, PostgresEngine)
    assert chosen.where == "postgresql://app@db.example/vault"
    monkeypatch.setenv("KEYRING_HARDENED_STORAGE_URL", "postgresql://ci@other.example/v")
    env = engines.engine(Config(storage_url="postgresql://app@db.example/vault"))
    assert isinstance(env, PostgresEngine)
    assert env.where == "postgresql://ci@other.example/v"  # the environment wins
    monkeypatch.setenv("KEYRING_HARDENED_STORAGE_URL", "mysql://x")
    with pytest.raises(ConfigError, match="KEYRING_HARDENED_STORAGE_URL: expected a"):
        engines.engine(Config())


def test_rows_and_schema_keep_their_old_import_paths() -> None:
    # The row values are the port's and the DDL is schema's; storage re-exports both.
    for name in ("BucketRow", "HeadRow", "KekRecord", "VaultMissingError", "VaultRecord",
                 "VersionRow"):
        assert getattr(storage, name) is getattr(port, name)
    assert storage.MIGRATIONS is schema.MIGRATIONS
    assert storage.APPLICATION_ID == schema.APPLICATION_ID == 0x4B485631
    assert set(storage.__all__) >= {"MIGRATIONS", "SQLiteStorage", "VaultMissingError"}


def test_migrations_are_named_once_and_in_order() -> None:
    names = [name for name, _ in schema.MIGRATIONS]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert all(statements for _, statements in schema.MIGRATIONS)
