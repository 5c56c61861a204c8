"""SQLite storage: the SQLite engine, and the only module that imports :mod:`sqlite3`.

:class:`SQLiteStorage` implements the storage port
(:class:`keyring_hardened.port.Storage`): row access and transactions. The
tables and their named migrations are :mod:`keyring_hardened.schema`'s; the
row values are the port's (re-exported here). Nothing in the core names
this module: it is opened through :func:`keyring_hardened.engines.engine`.

Discipline (DESIGN.md section 5):

* connections in autocommit mode; every write is ``BEGIN IMMEDIATE ... COMMIT``
  so a writer takes the lock before it reads, and waits (busy timeout)
  instead of failing with "database is locked" half way;
* WAL, ``foreign_keys=ON``, ``secure_delete=ON`` and a chosen ``synchronous``
  level (``NORMAL`` by default: a killed process loses no committed write;
  ``FULL`` also survives power loss at the cost of an fsync per write);
* placeholders only;
* named migrations, each applied with its record in one transaction, and a
  guard that refuses a database newer than this code;
* a new vault is built under a temporary name and hard-linked into place,
  so ``vault.db`` either does not exist or is a complete vault. An empty or
  truncated file is therefore damage, never an invitation to re-initialise.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ._files import fsync_dir, fsync_file
from ._seams import crash_point
from .audit import Event
from .errors import HardenedError, IntegrityError, StorageError, UsageError
from .port import BucketRow, HeadRow, KekRecord, VaultMissingError, VaultRecord, VersionRow
from .rowtypes import (
    _BUCKET_TYPES,
    _EVENT_TYPES,
    _HEAD_TYPES,
    _KEK_TYPES,
    _VAULT_TYPES,
    _VERSION_TYPES,
    _typed,
)
from .schema import APPLICATION_ID, MIGRATIONS, TABLE_COLUMNS, TABLE_KEYS, apply_migrations

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "BucketRow",
    "HeadRow",
    "KekRecord",
    "SQLiteStorage",
    "VaultMissingError",
    "VaultRecord",
    "VersionRow",
]

def _translate(exc: sqlite3.Error, path: Path) -> HardenedError:
    """Map a sqlite3 error to the error class a caller can act on."""
    name = getattr(exc, "sqlite_errorname", "")
    text = str(exc)
    if "Could not decode to UTF-8" in text:
        # The message quotes the column's bytes: never pass it on.
        return IntegrityError(f"vault database {path} holds text that is not UTF-8 "
                              "(tampered?)", "column-encoding")
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "no such table" in text \
            or "no such column" in text or isinstance(exc, sqlite3.IntegrityError):
        return IntegrityError(f"vault database {path} is damaged ({name or 'schema'}); "
                              "restore it from a backup")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StorageError(f"vault database {path} is busy: another process held it "
                            "longer than the busy timeout; try again")
    # Read-only, cannot-open, I/O and locking-protocol errors (a read-only
    # -shm gives SQLITE_PROTOCOL): name the file that causes it, if one does.
    culprit = _culprit(path)
    if culprit:
        return StorageError(culprit)
    return StorageError(f"vault database {path}: {name or type(exc).__name__}: {text}")


def _culprit(path: Path) -> str | None:
    """Which file or folder stops SQLite writing the vault, named for the user.

    SQLite reports the database's name whichever of its files failed. After
    a read-only episode its ``-wal`` and ``-shm`` files stay at the mode the
    database had then (0444), and the vault stays unusable after
    ``vault.db`` itself is fixed; this names the file that really needs it.
    """
    import stat

    folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"vault folder {folder} is not writable, so the database cannot keep its "
                f"-wal and -shm files there; make it writable (chmod 700 {folder})")
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"vault database file {candidate} cannot be checked: {exc.strerror}"
        if not os.access(candidate, os.R_OK | os.W_OK):
            mode = stat.S_IMODE(st.st_mode)
            stale = " (left read-only by an earlier read-only episode?)" if candidate != path \
                else ""
            return (f"vault database file {candidate} is not writable (mode {mode:04o}, owner "
                    f"uid {st.st_uid}){stale}; run: chmod 600 {candidate}")
    return None


def _check_companions(path: Path) -> None:
    """Refuse a ``-wal`` or ``-shm`` file that is a link, not a file, or someone else's.

    SQLite opens them by name and follows links: a planted ``vault.db-wal``
    link would have the vault's pages written wherever it points, and a
    foreign one could feed it forged pages.
    """
    from ._files import trust_problem
    from .errors import ConfigError

    for companion in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            st = os.lstat(companion)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"vault database file {companion} cannot be checked: "
                               f"{exc.strerror}") from None
        problem = trust_problem(st, companion, "vault database file")
        if problem:
            raise ConfigError(problem)


class SQLiteStorage:
    """One connection to a vault database."""

    #: Deleted rows leave the disk: freed pages are zeroed and a checkpoint truncates the WAL.
    erases = True

    def __init__(self, path: Path, conn: sqlite3.Connection, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.where = str(path)
        self._conn = conn
        self._busy_ms = int(busy_timeout * 1000)

    # -- opening and creating -------------------------------------------------

    @staticmethod
    def _connect(path: Path, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
        import urllib.parse

        # mode=rw: never let SQLite create a database file as a side effect.
        # The path is percent-encoded: a "?" or "#" in a folder name must not
        # end the file name and start URI parameters.
        uri = f"file:{urllib.parse.quote(os.fsencode(path.absolute()))}?mode=rw"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=busy_timeout,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            # Freed pages are zeroed, so a deleted version leaves no ciphertext behind.
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    def open(cls, path: Path, synchronous: str = "normal", busy_timeout: float = 10.0
             ) -> SQLiteStorage:
        """Open an existing vault, applying pending migrations.

        Raises :class:`VaultMissingError` when there is no database file,
        :class:`IntegrityError` when the file is not a complete vault, and
        :class:`ConfigError` when it (or its ``-wal``/``-shm``) is not a
        trusted file: a link, not a regular file, someone else's, or open to
        group and others.
        """
        _check_header(path)
        _check_companions(path)
        return cls._connected(path, synchronous, busy_timeout)

    @classmethod
    def _connected(cls, path: Path, synchronous: str, busy_timeout: float) -> SQLiteStorage:
        """Connect to a checked file, then check its identity and apply pending migrations."""
        try:
            conn = cls._connect(path, synchronous, busy_timeout)
        except sqlite3.Error as exc:
            raise _translate(exc, path) from None
        store = cls(path, conn, busy_timeout)
        try:
            store._check_and_migrate()
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, path) from None
        except BaseException:
            conn.close()
            raise
        return store

    def _check_and_migrate(self) -> None:
        app_id, = self._conn.execute("PRAGMA application_id").fetchone()
        version, = self._conn.execute("PRAGMA user_version").fetchone()
        if app_id != APPLICATION_ID:
            raise IntegrityError(f"{self.path} is not a keyring-hardened vault (empty, truncated "
                                 "or foreign file); refusing to use or re-initialise it")
        if version > len(MIGRATIONS):
            raise UsageError(f"vault {self.path} has schema version {version}, newer than this "
                             f"keyring-hardened supports ({len(MIGRATIONS)}); upgrade it")
        if version < len(MIGRATIONS):
            with self.transaction():
                _apply_migrations(self._conn)

    @classmethod
    def create(cls, path: Path, vault: VaultRecord, kek: KekRecord, event: Event,
               nodes: Mapping[tuple[int, int], bytes]) -> bool:
        """Create a complete vault at ``path`` atomically, with its first (init) event.

        Returns False, leaving everything as it was, when a vault already
        exists there (another process may have won the race).
        """
        def fill(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO vault (id, vault_id, created_at, kdf, verifier,"
                         " vault_key, generation, state_version)"
                         " VALUES (1, ?, ?, ?, ?, ?, ?, ?)", vault)
            conn.execute("INSERT INTO keks (version, state, created_at, wrapped, wrap_count) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (kek.version, kek.state, kek.created_at, kek.wrapped, kek.wrap_count))
            conn.executemany("INSERT INTO state_nodes (level, idx, hashes) VALUES (?, ?, ?)",
                             [(level, idx, blob) for (level, idx), blob in nodes.items()])
            conn.execute(_INSERT_EVENT, event)

        return cls._build(path, fill)

    @classmethod
    def create_from(cls, path: Path, rows: Mapping[str, list[tuple[Any, ...]]]) -> bool:
        """Create a vault at ``path`` holding exactly ``rows`` (migrate-storage), atomically.

        Returns False, changing nothing, when ``path`` exists.
        """
        if os.path.lexists(path):
            return False

        def fill(conn: sqlite3.Connection) -> None:
            for table, columns in TABLE_COLUMNS.items():
                # Names from the constant map, never from input.
                conn.execute(f"DELETE FROM {table}")  # noqa: S608 - the anchor's default row
                conn.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES"  # noqa: S608
                    f" ({', '.join('?' * len(columns))})", rows.get(table, []))

        return cls._build(path, fill)

    @staticmethod
    def _build(path: Path, fill: Callable[[sqlite3.Connection], None]) -> bool:
        """Build a vault under a temporary name, ``fill`` it, and hard-link it into place.

        So ``path`` either does not exist or is a complete vault; False,
        changing nothing, when something exists there already.
        """
        tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
        try:
            # O_EXCL never follows a link, and the random name cannot be planted ahead.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), 0o600)
            os.fchmod(fd, 0o600)  # whatever the umask; SQLite gives its -wal/-shm the same mode
            os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot create vault database {path}: {exc.strerror}") from None
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute("BEGIN IMMEDIATE")
                _apply_migrations(conn)
                fill(conn)
                conn.execute("COMMIT")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            fsync_file(tmp)
            crash_point("create-before-link")
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            fsync_dir(path.parent)
            return True
        except sqlite3.Error as exc:
            raise _translate(exc, path) from None
        except OSError as exc:
            raise StorageError(f"cannot create vault database {path}: {exc.strerror}") from None
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)

    @classmethod
    def discard(cls, path: Path) -> None:
        """Remove a vault file that ``create_from`` made and its check refused (migrate-storage)."""
        for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)

    def export_rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of one of the vault's tables (``schema.TABLE_COLUMNS``), in key order."""
        columns = TABLE_COLUMNS[table]
        keys = columns[:TABLE_KEYS.get(table, 1)]
        return [tuple(r) for r in self._rows(
            f"SELECT {', '.join(columns)} FROM {table} ORDER BY {', '.join(keys)}")]  # noqa: S608

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    # -- transactions ---------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction: ``BEGIN IMMEDIATE``, commit on success, else roll back."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException as exc:
            if self._conn.in_transaction:
                self._conn.rollback()
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, self.path) from None
            raise

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        try:
            return self._conn.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    # -- vault and keys -------------------------------------------------------

    def vault(self) -> VaultRecord:
        """The vault record; its absence is damage."""
        rows = self._rows("SELECT CAST(vault_id AS BLOB), created_at, kdf, CAST(verifier AS BLOB),"
                          " CAST(vault_key AS BLOB), generation, state_version FROM vault"
                          " WHERE id = 1")
        if not rows:
            raise IntegrityError(f"vault database {self.path} has no vault record; "
                                 "restore it from a backup")
        return VaultRecord(*_typed(rows[0], _VAULT_TYPES, "vault record"))

    def keks(self) -> list[KekRecord]:
        """Every KEK version, oldest first."""
        return [KekRecord(*_typed(r, _KEK_TYPES, "key record")) for r in self._rows(
            "SELECT version, state, created_at, CAST(wrapped AS BLOB), wrap_count FROM keks"
            " ORDER BY version")]

    def meta_rows(self) -> tuple[VaultRecord, list[KekRecord], list[tuple[int, bytes]],
                                 tuple[int, bytes], tuple[float, str] | None,
                                 list[BucketRow]]:
        """The vault record, KEKs, past vault keys, audit anchor, seal and buckets, in one query."""
        rows = self._rows(
            "SELECT 0, CAST(vault_id AS BLOB), created_at, kdf, CAST(verifier AS BLOB),"
            " CAST(vault_key AS BLOB), generation, state_version FROM vault WHERE id = 1"
            " UNION ALL SELECT 1, version, state, created_at, CAST(wrapped AS BLOB), wrap_count,"
            " NULL, NULL FROM keks"
            " UNION ALL SELECT 2, epoch, CAST(wrapped AS BLOB), NULL, NULL, NULL, NULL, NULL"
            " FROM vault_keys"
            " UNION ALL SELECT 3, seq, CAST(mac AS BLOB), NULL, NULL, NULL, NULL, NULL"
            " FROM audit_anchor WHERE id = 1"
            " UNION ALL SELECT 4, sealed_at, actor, NULL, NULL, NULL, NULL, NULL FROM seal"
            " UNION ALL SELECT 5, rule, actor, tokens, updated, NULL, NULL, NULL"
            " FROM rate_buckets ORDER BY 1, 2, 3")
        vaults = [VaultRecord(*_typed(r[1:], _VAULT_TYPES, "vault record"))
                  for r in rows if r[0] == 0]
        keks = [KekRecord(*_typed(r[1:6], _KEK_TYPES, "key record")) for r in rows if r[0] == 1]
        past = [_typed(r[1:3], (int, bytes), "vault key record") for r in rows if r[0] == 2]
        anchors = [_typed(r[1:3], (int, bytes), "audit anchor") for r in rows if r[0] == 3]
        seals = [_typed(r[1:3], (float, str), "seal record") for r in rows if r[0] == 4]
        buckets = [BucketRow(*_typed(r[1:5], _BUCKET_TYPES, "rate-limit bucket"))
                   for r in rows if r[0] == 5]
        if not vaults:
            raise IntegrityError(f"vault database {self.path} has no vault record; "
                                 "restore it from a backup")
        if not anchors:
            raise IntegrityError("audit anchor is missing", "audit-anchor")
        seal = (seals[0][0], seals[0][1]) if seals else None
        return (vaults[0], keks, [(e, w) for e, w in past], (anchors[0][0], anchors[0][1]),
                seal, buckets)

    # -- access control: buckets and seal (under the state root), unlock throttle ----------

    def put_buckets(self, rows: Iterable[BucketRow]) -> None:
        """Store token-bucket states (insert or replace)."""
        try:
            self._conn.executemany("INSERT OR REPLACE INTO rate_buckets (rule, actor, tokens,"
                                   " updated) VALUES (?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def drop_buckets(self, keys: Iterable[tuple[str, str]]) -> None:
        """Delete token buckets by (rule, actor): a full bucket and a missing one are alike."""
        try:
            self._conn.executemany("DELETE FROM rate_buckets WHERE rule = ? AND actor = ?",
                                   list(keys))
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def set_seal(self, sealed_at: float | None, actor: str = "") -> None:
        """Seal (a time and an actor) or unseal (None)."""
        self._run("DELETE FROM seal")
        if sealed_at is not None:
            self._run("INSERT INTO seal (id, sealed_at, actor) VALUES (1, ?, ?)",
                      (sealed_at, actor))

    def unlock_throttle(self) -> tuple[int, float]:
        """Failed unlocks in a row and the time of the last counted attempt (unauthenticated).

        A damaged row (wrong types, negative) reads as the most cautious
        state the caller can act on: it is not trusted to *shorten* a wait.
        """
        rows = self._rows("SELECT failures, last_at FROM unlock_throttle WHERE id = 1")
        if not rows:
            return 0, 0.0
        failures, last_at = rows[0]
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
            failures = 1 << 30
        if not isinstance(last_at, int | float) or last_at != last_at:
            last_at = float("inf")
        return failures, float(last_at)

    def unlock_attempts(self, stale_before: float) -> int:
        """Attempts running now; those started before ``stale_before`` (crashed) are dropped."""
        self._run("DELETE FROM unlock_attempts WHERE NOT (started_at >= ?)", (stale_before,))
        return int(self._rows("SELECT count(*) FROM unlock_attempts")[0][0])

    def start_unlock_attempt(self, now: float) -> int:
        """Record an attempt that is about to run; returns its id."""
        cur = self._conn.execute("INSERT INTO unlock_attempts (started_at) VALUES (?)", (now,))
        return int(cur.lastrowid or 0)

    def end_unlock_attempt(self, attempt: int | None, outcome: str, now: float) -> None:
        """An attempt is over, in one transaction: forget it, and count its outcome.

        ``outcome``: ``"ok"`` resets the count, ``"guess"`` (a wrong key or
        passphrase) adds one, anything else leaves the count as it is.
        """
        with self.transaction():
            if attempt is not None:
                self._run("DELETE FROM unlock_attempts WHERE id = ?", (attempt,))
            if outcome == "ok":
                self.set_unlock_throttle(0, 0.0)
            elif outcome == "guess":
                failures, _ = self.unlock_throttle()
                self.set_unlock_throttle(min(failures + 1, 1 << 30), now)

    def set_unlock_throttle(self, failures: int, last_at: float) -> None:
        """Record the failed-unlock count (0 removes the row)."""
        self._run("DELETE FROM unlock_throttle")
        if failures:
            self._run("INSERT INTO unlock_throttle (id, failures, last_at) VALUES (1, ?, ?)",
                      (failures, last_at))

    def add_kek(self, record: KekRecord) -> None:
        """Store a new KEK version."""
        self._run("INSERT INTO keks (version, state, created_at, wrapped, wrap_count)"
                  " VALUES (?, ?, ?, ?, ?)", record)

    def set_kek_state(self, version: int, state: str) -> None:
        """Change a KEK version's state."""
        self._run("UPDATE keks SET state = ? WHERE version = ?", (state, version))

    def set_kek_wrapped(self, version: int, wrapped: bytes) -> None:
        """Replace a KEK version's wrapped material (rekey)."""
        self._run("UPDATE keks SET wrapped = ? WHERE version = ?", (wrapped, version))

    def retire_kek(self, version: int) -> None:
        """Retire a KEK version: state retired, wrapped material removed."""
        self._run("UPDATE keks SET state = 'retired', wrapped = NULL WHERE version = ?",
                  (version,))

    def count_wrap(self, kek_version: int, n: int = 1) -> None:
        """Count data keys wrapped under a KEK (NIST SP 800-38D usage limit)."""
        self._run("UPDATE keks SET wrap_count = wrap_count + ? WHERE version = ?",
                  (n, kek_version))

    def past_keys(self) -> list[tuple[int, bytes]]:
        """Vault keys of earlier epochs, each wrapped under the current vault key."""
        return [_typed(r, (int, bytes), "vault key record") for r in self._rows(
            "SELECT epoch, CAST(wrapped AS BLOB) FROM vault_keys ORDER BY epoch")]

    def set_past_keys(self, keys: Iterable[tuple[int, bytes]]) -> None:
        """Replace the stored vault keys of earlier epochs."""
        self._run("DELETE FROM vault_keys")
        try:
            self._conn.executemany("INSERT INTO vault_keys (epoch, wrapped) VALUES (?, ?)", keys)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def under_keks_below(self, below: int) -> tuple[int, int]:
        """(versions, credentials) whose data keys are wrapped under a KEK below ``below``."""
        versions, creds = self._rows(
            "SELECT count(*), count(DISTINCT credential_id) FROM secret_versions"
            " WHERE kek_version < ?", (below,))[0]
        return int(versions), int(creds)

    def rewrap_candidates(self, below: int, limit: int) -> list[tuple[int, str, VersionRow]]:
        """Up to ``limit`` versions under a KEK below ``below``: (head id, service, row)."""
        rows = self._rows(
            "SELECT v.credential_id, c.service, v.version, v.kek_version,"
            " CAST(v.wrapped_key AS BLOB), CAST(v.ciphertext AS BLOB), v.created_at, v.ttl,"
            " v.expires_at, CAST(v.digest AS BLOB) FROM secret_versions v JOIN credentials c"
            " ON c.id = v.credential_id WHERE v.kek_version < ? ORDER BY v.kek_version LIMIT ?",
            (below, limit))
        found = []
        for r in rows:
            if not isinstance(r[0], int) or not isinstance(r[1], str):
                raise IntegrityError("stored credential record holds a value of the wrong type "
                                     "(tampered?)", "column-type")
            found.append((r[0], r[1], VersionRow(*_typed(r[2:], _VERSION_TYPES,
                                                          "version record"))))
        return found

    def set_wrapped_keys(self, rows: Iterable[tuple[int, bytes, bytes, int, int]]) -> None:
        """Store re-wrapped data keys: (kek_version, wrapped_key, digest, head id, version)."""
        try:
            self._conn.executemany("UPDATE secret_versions SET kek_version = ?, wrapped_key = ?,"
                                   " digest = ? WHERE credential_id = ? AND version = ?", rows)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def set_versions_digests(self, rows: Iterable[tuple[bytes, int]]) -> None:
        """Store heads' new version digests: (versions_digest, head id)."""
        try:
            self._conn.executemany("UPDATE credentials SET versions_digest = ? WHERE id = ?",
                                   rows)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def set_root(self, kdf: str, verifier: bytes, vault_key: bytes, generation: int,
                 state_version: int = 1) -> None:
        """Record a new root key and key epoch: KDF parameters, verifier, wrapped vault key."""
        self._run("UPDATE vault SET kdf = ?, verifier = ?, vault_key = ?, generation = ?,"
                  " state_version = ? WHERE id = 1",
                  (kdf, verifier, vault_key, generation, state_version))

    # -- credentials ----------------------------------------------------------

    _HEAD = ("SELECT id, service, username, current_version, last_version, created_at, "
             "updated_at, CAST(mac AS BLOB), expires_at, CAST(versions_digest AS BLOB),"
             " CAST(refresh AS BLOB) FROM credentials")

    def bucket_rows(self, bucket: int) -> tuple[list[HeadRow], dict[int, list[VersionRow]]]:
        """A bucket's heads, and the kept versions of each, in one query."""
        heads: list[HeadRow] = []
        versions: dict[int, list[VersionRow]] = {}
        for r in self._rows(
                "SELECT c.id, c.service, c.username, c.current_version, c.last_version,"
                " c.created_at, c.updated_at, CAST(c.mac AS BLOB), c.expires_at,"
                " CAST(c.versions_digest AS BLOB), CAST(c.refresh AS BLOB), v.version,"
                " v.kek_version,"
                " CAST(v.wrapped_key AS BLOB), CAST(v.ciphertext AS BLOB), v.created_at, v.ttl,"
                " v.expires_at, CAST(v.digest AS BLOB) FROM credentials c LEFT JOIN"
                " secret_versions v ON v.credential_id = c.id WHERE c.bucket = ?"
                " ORDER BY c.service, c.username, v.version", (bucket,)):
            if not heads or heads[-1].id != r[0]:
                heads.append(HeadRow(*_typed(r[:11], _HEAD_TYPES, "credential record")))
                versions[r[0]] = []
            if r[11] is not None:
                versions[r[0]].append(VersionRow(*_typed(r[11:], _VERSION_TYPES,
                                                         "version record")))
        return heads, versions

    def heads_in_buckets(self, buckets: Iterable[int]) -> dict[int, list[HeadRow]]:
        """Every head of several buckets, each bucket's in (service, username) order."""
        found: dict[int, list[HeadRow]] = {b: [] for b in buckets}
        for r in self._rows_in(
                "SELECT bucket, id, service, username, current_version, last_version,"
                " created_at, updated_at, CAST(mac AS BLOB), expires_at,"
                " CAST(versions_digest AS BLOB), CAST(refresh AS BLOB) FROM credentials"
                " WHERE bucket IN ({})"
                " ORDER BY bucket, service, username", list(found)):
            found[r[0]].append(HeadRow(*_typed(r[1:], _HEAD_TYPES, "credential record")))
        return found

    def _rows_in(self, sql: str, keys: list[int]) -> Iterator[Any]:
        """Rows of ``sql`` whose ``IN ({})`` takes ``keys``, a few hundred at a time."""
        for chunk in _chunks(keys):
            # Only the number of placeholders varies; the values are bound.
            yield from self._rows(sql.format(",".join("?" * len(chunk))), tuple(chunk))

    def versions_of(self, head_ids: Iterable[int]) -> dict[int, list[VersionRow]]:
        """The kept versions of several credentials, each oldest first."""
        found: dict[int, list[VersionRow]] = {h: [] for h in head_ids}
        for r in self._rows_in(
                "SELECT credential_id, version, kek_version, CAST(wrapped_key AS BLOB),"
                " CAST(ciphertext AS BLOB), created_at, ttl, expires_at, CAST(digest AS BLOB)"
                " FROM secret_versions WHERE credential_id IN ({})"
                " ORDER BY credential_id, version", list(found)):
            found[r[0]].append(VersionRow(*_typed(r[1:], _VERSION_TYPES, "version record")))
        return found

    def new_head(self, service: str, username: str, bucket: int, now: float) -> HeadRow:
        """Insert the head of a credential that has never existed (no version yet)."""
        self._run("INSERT INTO credentials (service, username, current_version, last_version,"
                  " created_at, updated_at, mac, bucket) VALUES (?, ?, NULL, 0, ?, ?, X'', ?)",
                  (service, username, now, now, bucket))
        rows = self._rows(self._HEAD + " WHERE service = ? AND username = ?", (service, username))
        if not rows:  # inserted just above, in this transaction
            raise StorageError(f"vault database {self.path}: a new credential vanished")
        return HeadRow(*_typed(rows[0], _HEAD_TYPES, "credential record"))

    def update_head(self, head_id: int, current: int | None, last: int, now: float,
                    expires_at: float | None, versions_digest: bytes) -> None:
        """Move a credential's current and last version, its expiry and its version digest."""
        self._run("UPDATE credentials SET current_version = ?, last_version = ?, updated_at = ?,"
                  " expires_at = ?, versions_digest = ? WHERE id = ?",
                  (current, last, now, expires_at, versions_digest, head_id))

    def add_version(self, head_id: int, row: VersionRow) -> None:
        """Store a new version."""
        self._run("INSERT INTO secret_versions (credential_id, version, kek_version, wrapped_key,"
                  " ciphertext, created_at, ttl, expires_at, digest)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (head_id, *row))

    _VERSION = ("SELECT version, kek_version, CAST(wrapped_key AS BLOB),"
                " CAST(ciphertext AS BLOB), created_at, ttl, expires_at, CAST(digest AS BLOB)"
                " FROM secret_versions")

    def versions(self, head_id: int) -> list[VersionRow]:
        """Every kept version of a credential, oldest first."""
        return [VersionRow(*_typed(r, _VERSION_TYPES, "version record")) for r in self._rows(
            self._VERSION + " WHERE credential_id = ? ORDER BY version", (head_id,))]

    def prune(self, head_id: int, keep: int) -> int:
        """Delete all but the newest ``keep`` versions; returns how many went."""
        return self._run(
            "DELETE FROM secret_versions WHERE credential_id = ? AND version NOT IN"
            " (SELECT version FROM secret_versions WHERE credential_id = ?"
            "  ORDER BY version DESC LIMIT ?)", (head_id, head_id, keep))

    def purge(self, head_id: int) -> None:
        """Delete a credential and every version of it."""
        self._run("DELETE FROM credentials WHERE id = ?", (head_id,))

    def all_heads(self) -> Iterator[tuple[int | None, HeadRow]]:
        """Every head with its stored bucket, by service then username."""
        try:
            cur = self._conn.execute(
                "SELECT bucket, id, service, username, current_version, last_version,"
                " created_at, updated_at, CAST(mac AS BLOB), expires_at,"
                " CAST(versions_digest AS BLOB), CAST(refresh AS BLOB) FROM credentials"
                " ORDER BY service, username")
            while batch := cur.fetchmany(2048):
                for row in batch:
                    bucket = row[0] if isinstance(row[0], int) else None
                    yield bucket, HeadRow(*_typed(row[1:], _HEAD_TYPES, "credential record"))
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def all_versions(self) -> Iterator[tuple[int, VersionRow]]:
        """Every stored version with its credential id, by credential then version."""
        try:
            cur = self._conn.execute(
                "SELECT credential_id, version, kek_version, CAST(wrapped_key AS BLOB),"
                " CAST(ciphertext AS BLOB), created_at, ttl, expires_at, CAST(digest AS BLOB)"
                " FROM secret_versions ORDER BY credential_id, version")
            while batch := cur.fetchmany(2048):
                for row in batch:
                    if not isinstance(row[0], int):
                        raise IntegrityError("stored version record holds a value of the wrong"
                                             " type (tampered?)", "column-type")
                    yield row[0], VersionRow(*_typed(row[1:], _VERSION_TYPES, "version record"))
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def fill_state_columns(self, heads: Iterable[tuple[int, bytes, int]],
                           versions: Iterable[tuple[bytes, int, int]]) -> None:
        """Set (bucket, versions digest) of heads and the digest of versions (upgrade)."""
        try:
            self._conn.executemany("UPDATE credentials SET bucket = ?, versions_digest = ?,"
                                   " mac = X'' WHERE id = ?", heads)
            self._conn.executemany("UPDATE secret_versions SET digest = ?"
                                   " WHERE credential_id = ? AND version = ?", versions)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def counts(self) -> dict[str, int]:
        """Numbers for ``status``."""
        live, deleted = self._rows(
            "SELECT count(current_version), count(*) - count(current_version) FROM credentials")[0]
        versions, = self._rows("SELECT count(*) FROM secret_versions")[0]
        events, = self._rows("SELECT count(*) FROM audit_events")[0]
        return {"credentials": live, "deleted": deleted, "versions": versions,
                "audit_events": events}

    def keys_in_use(self) -> dict[int, int]:
        """How many stored versions each KEK version wraps."""
        return {k: n for k, n in self._rows(
            "SELECT kek_version, count(*) FROM secret_versions GROUP BY kek_version")}

    def schema(self) -> list[str]:
        """Names of the applied migrations."""
        return [r[0] for r in self._rows("SELECT name FROM schema_migrations ORDER BY name")]

    # -- the state tree -------------------------------------------------------

    def nodes(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Stored state nodes by (level, index); absent ones are left out."""
        wanted_keys = list(keys)
        found = {}
        if len(wanted_keys) <= 8:  # one path: one query
            where = " OR ".join("(level = ? AND idx = ?)" for _ in wanted_keys)
            for level, idx, blob in self._rows(
                    # Only the number of placeholders varies.
                    "SELECT level, idx, CAST(hashes AS BLOB) FROM state_nodes"  # noqa: S608
                    f" WHERE {where}", tuple(v for key in wanted_keys for v in key)):
                if not (isinstance(level, int) and isinstance(idx, int)
                        and isinstance(blob, bytes)):
                    raise IntegrityError("a stored state node holds a value of the wrong type "
                                         "(tampered?)", "column-type")
                found[(level, idx)] = blob
            return found
        by_level: dict[int, list[int]] = {}
        for level, idx in wanted_keys:
            by_level.setdefault(level, []).append(idx)
        for level, wanted in by_level.items():
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                for idx, blob in self._rows(
                        # Only the number of placeholders varies.
                        "SELECT idx, CAST(hashes AS BLOB) FROM state_nodes"  # noqa: S608
                        f" WHERE level = ? AND idx IN ({marks})", (level, *chunk)):
                    if not (isinstance(idx, int) and isinstance(blob, bytes)):
                        raise IntegrityError("a stored state node holds a value of the wrong "
                                             "type (tampered?)", "column-type")
                    found[(level, idx)] = blob
        return found

    def put_nodes(self, nodes: Mapping[tuple[int, int], bytes | None]) -> None:
        """Store changed state nodes; None (or an all-empty node) removes one."""
        keep = [(level, idx, blob) for (level, idx), blob in nodes.items()
                if blob is not None and blob.count(0) != len(blob)]
        drop = [(level, idx) for (level, idx), blob in nodes.items()
                if blob is None or blob.count(0) == len(blob)]
        try:
            self._conn.executemany("INSERT OR REPLACE INTO state_nodes (level, idx, hashes)"
                                   " VALUES (?, ?, ?)", keep)
            if drop:
                self._conn.executemany("DELETE FROM state_nodes WHERE level = ? AND idx = ?",
                                       drop)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def clear_nodes(self) -> None:
        """Remove every state node (before a rebuild from scratch)."""
        self._run("DELETE FROM state_nodes")

    # -- audit ----------------------------------------------------------------

    _EVENT = ("SELECT seq, ts_us, actor, op, service, username, outcome, key_version, reason,"
              " CAST(mac AS BLOB), epoch, CAST(root AS BLOB) FROM audit_events")

    def audit_anchor(self) -> tuple[int, bytes]:
        """The (seq, mac) that the oldest kept event follows."""
        rows = self._rows("SELECT seq, CAST(mac AS BLOB) FROM audit_anchor WHERE id = 1")
        if not rows:
            raise IntegrityError("audit anchor is missing", "audit-anchor")
        seq, mac = _typed(rows[0], (int, bytes), "audit anchor")
        return seq, mac

    def audit_head(self) -> tuple[int, bytes]:
        """The (seq, mac) of the newest event, or the anchor when there is none."""
        rows = self._rows("SELECT seq, CAST(mac AS BLOB) FROM audit_events"
                          " ORDER BY seq DESC LIMIT 1")
        if not rows:
            return self.audit_anchor()
        seq, mac = _typed(rows[0], (int, bytes), "audit event")
        return seq, mac

    def newest_events(self, n: int = 2) -> list[Event]:
        """The ``n`` newest events, newest first."""
        return [Event(*_typed(r, _EVENT_TYPES, f"audit event {r[0]}")) for r in self._rows(
            self._EVENT + " ORDER BY seq DESC LIMIT ?", (n,))]

    def event(self, seq: int) -> Event | None:
        """One event by its sequence number."""
        rows = self._rows(self._EVENT + " WHERE seq = ?", (seq,))
        return Event(*_typed(rows[0], _EVENT_TYPES, f"audit event {seq}")) if rows else None

    def append_event(self, event: Event) -> None:
        """Insert one chained event (inside the caller's transaction)."""
        self._run(_INSERT_EVENT, event)

    def events(self, after: int = 0, through: int | None = None,
               newest_first: bool = False) -> Iterator[Event]:
        """Events with ``after < seq <= through``, fetched in batches."""
        order = "DESC" if newest_first else "ASC"
        try:
            cur = self._conn.execute(
                self._EVENT + f" WHERE seq > ? AND seq <= ? ORDER BY seq {order}",
                (after, through if through is not None else 2**62))
            while batch := cur.fetchmany(2048):
                for row in batch:
                    yield Event(*_typed(row, _EVENT_TYPES, f"audit event {row[0]}"))
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def last_event(self, op: str) -> Event | None:
        """The newest successful event of an operation."""
        rows = self._rows(self._EVENT + " WHERE op = ? AND outcome = 'ok' ORDER BY seq DESC"
                          " LIMIT 1", (op,))
        return Event(*_typed(rows[0], _EVENT_TYPES, "audit event")) if rows else None

    def events_before(self, ts_us: int) -> int:
        """The seq of the newest event older than ``ts_us`` (0 if none)."""
        rows = self._rows("SELECT max(seq) FROM audit_events WHERE ts_us < ?", (ts_us,))
        return rows[0][0] or 0

    def drop_events_through(self, seq: int, mac: bytes) -> None:
        """Delete events up to ``seq`` and make ``(seq, mac)`` the anchor."""
        self._run("DELETE FROM audit_events WHERE seq <= ?", (seq,))
        self._run("UPDATE audit_anchor SET seq = ?, mac = ? WHERE id = 1", (seq, mac))

    def add_pending(self, ts_us: int, actor: str, op: str, outcome: str,
                    reason: str | None) -> None:
        """Record an event that cannot be chained yet (its own transaction)."""
        with self.transaction():
            self._run("INSERT INTO audit_pending (ts_us, actor, op, outcome, reason)"
                      " VALUES (?, ?, ?, ?, ?)", (ts_us, actor, op, outcome, reason))

    def has_pending(self) -> bool:
        """Whether failed unlocks wait to be chained."""
        return bool(self._rows("SELECT 1 FROM audit_pending LIMIT 1"))

    def take_pending(self, limit: int) -> list[tuple[Any, ...]]:
        """Remove and return up to ``limit`` waiting rows, oldest first (inside a transaction).

        The rows are returned as stored, unchecked: nothing authenticates
        them, and the caller validates every field.
        """
        rows = self._rows("SELECT id, ts_us, actor, op, outcome, reason FROM audit_pending"
                          " ORDER BY id LIMIT ?", (limit,))
        try:
            self._conn.executemany("DELETE FROM audit_pending WHERE id = ?",
                                   [(r[0],) for r in rows])
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        return [tuple(r[1:]) for r in rows]

    def savepoint(self) -> None:
        """Open a savepoint inside the current transaction."""
        self._run("SAVEPOINT op")

    def release_savepoint(self) -> None:
        """Keep what was done since :meth:`savepoint`."""
        self._run("RELEASE op")

    def rollback_savepoint(self) -> None:
        """Undo what was done since :meth:`savepoint`, keeping the transaction open."""
        self._run("ROLLBACK TO op")
        self._run("RELEASE op")

    def checkpoint(self) -> bool:
        """Fold the WAL into the database and truncate it; False if a reader blocked it.

        Deleted rows are zeroed in the database file (``secure_delete``),
        but their old page images stay in the WAL until a checkpoint copies
        the newer pages over them and truncates it; another connection
        reading an older snapshot prevents that.
        """
        # A reader would make the checkpoint wait the whole busy timeout; a
        # short wait here, and the caller retries a few times instead.
        self._rows("PRAGMA busy_timeout = 100")
        try:
            busy, _log, _done = self._rows("PRAGMA wal_checkpoint(TRUNCATE)")[0]
        finally:
            self._rows(f"PRAGMA busy_timeout = {self._busy_ms:d}")
        return int(busy) == 0

    def residue(self, what: str) -> str:
        """What stays on disk when :meth:`checkpoint` was blocked (told to the user)."""
        return (f"the {what} is done, but another process reading the vault kept the "
                f"deleted data's old pages in {self.path}-wal (and {self.path}); they are "
                "overwritten at the next checkpoint after that process finishes its read "
                "(any later purge makes one)")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every read inside sees one consistent state."""
        try:
            self._conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        try:
            yield
        finally:
            if self._conn.in_transaction:
                self._conn.rollback()

    # -- backup and restore (issue 14) ------------------------------------------

    def backup_to(self, target: Path) -> None:
        """Copy this database, as one consistent snapshot, into a new file at ``target``.

        SQLite's online backup API, from this connection, in one step: it
        reads one snapshot (WAL: writers in other processes go on, and the
        copy holds every commit made before it began, none half). No other
        descriptor of ``vault.db`` is opened, so no POSIX lock of this
        process is dropped (see :func:`_held_descriptor`). The copy is made
        a rollback-journal database: one self-contained file, with no
        ``-wal`` to lose. ``target`` must not exist; it is created 0600
        without following links.
        """
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot create backup file {target}: {exc.strerror}") from None
        try:
            copy = sqlite3.connect(target, isolation_level=None)
            try:
                self._conn.backup(copy)
                crash_point("backup-after-copy")
                copy.execute("PRAGMA journal_mode = DELETE")
            finally:
                copy.close()
            fsync_file(target)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        except OSError as exc:
            raise StorageError(f"cannot write backup file {target}: {exc.strerror}") from None

    @classmethod
    def open_copy(cls, path: Path, synchronous: str = "normal", busy_timeout: float = 10.0
                  ) -> SQLiteStorage:
        """Open a private copy of a vault (a backup being checked or restored).

        Like :meth:`open`, but the header is checked through a descriptor
        closed *before* SQLite opens the file: the copy is this process's
        own file, so no lock can be lost, and no descriptor stays held.
        """
        from ._files import open_trusted
        from .errors import ConfigError

        try:
            fd = open_trusted(path, "vault copy")
        except FileNotFoundError:
            raise VaultMissingError(f"no vault copy at {path}") from None
        except OSError as exc:
            raise StorageError(f"vault copy {path} cannot be read: {exc.strerror}") from None
        try:
            header = os.pread(fd, 100, 0)
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise StorageError(f"vault copy {path} cannot be read: {exc.strerror}") from None
        finally:
            os.close(fd)
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
            raise IntegrityError(f"{path} is not a keyring-hardened vault (empty, truncated or "
                                 "foreign file)", "copy-header")
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        if pages and header[24:28] == header[92:96] and size < pages * page_size:
            raise IntegrityError(f"vault copy {path} is truncated ({size} of "
                                 f"{pages * page_size} bytes)", "copy-truncated")
        try:
            _check_companions(path)
        except ConfigError as exc:
            raise IntegrityError(str(exc), "copy-companion") from None
        return cls._connected(path, synchronous, busy_timeout)

    def use_wal(self) -> None:
        """Switch this (private, unshared) database to WAL, as every live vault is."""
        self._rows("PRAGMA journal_mode = WAL")
        self._rows("PRAGMA wal_checkpoint(TRUNCATE)")

    def _schema_rows(self, schema: str) -> list[tuple[str, str, str]]:
        # Only the schema name varies, and it is one of ours ("main", "src").
        return [tuple(r) for r in self._rows(
            f"SELECT type, name, sql FROM {schema}.sqlite_master"  # noqa: S608
            " WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY type != 'table', name")]

    def replace_with(self, source: Path, keep: Path, expect_root: bytes | None,
                     key_version: int) -> None:
        """Make this vault's rows those of ``source``, in one transaction; keep the old ones.

        Why rows and not a file rename: other processes may hold
        ``vault.db`` open. After a rename they would go on writing to the
        unlinked inode (acknowledged writes lost), and a ``-wal`` left by
        the old file could be replayed onto the new one. A transaction on
        the same file is what every other connection already knows how to
        wait for: their writes queue on SQLite's lock (busy timeout) and
        then see the restored rows; their readers finish on their snapshot.

        ``keep`` (a new, absent file) receives the replaced rows in the
        same transaction, so what was replaced is exactly what is kept.
        ``expect_root`` is the state root of the newest event the caller
        checked: if another process changed the vault since (reads change
        no root), nothing is changed (None: the caller accepts a rollback,
        and writes made meanwhile are kept in ``keep`` like the rest).
        ``key_version`` is the newest KEK version the caller saw: a rotation
        since (which the copy's keys would not step past) also changes
        nothing.
        """
        import stat as stat_

        try:
            fd = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_NOFOLLOW", 0), 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot create {keep}: {exc.strerror}") from None
        tables = [name for kind, name, _ in self._schema_rows("main") if kind == "table"]
        try:
            old = sqlite3.connect(keep, isolation_level=None)
            try:
                old.execute("PRAGMA journal_mode = DELETE")
                old.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                for _kind, _name, sql in self._schema_rows("main"):
                    old.execute(sql)
                version, = self._rows("PRAGMA user_version")[0]
                old.execute(f"PRAGMA user_version = {int(version)}")
            finally:
                old.close()
        except sqlite3.Error as exc:
            raise _translate(exc, keep) from None
        if not stat_.S_ISREG(os.lstat(source).st_mode):
            raise StorageError(f"{source} is not a regular file")
        import urllib.parse

        uri = f"file:{urllib.parse.quote(os.fsencode(source.absolute()))}?mode=ro"
        keep_uri = f"file:{urllib.parse.quote(os.fsencode(keep.absolute()))}?mode=rw"
        self._run("ATTACH DATABASE ? AS src", (uri,))
        try:
            self._run("ATTACH DATABASE ? AS old", (keep_uri,))
            try:
                if self._schema_rows("src") != self._schema_rows("main"):
                    raise IntegrityError(f"{source} has another schema than this vault; "
                                         "nothing was changed", "copy-schema")
                with self.transaction():
                    newest = max((k.version for k in self.keks()), default=0)
                    head = self.newest_events(1)
                    if (expect_root is not None and (not head or head[0].root != expect_root)) \
                            or newest != key_version:
                        raise StorageError("the vault changed while it was being restored "
                                           "(another process wrote to it); nothing was "
                                           "changed: run restore again", "restore-raced")
                    # Checked at commit: rows go in parents-last order otherwise.
                    self._run("PRAGMA defer_foreign_keys = ON")
                    for table in tables:
                        # Table names come from the vault's own schema, compared above.
                        self._run(f'INSERT INTO old."{table}" SELECT * FROM main."{table}"')  # noqa: S608
                    crash_point("restore-before-swap")
                    for table in tables:
                        self._run(f'DELETE FROM main."{table}"')  # noqa: S608
                        self._run(f'INSERT INTO main."{table}" SELECT * FROM src."{table}"')  # noqa: S608
                    crash_point("restore-before-commit")
            finally:
                self._run("DETACH DATABASE old")
        finally:
            self._run("DETACH DATABASE src")
        fsync_file(keep)

    # -- refresh (refresh.py) ------------------------------------------------

    def set_refresh(self, head_id: int, blob: bytes | None) -> None:
        """Store a credential's refresher and refresh state (the caller re-roots the state)."""
        self._run("UPDATE credentials SET refresh = ? WHERE id = ?", (blob, head_id))

    def set_version_ttl(self, head_id: int, version: int, ttl: float | None,
                        expires_at: float | None, digest: bytes) -> None:
        """Change a stored version's TTL and expiry, with its new digest."""
        self._run("UPDATE secret_versions SET ttl = ?, expires_at = ?, digest = ?"
                  " WHERE credential_id = ? AND version = ?",
                  (ttl, expires_at, digest, head_id, version))

    def refresh_hints(self) -> list[tuple[Any, ...]]:
        """(id, service, username, current, expires_at, refresh) of each head with a refresher.

        Unauthenticated: callers only pick candidates from it.
        """
        return self._rows("SELECT id, service, username, current_version, expires_at,"
                          " CAST(refresh AS BLOB) FROM credentials WHERE refresh IS NOT NULL"
                          " ORDER BY service, username")

    def expired_count(self, now: float) -> int:
        """Live credentials whose current version expired at ``now`` (for ``status``)."""
        found, = self._rows("SELECT count(*) FROM credentials WHERE current_version IS NOT NULL"
                            " AND expires_at IS NOT NULL AND expires_at <= ?", (now,))[0]
        return int(found)

    def current_hint(self, head_id: int) -> Any:
        """A head's current version as stored, unchecked (a waiter's cue to read again)."""
        rows = self._rows("SELECT current_version FROM credentials WHERE id = ?", (head_id,))
        return rows[0][0] if rows else None

    def lease(self, head_id: int) -> tuple[Any, ...] | None:
        """The refresh lease of a credential: (holder, token, base version, expires_at)."""
        rows = self._rows("SELECT holder, CAST(token AS BLOB), base_version, expires_at"
                          " FROM refresh_leases WHERE credential_id = ?", (head_id,))
        return tuple(rows[0]) if rows else None

    def put_lease(self, head_id: int, holder: str, token: bytes, base: int,
                  expires_at: float) -> None:
        """Take (or take over) a credential's refresh lease."""
        self._run("INSERT OR REPLACE INTO refresh_leases (credential_id, holder, token,"
                  " base_version, expires_at) VALUES (?, ?, ?, ?, ?)",
                  (head_id, holder, token, base, expires_at))

    def drop_lease(self, head_id: int, token: bytes) -> None:
        """Give up a lease, if it is still the one holding ``token``."""
        self._run("DELETE FROM refresh_leases WHERE credential_id = ? AND token = ?",
                  (head_id, token))


def _chunks(items: list[int], size: int = 500) -> Iterator[list[int]]:
    """Slices small enough for SQLite's limit on placeholders."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


_INSERT_EVENT = ("INSERT INTO audit_events (seq, ts_us, actor, op, service, username, outcome,"
                 " key_version, reason, mac, epoch, root) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                 " ?, ?)")


def _apply_migrations(conn: sqlite3.Connection) -> None:
    """Apply pending migrations inside the caller's write transaction.

    ``MIGRATIONS`` is read from this module at call time: a test may add one.
    """
    apply_migrations(conn, MIGRATIONS)


_SQLITE_MAGIC = b"SQLite format 3\x00"


#: Descriptors of vault databases this process opened, by (device, inode): never
#: closed. Closing *any* descriptor of a file drops every POSIX lock the process
#: holds on it, SQLite's included (it locks through descriptors of its own):
#: another process would then believe nobody has the database open and delete
#: its WAL, and commits made here afterwards would be lost (SQLite's "How To
#: Corrupt An SQLite Database File", section 2.2.1). So the header check reuses
#: one descriptor per file for the life of the process.
_HELD: dict[tuple[int, int], int] = {}
_HELD_LOCK = threading.Lock()


def _held_descriptor(path: Path) -> int:
    """A descriptor of ``path`` that is never closed, checked as a trusted file."""
    from ._files import open_trusted, trust_problem
    from .errors import ConfigError

    st = os.lstat(path)
    with _HELD_LOCK:
        fd = _HELD.get((st.st_dev, st.st_ino))
        if fd is not None:
            # The same file as before: check it again through the descriptor.
            problem = trust_problem(os.fstat(fd), path, "vault database")
            if problem:
                raise ConfigError(problem)
            return fd
        fd = open_trusted(path, "vault database")
        held = os.fstat(fd)
        _HELD[(held.st_dev, held.st_ino)] = fd
        return fd


def _check_header(path: Path) -> None:
    """Refuse a missing, empty, foreign or truncated database file before SQLite reads it.

    SQLite happily opens a zero-length file as an empty database, and reads
    a truncated one until it reaches a missing page. The header records the
    database size in pages (valid when the change counter matches the
    version-valid-for number), so a file shorter than that is truncated.
    """
    try:
        # Not followed if a link, never blocking on a FIFO, a regular file
        # owned by the user or root and closed to group and others: someone
        # else's vault.db would receive the secrets written to it.
        fd = _held_descriptor(path)
    except FileNotFoundError:
        raise VaultMissingError(f"no vault at {path.parent} (run: keyring-hardened init)") from None
    except OSError as exc:
        raise StorageError(f"vault database {path} cannot be read: {exc.strerror}") from None
    try:
        header = os.pread(fd, 100, 0)
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise StorageError(f"vault database {path} cannot be read: {exc.strerror}") from None
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise IntegrityError(f"{path} is not a keyring-hardened vault (empty, truncated or "
                             "foreign file); refusing to use or re-initialise it")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    change_counter = int.from_bytes(header[24:28], "big")
    pages = int.from_bytes(header[28:32], "big")
    valid_for = int.from_bytes(header[92:96], "big")
    if pages and change_counter == valid_for and size < pages * page_size:
        raise IntegrityError(f"vault database {path} is truncated ({size} of "
                             f"{pages * page_size} bytes); restore it from a backup")
