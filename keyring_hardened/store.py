"""The store façade: every credential operation, each in one transaction.

Adapters (the keyring backend, the CLI, the Ansible plugins) make exactly
one call here per user request. The façade validates names and runs each
operation through :meth:`Session._run <keyring_hardened.session.Session._run>`,
one write transaction with its audit event, so a credential change commits
whole or not at all.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .errors import ExpiredError, IntegrityError, NotFoundError, UsageError
from .rootkey import OWASP_ARGON2_FLOOR
from .secret import Secret
from .session import Session, _label, _Note, _utc
from .storage import KekRecord, SQLiteStorage

__all__ = ["CredentialInfo", "Store", "VersionInfo"]

MAX_NAME_BYTES = 4096
MAX_SECRET_BYTES = 1 << 20


class CredentialInfo(NamedTuple):
    """A live credential, as ``list`` shows it (never its value)."""

    service: str
    username: str
    version: int
    updated_at: float


class VersionInfo(NamedTuple):
    """One kept version, as ``history`` shows it (never its value)."""

    version: int
    kek_version: int
    created_at: float
    current: bool
    expires_at: float | None = None


def _check_name(what: str, value: object, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a string")
    if not value and not allow_empty:
        raise UsageError(f"{what} must not be empty")
    if "\x00" in value:
        raise UsageError(f"{what} must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError(f"{what} must be valid Unicode text (no lone surrogates)") from None
    if size > MAX_NAME_BYTES:
        raise UsageError(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    return value


def _secret_bytes(secret: str | Secret) -> bytes:
    value = secret.reveal() if isinstance(secret, Secret) else secret
    if not isinstance(value, str):
        raise UsageError("secret must be a string")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("secret must be valid Unicode text (no lone surrogates)") from None
    if len(data) > MAX_SECRET_BYTES:
        raise UsageError(f"secret is longer than {MAX_SECRET_BYTES} bytes")
    return data


class Store(Session):
    """An unlocked vault and its credential operations. Close when done.

    Open with :meth:`open` or create with :meth:`init`. A store is safe to
    share between threads, and survives ``fork``: a child process reconnects
    to the database on its first call.
    """

    # -- operations -------------------------------------------------------

    def get(self, service: str, username: str, *, version: int | None = None) -> Secret:
        """Return the current secret, or ``version`` of it; raise NotFoundError if absent."""
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                    or version < 1):
            raise UsageError("version must be a positive integer")

        def body(storage: SQLiteStorage, note: _Note) -> Secret:
            found = storage.read(service, username, version)
            if found is None:
                raise NotFoundError(f"no credential for {_label(service, username)}",
                                    "no-credential")
            head, row = found
            self._verify_head(head)
            if head.current_version is None:
                raise NotFoundError(f"credential for {_label(service, username)} is deleted",
                                    "deleted")
            if row is None:
                if version is None:
                    raise IntegrityError(f"{_label(service, username)}: current version "
                                         "is missing", "missing-version")
                raise NotFoundError(f"version {version} of {_label(service, username)} "
                                    "is not kept", "not-kept")
            note.key_version = row.kek_version
            # The current version's expiry is read from the MAC'd head; an older
            # version's from its own row.
            expires = head.expires_at if version is None else row.expires_at
            if expires is not None and self._clock() >= expires:
                raise ExpiredError(f"{_label(service, username)} expired at "
                                   f"{_utc(expires)}; set a new value (no refresh is "
                                   "configured)", "expired")
            return Secret(self._decrypt(head, row))

        return self._run("read", service, username, body)

    def set(self, service: str, username: str, secret: str | Secret, *,
            ttl: float | None = None) -> int:
        """Store a new version of a credential; returns its version number.

        With ``ttl`` (seconds), reads of this version fail with
        :class:`ExpiredError` once it is that old.
        """
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                                or not 0 < ttl <= 100 * 365 * 86400):
            raise UsageError("ttl must be a positive number of seconds, at most 100 years")
        data = _secret_bytes(secret)

        def body(storage: SQLiteStorage, note: _Note) -> int:
            now = self._clock()
            head = storage.head(service, username)
            if head is None:
                head = storage.new_head(service, username, now,
                                        self._head_mac(service, username, None, 0))
            else:
                self._verify_head(head)
            return self._write_version(storage, head, data, now, note,
                                       float(ttl) if ttl is not None else None)

        return self._run("write", service, username, body, writes=True)

    def delete(self, service: str, username: str, *, purge: bool = False) -> None:
        """Delete a credential; kept versions stay for ``rollback`` unless ``purge``."""
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)

        def body(storage: SQLiteStorage, note: _Note) -> None:
            head = self._existing(storage, service, username)
            if purge:
                storage.purge(head.id)
            elif head.current_version is None:
                raise NotFoundError(f"credential for {_label(service, username)} "
                                    "is already deleted", "deleted")
            else:
                storage.update_head(head.id, None, head.last_version, self._clock(),
                                    self._head_mac(service, username, None, head.last_version))

        self._run("purge" if purge else "delete", service, username, body, writes=True)
        if purge:
            with self._guard() as storage:
                # Fold the WAL so freed pages are zeroed in the database file too.
                storage.checkpoint()

    def rollback(self, service: str, username: str, *, to_version: int | None = None) -> int:
        """Restore a kept version as a new current version; returns the new number.

        Without ``to_version``: the newest kept version before the current
        one, or the newest kept version of a deleted credential.
        """
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)
        if to_version is not None and (isinstance(to_version, bool) or to_version < 1):
            raise UsageError("version must be a positive integer")

        def body(storage: SQLiteStorage, note: _Note) -> int:
            head = self._existing(storage, service, username)
            kept = [v for v, _, _, _ in storage.versions(head.id)]
            target = to_version
            if target is None:
                earlier = [v for v in kept if head.current_version is None
                           or v < head.current_version]
                if not earlier:
                    raise NotFoundError(f"no earlier version of {_label(service, username)} "
                                        "to roll back to", "no-earlier-version")
                target = earlier[0]
            if target == head.current_version:
                raise UsageError(f"version {target} of {_label(service, username)} "
                                 "is already current", "already-current")
            row = storage.version(head.id, target)
            if row is None:
                raise NotFoundError(f"version {target} of {_label(service, username)} "
                                    "is not kept", "not-kept")
            value = self._decrypt(head, row)
            note.reason = f"from-version-{target}"
            # A restored value gets its version's TTL again, counted from now.
            return self._write_version(storage, head, value.encode("utf-8"), self._clock(), note,
                                       row.ttl)

        return self._run("rollback", service, username, body, writes=True)

    def credentials(self) -> list[CredentialInfo]:
        """Every live credential (names and versions only)."""
        return self._run("list", None, None, lambda storage, note: [
            CredentialInfo(h.service, h.username, h.current_version or 0, h.updated_at)
            for h in storage.heads()])

    def usernames(self, service: str) -> list[str]:
        """The usernames of a service's live credentials, most recently updated first."""
        _check_name("service", service, allow_empty=False)
        return self._run("lookup", service, None,
                         lambda storage, note: storage.usernames(service))

    def history(self, service: str, username: str) -> list[VersionInfo]:
        """Kept versions of a credential, newest first (no values)."""
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)

        def body(storage: SQLiteStorage, note: _Note) -> list[VersionInfo]:
            head = self._existing(storage, service, username)
            return [VersionInfo(v, k, created, v == head.current_version, expires)
                    for v, k, created, expires in storage.versions(head.id)]

        return self._run("history", service, username, body)

    def status(self) -> dict[str, Any]:
        """Facts about the vault for ``status``: no secret, no key material."""

        def body(storage: SQLiteStorage, note: _Note) -> dict[str, Any]:
            in_use = storage.keys_in_use()
            keks = [{"version": k.version, "state": k.state, "created_at": k.created_at,
                     "wrap_count": k.wrap_count, "versions": in_use.get(k.version, 0)}
                    for k in storage.keks()]
            return {"counts": storage.counts(), "keys": keks, "schema": storage.schema(),
                    "active": storage.active_kek()}

        found = self._run("status", None, None, body)
        return {
            "home": str(self.location.home),
            "database": str(self.location.database),
            "mode": self.mode,
            "key_file": None if self._kdf.uses_passphrase else str(self.location.key_file),
            "kdf": self._kdf.describe(),
            "vault_id": self._vault.vault_id.hex(),
            "created_at": self._vault.created_at,
            "schema": found["schema"],
            "max_versions": self.config.max_versions,
            "synchronous": self.config.synchronous,
            "config": str(self.config.path) if self.config.path else None,
            "keys": found["keys"],
            "rotation": self._rotation_info(found["active"]),
            **found["counts"],
            "warnings": self._warnings(),
        }

    def _rotation_info(self, active: KekRecord | None) -> dict[str, Any]:
        if active is None:
            return {"active_version": None}
        due_at = (active.created_at + self.config.rotate_after
                  if self.config.rotate_after is not None else None)
        return {"active_version": active.version, "rotate_after": self.config.rotate_after,
                "due_at": due_at, "wraps_left": max(0, self.config.max_wraps - active.wrap_count),
                "max_wraps": self.config.max_wraps}

    def _kdf_warnings(self) -> list[str]:
        kdf, cfg = self._kdf, self.config
        found = []
        if kdf.algorithm == "argon2id":
            if kdf.memory_kib < OWASP_ARGON2_FLOOR["memory_kib"] or \
                    kdf.iterations < OWASP_ARGON2_FLOOR["iterations"]:
                found.append("the vault's Argon2id parameters are below OWASP's floor "
                             "(19 MiB, t=2); run: keyring-hardened key rekey")
            elif kdf.memory_kib < cfg.argon2_memory_kib or kdf.iterations < cfg.argon2_iterations:
                found.append(f"the vault's KDF ({kdf.describe()}) is below the configured "
                             "parameters; run: keyring-hardened key rekey to upgrade")
        elif kdf.algorithm == "pbkdf2-sha256" and kdf.iterations < cfg.pbkdf2_iterations:
            found.append(f"the vault's KDF ({kdf.describe()}) is below the configured "
                         f"{cfg.pbkdf2_iterations} iterations; run: keyring-hardened key rekey")
        if kdf.uses_passphrase and self.location.key_file.exists():
            found.append(f"{self.location.key_file} does not open this passphrase vault "
                         "(left by a rekey?); delete it")
        return found

    def _warnings(self) -> list[str]:
        found = []
        for path in (self.location.home, self.location.database):
            try:
                mode = path.stat().st_mode & 0o777
            except OSError:
                continue
            if mode & 0o077:
                found.append(f"{path} is accessible by group or others (mode {mode:04o})")
        return found + self._kdf_warnings()
