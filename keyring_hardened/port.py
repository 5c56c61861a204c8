"""The storage port: what the core asks of a storage engine, in the core's words.

The core (session, store, key management, audit trail, access gate, refresh,
backup) types against :class:`Storage` and the row values below, never
against an engine. :mod:`keyring_hardened.storage` (SQLite, over
:mod:`keyring_hardened.schema`) is the one implementation today; an engine
is opened through :class:`Engine`, which :mod:`keyring_hardened.engines`
picks. See ``docs/architecture.md`` for the picture.

What an engine owes the core, beyond these signatures:

* **Transactions.** :meth:`Storage.transaction` is a write transaction that
  takes the write lock *before* its first read (SQLite: ``BEGIN
  IMMEDIATE``), commits on success and rolls back on any exception; the
  core relies on it to commit a credential change and its audit event
  together or not at all. :meth:`Storage.snapshot` is a read transaction in
  which every read sees one consistent state.
* **Honest rows.** Every row comes back with the Python types declared
  here, or the read raises :class:`~keyring_hardened.errors.IntegrityError`
  (a tampered store may hold anything); the core then checks each row
  against the vault's authenticated state root.
* **Errors the caller can act on.** Engine failures surface as
  :class:`~keyring_hardened.errors.StorageError` (busy, read-only, full,
  unreachable: exit 8, naming the path or host), never as a driver's own
  exception.
* **Nothing secret is interpreted.** The engine stores opaque bytes
  (wrapped keys, ciphertexts, macs); it never sees a key or a secret in the
  clear, and needs none to do its work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from .audit import Event
from .errors import NotFoundError

__all__ = [
    "BucketRow",
    "Engine",
    "HeadRow",
    "KekRecord",
    "Storage",
    "VaultMissingError",
    "VaultRecord",
    "VersionRow",
]


class VaultMissingError(NotFoundError):
    """No vault database exists at the location."""


class VaultRecord(NamedTuple):
    """The vault's identity and how its root key is obtained."""

    vault_id: bytes
    created_at: float
    kdf: str
    verifier: bytes
    vault_key: bytes
    generation: int
    #: 1 once the state is authenticated; 0 for a vault made by 0.1 (needs upgrade).
    state_version: int = 1


class BucketRow(NamedTuple):
    """A stored token bucket: ``tokens`` left at time ``updated``."""

    rule: str
    actor: str
    tokens: float
    updated: float


class KekRecord(NamedTuple):
    """A stored KEK version (wrapped under the root key)."""

    version: int
    state: str
    created_at: float
    wrapped: bytes | None
    wrap_count: int


class HeadRow(NamedTuple):
    """A credential's head: its name, current and last version, and their MAC."""

    id: int
    service: str
    username: str
    current_version: int | None
    last_version: int
    created_at: float
    updated_at: float
    mac: bytes
    expires_at: float | None = None
    versions_digest: bytes | None = None
    #: The refresher and refresh state (refresh.py), covered by the head's leaf.
    refresh: bytes | None = None


class VersionRow(NamedTuple):
    """One stored version of a credential."""

    version: int
    kek_version: int
    wrapped_key: bytes
    ciphertext: bytes
    created_at: float
    ttl: float | None = None
    expires_at: float | None = None
    digest: bytes | None = None


