"""An unlocked vault: opening, unlocking, and the plumbing every operation runs through.

:class:`Session` holds the keys of one unlocked vault and runs each
operation as one write transaction that also appends its audit event
(:meth:`Session._run`). :class:`~keyring_hardened.store.Store` adds the
credential operations on top.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Self, TypeVar

from . import audit, envelope
from .config import Config, load_config
from .envelope import DecryptFailed, Kek, Place, Sealed
from .errors import (
    HardenedError,
    IntegrityError,
    LockedError,
    NotFoundError,
    StorageError,
    UsageError,
)
from .location import Location, default_actor, validate_actor
from .rootkey import (
    KdfParams,
    RootKey,
    VaultKeys,
    create_key_file,
    derive_from_passphrase,
    read_key_file,
)
from .storage import HeadRow, KekRecord, SQLiteStorage, VaultMissingError, VaultRecord, VersionRow

if TYPE_CHECKING:
    from .keys import KeyManager
    from .passphrase import PassphraseProvider
    from .sinks import Sinks
    from .trail import AuditTrail

__all__ = ["Session"]

Clock = Callable[[], float]

MIN_PASSPHRASE_CHARS = 8
_VAULT_ID_LEN = 16
#: Written by ``key rekey`` before it changes anything, removed when it is done.
REKEY_JOURNAL = "rekey.json"
T = TypeVar("T")


class _NoSinks:
    """Stands in for :class:`~keyring_hardened.sinks.Sinks` when none are configured."""

    def emit(self, event: audit.Event) -> None:
        """Nothing to mirror to."""


def _sinks(specs: tuple[str, ...]) -> Sinks | _NoSinks:
    """The configured audit sinks; their module loads only when there are some."""
    if not specs:
        return _NoSinks()
    from .sinks import Sinks

    return Sinks(specs)


class _Note:
    """What an operation's body tells its audit event."""

    __slots__ = ("key_version", "reason")

    def __init__(self) -> None:
        self.key_version: int | None = None
        self.reason: str | None = None


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _label(service: str, username: str) -> str:
    # repr() keeps the message on one line whatever the names hold.
    return f"service {service!r}, user {username!r}"


def _source(cfg: Config, passphrase: str | None,
            prompt: PassphraseProvider | None) -> PassphraseProvider:
    def get() -> str:
        if passphrase is not None:
            return passphrase
        from .passphrase import provider  # imported only when a passphrase is needed

        return provider(cfg, prompt)()

    return get


def _record_pending(storage: SQLiteStorage, clock: Clock, actor: str,
                    exc: HardenedError) -> None:
    """Keep a failed unlock for the trail; it is chained at the next good unlock."""
    # The unlock failed anyway; a vault we cannot write (read-only media)
    # must still answer with the real reason, not a storage error.
    with contextlib.suppress(HardenedError):
        storage.add_pending(int(clock() * 1_000_000), actor, "unlock", exc.kind, exc.reason)


def _key_file_root(location: Location, vault: VaultRecord) -> RootKey:
    """The root key from the key file, or from the new key of a rekey in flight.

    Between a rekey's commit and the rename of its new key file into place,
    the vault already expects the new key: accept it from ``<key file>.new``,
    which only a rekey writes.
    """
    failure: LockedError | None = None
    for path in (location.key_file, location.pending_key_file):
        try:
            root = RootKey(read_key_file(path), vault.vault_id)
        except LockedError as exc:
            failure = failure or exc
            continue
        if root.matches(vault.vault_id, vault.verifier):
            return root
        root.close()
        failure = failure or LockedError(
            f"wrong key file: {location.key_file} does not open this vault", "wrong-key")
    assert failure is not None  # noqa: S101 - the loop ran and nothing matched
    raise failure


def _make_home(home: Path) -> None:
    """Create the vault folder (and missing parents) 0700 whatever the umask; refuse untrusted."""
    from .location import make_home

    make_home(home)


