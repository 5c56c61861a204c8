"""PostgreSQL storage: a vault shared by many hosts, and the only module that imports psycopg.

:class:`PostgresStorage` implements the storage port
(:class:`keyring_hardened.port.Storage`) over psycopg 3, on the tables of
:mod:`keyring_hardened.pgschema`. It is opened through
:class:`PostgresEngine`, which :func:`keyring_hardened.engines.engine` picks
when ``[storage] url`` (or ``KEYRING_HARDENED_STORAGE_URL``) names a
``postgresql://`` database. Nothing secret reaches the server in the clear:
it stores the same opaque wrapped keys, ciphertexts and macs as SQLite, and
the root key never leaves the client.

Concurrency (docs/teams.md):

* **One lock, taken first.** Every write transaction starts with a
  transaction-scoped advisory lock on the vault (its schema): the chain
  head's lock. Every write appends one event to one hash chain and moves one
  state root, so writes to one vault are serial by nature; the rate-limit
  buckets and refresh leases they touch are rows written under that lock.
  With one lock, always taken before any row lock, no two writers can wait
  on each other in a cycle: no deadlock can arise.
* **Read committed after the lock.** Each statement then sees every commit
  made before the lock was granted, as SQLite's ``BEGIN IMMEDIATE`` does.
* **Readers never block.** :meth:`PostgresStorage.snapshot` is a read-only
  repeatable-read transaction: it takes no lock and sees one state.
* **Transient failures** (a serialization failure, a deadlock report, a
  dropped connection, a server shutting down) surface as
  :class:`~keyring_hardened.errors.StorageError` with reason ``transient``:
  the session runs the whole operation again, within the busy timeout. A
  connection lost *during* ``COMMIT`` is not retried: its outcome is
  unknown, and the error says so (reason ``commit-unknown``).

The database password never appears in a message: the URL is shown without
it (see :func:`display_url`), and the driver's messages are cut to their
first line with the password taken out.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .audit import Event
from .errors import ConfigError, HardenedError, IntegrityError, StorageError, UsageError
from .pgschema import PG_MIGRATIONS, TABLES, apply_pg_migrations
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
from .schema import APPLICATION_ID, TABLE_COLUMNS, TABLE_KEYS

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresEngine", "PostgresStorage", "display_url"]

#: SQLSTATE classes and codes worth running the operation again for.
_TRANSIENT_STATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})

#: Signs, in libpq's connection errors, of a server that is away for now.
_AWAY = ("Connection refused", "No such file or directory", "the database system is",
         "timeout expired", "server closed the connection", "could not receive data",
         "Connection reset", "terminating connection")

_INSERT_EVENT = ("INSERT INTO audit_events (seq, ts_us, actor, op, service, username, outcome,"
                 " key_version, reason, mac, epoch, root) VALUES (%s, %s, %s, %s, %s, %s, %s,"
                 " %s, %s, %s, %s, %s)")

_HEAD_COLUMNS = ("id, service, username, current_version, last_version, created_at,"
                 " updated_at, mac, expires_at, versions_digest, refresh")
_VERSION_COLUMNS = ("version, kek_version, wrapped_key, ciphertext, created_at, ttl,"
                    " expires_at, digest")
_EVENT = ("SELECT seq, ts_us, actor, op, service, username, outcome, key_version, reason,"
          " mac, epoch, root FROM audit_events")


def display_url(url: str) -> str:
    """The URL as messages and ``status`` show it: user, host, port and database, no password.

    Parsed by libpq's own rules (psycopg's ``conninfo_to_dict``), so a
    password given as a parameter (``?password=``) is left out as surely as
    one in the authority part.
    """
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - a malformed URL: show nothing of it
        return "postgresql://(unparsable URL)"
    user = parts.get("user")
    host = parts.get("host") or "localhost"
    port = parts.get("port")
    where = f"{host}:{port}" if port else str(host)
    if str(host).startswith("/"):
        where = f"[{where}]"  # a socket directory
    name = parts.get("dbname") or ""
    return f"postgresql://{str(user) + '@' if user else ''}{where}/{name}"


class PostgresEngine:
    """Opens and creates vaults in one PostgreSQL database (or schema)."""

    def __init__(self, url: str, password: Callable[[], str | None] | None = None) -> None:
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(url)
        except Exception:  # noqa: BLE001 - libpq's message repeats the URL: never shown
            raise ConfigError("the storage URL is not a valid PostgreSQL URL (libpq cannot "
                              "parse it); check its quoting and percent-escapes") from None
        self.url = url
        self.where = display_url(url)
        self._password = password
        self._secret: str | None = None

    def __repr__(self) -> str:
        return f"PostgresEngine({self.where!r})"

    # -- connecting -----------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """The first line of a driver message, without the password if it is in it."""
        line = (text.strip().splitlines() or [""])[0][:300]
        for secret in (self._secret, _url_password(self.url)):
            if secret:
                line = line.replace(secret, "***")
        return line

    def connect(self, busy_timeout: float) -> psycopg.Connection[Any]:
        """A new autocommit connection, retried within ``busy_timeout`` while the server is away."""
        import psycopg

        kwargs: dict[str, Any] = {
            "autocommit": True, "application_name": "keyring-hardened",
            "connect_timeout": max(1, min(30, int(busy_timeout))),
            # A peer that vanishes (a partition, a host gone) is noticed by
            # TCP: probes on an idle connection, and a bound on unacknowledged
            # data, instead of a wait as long as the operating system's.
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 3, "tcp_user_timeout": 30_000}
        if "require_auth" not in self.url and psycopg.pq.version() >= 160000:
            # Never send the password in clear text, whatever the server asks:
            # a server in the middle of a connection without verify-full would
            # get it (trust, peer, SCRAM, md5 and certificates still work).
            kwargs["require_auth"] = "!password"
        if self._password is not None:
            if self._secret is None:
                self._secret = self._password()
            if self._secret:
                kwargs["password"] = self._secret
        deadline = time.monotonic() + busy_timeout
        delay = 0.05
        while True:
            try:
                conn = psycopg.connect(self.url, **kwargs)
                break
            except psycopg.Error as exc:
                message = self._scrub(str(exc))
                # Only a server that is away (down, restarting, starting up)
                # is waited for; a refusal (password, certificate, no such
                # database) is the same on every try.
                if not any(sign in message for sign in _AWAY) \
                        or time.monotonic() + delay > deadline:
                    raise StorageError(f"PostgreSQL vault at {self.where}: cannot connect: "
                                       f"{message}") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        try:
            # A lock wait as long as SQLite's busy timeout; a client that
            # stops mid-transaction (stopped, partitioned) releases the chain
            # lock after a minute instead of holding every other host.
            conn.execute(f"SET lock_timeout = {int(busy_timeout * 1000):d}; "
                         "SET idle_in_transaction_session_timeout = 60000")
            # One schema for every name, and the lock keyed on it: the one
            # that holds the vault, else the first of the search path (where
            # init makes it). A search path that falls through to another
            # schema's tables would otherwise write under another lock.
            conn.execute(
                "SELECT set_config('search_path', quote_ident(coalesce((SELECT n.nspname"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.oid = to_regclass('vault')), current_schema())), false)")
        except psycopg.Error as exc:
            conn.close()
            raise StorageError(f"PostgreSQL vault at {self.where}: {self._scrub(str(exc))}"
                               ) from None
        return conn

    # -- the Engine port --------------------------------------------------------

    def open(self, path: Path, synchronous: str = "normal", busy_timeout: float = 10.0
             ) -> PostgresStorage:
        """Open the vault in the database, applying pending migrations.

        ``path`` (the home's SQLite file) is not used: the URL says where.
        Raises :class:`VaultMissingError` when the database holds no vault.
        """
        storage = PostgresStorage(self, self.connect(busy_timeout), busy_timeout, synchronous)
        try:
            storage.check_and_migrate()
        except BaseException:
            storage.close()
            raise
        return storage

    def open_copy(self, path: Path, synchronous: str = "normal", busy_timeout: float = 10.0
                  ) -> PostgresStorage:
        """Refused: a vault copy (backup) is a SQLite file, checked by the SQLite engine."""
        raise UsageError("a PostgreSQL vault has no file copies; use migrate-storage --to "
                         "sqlite:///FILE for a copy, and PostgreSQL's own backups",
                         "engine-refused")

    def exists(self, busy_timeout: float = 10.0) -> bool:
        """Whether the database holds a vault (connecting to find out)."""
        try:
            self.open(Path(), busy_timeout=busy_timeout).close()
        except VaultMissingError:
            return False
        return True

    def create(self, path: Path, vault: VaultRecord, kek: KekRecord, event: Event,
               nodes: Mapping[tuple[int, int], bytes]) -> bool:
        """Create a complete vault atomically (one transaction, DDL included).

        Returns False, changing nothing, when the database already holds one.
        """
        storage = PostgresStorage(self, self.connect(10.0), 10.0, "normal")
        try:
            with storage.transaction():
                if storage.table_exists("vault"):
                    return False
                storage.refuse_foreign_tables()
                storage.call(apply_pg_migrations)
                storage.run("INSERT INTO vault (id, vault_id, created_at, kdf, verifier,"
                            " vault_key, generation, state_version)"
                            " VALUES (1, %s, %s, %s, %s, %s, %s, %s)", tuple(vault))
                storage.add_kek(kek)
                storage.put_nodes(nodes)
                storage.append_event(event)
            return True
        finally:
            storage.close()

    def discard(self, path: Path) -> None:
        """Remove a vault that ``create_from`` made and its check refused (migrate-storage)."""
        storage = PostgresStorage(self, self.connect(10.0), 10.0, "normal")
        try:
            with storage.transaction():
                for table in reversed(TABLES):
                    # Names from pgschema's constant list, never from input.
                    storage.run(f"DROP TABLE IF EXISTS {table} CASCADE")
        finally:
            storage.close()

    def create_from(self, path: Path, rows: Mapping[str, list[tuple[Any, ...]]]) -> bool:
        """Create a vault holding exactly ``rows`` (migrate-storage), in one transaction.

        Returns False, changing nothing, when the database already holds a vault.
        """
        storage = PostgresStorage(self, self.connect(10.0), 10.0, "normal")
        try:
            with storage.transaction():
                if storage.table_exists("vault"):
                    return False
                storage.refuse_foreign_tables()
                storage.call(apply_pg_migrations)
                for table, columns in TABLE_COLUMNS.items():
                    # Names from the constant map, never from input.
                    storage.run(f"DELETE FROM {table}")  # noqa: S608 - the anchor's default row
                    storage.insert_many(
                        f"INSERT INTO {table} ({', '.join(columns)}) OVERRIDING SYSTEM VALUE"  # noqa: S608
                        f" VALUES ({', '.join(['%s'] * len(columns))})", rows.get(table, []))
                for table in ("credentials", "audit_pending"):
                    # Identity columns given explicitly: the next one made must follow them.
                    storage.run(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"  # noqa: S608
                                f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)")
            return True
        finally:
            storage.close()


def _url_password(url: str) -> str | None:
    """The password a URL carries, by libpq's parsing or, failing that, by URL syntax."""
    from urllib.parse import parse_qs, unquote, urlsplit

    from psycopg.conninfo import conninfo_to_dict

    value: Any = None
    with contextlib.suppress(Exception):  # a malformed URL: try plain URL syntax below
        value = conninfo_to_dict(url).get("password")
    if value:
        return str(value)
    try:
        parts = urlsplit(url)
        found = parts.password or next(iter(parse_qs(parts.query).get("password", [])), None)
    except ValueError:
        return None
    return unquote(found) if found else None


class PostgresStorage:
    """One connection to a vault in PostgreSQL."""

    #: Deleted rows do not leave PostgreSQL's files at once (see :meth:`residue`).
    erases = False

    def __init__(self, engine: PostgresEngine, conn: psycopg.Connection[Any],
                 busy_timeout: float, synchronous: str) -> None:
        self._engine = engine
        self._conn = conn
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self.where = engine.where
        self._lock_key: int | None = None

    def __repr__(self) -> str:
        return f"PostgresStorage({self.where!r})"

    # -- plumbing ----------------------------------------------------------------

    def _error(self, exc: Exception, committing: bool = False) -> HardenedError:
        """Map a psycopg error to the error class a caller can act on."""
        import psycopg
        from psycopg import errors as pg

        state = getattr(exc, "sqlstate", None) or ""
        text = self._engine._scrub(str(exc))
        lost = self._conn.closed or self._conn.broken
        if committing and (lost or isinstance(exc, psycopg.OperationalError)):
            return StorageError(f"PostgreSQL vault at {self.where}: the connection was lost "
                                "while committing; the outcome of this change is unknown "
                                "(check with history)", "commit-unknown")
        if state in _TRANSIENT_STATES or lost:
            return StorageError(f"PostgreSQL vault at {self.where}: {text}", "transient")
        if isinstance(exc, pg.LockNotAvailable):
            return StorageError(f"PostgreSQL vault at {self.where} is busy: another client held "
                                "it longer than the busy timeout; try again")
        if isinstance(exc, pg.UndefinedTable | pg.UndefinedColumn | psycopg.IntegrityError):
            return IntegrityError(f"vault database {self.where} is damaged ({state}); restore "
                                  "it from a backup")
        if isinstance(exc, pg.InsufficientPrivilege):
            return StorageError(f"PostgreSQL vault at {self.where}: permission denied ({text})")
        if isinstance(exc, psycopg.OperationalError):
            return StorageError(f"PostgreSQL vault at {self.where}: {text}", "transient")
        return StorageError(f"PostgreSQL vault at {self.where}: {type(exc).__name__}: {text}")

    def _ensure(self) -> None:
        """Reconnect after a dropped connection (outside any transaction)."""
        if self._conn.closed or self._conn.broken:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = self._engine.connect(self._busy_timeout)

    def rows(self, sql: str, params: Any = None) -> list[Any]:
        """Every row of one statement."""
        import psycopg

        try:
            return self._conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def run(self, sql: str, params: Any = None) -> int:
        """Run one statement; the number of rows it changed."""
        import psycopg

        try:
            return self._conn.execute(sql, params).rowcount
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def insert_many(self, sql: str, rows: Iterable[Any]) -> None:
        """Run one statement for each row (bulk copies)."""
        self._many(sql, rows)

    def export_rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of one of the vault's tables (``schema.TABLE_COLUMNS``), in key order."""
        columns = TABLE_COLUMNS[table]
        keys = columns[:TABLE_KEYS.get(table, 1)]
        return [tuple(r) for r in self.rows(
            f"SELECT {', '.join(columns)} FROM {table} ORDER BY {', '.join(keys)}")]  # noqa: S608

    def _many(self, sql: str, rows: Iterable[Any]) -> None:
        import psycopg

        batch = list(rows)
        if not batch:
            return
        try:
            with self._conn.cursor() as cur:
                cur.executemany(sql, batch)
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def call(self, fn: Callable[[Any], None], creating: bool = True) -> None:
        """Run ``fn(connection)`` (schema work), mapping driver errors.

        ``creating``: a new vault, where a table of ours already there is
        someone else's; else a pending migration, where it is damage.
        """
        import psycopg

        try:
            fn(self._conn)
        except (psycopg.errors.DuplicateTable, psycopg.errors.DuplicateColumn) as exc:
            if not creating:
                raise IntegrityError(f"vault {self.where}: its migration records do not match "
                                     "its tables (a record deleted?); restore it from a backup",
                                     "schema-records") from None
            raise UsageError(f"the PostgreSQL database {self.where} already has a table of "
                             f"that name ({self._engine._scrub(str(exc))}); give the vault an "
                             "empty database or schema") from None
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def table_exists(self, name: str) -> bool:
        """Whether a table of ours exists in the connection's schema."""
        return bool(self.rows("SELECT to_regclass(%s) IS NOT NULL", (name,))[0][0])

    def refuse_foreign_tables(self) -> None:
        """Refuse to create a vault beside tables we did not make (a foreign schema)."""
        ours = set(TABLES)
        found = {r[0] for r in self.rows(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        clash = sorted(found & ours)
        if clash:
            raise UsageError(f"the PostgreSQL database {self.where} already has tables named "
                             f"{', '.join(clash)} but no vault; give the vault an empty "
                             "database or schema")

    def _key(self) -> int:
        """The vault's advisory lock key: "KHV1" and the oid of its schema."""
        if self._lock_key is None:
            found = self.rows("SELECT oid FROM pg_namespace WHERE nspname = current_schema()")
            if not found:
                raise ConfigError(f"PostgreSQL vault at {self.where}: the connection has no "
                                  "schema to use (search_path)")
            self._lock_key = (APPLICATION_ID << 32) | int(found[0][0])
        return self._lock_key

    def check_and_migrate(self) -> None:
        """Check that the database holds a vault, and apply pending migrations."""
        has_vault = self.table_exists("vault")
        has_record = self.table_exists("schema_migrations")
        if not has_vault and not has_record:
            raise VaultMissingError(f"no vault in the PostgreSQL database {self.where} "
                                    "(run: keyring-hardened init)")
        if not (has_vault and has_record):
            raise IntegrityError(f"the PostgreSQL database {self.where} is not a complete "
                                 "keyring-hardened vault; refusing to use or re-initialise it")
        done = {r[0] for r in self.rows("SELECT name FROM schema_migrations")}
        names = {name for name, _ in PG_MIGRATIONS}
        if done - names:
            raise UsageError(f"vault {self.where} has migrations this keyring-hardened does not "
                             f"know ({', '.join(sorted(done - names))}); upgrade it")
        if done != names:
            with self.transaction():
                self.call(apply_pg_migrations, creating=False)

    # -- the connection and its transactions ---------------------------------------

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(Exception):
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction: the vault's lock first, commit on success, else roll back."""
        import psycopg

        self._ensure()
        try:
            self._conn.execute("BEGIN")
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._key(),))
        except psycopg.Error as exc:
            self._rollback()
            raise self._error(exc) from None
        except BaseException:
            self._rollback()
            raise
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        try:
            self._conn.execute("COMMIT")
        except psycopg.Error as exc:
            error = self._error(exc, committing=True)
            self._rollback()
            raise error from None

    def _rollback(self) -> None:
        with contextlib.suppress(Exception):
            if not (self._conn.closed or self._conn.broken):
                self._conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: repeatable read, read only, no lock taken."""
        import psycopg

        self._ensure()
        try:
            self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        except psycopg.Error as exc:
            raise self._error(exc) from None
        try:
            yield
        finally:
            self._rollback()

    def savepoint(self) -> None:
        """Open a savepoint inside the current transaction."""
        self.run("SAVEPOINT op")

    def release_savepoint(self) -> None:
        """Keep what was done since :meth:`savepoint`."""
        self.run("RELEASE SAVEPOINT op")

    def rollback_savepoint(self) -> None:
        """Undo what was done since :meth:`savepoint`, keeping the transaction open."""
        self.run("ROLLBACK TO SAVEPOINT op")
        self.run("RELEASE SAVEPOINT op")

    def checkpoint(self) -> bool:
        """False: PostgreSQL keeps deleted rows' bytes until its own vacuum and WAL reuse."""
        return False

    def residue(self, what: str) -> str:
        """What stays on the server's disks after a delete (the notice after purge and others)."""
        return (f"the {what} is done; PostgreSQL at {self.where} keeps the deleted rows' bytes "
                "(ciphertexts and wrapped keys, never a secret in the clear) in its table files "
                "until vacuum reuses the space, and in its write-ahead log, archives, replicas "
                "and backups as they keep them (docs/teams.md)")

    def schema(self) -> list[str]:
        """Names of the applied migrations."""
        return [r[0] for r in self.rows("SELECT name FROM schema_migrations ORDER BY name")]

    def counts(self) -> dict[str, int]:
        """Numbers for ``status``."""
        live, deleted = self.rows("SELECT count(current_version), count(*) -"
                                  " count(current_version) FROM credentials")[0]
        versions, = self.rows("SELECT count(*) FROM secret_versions")[0]
        events, = self.rows("SELECT count(*) FROM audit_events")[0]
        return {"credentials": int(live), "deleted": int(deleted), "versions": int(versions),
                "audit_events": int(events)}

    # -- the vault record, its keys, its seal ---------------------------------------

    def vault(self) -> VaultRecord:
        """The vault record; its absence is damage."""
        rows = self.rows("SELECT vault_id, created_at, kdf, verifier, vault_key, generation,"
                         " state_version FROM vault WHERE id = 1")
        if not rows:
            raise IntegrityError(f"vault database {self.where} has no vault record; "
                                 "restore it from a backup")
        return VaultRecord(*_typed(rows[0], _VAULT_TYPES, "vault record"))

    def keks(self) -> list[KekRecord]:
        """Every KEK version, oldest first."""
        return [KekRecord(*_typed(r, _KEK_TYPES, "key record")) for r in self.rows(
            "SELECT version, state, created_at, wrapped, wrap_count FROM keks ORDER BY version")]

    def meta_rows(self) -> tuple[VaultRecord, list[KekRecord], list[tuple[int, bytes]],
                                 tuple[int, bytes], tuple[float, str] | None,
                                 list[BucketRow]]:
        """The vault record, KEKs, past vault keys, audit anchor, seal and buckets, in one trip."""
        import psycopg

        try:
            with self._conn.pipeline():
                cursors = [self._conn.execute(sql) for sql in (
                    "SELECT vault_id, created_at, kdf, verifier, vault_key, generation,"
                    " state_version FROM vault WHERE id = 1",
                    "SELECT version, state, created_at, wrapped, wrap_count FROM keks"
                    " ORDER BY version",
                    "SELECT epoch, wrapped FROM vault_keys ORDER BY epoch",
                    "SELECT seq, mac FROM audit_anchor WHERE id = 1",
                    "SELECT sealed_at, actor FROM seal",
                    "SELECT rule, actor, tokens, updated FROM rate_buckets ORDER BY rule, actor")]
            vaults, keks, past, anchors, seals, buckets = (c.fetchall() for c in cursors)
        except psycopg.Error as exc:
            raise self._error(exc) from None
        if not vaults:
            raise IntegrityError(f"vault database {self.where} has no vault record; "
                                 "restore it from a backup")
        if not anchors:
            raise IntegrityError("audit anchor is missing", "audit-anchor")
        anchor = _typed(anchors[0], (int, bytes), "audit anchor")
        seal = _typed(seals[0], (float, str), "seal record") if seals else None
        return (VaultRecord(*_typed(vaults[0], _VAULT_TYPES, "vault record")),
                [KekRecord(*_typed(r, _KEK_TYPES, "key record")) for r in keks],
                [(e, w) for e, w in (_typed(r, (int, bytes), "vault key record") for r in past)],
                (anchor[0], anchor[1]), (seal[0], seal[1]) if seal else None,
                [BucketRow(*_typed(r, _BUCKET_TYPES, "rate-limit bucket")) for r in buckets])

    def set_root(self, kdf: str, verifier: bytes, vault_key: bytes, generation: int,
                 state_version: int = 1) -> None:
        """Record a new root key and key epoch: KDF parameters, verifier, wrapped vault key."""
        self.run("UPDATE vault SET kdf = %s, verifier = %s, vault_key = %s, generation = %s,"
                 " state_version = %s WHERE id = 1",
                 (kdf, verifier, vault_key, generation, state_version))

    def past_keys(self) -> list[tuple[int, bytes]]:
        """Vault keys of earlier epochs, each wrapped under the current vault key."""
        return [(e, w) for e, w in (_typed(r, (int, bytes), "vault key record") for r in
                                    self.rows("SELECT epoch, wrapped FROM vault_keys"
                                              " ORDER BY epoch"))]

    def set_past_keys(self, keys: Iterable[tuple[int, bytes]]) -> None:
        """Replace the stored vault keys of earlier epochs."""
        self.run("DELETE FROM vault_keys")
        self._many("INSERT INTO vault_keys (epoch, wrapped) VALUES (%s, %s)", keys)

    def add_kek(self, record: KekRecord) -> None:
        """Store a new KEK version."""
        self.run("INSERT INTO keks (version, state, created_at, wrapped, wrap_count)"
                 " VALUES (%s, %s, %s, %s, %s)", tuple(record))

    def set_kek_state(self, version: int, state: str) -> None:
        """Change a KEK version's state."""
        self.run("UPDATE keks SET state = %s WHERE version = %s", (state, version))

    def set_kek_wrapped(self, version: int, wrapped: bytes) -> None:
        """Replace a KEK version's wrapped material (rekey)."""
        self.run("UPDATE keks SET wrapped = %s WHERE version = %s", (wrapped, version))

    def retire_kek(self, version: int) -> None:
        """Retire a KEK version: state retired, wrapped material removed."""
        self.run("UPDATE keks SET state = 'retired', wrapped = NULL WHERE version = %s",
                 (version,))

    def count_wrap(self, kek_version: int, n: int = 1) -> None:
        """Count data keys wrapped under a KEK (NIST SP 800-38D usage limit)."""
        self.run("UPDATE keks SET wrap_count = wrap_count + %s WHERE version = %s",
                 (n, kek_version))

    def keys_in_use(self) -> dict[int, int]:
        """How many stored versions each KEK version wraps."""
        return {int(k): int(n) for k, n in self.rows(
            "SELECT kek_version, count(*) FROM secret_versions GROUP BY kek_version")}

    def under_keks_below(self, below: int) -> tuple[int, int]:
        """(versions, credentials) whose data keys are wrapped under a KEK below ``below``."""
        versions, creds = self.rows(
            "SELECT count(*), count(DISTINCT credential_id) FROM secret_versions"
            " WHERE kek_version < %s", (below,))[0]
        return int(versions), int(creds)

    def rewrap_candidates(self, below: int, limit: int) -> list[tuple[int, str, VersionRow]]:
        """Up to ``limit`` versions under a KEK below ``below``: (head id, service, row)."""
        found = []
        for r in self.rows(
                "SELECT v.credential_id, c.service, v.version, v.kek_version, v.wrapped_key,"
                " v.ciphertext, v.created_at, v.ttl, v.expires_at, v.digest FROM"
                " secret_versions v JOIN credentials c ON c.id = v.credential_id"
                " WHERE v.kek_version < %s ORDER BY v.kek_version LIMIT %s", (below, limit)):
            found.append((r[0], r[1], VersionRow(*_typed(r[2:], _VERSION_TYPES,
                                                          "version record"))))
        return found

    def set_wrapped_keys(self, rows: Iterable[tuple[int, bytes, bytes, int, int]]) -> None:
        """Store re-wrapped data keys: (kek_version, wrapped_key, digest, head id, version)."""
        self._many("UPDATE secret_versions SET kek_version = %s, wrapped_key = %s, digest = %s"
                   " WHERE credential_id = %s AND version = %s", rows)

    def set_seal(self, sealed_at: float | None, actor: str = "") -> None:
        """Seal (a time and an actor) or unseal (None)."""
        self.run("DELETE FROM seal")
        if sealed_at is not None:
            self.run("INSERT INTO seal (id, sealed_at, actor) VALUES (1, %s, %s)",
                     (sealed_at, actor))

    # -- unlock attempts -----------------------------------------------------------

    def unlock_throttle(self) -> tuple[int, float]:
        """Failed unlocks in a row and the time of the last counted attempt (unauthenticated)."""
        rows = self.rows("SELECT failures, last_at FROM unlock_throttle WHERE id = 1")
        if not rows:
            return 0, 0.0
        failures, last_at = rows[0]
        # Unauthenticated: a damaged row is read as the most cautious state,
        # never trusted to shorten a wait (as SQLite's engine does).
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
            failures = 1 << 30
        if not isinstance(last_at, int | float) or last_at != last_at:
            last_at = float("inf")
        return int(failures), float(last_at)

    def unlock_attempts(self, stale_before: float) -> int:
        """Attempts running now; those started before ``stale_before`` (crashed) are dropped."""
        self.run("DELETE FROM unlock_attempts WHERE NOT (started_at >= %s)", (stale_before,))
        return int(self.rows("SELECT count(*) FROM unlock_attempts")[0][0])

    def start_unlock_attempt(self, now: float) -> int:
        """Record an attempt that is about to run; returns its id."""
        return int(self.rows("INSERT INTO unlock_attempts (started_at) VALUES (%s) RETURNING id",
                             (now,))[0][0])

    def end_unlock_attempt(self, attempt: int | None, outcome: str, now: float) -> None:
        """An attempt is over, in one transaction: forget it, and count its outcome."""
        with self.transaction():
            if attempt is not None:
                self.run("DELETE FROM unlock_attempts WHERE id = %s", (attempt,))
            if outcome == "ok":
                self.set_unlock_throttle(0, 0.0)
            elif outcome == "guess":
                failures, _ = self.unlock_throttle()
                self.set_unlock_throttle(min(failures + 1, 1 << 30), now)

    def set_unlock_throttle(self, failures: int, last_at: float) -> None:
        """Record the failed-unlock count (0 removes the row)."""
        self.run("DELETE FROM unlock_throttle")
        if failures:
            self.run("INSERT INTO unlock_throttle (id, failures, last_at) VALUES (1, %s, %s)",
                     (failures, last_at))

    def add_pending(self, ts_us: int, actor: str, op: str, outcome: str,
                    reason: str | None) -> None:
        """Record an event that cannot be chained yet (its own transaction)."""
        with self.transaction():
            self.run("INSERT INTO audit_pending (ts_us, actor, op, outcome, reason)"
                     " VALUES (%s, %s, %s, %s, %s)", (ts_us, actor, op, outcome, reason))

    def has_pending(self) -> bool:
        """Whether failed unlocks wait to be chained."""
        return bool(self.rows("SELECT 1 FROM audit_pending LIMIT 1"))

    def take_pending(self, limit: int) -> list[tuple[Any, ...]]:
        """Remove and return up to ``limit`` waiting rows, oldest first (inside a transaction)."""
        rows = self.rows("SELECT id, ts_us, actor, op, outcome, reason FROM audit_pending"
                         " ORDER BY id LIMIT %s", (limit,))
        self._many("DELETE FROM audit_pending WHERE id = %s", [(r[0],) for r in rows])
        return [tuple(r[1:]) for r in rows]

    # -- rate-limit buckets ----------------------------------------------------------

    def put_buckets(self, rows: Iterable[BucketRow]) -> None:
        """Store token-bucket states (insert or replace)."""
        self._many("INSERT INTO rate_buckets (rule, actor, tokens, updated) VALUES"
                   " (%s, %s, %s, %s) ON CONFLICT (rule, actor) DO UPDATE SET"
                   " tokens = EXCLUDED.tokens, updated = EXCLUDED.updated",
                   [tuple(r) for r in rows])

    def drop_buckets(self, keys: Iterable[tuple[str, str]]) -> None:
        """Delete token buckets by (rule, actor)."""
        self._many("DELETE FROM rate_buckets WHERE rule = %s AND actor = %s", keys)

    # -- credentials and their versions ----------------------------------------------

    def bucket_rows(self, bucket: int) -> tuple[list[HeadRow], dict[int, list[VersionRow]]]:
        """A state bucket's heads, and the kept versions of each, in one query."""
        heads: list[HeadRow] = []
        versions: dict[int, list[VersionRow]] = {}
        for r in self.rows(
                "SELECT c.id, c.service, c.username, c.current_version, c.last_version,"
                " c.created_at, c.updated_at, c.mac, c.expires_at, c.versions_digest,"
                " c.refresh, v.version, v.kek_version, v.wrapped_key, v.ciphertext,"
                " v.created_at, v.ttl, v.expires_at, v.digest FROM credentials c LEFT JOIN"
                " secret_versions v ON v.credential_id = c.id WHERE c.bucket = %s"
                " ORDER BY c.service COLLATE \"C\", c.username COLLATE \"C\", v.version",
                (bucket,)):
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
        if not found:
            return found
        for r in self.rows(
                f"SELECT bucket, {_HEAD_COLUMNS} FROM credentials WHERE bucket = ANY(%s)"  # noqa: S608
                " ORDER BY bucket, service COLLATE \"C\", username COLLATE \"C\"",
                (list(found),)):
            found[r[0]].append(HeadRow(*_typed(r[1:], _HEAD_TYPES, "credential record")))
        return found

    def versions_of(self, head_ids: Iterable[int]) -> dict[int, list[VersionRow]]:
        """The kept versions of several credentials, each oldest first."""
        found: dict[int, list[VersionRow]] = {h: [] for h in head_ids}
        if not found:
            return found
        for r in self.rows(
                f"SELECT credential_id, {_VERSION_COLUMNS} FROM secret_versions"  # noqa: S608
                " WHERE credential_id = ANY(%s) ORDER BY credential_id, version",
                (list(found),)):
            found[r[0]].append(VersionRow(*_typed(r[1:], _VERSION_TYPES, "version record")))
        return found

    def new_head(self, service: str, username: str, bucket: int, now: float) -> HeadRow:
        """Insert the head of a credential that has never existed (no version yet)."""
        rows = self.rows(
            "INSERT INTO credentials (service, username, current_version, last_version,"  # noqa: S608
            " created_at, updated_at, mac, bucket) VALUES (%s, %s, NULL, 0, %s, %s, %s, %s)"
            f" RETURNING {_HEAD_COLUMNS}", (service, username, now, now, b"", bucket))
        return HeadRow(*_typed(rows[0], _HEAD_TYPES, "credential record"))

    def update_head(self, head_id: int, current: int | None, last: int, now: float,
                    expires_at: float | None, versions_digest: bytes) -> None:
        """Move a credential's current and last version, its expiry and its version digest."""
        self.run("UPDATE credentials SET current_version = %s, last_version = %s,"
                 " updated_at = %s, expires_at = %s, versions_digest = %s WHERE id = %s",
                 (current, last, now, expires_at, versions_digest, head_id))

    def add_version(self, head_id: int, row: VersionRow) -> None:
        """Store a new version."""
        self.run("INSERT INTO secret_versions (credential_id, version, kek_version, wrapped_key,"
                 " ciphertext, created_at, ttl, expires_at, digest)"
                 " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", (head_id, *row))

    def versions(self, head_id: int) -> list[VersionRow]:
        """Every kept version of a credential, oldest first."""
        return [VersionRow(*_typed(r, _VERSION_TYPES, "version record")) for r in self.rows(
            f"SELECT {_VERSION_COLUMNS} FROM secret_versions WHERE credential_id = %s"  # noqa: S608
            " ORDER BY version", (head_id,))]

    def prune(self, head_id: int, keep: int) -> int:
        """Delete all but the newest ``keep`` versions; returns how many went."""
        return self.run(
            "DELETE FROM secret_versions WHERE credential_id = %s AND version NOT IN"
            " (SELECT version FROM secret_versions WHERE credential_id = %s"
            "  ORDER BY version DESC LIMIT %s)", (head_id, head_id, keep))

    def purge(self, head_id: int) -> None:
        """Delete a credential and every version of it."""
        self.run("DELETE FROM refresh_leases WHERE credential_id = %s", (head_id,))
        self.run("DELETE FROM credentials WHERE id = %s", (head_id,))

    def _stream(self, sql: str) -> Iterator[Any]:
        import psycopg

        try:
            cur = self._conn.execute(sql)
            while batch := cur.fetchmany(2048):
                yield from batch
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def all_heads(self) -> Iterator[tuple[int | None, HeadRow]]:
        """Every head with its stored bucket, by service then username."""
        for row in self._stream(f"SELECT bucket, {_HEAD_COLUMNS} FROM credentials"  # noqa: S608
                                " ORDER BY service COLLATE \"C\", username COLLATE \"C\""):
            bucket = row[0] if isinstance(row[0], int) else None
            yield bucket, HeadRow(*_typed(row[1:], _HEAD_TYPES, "credential record"))

    def all_versions(self) -> Iterator[tuple[int, VersionRow]]:
        """Every stored version with its credential id, by credential then version."""
        for row in self._stream(f"SELECT credential_id, {_VERSION_COLUMNS}"  # noqa: S608
                                " FROM secret_versions ORDER BY credential_id, version"):
            yield row[0], VersionRow(*_typed(row[1:], _VERSION_TYPES, "version record"))

    def set_versions_digests(self, rows: Iterable[tuple[bytes, int]]) -> None:
        """Store heads' new version digests: (versions_digest, head id)."""
        self._many("UPDATE credentials SET versions_digest = %s WHERE id = %s", rows)

    def fill_state_columns(self, heads: Iterable[tuple[int, bytes, int]],
                           versions: Iterable[tuple[bytes, int, int]]) -> None:
        """Set (bucket, versions digest) of heads and the digest of versions (upgrade)."""
        self._many("UPDATE credentials SET bucket = %s, versions_digest = %s, mac = ''::bytea"
                   " WHERE id = %s", heads)
        self._many("UPDATE secret_versions SET digest = %s WHERE credential_id = %s"
                   " AND version = %s", versions)

    def set_version_ttl(self, head_id: int, version: int, ttl: float | None,
                        expires_at: float | None, digest: bytes) -> None:
        """Change a stored version's TTL and expiry, with its new digest."""
        self.run("UPDATE secret_versions SET ttl = %s, expires_at = %s, digest = %s"
                 " WHERE credential_id = %s AND version = %s",
                 (ttl, expires_at, digest, head_id, version))

    def expired_count(self, now: float) -> int:
        """Live credentials whose current version expired at ``now`` (for ``status``)."""
        return int(self.rows("SELECT count(*) FROM credentials WHERE current_version IS NOT NULL"
                             " AND expires_at IS NOT NULL AND expires_at <= %s", (now,))[0][0])

    # -- the authenticated state -----------------------------------------------------

    def nodes(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """Stored state nodes by (level, index); absent ones are left out."""
        wanted = list(keys)
        if not wanted:
            return {}
        found = {}
        for level, idx, blob in self.rows(
                "SELECT n.level, n.idx, n.hashes FROM state_nodes n JOIN"
                " unnest(%s::int[], %s::bigint[]) AS w(level, idx)"
                " ON n.level = w.level AND n.idx = w.idx",
                ([k[0] for k in wanted], [k[1] for k in wanted])):
            if not (isinstance(level, int) and isinstance(idx, int) and isinstance(blob, bytes)):
                raise IntegrityError("a stored state node holds a value of the wrong type "
                                     "(tampered?)", "column-type")
            found[(level, idx)] = blob
        return found

    def put_nodes(self, nodes: Mapping[tuple[int, int], bytes | None]) -> None:
        """Store changed state nodes; None (or an all-empty node) removes one."""
        keep = [(level, idx, blob) for (level, idx), blob in nodes.items()
                if blob is not None and blob.count(0) != len(blob)]
        drop = [(level, idx) for (level, idx), blob in nodes.items()
                if blob is None or blob.count(0) == len(blob)]
        self._many("INSERT INTO state_nodes (level, idx, hashes) VALUES (%s, %s, %s)"
                   " ON CONFLICT (level, idx) DO UPDATE SET hashes = EXCLUDED.hashes", keep)
        self._many("DELETE FROM state_nodes WHERE level = %s AND idx = %s", drop)

    def clear_nodes(self) -> None:
        """Remove every state node (before a rebuild from scratch)."""
        self.run("DELETE FROM state_nodes")

    # -- the audit chain ---------------------------------------------------------

    def audit_anchor(self) -> tuple[int, bytes]:
        """The (seq, mac) that the oldest kept event follows."""
        rows = self.rows("SELECT seq, mac FROM audit_anchor WHERE id = 1")
        if not rows:
            raise IntegrityError("audit anchor is missing", "audit-anchor")
        seq, mac = _typed(rows[0], (int, bytes), "audit anchor")
        return seq, mac

    def audit_head(self) -> tuple[int, bytes]:
        """The (seq, mac) of the newest event, or the anchor when there is none."""
        rows = self.rows("SELECT seq, mac FROM audit_events ORDER BY seq DESC LIMIT 1")
        if not rows:
            return self.audit_anchor()
        seq, mac = _typed(rows[0], (int, bytes), "audit event")
        return seq, mac

    def newest_events(self, n: int = 2) -> list[Event]:
        """The ``n`` newest events, newest first."""
        return [Event(*_typed(r, _EVENT_TYPES, f"audit event {r[0]}")) for r in self.rows(
            _EVENT + " ORDER BY seq DESC LIMIT %s", (n,))]

    def event(self, seq: int) -> Event | None:
        """One event by its sequence number."""
        rows = self.rows(_EVENT + " WHERE seq = %s", (seq,))
        return Event(*_typed(rows[0], _EVENT_TYPES, f"audit event {seq}")) if rows else None

    def append_event(self, event: Event) -> None:
        """Insert one chained event (inside the caller's transaction)."""
        self.run(_INSERT_EVENT, tuple(event))

    def events(self, after: int = 0, through: int | None = None,
               newest_first: bool = False) -> Iterator[Event]:
        """Events with ``after < seq <= through``, fetched in batches."""
        import psycopg

        order = "DESC" if newest_first else "ASC"
        try:
            cur = self._conn.execute(_EVENT + f" WHERE seq > %s AND seq <= %s ORDER BY seq {order}",
                                     (after, through if through is not None else 2**62))
            while batch := cur.fetchmany(2048):
                for row in batch:
                    yield Event(*_typed(row, _EVENT_TYPES, f"audit event {row[0]}"))
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def last_event(self, op: str) -> Event | None:
        """The newest successful event of an operation."""
        rows = self.rows(_EVENT + " WHERE op = %s AND outcome = 'ok' ORDER BY seq DESC LIMIT 1",
                         (op,))
        return Event(*_typed(rows[0], _EVENT_TYPES, "audit event")) if rows else None

    def events_before(self, ts_us: int) -> int:
        """The seq of the newest event older than ``ts_us`` (0 if none)."""
        return int(self.rows("SELECT max(seq) FROM audit_events WHERE ts_us < %s",
                             (ts_us,))[0][0] or 0)

    def drop_events_through(self, seq: int, mac: bytes) -> None:
        """Delete events up to ``seq`` and make ``(seq, mac)`` the anchor."""
        self.run("DELETE FROM audit_events WHERE seq <= %s", (seq,))
        self.run("UPDATE audit_anchor SET seq = %s, mac = %s WHERE id = 1", (seq, mac))

    # -- refreshers and refresh leases ---------------------------------------------

    def set_refresh(self, head_id: int, blob: bytes | None) -> None:
        """Store a credential's refresher and refresh state (the caller re-roots the state)."""
        self.run("UPDATE credentials SET refresh = %s WHERE id = %s", (blob, head_id))

    def refresh_hints(self) -> list[tuple[Any, ...]]:
        """(id, service, username, current, expires_at, refresh) of each head with a refresher."""
        return [tuple(r) for r in self.rows(
            "SELECT id, service, username, current_version, expires_at, refresh FROM"
            " credentials WHERE refresh IS NOT NULL ORDER BY service COLLATE \"C\","
            " username COLLATE \"C\"")]

    def current_hint(self, head_id: int) -> Any:
        """A head's current version as stored, unchecked (a waiter's cue to read again)."""
        rows = self.rows("SELECT current_version FROM credentials WHERE id = %s", (head_id,))
        return rows[0][0] if rows else None

    def lease(self, head_id: int) -> tuple[Any, ...] | None:
        """The refresh lease of a credential: (holder, token, base version, expires_at)."""
        rows = self.rows("SELECT holder, token, base_version, expires_at FROM refresh_leases"
                         " WHERE credential_id = %s", (head_id,))
        return tuple(rows[0]) if rows else None

    def put_lease(self, head_id: int, holder: str, token: bytes, base: int,
                  expires_at: float) -> None:
        """Take (or take over) a credential's refresh lease."""
        self.run("INSERT INTO refresh_leases (credential_id, holder, token, base_version,"
                 " expires_at) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (credential_id) DO UPDATE"
                 " SET holder = EXCLUDED.holder, token = EXCLUDED.token,"
                 " base_version = EXCLUDED.base_version, expires_at = EXCLUDED.expires_at",
                 (head_id, holder, token, base, expires_at))

    def drop_lease(self, head_id: int, token: bytes) -> None:
        """Give up a lease, if it is still the one holding ``token``."""
        self.run("DELETE FROM refresh_leases WHERE credential_id = %s AND token = %s",
                 (head_id, token))

    # -- whole-vault copies: SQLite files only ------------------------------------

    def backup_to(self, target: Path) -> None:
        """Refused: see :meth:`PostgresEngine.open_copy`."""
        raise UsageError("backup of a PostgreSQL vault: use migrate-storage --to "
                         "sqlite:///FILE for a checked copy, and PostgreSQL's own backups",
                         "engine-refused")

    def use_wal(self) -> None:
        """Refused: a SQLite notion."""
        raise UsageError("a PostgreSQL vault has no write-ahead log of its own to switch to",
                         "engine-refused")

    def replace_with(self, source: Path, keep: Path, expect_root: bytes | None,
                     key_version: int) -> None:
        """Refused: restore a PostgreSQL vault with migrate-storage into an empty database."""
        raise UsageError("restore into a PostgreSQL vault: use migrate-storage --to URL into "
                         "an empty database, or PostgreSQL's own restore", "engine-refused")
