"""The keyring backend: ``keyring.get_password`` and friends over the hardened store.

A thin translator: arguments in, one :class:`~keyring_hardened.store.Store`
call, errors out as :class:`keyring.errors.KeyringError` subclasses.
keyring imports this module in every process that discovers backends, so it
imports nothing heavy at module level: the store (SQLite, cryptography)
loads on first use.
"""

from __future__ import annotations

import atexit
import importlib.util
import sys
import threading
from typing import TYPE_CHECKING

from jaraco.classes import properties
from keyring import credentials
from keyring import errors as kerrors
from keyring.backend import KeyringBackend

from . import errors
from .location import Location

if TYPE_CHECKING:
    from .store import Store

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


def _prompt() -> str:
    import getpass  # only when a person is asked

    return getpass.getpass("keyring-hardened passphrase: ")


#: Unlocked stores of this process, by vault location: one unlock (one KDF
#: run) per process and vault, whatever the number of backend instances.
_stores: dict[Location, Store] = {}
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
        location = Location.resolve()
        if not location.database.exists():
            return 0.9
        if location.config_file.exists():
            from .config import load_config

            try:
                return load_config(location.config_file).backend_priority
            except errors.ConfigError:
                pass  # reported on first use, where the user sees it
        return 9.5

    def _store(self, create: bool) -> Store | None:
        location = Location.resolve(self.home)
        with _stores_lock:
            store = _stores.get(location)
            if store is not None:
                return store
            from .store import Store

            prompt = _prompt if sys.stdin is not None and sys.stdin.isatty() else None
            try:
                store = Store.open(location.home, prompt=prompt, create=create)
            except errors.NotFoundError:
                return None
            _stores[location] = store
            return store

    def get_password(self, service: str, username: str) -> str | None:
        """Return the secret, or None only when the credential does not exist."""
        try:
            store = self._store(create=False)
            if store is None:
                return None
            return store.get(service, username).reveal()
        except errors.NotFoundError:
            return None
        except errors.HardenedError as exc:
            raise _translate(exc) from None

    def set_password(self, service: str, username: str, password: str) -> None:
        """Store a new version of the credential (creating the vault if needed)."""
        try:
            store = self._store(create=True)
            assert store is not None  # noqa: S101 - create=True never answers None
            store.set(service, username, password)
        except errors.HardenedError as exc:
            raise _translate(exc) from None

    def delete_password(self, service: str, username: str) -> None:
        """Delete the credential; raise PasswordDeleteError when it does not exist."""
        try:
            store = self._store(create=False)
            if store is None:
                raise kerrors.PasswordDeleteError("no such credential")
            store.delete(service, username)
        except errors.NotFoundError:
            raise kerrors.PasswordDeleteError("no such credential") from None
        except errors.HardenedError as exc:
            raise _translate(exc) from None

    def get_credential(self, service: str, username: str | None
                       ) -> credentials.Credential | None:
        """Return a credential for ``service`` (any username when None), or None."""
        if username is None:
            try:
                store = self._store(create=False)
                names = store.usernames(service) if store is not None else []
            except errors.HardenedError as exc:
                raise _translate(exc) from None
            if not names:
                return None
            username = names[0]
        password = self.get_password(service, username)
        if password is None:
            return None
        return credentials.SimpleCredential(username, password)
