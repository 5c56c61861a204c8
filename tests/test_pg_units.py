"""The PostgreSQL engine's pure parts: URLs as shown and as accepted (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyring_hardened.config import Config, check_url
from keyring_hardened.errors import ConfigError
from keyring_hardened.pgstorage import display_url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://app:s3cret-pw@db.example.com:5433/vault?sslmode=verify-full",
     "postgresql://app@db.example.com:5433/vault"),
    ("postgresql://app@db.example.com/vault?password=s3cret-pw",
     "postgresql://app@db.example.com/vault"),
    ("postgresql:///vault?host=/run/postgresql&user=app&password=s3cret-pw",
     "postgresql://app@[/run/postgresql]/vault"),
    ("postgresql://", "postgresql://localhost/"),
    ("postgresql://[bad", "postgresql://(unparsable URL)"),
])
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert display_url(url) == shown
    assert "s3cret" not in display_url(url)


def test_what_a_storage_url_may_be() -> None:
    assert check_url("postgresql://app@db/vault") is None
    assert check_url("postgres://app@db/vault") is None
    assert "expected a postgresql:// URL" in (check_url("mysql://app@db/vault") or "")
    assert "expected a postgresql:// URL" in (check_url("sqlite:///tmp/x.db") or "")
    # A password: allowed in the environment (private to the user), never in the config.
    assert check_url("postgresql://app:pw@db/vault") is None
    assert "holds a password" in (check_url("postgresql://app:pw@db/vault", in_config=True)
                                  or "")
    assert "holds a password" in (check_url("postgresql://app@db/vault?password=pw",
                                            in_config=True) or "")


def test_the_config_refuses_a_bad_storage_section() -> None:
    with pytest.raises(ConfigError, match=r"storage\.url: expected a postgresql:// URL"):
        Config.from_mapping({"storage": {"url": 5}})
    with pytest.raises(ConfigError, match=r"storage\.url: holds a password") as caught:
        Config.from_mapping({"storage": {"url": "postgresql://a:topsecret@h/d"}})
    assert "topsecret" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"storage\.password_keyring"):
        Config.from_mapping({"storage": {"password_keyring": ""}})
    config = Config.from_mapping({"storage": {"url": "postgresql://a@h/d",
                                              "password_command": ["pass", "show", "db"],
                                              "password_keyring": "db.example"}})
    assert config.storage_url == "postgresql://a@h/d"
    assert config.storage_password_command == ("pass", "show", "db")
    assert config.storage_password_keyring == "db.example"


# -- the database password from another keyring (pgpassword.py) -------------------


class _Backend:
    """A stand-in keyring backend: a dict, or a failure."""

    def __init__(self, found: str | None = None, fail: bool = False) -> None:
        self.found, self.fail = found, fail
        self.asked: list[tuple[str, str]] = []

    def get_password(self, service: str, username: str) -> str | None:
        self.asked.append((service, username))
        if self.fail:
            raise RuntimeError("backend says: pw-in-error-text")
        return self.found


def test_the_password_from_another_keyring_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    import keyring

    from keyring_hardened import pgpassword
    from keyring_hardened.errors import StorageError

    backend = _Backend("s3cret")
    monkeypatch.setattr(keyring, "get_keyring", lambda: backend)
    assert pgpassword.from_keyring("postgresql://app@db/v", "db.example") == "s3cret"
    assert pgpassword.from_keyring("postgresql://db/v?user=ci", "db.example") == "s3cret"
    assert backend.asked == [("db.example", "app"), ("db.example", "ci")]
    monkeypatch.delenv("PGUSER", raising=False)
    with pytest.raises(ConfigError, match="names no user"):
        pgpassword.from_keyring("postgresql://db/v", "db.example")
    monkeypatch.setenv("PGUSER", "fromenv")
    assert pgpassword.from_keyring("postgresql://db/v", "db.example") == "s3cret"
    monkeypatch.setattr(keyring, "get_keyring", lambda: _Backend(None))
    with pytest.raises(StorageError, match=r"no password for 'db\.example' user 'app'"):
        pgpassword.from_keyring("postgresql://app@db/v", "db.example")
    monkeypatch.setattr(keyring, "get_keyring", lambda: _Backend(fail=True))
    with pytest.raises(StorageError, match=r"could not be read \(RuntimeError\)") as caught:
        pgpassword.from_keyring("postgresql://app@db/v", "db.example")
    assert "pw-in-error-text" not in str(caught.value)
    # Asked again while it looks one up (a backend that opens this vault): refused.
    monkeypatch.setattr(pgpassword._BUSY, "busy", True)
    with pytest.raises(ConfigError, match="asked for the vault that needs the password"):
        pgpassword.from_keyring("postgresql://app@db/v", "db.example")


def test_keyring_hardened_is_never_asked_for_its_own_database_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import keyring
    from keyring.backends.chainer import ChainerBackend

    from keyring_hardened import pgpassword
    from keyring_hardened.backend import HardenedKeyring

    monkeypatch.setattr(keyring, "get_keyring", HardenedKeyring)
    with pytest.raises(ConfigError, match="keyring-hardened itself"):
        pgpassword.from_keyring("postgresql://app@db/v", "db.example")
    chain = ChainerBackend()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(type(chain), "backends", [HardenedKeyring()])
    monkeypatch.setattr(keyring, "get_keyring", lambda: chain)
    with pytest.raises(ConfigError, match="keyring-hardened itself"):
        pgpassword.from_keyring("postgresql://app@db/v", "db.example")


# -- migrate-storage's comparison and targets (migrate.py) -------------------------


def test_migrate_compares_values_across_engines_types() -> None:
    from keyring_hardened.migrate import _same

    assert _same(1, 1.0)
    assert _same(float("nan"), float("nan"))
    assert not _same(1.0, 2)
    assert _same(b"ab", memoryview(b"ab"))
    assert not _same(b"ab", b"ac")
    assert not _same(True, 1)
    assert _same(True, True)
    assert _same("x", "x")
    assert not _same("1", 1)
    assert _same(None, None)


@pytest.mark.parametrize(("url", "message"), [
    ("sqlite:relative.db", "sqlite:///ABSOLUTE/PATH"),
    ("sqlite:///", "needs a file name"),
    ("sqlite:///nonexistent-folder-kh/x.db", "does not exist"),
    ("mysql://h/db", "expected a postgresql:// URL"),
])
def test_migrate_refuses_what_cannot_be_a_target(tmp_path: Path, url: str, message: str) -> None:
    from keyring_hardened.errors import UsageError
    from keyring_hardened.migrate import migrate_storage
    from keyring_hardened.store import Store

    with Store.init(tmp_path / "vault") as s:
        with pytest.raises(UsageError, match=message):
            migrate_storage(s, url)
        existing = tmp_path / "there.db"
        existing.write_text("x")
        with pytest.raises(UsageError, match="exists"):
            migrate_storage(s, f"sqlite://{existing}")


def test_migrate_removes_a_copy_that_does_not_read_back(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from keyring_hardened.errors import IntegrityError
    from keyring_hardened.migrate import migrate_storage
    from keyring_hardened.storage import SQLiteStorage
    from keyring_hardened.store import Store

    real = SQLiteStorage.export_rows
    calls = {"n": 0}

    def flaky(self: SQLiteStorage, table: str) -> list[tuple[object, ...]]:
        rows = real(self, table)
        calls["n"] += 1
        # The source's snapshot reads every table once; the copy's read-back differs.
        if calls["n"] > 12 and table == "credentials":
            return [(*r[:1], "changed", *r[2:]) for r in rows]
        return rows

    with Store.init(tmp_path / "vault") as s:
        s.set("svc", "u", "v")
        monkeypatch.setattr(SQLiteStorage, "export_rows", flaky)
        out = tmp_path / "copy.db"
        with pytest.raises(IntegrityError, match="does not read back table credentials"):
            migrate_storage(s, f"sqlite://{out}")
        assert not out.exists()
        monkeypatch.setattr(SQLiteStorage, "export_rows", real)
        events = [e for e in s.trail.show(limit=50) if e.op == "migrate-storage"]
        assert [e.outcome for e in events] == ["integrity"]


def test_rows_of_the_wrong_type_are_damage() -> None:
    from keyring_hardened.errors import IntegrityError
    from keyring_hardened.rowtypes import _typed

    assert _typed((1, 2.0), (int, float), "x") == (1, 2.0)
    assert _typed((1, 2), (int, float), "x") == (1, 2)  # a whole REAL read back as int
    with pytest.raises(IntegrityError, match="stored x holds a value of the wrong type"):
        _typed((1, "2"), (int, float), "x")
    with pytest.raises(IntegrityError):
        _typed((1, True), (int, float), "x")


def test_set_with_a_broken_config_is_exit_2_naming_it(tmp_path: Path) -> None:
    from keyring_hardened.store import Store

    from .conftest import run_cli

    home = tmp_path / "vault"
    Store.init(home).close()
    config = home / "config.toml"
    config.write_text("max_versions = 'many'\n")
    config.chmod(0o600)
    done = run_cli("set", "svc", "u", stdin="v", home=home)
    assert done.returncode == 2
    assert "max_versions" in done.stderr
    assert "created a new" not in done.stderr
