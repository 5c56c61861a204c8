"""The one exception tree of keyring-hardened.

Every error the core raises is a :class:`HardenedError`. Its leaves follow
what a caller can do about it, and each carries the CLI exit code that the
public contract assigns to its class::

    HardenedError
    ├── NotFoundError        1  no such credential, version or vault
    ├── UsageError           2  bad argument or bad name
    │   └── ConfigError      2  bad config file, option or environment
    ├── IntegrityError       3  tampered or corrupt data
    ├── DeniedError          4  refused by an access policy
    ├── RateLimitedError     5  too many requests; ``retry_after`` seconds
    ├── LockedError          6  no key, wrong key or passphrase, sealed
    ├── ExpiredError         7  past its TTL and not renewed
    └── StorageError         8  the database could not be read or written

Messages name the parameter (service, username, option, path), never a
secret value: they are printed by the CLI and shown by Ansible.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeniedError",
    "ExpiredError",
    "HardenedError",
    "IntegrityError",
    "LockedError",
    "NotFoundError",
    "RateLimitedError",
    "StorageError",
    "UsageError",
]


class HardenedError(Exception):
    """Base of every error raised by keyring-hardened."""

    exit_code: int = 1
    #: A short name of the error class, used in audit records and Ansible messages.
    kind: str = "error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        #: A machine-readable code for the audit record (which check failed,
        #: say); never shown in the message, so it is no oracle.
        self.reason = reason


class NotFoundError(HardenedError):
    """The credential, version or vault does not exist."""

    exit_code = 1
    kind = "not-found"


class UsageError(HardenedError):
    """A bad argument: an invalid name, value or combination of options."""

    exit_code = 2
    kind = "usage"


class ConfigError(UsageError):
    """A bad configuration file, option or environment variable."""

    kind = "config"


class IntegrityError(HardenedError):
    """Stored data failed an integrity check: tampered, corrupt or truncated.

    Every decryption failure raises this same error, whatever check failed,
    so that the error is no oracle for an attacker.
    """

    exit_code = 3
    kind = "integrity"


class DeniedError(HardenedError):
    """An access policy refused the operation."""

    exit_code = 4
    kind = "denied"


class RateLimitedError(HardenedError):
    """A rate limit refused the operation; retry after ``retry_after`` seconds."""

    exit_code = 5
    kind = "rate-limited"

    def __init__(self, message: str, retry_after: float, reason: str | None = None) -> None:
        super().__init__(message, reason)
        self.retry_after = retry_after


class LockedError(HardenedError):
    """The vault cannot be opened: no key, a wrong key or passphrase, or sealed."""

    exit_code = 6
    kind = "locked"


class ExpiredError(HardenedError):
    """The credential is past its TTL and no refresh could renew it."""

    exit_code = 7
    kind = "expired"


class StorageError(HardenedError):
    """The vault database could not be read or written (I/O, disk full, busy)."""

    exit_code = 8
    kind = "storage"
