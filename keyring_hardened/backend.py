"""The keyring backend: ``keyring.get_password`` and friends over the hardened store.

A thin translator: arguments in, one :class:`~keyring_hardened.store.Store`
call, errors out as :class:`keyring.errors.KeyringError` subclasses.
keyring imports this module in every process that discovers backends, so it
imports nothing heavy at module level: the store (SQLite, cryptography)
loads on first use.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from jaraco.classes import properties
from keyring import credentials
from keyring import errors as kerrors
from keyring.backend import KeyringBackend

from . import errors
from .location import Location

if TYPE_CHECKING:
    from .agentproto import AgentStore
    from .store import Store

log = logging.getLogger("keyring_hardened")

__all__ = [
    "AccessDenied",
    "ConfigurationError",
    "CredentialExpired",
    "HardenedKeyring",
    "HardenedKeyringError",
    "IntegrityFailure",
    "InvalidInput",
    "RateLimited",
    "StorageFailure",
    "VaultLocked",
]


class HardenedKeyringError(kerrors.KeyringError):
    """Base of the errors this backend raises (beyond keyring's own)."""


class InvalidInput(HardenedKeyringError, ValueError):
    """A bad service, username or secret (empty, NUL, too long, not text)."""


class ConfigurationError(HardenedKeyringError):
    """The config file or environment is invalid."""


class IntegrityFailure(HardenedKeyringError):
    """Stored data failed an integrity check: tampered or corrupt."""


class AccessDenied(HardenedKeyringError):
    """An access policy refused the operation."""


class RateLimited(HardenedKeyringError):
    """A rate limit refused the operation; see ``retry_after`` (seconds)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class VaultLocked(HardenedKeyringError, kerrors.KeyringLocked):
    """No key, a wrong key or passphrase, or a sealed vault."""


class CredentialExpired(HardenedKeyringError):
    """The credential is past its TTL and could not be refreshed."""


class StorageFailure(HardenedKeyringError):
    """The vault database could not be read or written."""


_MAP: tuple[tuple[type[errors.HardenedError], type[HardenedKeyringError]], ...] = (
    (errors.ConfigError, ConfigurationError),
    (errors.UsageError, InvalidInput),
    (errors.IntegrityError, IntegrityFailure),
    (errors.DeniedError, AccessDenied),
    (errors.LockedError, VaultLocked),
    (errors.ExpiredError, CredentialExpired),
    (errors.StorageError, StorageFailure),
)


def _translate(exc: errors.HardenedError) -> kerrors.KeyringError:
    if isinstance(exc, errors.RateLimitedError):
        return RateLimited(str(exc), exc.retry_after)
    for core, mapped in _MAP:
        if isinstance(exc, core):
            return mapped(str(exc))
    return HardenedKeyringError(str(exc))


def _from_os(exc: OSError) -> StorageFailure:
    """An OS error that escaped the core, as the storage failure it is, naming the path."""
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return StorageFailure(f"{where}{exc.strerror or type(exc).__name__}")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Let only KeyringError subclasses out, as the contract says: never a bare OSError.

    keyring's own errors (``PasswordDeleteError``) pass as they are. An
    unexpected exception (a bug) becomes a ``HardenedKeyringError`` naming
    only its type: its text could hold anything, a secret included.
    """
    try:
        yield
    except kerrors.KeyringError:
        raise
    except errors.HardenedError as exc:
        raise _translate(exc) from None
    except OSError as exc:
        raise _from_os(exc) from None
    except Exception as exc:
        if os.environ.get("KEYRING_HARDENED_DEBUG", "0") not in ("", "0"):
            raise
        raise HardenedKeyringError(f"internal error ({type(exc).__name__}); set "
                                   "KEYRING_HARDENED_DEBUG=1 for the cause") from None


def _interactive() -> bool:
    """Whether a person can be prompted: stdin exists, is open and is a terminal.

    ansible-core 2.19 runs lookups with stdin *closed*, and daemons may have
    none at all (``sys.stdin is None``): both mean "no prompt", never a crash.
    """
    stdin = sys.stdin
    try:
        return stdin is not None and not stdin.closed and stdin.isatty()
    except (ValueError, OSError, AttributeError):
        return False


def _prompt() -> str:
    import getpass  # only when a person is asked

    return getpass.getpass("keyring-hardened passphrase: ")


def _is_keyring_cli() -> bool:
    """Whether this process is the ``keyring`` command (where stderr is for people)."""
    argv0 = sys.argv[0] if sys.argv else ""
    path = argv0.replace("\\", "/")
    return os.path.basename(path) in ("keyring", "keyring.exe") \
        or path.endswith(("keyring/__main__.py", "keyring/cli.py"))


def _created_notice(location: Location) -> None:
    """Say once, when a ``set`` made the vault, that it exists now and needs its key backed up.

    The ``keyring`` command prints it on stderr, as ``init`` would; an
    application hears it through logging only (logger ``keyring_hardened``,
    level INFO), so nothing unasked appears in its output.
    """
    text = (f"created a new key-file vault at {location.home} (the first set made it, as "
            f"init would); back up {location.key_file}: without it the vault cannot be opened")
    if _is_keyring_cli():
        sys.stderr.write(f"keyring-hardened: note: {text}\n")
    else:
        log.info(text)


#: Unlocked stores of this process, by vault location: one unlock (one KDF
#: run) per process and vault, whatever the number of backend instances.
_stores: dict[Location, Store | AgentStore] = {}
_stores_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    with _stores_lock:
        for store in _stores.values():
            store.close()
        _stores.clear()


class HardenedKeyring(KeyringBackend):
    """The hardened store as a keyring backend.

    ``home`` is the one property keyring may set (``KEYRING_PROPERTY_HOME``
    or ``with_properties(home=...)``): it only chooses which vault to open.
    Key file, passphrase and config come from the environment and the vault
    itself, never from instance attributes, so keyring's property handling
    cannot weaken them.
    """

    #: The vault home; None means ``KEYRING_HARDENED_HOME`` or the default.
    home: str | None = None

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # keyring's __init__ has no hints

    @properties.classproperty
    def priority(cls) -> float:
        """Viable when SQLite and cryptography are present; above OS keyrings once a vault exists.

        Without a vault it ranks below 1, so it never takes writes from an OS
        keyring, yet serves where nothing else is viable (headless hosts).
        """
        for module in ("sqlite3", "cryptography"):
            if importlib.util.find_spec(module) is None:
                raise RuntimeError(f"{module} is not installed")
        # Runs in every process that lists backends: it must neither raise
        # (an unreadable home) nor hang (a FIFO at the config path; the config
        # is read through the trusted, non-blocking open).
        try:
            location = Location.resolve()
            # A shared vault (PostgreSQL) is named by the environment or the
            # config; whether it exists is not asked here (no connection in
            # every process that lists backends).
            shared = bool(os.environ.get("KEYRING_HARDENED_STORAGE_URL"))
            if not shared and not os.path.lexists(location.database) \
                    and not os.path.lexists(location.config_file):
                return 0.9
            if os.path.lexists(location.config_file):
                from .config import load_config

                config = load_config(location.config_file)
                if not shared and config.storage_url is None \
                        and not os.path.lexists(location.database):
                    return 0.9
                return config.backend_priority
        except errors.HardenedError:
            pass  # reported on first use, where the user sees it
        except OSError:
            return 0.9
        return 9.5

    def _store(self, create: bool) -> Store | AgentStore | None:
        location = Location.resolve(self.home)
        with _stores_lock:
            store = _stores.get(location)
            if store is not None:
                return store
            from .agentproto import connect

            # An agent serving this vault does the work: no key, no passphrase here.
            agent = connect(location)
            if agent is not None:
                _stores[location] = agent
                return agent
            from .store import Store

            prompt = _prompt if _interactive() else None
            existed = create and os.path.lexists(location.database)
            try:
                store = Store.open(location.home, prompt=prompt, create=create)
            except errors.NotFoundError:
                return None
            _stores[location] = store
            if store.config.refresh_background:
                # Opted in ([refresh] background = true): a long-lived process
                # refreshes due credentials in a daemon thread (refresh.py).
                from .refresh import start_background

                start_background(store, store.config.refresh_interval)
            if create and not existed:
                _created_notice(location)
            return store

    def get_password(self, service: str, username: str) -> str | None:
        """Return the secret, or None only when the credential does not exist."""
        with _errors():
            try:
                store = self._store(create=False)
                if store is None:
                    return None
                return store.get(service, username).reveal()
            except errors.NotFoundError:
                return None

    def set_password(self, service: str, username: str, password: str) -> None:
        """Store a new version of the credential (creating the vault if needed)."""
        with _errors():
            store = self._store(create=True)
            if store is None:  # pragma: no cover - create=True never answers None
                raise errors.StorageError("the vault could not be created")
            store.set(service, username, password)

    def delete_password(self, service: str, username: str) -> None:
        """Delete the credential; raise PasswordDeleteError when it does not exist."""
        with _errors():
            try:
                store = self._store(create=False)
                if store is None:
                    raise kerrors.PasswordDeleteError("no such credential")
                store.delete(service, username)
            except errors.NotFoundError:
                raise kerrors.PasswordDeleteError("no such credential") from None

    def get_credential(self, service: str, username: str | None
                       ) -> credentials.Credential | None:
        """Return a credential for ``service`` (any username when None), or None."""
        if username is None:
            with _errors():
                store = self._store(create=False)
                names = store.usernames(service) if store is not None else []
            if not names:
                return None
            username = names[0]
        password = self.get_password(service, username)
        if password is None:
            return None
        return credentials.SimpleCredential(username, password)
