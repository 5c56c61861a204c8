"""Where a vault lives, and who is asking: resolved from arguments and environment.

The default home mirrors keyring's ``platform_.data_root()`` (plus
``hardened``) without importing keyring: the core must not import it, and a
test checks that both agree.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from pathlib import Path
from typing import NamedTuple

from .errors import ConfigError, StorageError

__all__ = ["Location", "default_actor", "default_home", "home_problems", "make_home"]

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

    def check_home(self) -> None:
        """Refuse (exit 2) a home that others could control; see :func:`home_problems`."""
        problems = home_problems(self.home)
        if problems:
            raise ConfigError(problems[0])

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


def _euid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else 0


def _owner(uid: int) -> str:
    from ._files import describe_owner

    return describe_owner(uid)


def _dir_problem(path: Path, st: os.stat_result, *, is_home: bool) -> str | None:
    """Why a folder on the way to (or at) the vault home may not be trusted.

    As ssh's StrictModes: the home must be the user's own, each folder above
    it the user's or root's, and none writable by group or others, since
    whoever can write a folder can rename, replace or plant any entry in it.
    A sticky folder (``/tmp``) is the one exception for the folders *above*
    the home, when root or the user owns it: there the kernel lets only an
    entry's owner rename or delete it, so the entry under it, itself checked
    to be the user's or root's and not writable by others, cannot be swapped.
    """
    what = "vault home" if is_home else "folder"
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} {path} is not a directory"
    euid = _euid()
    owners = (euid,) if is_home and euid != 0 else (euid, 0)
    if st.st_uid not in owners:
        whose = "you" if len(owners) == 1 else "you or root"
        return (f"{what} {path} is owned by {_owner(st.st_uid)}, not by {whose}; "
                "refusing to use a vault there")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not (not is_home and mode & stat.S_ISVTX):
        return (f"{what} {path} is writable by group or others (mode {mode:04o}); "
                f"run: chmod go-w {path}")
    return None


def home_problems(home: Path, *, leaf_is_home: bool = True) -> list[str]:
    """Every reason the vault home, or a folder above it, may not be trusted.

    Nothing is reported for a home that does not exist yet: creating it
    (:func:`make_home`) checks the folders it builds on. Symbolic links on
    the way are followed, but each must belong to the user or root, or
    whoever owns it could point it elsewhere later.
    """
    problems: list[str] = []
    try:
        if not home.exists():
            return problems
        absolute = Path(os.path.abspath(home))
        for prefix in [absolute, *absolute.parents]:
            st = os.lstat(prefix)
            if stat.S_ISLNK(st.st_mode) and st.st_uid not in (_euid(), 0):
                problems.append(f"symbolic link {prefix} on the way to the vault home is "
                                f"owned by {_owner(st.st_uid)}; refusing to follow it")
        real = Path(os.path.realpath(home))
        for prefix in [real, *real.parents]:
            problem = _dir_problem(prefix, os.stat(prefix),
                                   is_home=leaf_is_home and prefix == real)
            if problem:
                problems.append(problem)
    except OSError as exc:
        problems.append(f"vault home {home} cannot be checked: {exc.strerror}")
    return problems


def make_home(home: Path) -> None:
    """Create the vault home, and any missing folder above it, mode 0700 whatever the umask.

    The nearest existing folder must pass the trust checks first, and every
    folder made is checked on its own descriptor after ``mkdir``, so one that
    another user slipped in between is refused. OS failures are a
    :class:`StorageError` (exit 8) naming the folder.
    """
    missing: list[Path] = []
    here = Path(os.path.abspath(home))
    try:
        while not os.path.lexists(here):
            missing.append(here)
            if here.parent == here:
                break
            here = here.parent
        if not missing:
            problems = home_problems(home)
            if problems:
                raise ConfigError(problems[0])
            return
        problems = home_problems(here, leaf_is_home=False)
        if problems:
            raise ConfigError(problems[0])
        for folder in reversed(missing):
            # Made meanwhile by another process? Then it is checked below like ours.
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                         | getattr(os, "O_NOFOLLOW", 0))
            try:
                st = os.fstat(fd)
                if st.st_uid == _euid():
                    os.fchmod(fd, 0o700)  # mkdir's mode is cut by the umask; 0700 whatever it is
                    st = os.fstat(fd)
                problem = _dir_problem(folder, st, is_home=folder == missing[0])
            finally:
                os.close(fd)
            if problem:
                raise ConfigError(problem)
    except OSError as exc:
        raise StorageError(f"cannot create vault home {home}: {exc.strerror}") from None


def default_actor() -> str:
    """The caller's identity: ``KEYRING_HARDENED_ACTOR``, else ``user:program``."""
    explicit = os.environ.get(ENV_ACTOR)
    if explicit is not None:
        return validate_actor(explicit)
    return validate_actor(f"{_clean(_user())}:{_clean(_program())}")


def _program() -> str:
    """What is running: the script, the package of ``python -m``, or ``python -c``."""
    interpreter = Path(sys.executable).name if sys.executable else "python"
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 in ("", "-c", "-"):
        # "python -c CODE", a script on stdin, or an embedded interpreter: the
        # interpreter is all there is to name, and "-c" alone says nothing.
        return f"{interpreter} {argv0}".rstrip() if argv0 else interpreter
    path = Path(argv0)
    # "python -m pkg" runs pkg/__main__.py: the package is the program's name.
    program = path.parent.name if path.name == "__main__.py" else path.name
    return program or interpreter


def _clean(text: str, limit: int = 120) -> str:
    """A derived name made safe for the trail and a terminal: no controls, bounded."""
    shown = "".join(c if c.isprintable() else "?" for c in text).strip()
    return shown[:limit] or "?"


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