@runtime_checkable
class Storage(Protocol):
    """One open connection to a vault's rows.

    Grouped as the core uses it. Every method runs inside the caller's
    transaction (:meth:`transaction` or :meth:`snapshot`) unless its
    docstring says it makes its own.
    """

    #: Where the vault lives, for messages (a file path; an engine on a
    #: server names its host there, never its password).
    where: str
    #: Whether deleted rows leave the disk when :meth:`checkpoint` succeeds
    #: (SQLite); False where the engine keeps them until its own cleanup.
    erases: bool

    # -- the connection and its transactions ----------------------------------

    def close(self) -> None:
        """Close the connection."""

    def transaction(self) -> AbstractContextManager[None]:
        """A write transaction: lock first, commit on success, else roll back."""

    def snapshot(self) -> AbstractContextManager[None]:
        """A read transaction: every read inside sees one consistent state."""

    def savepoint(self) -> None:
        """Open a savepoint inside the current transaction."""

    def release_savepoint(self) -> None:
        """Keep what was done since :meth:`savepoint`."""

    def rollback_savepoint(self) -> None:
        """Undo what was done since :meth:`savepoint`, keeping the transaction open."""

    def checkpoint(self) -> bool:
        """Make committed writes durable in the main store; False if a reader blocked it."""

    def residue(self, what: str) -> str:
        """A sentence for the user: what of deleted rows stays on disk after ``what``."""

    def schema(self) -> list[str]:
        """Names of the applied migrations."""

    def counts(self) -> dict[str, int]:
        """Numbers for ``status``."""

    # -- the vault record, its keys, its seal ---------------------------------

    def vault(self) -> VaultRecord:
        """The vault record; its absence is damage."""

    def keks(self) -> list[KekRecord]:
        """Every KEK version, oldest first."""

    def meta_rows(self) -> tuple[VaultRecord, list[KekRecord], list[tuple[int, bytes]],
                                 tuple[int, bytes], tuple[float, str] | None,
                                 list[BucketRow]]:
        """The vault record, KEKs, past vault keys, audit anchor, seal and buckets, at once."""

    def set_root(self, kdf: str, verifier: bytes, vault_key: bytes, generation: int,
                 state_version: int = 1) -> None:
        """Record a new root key and key epoch: KDF parameters, verifier, wrapped vault key."""

    def past_keys(self) -> list[tuple[int, bytes]]:
        """Vault keys of earlier epochs, each wrapped under the current vault key."""

    def set_past_keys(self, keys: Iterable[tuple[int, bytes]]) -> None:
        """Replace the stored vault keys of earlier epochs."""

    def add_kek(self, record: KekRecord) -> None:
        """Store a new KEK version."""

    def set_kek_state(self, version: int, state: str) -> None:
        """Change a KEK version's state."""

    def set_kek_wrapped(self, version: int, wrapped: bytes) -> None:
        """Replace a KEK version's wrapped material (rekey)."""

    def retire_kek(self, version: int) -> None:
        """Retire a KEK version: state retired, wrapped material removed."""

    def count_wrap(self, kek_version: int, n: int = 1) -> None:
        """Count data keys wrapped under a KEK (NIST SP 800-38D usage limit)."""

    def keys_in_use(self) -> dict[int, int]:
        """How many stored versions each KEK version wraps."""

    def under_keks_below(self, below: int) -> tuple[int, int]:
        """(versions, credentials) whose data keys are wrapped under a KEK below ``below``."""

    def rewrap_candidates(self, below: int, limit: int) -> list[tuple[int, str, VersionRow]]:
        """Up to ``limit`` versions under a KEK below ``below``: (head id, service, row)."""

    def set_wrapped_keys(self, rows: Iterable[tuple[int, bytes, bytes, int, int]]) -> None:
        """Store re-wrapped data keys: (kek_version, wrapped_key, digest, head id, version)."""

    def set_seal(self, sealed_at: float | None, actor: str = "") -> None:
        """Seal (a time and an actor) or unseal (None)."""

    # -- unlock attempts (unauthenticated: read before any key is known) ------

    def unlock_throttle(self) -> tuple[int, float]:
        """Failed unlocks in a row and the time of the last counted attempt."""

    def unlock_attempts(self, stale_before: float) -> int:
        """Attempts running now; those started before ``stale_before`` are dropped."""

    def start_unlock_attempt(self, now: float) -> int:
        """Record an attempt that is about to run (its own transaction); returns its id."""

    def end_unlock_attempt(self, attempt: int | None, outcome: str, now: float) -> None:
        """An attempt is over (its own transaction): forget it, and count its outcome."""

    def set_unlock_throttle(self, failures: int, last_at: float) -> None:
        """Record the failed-unlock count (0 removes the row)."""

    def add_pending(self, ts_us: int, actor: str, op: str, outcome: str,
                    reason: str | None) -> None:
        """Record an event that cannot be chained yet (its own transaction)."""

    def has_pending(self) -> bool:
        """Whether failed unlocks wait to be chained."""

    def take_pending(self, limit: int) -> list[tuple[Any, ...]]:
        """Remove and return up to ``limit`` waiting rows, oldest first."""

    # -- rate-limit buckets ---------------------------------------------------

    def put_buckets(self, rows: Iterable[BucketRow]) -> None:
        """Store token-bucket states (insert or replace)."""

    def drop_buckets(self, keys: Iterable[tuple[str, str]]) -> None:
        """Delete token buckets by (rule, actor): a full bucket and a missing one are alike."""

    # -- credentials and their versions ---------------------------------------

    def bucket_rows(self, bucket: int) -> tuple[list[HeadRow], dict[int, list[VersionRow]]]:
        """A state bucket's heads, and the kept versions of each."""

    def heads_in_buckets(self, buckets: Iterable[int]) -> dict[int, list[HeadRow]]:
        """Every head of several state buckets, each bucket's in (service, username) order."""

    def versions_of(self, head_ids: Iterable[int]) -> dict[int, list[VersionRow]]:
        """The kept versions of several credentials, each oldest first."""

    def new_head(self, service: str, username: str, bucket: int, now: float) -> HeadRow:
        """Insert the head of a credential that has never existed (no version yet)."""

    def update_head(self, head_id: int, current: int | None, last: int, now: float,
                    expires_at: float | None, versions_digest: bytes) -> None:
        """Move a credential's current and last version, its expiry and its version digest."""

    def add_version(self, head_id: int, row: VersionRow) -> None:
        """Store a new version."""

    def versions(self, head_id: int) -> list[VersionRow]:
        """Every kept version of a credential, oldest first."""

    def prune(self, head_id: int, keep: int) -> int:
        """Delete all but the newest ``keep`` versions; returns how many went."""

    def purge(self, head_id: int) -> None:
        """Delete a credential and every version of it."""

    def all_heads(self) -> Iterator[tuple[int | None, HeadRow]]:
        """Every head with its stored state bucket, by service then username."""

    def all_versions(self) -> Iterator[tuple[int, VersionRow]]:
        """Every stored version with its credential id, by credential then version."""

    def set_versions_digests(self, rows: Iterable[tuple[bytes, int]]) -> None:
        """Store heads' new version digests: (versions_digest, head id)."""

    def fill_state_columns(self, heads: Iterable[tuple[int, bytes, int]],
                           versions: Iterable[tuple[bytes, int, int]]) -> None:
        """Set (bucket, versions digest) of heads and the digest of versions (upgrade)."""

    def set_version_ttl(self, head_id: int, version: int, ttl: float | None,
                        expires_at: float | None, digest: bytes) -> None:
        """Change a stored version's TTL and expiry, with its new digest."""

    def expired_count(self, now: float) -> int:
        """Live credentials whose current version expired at ``now`` (for ``status``)."""

    # -- the authenticated state (see keyring_hardened.state) -----------------

    def nodes(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Stored state nodes by (level, index); absent ones are left out."""

    def put_nodes(self, nodes: Mapping[tuple[int, int], bytes | None]) -> None:
        """Store changed state nodes; None (or an all-empty node) removes one."""

    def clear_nodes(self) -> None:
        """Remove every state node (before a rebuild from scratch)."""

    # -- the audit chain ------------------------------------------------------

    def audit_anchor(self) -> tuple[int, bytes]:
        """The (seq, mac) that the oldest kept event follows."""

    def audit_head(self) -> tuple[int, bytes]:
        """The (seq, mac) of the newest event, or the anchor when there is none."""

    def newest_events(self, n: int = 2) -> list[Event]:
        """The ``n`` newest events, newest first."""

    def event(self, seq: int) -> Event | None:
        """One event by its sequence number."""

    def append_event(self, event: Event) -> None:
        """Insert one chained event (inside the caller's transaction)."""

    def events(self, after: int = 0, through: int | None = None,
               newest_first: bool = False) -> Iterator[Event]:
        """Events with ``after < seq <= through``."""

    def last_event(self, op: str) -> Event | None:
        """The newest successful event of an operation."""

    def events_before(self, ts_us: int) -> int:
        """The seq of the newest event older than ``ts_us`` (0 if none)."""

    def drop_events_through(self, seq: int, mac: bytes) -> None:
        """Delete events up to ``seq`` and make ``(seq, mac)`` the anchor."""

    # -- refreshers and refresh leases ----------------------------------------

    def set_refresh(self, head_id: int, blob: bytes | None) -> None:
        """Store a credential's refresher and refresh state (the caller re-roots the state)."""

    def refresh_hints(self) -> list[tuple[Any, ...]]:
        """(id, service, username, current, expires_at, refresh) of each head with one."""

    def current_hint(self, head_id: int) -> Any:
        """A head's current version as stored, unchecked (a waiter's cue to read again)."""

    def lease(self, head_id: int) -> tuple[Any, ...] | None:
        """The refresh lease of a credential: (holder, token, base version, expires_at)."""

    def put_lease(self, head_id: int, holder: str, token: bytes, base: int,
                  expires_at: float) -> None:
        """Take (or take over) a credential's refresh lease."""

    def drop_lease(self, head_id: int, token: bytes) -> None:
        """Give up a lease, if it is still the one holding ``token``."""

    # -- whole-vault copies (backup and restore) ------------------------------

    def backup_to(self, target: Path) -> None:
        """Copy the vault, as one consistent snapshot, into a new file at ``target``."""

    def use_wal(self) -> None:
        """Make a private copy journal as every live vault does."""

    def replace_with(self, source: Path, keep: Path, expect_root: bytes | None,
                     key_version: int) -> None:
        """Make this vault's rows those of ``source`` in one transaction; keep the old ones."""

    def export_rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of one of the vault's tables (``schema.TABLE_COLUMNS``), in key order."""


class Engine(Protocol):
    """How a storage engine opens and creates vaults (its class, as a factory)."""

    def open(self, path: Path, synchronous: str = "normal", busy_timeout: float = 10.0
             ) -> Storage:
        """Open an existing vault, applying pending migrations.

        Raises :class:`VaultMissingError` when there is none.
        """

    def open_copy(self, path: Path, synchronous: str = "normal", busy_timeout: float = 10.0
                  ) -> Storage:
        """Open a private copy of a vault (a backup being checked or restored)."""

    def create(self, path: Path, vault: VaultRecord, kek: KekRecord, event: Event,
               nodes: Mapping[tuple[int, int], bytes]) -> bool:
        """Create a complete vault atomically, with its first (init) event.

        Returns False, changing nothing, when a vault already exists there.
        """

    def discard(self, path: Path) -> None:
        """Remove a vault that :meth:`create_from` made and its check then refused."""

    def create_from(self, path: Path, rows: Mapping[str, list[tuple[Any, ...]]]) -> bool:
        """Create a vault holding exactly ``rows`` by table (migrate-storage), atomically.

        Returns False, changing nothing, when a vault already exists there.
        """
