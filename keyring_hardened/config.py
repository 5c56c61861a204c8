"""The configuration file: TOML, validated against a declared schema.

Each section is a table of checker functions; adding a section or an
option is one entry here plus one attribute on :class:`Config`. Unknown keys
and wrong types are :class:`~keyring_hardened.errors.ConfigError` naming the
key (``kdf.argon2_iterations``), never echoing a string value, which could be
a secret pasted into the wrong place.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import ConfigError, UsageError
from .humantime import MAX_DURATION as MAX_DURATION  # re-exported: its old home
from .humantime import parse_duration
from .rootkey import (
    ARGON2_DEFAULT,
    OWASP_ARGON2_FLOOR,
    PBKDF2_DEFAULT_ITERATIONS,
    KdfParams,
)

if TYPE_CHECKING:
    from .access import AccessConfig

__all__ = ["Config", "load_config", "parse_duration"]

#: Checks one option's TOML value and returns the value to store, or raises.
Check = Callable[[str, Any], Any]


def _int(lo: int, hi: int, note: str = "") -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_type(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: must be between {lo} and {hi}{note}, got {value}")
        return value
    return check


def _number(lo: float, hi: float) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {_type(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: must be between {lo} and {hi}, got {value}")
        return float(value)
    return check


def _choice(*options: str) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_type(value)}")
        if value not in options:
            raise ConfigError(f"{key}: must be one of {', '.join(options)}")
        return value
    return check


def _duration(key: str, value: Any) -> float:
    return parse_duration(value, key)


#: SQLite takes the busy timeout in milliseconds as a C int: 25 days and more
#: overflow to "do not wait at all". A writer waiting an hour is already a fault.
MAX_BUSY_TIMEOUT = 3600


def _busy_timeout(key: str, value: Any) -> float:
    seconds = parse_duration(value, key)
    if seconds > MAX_BUSY_TIMEOUT:
        raise ConfigError(f"{key}: must be at most 1h")
    return seconds


def _command(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        import shlex  # only when a config names a command

        try:
            argv = shlex.split(value)
        except ValueError:
            raise ConfigError(f"{key}: cannot be split into arguments (check its quotes)") from None
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        argv = list(value)
    else:
        raise ConfigError(f"{key}: expected a string or a list of strings, got {_type(value)}")
    if not argv or not argv[0]:
        raise ConfigError(f"{key}: must name a program")
    return tuple(argv)


def check_url(url: str, in_config: bool = False) -> str | None:
    """What is wrong with a storage URL, or None.

    ``in_config``: the config file may be readable by others (it names
    programs and paths, never a secret), so a password in it is refused.
    """
    from urllib.parse import parse_qs, urlsplit

    if not url.startswith(("postgresql://", "postgres://")):
        return "expected a postgresql:// URL (postgresql://USER@HOST/DATABASE?sslmode=verify-full)"
    try:
        parts = urlsplit(url)
        has_password = bool(parts.password) or "password" in parse_qs(parts.query)
    except ValueError:
        return "not a valid URL"
    if in_config and has_password:
        return ("holds a password, and the config file may be read by others; use PGPASSFILE, "
                "[storage] password_command or [storage] password_keyring")
    return None


def _storage_url(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a postgresql:// URL, got {_type(value)}")
    problem = check_url(value, in_config=True)
    if problem:
        raise ConfigError(f"{key}: {problem}")
    return value


def _keyring_service(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 1000:
        raise ConfigError(f"{key}: expected the keyring service name that holds the "
                          "database password")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_type(value)}")
    return value


def _sinks(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings, got {_type(value)}")
    for i, sink in enumerate(value):
        if sink != "syslog" and not (sink.startswith("file:") and len(sink) > len("file:")):
            raise ConfigError(f"{key}[{i}]: must be \"syslog\" or \"file:PATH\"")
        # A relative path would be resolved against each process's working
        # folder: every program would write its own copy somewhere else.
        if sink.startswith("file:") and not Path(sink[5:]).expanduser().is_absolute():
            raise ConfigError(f"{key}[{i}]: the file path must be absolute")
    return tuple(value)


def _principals(key: str, value: Any) -> tuple[str | int, ...]:
    """User or group names, or numeric ids, for the agent's allowance."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of names or numeric ids, got {_type(value)}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ConfigError(f"{key}[{i}]: expected a name or a numeric id, got {_type(item)}")
        if isinstance(item, int) and not 0 <= item < 2**32:
            raise ConfigError(f"{key}[{i}]: must be an id from 0 to 4294967295")
        if isinstance(item, str) and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}", item):
            raise ConfigError(f"{key}[{i}]: must be a user or group name")
    return tuple(value)


