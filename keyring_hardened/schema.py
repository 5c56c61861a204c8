"""The SQLite schema of a vault: its tables, named migrations, and their records.

Only data definition lives here; reading and writing rows is
:mod:`keyring_hardened.storage`'s. Discipline (DESIGN.md section 5):

* migrations are named and append only: never edit a released one;
* each pending migration is applied with its record in ``schema_migrations``
  inside the caller's write transaction, so a vault is never half migrated;
* a vault that records a migration this code does not know is refused (it
  was written by a newer keyring-hardened), never "repaired".

This module does not import :mod:`sqlite3`: it is handed the connection.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

from .errors import UsageError

__all__ = ["APPLICATION_ID", "MIGRATIONS", "TABLE_COLUMNS", "TABLE_KEYS", "Migration",
           "apply_migrations"]

#: A named migration: its name, and the statements it runs, in order.
Migration = tuple[str, tuple[str, ...]]


class Connection(Protocol):
    """What applying migrations needs of a database connection (sqlite3's)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Iterable[Any]:
        """Run one statement."""


#: Marks a SQLite file as a keyring-hardened vault ("KHV1").
APPLICATION_ID = 0x4B485631

#: Named migrations, in order. Append only: never edit a released one.
MIGRATIONS: tuple[Migration, ...] = (
    ("0001_initial", (
        """CREATE TABLE vault (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            vault_id BLOB NOT NULL,
            created_at REAL NOT NULL,
            kdf TEXT NOT NULL,
            verifier BLOB NOT NULL,
            vault_key BLOB NOT NULL,
            generation INTEGER NOT NULL
        )""",
        """CREATE TABLE keks (
            version INTEGER PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('active', 'decrypt-only', 'retired')),
            created_at REAL NOT NULL,
            wrapped BLOB,
            wrap_count INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE credentials (
            id INTEGER PRIMARY KEY,
            service TEXT NOT NULL,
            username TEXT NOT NULL,
            current_version INTEGER,
            last_version INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            mac BLOB NOT NULL,
            UNIQUE (service, username)
        )""",
        """CREATE TABLE secret_versions (
            credential_id INTEGER NOT NULL REFERENCES credentials(id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            kek_version INTEGER NOT NULL REFERENCES keks(version),
            wrapped_key BLOB NOT NULL,
            ciphertext BLOB NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (credential_id, version)
        ) WITHOUT ROWID""",
        "CREATE INDEX secret_versions_by_kek ON secret_versions (kek_version)",
    )),
    ("0002_audit", (
        """CREATE TABLE audit_events (
            seq INTEGER PRIMARY KEY,
            ts_us INTEGER NOT NULL,
            actor TEXT NOT NULL,
            op TEXT NOT NULL,
            service TEXT,
            username TEXT,
            outcome TEXT NOT NULL,
            key_version INTEGER,
            reason TEXT,
            mac BLOB NOT NULL
        )""",
        "CREATE INDEX audit_events_by_time ON audit_events (ts_us)",
        # The (seq, mac) the oldest kept event follows: genesis, or the newest
        # pruned event. Editing it breaks the oldest kept event's mac.
        """CREATE TABLE audit_anchor (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            mac BLOB NOT NULL
        )""",
        "INSERT INTO audit_anchor (id, seq, mac) VALUES (1, 0, zeroblob(32))",
        # Failed unlocks cannot be chained (no key); they wait here and are
        # chained, marked as such, by the next successful unlock.
        """CREATE TABLE audit_pending (
            id INTEGER PRIMARY KEY,
            ts_us INTEGER NOT NULL,
            actor TEXT NOT NULL,
            op TEXT NOT NULL,
            outcome TEXT NOT NULL,
            reason TEXT
        )""",
    )),
    ("0003_ttl", (
        "ALTER TABLE secret_versions ADD COLUMN ttl REAL",
        "ALTER TABLE secret_versions ADD COLUMN expires_at REAL",
        # The current version's expiry, covered by the head's MAC.
        "ALTER TABLE credentials ADD COLUMN expires_at REAL",
    )),
    # The authenticated state (see state.py): every event carries the state
    # root its mac covers; heads and versions carry what the root is built from.
    ("0004_authenticated_state", (
        # 0: made by keyring-hardened 0.1, state not yet authenticated (run upgrade).
        "ALTER TABLE vault ADD COLUMN state_version INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE credentials ADD COLUMN bucket INTEGER",
        "ALTER TABLE credentials ADD COLUMN versions_digest BLOB",
        "CREATE INDEX credentials_by_bucket ON credentials (bucket, service, username)",
        "ALTER TABLE secret_versions ADD COLUMN digest BLOB",
        "ALTER TABLE audit_events ADD COLUMN epoch INTEGER",
        "ALTER TABLE audit_events ADD COLUMN root BLOB",
        """CREATE TABLE state_nodes (
            level INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            hashes BLOB NOT NULL,
            PRIMARY KEY (level, idx)
        ) WITHOUT ROWID""",
        # Vault keys of earlier epochs (before a rekey), each wrapped under the
        # current vault key: kept to verify the trail they chained.
        """CREATE TABLE vault_keys (
            epoch INTEGER PRIMARY KEY,
            wrapped BLOB NOT NULL
        )""",
    )),
    # Access control (access.py): rate-limit buckets and the seal, both under
    # the state root; the unlock throttle, which cannot be (no key before unlock).
    ("0005_access", (
        # One token bucket per (rule, actor); ``rule`` is a digest of the rule's
        # definition, so reordering the config does not move a bucket to another rule.
        """CREATE TABLE rate_buckets (
            rule TEXT NOT NULL,
            actor TEXT NOT NULL,
            tokens REAL NOT NULL,
            updated REAL NOT NULL,
            PRIMARY KEY (rule, actor)
        ) WITHOUT ROWID""",
        # A row here means sealed: since when, and by whom.
        """CREATE TABLE seal (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            sealed_at REAL NOT NULL,
            actor TEXT NOT NULL
        )""",
        # Failed unlocks in a row and the time of the last attempt that counted;
        # written before any key is known, so nothing authenticates it.
        """CREATE TABLE unlock_throttle (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            failures INTEGER NOT NULL,
            last_at REAL NOT NULL
        )""",
        # Passphrase attempts running now (their KDF takes a while): counted
        # against the free attempts, so guesses made side by side get no more.
        """CREATE TABLE unlock_attempts (
            id INTEGER PRIMARY KEY,
            started_at REAL NOT NULL
        )""",
    )),
    # Refresh (refresh.py): a credential's refresher and its refresh state, in
    # one blob that the head's leaf covers (so the state root pins it); and the
    # single-flight lease, which is only a hint and never trusted (see refresh.py).
    ("0006_refresh", (
        "ALTER TABLE credentials ADD COLUMN refresh BLOB",
        """CREATE TABLE refresh_leases (
            credential_id INTEGER PRIMARY KEY,
            holder TEXT NOT NULL,
            token BLOB NOT NULL,
            base_version INTEGER NOT NULL,
            expires_at REAL NOT NULL
        )""",
    )),
)

#: The rows that make a vault, by table, in the same column order in every
#: engine: what ``migrate-storage`` copies and compares, entry by entry. Left
#: out: ``schema_migrations`` (each engine records its own), and the rows
#: that only describe work running now (``unlock_attempts``,
#: ``refresh_leases``), which belong to the processes of the source.
#: Each table's first column (two for versions and nodes) is its key: rows
#: are copied and compared in that order.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "vault": ("id", "vault_id", "created_at", "kdf", "verifier", "vault_key", "generation",
              "state_version"),
    "keks": ("version", "state", "created_at", "wrapped", "wrap_count"),
    "credentials": ("id", "service", "username", "current_version", "last_version",
                    "created_at", "updated_at", "mac", "expires_at", "bucket",
                    "versions_digest", "refresh"),
    "secret_versions": ("credential_id", "version", "kek_version", "wrapped_key", "ciphertext",
                        "created_at", "ttl", "expires_at", "digest"),
    "audit_events": ("seq", "ts_us", "actor", "op", "service", "username", "outcome",
                     "key_version", "reason", "mac", "epoch", "root"),
    "audit_anchor": ("id", "seq", "mac"),
    "audit_pending": ("id", "ts_us", "actor", "op", "outcome", "reason"),
    "state_nodes": ("level", "idx", "hashes"),
    "vault_keys": ("epoch", "wrapped"),
    "rate_buckets": ("rule", "actor", "tokens", "updated"),
    "seal": ("id", "sealed_at", "actor"),
    "unlock_throttle": ("id", "failures", "last_at"),
}

