"""A throwaway PostgreSQL cluster for the tests, and the same API over a given server.

``Cluster`` runs ``initdb`` and ``pg_ctl`` from PostgreSQL's own binaries in a
fresh ``tempfile.mkdtemp(prefix="kh-pg-")`` directory: the data directory, a
private Unix socket directory and the server log all live there, and the server
also listens on 127.0.0.1 on a free port. PostgreSQL refuses to run as root, so
under root the cluster runs as the ``postgres`` system user, and the directory
is handed to that user (it cannot live under pytest's ``tmp_path``, which is
private to root).

Settings chosen for tests (``kh_harness.conf`` in the data directory):

- ``fsync = off`` and ``full_page_writes = off``: only an operating-system
  crash could lose data with these, and the tests never crash the machine.
  ``synchronous_commit`` stays ``on``, so a commit is acknowledged only once
  its WAL is written: an immediate (crash) stop keeps every acknowledged row.
- ``log_statement = 'all'`` into the log file given to ``pg_ctl -l``, which
  ``log_text()`` reads, so tests can prove a secret never reaches the log.
- ``pg_hba.conf``: the superuser ``postgres`` and other roles are trusted on
  the Unix socket; members of the group role ``kh_pw`` (every role made by
  ``create_role``) need their password (scram-sha-256) on the socket too;
  every role needs its password over TCP.

``ExternalServer`` gives the same database API over a server named by an admin
URL (``KEYRING_HARDENED_TEST_PG_URL``); it cannot restart that server or read
its log.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

#: Where Debian and Ubuntu install each major version's server binaries.
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"

#: The env var naming an existing server (an admin URL) to use instead of a cluster.
URL_ENV = "KEYRING_HARDENED_TEST_PG_URL"

#: Roles made by ``create_role`` join this group; pg_hba makes its members
#: give their password on the socket as well as over TCP.
PASSWORD_GROUP = "kh_pw"

SUPERUSER = "postgres"

StopMode = Literal["smart", "fast", "immediate"]

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SERVER_USER = "postgres"
_OWNER_FILE = "owner.pid"
_DB_PREFIX = "kh_t_"


def _version_key(bindir: str) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin, (9, 6) for .../9.6/bin; () if not a version."""
    name = Path(bindir).parent.name
    if not re.fullmatch(r"\d+(\.\d+)*", name):
        return ()
    return tuple(int(part) for part in name.split("."))


