"""The PostgreSQL password from another keyring backend (``[storage] password_keyring``).

An adapter, like backend.py: it is the one module of the engine side that
uses the keyring framework, and it loads only when the config asks for it.
"""

from __future__ import annotations

import os
import threading

from .errors import ConfigError, StorageError

__all__ = ["from_keyring"]

_BUSY = threading.local()


def _user(url: str) -> str | None:
    """The user a postgresql:// URL names (in its authority or as ``?user=``)."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(url)
    if parts.username:
        return unquote(parts.username)
    found = parse_qs(parts.query).get("user")
    return found[-1] if found else None


def from_keyring(url: str, service: str) -> str:
    """The database password for the URL's user, from the keyring backend keyring uses.

    Never from keyring-hardened itself: the vault it would open is the one
    that needs this password (and asking it would recurse).
    """
    import keyring

    if getattr(_BUSY, "busy", False):
        raise ConfigError("storage.password_keyring: the keyring asked for the vault that "
                          "needs the password (keyring-hardened is keyring's backend)")
    backend = keyring.get_keyring()
    names = {type(backend).__module__}
    names.update(type(b).__module__ for b in getattr(backend, "backends", ()))
    if any(n.startswith("keyring_hardened") for n in names):
        raise ConfigError("storage.password_keyring: keyring's backend is keyring-hardened "
                          "itself; set keyring's backend (keyringrc.cfg or "
                          "PYTHON_KEYRING_BACKEND) to the one that holds the database password")
    user = _user(url) or os.environ.get("PGUSER")
    if not user:
        raise ConfigError("storage.password_keyring: the URL names no user to look up")
    _BUSY.busy = True
    try:
        found = backend.get_password(service, user)
    except Exception as exc:  # noqa: BLE001 - any backend's failure, named, never its text
        raise StorageError(f"storage.password_keyring: the keyring could not be read "
                           f"({type(exc).__name__})") from None
    finally:
        _BUSY.busy = False
    if found is None:
        raise StorageError(f"storage.password_keyring: no password for {service!r} "
                           f"user {user!r} in the keyring")
    return found