def _type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _default_ttl(key: str, value: Any) -> tuple[tuple[str, float], ...]:
    """``default_ttl``: one duration for every service, or a table of service glob -> duration."""
    if isinstance(value, str):
        return (("*", parse_duration(value, key)),)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a duration or a table of service globs, "
                          f"got {_type(value)}")
    from .access import _glob_problem

    found = []
    for i, (glob, duration) in enumerate(value.items()):
        # The glob is not echoed: a key is what the user typed, but it could be
        # anything pasted; its position names it.
        problem = _glob_problem(glob)
        if problem is not None or not glob:
            raise ConfigError(f"{key}: glob number {i + 1}: {problem or 'empty glob'}")
        found.append((glob, parse_duration(duration, f"{key} (glob number {i + 1})")))
    return tuple(found)


def _env_names(key: str, value: Any) -> tuple[str, ...]:
    """``refresh_env``: names of environment variables passed on to refresh commands."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of variable names, got {_type(value)}")
    for i, name in enumerate(value):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name):
            raise ConfigError(f"{key}[{i}]: not an environment variable name")
        if name.upper().startswith("KEYRING_HARDENED_"):
            # The vault's own settings, its passphrase among them: a refresher
            # is a program outside the vault and never gets them.
            raise ConfigError(f"{key}[{i}]: {name} is one of keyring-hardened's own variables "
                              "(KEYRING_HARDENED_*), which are never passed to a refresher")
        if name.upper().startswith("LD_"):
            # The dynamic loader's hooks (LD_PRELOAD) change which code runs,
            # taken from whatever environment the reader happens to have.
            raise ConfigError(f"{key}[{i}]: {name} changes which code a refresher runs; "
                              "refusing to pass it on")
    return tuple(value)


def _refresh_timeout(key: str, value: Any) -> float:
    seconds = parse_duration(value, key)
    if seconds > 3600:
        raise ConfigError(f"{key}: must be at most 1h")
    return seconds


def _refresh_interval(key: str, value: Any) -> float:
    seconds = parse_duration(value, key)
    if not 1 <= seconds <= 86400:
        raise ConfigError(f"{key}: must be between 1s and 1d")
    return seconds


_FLOOR = f" (OWASP floor {OWASP_ARGON2_FLOOR['memory_kib']} KiB, t=2)"

#: The schema: section name ("" for top level) -> option -> field.
SCHEMA: dict[str, dict[str, Check]] = {
    "": {
        "max_versions": _int(1, 1000),
        "rotate_after": _duration,
        "max_wraps": _int(1, 2**31, " (NIST SP 800-38D allows 2^32 with random nonces)"),
        "passphrase_command": _command,
        "agent_trust_declared_actor": _bool,
        "agent_allow_users": _principals,
        "agent_allow_groups": _principals,
        # TTL and refresh (refresh.py, issue 13).
        "default_ttl": _default_ttl,
        "refresh_timeout": _refresh_timeout,
        "refresh_env": _env_names,
    },
    "refresh": {
        "background": _bool,
        "interval": _refresh_interval,
    },
    "storage": {
        "synchronous": _choice("normal", "full"),
        "busy_timeout": _busy_timeout,
        # A shared vault on PostgreSQL (engines.py, docs/teams.md).
        "url": _storage_url,
        "password_command": _command,
        "password_keyring": _keyring_service,
    },
    "kdf": {
        "algorithm": _choice("argon2id", "pbkdf2"),
        "argon2_memory_kib": _int(OWASP_ARGON2_FLOOR["memory_kib"], 4 * 1024 * 1024, _FLOOR),
        "argon2_iterations": _int(OWASP_ARGON2_FLOOR["iterations"], 100, _FLOOR),
        "argon2_lanes": _int(1, 64),
        "pbkdf2_iterations": _int(PBKDF2_DEFAULT_ITERATIONS, 100_000_000,
                                  " (OWASP floor for PBKDF2-HMAC-SHA256)"),
    },
    "backend": {
        "priority": _number(-1000, 1000),
    },
    "audit": {
        "sinks": _sinks,
        "hmac_identifiers": _bool,
        "keep": _duration,
    },
}

#: The top-level keys access.py validates (access.ACCESS_KEYS, restated so
#: that a config without any of them never imports the policy code).
_ACCESS_KEYS = ("default_policy", "policies", "rate_limits")


class Config(NamedTuple):
    """Validated settings, with the documented defaults."""

    path: Path | None = None
    max_versions: int = 10
    rotate_after: float | None = None
    max_wraps: int = 2**30
    passphrase_command: tuple[str, ...] | None = None
    synchronous: str = "normal"
    busy_timeout: float = 10.0
    kdf_algorithm: str = "argon2id"
    argon2_memory_kib: int = ARGON2_DEFAULT["memory_kib"]
    argon2_iterations: int = ARGON2_DEFAULT["iterations"]
    argon2_lanes: int = ARGON2_DEFAULT["lanes"]
    pbkdf2_iterations: int = PBKDF2_DEFAULT_ITERATIONS
    backend_priority: float = 9.5
    audit_sinks: tuple[str, ...] = ()
    audit_hmac_identifiers: bool = False
    audit_keep: float | None = None
    #: Policies and rate limits; None when the file sets none (everything allowed).
    access: AccessConfig | None = None
    #: The agent: whether policies judge a declared actor, and which other users may connect.
    agent_trust_declared_actor: bool = False
    agent_allow_users: tuple[str | int, ...] = ()
    agent_allow_groups: tuple[str | int, ...] = ()
    #: TTL and refresh (refresh.py): (service glob, seconds) for new credentials,
    #: in file order; a refresher's time limit; variables passed on to commands;
    #: whether a process using the backend refreshes in a background thread,
    #: and how often that thread (and the agent's) looks for due credentials.
    default_ttl: tuple[tuple[str, float], ...] = ()
    refresh_timeout: float = 30.0
    refresh_env: tuple[str, ...] = ()
    refresh_background: bool = False
    refresh_interval: float = 30.0
    storage_url: str | None = None
    storage_password_command: tuple[str, ...] | None = None
    storage_password_keyring: str | None = None

    def new_kdf_params(self, algorithm: str | None = None) -> KdfParams:
        """Fresh passphrase KDF parameters (new salt) from these settings."""
        chosen = algorithm or self.kdf_algorithm
        if chosen == "argon2id":
            return KdfParams.new_argon2id(self.argon2_memory_kib, self.argon2_iterations,
                                          self.argon2_lanes)
        if chosen == "pbkdf2":
            return KdfParams.new_pbkdf2(self.pbkdf2_iterations)
        raise UsageError("kdf must be argon2id or pbkdf2")

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], path: Path | None = None) -> Config:
        """Validate a parsed TOML document; raise :class:`ConfigError` naming the key."""
        values, problems = _validate(doc)
        if problems:
            raise ConfigError(problems[0])
        return cls(path=path, **values)


def _validate(doc: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The valid options of ``doc``, and every problem found (not only the first)."""
    values: dict[str, Any] = {}
    problems: list[str] = []

    def check(attr: str, spec: Check, key: str, value: Any) -> None:
        try:
            values[attr] = spec(key, value)
        except ConfigError as exc:
            problems.append(str(exc))

    if any(key in doc for key in _ACCESS_KEYS):
        from .access import parse_access

        access, found = parse_access(doc)
        problems.extend(found)
        if access is not None:
            values["access"] = access
    for key, value in doc.items():
        if key in _ACCESS_KEYS:
            continue
        if key in SCHEMA and key:
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a table ([{key}]), got {_type(value)}")
                continue
            for sub, subvalue in value.items():
                spec = SCHEMA[key].get(sub)
                if spec is None:
                    problems.append(f"{key}.{sub}: unknown key")
                else:
                    check(_attr(key, sub), spec, f"{key}.{sub}", subvalue)
        elif key in SCHEMA[""]:
            check(key, SCHEMA[""][key], key, value)
        else:
            problems.append(f"{key}: unknown key")
    return values, problems


