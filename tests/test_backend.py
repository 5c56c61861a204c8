from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import pytest
from keyring import errors as kerrors
from keyring.testing.backend import BackendBasicTests

from keyring_hardened import backend
from keyring_hardened.backend import HardenedKeyring
from keyring_hardened.config import Config
from keyring_hardened.errors import (
    ConfigError,
    DeniedError,
    ExpiredError,
    HardenedError,
    IntegrityError,
    LockedError,
    RateLimitedError,
    StorageError,
    UsageError,
)
from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF, PASSPHRASE


@pytest.fixture(autouse=True)
def _fresh_stores() -> Iterator[None]:
    backend._close_all()
    yield
    backend._close_all()


class TestConformance(BackendBasicTests):
    """keyring's own conformance suite."""

    @pytest.fixture(autouse=True)
    def _home(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("KEYRING_HARDENED_HOME", str(tmp_path / "conformance"))

    def init_keyring(self) -> HardenedKeyring:
        return HardenedKeyring()


@pytest.fixture
def kr(home: Path, monkeypatch: pytest.MonkeyPatch) -> HardenedKeyring:
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))
    return HardenedKeyring()


def test_get_on_missing_vault_creates_nothing(kr: HardenedKeyring, home: Path) -> None:
    assert kr.get_password("svc", "u") is None
    assert kr.get_credential("svc", None) is None
    with pytest.raises(kerrors.PasswordDeleteError):
        kr.delete_password("svc", "u")
    assert not home.exists()


def test_first_set_creates_key_file_vault(kr: HardenedKeyring, home: Path) -> None:
    kr.set_password("svc", "u", "pw")
    assert (home / "vault.db").exists()
    assert (home / "master.key").exists()
    with Store.open(home) as s:
        assert s.get("svc", "u").reveal() == "pw"


def test_home_property(home: Path, tmp_path: Path) -> None:
    kr = HardenedKeyring().with_properties(home=str(tmp_path / "prop"))
    kr.set_password("svc", "u", "pw")
    assert (tmp_path / "prop" / "vault.db").exists()
    assert not home.exists()


def test_home_from_keyring_property_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRING_PROPERTY_HOME", str(tmp_path / "envprop"))
    HardenedKeyring().set_password("svc", "u", "pw")
    assert (tmp_path / "envprop" / "vault.db").exists()


def test_security_settings_not_overridable_by_properties(
        kr: HardenedKeyring, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kr.set_password("svc", "u", "pw")
    backend._close_all()
    # Properties set through keyring's mechanism land on the instance but are
    # never read: key file, passphrase and config come from the vault and env.
    monkeypatch.setenv("KEYRING_PROPERTY_KEY_FILE", str(tmp_path / "attacker.key"))
    monkeypatch.setenv("KEYRING_PROPERTY_PASSPHRASE", "x")
    other = HardenedKeyring()
    assert other.get_password("svc", "u") == "pw"
    assert not (tmp_path / "attacker.key").exists()
    # priority is a read-only class property: keyring cannot override it either.
    monkeypatch.setenv("KEYRING_PROPERTY_PRIORITY", "100")
    with pytest.raises(AttributeError):
        HardenedKeyring()


@pytest.mark.sqlite_only("a configured shared vault ranks as configured before it exists: "
                         "priority never connects (docs/teams.md)")
def test_priority(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))
    assert HardenedKeyring.priority < 1
    Store.init(home).close()
    assert HardenedKeyring.priority == 9.5
    (home / "config.toml").write_text("[backend]\npriority = 3\n")
    assert HardenedKeyring.priority == 3
    (home / "config.toml").write_text("[backend]\npriority = 'x'\n")
    assert HardenedKeyring.priority == 9.5  # the error shows on first use instead
    with pytest.raises(backend.ConfigurationError, match=r"backend\.priority"):
        HardenedKeyring().get_password("a", "b")


def test_not_viable_without_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name: None if name == "cryptography" else real(name))
    with pytest.raises(RuntimeError, match="cryptography"):
        HardenedKeyring.priority  # noqa: B018


def test_registered_entry_point() -> None:
    names = [type(k).__name__ for k in keyring.backend.get_all_keyring()]
    assert "HardenedKeyring" in names


@pytest.mark.parametrize(("core", "mapped"), [
    (UsageError("bad"), backend.InvalidInput),
    (ConfigError("bad"), backend.ConfigurationError),
    (IntegrityError("bad"), backend.IntegrityFailure),
    (DeniedError("bad"), backend.AccessDenied),
    (LockedError("bad"), backend.VaultLocked),
    (ExpiredError("bad"), backend.CredentialExpired),
    (StorageError("bad"), backend.StorageFailure),
    (HardenedError("bad"), backend.HardenedKeyringError),
])
def test_error_translation(core: HardenedError, mapped: type[Exception]) -> None:
    out = backend._translate(core)
    assert type(out) is mapped
    assert isinstance(out, kerrors.KeyringError)
    assert str(out) == "bad"


def test_rate_limited_keeps_retry_after() -> None:
    out = backend._translate(RateLimitedError("slow down", 2.5))
    assert isinstance(out, backend.RateLimited)
    assert out.retry_after == 2.5


