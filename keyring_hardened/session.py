"""An unlocked vault: opening, unlocking, and the plumbing every operation runs through.

:class:`Session` holds the keys of one unlocked vault and runs each
operation as one write transaction that also appends its audit event
(:meth:`Session._run`), through the access gate
(:func:`keyring_hardened.gate.admit`). :class:`~keyring_hardened.store.Store`
adds the credential operations on top, and composes key management
(:mod:`~keyring_hardened.keys`) and the audit trail
(:mod:`~keyring_hardened.trail`), which depend on the session and not the
reverse. Storage is reached only through the port
(:class:`keyring_hardened.port.Storage`), opened by
:func:`keyring_hardened.engines.engine`.

Every operation first checks the newest audit event's mac, which covers the
vault's *state root* (see :mod:`keyring_hardened.state`), and then checks
each row it reads against that root; a write ends by computing the new root,
which its own event carries. So the vault either equals a whole state it
was once in, or an operation that reads a changed row fails with an
integrity error.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from . import audit, envelope, gate, state
from ._seams import crash_point
from .config import Config, load_config
from .engines import engine, file_engine, vault_exists
from .envelope import DecryptFailed, Kek, Place, Sealed
from .errors import (
    ConfigError,
    HardenedError,
    IntegrityError,
    LockedError,
    NotFoundError,
    StorageError,
    UsageError,
)
from .location import Location, default_actor, validate_actor
from .operation import Body, Meta, _Tx
from .operation import _Note as _Note  # re-exported: its old home
from .port import (
    BucketRow,
    HeadRow,
    KekRecord,
    Storage,
    VaultMissingError,
    VaultRecord,
    VersionRow,
)
from .rekeyjournal import recover_interrupted_rekey
from .rootkey import (
    KdfParams,
    RootKey,
    VaultKeys,
    create_key_file,
    derive_from_passphrase,
    read_key_file,
)

if TYPE_CHECKING:
    from .passphrase import PassphraseProvider
    from .sinks import Sinks

__all__ = ["Session"]

log = logging.getLogger("keyring_hardened")

Clock = Callable[[], float]

MIN_PASSPHRASE_CHARS = 8
_VAULT_ID_LEN = 16
#: Written by ``key rekey`` before it changes anything, removed when it is done.
REKEY_JOURNAL = "rekey.json"
#: Failed unlocks folded into the trail at one unlock, at most.
_PENDING_BATCH = 10_000
#: The reasons a failed unlock is recorded with; a pending row with any other is forged.
PENDING_REASONS = frozenset({
    None, "no-key-file", "key-file-unreadable", "key-file-damaged", "wrong-key",
    "wrong-passphrase", "no-passphrase", "vault-key-damaged",
})
_PENDING_OUTCOMES = ("locked", "integrity")
#: Ends the reason of an ``init`` event when a first ``set`` made the vault.
IMPLICIT_INIT = "; made by a first set"
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


def _label(service: str, username: str) -> str:
    # repr() keeps the message on one line whatever the names hold.
    return f"service {service!r}, user {username!r}"


def _transient(exc: HardenedError) -> bool:
    """A shared engine's failure worth running the operation again for (see _run_transient)."""
    return isinstance(exc, StorageError) and exc.reason == "transient"


def _tampered(what: str, reason: str) -> IntegrityError:
    return IntegrityError(f"{what} does not match the vault's authenticated state (tampered, "
                          "or written back from an older copy); restore the vault from a "
                          "backup", reason)


def _source(cfg: Config, passphrase: str | None,
            prompt: PassphraseProvider | None) -> PassphraseProvider:
    def get() -> str:
        if passphrase is not None:
            return passphrase
        from .passphrase import provider  # imported only when a passphrase is needed

        return provider(cfg, prompt)()

    return get


#: Failed unlocks that are guesses, and count in the unlock throttle. A missing
#: key file or passphrase is a setup problem, not a guess.
_GUESSES = frozenset({"wrong-key", "wrong-passphrase"})
#: An attempt older than this (seconds) was cut off (kill -9) and no longer counts as running.
_ATTEMPT_STALE = 120.0
#: How long an attempt waits for others running side by side (seconds, real time).
_BUSY_WAIT = 30.0


def _record_pending(storage: Storage, clock: Clock, actor: str,
                    exc: HardenedError) -> None:
    """Keep a failed unlock for the trail; it is chained at the next good unlock."""
    # The unlock failed anyway; a vault we cannot write (read-only media)
    # must still answer with the real reason, not a storage error.
    with contextlib.suppress(HardenedError):
        storage.add_pending(int(clock() * 1_000_000), actor, "unlock", exc.kind, exc.reason)


class _Attempt:
    """One unlock attempt as the throttle counts it; end it with exactly one outcome."""

    def __init__(self, storage: Storage, clock: Clock, attempt: int | None,
                 failures: int) -> None:
        self._storage, self._clock = storage, clock
        self._attempt, self._failures = attempt, failures

    def ended(self, exc: BaseException | None) -> None:
        """Count the outcome: a correct key resets, a wrong one adds one, else nothing."""
        if exc is None:
            outcome = "ok" if self._failures or self._attempt is not None else ""
        else:
            outcome = "guess" if isinstance(exc, LockedError) and exc.reason in _GUESSES \
                else "other"
        if outcome or self._attempt is not None:
            # A vault we cannot write must still answer with the real outcome.
            with contextlib.suppress(HardenedError):
                self._storage.end_unlock_attempt(self._attempt, outcome, self._clock())


def _throttle(storage: Storage, clock: Clock, claim: bool) -> _Attempt:
    """Refuse an unlock attempt while the failed-unlock backoff runs; else start one.

    ``claim`` (passphrase vaults): the attempt is recorded as running before
    the KDF runs, and running attempts count against the free ones, so
    guesses made side by side get no more than guesses made one by one; an
    attempt that finds the free ones taken by running attempts waits for
    them (up to 30 s), since they may well be correct. Past the free
    attempts, one attempt runs per wait. Key-file vaults (a key file cannot
    be guessed) count wrong keys after the fact, without a write when there
    are none. The common case (no failures, key file) reads one row.
    """
    from .access import FREE_FAILURES, throttle_check

    failures, _ = storage.unlock_throttle()
    if not claim and failures < FREE_FAILURES:
        return _Attempt(storage, clock, None, failures)
    deadline = time.monotonic() + _BUSY_WAIT
    while True:
        attempt: int | None = None
        running = 0
        with storage.transaction():
            failures, last_at = storage.unlock_throttle()
            now = clock()
            if last_at > now:
                # Dated in the future (a clock set back, or an edit): the wait
                # counts from now, so it ends, at most one full delay away.
                last_at = now
                storage.set_unlock_throttle(failures, now)
            allowed, wait = throttle_check(failures, last_at, now)
            if allowed and claim:
                running = storage.unlock_attempts(now - _ATTEMPT_STALE)
                if running < (FREE_FAILURES - failures if failures < FREE_FAILURES else 1):
                    attempt = storage.start_unlock_attempt(now)
                    if failures >= FREE_FAILURES:
                        storage.set_unlock_throttle(failures, now)  # the wait restarts
            elif allowed and failures >= FREE_FAILURES:
                storage.set_unlock_throttle(failures, now)
        if not allowed:
            raise LockedError(f"unlocking is paused after {failures} failed attempts in a "
                              f"row; try again in {math.ceil(wait)} s", "unlock-throttled")
        if not claim or attempt is not None:
            return _Attempt(storage, clock, attempt, failures)
        if time.monotonic() > deadline:
            raise LockedError(f"unlocking is busy: {running} attempts are running; try again",
                              "unlock-busy")
        time.sleep(0.05)