def _attr(section: str, key: str) -> str:
    if section == "storage" and key in ("url", "password_command", "password_keyring"):
        return f"storage_{key}"
    if section == "kdf":
        return key if key.startswith(("argon2_", "pbkdf2_")) else f"kdf_{key}"
    if section in ("backend", "audit", "refresh"):
        return f"{section}_{key}"
    return key


#: A config file is a few lines; anything larger is not one (or is /dev/zero).
CONFIG_LIMIT = 1 << 20


def _read(path: Path, required: bool, report: list[str] | None = None) -> bytes | None:
    """The config file's bytes through the trusted-file checks; None when optional and absent."""
    from ._files import read_trusted

    try:
        # As ssh treats its config: whoever can edit this file chooses the
        # program that yields the passphrase and where audit copies go, so
        # it must be yours (or root's) and writable by nobody else. Others
        # may read it: it names programs and paths, never a secret.
        return read_trusted(path, "config file", CONFIG_LIMIT, private=False, report=report)
    except (FileNotFoundError, NotADirectoryError):  # a folder on the way is missing or a file
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    import tomllib  # only when there is a file: it costs import time on every get

    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None


def load_config(path: Path, required: bool = False) -> Config:
    """Load and validate the config file; a missing optional file gives defaults.

    The file must pass the trusted-file checks (a regular file, no symbolic
    link, owned by you or root, not writable by group or others, at most
    1 MiB); otherwise :class:`ConfigError` names it and why.
    """
    raw = _read(path, required)
    if raw is None:
        return Config(path=None)
    doc = _parse(path, raw)
    try:
        return Config.from_mapping(doc, path)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def check_config(path: Path, required: bool = False) -> tuple[Config | None, list[str]]:
    """For ``config check``: the config if valid, and *every* problem with the file.

    Returns ``(None, [])`` for an optional file that does not exist. Owner
    and mode problems are listed, and the content is still checked, so one
    run shows everything to fix; anything else that stops the read (a FIFO,
    a link, a device, too large) is the one problem reported.
    """
    trust: list[str] = []
    try:
        raw = _read(path, required, trust)
        if raw is None:
            return None, []
        doc = _parse(path, raw)
    except ConfigError as exc:
        return None, [*trust, str(exc)]
    values, problems = _validate(doc)
    problems = [*trust, *(f"config file {path}: {p}" for p in problems)]
    if problems:
        return None, problems
    return Config(path=path, **values), []