def test_locked_is_keyring_locked(home: Path, kr: HardenedKeyring) -> None:
    Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF).close()
    with pytest.raises(kerrors.KeyringLocked) as info:
        kr.get_password("svc", "u")
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_passphrase_vault_through_env(home: Path, kr: HardenedKeyring,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF).close()
    monkeypatch.setenv("KEYRING_HARDENED_PASSPHRASE", PASSPHRASE)
    kr.set_password("svc", "u", CANARY)
    assert kr.get_password("svc", "u") == CANARY


def test_tampered_raises_integrity_without_canary(home: Path, kr: HardenedKeyring) -> None:
    kr.set_password("svc", "u", CANARY)
    backend._close_all()
    with sqlite3.connect(home / "vault.db") as conn:
        blob = bytearray(conn.execute("SELECT ciphertext FROM secret_versions").fetchone()[0])
        blob[-1] ^= 1
        conn.execute("UPDATE secret_versions SET ciphertext = ?", (bytes(blob),))
    with pytest.raises(backend.IntegrityFailure) as info:
        kr.get_password("svc", "u")
    assert CANARY not in str(info.value) + repr(info.value)


def test_bad_input_errors(kr: HardenedKeyring) -> None:
    with pytest.raises(backend.InvalidInput):
        kr.set_password("", "u", "x")
    with pytest.raises(ValueError, match="NUL"):
        kr.get_password("s\x00", "u")
    with pytest.raises(backend.InvalidInput):
        kr.delete_password("", "u")
    kr.set_password("s", "u", "x")
    with pytest.raises(backend.InvalidInput):
        kr.get_credential("", None)


def test_get_credential_any_user(kr: HardenedKeyring) -> None:
    kr.set_password("svc", "u1", "p1")
    cred = kr.get_credential("svc", None)
    assert cred is not None
    assert (cred.username, cred.password) == ("u1", "p1")


def test_one_unlock_per_process(kr: HardenedKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    kr.set_password("svc", "u", "pw")
    calls = []
    real = Store.open

    def counting(*a: object, **k: object) -> Store:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]
    monkeypatch.setattr(Store, "open", counting)
    for _ in range(5):
        assert HardenedKeyring().get_password("svc", "u") == "pw"
    assert calls == []


def test_keyring_api_selected_by_env(home: Path) -> None:
    env = dict(os.environ, PYTHON_KEYRING_BACKEND="keyring_hardened.backend.HardenedKeyring",
               KEYRING_HARDENED_HOME=str(home))
    code = ("import keyring; keyring.set_password('svc', 'u', 'via-api');"
            "print(keyring.get_password('svc', 'u'));"
            "c = keyring.get_credential('svc', None); print(c.username, c.password);"
            "keyring.delete_password('svc', 'u'); print(keyring.get_password('svc', 'u'))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)
    assert done.stdout.split("\n")[:3] == ["via-api", "u via-api", "None"]


def test_selected_by_priority_when_vault_exists(home: Path) -> None:
    Store.init(home, config=Config()).close()
    env = dict(os.environ, KEYRING_HARDENED_HOME=str(home))
    # Alone it is chosen; beside other viable backends of priority >= 1 keyring
    # chains them, ours first. Either way writes land in the vault.
    code = ("import keyring; k = keyring.get_keyring();"
            "first = k.backends[0] if hasattr(k, 'backends') else k; print(type(first).__name__);"
            "keyring.set_password('svc', 'u', 'by-priority')")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "HardenedKeyring"
    with Store.open(home) as s:
        assert s.get("svc", "u").reveal() == "by-priority"


def test_keyring_cli_round_trip(home: Path) -> None:
    env = dict(os.environ, KEYRING_HARDENED_HOME=str(home))
    b = ["-b", "keyring_hardened.backend.HardenedKeyring"]
    kr = [sys.executable, "-m", "keyring", *b]
    subprocess.run([*kr, "set", "svc", "u"], input="cli-secret\n", env=env, text=True,
                   check=True, capture_output=True)
    got = subprocess.run([*kr, "get", "svc", "u"], env=env, text=True, check=True,
                         capture_output=True)
    assert got.stdout == "cli-secret\n"
    subprocess.run([*kr, "del", "svc", "u"], env=env, text=True, check=True, capture_output=True)
    missing = subprocess.run([*kr, "get", "svc", "u"], env=env, text=True, capture_output=True,
                             check=False)
    assert missing.returncode == 1
    listed = subprocess.run([sys.executable, "-m", "keyring", "--list-backends"], env=env,
                            text=True, capture_output=True, check=True)
    assert "keyring_hardened.backend.HardenedKeyring" in listed.stdout


def test_selected_by_keyringrc(home: Path, tmp_path: Path) -> None:
    config = tmp_path / "xdg-config" / "python_keyring"
    config.mkdir(parents=True)
    (config / "keyringrc.cfg").write_text(
        "[backend]\ndefault-keyring=keyring_hardened.backend.HardenedKeyring\n")
    env = dict(os.environ, KEYRING_HARDENED_HOME=str(home))
    code = ("import keyring; print(type(keyring.get_keyring()).__name__);"
            "keyring.set_password('svc', 'u', 'via-rc'); print(keyring.get_password('svc', 'u'))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["HardenedKeyring", "via-rc"]