class Session:
    """An unlocked vault. Open with :meth:`open` or :meth:`init`; close when done.

    A store is safe to share between threads, and survives ``fork``: a child
    process reconnects to the database on its first call.
    """

    def __init__(self, location: Location, config: Config, storage: SQLiteStorage,
                 vault: VaultRecord, root: RootKey, vkeys: VaultKeys, clock: Clock,
                 actor: str) -> None:
        self.location = location
        self.config = config
        self.actor = actor
        self._storage = storage
        self._vault = vault
        self._kdf = KdfParams.from_json(vault.kdf)
        self._root = root
        self._vkeys = vkeys
        self._keks: dict[int, Kek] = {}
        self._clock = clock
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._closed = False
        self._sinks = _sinks(config.audit_sinks)
        #: Events chained inside an operation (automatic rotation) to mirror after commit.
        self._pending_emit: list[audit.Event] = []
        #: Things a person should hear about this open (an interrupted rekey resolved).
        self.notices: list[str] = []

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

    @property
    def mode(self) -> str:
        """How the vault is unlocked: ``"key file"`` or ``"passphrase"``."""
        return "passphrase" if self._kdf.uses_passphrase else "key file"

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"{type(self).__name__}(home={str(self.location.home)!r}, {state})"

    # -- opening ----------------------------------------------------------

    @classmethod
    def open(cls, home: str | os.PathLike[str] | None = None, *,
             passphrase: str | None = None, prompt: PassphraseProvider | None = None,
             config: Config | None = None, clock: Clock = time.time, actor: str | None = None,
             create: bool = False) -> Self:
        """Open and unlock the vault at ``home`` (or the configured default).

        A passphrase vault takes ``passphrase`` if given, else
        ``KEYRING_HARDENED_PASSPHRASE``, else ``passphrase_command``, else
        ``prompt()``; with none of them it raises :class:`LockedError`.
        With ``create=True`` a missing vault is created in key-file mode, as
        ``init`` would; otherwise a missing vault raises :class:`NotFoundError`.
        """
        location = Location.resolve(home)
        location.check_home()  # as ssh's StrictModes, before trusting anything in it
        cfg = config if config is not None else load_config(location.config_file,
                                                            location.config_required)
        who = validate_actor(actor) if actor is not None else default_actor()
        try:
            storage = SQLiteStorage.open(location.database, cfg.synchronous, cfg.busy_timeout)
        except VaultMissingError:
            if not create:
                raise
            made = cls._create(location, cfg, KdfParams.keyfile(), None, clock, who)
            if made is not None:
                return made
            # Another process created it first: use theirs.
            storage = SQLiteStorage.open(location.database, cfg.synchronous, cfg.busy_timeout)
        try:
            notice = None
            if location.home.joinpath(REKEY_JOURNAL).exists():
                from .keys import recover_interrupted_rekey

                notice = recover_interrupted_rekey(location, storage)
            vault = storage.vault()
            try:
                root = cls._unlock(location, vault, _source(cfg, passphrase, prompt))
            except LockedError as exc:
                _record_pending(storage, clock, who, exc)
                raise
            store = cls._ready(location, cfg, storage, vault, root, clock, who)
            if notice:
                store.notices.append(notice)
            return store
        except BaseException:
            storage.close()
            raise

    @classmethod
    def _ready(cls, location: Location, cfg: Config, storage: SQLiteStorage,
               vault: VaultRecord, root: RootKey, clock: Clock, actor: str) -> Self:
        """Finish unlocking: unwrap the KEKs and chain any failed unlocks seen meanwhile."""
        try:
            material = envelope.unwrap_vault_key(root.wrap, vault.vault_id, vault.vault_key)
        except DecryptFailed:
            root.close()
            exc = IntegrityError("the vault key failed its integrity check; restore the vault "
                                 "from a backup", "vault-key-damaged")
            _record_pending(storage, clock, actor, exc)  # no audit key without it
            raise exc from None
        store = cls(location, cfg, storage, vault, root, VaultKeys(material, vault.vault_id),
                    clock, actor)
        try:
            store._load_keks(fresh=True)
        except IntegrityError as exc:
            store._record_failure("unlock", exc)
            store.close()
            raise
        if storage.has_pending():
            store._fold_pending()
        return store

    @classmethod
    def init(cls, home: str | os.PathLike[str] | None = None, *, passphrase_mode: bool = False,
             kdf: str | None = None, passphrase: str | None = None,
             prompt: PassphraseProvider | None = None, config: Config | None = None,
             clock: Clock = time.time, actor: str | None = None) -> Self:
        """Create a new vault; refuse (exit 2) when one exists at ``home``.

        Key-file mode writes 32 random bytes to the key file (reusing a key
        file that is already there). Passphrase mode derives the root key
        with Argon2id, or PBKDF2 with ``kdf="pbkdf2"``; the passphrase comes
        from the same sources as in :meth:`open` (``prompt`` should confirm it).
        """
        location = Location.resolve(home)
        location.check_home()  # as ssh's StrictModes, before trusting anything in it
        cfg = config if config is not None else load_config(location.config_file,
                                                            location.config_required)
        who = validate_actor(actor) if actor is not None else default_actor()
        if location.database.exists():
            raise UsageError(f"a vault already exists at {location.home}; "
                             "init never overwrites one")
        if kdf is not None and not passphrase_mode:
            raise UsageError("--kdf applies only with --passphrase")
        secret: str | None = None
        if passphrase_mode:
            secret = _source(cfg, passphrase, prompt)()
            if len(secret) < MIN_PASSPHRASE_CHARS:
                raise UsageError(f"passphrase must be at least {MIN_PASSPHRASE_CHARS} characters")
            params = cfg.new_kdf_params(kdf)
        else:
            params = KdfParams.keyfile()
        made = cls._create(location, cfg, params, secret, clock, who)
        if made is None:
            raise UsageError(f"a vault already exists at {location.home}; "
                             "init never overwrites one")
        return made

    @classmethod
    def _create(cls, location: Location, cfg: Config, params: KdfParams, passphrase: str | None,
                clock: Clock, actor: str) -> Self | None:
        _make_home(location.home)
        if params.uses_passphrase:
            assert passphrase is not None  # noqa: S101 - init checked it
            material = derive_from_passphrase(params, passphrase)
        else:
            create_key_file(location.key_file)
            material = read_key_file(location.key_file)
        vault_id = os.urandom(_VAULT_ID_LEN)
        root = RootKey(material, vault_id)
        now = clock()
        kek = envelope.new_kek(1)
        try:
            record = VaultRecord(vault_id, now, params.to_json(), root.verifier(vault_id),
                                 envelope.new_vault_key(root.wrap, vault_id), 1)
            wrapped = envelope.wrap_kek(root.wrap, vault_id, kek)
            if not SQLiteStorage.create(location.database, record,
                                        KekRecord(1, "active", now, wrapped, 0)):
                root.close()
                return None
        finally:
            kek.wipe()
        storage = SQLiteStorage.open(location.database, cfg.synchronous, cfg.busy_timeout)
        store = cls._ready(location, cfg, storage, storage.vault(), root, clock, actor)

        def created(storage: SQLiteStorage, note: _Note) -> None:
            note.key_version = 1
            note.reason = params.algorithm

        store._run("init", None, None, created)
        return store

    @staticmethod
    def _unlock(location: Location, vault: VaultRecord,
                passphrase: PassphraseProvider) -> RootKey:
        params = KdfParams.from_json(vault.kdf)
        if not params.uses_passphrase:
            return _key_file_root(location, vault)
        root = RootKey(derive_from_passphrase(params, passphrase()), vault.vault_id)
        # The verifier tells a wrong key (locked) apart from damaged key records
        # (integrity), without decrypting anything.
        if not root.matches(vault.vault_id, vault.verifier):
            root.close()
            raise LockedError("wrong passphrase", "wrong-passphrase")
        return root

    def _load_keks(self, fresh: bool = False) -> None:
        # ``fresh``: this open read the vault record an instant ago; reading it
        # again would not close the window for a concurrent rekey, only cost
        # a query on every cold start.
        if not fresh:
            self._check_generation(self._storage)
        for record in self._storage.keks():
            if record.version in self._keks or record.state == "retired" or record.wrapped is None:
                continue
            try:
                self._keks[record.version] = envelope.unwrap_kek(
                    self._root.wrap, self._vault.vault_id, record.version, record.wrapped)
            except DecryptFailed:
                raise IntegrityError(f"key version {record.version} failed its integrity "
                                     "check; restore the vault from a backup",
                                     "kek-damaged") from None

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[SQLiteStorage]:
        with self._lock:
            if self._closed:
                raise UsageError("the store is closed")
            if os.getpid() != self._pid:
                # After fork the inherited connection belongs to the parent:
                # leave it untouched and open our own.
                self._storage = SQLiteStorage.open(self.location.database,
                                                   self.config.synchronous,
                                                   self.config.busy_timeout)
                self._pid = os.getpid()
            yield self._storage

    def _ident(self, name: str | None) -> str | None:
        """A name as the audit trail stores it: itself, or its keyed hash."""
        if name is None or not self.config.audit_hmac_identifiers:
            return name
        return audit.hash_identifier(self._vkeys.identifier_key, name)

    def _append(self, storage: SQLiteStorage, op: str, service: str | None,
                username: str | None, failure: HardenedError | None,
                key_version: int | None, reason: str | None = None) -> audit.Event:
        """Chain one event onto the trail, inside the caller's write transaction."""
        seq, prev = storage.audit_head()
        event = audit.Event(seq + 1, int(self._clock() * 1_000_000), self.actor, op,
                            self._ident(service), self._ident(username),
                            failure.kind if failure else "ok", key_version,
                            (failure.reason if failure else None) or reason)
        event = event._replace(mac=audit.chain_mac(self._vkeys.audit_key, prev, event))
        storage.append_event(event)
        return event

    def _run(self, op: str, service: str | None, username: str | None,
             body: Callable[[SQLiteStorage, _Note], T], *, writes: bool = False) -> T:
        """Run ``body`` and append its audit event in one write transaction.

        A failure of the body is audited too (its changes undone first, the
        event kept) and then raised. If the event cannot be written, nothing
        the body did is kept and nothing is returned: fail closed.
        """
        note = _Note()
        failure: HardenedError | None = None
        with self._guard() as storage:
            self._pending_emit.clear()
            known = set(self._keks)
            try:
                with storage.transaction():
                    if writes:
                        storage.savepoint()
                    try:
                        result = body(storage, note)
                    except HardenedError as exc:
                        if writes:
                            storage.rollback_savepoint()
                        self._forget_keks_except(known)
                        failure = exc
                    else:
                        if writes:
                            storage.release_savepoint()
                    try:
                        event = self._append(storage, op, service, username, failure,
                                             note.key_version, note.reason)
                    except HardenedError as exc:
                        raise StorageError(f"the audit trail could not be written ({exc}); "
                                           f"the {op} was not performed",
                                           "audit-write") from None
            except BaseException as exc:
                self._forget_keks_except(known)
                if isinstance(exc, HardenedError) and failure is not None \
                        and exc.reason != "audit-write":
                    raise failure from None  # the transaction itself failed: report the cause
                raise
        for extra in self._pending_emit:
            self._sinks.emit(extra)
        self._pending_emit.clear()
        self._sinks.emit(event)
        if failure is not None:
            raise failure
        return result

    def _forget_keks_except(self, known: set[int]) -> None:
        """Drop KEKs cached during a transaction that did not commit.

        A rotation rolled back must not leave its KEK behind: the next
        rotation reuses the version number with a different key.
        """
        self._pending_emit.clear()
        for version in set(self._keks) - known:
            self._keks.pop(version).wipe()

    def _record_failure(self, op: str, exc: HardenedError) -> None:
        """Audit a failure that happened outside :meth:`_run` (unlock)."""
        with self._guard() as storage, storage.transaction():
            event = self._append(storage, op, None, None, exc, None)
        self._sinks.emit(event)

    def _fold_pending(self) -> None:
        """Chain the failed unlocks recorded while nobody held the key."""
        with self._guard() as storage, storage.transaction():
            emitted = []
            for ts_us, actor, op, outcome, reason in storage.take_pending():
                seq, prev = storage.audit_head()
                event = audit.Event(seq + 1, ts_us, actor, op, None, None, outcome, None,
                                    f"{reason or outcome}; recorded before unlock")
                event = event._replace(mac=audit.chain_mac(self._vkeys.audit_key, prev, event))
                storage.append_event(event)
                emitted.append(event)
        for event in emitted:
            self._sinks.emit(event)

    def _head_mac(self, service: str, username: str, current: int | None, last: int,
                  expires_at: float | None = None) -> bytes:
        data = b"".join(struct.pack(">I", len(p)) + p for p in (
            self._vault.vault_id, service.encode(), username.encode()))
        data += struct.pack(">QQ", current or 0, last)
        if expires_at is not None:
            # Covered by the MAC, so nobody can extend a credential's life by editing it.
            data += b"\x01" + struct.pack(">d", expires_at)
        return self._vkeys.record_mac(data)

    def _verify_head(self, head: HeadRow) -> None:
        expected = self._head_mac(head.service, head.username, head.current_version,
                                  head.last_version, head.expires_at)
        if not hmac.compare_digest(expected, head.mac):
            raise IntegrityError(f"{_label(head.service, head.username)}: "
                                 "integrity check failed", "head-mac")

    def _kek(self, version: int) -> Kek:
        if version not in self._keks:
            self._load_keks()  # another process may have rotated since we unlocked
        kek = self._keks.get(version)
        if kek is None:
            raise IntegrityError(f"key version {version} is not available", "kek-unavailable")
        return kek

    def _decrypt(self, head: HeadRow, row: VersionRow) -> str:
        place = Place(self._vault.vault_id, head.service, head.username, row.version)
        try:
            kek = self._kek(row.kek_version)
            data = envelope.open_secret(kek, place, Sealed(row.kek_version, row.wrapped_key,
                                                            row.ciphertext))
            return data.decode("utf-8")
        except (DecryptFailed, IntegrityError, UnicodeDecodeError) as exc:
            # One opaque error for every way decryption can fail: no oracle.
            # Which check failed goes to the audit record only.
            reason = (exc.reason if isinstance(exc, IntegrityError)
                      else exc.args[0] if isinstance(exc, DecryptFailed) and exc.args
                      else "utf-8")
            raise IntegrityError(f"{_label(head.service, head.username)}: integrity check "
                                 "failed", reason) from None

    def _rotation_due(self, active: KekRecord, now: float) -> str | None:
        """Why the active KEK must be replaced before its next wrap, if it must."""
        if active.wrap_count >= self.config.max_wraps:
            return "wrap-limit"
        if self.config.rotate_after is not None and \
                now - active.created_at >= self.config.rotate_after:
            return "age"
        return None

    def _check_generation(self, storage: SQLiteStorage) -> None:
        """Refuse to wrap or unwrap KEKs with a root key that a rekey has replaced."""
        if storage.vault().generation != self._vault.generation:
            raise LockedError("the root key was replaced (key rekey) after this process "
                              "unlocked the vault; open it again", "root-replaced")

    def _rotate_in(self, storage: SQLiteStorage, now: float, reason: str,
                   record: bool = True) -> int:
        """Add a KEK version and make it active, inside the caller's transaction.

        With ``record``, audited as its own ``key-rotate`` event, before the
        event of the operation that caused it.
        """
        # A new KEK is wrapped under our root key: it must still be the vault's.
        self._check_generation(storage)
        active = storage.active_kek()
        version = storage.newest_kek_version() + 1
        kek = envelope.new_kek(version)
        storage.add_kek(KekRecord(version, "active", now,
                                  envelope.wrap_kek(self._root.wrap, self._vault.vault_id, kek),
                                  0))
        if active is not None:
            storage.set_kek_state(active.version, "decrypt-only")
        self._keks[version] = kek
        if record:
            event = self._append(storage, "key-rotate", None, None, None, version, reason)
            self._pending_emit.append(event)
        return version

    def _write_version(self, storage: SQLiteStorage, head: HeadRow, data: bytes,
                       now: float, note: _Note, ttl: float | None = None) -> int:
        active = storage.active_kek()
        if active is None:
            raise IntegrityError("the vault has no active key version", "no-active-kek")
        due = self._rotation_due(active, now)
        kek = self._kek(self._rotate_in(storage, now, f"auto-{due}") if due else active.version)
        version = head.last_version + 1
        place = Place(self._vault.vault_id, head.service, head.username, version)
        sealed = envelope.seal_secret(kek, place, data)
        expires = now + ttl if ttl is not None else None
        storage.add_version(head.id, VersionRow(version, kek.version, sealed.wrapped_key,
                                                sealed.ciphertext, now, ttl, expires))
        storage.update_head(head.id, version, version, now,
                            self._head_mac(head.service, head.username, version, version,
                                           expires), expires)
        storage.count_wrap(kek.version)
        if version > self.config.max_versions:
            storage.prune(head.id, self.config.max_versions)
        note.key_version = kek.version
        return version

    def _existing(self, storage: SQLiteStorage, service: str, username: str) -> HeadRow:
        head = storage.head(service, username)
        if head is None:
            raise NotFoundError(f"no credential for {_label(service, username)}", "no-credential")
        self._verify_head(head)
        return head

    def close(self) -> None:
        """Wipe key material (best effort) and close the database."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for kek in self._keks.values():
                kek.wipe()
            self._keks.clear()
            self._root.close()
            self._vkeys.close()
            if os.getpid() == self._pid:
                self._storage.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
