"""Which storage engine a vault opens with: the one place the core names an engine.

Everything else types against :class:`keyring_hardened.port.Storage`, so an
engine plugs in here and nowhere else. SQLite, at ``<home>/vault.db``, is
the default and needs nothing extra. ``[storage] url`` in the config, or
``KEYRING_HARDENED_STORAGE_URL`` (which wins), naming a ``postgresql://``
database selects PostgreSQL (the ``postgres`` extra: psycopg 3). Each
engine's module, and its driver, loads only when a vault is opened with it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import check_url
from .errors import ConfigError, StorageError

if TYPE_CHECKING:
    from .config import Config
    from .location import Location
    from .port import Engine

__all__ = ["ENV_STORAGE_URL", "check_url", "describe", "engine", "file_engine",
           "postgres_engine", "shared", "storage_url", "vault_exists"]

#: Selects a shared vault for this process, over ``[storage] url``.
ENV_STORAGE_URL = "KEYRING_HARDENED_STORAGE_URL"

_ENGINES: dict[tuple[object, ...], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def storage_url(config: Config | None) -> str | None:
    """The PostgreSQL URL this process uses (environment first, then config), or None."""
    env = os.environ.get(ENV_STORAGE_URL)
    if env:
        problem = check_url(env)
        if problem:
            raise ConfigError(f"{ENV_STORAGE_URL}: {problem}")
        return env
    return config.storage_url if config is not None else None


def shared(config: Config | None) -> bool:
    """Whether the vault lives in PostgreSQL rather than the home's SQLite file."""
    return storage_url(config) is not None


def engine(config: Config | None = None) -> Engine:
    """The engine that opens and creates vaults under ``config``.

    SQLite's class, or a PostgreSQL engine bound to the URL (one per URL and
    password source in a process, so a password command runs once).
    """
    url = storage_url(config)
    if url is None:
        from .storage import SQLiteStorage

        return SQLiteStorage
    return postgres_engine(url, config)


def postgres_engine(url: str, config: Config | None) -> Engine:
    """A PostgreSQL engine for ``url``, with ``config``'s password source (one per process)."""
    command = config.storage_password_command if config is not None else None
    service = config.storage_password_keyring if config is not None else None
    key = (url, command, service)
    with _ENGINES_LOCK:
        found = _ENGINES.get(key)
        if found is not None:
            return found
        try:
            from .pgstorage import PostgresEngine
        except ImportError:
            raise ConfigError("a vault on PostgreSQL needs psycopg: pip install "
                              "'keyring-hardened[postgres]'") from None
        made = PostgresEngine(url, _password_source(url, command, service))
        _ENGINES[key] = made
        return made


def file_engine() -> Engine:
    """The engine of vault files: backups and their checks, whatever the live vault's engine."""
    from .storage import SQLiteStorage

    return SQLiteStorage


def _password_source(url: str, command: tuple[str, ...] | None,
                     service: str | None) -> Callable[[], str | None] | None:
    """Where the database password comes from; None leaves it to libpq (PGPASSFILE, .pgpass)."""
    if command is not None:
        def run() -> str | None:
            from .errors import LockedError
            from .passphrase import run_command

            try:
                return run_command(command, "storage.password_command")
            except LockedError as exc:
                raise StorageError(str(exc)) from None

        return run
    if service is not None:
        def look_up() -> str | None:
            # An adapter (it uses the keyring framework): loaded only here.
            from .pgpassword import from_keyring

            return from_keyring(url, service)

        return look_up
    return None


def vault_exists(location: Location, config: Config | None) -> bool:
    """Whether a vault exists where ``config`` puts it (PostgreSQL: asks the server)."""
    found = engine(config)
    exists = getattr(found, "exists", None)
    if exists is None or isinstance(found, type):
        return os.path.lexists(location.database)
    busy = config.busy_timeout if config is not None else 10.0
    return bool(exists(busy))


def describe(location: Location, config: Config | None) -> str:
    """Where the vault's rows are, for ``status`` and messages (never with a password)."""
    url = storage_url(config)
    if url is None:
        return str(location.database)
    from .pgstorage import display_url

    return display_url(url)
