from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from keyring_hardened.config import Config
from keyring_hardened.errors import (
    ConfigError,
    IntegrityError,
    LockedError,
    NotFoundError,
    UsageError,
)
from keyring_hardened.secret import Secret
from keyring_hardened.store import Store
from keyring_hardened.testing import FrozenClock, temporary_store

from .conftest import CANARY, FAST_KDF, PASSPHRASE


def test_set_get_round_trip(store: Store) -> None:
    assert store.set("svc", "alice", "s3cret") == 1
    value = store.get("svc", "alice")
    assert isinstance(value, Secret)
    assert value.reveal() == "s3cret"


def test_set_accepts_secret_objects(store: Store) -> None:
    store.set("svc", "alice", Secret("wrapped"))
    assert store.get("svc", "alice").reveal() == "wrapped"


def test_missing_credential_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError, match="service 'svc', user 'nobody'"):
        store.get("svc", "nobody")


def test_versions_and_history(store: Store) -> None:
    for i in range(3):
        store.set("svc", "u", f"v{i}")
    assert store.get("svc", "u").reveal() == "v2"
    assert store.get("svc", "u", version=1).reveal() == "v0"
    hist = store.history("svc", "u")
    assert [v.version for v in hist] == [3, 2, 1]
    assert [v.current for v in hist] == [True, False, False]
    assert all(v.kek_version == 1 for v in hist)


def test_max_versions_prunes_oldest(home: Path) -> None:
    with Store.init(home, config=Config(max_versions=3)) as s:
        for i in range(6):
            s.set("svc", "u", f"v{i}")
        assert [v.version for v in s.history("svc", "u")] == [6, 5, 4]
        with pytest.raises(NotFoundError, match=r"version 1 .* not kept"):
            s.get("svc", "u", version=1)


def test_delete_then_rollback_restores(store: Store) -> None:
    store.set("svc", "u", "one")
    store.set("svc", "u", "two")
    store.delete("svc", "u")
    with pytest.raises(NotFoundError, match="deleted"):
        store.get("svc", "u")
    with pytest.raises(NotFoundError, match="deleted"):
        store.get("svc", "u", version=1)
    assert store.credentials() == []
    with pytest.raises(NotFoundError, match="already deleted"):
        store.delete("svc", "u")
    assert store.rollback("svc", "u") == 3
    assert store.get("svc", "u").reveal() == "two"


def test_rollback_to_previous_and_explicit(store: Store) -> None:
    store.set("svc", "u", "one")
    store.set("svc", "u", "two")
    assert store.rollback("svc", "u") == 3
    assert store.get("svc", "u").reveal() == "one"
    assert store.rollback("svc", "u", to_version=2) == 4
    assert store.get("svc", "u").reveal() == "two"
    with pytest.raises(UsageError, match="already current"):
        store.rollback("svc", "u", to_version=4)
    with pytest.raises(NotFoundError, match="not kept"):
        store.rollback("svc", "u", to_version=99)
    with pytest.raises(UsageError):
        store.rollback("svc", "u", to_version=0)


def test_rollback_without_history(store: Store) -> None:
    store.set("svc", "u", "only")
    with pytest.raises(NotFoundError, match="no earlier version"):
        store.rollback("svc", "u")
    with pytest.raises(NotFoundError):
        store.rollback("svc", "missing")


def test_purge_wipes_every_version(store: Store) -> None:
    store.set("svc", "u", CANARY)
    store.set("svc", "u", "two")
    store.delete("svc", "u", purge=True)
    with pytest.raises(NotFoundError):
        store.history("svc", "u")
    with pytest.raises(NotFoundError):
        store.rollback("svc", "u")
    with pytest.raises(NotFoundError):
        store.delete("svc", "u", purge=True)


def test_purge_of_a_deleted_credential(store: Store) -> None:
    store.set("svc", "u", "x")
    store.delete("svc", "u")
    store.delete("svc", "u", purge=True)
    assert store.status()["deleted"] == 0


def test_list_and_usernames(store: Store) -> None:
    clock = FrozenClock()
    store._clock = clock
    for service, user in (("b", "x"), ("a", "y"), ("a", "z")):
        clock.advance(1)
        store.set(service, user, "secret")
    assert [(c.service, c.username, c.version) for c in store.credentials()] == [
        ("a", "y", 1), ("a", "z", 1), ("b", "x", 1)]
    assert store.usernames("a") == ["z", "y"]
    assert store.usernames("none") == []


@pytest.mark.parametrize(("service", "username", "message"), [
    ("", "u", "service must not be empty"),
    ("s\x00", "u", "NUL"),
    ("s", "\ud800", "lone surrogates"),
    ("s" * 5000, "u", "longer than"),
    (1, "u", "must be a string"),
])
def test_bad_names_are_usage_errors(store: Store, service: object, username: str,
                                    message: str) -> None:
    with pytest.raises(UsageError, match=message):
        store.set(service, username, "x")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=message):
        store.get(service, username)  # type: ignore[arg-type]


