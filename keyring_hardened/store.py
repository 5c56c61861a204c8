"""The store façade: every credential operation, each in one transaction.

Adapters (the keyring backend, the CLI, the Ansible plugins) make exactly
one call here per user request. The façade validates names and runs each
operation through :meth:`Session._run <keyring_hardened.session.Session._run>`,
one write transaction with its audit event, so a credential change commits
whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from . import gate
from . import refresh as refreshing
from .access import OPERATIONS, AccessConfig, Bucket, limits_for, tokens_now
from .engines import describe
from .errors import ExpiredError, IntegrityError, LockedError, NotFoundError, UsageError
from .humantime import utc as _utc
from .location import validate_actor
from .operation import _Note
from .port import HeadRow, KekRecord, Storage
from .secret import Secret
from .session import IMPLICIT_INIT, Session, _label, _throttle
from .state import bucket_of

if TYPE_CHECKING:
    from .keys import KeyManager
    from .passphrase import PassphraseProvider
    from .trail import AuditTrail

__all__ = ["CredentialInfo", "Explanation", "LimitState", "Store", "VersionInfo"]

MAX_NAME_BYTES = 4096
MAX_SECRET_BYTES = 1 << 20
#: For :meth:`Store.ttl`: leave this setting as it is.
KEEP: Literal["keep"] = "keep"
_MAX_TTL = 100 * 365 * 86400


class CredentialInfo(NamedTuple):
    """A live credential, as ``list`` shows it (never its value)."""

    service: str
    username: str
    version: int
    updated_at: float
    #: The current version's expiry, if it has a TTL.
    expires_at: float | None = None
    #: The refresher's kind (``command``, ``python``), never its spec.
    refresher: str | None = None
    #: The last refresh failed (its summary); None when none did since the last success.
    refresh_failure: str | None = None


class LimitState(NamedTuple):
    """A rate limit that applies to a request, and its bucket as of now."""

    rule: str
    tokens: float
    #: Seconds until a token is there; 0.0 when one is.
    retry_after: float


class Explanation(NamedTuple):
    """What ``policy test`` reports: the deciding rule, and every applicable limit."""

    actor: str
    op: str
    service: str | None
    allowed: bool
    reason: str
    #: No policies or limits are configured at all.
    unconfigured: bool
    limits: list[LimitState]
    seal: tuple[float, str] | None

    @property
    def limited(self) -> bool:
        """Whether a limit would reject the request right now."""
        return any(limit.retry_after > 0 for limit in self.limits)

    @property
    def sealed(self) -> bool:
        """Whether the seal would refuse the request (credential operations, while sealed)."""
        return self.seal is not None and self.op != "admin"


class VersionInfo(NamedTuple):
    """One kept version, as ``history`` shows it (never its value)."""

    version: int
    kek_version: int
    created_at: float
    current: bool
    expires_at: float | None = None
    #: On the current version only: the credential's refresher kind (never its
    #: spec) and the summary of its last failed refresh, as ``list`` has them.
    refresher: str | None = None
    refresh_failure: str | None = None


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


def _check_version(version: object) -> None:
    """A version number given by a caller: a positive integer that SQLite can hold."""
    # Versions are bound into associated data as 32-bit numbers (envelope).
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 1 <= version < 2**32):
        raise UsageError("version must be a positive integer")


def _check_seconds(what: str, value: object) -> None:
    """A TTL or window in seconds, as a caller gives it: None, or positive up to 100 years."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not 0 < value <= _MAX_TTL):
        raise UsageError(f"{what} must be a positive number of seconds, at most 100 years")


def _check_ahead(ttl: float | None, ahead: float | None) -> None:
    # A window as long as the TTL would refresh on every read.
    if ttl is not None and ahead is not None and ahead >= ttl:
        raise UsageError("the refresh-ahead window must be shorter than the TTL")


def _expired_message(service: str, username: str, expires: float,
                     plan: refreshing.RefreshState | None, why: str | None) -> str:
    """Why a read is exit 7: no refresher, or what became of the refresh."""
    start = f"{_label(service, username)} expired at {_utc(expires)}; "
    if plan is None:
        return start + "set a new value (no refresh is configured)"
    if why is not None:
        return start + why
    if plan.failure is not None:
        return start + f"the refresh failed ({plan.failure})"
    return start + "the refresh did not renew it"