def _key_file_root(location: Location, vault: VaultRecord) -> RootKey:
    """The root key from the key file, or from the new key of a rekey in flight.

    Between a rekey's commit and the rename of its new key file into place,
    the vault already expects the new key: accept it from ``<key file>.new``,
    which only a rekey writes. Either file is used only if it matches the
    vault's verifier, so a planted ``.new`` file opens nothing.
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
            f"wrong key file: {location.key_file} does not open this vault (or the vault "
            "record was written back from before a rekey)", "wrong-key")
    if failure is None:  # pragma: no cover - the loop always sets it before falling out
        raise LockedError("no key file opens this vault", "wrong-key")
    raise failure


def _make_home(home: Path) -> None:
    """Create the vault folder (and missing parents) 0700 whatever the umask; refuse untrusted."""
    from .location import make_home

    make_home(home)


def _head_leaf(h: HeadRow) -> bytes:
    # The mac column (0.1's per-row MAC, empty since) is covered too: no
    # column of a head is left unauthenticated.
    # The refresher and refresh state (refresh.py) ride in the leaf's extra
    # field, absent (and the leaf as before) for a credential without one.
    return state.head_leaf(h.id, h.service, h.username, h.current_version, h.last_version,
                           h.created_at, h.updated_at, h.expires_at, h.versions_digest, h.mac,
                           h.refresh)


def _version_digest(row: VersionRow) -> bytes:
    return state.version_digest(row.version, row.kek_version, row.wrapped_key, row.ciphertext,
                                row.created_at, row.ttl, row.expires_at)


def _meta_digest(meta: Meta) -> bytes:
    v = meta.vault
    # The seal and the buckets ride in the vault leaf's extra field, absent
    # (and the digest as before) while there are none.
    access = state.access_digest(meta.seal, meta.buckets) if meta.seal is not None \
        or meta.buckets else None
    return state.meta_digest(
        state.vault_leaf(v.vault_id, v.created_at, v.kdf, v.verifier, v.vault_key,
                         v.generation, v.state_version, access),
        [state.kek_leaf(*k) for k in meta.keks], meta.past_keys, *meta.anchor)


def _check_keks(keks: list[KekRecord]) -> None:
    """Key states only move forward: versions 1..n, the newest active, retired ones empty."""
    ok = bool(keks) and all(k.version == i for i, k in enumerate(keks, start=1))
    for k in keks:
        active = k.state == "active"
        ok = ok and (active == (k is keks[-1])) and k.wrap_count >= 0 and (
            (k.wrapped is None) == (k.state == "retired"))
    if not ok:
        raise IntegrityError("the vault's key records are inconsistent (tampered?); restore "
                             "the vault from a backup", "kek-states")


class Session:
    """An unlocked vault. Open with :meth:`open` or :meth:`init`; close when done.

    A store is safe to share between threads, and survives ``fork``: a child
    process reconnects to the database on its first call.
    """

    def __init__(self, location: Location, config: Config, storage: Storage,
                 vault: VaultRecord, root: RootKey, vkeys: VaultKeys, clock: Clock,
                 actor: str) -> None:
        self.location = location
        self.config = config
        #: Per-thread overrides of ``actor`` and ``policy_actor`` (:meth:`acting`):
        #: the agent serves callers while its background refresh thread writes
        #: under the agent's own name, and neither may see the other's label.
        self._acting = threading.local()
        self.actor = actor
        #: Whom the policies and rate limits judge, when not ``actor`` itself: the
        #: agent sets it to the verified identity while the trail records both.
        self.policy_actor = None
        self._storage = storage
        self._vault = vault
        self._epoch = vault.generation
        self._kdf = KdfParams.from_json(vault.kdf)
        self._root = root
        self._vkeys = vkeys
        self._ident_key: bytearray | None = None
        self._keks: dict[int, Kek] = {}
        self._clock = clock
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._closed = False
        self._sinks = _sinks(config.audit_sinks)
        self._tx: _Tx | None = None
        #: The last event this session chained, exactly as written.
        self._wrote: audit.Event | None = None
        #: Events chained inside an operation (automatic rotation) to mirror after commit.
        self._pending_emit: list[audit.Event] = []
        #: Access decisions for this session's fixed config (gate._rules_for).
        self._access_cache: dict[Any, Any] = {}
        #: The vault-wide rows as of a state root, with the two nodes that tie
        #: them to it: what the last operation verified or wrote (see _meta).
        self._meta_seen: tuple[bytes, Meta, bytes, bytes] | None = None
        #: Things a person should hear about (an interrupted rekey resolved, a
        #: deletion that could not yet reach the disk). The CLI prints them.
        self.notices: list[str] = []

    @property
    def actor(self) -> str:
        """Whom the audit trail names: this thread's :meth:`acting` label, else the session's."""
        found: str | None = getattr(self._acting, "actor", None)
        return found if found is not None else self._actor

    @actor.setter
    def actor(self, value: str) -> None:
        self._actor = value

    @property
    def policy_actor(self) -> str | None:
        """Whom the policies judge when not ``actor`` (this thread's :meth:`acting` value first)."""
        if getattr(self._acting, "actor", None) is not None:
            found: str | None = self._acting.policy
            return found
        return self._policy_actor

    @policy_actor.setter
    def policy_actor(self, value: str | None) -> None:
        self._policy_actor = value

    @contextlib.contextmanager
    def acting(self, actor: str, policy_actor: str | None = None) -> Iterator[list[str]]:
        """Act as ``actor`` (judged as ``policy_actor``) in this thread only, for the block.

        A store shared by threads that act for different callers (the agent's
        connections and its background refresh) must not let one thread's
        label leak into another's audit event or policy decision, which
        swapping the shared attributes would. Yields the list that collects
        the block's notices (see :meth:`notice`).
        """
        acting = self._acting
        previous = (getattr(acting, "actor", None), getattr(acting, "policy", None),
                    getattr(acting, "notices", None))
        notices: list[str] = []
        acting.actor, acting.policy, acting.notices = actor, policy_actor, notices
        try:
            yield notices
        finally:
            acting.actor, acting.policy, acting.notices = previous

    @property
    def subject(self) -> str:
        """The actor the policies and rate limits judge (see ``policy_actor``)."""
        return self.policy_actor or self.actor

    @property
    def mode(self) -> str:
        """How the vault is unlocked: ``"key file"`` or ``"passphrase"``."""
        return "passphrase" if self._kdf.uses_passphrase else "key file"

    def __repr__(self) -> str:
        state_ = "closed" if self._closed else "open"
        return f"{type(self).__name__}(home={str(self.location.home)!r}, {state_})"

    def notice(self, message: str) -> None:
        """Tell the person running this (CLI: stderr; library: the logger).

        Inside :meth:`acting` the notice goes to that block's own list: one
        caller of the agent never reads another's.
        """
        mine: list[str] | None = getattr(self._acting, "notices", None)
        (mine if mine is not None else self.notices).append(message)
        log.warning("%s", message, extra={"notice": True})

    # -- opening ----------------------------------------------------------

    @classmethod
    def open(cls, home: str | os.PathLike[str] | None = None, *,
             passphrase: str | None = None, prompt: PassphraseProvider | None = None,
             config: Config | None = None, clock: Clock = time.time, actor: str | None = None,
             create: bool = False, upgrade: bool = False) -> Self:
        """Open and unlock the vault at ``home`` (or the configured default).

        A passphrase vault takes ``passphrase`` if given, else
        ``KEYRING_HARDENED_PASSPHRASE``, else ``passphrase_command``, else
        ``prompt()``; with none of them it raises :class:`LockedError`.
        With ``create=True`` a missing vault is created in key-file mode, as
        ``init`` would; otherwise a missing vault raises :class:`NotFoundError`.
        A vault made by keyring-hardened 0.1 opens only with ``upgrade=True``
        (see :meth:`upgrade`).
        """
        location = Location.resolve(home)
        location.check_home()  # as ssh's StrictModes, before trusting anything in it
        cfg = config if config is not None else load_config(location.config_file,
                                                            location.config_required)
        who = validate_actor(actor) if actor is not None else default_actor()
        try:
            storage = engine(cfg).open(location.database, cfg.synchronous, cfg.busy_timeout)
        except VaultMissingError:
            if not create:
                raise
            made = cls._create(location, cfg, KdfParams.keyfile(), None, clock, who,
                               implicit=True)
            if made is not None:
                return made
            # Another process created it first: use theirs.
            storage = engine(cfg).open(location.database, cfg.synchronous, cfg.busy_timeout)
        try:
            notice = None
            if location.home.joinpath(REKEY_JOURNAL).exists():
                notice = recover_interrupted_rekey(location, storage)
            vault = storage.vault()
            if vault.state_version == 0 and not upgrade:
                raise ConfigError(f"the vault at {location.home} was made by keyring-hardened 0.1 "
                                 "and its state is not authenticated yet; run: keyring-hardened "
                                 "upgrade (once)", "needs-upgrade")
            if vault.state_version not in (0, 1):
                raise _tampered("the vault record", "vault-record")
            attempt = _throttle(storage, clock, KdfParams.from_json(vault.kdf).uses_passphrase)
            try:
                root = cls._unlock(location, vault, _source(cfg, passphrase, prompt))
            except BaseException as exc:
                attempt.ended(exc)
                if isinstance(exc, LockedError):
                    _record_pending(storage, clock, who, exc)
                raise
            attempt.ended(None)  # a correct key ends the backoff
            store = cls._ready(location, cfg, storage, vault, root, clock, who)
            if notice:
                store.notices.append(notice)
            return store
        except BaseException:
            storage.close()
            raise

    @classmethod
    def _ready(cls, location: Location, cfg: Config, storage: Storage,
               vault: VaultRecord, root: RootKey, clock: Clock, actor: str) -> Self:
        """Finish unlocking: check the state, unwrap the KEKs, chain failed unlocks."""
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
        if vault.state_version == 0:
            return store  # only :meth:`upgrade` may run on it
        try:
            with storage.snapshot():
                tx = store._begin(storage)
                meta = store._meta(storage, tx)
                if meta.vault != vault:
                    # A rekey committed between our two reads: the key we hold is old.
                    raise LockedError("the vault was rekeyed while opening it; try again",
                                      "root-replaced")
                store._unwrap_keks(meta.keks)
                if cfg.audit_hmac_identifiers:
                    store._ident_key = store._identifier_key(meta)
        except IntegrityError as exc:
            with contextlib.suppress(HardenedError):
                store._record_failure("unlock", exc)
            store.close()
            raise
        except BaseException:
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
        try:
            exists = vault_exists(location, cfg)
        except OSError as exc:  # an unreadable home: name it, never a raw OSError
            raise StorageError(f"vault home {location.home} cannot be read: {exc.strerror}"
                               ) from None
        if exists:
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
                clock: Clock, actor: str, implicit: bool = False) -> Self | None:
        """Build a complete vault, its first KEK, its state root and its ``init`` event.

        ``implicit``: made by a first ``set`` (CLI or keyring), not by ``init``;
        the init event says so, and ``status`` shows it.
        """
        _make_home(location.home)
        if params.uses_passphrase:
            if passphrase is None:  # pragma: no cover - init checked it
                raise UsageError("a passphrase is needed")
            material = derive_from_passphrase(params, passphrase)
        else:
            create_key_file(location.key_file)
            material = read_key_file(location.key_file)
            crash_point("create-after-key-file")
        vault_id = os.urandom(_VAULT_ID_LEN)
        root = RootKey(material, vault_id)
        now = clock()
        kek = envelope.new_kek(1)
        try:
            wrapped_vault_key, vault_material = envelope.new_vault_key(root.wrap, vault_id)
            vkeys = VaultKeys(vault_material, vault_id)
            record = VaultRecord(vault_id, now, params.to_json(), root.verifier(vault_id),
                                 wrapped_vault_key, 1, 1)
            kek_record = KekRecord(1, "active", now,
                                   envelope.wrap_kek(root.wrap, vault_id, kek), 0)
            meta = _meta_digest(Meta(record, [kek_record], [], (0, audit.GENESIS)))
            event = audit.Event(1, int(now * 1_000_000), actor, "init", None, None, "ok", 1,
                                f"{params.algorithm}{IMPLICIT_INIT if implicit else ''}", b"",
                                1, state.root_of(meta, state.EMPTY_NODE))
            event = event._replace(mac=audit.chain_mac(vkeys.audit_key, audit.GENESIS, event))
            vkeys.close()
            if not engine(cfg).create(location.database, record, kek_record, event,
                                      {state.META_KEY: meta}):
                root.close()
                return None
        finally:
            kek.wipe()
        crash_point("create-after-link")
        storage = engine(cfg).open(location.database, cfg.synchronous, cfg.busy_timeout)
        try:
            store = cls._ready(location, cfg, storage, storage.vault(), root, clock, actor)
        except BaseException:
            storage.close()
            raise
        store._sinks.emit(event)
        return store

    @staticmethod
    def _unlock(location: Location, vault: VaultRecord,
                passphrase: PassphraseProvider) -> RootKey:
        """The root key: from the key file, or the KDF over the passphrase, checked by verifier.

        The stored KDF parameters are range-checked before the KDF runs, so an
        edited value is an integrity error, never a hang or a wrong-passphrase.
        """
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

    def _unwrap_keks(self, keks: list[KekRecord]) -> None:
        """Unwrap every KEK version not yet held (retired ones have no material).

        ``keks`` must come from :meth:`_meta`, checked against the state root,
        so a KEK blob written back under another version or state is refused
        before it is used; and a KEK wrapped under any root key but ours fails
        to unwrap (a rekey's old root key, say) and is reported as damage.
        """
        for record in keks:
            if record.version in self._keks or record.wrapped is None:
                continue
            try:
                self._keks[record.version] = envelope.unwrap_kek(
                    self._root.wrap, self._vault.vault_id, record.version, record.wrapped)
            except DecryptFailed:
                raise IntegrityError(f"key version {record.version} failed its integrity "
                                     "check; restore the vault from a backup",
                                     "kek-damaged") from None

    def _identifier_key(self, meta: Meta) -> bytearray:
        """The key that hashes names: the oldest epoch's, so hashes survive rekeys."""
        if not meta.past_keys:
            return bytearray(self._vkeys.identifier_key)
        epoch, blob = meta.past_keys[0]
        material = self._past_material(epoch, blob)
        oldest = VaultKeys(material, self._vault.vault_id)
        try:
            return bytearray(oldest.identifier_key)
        finally:
            oldest.close()

    def _past_material(self, epoch: int, blob: bytes) -> bytearray:
        try:
            return envelope.unwrap_past_vault_key(self._vkeys.past, self._vault.vault_id,
                                                  epoch, blob)
        except DecryptFailed:
            raise IntegrityError(f"the vault key of epoch {epoch} failed its integrity check",
                                 "past-key-damaged") from None

    def _audit_keys(self, meta: Meta) -> dict[int, bytearray]:
        """The audit key of every epoch this vault has had (to verify the whole trail)."""
        keys = {self._epoch: bytearray(self._vkeys.audit_key)}
        for epoch, blob in meta.past_keys:
            vk = VaultKeys(self._past_material(epoch, blob), self._vault.vault_id)
            keys[epoch] = bytearray(vk.audit_key)
            vk.close()
        return keys

    # -- the authenticated state ------------------------------------------

    def _begin(self, storage: Storage) -> _Tx:
        """Check the newest event, whose mac covers the state root; start a state check.

        The newest event cannot be forged without the audit key, so its root
        pins every row. Its predecessor's mac is all its check needs.
        """
        newest = storage.newest_events(2)
        if not newest:
            raise IntegrityError("the audit trail is empty although the vault exists "
                                 "(truncated?); restore the vault from a backup",
                                 "audit-empty")
        head = newest[0]
        if head.root is None or head.epoch is None:
            raise IntegrityError(f"audit event {head.seq} carries no state root (tampered?)",
                                 "audit-head")
        if head.epoch != self._epoch:
            if head.epoch > self._epoch:
                raise LockedError("the vault was rekeyed after this process unlocked it; "
                                  "open it again", "root-replaced")
            raise IntegrityError(f"audit event {head.seq} belongs to an earlier key epoch: the "
                                 "trail was cut back to before a rekey", "audit-head")
        if len(newest) == 2 and newest[1].seq == head.seq - 1:
            prev = newest[1].mac
        else:
            anchor_seq, anchor_mac = storage.audit_anchor()
            if anchor_seq != head.seq - 1:
                raise IntegrityError(f"audit event {head.seq - 1} is missing", "audit-head")
            prev = anchor_mac
        # The event this session wrote last, found unchanged (every field), is
        # known authentic without recomputing its mac.
        if head != self._wrote:
            expected = audit.chain_mac(self._vkeys.audit_key, prev, head)
            # Constant time, as for every MAC check: no timing oracle on how much matched.
            if not hmac.compare_digest(expected, head.mac):
                raise IntegrityError(f"audit event {head.seq} does not match its mac "
                                     "(tampered?)", "audit-head")
        return _Tx(head.root, (head.seq, head.mac))

    def _path_nodes(self, storage: Storage, tx: _Tx, buckets: list[int]) -> None:
        wanted = {key for b in buckets for key, _ in state.path_keys(b)} | {state.META_KEY,
                                                                            (0, 0)}
        missing = wanted - tx.nodes.keys()
        if missing:
            found = storage.nodes(missing)
            for key in missing:
                tx.nodes[key] = found.get(key, state.EMPTY_NODE if key[0] != 255
                                          else state.EMPTY)

    def _bucket(self, storage: Storage, tx: _Tx, bucket: int) -> list[HeadRow]:
        """The heads of one bucket, checked against the state root."""
        found = tx.buckets.get(bucket)
        if found is None:
            found = self._buckets(storage, tx, {bucket})[bucket]
        return found

    def _buckets(self, storage: Storage, tx: _Tx, buckets: set[int]
                 ) -> dict[int, list[HeadRow]]:
        """The heads of several buckets, each checked against the state root."""
        wanted = buckets - tx.buckets.keys()
        if wanted:
            if len(wanted) == 1:
                # The common case (one credential): its versions come in the same query.
                one = next(iter(wanted))
                heads, versions = storage.bucket_rows(one)
                found = {one: heads}
                tx.versions.update(versions)
            else:
                found = storage.heads_in_buckets(wanted)
            self._path_nodes(storage, tx, list(wanted))
            for bucket, heads in found.items():
                for h in heads:
                    if state.bucket_of(h.service) != bucket:
                        raise _tampered("the credential record of "
                                        f"{_label(h.service, h.username)}", "state-bucket")
                digest = state.bucket_digest([_head_leaf(h) for h in heads])
                if not state.verify_path(bucket, digest, tx.nodes, tx.nodes[state.META_KEY],
                                         tx.root):
                    raise _tampered("a credential record", "state-bucket")
                tx.buckets[bucket] = heads
        return {b: tx.buckets[b] for b in buckets}

    def _find(self, storage: Storage, service: str, username: str) -> HeadRow | None:
        """A credential's head, deleted or not, checked against the state root."""
        for h in self._bucket(storage, self._state(), state.bucket_of(service)):
            if h.service == service and h.username == username:
                return h
        return None

    def _versions(self, storage: Storage, head: HeadRow) -> list[VersionRow]:
        """A credential's kept versions, their list checked against the head's version digest.

        The list (which versions exist, and each one's digest) is checked
        here; each row's columns are checked against its digest by
        :meth:`_checked`, only for the rows actually used, so one damaged
        version leaves its siblings readable.
        """
        rows = self._state().versions.pop(head.id, None)
        return self._check_versions(head, rows if rows is not None else storage.versions(head.id))

    def _check_versions(self, head: HeadRow, rows: list[VersionRow]) -> list[VersionRow]:
        """``rows`` if they are exactly the versions (and digests) the head's digest names."""
        expected = head.versions_digest if head.versions_digest is not None \
            else state.versions_digest([])
        if state.versions_digest([(r.version, r.digest or b"") for r in rows]) != expected:
            raise _tampered(f"the versions of {_label(head.service, head.username)}",
                            "state-versions")
        return rows

    def _checked(self, head: HeadRow, row: VersionRow) -> VersionRow:
        """A version row whose columns (TTL, expiry, KEK version, ciphertext) match its digest."""
        if row.digest is None or not hmac.compare_digest(_version_digest(row), row.digest):
            raise _tampered(f"version {row.version} of {_label(head.service, head.username)}",
                            "state-version")
        return row

    def _meta(self, storage: Storage, tx: _Tx | None = None, *,
              fresh: bool = False) -> Meta:
        """The vault record, KEKs, past vault keys, audit anchor, seal and buckets, checked.

        ``fresh``: read and check the rows even if this session holds a copy
        for the current root (``audit verify`` must see the rows as they are).
        """
        tx = tx or self._state()
        if tx.meta is not None and not fresh:
            return tx.meta
        seen = self._meta_seen
        if seen is not None and seen[0] == tx.root and not fresh:
            # The root is unchanged since this session last verified (or wrote)
            # these rows: the copy it kept is what the root pins, so it is used
            # instead of reading the rows again. An edit of the rows since then
            # changes nothing this process decides; the next operation that
            # reads them after any change of the root checks them again.
            tx.nodes.setdefault(state.META_KEY, seen[2])
            tx.nodes.setdefault((0, 0), seen[3])
            tx.meta = seen[1]
            return seen[1]
        meta = Meta(*storage.meta_rows())
        self._path_nodes(storage, tx, [])
        digest = _meta_digest(meta)
        if digest != tx.nodes[state.META_KEY] or state.root_of(digest, tx.nodes[(0, 0)]) \
                != tx.root:
            raise _tampered("a vault-wide record (vault, keys, seal or rate limits)",
                            "state-meta")
        _check_keks(meta.keks)
        if meta.vault.vault_id != self._vault.vault_id or meta.vault.generation != self._epoch:
            raise _tampered("the vault record", "state-meta")
        tx.meta = meta
        return meta

    def _state(self) -> _Tx:
        if self._tx is None:  # pragma: no cover - only reachable through a bug
            raise RuntimeError("state checks need an operation in progress")
        return self._tx

    def _touch(self, service: str) -> None:
        """Mark a credential's bucket as changed; it must have been read (checked) first."""
        tx = self._state()
        bucket = state.bucket_of(service)
        if bucket not in tx.buckets:  # pragma: no cover - only reachable through a bug
            raise RuntimeError("a bucket was changed before it was checked")
        tx.touched.add(bucket)

    def _touch_meta(self) -> None:
        """Mark the vault-wide rows as changed; they must have been read (checked) first."""
        tx = self._state()
        if tx.meta is None:  # pragma: no cover - only reachable through a bug
            raise RuntimeError("the vault-wide rows were changed before they were checked")
        tx.meta_dirty = True
        tx.meta_exact = False  # read them again when the root is computed

    def _count_wrap(self, storage: Storage, kek_version: int, n: int = 1) -> None:
        """Count wraps under a KEK, in the rows and in the checked copy alike.

        The common write changes nothing else of the vault-wide rows, so the
        new root is computed from the copy, without reading them again.
        """
        storage.count_wrap(kek_version, n)
        tx = self._state()
        meta = self._meta(storage, tx)
        exact = tx.meta_exact or not tx.meta_dirty
        tx.meta = meta._replace(keks=[k._replace(wrap_count=k.wrap_count + n)
                                      if k.version == kek_version else k for k in meta.keks])
        tx.meta_dirty = True
        tx.meta_exact = exact

    def _set_meta_buckets(self, tx: _Tx, meta: Meta, rows: list[BucketRow]) -> None:
        """The rate-limit buckets as just written, in the checked copy (as :meth:`_count_wrap`)."""
        self._change_meta(tx, meta._replace(buckets=sorted(rows)))

    def _set_meta_seal(self, tx: _Tx, meta: Meta, seal: tuple[float, str] | None) -> None:
        """The seal as just written, in the checked copy."""
        self._change_meta(tx, meta._replace(seal=seal))

    def _change_meta(self, tx: _Tx, meta: Meta) -> None:
        # The copy stays exact (usable for the new root without re-reading the
        # rows) if it was exact before this change.
        exact = tx.meta_exact or not tx.meta_dirty
        tx.meta = meta
        tx.meta_dirty = True
        tx.meta_exact = exact

    def _prove(self, passphrase: str | None, prompt: PassphraseProvider | None,
               key_file: Path | None) -> None:
        """Prove the root key again (for ``unseal``): the key file, or the passphrase.

        Raises :class:`LockedError` (``wrong-key``, ``wrong-passphrase``)
        when the proof does not open this vault; never keeps the key.
        """
        vault = self._vault
        if self._kdf.uses_passphrase:
            if key_file is not None:
                raise UsageError("--key-file: this vault opens with a passphrase, not a key file")
            secret = _source(self.config, passphrase, prompt)()
            root = RootKey(derive_from_passphrase(self._kdf, secret), vault.vault_id)
            failure = LockedError("wrong passphrase", "wrong-passphrase")
        elif key_file is None:
            _key_file_root(self.location, vault).close()
            return
        else:
            root = RootKey(read_key_file(key_file), vault.vault_id)
            failure = LockedError(f"wrong key file: {key_file} does not open this vault",
                                  "wrong-key")
        try:
            if not root.matches(vault.vault_id, vault.verifier):
                raise failure
        finally:
            root.close()

    def _commit_state(self, storage: Storage) -> bytes:
        """Recompute the root after this operation's changes, and store the changed nodes."""
        tx = self._state()
        if not tx.touched and not tx.meta_dirty:
            return tx.root
        changed: dict[state.NodeKey, bytes] = {}
        if tx.touched:  # a rate-limited read changes only the vault-wide rows
            digests = {}
            for bucket, heads in storage.heads_in_buckets(tx.touched).items():
                digests[bucket] = state.bucket_digest([_head_leaf(h) for h in heads])
                tx.buckets[bucket] = heads
            changed.update(state.update_paths(digests, tx.nodes))
        meta_digest = tx.nodes[state.META_KEY]
        if tx.meta_dirty:
            meta = tx.meta if tx.meta is not None and tx.meta_exact else Meta(
                *storage.meta_rows())
            meta_digest = _meta_digest(meta)
            changed[state.META_KEY] = meta_digest
            tx.meta = meta
        storage.put_nodes(changed)
        tx.nodes.update(changed)
        tx.touched.clear()
        tx.meta_dirty = False
        tx.meta_exact = True
        tx.root = state.root_of(meta_digest, tx.nodes[(0, 0)])
        return tx.root

    def _full_check(self, storage: Storage, versions: bool = True) -> int:
        """Check every row of the vault against the root; returns the credential count.

        Used by ``audit verify`` (and, without the version rows, by ``list``):
        it reads everything, so it costs time in proportion to the vault's size.
        """
        tx = self._state()
        meta = self._meta(storage, tx, fresh=True)
        buckets: dict[int, list[bytes]] = {}
        heads: dict[int, HeadRow] = {}
        for stored_bucket, h in storage.all_heads():
            bucket = state.bucket_of(h.service)
            if stored_bucket != bucket:
                raise _tampered(f"the credential record of {_label(h.service, h.username)}",
                                "state-bucket")
            buckets.setdefault(bucket, []).append(_head_leaf(h))
            heads[h.id] = h
        pairs: dict[int, list[tuple[int, bytes]]] = {}
        for head_id, row in storage.all_versions() if versions else ():
            if head_id not in heads or row.digest is None or not hmac.compare_digest(
                    _version_digest(row), row.digest):
                raise _tampered(f"a stored version (credential {head_id}, version "
                                f"{row.version})", "state-version")
            pairs.setdefault(head_id, []).append((row.version, row.digest))
        for head_id, h in heads.items() if versions else ():
            expected = h.versions_digest if h.versions_digest is not None \
                else state.versions_digest([])
            if state.versions_digest(pairs.get(head_id, [])) != expected:
                raise _tampered(f"the versions of {_label(h.service, h.username)}",
                                "state-versions")
        digests = {b: state.bucket_digest(leaves) for b, leaves in buckets.items()}
        if state.full_root(_meta_digest(meta), digests) != tx.root:
            raise _tampered("a credential record", "state-root")
        for bucket in digests:
            tx.buckets.pop(bucket, None)
        return len(heads)

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[Storage]:
        with self._lock:
            if self._closed:
                raise UsageError("the store is closed")
            if os.getpid() != self._pid:
                # After fork the inherited connection belongs to the parent:
                # leave it untouched and open our own.
                self._storage = engine(self.config).open(self.location.database,
                                                         self.config.synchronous,
                                                         self.config.busy_timeout)
                self._pid = os.getpid()
            yield self._storage

    def _ident(self, name: str | None) -> str | None:
        """A name as the audit trail stores it: itself, or its keyed hash."""
        if name is None or not self.config.audit_hmac_identifiers:
            return name
        key = self._ident_key if self._ident_key is not None else self._vkeys.identifier_key
        return audit.hash_identifier(key, name)

    def _append(self, storage: Storage, op: str, service: str | None,
                username: str | None, failure: HardenedError | None,
                key_version: int | None, reason: str | None = None, *,
                keys: VaultKeys | None = None, epoch: int | None = None) -> audit.Event:
        """Chain one event onto the trail, with the current state root, in the caller's txn.

        ``keys`` and ``epoch`` are given only by a rekey, whose event is the
        first of the new epoch: chained onto the old trail, MACed under the
        new audit key, so the old root key cannot append after it.
        """
        tx = self._state()
        root = tx.root if failure is not None else self._commit_state(storage)
        seq, prev = tx.last
        event = audit.Event(seq + 1, int(self._clock() * 1_000_000), self.actor, op,
                            self._ident(service), self._ident(username),
                            failure.kind if failure else "ok", key_version,
                            (failure.reason if failure else None) or reason, b"",
                            epoch if epoch is not None else self._epoch, root)
        event = event._replace(mac=audit.chain_mac((keys or self._vkeys).audit_key, prev, event))
        storage.append_event(event)
        tx.last = (event.seq, event.mac)
        self._wrote = event
        return event

    def _run(self, op: str, service: str | None, username: str | None,
             body: Body[T], *, writes: bool = False,
             finish: Body[audit.Event] | None = None, admitted: bool = False) -> T:
        """Run an operation (see :meth:`_run_once`), retrying once after a rekey elsewhere.

        After another process's rekey, key-file mode unlocks again with the
        new key file (see :meth:`_reunlock`); passphrase mode fails (exit 6).
        """
        try:
            return self._run_transient(op, service, username, body, writes=writes,
                                       finish=finish, admitted=admitted)
        except LockedError as exc:
            if exc.reason != "root-replaced" or not self._reunlock():
                raise
        return self._run_transient(op, service, username, body, writes=writes, finish=finish,
                                   admitted=admitted)

    def _run_transient(self, op: str, service: str | None, username: str | None,
                       body: Body[T], *, writes: bool = False,
                       finish: Body[audit.Event] | None = None, admitted: bool = False) -> T:
        """Run :meth:`_run_once`, again after a transient engine failure, within the busy timeout.

        A shared engine (PostgreSQL) reports a serialization failure, a
        deadlock report or a dropped connection as ``transient``: the
        transaction was rolled back, so running the whole operation again
        (body, checks and event) is safe. A failure that persists past the
        busy timeout is raised (exit 8, naming the host). SQLite never
        reports one.
        """
        deadline = time.monotonic() + self.config.busy_timeout
        delay = 0.02
        while True:
            try:
                return self._run_once(op, service, username, body, writes=writes,
                                      finish=finish, admitted=admitted)
            except StorageError as exc:
                if exc.reason != "transient" or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _reunlock(self) -> bool:
        """Take the new keys after another process's rekey; False in passphrase mode.

        A rekey revokes the old root key for everyone, this process included:
        in key-file mode the new key file is read again, and checked like at
        any unlock; a passphrase cannot be asked again here.
        """
        if self._kdf.uses_passphrase:
            return False
        with self._guard() as storage:
            vault = storage.vault()
            root = _key_file_root(self.location, vault)
            try:
                material = envelope.unwrap_vault_key(root.wrap, vault.vault_id, vault.vault_key)
            except DecryptFailed:
                root.close()
                raise IntegrityError("the vault key failed its integrity check; restore the "
                                     "vault from a backup", "vault-key-damaged") from None
            self._root.close()
            self._vkeys.close()
            self._root, self._vkeys = root, VaultKeys(material, vault.vault_id)
            self._vault, self._epoch = vault, vault.generation
            self._kdf = KdfParams.from_json(vault.kdf)
            with storage.snapshot():
                self._tx = self._begin(storage)
                try:
                    self._unwrap_keks(self._meta(storage).keks)
                finally:
                    self._tx = None
        return True

    def _run_once(self, op: str, service: str | None, username: str | None,
                  body: Body[T], *, writes: bool = False,
                  finish: Body[audit.Event] | None = None, admitted: bool = False) -> T:
        """Run ``body`` and append its audit event in one write transaction.

        The newest event is checked first, and everything the body reads is
        checked against the state root it carries. A failure of the body is
        audited too (its changes undone first, the event kept) and then
        raised. If the event cannot be written, nothing the body did is kept
        and nothing is returned: fail closed. ``finish`` replaces the usual
        event (a rekey chains its own). ``admitted``: the second step of an
        operation whose first step drew its rate-limit tokens (a refresh's
        write after its start): seal and policy are checked again, no token
        is drawn.
        """
        note = _Note()
        failure: HardenedError | None = None
        with self._guard() as storage:
            self._pending_emit.clear()
            known = set(self._keks)
            try:
                with storage.transaction():
                    tx = self._tx = self._begin(storage)
                    try:
                        # Seal, policy and rate limits, in this transaction: the
                        # buckets commit with the event, granted or not.
                        gate.admit(self, storage, tx, op, service, limited=not admitted)
                    except HardenedError as exc:
                        if _transient(exc):
                            raise  # rolled back; _run_transient runs it all again
                        failure = exc
                    if failure is None and writes:
                        storage.savepoint()
                    try:
                        if failure is None:
                            result = body(storage, note)
                    except HardenedError as exc:
                        if _transient(exc):
                            raise  # the transaction is gone: nothing to audit in it
                        if writes:
                            storage.rollback_savepoint()
                        tx.forget()
                        self._forget_keks_except(known)
                        failure = exc
                    else:
                        if writes and failure is None:
                            storage.release_savepoint()
                    try:
                        if finish is not None and failure is None:
                            event = finish(storage, note)
                        else:
                            event = self._append(storage, op, service, username, failure,
                                                 note.key_version, note.reason)
                    except HardenedError as exc:
                        if _transient(exc):
                            raise
                        raise StorageError(f"the audit trail could not be written ({exc}); "
                                           f"the {op} was not performed",
                                           "audit-write") from None
                # Committed: keep the vault-wide rows this root pins, if known exactly.
                if tx.meta is not None and tx.meta_exact and not tx.meta_dirty:
                    self._meta_seen = (tx.root, tx.meta, tx.nodes[state.META_KEY],
                                       tx.nodes[(0, 0)])
            except BaseException as exc:
                self._forget_keks_except(known)
                if isinstance(exc, HardenedError) and failure is not None \
                        and exc.reason != "audit-write":
                    raise failure from None  # the transaction itself failed: report the cause
                raise
            finally:
                self._tx = None
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
            self._tx = self._begin(storage)
            try:
                event = self._append(storage, op, None, None, exc, None)
            finally:
                self._tx = None
        self._sinks.emit(event)

    def _fold_pending(self) -> None:
        """Chain the failed unlocks recorded while nobody held the key.

        Nothing authenticates a pending row, so each is parsed strictly: only
        a failed unlock with a known outcome and reason is chained, with its
        time clamped to no earlier than the newest event (a backdated row
        could otherwise reach ``audit prune``). Any other row is forged: the
        forgery is chained as an integrity event, and this open fails.
        """
        forged = 0
        emitted = []
        with self._guard() as storage, storage.transaction():
            tx = self._tx = self._begin(storage)
            try:
                head = storage.event(tx.last[0])
                floor = head.ts_us if head is not None else 0
                ceiling = int(self._clock() * 1_000_000)
                for ts_us, actor, op, outcome, reason in storage.take_pending(_PENDING_BATCH):
                    if not (isinstance(ts_us, int) and not isinstance(ts_us, bool)
                            and isinstance(actor, str) and op == "unlock"
                            and outcome in _PENDING_OUTCOMES and reason in PENDING_REASONS
                            and _valid_actor(actor)):
                        forged += 1
                        continue
                    seq, prev = tx.last
                    event = audit.Event(seq + 1, min(max(ts_us, floor), max(ceiling, floor)),
                                        actor, "unlock", None, None, outcome, None,
                                        f"{reason or outcome}; recorded before unlock", b"",
                                        self._epoch, tx.root)
                    event = event._replace(mac=audit.chain_mac(self._vkeys.audit_key, prev,
                                                               event))
                    storage.append_event(event)
                    tx.last = (event.seq, event.mac)
                    emitted.append(event)
                    floor = event.ts_us
                if forged:
                    emitted.append(self._append(
                        storage, "unlock", None, None,
                        IntegrityError("forged", f"forged-pending-{forged}"), None))
            finally:
                self._tx = None
        for event in emitted:
            self._sinks.emit(event)
        if forged:
            self.close()
            raise IntegrityError(f"the vault's table of failed unlocks held {forged} rows that "
                                 "are not failed unlocks (tampered?); they were removed and the "
                                 "finding recorded in the audit trail", "forged-pending")

    def _head_mac(self, service: str, username: str, current: int | None, last: int,
                  expires_at: float | None = None) -> bytes:
        """The 0.1 head MAC, checked once when such a vault is upgraded."""
        data = b"".join(struct.pack(">I", len(p)) + p for p in (
            self._vault.vault_id, service.encode(), username.encode()))
        data += struct.pack(">QQ", current or 0, last)
        if expires_at is not None:
            data += b"\x01" + struct.pack(">d", expires_at)
        return self._vkeys.record_mac(data)

    def _kek(self, version: int) -> Kek:
        """An unwrapped KEK version; loads (and checks) KEKs another process added."""
        if version not in self._keks:
            with self._guard() as storage:
                self._unwrap_keks(self._meta(storage).keks)
        kek = self._keks.get(version)
        if kek is None:
            raise IntegrityError(f"key version {version} is not available", "kek-unavailable")
        return kek

    def _decrypt(self, head: HeadRow, row: VersionRow) -> str:
        """Decrypt a version whose rows were checked; one opaque error for any failure."""
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

    def _rotate_in(self, storage: Storage, now: float, reason: str,
                   record: bool = True, root: RootKey | None = None) -> int:
        """Add a KEK version and make it active, inside the caller's transaction.

        With ``record``, audited as its own ``key-rotate`` event, before the
        event of the operation that caused it. ``root`` wraps the new KEK
        (a rekey passes its new root key).
        """
        meta = self._meta(storage)
        active = meta.active
        version = active.version + 1
        kek = envelope.new_kek(version)
        storage.add_kek(KekRecord(version, "active", now, envelope.wrap_kek(
            (root or self._root).wrap, self._vault.vault_id, kek), 0))
        storage.set_kek_state(active.version, "decrypt-only")
        self._touch_meta()
        self._keks[version] = kek
        if record:
            event = self._append(storage, "key-rotate", None, None, None, version, reason)
            self._pending_emit.append(event)
        return version

    def _write_version(self, storage: Storage, head: HeadRow, data: bytes,
                       now: float, note: _Note, ttl: float | None = None) -> int:
        """Seal ``data`` as the next version of a checked head, under the active KEK.

        Rotates first when the active KEK is due; keeps ``max_versions``;
        moves the head and its version digest. The caller checked ``head``.
        """
        kept = self._versions_checked(storage, head)
        meta = self._meta(storage)
        active = meta.active
        due = self._rotation_due(active, now)
        kek = self._kek(self._rotate_in(storage, now, f"auto-{due}") if due else active.version)
        version = head.last_version + 1
        place = Place(self._vault.vault_id, head.service, head.username, version)
        # Fresh random nonces and a fresh data key on every seal (see envelope).
        sealed = envelope.seal_secret(kek, place, data)
        expires = now + ttl if ttl is not None else None
        row = VersionRow(version, kek.version, sealed.wrapped_key, sealed.ciphertext, now, ttl,
                         expires)
        row = row._replace(digest=_version_digest(row))
        storage.add_version(head.id, row)
        self._count_wrap(storage, kek.version)
        kept = [*kept, (version, row.digest or b"")]
        if version > self.config.max_versions:
            storage.prune(head.id, self.config.max_versions)
            kept = kept[-self.config.max_versions:]
        storage.update_head(head.id, version, version, now, expires, state.versions_digest(kept))
        self._touch(head.service)
        note.key_version = kek.version
        return version

    def _versions_checked(self, storage: Storage, head: HeadRow) -> list[tuple[int, bytes]]:
        """Check a head's version list before a change builds on it; its (version, digest)s."""
        if head.versions_digest is None and not head.last_version:
            return []
        return [(r.version, r.digest or b"") for r in self._versions(storage, head)]

    def _move_head(self, storage: Storage, head: HeadRow, current: int | None,
                   last: int, now: float, expires: float | None) -> None:
        """Update a checked head, recomputing its version digest from the kept versions."""
        pairs = [(r.version, r.digest or b"") for r in storage.versions(head.id)]
        storage.update_head(head.id, current, last, now, expires,
                            state.versions_digest(pairs))
        self._touch(head.service)

    def _existing(self, storage: Storage, service: str, username: str) -> HeadRow:
        head = self._find(storage, service, username)
        if head is None:
            raise NotFoundError(f"no credential for {_label(service, username)}", "no-credential")
        return head

    def upgrade(self) -> str:
        """Authenticate the state of a vault made by keyring-hardened 0.1, once.

        0.1 MACed each head row on its own; this checks every such MAC and the
        whole 0.1 trail, builds the state tree over the rows as they are, and
        moves the vault to a new vault key (a new epoch). The move matters:
        code of this version never opens a vault as 0.1 again, and a 0.1
        vault record written back later no longer matches the trail. What 0.1
        left unauthenticated (a version's TTL, say) is taken as found, which
        is why this is a deliberate command and not automatic.
        """
        access = self.config.access
        if access is not None:
            # An admin command; a 0.1 vault has no buckets or seal to consult yet.
            found = gate.decision(access, self.subject, "admin", None)
            if not found.allowed:
                raise gate.denied(self.subject, "admin", None, found)
        with self._guard() as storage, storage.transaction():
            vault = storage.vault()
            if vault.state_version != 0:
                raise UsageError(f"the vault at {self.location.home} is already upgraded")
            g, vault_id = vault.generation, vault.vault_id
            anchor_seq, anchor_mac = storage.audit_anchor()
            events = list(storage.events(after=anchor_seq))
            result = audit.verify({g: self._vkeys.audit_key}, events, anchor_seq, anchor_mac,
                                  legacy_epoch=g)
            if not result.ok or any(e.epoch is not None for e in events):
                raise IntegrityError(f"the 0.1 audit trail does not verify ({result.problem}); "
                                     "nothing was changed", "upgrade-trail")
            heads = [h for _, h in storage.all_heads()]
            for h in heads:
                expected = self._head_mac(h.service, h.username, h.current_version,
                                          h.last_version, h.expires_at)
                if not hmac.compare_digest(expected, h.mac):
                    raise IntegrityError(f"{_label(h.service, h.username)}: its 0.1 record "
                                         "fails its check; nothing was changed", "head-mac")
            pairs: dict[int, list[tuple[int, bytes]]] = {}
            version_updates = []
            for head_id, row in storage.all_versions():
                digest = _version_digest(row)
                pairs.setdefault(head_id, []).append((row.version, digest))
                version_updates.append((digest, head_id, row.version))
            storage.fill_state_columns(
                [(state.bucket_of(h.service), state.versions_digest(pairs.get(h.id, [])), h.id)
                 for h in heads], version_updates)
            old_key = envelope.unwrap_vault_key(self._root.wrap, vault_id, vault.vault_key)
            new_blob, new_material = envelope.new_vault_key(self._root.wrap, vault_id)
            new_keys = VaultKeys(new_material, vault_id)
            storage.set_past_keys([(g, envelope.wrap_past_vault_key(new_keys.past, vault_id, g,
                                                                    old_key))])
            envelope.wipe(old_key)
            storage.set_root(vault.kdf, vault.verifier, new_blob, g + 1, state_version=1)
            buckets: dict[int, list[bytes]] = {}
            for _, h in storage.all_heads():
                buckets.setdefault(state.bucket_of(h.service), []).append(_head_leaf(h))
            nodes: dict[state.NodeKey, bytes] = dict(state.update_paths(
                {b: state.bucket_digest(leaves) for b, leaves in buckets.items()}, {}))
            meta = _meta_digest(Meta(*storage.meta_rows()))
            storage.clear_nodes()
            storage.put_nodes({**nodes, state.META_KEY: meta})
            event = audit.Event(result.head_seq + 1, int(self._clock() * 1_000_000), self.actor,
                                "upgrade", None, None, "ok", None, f"from-0.1-{len(heads)}",
                                b"", g + 1, state.root_of(meta, nodes.get((0, 0),
                                                                         state.EMPTY_NODE)))
            event = event._replace(mac=audit.chain_mac(new_keys.audit_key, result.head_mac,
                                                       event))
            storage.append_event(event)
        self._sinks.emit(event)
        self._adopt(self._root, new_keys, self._kdf)
        with self._guard() as storage, storage.snapshot():
            self._tx = self._begin(storage)
            try:
                meta_rows = self._meta(storage)
                self._unwrap_keks(meta_rows.keks)
                if self.config.audit_hmac_identifiers:
                    self._ident_key = self._identifier_key(meta_rows)
            finally:
                self._tx = None
        return (f"upgraded: the state of {len(heads)} credentials is now authenticated "
                f"as a whole (key epoch {g + 1})")

    def _adopt(self, root: RootKey, vkeys: VaultKeys, params: KdfParams) -> None:
        """Take the keys of a rekey this session committed (the old ones are wiped)."""
        with self._guard() as storage:
            if self._ident_key is None and self.config.audit_hmac_identifiers:
                self._ident_key = bytearray(self._vkeys.identifier_key)
            if root is not self._root:
                self._root.close()
            self._vkeys.close()
            self._root, self._vkeys, self._kdf = root, vkeys, params
            self._vault = storage.vault()
            self._epoch = self._vault.generation

    def _checkpoint(self, what: str) -> None:
        """Make deleted rows leave the disk: fold and truncate the WAL, retrying briefly.

        ``secure_delete`` zeroes freed pages in the database file, but the
        WAL keeps the old page images until a checkpoint copies the newer
        pages over them and truncates it, which a connection still reading an
        older snapshot prevents. The operation stands either way; the user is
        told what remains on disk.
        """
        with self._guard() as storage:
            erases = storage.erases
        for delay in (0.0, 0.05, 0.1, 0.2, 0.4) if erases else ():  # about a second in all
            time.sleep(delay)
            with self._guard() as storage:
                if storage.checkpoint():
                    return
        with self._guard() as storage:
            self.notice(storage.residue(what))

    def close(self) -> None:
        """Wipe key material (best effort) and close the database."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for kek in self._keks.values():
                kek.wipe()
            self._keks.clear()
            if not self._borrowed_root:  # a copy's borrowed root key stays with its owner
                self._root.close()
            self._vkeys.close()
            if self._ident_key is not None:
                for i in range(len(self._ident_key)):
                    self._ident_key[i] = 0
            if os.getpid() == self._pid:
                self._storage.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- private copies: backup and restore (issue 14) ----------------------

    #: True for a copy opened with the root key of the session that checks it
    #: (a backup): closing the copy must not wipe a key it does not own.
    _borrowed_root = False

    @classmethod
    def _open_copy(cls, location: Location, config: Config, database: Path, *,
                   root: RootKey | None = None, passphrase: str | None = None,
                   prompt: PassphraseProvider | None = None, clock: Clock = time.time,
                   actor: str | None = None, storage: Storage | None = None) -> Self:
        """Open a private copy of a vault (a backup) and check its newest event and keys.

        Nothing is written to the copy here: no failed unlock is chained and
        no failure recorded, so a checked copy stays byte for byte what it
        was. ``root`` (the checking session's own key, borrowed, never
        wiped here) or else the vault's usual sources (``location``'s key
        file, or the passphrase) must open it: a copy is useless without
        the root key, and a copy that another key opens is not this vault's.
        ``storage``: the copy already opened (migrate-storage's target, in
        any engine); closed with the returned session.
        """
        who = validate_actor(actor) if actor is not None else default_actor()
        if storage is None:
            storage = file_engine().open_copy(database, config.synchronous, config.busy_timeout)
        try:
            vault = storage.vault()
            if vault.state_version != 1:
                raise UsageError(f"the vault copy {database} was made by keyring-hardened 0.1 "
                                 "(or is damaged); it cannot be checked as a whole",
                                 "copy-legacy")
            borrowed = root is not None
            if root is None:
                root = cls._unlock(location, vault, _source(config, passphrase, prompt))
            elif not root.matches(vault.vault_id, vault.verifier):
                raise LockedError("the copy does not open with this vault's root key (rekeyed "
                                  "while it was taken?); run it again", "copy-root")
            try:
                material = envelope.unwrap_vault_key(root.wrap, vault.vault_id, vault.vault_key)
            except DecryptFailed:
                if not borrowed:
                    root.close()
                raise IntegrityError(f"the vault key of the copy {database} failed its "
                                     "integrity check", "vault-key-damaged") from None
            store = cls(location, config, storage, vault, root,
                        VaultKeys(material, vault.vault_id), clock, who)
            store._borrowed_root = borrowed
        except BaseException:
            storage.close()
            raise
        try:
            with storage.snapshot():
                store._tx = store._begin(storage)
                try:
                    meta = store._meta(storage)
                    if meta.vault != vault:
                        raise _tampered("the copy's vault record", "state-meta")
                    store._unwrap_keks(meta.keks)
                finally:
                    store._tx = None
        except BaseException:
            store.close()
            raise
        return store

    def _holds_event(self, seq: int, mac: bytes) -> bool:
        """Whether this vault's trail holds event ``seq`` with ``mac`` (or it is the anchor)."""
        with self._guard() as storage, storage.snapshot():
            if storage.audit_anchor() == (seq, mac):
                return True
            found = storage.event(seq)
        return found is not None and hmac.compare_digest(found.mac, mac)

    def _record_restore(self, reason: str, live_key_version: int) -> None:
        """Chain the ``restore`` event onto this copy (before it replaces the vault).

        Key versions only move forward: when the replaced vault had newer
        KEK versions than the copy, those numbers are recorded as retired
        and the new active KEK takes the next number. A process that held
        the replaced vault open, with those KEKs cached by number, can then
        never seal a new secret under a key this vault does not hold.
        """
        def body(storage: Storage, note: _Note) -> None:
            note.reason = reason
            meta = self._meta(storage)
            top = meta.active.version
            if live_key_version <= top:
                return
            now = self._clock()
            for version in range(top + 1, live_key_version + 1):
                storage.add_kek(KekRecord(version, "retired", now, None, 0))
            kek = envelope.new_kek(live_key_version + 1)
            try:
                storage.add_kek(KekRecord(live_key_version + 1, "active", now, envelope.wrap_kek(
                    self._root.wrap, self._vault.vault_id, kek), 0))
            finally:
                kek.wipe()
            storage.set_kek_state(top, "decrypt-only")
            self._touch_meta()
            note.key_version = live_key_version + 1

        self._run("restore", None, None, body, writes=True)


def _valid_actor(actor: str) -> bool:
    try:
        validate_actor(actor)
    except UsageError:
        return False
    return True
