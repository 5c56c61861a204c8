"""Where a vault lives, and who is asking: resolved from arguments and environment.

The default home mirrors keyring's ``platform_.data_root()`` (plus
``hardened``) without importing keyring: the core must not import it, and a
test checks that both agree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

from .errors import ConfigError

__all__ = ["Location", "default_actor", "default_home"]

ENV_HOME = "KEYRING_HARDENED_HOME"
ENV_KEY_FILE = "KEYRING_HARDENED_KEY_FILE"
ENV_CONFIG = "KEYRING_HARDENED_CONFIG"
ENV_PASSPHRASE = "KEYRING_HARDENED_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret
ENV_ACTOR = "KEYRING_HARDENED_ACTOR"

DB_NAME = "vault.db"
KEY_NAME = "master.key"
CONFIG_NAME = "config.toml"


def _is_windows() -> bool:
    return sys.platform == "win32"


def _data_root() -> Path:
    """Keyring's data root, by the same rules as ``keyring.util.platform_``."""
    if _is_windows():
        # keyring reads the "ProgramData" spelling.
        fallback = os.environ.get("ProgramData", ".")  # noqa: SIM112
        return Path(os.environ.get("LOCALAPPDATA", fallback)) / "Python Keyring"
    root = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share"
    return Path(root, "python_keyring")


def default_home() -> Path:
    """The vault home when neither an argument nor ``KEYRING_HARDENED_HOME`` names one."""
    return _data_root() / "hardened"


class Location(NamedTuple):
    """The files of one vault."""

    home: Path
    key_file: Path
    config_file: Path
    config_required: bool

    @property
    def database(self) -> Path:
        """The SQLite database of the vault."""
        return self.home / DB_NAME

    @property
    def pending_key_file(self) -> Path:
        """Where a rekey puts the new key file before renaming it into place."""
        return self.key_file.with_name(self.key_file.name + ".new")

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None) -> Location:
        """Resolve from an explicit home, else the environment, else the default."""
        if home is not None and str(home) != "":
            base = Path(home)
        elif os.environ.get(ENV_HOME):
            base = Path(os.environ[ENV_HOME])
        else:
            base = default_home()
        base = base.expanduser()
        key = os.environ.get(ENV_KEY_FILE)
        config = os.environ.get(ENV_CONFIG)
        return cls(
            home=base,
            key_file=Path(key).expanduser() if key else base / KEY_NAME,
            config_file=Path(config).expanduser() if config else base / CONFIG_NAME,
            config_required=bool(config),
        )


def default_actor() -> str:
    """The caller's identity: ``KEYRING_HARDENED_ACTOR``, else ``user:program``."""
    explicit = os.environ.get(ENV_ACTOR)
    if explicit is not None:
        return validate_actor(explicit)
    user = _user()
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    # "python -m pkg" runs pkg/__main__.py: the package is the program's name.
    program = argv0.parent.name if argv0.name == "__main__.py" else argv0.name
    return f"{user}:{program or 'python'}"


def _user() -> str:
    """The login name, as ``getpass.getuser`` finds it (without importing getpass)."""
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, OSError):  # no passwd entry, e.g. in a bare container
        return f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def validate_actor(actor: str) -> str:
    """Check an actor name: printable, 1 to 256 characters."""
    if not actor or len(actor) > 256 or not actor.isprintable():
        raise ConfigError("actor: must be 1 to 256 printable characters")
    return actor