def _refresh_info(head: HeadRow) -> tuple[str | None, str | None]:
    found = refreshing.state_of(head)
    return (None, None) if found is None else (found.kind, found.failure)


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

    # -- key management and the audit trail ----------------------------
    # Composed here, over the session: keys.py and trail.py depend on the
    # session, and the session on neither of them.

    @property
    def keys(self) -> KeyManager:
        """Key management: list, rotate, rewrap, retire, rekey."""
        from .keys import KeyManager

        return KeyManager(self)

    @property
    def trail(self) -> AuditTrail:
        """The audit trail of this vault: verify, show, export, checkpoint, prune."""
        from .trail import AuditTrail

        return AuditTrail(self)

    def _check_copy(self) -> dict[str, Any]:
        """Verify this copy as ``audit verify`` does, read-only; facts about it.

        The whole chain under every epoch's audit key, its ends, and every
        row against the state root its newest event carries. Raises
        :class:`IntegrityError` naming the first bad event.
        """
        with self._guard() as storage, storage.snapshot():
            self._tx = self._begin(storage)
            root = self._tx.root
            try:
                result = self.trail._check_table(storage)
                if not result.ok:
                    raise IntegrityError(f"audit chain broken at event {result.first_bad}: "
                                         f"{result.problem}", f"audit-chain-{result.first_bad}")
                meta = self._meta(storage)
                counts = storage.counts()
            finally:
                self._tx = None
        return {"vault_id": self._vault.vault_id.hex(), "epoch": self._epoch,
                "head_seq": result.head_seq, "head_mac": result.head_mac.hex(),
                "events_verified": result.verified, "key_version": meta.active.version,
                "root": root,
                **counts}

    # -- operations -------------------------------------------------------

    def get(self, service: str, username: str, *, version: int | None = None) -> Secret:
        """Return the current secret, or ``version`` of it; raise NotFoundError if absent.

        A current version past its expiry is refreshed first when the
        credential has a refresher (once across every process: see
        :mod:`~keyring_hardened.refresh`); inside its refresh-ahead window the
        current value is returned and a refresh is started.
        """
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)
        _check_version(version)
        # Only a read of the current value refreshes: --version N answers version N or nothing.
        due: list[tuple[int, int, str | None]] | None = [] if version is None else None
        try:
            value = self._run("read", service, username,
                              self._read_body(service, username, version, due))
        except ExpiredError:
            if not due:
                raise
            # Not inside the read's transaction: the refresher may take 30 s.
            why = refreshing.after_expired(self, service, username, *due[-1][:2])
            # Read again: the new version, or exit 7 saying why there is none.
            return self._run("read", service, username,
                             self._read_body(service, username, None, None, why))
        if due:
            refreshing.after_read(self, service, username, *due[-1])
        return value

    def _read_body(self, service: str, username: str, version: int | None,
                   due: list[tuple[int, int, str | None]] | None, why: str | None = None
                   ) -> Callable[[Storage, _Note], Secret]:
        """The body of a read; appends (head id, version) to ``due`` when a refresh is due."""

        def body(storage: Storage, note: _Note) -> Secret:
            head = self._existing(storage, service, username)
            if head.current_version is None:
                raise NotFoundError(f"credential for {_label(service, username)} is deleted",
                                    "deleted")
            wanted = head.current_version if version is None else version
            row = next((self._checked(head, r) for r in self._versions(storage, head)
                        if r.version == wanted), None)
            if row is None:
                if wanted == head.current_version:
                    raise IntegrityError(f"{_label(service, username)}: current version "
                                         "is missing", "missing-version")
                raise NotFoundError(f"version {version} of {_label(service, username)} "
                                    "is not kept", "not-kept")
            note.key_version = row.kek_version
            # The current version's expiry is the head's (set when it became
            # current, or again by a rollback); an older version's is its own.
            # Both are covered by the state root, and so is the refresher.
            current = wanted == head.current_version
            expires = head.expires_at if current else row.expires_at
            if expires is not None:
                plan = refreshing.state_of(head) if current else None
                now = self._clock()
                if now >= expires:
                    if plan is not None and due is not None:
                        due.append((head.id, wanted, None))
                        raise ExpiredError(f"{_label(service, username)} expired at "
                                           f"{_utc(expires)}", "expired-refreshing")
                    said = why if plan is None or version is None \
                        else "a read without a version number refreshes it"
                    raise ExpiredError(_expired_message(service, username, expires, plan, said),
                                       "expired")
                if plan is not None and plan.ahead and due is not None \
                        and now >= expires - plan.ahead:
                    # The recorded failure rides along: the reader is warned
                    # while the refresher keeps failing (refresh.after_read).
                    due.append((head.id, wanted, plan.failure))
                    note.reason = "refresh-ahead"
            return Secret(self._decrypt(head, row))

        return body

    def set(self, service: str, username: str, secret: str | Secret, *,
            ttl: float | None = None, refresher: refreshing.RefreshSpec | None = None,
            refresh_ahead: float | None = None) -> int:
        """Store a new version of a credential; returns its version number.

        With ``ttl`` (seconds), reads of this version fail with
        :class:`ExpiredError` once it is that old; without it, the config's
        ``default_ttl`` for the service applies, if any. ``refresher``
        (from :func:`refreshing.command_spec` or :func:`refreshing.plugin_spec`)
        attaches a refresher that renews the value when it expires, or
        ``refresh_ahead`` seconds before. A credential keeps its refresher
        across later ``set`` calls; a new value clears a recorded refresh failure.
        """
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)
        _check_seconds("ttl", ttl)
        _check_seconds("refresh_ahead", refresh_ahead)
        if refresher is not None and not isinstance(refresher, refreshing.RefreshSpec):
            raise UsageError("refresher must be a RefreshSpec")
        if ttl is None:
            ttl = refreshing.ttl_for(self, service)
        _check_ahead(ttl, refresh_ahead)
        data = _secret_bytes(secret)

        def body(storage: Storage, note: _Note) -> int:
            now = self._clock()
            head = self._find(storage, service, username)
            if head is None:
                head = storage.new_head(service, username, bucket_of(service), now)
            version = self._write_version(storage, head, data, now, note,
                                          float(ttl) if ttl is not None else None)
            self._set_refresher(storage, head, refresher, refresh_ahead, clear_failure=True)
            return version

        return self._run("write", service, username, body, writes=True)

    def _set_refresher(self, storage: Storage, head: HeadRow,
                       refresher: refreshing.RefreshSpec | Literal["keep"] | None,
                       ahead: float | Literal["keep"] | None, *, clear_failure: bool = False,
                       remove: bool = False) -> None:
        """Attach, change or remove a checked head's refresher, inside an operation."""
        old = refreshing.state_of(head)
        if remove:
            new = None
        elif refresher is not None and refresher != KEEP:
            assert isinstance(refresher, refreshing.RefreshSpec)  # noqa: S101 - narrowed for mypy
            new = refreshing.seal_spec(self, storage, head.service, head.username, refresher,
                                    (old.ahead if old else None) if ahead == KEEP or ahead is None
                                    else ahead)
        elif old is None:
            if ahead not in (None, KEEP):
                raise UsageError(f"{_label(head.service, head.username)} has no refresher: "
                                 "--refresh-ahead needs --refresh-command or --refresher",
                                 "no-refresher")
            return
        else:
            new = old._replace(ahead=old.ahead if ahead in (None, KEEP) else ahead)
        if new is not None and clear_failure:
            new = new._replace(failure=None, failed_at=None, failures=0)
        blob = None if new is None else new.encode()
        if blob != head.refresh:
            storage.set_refresh(head.id, blob)
            self._touch(head.service)

    def ttl(self, service: str, username: str, *,
            ttl: float | Literal["keep"] | None = KEEP,
            refresher: refreshing.RefreshSpec | Literal["keep"] | None = KEEP,
            refresh_ahead: float | Literal["keep"] | None = KEEP) -> None:
        """Change a credential's TTL, refresher or refresh-ahead window (audited as ``ttl``).

        ``ttl``: seconds from now until the current value expires, and the TTL
        of the versions refreshes make; None: it never expires. ``refresher``:
        a new spec, or None to remove it. Each left at :data:`KEEP` stays.
        """
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)
        if ttl != KEEP:
            _check_seconds("ttl", ttl)
        if refresh_ahead != KEEP:
            _check_seconds("refresh_ahead", refresh_ahead)
        if refresher not in (None, KEEP) and not isinstance(refresher, refreshing.RefreshSpec):
            raise UsageError("refresher must be a RefreshSpec")
        if ttl == KEEP and refresher == KEEP and refresh_ahead == KEEP:
            raise UsageError("nothing to change: give a TTL, a refresher or a refresh-ahead "
                             "window")

        def body(storage: Storage, note: _Note) -> None:
            head = self._existing(storage, service, username)
            if head.current_version is None:
                raise NotFoundError(f"credential for {_label(service, username)} is deleted",
                                    "deleted")
            row = next((self._checked(head, r) for r in self._versions(storage, head)
                        if r.version == head.current_version), None)
            if row is None:
                raise IntegrityError(f"{_label(service, username)}: current version "
                                     "is missing", "missing-version")
            now = self._clock()
            new_ttl = row.ttl if ttl == KEEP else ttl
            old = refreshing.state_of(head)
            ahead = (old.ahead if old else None) if refresh_ahead == KEEP else refresh_ahead
            _check_ahead(new_ttl if isinstance(new_ttl, float | int) else None,
                         ahead if refresher is not None else None)
            reasons = []
            if ttl != KEEP:
                expires = now + float(ttl) if isinstance(ttl, float | int) else None
                changed = row._replace(ttl=None if ttl is None else float(ttl),
                                       expires_at=expires, digest=None)
                from .session import _version_digest

                storage.set_version_ttl(head.id, row.version, changed.ttl, expires,
                                        _version_digest(changed))
                self._move_head(storage, head, head.current_version, head.last_version, now,
                                expires)
                reasons.append("ttl-none" if ttl is None else f"ttl-{int(float(ttl))}s")
            self._set_refresher(storage, head, refresher, refresh_ahead,
                                remove=refresher is None)
            if refresher is None:
                reasons.append("refresher-removed")
            elif refresher != KEEP:
                assert isinstance(refresher, refreshing.RefreshSpec)  # noqa: S101 - for mypy
                reasons.append(f"refresher-{refresher.kind}")
            if refresh_ahead != KEEP:
                reasons.append("ahead-none" if refresh_ahead is None
                               else f"ahead-{int(float(refresh_ahead))}s")
            note.reason = "; ".join(reasons)

        self._run("ttl", service, username, body, writes=True)

    def refresh(self, service: str, username: str, *, due_only: bool = False
                ) -> refreshing.Outcome:
        """Run a credential's refresher now (``due_only``: only if it is due).

        The refresh is single-flight across processes: if another process
        is refreshing it, this waits for that one. The outcome says what
        happened (``refreshed``, ``failed`` with a summary, ``not-due``, ...).
        """
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)
        for _ in range(3):
            hint = next((h for h in refreshing._hints(self)
                         if h.service == service and h.username == username), None)
            if hint is None:
                # Say why through a checked, audited look: absent, deleted, no refresher.
                def body(storage: Storage, note: _Note) -> None:
                    head = self._existing(storage, service, username)
                    if head.current_version is None:
                        raise NotFoundError(f"credential for {_label(service, username)} "
                                            "is deleted", "deleted")
                    if refreshing.state_of(head) is None:
                        raise UsageError(f"no refresher is configured for "
                                         f"{_label(service, username)}", "no-refresher")

                self._run("refresh", service, username, body)
                continue
            outcome = refreshing.refresh_one(self, service, username, hint.head_id, hint.current,
                                          force=not due_only, wait=True)
            if outcome.result != "changed":
                return outcome
        return refreshing.Outcome(service, username, "changed")

    def refresh_due(self) -> list[refreshing.Outcome]:
        """Refresh every credential that is expired or inside its refresh-ahead window."""
        return refreshing.refresh_due(self, wait=True)

    def delete(self, service: str, username: str, *, purge: bool = False) -> None:
        """Delete a credential; kept versions stay for ``rollback`` unless ``purge``."""
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)

        def body(storage: Storage, note: _Note) -> None:
            head = self._existing(storage, service, username)
            if purge:
                storage.purge(head.id)
                self._touch(service)
            elif head.current_version is None:
                raise NotFoundError(f"credential for {_label(service, username)} "
                                    "is already deleted", "deleted")
            else:
                self._versions_checked(storage, head)
                self._move_head(storage, head, None, head.last_version, self._clock(), None)

        self._run("purge" if purge else "delete", service, username, body, writes=True)
        if purge:
            # Fold the WAL so freed pages are zeroed in the database file too.
            self._checkpoint("purge")

    def rollback(self, service: str, username: str, *, to_version: int | None = None,
                 allow_expired: bool = False) -> int:
        """Restore a kept version as a new current version; returns the new number.

        Without ``to_version``: the newest kept version before the current
        one, or the newest kept version of a deleted credential. A version
        past its expiry is restored only with ``allow_expired``, and then
        lives its TTL again from now: a TTL limits a value's life, it does
        not revoke it.
        """
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)
        _check_version(to_version)

        def body(storage: Storage, note: _Note) -> int:
            head = self._existing(storage, service, username)
            rows = self._versions(storage, head)
            target = to_version
            if target is None:
                earlier = [r.version for r in rows if head.current_version is None
                           or r.version < head.current_version]
                if not earlier:
                    raise NotFoundError(f"no earlier version of {_label(service, username)} "
                                        "to roll back to", "no-earlier-version")
                target = earlier[-1]
            if target == head.current_version:
                raise UsageError(f"version {target} of {_label(service, username)} "
                                 "is already current", "already-current")
            row = next((self._checked(head, r) for r in rows if r.version == target), None)
            if row is None:
                raise NotFoundError(f"version {target} of {_label(service, username)} "
                                    "is not kept", "not-kept")
            now = self._clock()
            if row.expires_at is not None and now >= row.expires_at and not allow_expired:
                raise ExpiredError(f"version {target} of {_label(service, username)} expired "
                                   f"at {_utc(row.expires_at)}; restoring it would give it its "
                                   "TTL again from now (use --allow-expired to do that)",
                                   "rollback-expired")
            value = self._decrypt(head, row)
            note.reason = f"from-version-{target}"
            # A restored value gets its version's TTL again, counted from now.
            return self._write_version(storage, head, value.encode("utf-8"), now, note,
                                       row.ttl)

        return self._run("rollback", service, username, body, writes=True)

    def _may_see(self, service: str, seen: dict[str, bool]) -> bool:
        """Whether ``list`` shows this service's credentials: the actor may list *and* read it."""
        config = self.config.access
        if config is None:
            return True
        if service not in seen:
            seen[service] = all(gate.decision(config, self.subject, op, service).allowed
                                for op in ("list", "read"))
        return seen[service]

    def credentials(self) -> list[CredentialInfo]:
        """Every live credential the actor may list and read (names and versions only).

        Checks every row of the vault. Under policies, what the actor may not
        read is left out (the event's reason counts it), not refused.
        """
        def body(storage: Storage, note: _Note) -> list[CredentialInfo]:
            self._full_check(storage, versions=False)
            found = [CredentialInfo(h.service, h.username, h.current_version, h.updated_at,
                                    h.expires_at, *_refresh_info(h))
                     for _, h in storage.all_heads() if h.current_version is not None]
            seen: dict[str, bool] = {}
            shown = [c for c in found if self._may_see(c.service, seen)]
            if len(shown) != len(found):
                note.reason = f"hidden-{len(found) - len(shown)}"
            return shown

        return self._run("list", None, None, body)

    def usernames(self, service: str) -> list[str]:
        """The usernames of a service's live credentials, most recently updated first.

        A service's heads share one bucket of the state tree, so the answer
        (and the order, which keyring's ``get_credential`` relies on) is
        checked whole: no head can be hidden, bumped or written back.
        """
        _check_name("service", service, allow_empty=False)

        def body(storage: Storage, note: _Note) -> list[str]:
            config = self.config.access
            if config is not None:
                # "lookup" itself needs list (checked at the door); naming the
                # usernames leads to reading them, so read is needed too. A
                # refusal, never an empty answer: keyring must not see "none".
                found = gate.decision(config, self.subject, "read", service)
                if not found.allowed:
                    raise gate.denied(self.subject, "read", service, found)
            heads = [h for h in self._bucket(storage, self._state(), bucket_of(service))
                     if h.service == service and h.current_version is not None]
            if not heads:
                raise NotFoundError(f"no credential for service {service!r}", "no-credential")
            heads.sort(key=lambda h: (h.updated_at, h.id), reverse=True)
            return [h.username for h in heads]

        try:
            return self._run("lookup", service, None, body)
        except NotFoundError:
            return []

    def history(self, service: str, username: str) -> list[VersionInfo]:
        """Kept versions of a credential, newest first (no values)."""
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)

        def body(storage: Storage, note: _Note) -> list[VersionInfo]:
            head = self._existing(storage, service, username)
            plan = _refresh_info(head)
            return [VersionInfo(r.version, r.kek_version, r.created_at, True, head.expires_at,
                                *plan)
                    if r.version == head.current_version
                    else VersionInfo(r.version, r.kek_version, r.created_at, False, r.expires_at)
                    for r in map(partial(self._checked, head),
                                 reversed(self._versions(storage, head)))]

        return self._run("history", service, username, body)

    # -- access control ---------------------------------------------------

    def seal(self) -> None:
        """Seal the vault: every credential request is refused (exit 6) until :meth:`unseal`.

        The seal is part of the authenticated state, so deleting it from the
        database does not unseal: it breaks the state root (exit 3).
        """
        def body(storage: Storage, note: _Note) -> None:
            meta = self._meta(storage)
            if meta.seal is not None:
                raise UsageError(f"the vault is already sealed (since {_utc(meta.seal[0])}, by "
                                 f"{meta.seal[1]})", "already-sealed")
            now = self._clock()
            storage.set_seal(now, self.actor)
            self._set_meta_seal(self._state(), meta, (now, self.actor))

        self._run("seal", None, None, body, writes=True)

    def unseal(self, *, passphrase: str | None = None, prompt: PassphraseProvider | None = None,
               key_file: Path | None = None) -> None:
        """Lift the seal after proving the root key again.

        Key-file mode reads the key file (``key_file``, else the vault's
        own); passphrase mode asks for the passphrase from the usual sources.
        A wrong proof is audited, counts in the unlock throttle, and raises
        :class:`LockedError`.
        """
        # Refused before any proof is tried: a wrong proof from an actor that
        # may not unseal must not count against everyone's unlocks.
        gate.require_admin(self, "unseal")
        with self._guard() as storage:
            attempt = _throttle(storage, self._clock, self._kdf.uses_passphrase)
        try:
            self._prove(passphrase, prompt, key_file)
        except BaseException as exc:
            attempt.ended(exc)
            if not isinstance(exc, LockedError):
                raise
            proof: LockedError | None = exc
        else:
            attempt.ended(None)
            proof = None

        def body(storage: Storage, note: _Note) -> None:
            if proof is not None:
                raise proof
            meta = self._meta(storage)
            if meta.seal is None:
                raise UsageError("the vault is not sealed", "not-sealed")
            note.reason = f"sealed-since-{int(meta.seal[0])}"
            storage.set_seal(None)
            self._set_meta_seal(self._state(), meta, None)

        self._run("unseal", None, None, body, writes=True)

    def explain(self, actor: str, op: str, service: str | None) -> Explanation:
        """What access control would do with a request, without making it (``policy test``).

        Nothing is taken from any bucket; the token counts are as of now.
        """
        if op not in OPERATIONS:
            raise UsageError(f"--op must be one of {', '.join(OPERATIONS)}")
        if service is not None:
            _check_name("service", service, allow_empty=False)
        elif op not in ("admin", "list"):
            raise UsageError(f"--service is needed for {op} (only admin and list are vault-wide)")
        actor = validate_actor(actor)
        config = self.config.access or AccessConfig()

        def body(storage: Storage, note: _Note) -> Explanation:
            meta = self._meta(storage)
            found = gate.decision(config, actor, op, service)
            if op == "list" and service is None:
                # As list does: no decision for the whole vault, a filter per service.
                found = found._replace(allowed=True, reason=(
                    "the whole-vault list is filtered: it shows each credential whose service "
                    "this actor may both list and read"))
            elif op == "list" and found.allowed:
                # Naming a service's usernames leads to reading them: read is needed too.
                found = gate.decision(config, actor, "read", service)
            stored = {(b.rule, b.actor): b for b in meta.buckets}
            limits = []
            now = self._clock()
            for m in limits_for(config.rate_limits, actor, op,
                                gate.ALL_SERVICES if service is None else service):
                row = stored.get((gate.bucket_rule(m.rule), actor))
                bucket = tokens_now(None if row is None else Bucket(row.tokens, row.updated),
                                    m.rule, now)
                wait = 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / m.rule.rate
                limits.append(LimitState(m.rule.describe(m.key[0]), bucket.tokens, wait))
            return Explanation(actor, op, service, found.allowed, found.reason,
                               self.config.access is None, limits, meta.seal)

        return self._run("policy-test", None, None, body)

    def status(self) -> dict[str, Any]:
        """Facts about the vault for ``status``: no secret, no key material."""

        def body(storage: Storage, note: _Note) -> dict[str, Any]:
            in_use = storage.keys_in_use()
            meta = self._meta(storage)
            keks = [{"version": k.version, "state": k.state, "created_at": k.created_at,
                     "wrap_count": k.wrap_count, "versions": in_use.get(k.version, 0)}
                    for k in meta.keks]
            made = storage.last_event("init")
            restored = storage.last_event("restore")
            return {"counts": storage.counts(), "keys": keks, "schema": storage.schema(),
                    "sealed": None if meta.seal is None else {"since": meta.seal[0],
                                                              "by": meta.seal[1]},
                    "last_restore": None if restored is None else {
                        "at": restored.ts_us / 1_000_000, "by": restored.actor,
                        "reason": restored.reason, "event": restored.seq},
                    "active": meta.active, "epoch": meta.vault.generation,
                    "created_by": made.actor if made else None,
                    "created_implicitly": bool(made and (made.reason or "").endswith(
                        IMPLICIT_INIT))}

        found = self._run("status", None, None, body)
        return {
            "home": str(self.location.home),
            "database": describe(self.location, self.config),
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
            "key_epoch": found["epoch"],
            "created_by": found["created_by"],
            "created_implicitly": found["created_implicitly"],
            "sealed": found["sealed"],
            "last_restore": found["last_restore"],
            "refresh": refreshing.counts(self),
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
        # Parameters below OWASP's floor never get this far: they are refused
        # as damage when the vault opens (KdfParams.from_json).
        if kdf.algorithm == "argon2id":
            if kdf.memory_kib < cfg.argon2_memory_kib or kdf.iterations < cfg.argon2_iterations:
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
        for path in (self.location.home, self.location.database):  # PostgreSQL: no file
            try:
                mode = path.stat().st_mode & 0o777
            except OSError:
                continue
            if mode & 0o077:
                found.append(f"{path} is accessible by group or others (mode {mode:04o})")
        return found + self._kdf_warnings()

    # -- moving in (issue 14) ---------------------------------------------

    def import_secret(self, service: str, username: str, secret: str | Secret, *,
                      source: str, update: bool = False) -> tuple[str, int | None]:
        """Store a credential read from another keyring; audited as ``import`` naming ``source``.

        The write path of :meth:`set` (same checks, one write transaction,
        a new version under the active KEK), deciding in the same
        transaction whether the credential already exists: a live one is
        left as it is (``"skipped"``) unless ``update``, which makes a new
        version (``"updated"``); otherwise ``"imported"``. Returns the
        outcome and the stored version (None when skipped).
        """
        _check_name("service", service, allow_empty=False)
        _check_name("username", username, allow_empty=True)
        _check_name("source", source, allow_empty=False)
        if len(source) > 200 or not source.isprintable():
            raise UsageError("source must be a short printable name")
        data = _secret_bytes(secret)

        def body(storage: Storage, note: _Note) -> tuple[str, int | None]:
            now = self._clock()
            head = self._find(storage, service, username)
            exists = head is not None and head.current_version is not None
            if exists and not update:
                note.reason = f"skipped, exists; from {source}"
                return "skipped", None
            if head is None:
                head = storage.new_head(service, username, bucket_of(service), now)
            note.reason = f"from {source}"
            return ("updated" if exists else "imported",
                    self._write_version(storage, head, data, now, note))

        return self._run("import", service, username, body, writes=True)