def _has_server_tools(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres"))


def find_bindir(pattern: str = DEBIAN_BINDIRS) -> Path | None:
    """The directory of ``initdb``, ``pg_ctl`` and ``postgres``, or None.

    The highest version under /usr/lib/postgresql first (``pg_config
    --bindir`` names the client package's version, which may have no server),
    then ``initdb`` on PATH, symlinks resolved to find its siblings.
    """
    versioned = sorted(glob.glob(pattern), key=_version_key, reverse=True)
    for candidate in versioned:
        if _has_server_tools(Path(candidate)):
            return Path(candidate)
    on_path = shutil.which("initdb")
    if on_path is not None:
        for bindir in (Path(on_path).parent, Path(on_path).resolve().parent):
            if _has_server_tools(bindir):
                return bindir
    return None


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a plain lower-case SQL name: {name!r}")
    return name


def _with_path(url: str, dbname: str) -> str:
    """``url`` with its database replaced by ``dbname`` (a URL, or a key=value string)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return psycopg.conninfo.make_conninfo(url, dbname=dbname)
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


def _unique_dbname() -> str:
    # Unique across xdist workers and runs sharing one external server.
    return f"{_DB_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"


def dbname_of(url: str) -> str:
    """The database a URL names."""
    return str(psycopg.conninfo.conninfo_to_dict(url).get("dbname") or "")


class PgServer(Protocol):
    """What every test may use, whichever server backs it."""

    def admin_url(self, dbname: str = SUPERUSER) -> str:
        """A superuser URL for ``dbname``."""
        ...

    def new_database(self, owner: str | None = None) -> str:
        """A fresh empty database; its superuser URL."""
        ...

    def drop_database(self, url_or_name: str) -> None:
        """Drop a database made by ``new_database``, closing its connections."""
        ...

    def tcp_url(self, dbname: str, user: str, password: str | None = None) -> str:
        """A URL for ``dbname`` over TCP as ``user`` (with ``password`` if given)."""
        ...

    def create_role(self, name: str, password: str) -> None:
        """A login role with a password."""
        ...

    def all_tables_dump(self, dbname: str) -> bytes:
        """Every row of every table of the user schemas, as text and raw bytes."""
        ...

    def close(self) -> None:
        """Release what the session made."""
        ...


class _Databases:
    """The database API shared by ``Cluster`` and ``ExternalServer``."""

    #: The template new databases are copied from.
    template = "template0"

    def __init__(self) -> None:
        self._made: list[str] = []

    def admin_url(self, dbname: str = SUPERUSER) -> str:
        raise NotImplementedError

    def tcp_url(self, dbname: str, user: str, password: str | None = None) -> str:
        raise NotImplementedError

    def _admin(self, dbname: str = SUPERUSER) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.admin_url(dbname), autocommit=True, connect_timeout=10)

    def new_database(self, owner: str | None = None) -> str:
        """Make a fresh empty database and return its superuser URL.

        ``owner`` (a role made by ``create_role``) owns it, and so may create
        tables in its ``public`` schema.

        Measured on this machine (PostgreSQL 15, fsync off, 2 shared cores,
        15 to 30 runs each, after a connection is open): ``CREATE DATABASE ...
        TEMPLATE template0`` takes 22 to 40 ms (median 32 ms) when the machine
        is quiet, and 100 to 330 ms while other test runs load its disk;
        ``STRATEGY file_copy`` measured the same within that noise (25 to 45
        ms) and adds two checkpoints per database; a pre-made empty template
        (``kh_template``) was never faster (82 to 156 ms in the same run as
        template0's 27 to 45 ms), as it is the same seven megabytes to copy.
        So: template0 with the default strategy. ``new_database()`` adds a
        connection to the server (about 6 ms over the socket).
        """
        name = _unique_dbname()
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(self.template))
        if owner is not None:
            statement += sql.SQL(" OWNER {}").format(sql.Identifier(_check_name(owner)))
        with self._admin() as conn:
            conn.execute(statement)
        self._made.append(name)
        return self.admin_url(name)

    def drop_database(self, url_or_name: str) -> None:
        """Drop a database made by ``new_database`` (its URL or name), even if still in use.

        Refuses any other name: on an external server that may be someone's data.
        """
        name = url_or_name if _NAME.fullmatch(url_or_name) else dbname_of(url_or_name)
        if not name.startswith(_DB_PREFIX):
            raise ValueError(f"not a test database made by new_database(): {name!r}")
        with self._admin() as conn:
            force = sql.SQL(" WITH (FORCE)") if conn.info.server_version >= 130000 else sql.SQL("")
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
                         + force)
        if name in self._made:
            self._made.remove(name)

    def create_role(self, name: str, password: str) -> None:
        """Make a login role that must give ``password`` (scram-sha-256).

        The server only ever sees the SCRAM verifier, computed here by libpq,
        so the password itself is never in the server log.
        """
        _check_name(name)
        with self._admin() as conn:
            conn.execute(sql.SQL(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {g}) THEN "
                "CREATE ROLE {gi} NOLOGIN; END IF; END $$").format(
                    g=sql.Literal(PASSWORD_GROUP), gi=sql.Identifier(PASSWORD_GROUP)))
            verifier = conn.pgconn.encrypt_password(
                password.encode(), name.encode(), b"scram-sha-256").decode()
            exists = conn.execute("SELECT FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            # Again for the same name (a rerun on an external server): a new password.
            verb = sql.SQL("ALTER" if exists else "CREATE")
            conn.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                verb, sql.Identifier(name), sql.Literal(verifier)))
            conn.execute(sql.SQL("GRANT {} TO {}").format(
                sql.Identifier(PASSWORD_GROUP), sql.Identifier(name)))

    def all_tables_dump(self, dbname: str) -> bytes:
        """Every row of every table outside the system schemas, for a canary scan.

        Each table is written as the server's own text form (``COPY ... TO
        STDOUT``, which shows bytea as hex), followed by the raw bytes of its
        bytea columns, so a secret stored in any form shows up. Large objects
        (``pg_largeobject``) come last, raw.
        """
        out: list[bytes] = []
        with self._admin(dbname) as conn:
            tables = conn.execute(
                "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN "
                "('pg_catalog', 'information_schema') AND schemaname NOT LIKE 'pg_toast%' "
                "ORDER BY 1, 2").fetchall()
            for schema, table in tables:
                ident = sql.Identifier(str(schema), str(table))
                out.append(f"-- {schema}.{table}\n".encode())
                # COPY (SELECT ...): a partitioned table cannot be copied directly.
                copy_sql = sql.SQL("COPY (SELECT * FROM {}) TO STDOUT").format(ident)
                with conn.cursor().copy(copy_sql) as copy:
                    out.extend(bytes(block) for block in copy)
                bytea = [str(row[0]) for row in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
                    " AND table_name = %s AND data_type = 'bytea'", (schema, table))]
                if bytea:
                    query = sql.SQL("SELECT {} FROM {}").format(
                        sql.SQL(", ").join(map(sql.Identifier, bytea)), ident)
                    for row in conn.execute(query):
                        out.extend(bytes(v) + b"\n" for v in row if isinstance(v, bytes))
            out.append(b"-- pg_largeobject\n")
            for (data,) in conn.execute("SELECT data FROM pg_largeobject ORDER BY loid, pageno"):
                if isinstance(data, bytes):
                    out.append(data)
        return b"".join(out)


class ExternalServer(_Databases):
    """An existing server, named by a superuser URL: databases only, no restart or log."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        info = psycopg.conninfo.conninfo_to_dict(url)
        self._host = str(info.get("host") or "")
        self._port = str(info.get("port") or "5432")

    def admin_url(self, dbname: str = SUPERUSER) -> str:
        return _with_path(self.url, dbname)

    def tcp_url(self, dbname: str, user: str, password: str | None = None) -> str:
        host = self._host if self._host and not self._host.startswith("/") else "127.0.0.1"
        return _tcp_url(host, int(self._port), dbname, user, password)

    def close(self) -> None:
        """Drop the databases this session made (the server is not ours)."""
        for name in list(self._made):
            with contextlib.suppress(psycopg.Error):
                self.drop_database(name)


def _tcp_url(host: str, port: int, dbname: str, user: str, password: str | None) -> str:
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return f"postgresql://{auth}@{host}:{port}/{quote(dbname, safe='')}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int

    @classmethod
    def for_server(cls) -> _RunAs:
        """Ourselves, or the ``postgres`` user when we are root."""
        if os.geteuid() != 0:
            return cls(os.geteuid(), os.getegid())
        try:
            entry = pwd.getpwnam(_SERVER_USER)
        except KeyError:
            raise ClusterError(f"PostgreSQL will not run as root, and there is no "
                               f"{_SERVER_USER!r} user to run it as") from None
        return cls(entry.pw_uid, entry.pw_gid)


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST and the like would redirect initdb and pg_ctl.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


class ClusterError(RuntimeError):
    """initdb or pg_ctl failed; the message carries their output and the log's tail."""


class Cluster(_Databases):
    """A private PostgreSQL cluster: started by ``start()``, removed by ``close()``."""

    def __init__(self, bindir: Path | None = None) -> None:
        super().__init__()
        found = bindir or find_bindir()
        if found is None:
            raise ClusterError("no PostgreSQL server binaries (initdb, pg_ctl) found")
        self.bindir = found
        self._as = _RunAs.for_server()
        self.base = Path(tempfile.mkdtemp(prefix="kh-pg-"))
        (self.base / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.datadir = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "server.log"
        self.port = 0
        self._initialised = False
        self._closed = False
        self.sockdir.mkdir()
        # Others may reach the socket; the data directory stays 0700 (initdb).
        self.base.chmod(0o755)
        for path in (self.base, self.sockdir):
            os.chown(path, self._as.uid, self._as.gid)
        atexit.register(self.close)

    # -- processes -----------------------------------------------------------

    def _call(self, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a server tool as the server's user (pg_ctl refuses root, even for status)."""
        argv = [str(a) for a in args]
        if os.geteuid() != self._as.uid:
            return subprocess.run(argv, cwd=self.base, env=_clean_env(), capture_output=True,
                                  text=True, timeout=timeout, check=False, user=self._as.uid,
                                  group=self._as.gid, extra_groups=[])
        return subprocess.run(argv, cwd=self.base, env=_clean_env(), capture_output=True,
                              text=True, timeout=timeout, check=False)

    def _run(self, *args: str | Path, timeout: float = 120) -> str:
        argv = [str(a) for a in args]
        proc = self._call(*args, timeout=timeout)
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}"
                               f"{proc.stderr}\n--- log tail ---\n{self.log_text()[-3000:]}")
        out: str = proc.stdout
        return out

    def _initdb(self) -> None:
        self._run(self.bindir / "initdb", "-D", self.datadir, "-U", SUPERUSER,
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8",
                  "--locale=C", "--no-sync")
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\ninclude_if_exists = 'kh_harness.conf'\n")
        # First match wins: the password group before the trusted socket.
        (self.datadir / "pg_hba.conf").write_text(
            "# keyring-hardened test cluster (tests/pgcluster.py)\n"
            f"local all +{PASSWORD_GROUP} scram-sha-256\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n")
        self._initialised = True

    def _write_settings(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "on",
            "log_statement": "'all'",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "logging_collector": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
        }
        path = self.datadir / "kh_harness.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        os.chown(path, self._as.uid, self._as.gid)

    def _pg_ctl_start(self) -> None:
        self._run(self.bindir / "pg_ctl", "start", "-D", self.datadir, "-l", self.logfile,
                  "-w", "-t", "60")

    def start(self) -> Cluster:
        """initdb (the first time), then start the server and wait until it accepts."""
        if self._closed:
            raise ClusterError("cluster already closed")
        if not self._initialised:
            self._initdb()
        if self.is_running():
            return self
        tries = 3 if self.port == 0 else 1
        for attempt in range(tries):
            if tries > 1:
                self.port = _free_port()
            self._write_settings()
            try:
                self._pg_ctl_start()
                break
            except ClusterError:
                # Another process may have taken the port between the probe and the bind.
                if attempt == tries - 1 or "could not bind" not in self.log_text():
                    raise
        return self

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server: ``fast`` shuts down cleanly, ``immediate`` is a crash."""
        if self.is_running():
            self._run(self.bindir / "pg_ctl", "stop", "-D", self.datadir, "-m", mode,
                      "-w", "-t", "60")

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop (``fast``, or ``immediate``: crash and recover) and start again, same port."""
        self.stop(mode)
        self._pg_ctl_start()

    def is_running(self) -> bool:
        """Whether the postmaster of this cluster is alive (its pid file, not a pg_ctl call)."""
        return _postmaster_pid(self.datadir) is not None

    def close(self) -> None:
        """Stop the server (immediately: nothing in it is kept) and remove its directory."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            with contextlib.suppress(ClusterError, OSError, subprocess.SubprocessError):
                self.stop("immediate")
        finally:
            _quit_postmaster(self.datadir)
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- URLs and log ------------------------------------------------------------

    def admin_url(self, dbname: str = SUPERUSER) -> str:
        """Superuser over the Unix socket (trusted there, no password)."""
        return self.socket_url(dbname, SUPERUSER)

    def socket_url(self, dbname: str, user: str, password: str | None = None) -> str:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        query = urlencode({"host": str(self.sockdir), "port": str(self.port)})
        return f"postgresql://{auth}@/{quote(dbname, safe='')}?{query}"

    def tcp_url(self, dbname: str, user: str, password: str | None = None) -> str:
        return _tcp_url("127.0.0.1", self.port, dbname, user, password)

    def log_text(self) -> str:
        """The server log so far (every statement, at ``log_statement = 'all'``)."""
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 5.0) -> bool:
        """Whether ``needle`` shows up in the log within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def _postmaster_pid(datadir: Path) -> int | None:
    """The pid of the live postmaster of ``datadir``, or None.

    A pid file left by a killed server may name a pid since reused by another
    process: on Linux the process's command line must name ``datadir``.
    """
    try:
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _pid_alive(pid):
        return None
    if Path("/proc/self").is_dir():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if os.fsencode(str(datadir)) not in cmdline:
            return None
    return pid


def _quit_postmaster(datadir: Path) -> None:
    """SIGQUIT (immediate shutdown) to the postmaster of ``datadir``, if one still runs."""
    pid = _postmaster_pid(datadir)
    if pid is None:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def reap_stale(tmpdir: str | None = None) -> list[Path]:
    """Stop and remove clusters left by test processes that died (SIGKILL, a crash).

    A cluster is stale when the pid in its ``owner.pid`` is no longer alive.
    Returns the directories removed.
    """
    removed: list[Path] = []
    for base in map(Path, glob.glob(os.path.join(tmpdir or tempfile.gettempdir(), "kh-pg-*"))):
        try:
            owner = int((base / _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        _quit_postmaster(base / "data")
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


# -- choosing a server ---------------------------------------------------------

Choice = Literal["external", "cluster", "skip", "fail"]

INSTALL_HINT = ("install PostgreSQL's server (Debian/Ubuntu: apt-get install postgresql) or set "
                f"{URL_ENV} to a superuser URL")


@dataclass(frozen=True)
class Selection:
    """Which server the PostgreSQL tests use, and why."""

    choice: Choice
    #: the admin URL, the binaries' directory, or the skip or failure message
    detail: str


def select_server(env: Mapping[str, str],
                  finder: Callable[[], Path | None] | None = None) -> Selection:
    """``KEYRING_HARDENED_TEST_PG_URL`` first, then a throwaway cluster, else skip or fail.

    Without either, CI (``CI=true``) fails: a suite that quietly skips its
    PostgreSQL tests there would prove nothing about the engine.
    """
    url = env.get(URL_ENV, "").strip()
    if url:
        return Selection("external", url)
    bindir = (finder or find_bindir)()
    if bindir is not None:
        return Selection("cluster", str(bindir))
    if env.get("CI", "").strip().lower() == "true":
        return Selection("fail", f"PostgreSQL is needed in CI (CI=true) but no initdb was found "
                                 f"and {URL_ENV} is unset: {INSTALL_HINT}")
    return Selection("skip", f"no PostgreSQL server: {INSTALL_HINT}")


def open_server(selection: Selection) -> PgServer:
    """Start (or connect to) the selected server; the caller closes it."""
    if selection.choice == "external":
        server = ExternalServer(selection.detail)
        with server._admin():
            pass
        return server
    if selection.choice == "cluster":
        reap_stale()
        return Cluster(Path(selection.detail)).start()
    raise ClusterError(selection.detail)
