from __future__ import annotations

from pathlib import Path

import keyring.util.platform_
import pytest

from keyring_hardened.errors import ConfigError
from keyring_hardened.location import Location, default_actor, default_home, validate_actor


def test_default_home_agrees_with_keyring() -> None:
    assert default_home() == Path(keyring.util.platform_.data_root()) / "hardened"


def test_default_home_without_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_home() == Path(keyring.util.platform_.data_root()) / "hardened"


def test_windows_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keyring_hardened.location._is_windows", lambda: True)
    monkeypatch.setenv("LOCALAPPDATA", "/appdata")
    assert default_home() == Path("/appdata/Python Keyring/hardened")


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert Location.resolve().home == default_home()
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(tmp_path / "env"))
    loc = Location.resolve()
    assert loc.home == tmp_path / "env"
    assert loc.database == tmp_path / "env" / "vault.db"
    assert loc.key_file == tmp_path / "env" / "master.key"
    assert loc.config_file == tmp_path / "env" / "config.toml"
    assert not loc.config_required
    assert Location.resolve(tmp_path / "arg").home == tmp_path / "arg"
    monkeypatch.setenv("KEYRING_HARDENED_KEY_FILE", str(tmp_path / "k"))
    monkeypatch.setenv("KEYRING_HARDENED_CONFIG", str(tmp_path / "c.toml"))
    loc = Location.resolve()
    assert loc.key_file == tmp_path / "k"
    assert loc.config_file == tmp_path / "c.toml"
    assert loc.config_required


def test_actor(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ":" in default_actor()
    monkeypatch.setenv("KEYRING_HARDENED_ACTOR", "ci-runner")
    assert default_actor() == "ci-runner"
    monkeypatch.setenv("KEYRING_HARDENED_ACTOR", "bad\nactor")
    with pytest.raises(ConfigError, match="actor"):
        default_actor()
    with pytest.raises(ConfigError):
        validate_actor("")


def test_actor_without_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_user(uid: int) -> object:
        raise KeyError(uid)
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("pwd.getpwuid", no_user)
    monkeypatch.setattr("sys.argv", [""])
    assert default_actor().endswith(":python")
    assert default_actor().startswith("uid")


def test_actor_user_from_environment_or_passwd(monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    monkeypatch.setattr("sys.argv", ["/usr/bin/keyring"])
    assert default_actor() == f"{getpass.getuser()}:keyring"
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    assert default_actor() == f"{getpass.getuser()}:keyring"
    monkeypatch.setattr("sys.argv", ["/x/keyring_hardened/__main__.py"])
    assert default_actor().endswith(":keyring_hardened")
