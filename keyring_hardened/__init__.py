"""keyring-hardened: a hardened credential store for keyring and Ansible.

The public surface is small: :class:`Store` (open, get, set, delete, ...),
:class:`Secret`, :class:`Config` and the error tree in
:mod:`keyring_hardened.errors`. Names load lazily, so that keyring's backend
discovery, which imports this package in every ``keyring`` process, pays
for SQLite and cryptography only when this store is actually used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "CredentialInfo",
    "DeniedError",
    "ExpiredError",
    "HardenedError",
    "IntegrityError",
    "LockedError",
    "NotFoundError",
    "RateLimitedError",
    "Secret",
    "StorageError",
    "Store",
    "UsageError",
    "VersionInfo",
    "__version__",
]

_LAZY = {
    "Config": "config",
    "CredentialInfo": "store",
    "Secret": "secret",
    "Store": "store",
    "VersionInfo": "store",
    **{name: "errors" for name in (
        "ConfigError", "DeniedError", "ExpiredError", "HardenedError", "IntegrityError",
        "LockedError", "NotFoundError", "RateLimitedError", "StorageError", "UsageError")},
}

if TYPE_CHECKING:
    from .config import Config
    from .errors import (
        ConfigError,
        DeniedError,
        ExpiredError,
        HardenedError,
        IntegrityError,
        LockedError,
        NotFoundError,
        RateLimitedError,
        StorageError,
        UsageError,
    )
    from .secret import Secret
    from .store import CredentialInfo, Store, VersionInfo


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keyring_hardened' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