@pytest.mark.parametrize(("secret", "message"), [
    ("\udc80", "lone surrogates"),
    ("x" * ((1 << 20) + 1), "longer than"),
    (b"bytes", "must be a string"),
])
def test_bad_secrets_are_usage_errors(store: Store, secret: object, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        store.set("s", "u", secret)  # type: ignore[arg-type]
    assert store.credentials() == []


def test_bad_version_argument(store: Store) -> None:
    store.set("s", "u", "x")
    for bad in (0, -1, True, "1"):
        with pytest.raises(UsageError):
            store.get("s", "u", version=bad)  # type: ignore[arg-type]


def test_empty_username_and_secret_are_stored(store: Store) -> None:
    store.set("s", "", "")
    assert store.get("s", "").reveal() == ""


def test_init_refuses_to_overwrite(store: Store, home: Path) -> None:
    with pytest.raises(UsageError, match="already exists"):
        Store.init(home)


def test_open_missing_vault_is_not_found_and_creates_nothing(home: Path) -> None:
    with pytest.raises(NotFoundError, match="no vault"):
        Store.open(home)
    assert not home.exists()


def test_open_create_makes_a_key_file_vault(home: Path) -> None:
    with Store.open(home, create=True) as s:
        s.set("a", "b", "c")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("vault.db", "master.key"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
    with Store.open(home) as s:
        assert s.get("a", "b").reveal() == "c"


def test_files_are_private_whatever_the_umask(home: Path) -> None:
    old = os.umask(0)
    try:
        Store.init(home).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "master.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "vault.db").stat().st_mode) == 0o600


def test_key_file_readable_by_others_is_refused(store: Store, home: Path) -> None:
    store.close()
    os.chmod(home / "master.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Store.open(home)


def test_missing_or_damaged_key_file_is_locked(store: Store, home: Path) -> None:
    store.set("s", "u", "x")
    store.close()
    key = home / "master.key"
    original = key.read_bytes()
    key.write_bytes(original[:16])
    with pytest.raises(LockedError, match="exactly 32 bytes"):
        Store.open(home)
    key.write_bytes(os.urandom(32))
    with pytest.raises(LockedError, match="wrong key file"):
        Store.open(home)
    key.unlink()
    with pytest.raises(LockedError, match="no key file"):
        Store.open(home)
    key.write_bytes(original)
    os.chmod(key, 0o600)
    with Store.open(home) as s:
        assert s.get("s", "u").reveal() == "x"


def test_key_file_env_override(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyfile = tmp_path / "elsewhere" / "k.key"
    monkeypatch.setenv("KEYRING_HARDENED_KEY_FILE", str(keyfile))
    with Store.init(home) as s:
        s.set("s", "u", "x")
    assert keyfile.exists()
    assert not (home / "master.key").exists()


def test_passphrase_vault(home: Path) -> None:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("s", "u", CANARY)
        assert "argon2id" in s.status()["kdf"]
    assert not (home / "master.key").exists()
    with Store.open(home, passphrase=PASSPHRASE) as s:
        assert s.get("s", "u").reveal() == CANARY
    with pytest.raises(LockedError, match="wrong passphrase") as info:
        Store.open(home, passphrase="not the passphrase")
    assert CANARY not in str(info.value)
    with pytest.raises(LockedError, match="needs a passphrase"):
        Store.open(home)


def test_passphrase_from_env_and_prompt(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRING_HARDENED_PASSPHRASE", PASSPHRASE)
    Store.init(home, passphrase_mode=True, config=FAST_KDF).close()
    Store.open(home).close()
    monkeypatch.delenv("KEYRING_HARDENED_PASSPHRASE")
    Store.open(home, prompt=lambda: PASSPHRASE).close()


def test_pbkdf2_vault(home: Path) -> None:
    with Store.init(home, passphrase_mode=True, kdf="pbkdf2", passphrase=PASSPHRASE) as s:
        assert "pbkdf2" in s.status()["kdf"]
        s.set("s", "u", "x")
    with Store.open(home, passphrase=PASSPHRASE) as s:
        assert s.get("s", "u").reveal() == "x"


def test_init_argument_checks(home: Path) -> None:
    with pytest.raises(UsageError, match="at least 8"):
        Store.init(home, passphrase_mode=True, passphrase="short", config=FAST_KDF)
    with pytest.raises(UsageError, match="only with --passphrase"):
        Store.init(home, kdf="pbkdf2")
    with pytest.raises(UsageError, match="argon2id or pbkdf2"):
        Store.init(home, passphrase_mode=True, kdf="scrypt", passphrase=PASSPHRASE)
    with pytest.raises(LockedError):
        Store.init(home, passphrase_mode=True, config=FAST_KDF)
    assert not (home / "vault.db").exists()


def test_status_reports_without_secrets(store: Store) -> None:
    store.set("svc", "u", CANARY)
    info = store.status()
    assert info["credentials"] == 1
    assert info["keys"][0]["wrap_count"] == 1
    assert info["mode"] == "key file"
    assert CANARY not in repr(info)
    assert info["warnings"] == []


def test_status_warns_on_open_permissions(store: Store, home: Path) -> None:
    os.chmod(home, 0o755)
    assert any("accessible by group or others" in w for w in store.status()["warnings"])


def test_closed_store_refuses(store: Store) -> None:
    store.close()
    store.close()
    with pytest.raises(UsageError, match="closed"):
        store.get("s", "u")
    assert "closed" in repr(store)


def test_store_survives_fork(store: Store) -> None:
    store.set("s", "u", "before")
    pid = os.fork()
    if pid == 0:  # child: use the inherited store, then leave without cleanup
        try:
            ok = store.get("s", "u").reveal() == "before"
            store.set("s", "u", "from child")
            os._exit(0 if ok else 1)
        except BaseException:  # noqa: BLE001 - a forked child must never return into pytest
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get("s", "u").reveal() == "from child"


def test_temporary_store_and_frozen_clock() -> None:
    clock = FrozenClock(100.0)
    with temporary_store(clock=clock) as s:
        s.set("a", "b", "c")
        clock.advance(50)
        s.set("a", "b", "d")
        assert [v.created_at for v in s.history("a", "b")] == [150.0, 100.0]


def test_config_file_is_loaded(home: Path) -> None:
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text("max_versions = 2\n")
    with Store.init(home) as s:
        assert s.config.max_versions == 2
        assert s.status()["config"] == str(home / "config.toml")


def test_bad_config_is_config_error(home: Path) -> None:
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text("max_versions = 'ten'\n")
    with pytest.raises(ConfigError, match="max_versions"):
        Store.init(home)


def test_repr_hides_keys(store: Store) -> None:
    assert "key" not in repr(store._root).lower().replace("rootkey", "")
    for kek in store._keks.values():
        assert "hidden" in repr(kek)


def test_kek_record_damage_is_integrity(store: Store, home: Path) -> None:
    import sqlite3

    store.close()
    with sqlite3.connect(home / "vault.db") as conn:
        blob = bytearray(conn.execute("SELECT wrapped FROM keks").fetchone()[0])
        blob[20] ^= 1
        conn.execute("UPDATE keks SET wrapped = ?", (bytes(blob),))
    with pytest.raises(IntegrityError, match="vault-wide record"):
        Store.open(home)


def test_ttl_expiry(home: Path) -> None:
    from keyring_hardened.errors import ExpiredError

    clock = FrozenClock()
    with Store.init(home, clock=clock) as s:
        s.set("svc", "u", "short-lived", ttl=3600)
        assert s.history("svc", "u")[0].expires_at == clock.now + 3600
        clock.advance(3599)
        assert s.get("svc", "u").reveal() == "short-lived"
        clock.advance(1)
        with pytest.raises(ExpiredError, match="expired at") as info:
            s.get("svc", "u")
        assert "short-lived" not in str(info.value)
        assert info.value.exit_code == 7
        s.set("svc", "u", "renewed")
        assert s.get("svc", "u").reveal() == "renewed"
        with pytest.raises(ExpiredError):
            s.get("svc", "u", version=1)
        with pytest.raises(ExpiredError, match="allow-expired"):
            s.rollback("svc", "u", to_version=1)  # a TTL is not revoked by a rollback silently
        # restored, on request, with its TTL counted anew from now
        assert s.rollback("svc", "u", to_version=1, allow_expired=True) == 3
        assert s.get("svc", "u").reveal() == "short-lived"
        clock.advance(3601)
        with pytest.raises(ExpiredError):
            s.get("svc", "u")
        for bad in (0, -1, True, "1h", 10**12):
            with pytest.raises(UsageError, match="ttl"):
                s.set("svc", "u", "x", ttl=bad)  # type: ignore[arg-type]


def test_ttl_cannot_be_extended_by_editing(home: Path) -> None:
    import sqlite3

    with Store.init(home) as s:
        s.set("svc", "u", "x", ttl=60)
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute("UPDATE credentials SET expires_at = expires_at + 1e9")
    with Store.open(home) as s, pytest.raises(IntegrityError):
        s.get("svc", "u")


def test_key_file_that_is_a_folder_is_refused(home: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "not-a-key"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("KEYRING_HARDENED_KEY_FILE", str(folder))
    with pytest.raises(ConfigError, match="not a regular file"):
        Store.init(home)
    assert not (home / "vault.db").exists()
