from __future__ import annotations

from pathlib import Path

import pytest

from keyring_hardened.config import Config, load_config, parse_duration
from keyring_hardened.errors import ConfigError


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600),
    ("1h30m", 5400), (" 5S ", 5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "0s", "1x", "1h 30m", "-5s", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(5)  # type: ignore[arg-type]


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text, "utf-8")
    return load_config(path)


def test_defaults_when_missing(tmp_path: Path) -> None:
    # Every default, as the user guide documents it, spelled out here rather
    # than compared with Config() itself.
    cfg = load_config(tmp_path / "none.toml")
    assert cfg.path is None
    assert (cfg.max_versions, cfg.rotate_after, cfg.max_wraps, cfg.passphrase_command) == (
        10, None, 2**30, None)
    assert (cfg.synchronous, cfg.busy_timeout) == ("normal", 10.0)
    assert (cfg.kdf_algorithm, cfg.argon2_memory_kib, cfg.argon2_iterations,
            cfg.argon2_lanes, cfg.pbkdf2_iterations) == ("argon2id", 65536, 3, 4, 600_000)
    assert cfg.backend_priority == 9.5
    assert (cfg.audit_sinks, cfg.audit_hmac_identifiers, cfg.audit_keep) == ((), False, None)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml", required=True)


def test_full_config(tmp_path: Path) -> None:
    cfg = _load(tmp_path, """
max_versions = 3
passphrase_command = "pass show 'my vault'"
[storage]
synchronous = "full"
busy_timeout = "30s"
[kdf]
algorithm = "pbkdf2"
argon2_memory_kib = 131072
argon2_iterations = 4
argon2_lanes = 2
pbkdf2_iterations = 1000000
[backend]
priority = 20
[audit]
sinks = ["syslog", "file:/var/log/kh.jsonl"]
hmac_identifiers = true
keep = "365d"
""")
    assert cfg.audit_sinks == ("syslog", "file:/var/log/kh.jsonl")
    assert cfg.audit_hmac_identifiers is True
    assert cfg.audit_keep == 365 * 86400
    assert cfg.max_versions == 3
    assert cfg.passphrase_command == ("pass", "show", "my vault")
    assert cfg.synchronous == "full"
    assert cfg.busy_timeout == 30
    assert cfg.kdf_algorithm == "pbkdf2"
    assert (cfg.argon2_memory_kib, cfg.argon2_iterations, cfg.argon2_lanes) == (131072, 4, 2)
    assert cfg.pbkdf2_iterations == 1_000_000
    assert cfg.backend_priority == 20.0


def test_command_as_list(tmp_path: Path) -> None:
    assert _load(tmp_path, 'passphrase_command = ["a", "b c"]').passphrase_command == ("a", "b c")


@pytest.mark.parametrize(("text", "message"), [
    ("bogus = 1", "bogus: unknown key"),
    ("max_versions = 'ten'", "max_versions: expected an integer, got a string"),
    ("max_versions = true", "max_versions: expected an integer, got a boolean"),
    ("max_versions = 0", "max_versions: must be between 1 and 1000"),
    ("[storage]\nsynchronous = 'off'", "storage.synchronous: must be one of normal, full"),
    ("[storage]\nsynchronous = 1", "storage.synchronous: expected a string"),
    ("[storage]\nwal = true", "storage.wal: unknown key"),
    ("[storage]\nbusy_timeout = 'soon'", "storage.busy_timeout: expected a positive duration"),
    ("storage = 5", "storage: expected a table"),
    ("[kdf]\nargon2_memory_kib = 1024", "kdf.argon2_memory_kib: must be between 19456"),
    ("[kdf]\nargon2_iterations = 1", "OWASP floor"),
    ("[kdf]\npbkdf2_iterations = 1000", "kdf.pbkdf2_iterations"),
    ("[backend]\npriority = 'high'", "backend.priority: expected a number, got a string"),
    ("[backend]\npriority = 5000", "backend.priority: must be between"),
    ("passphrase_command = 5", "passphrase_command: expected a string or a list"),
    ("passphrase_command = ''", "passphrase_command: must name a program"),
    ("passphrase_command = 'a \"b'", "passphrase_command: cannot be split"),
    ("[[policies]]\nactors = ['*']", r"policies\[0\]\.services: missing"),
    ("[[rate_limits]]\nlimit = 1", r"rate_limits\[0\]\.actors: missing"),
    ("max_versions = ", "invalid TOML"),
    ("[audit]\nsinks = 'syslog'", "audit.sinks: expected a list of strings"),
    ("[audit]\nsinks = ['file:']", r"audit.sinks\[0\]: must be"),
    ("[audit]\nsinks = ['email']", r"audit.sinks\[0\]: must be"),
    ("[audit]\nhmac_identifiers = 'yes'", "audit.hmac_identifiers: expected true or false"),
    ("[audit]\nkeep = 'forever'", "audit.keep: expected a positive duration"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _load(tmp_path, text)
    assert str(tmp_path / "config.toml") in str(info.value)
    assert "\n" not in str(info.value)


def test_string_values_are_never_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "[storage]\nsynchronous = 'hunter2-pasted-here'")
    assert "hunter2" not in str(info.value)


def test_not_utf8_and_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(path)