#: How many leading columns of each table form its key (the copy's order).
TABLE_KEYS: dict[str, int] = {"secret_versions": 2, "state_nodes": 2, "rate_buckets": 2}

_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    name TEXT PRIMARY KEY,
    applied_at REAL NOT NULL
)"""


def apply_pending(conn: Connection, migrations: tuple[Migration, ...], records_table: str,
                  record: str) -> None:
    """Apply the ``migrations`` a vault does not record yet, each with its record.

    The rules both engines share (pgschema.py calls this with PostgreSQL's
    DDL): ``records_table`` creates ``schema_migrations`` if it is missing,
    ``record`` inserts one (name, time) row in the driver's parameter
    style. Runs inside the caller's write transaction, so a migration and
    its record commit together.
    Raises :class:`UsageError` when the vault records a migration not in
    ``migrations``: a newer keyring-hardened wrote it.
    """
    conn.execute(records_table)
    done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
    unknown = done - {name for name, _ in migrations}
    if unknown:
        raise UsageError(f"vault has migrations this keyring-hardened does not know "
                         f"({', '.join(sorted(unknown))}); upgrade it")
    for name, statements in migrations:
        if name in done:
            continue
        for statement in statements:
            conn.execute(statement)
        conn.execute(record, (name, time.time()))


def apply_migrations(conn: Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> None:
    """Apply pending ``migrations`` inside the caller's write transaction.

    Each is recorded by name and time in ``schema_migrations``, in the same
    transaction as its statements; ``user_version`` then counts them, for
    the quick check at open.
    Raises :class:`UsageError` when the vault records a migration not in
    ``migrations``: a newer keyring-hardened wrote it, and guessing how to
    read its rows could corrupt them.
    """
    apply_pending(conn, migrations, _MIGRATIONS_TABLE,
                  "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)")
    conn.execute(f"PRAGMA user_version = {len(migrations)}")
