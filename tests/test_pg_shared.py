"""A shared vault on PostgreSQL, driven as teams use it: many hosts at once, a server
restart, the canary, the database password, TLS (docs/teams.md).

Each "host" is a process with a vault home of its own (its own copy of the key
file, its own config) and the same ``KEYRING_HARDENED_STORAGE_URL``, as the
Ansible control nodes and CI runners of a team would have.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Literal

import pytest

from keyring_hardened.store import Store

from .conftest import CANARY, run_cli
from .pgcluster import Cluster, PgServer, dbname_of
from .test_refresh import counting, runs

pytestmark = pytest.mark.slow

URL = "KEYRING_HARDENED_STORAGE_URL"


@pytest.fixture
def shared(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """This process uses the fresh database: the vault's rows live there."""
    monkeypatch.setenv(URL, pg_url)
    return pg_url


def _host(tmp_path: Path, first: Path, i: int, config: str = "") -> Path:
    """Another host's home: its own folder, a copy of the root key, its own config."""
    home = tmp_path / f"host{i}"
    if home != first:
        home.mkdir(mode=0o700)
        shutil.copy2(first / "master.key", home / "master.key")
        (home / "master.key").chmod(0o600)
    if config:
        (home / "config.toml").write_text(config)
        (home / "config.toml").chmod(0o600)
    return home


def _start(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))


def _together(procs: list[subprocess.Popen[str]], timeout: float = 300
              ) -> list[tuple[int, str, str]]:
    """Start every process's work at once (they imported and opened ahead), and wait."""
    for p in procs:
        assert p.stdout is not None
        assert p.stdin is not None
        line = p.stdout.readline()
        assert line == "ready\n", (line, p.stderr.read() if p.stderr else "")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    return [(p.wait(timeout=timeout), *p.communicate(timeout=timeout)) for p in procs]


WRITER = textwrap.dedent("""
    import sys
    from keyring_hardened.store import Store
    home, i, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with Store.open(home, actor=f"host{i}") as s:
        print("ready", flush=True)
        sys.stdin.readline()
        bad = 0
        for j in range(n):
            s.set(f"host{i}", f"u{j}", f"v{i}-{j}")
            bad += s.get(f"host{i}", f"u{j}").reveal() != f"v{i}-{j}"
            bad += s.get("team/db", "app").reveal() != "shared"
    print(bad)
""")


def test_eight_hosts_write_and_read_at_once(shared: str, tmp_path: Path) -> None:
    first = tmp_path / "host0"
    with Store.init(first, actor="admin") as s:
        s.set("team/db", "app", "shared")
    homes = [_host(tmp_path, first, i) for i in range(8)]
    n = 15
    done = _together([_start(WRITER, str(h), str(i), str(n)) for i, h in enumerate(homes)])
    assert [(code, out.strip()) for code, out, _ in done] == [(0, "0")] * 8, done
    with Store.open(homes[3]) as s:
        # Nothing lost: every host's every write, from any host.
        for i in range(8):
            for j in range(n):
                assert s.get(f"host{i}", f"u{j}").reveal() == f"v{i}-{j}"
        result = s.trail.verify()
        assert result.ok, result.problem
        # One chain: init, the team's set, and three events per round of each host.
        assert result.verified >= 2 + 8 * n * 3
        mine = [e for e in s.trail.show(limit=10_000) if e.actor.startswith("host")]
        assert len(mine) == 8 * n * 3
        assert sorted(e.seq for e in mine) == sorted({e.seq for e in mine})


READER = textwrap.dedent("""
    import sys
    from keyring_hardened import cli
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()
    codes = [cli.main(["--home", sys.argv[1], "get", "team/db", "app"]) for _ in range(4)]
    print(",".join(map(str, codes)))
""")


def test_rate_limits_hold_across_hosts(shared: str, tmp_path: Path) -> None:
    first = tmp_path / "host0"
    with Store.init(first, actor="admin") as s:
        s.set("team/db", "app", "shared")
    # Ten reads in all for actor "ci", refilled at one an hour: whichever
    # host asks, the same bucket (a row in the shared database) answers.
    limit = ('[[rate_limits]]\nactors = ["ci"]\nservices = ["*"]\noperations = ["read"]\n'
             'limit = 1\nper = "1h"\nburst = 10\n')
    homes = [_host(tmp_path, first, i, limit) for i in range(8)]
    done = _together([_start(READER, str(h), env={"KEYRING_HARDENED_ACTOR": "ci"})
                      for h in homes])
    codes = [int(c) for code, out, _ in done for c in out.split("\n")[-2].split(",")]
    assert all(code == 0 for code, _, _ in done), done
    assert sorted(set(codes)) == [0, 5]
    assert codes.count(0) == 10, codes  # 32 asked, 10 granted, across 8 hosts
    with Store.open(first) as s:
        events = [e for e in s.trail.show(limit=1000) if e.actor == "ci"]
    assert sorted(e.outcome for e in events) == sorted(
        ["ok"] * 10 + ["rate-limited"] * 22)


GETTER = textwrap.dedent("""
    import sys
    from keyring_hardened.store import Store
    with Store.open(sys.argv[1]) as s:
        print("ready", flush=True)
        sys.stdin.readline()
        print(s.get("team/token", "ci").reveal())
""")


def test_one_refresher_run_for_eight_hosts(shared: str, tmp_path: Path) -> None:
    first = tmp_path / "host0"
    clock_start = time.time()
    with Store.init(first, actor="admin") as s:
        s.set("team/token", "ci", "old", ttl=1.0,
              refresher=counting(tmp_path, "fresh", sleep=0.5))
    homes = [_host(tmp_path, first, i) for i in range(8)]
    procs = [_start(GETTER, str(h)) for h in homes]
    time.sleep(max(0.0, clock_start + 1.2 - time.time()))  # expired for every host
    done = _together(procs)
    assert [(code, out.strip()) for code, out, _ in done] == [(0, "fresh-1")] * 8, done
    assert runs(tmp_path) == 1  # the lease, a row in the shared database, held


RESTART_WRITER = textwrap.dedent("""
    import json, sys, time
    from keyring_hardened.errors import StorageError
    from keyring_hardened.store import Store
    home, i, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    acked, failed, stamps = [], [], []
    with Store.open(home, actor=f"host{i}") as s:
        print("ready", flush=True)
        sys.stdin.readline()
        end, j = time.time() + seconds, 0
        while time.time() < end:
            j += 1
            try:
                s.set(f"host{i}", "u", f"v{j}")
                acked.append(j)
                stamps.append(time.time())
            except StorageError as exc:
                failed.append(str(exc))
    print(json.dumps({"acked": acked, "failed": failed, "stamps": stamps}))
""")


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_server_restart_among_writers_loses_nothing_acknowledged(
        shared: str, pg_managed_cluster: Cluster, tmp_path: Path,
        mode: Literal["fast", "immediate"]) -> None:
    first = tmp_path / "host0"
    Store.init(first).close()
    homes = [_host(tmp_path, first, i) for i in range(4)]
    procs = [_start(RESTART_WRITER, str(h), str(i), "6") for i, h in enumerate(homes)]
    for p in procs:
        assert p.stdout is not None
        assert p.stderr is not None
        line = p.stdout.readline()
        assert line == "ready\n", (line, p.stderr.read())
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    time.sleep(1.5)
    down = time.time()
    pg_managed_cluster.restart(mode)  # in the middle of their writes
    up = time.time()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    with Store.open(first) as s:
        for i, result in enumerate(results):
            # Each wrote before the restart and after it (retried through it).
            assert min(result["stamps"]) < down, (down, up)
            assert max(result["stamps"]) > up, (down, up)
            # Every acknowledged write is there: the last one is current, and
            # history (newest first) holds only values that were written.
            assert s.get(f"host{i}", "u").reveal() == f"v{result['acked'][-1]}"
            kept = [s.get(f"host{i}", "u", version=v.version).reveal()
                    for v in s.history(f"host{i}", "u")]
            assert kept[0] == f"v{result['acked'][-1]}"
            attempted = {f"v{j}" for j in range(1, result["acked"][-1] + 1)}
            assert set(kept) <= attempted
            for message in result["failed"]:
                # A failure that outlasted the retries names the server, not a password.
                assert "PostgreSQL vault at postgresql://" in message, message
        result = s.trail.verify()
        assert result.ok, result.problem


def test_the_canary_is_in_no_table_and_not_in_the_server_log(
        shared: str, pg_managed_cluster: Cluster, tmp_path: Path) -> None:
    home = tmp_path / "host0"
    assert run_cli("init", home=home).returncode == 0
    assert run_cli("set", "db.example.com", "app", stdin=CANARY, home=home).returncode == 0
    got = run_cli("get", "db.example.com", "app", home=home)
    assert got.stdout.strip() == CANARY
    assert run_cli("set", "db.example.com", "app", stdin="other", home=home).returncode == 0
    assert run_cli("rollback", "db.example.com", "app", home=home).returncode == 0
    with Store.open(home) as s:
        s.set("svc", "ttl", CANARY, ttl=3600.0)
        assert s.history("db.example.com", "app")
        assert s.trail.verify().ok
    dump = pg_managed_cluster.all_tables_dump(dbname_of(shared))
    assert dump  # the dump holds the vault's rows: ciphertexts, never the secret
    for form in (CANARY.encode(), CANARY.encode().hex().encode(), CANARY.encode("utf-16-le")):
        assert form not in dump
    log = pg_managed_cluster.log_text()
    assert "INSERT INTO secret_versions" in log  # the log does record every statement
    assert CANARY not in log
    assert CANARY.encode().hex() not in log


def test_status_names_the_server_never_the_password(pg_cluster: PgServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "pw-" + CANARY
    pg_cluster.create_role("kh_pw_status", secret)
    url = pg_cluster.new_database(owner="kh_pw_status")
    tcp = pg_cluster.tcp_url(dbname_of(url), "kh_pw_status", secret)
    monkeypatch.setenv(URL, tcp)
    home = tmp_path / "host0"
    assert run_cli("init", home=home).returncode == 0
    status = run_cli("status", "--json", home=home)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["database"].startswith("postgresql://kh_pw_status@127.0.0.1:")
    assert secret not in status.stdout + status.stderr
    text = run_cli("status", home=home)
    assert "storage: postgresql://kh_pw_status@127.0.0.1:" in text.stdout
    assert secret not in text.stdout + text.stderr
    # A wrong password: exit 8 naming the server, and neither password shown.
    wrong = pg_cluster.tcp_url(dbname_of(url), "kh_pw_status", "wrong-" + CANARY)
    done = run_cli("get", "a", "b", home=home, env={URL: wrong})
    assert done.returncode == 8
    assert "PostgreSQL vault at postgresql://kh_pw_status@127.0.0.1:" in done.stderr
    assert CANARY not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    # A server that is not there: exit 8 naming it, after the bounded retries.
    gone = tcp.replace(tcp.split("@")[1].split("/")[0], "127.0.0.1:1")
    (home / "config.toml").write_text("[storage]\nbusy_timeout = \"1s\"\n")
    (home / "config.toml").chmod(0o600)
    done = run_cli("get", "a", "b", home=home, env={URL: gone})
    assert done.returncode == 8
    assert "127.0.0.1:1" in done.stderr
    assert CANARY not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.fixture
def pw_database(pg_cluster: PgServer) -> tuple[str, str]:
    """A database owned by a role that needs its password: (URL without it, password)."""
    password = "pg-secret-" + os.urandom(6).hex()
    role = "kh_pw_" + os.urandom(4).hex()
    pg_cluster.create_role(role, password)
    url = pg_cluster.new_database(owner=role)
    return pg_cluster.tcp_url(dbname_of(url), role, None), password


def test_the_password_from_pgpassfile(pw_database: tuple[str, str], tmp_path: Path) -> None:
    url, password = pw_database
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:*:{password}\n")
    passfile.chmod(0o600)
    home = tmp_path / "host0"
    env = {URL: url, "PGPASSFILE": str(passfile)}
    assert run_cli("init", home=home, env=env).returncode == 0
    assert run_cli("set", "s", "u", stdin="v", home=home, env=env).returncode == 0
    assert run_cli("get", "s", "u", home=home, env=env).stdout == "v\n"
    without = run_cli("get", "s", "u", home=home, env={URL: url, "PGPASSFILE": "/nonexistent"})
    assert without.returncode == 8
    assert password not in without.stderr


def test_the_password_from_a_command(pw_database: tuple[str, str], tmp_path: Path) -> None:
    url, password = pw_database
    helper = tmp_path / "pw.sh"
    helper.write_text(f"#!/bin/sh\necho '{password}'\n")
    helper.chmod(0o700)
    home = tmp_path / "host0"
    home.mkdir(mode=0o700)
    config = home / "config.toml"
    config.write_text(f'[storage]\nurl = "{url}"\npassword_command = ["{helper}"]\n')
    config.chmod(0o600)
    assert run_cli("init", home=home).returncode == 0
    assert run_cli("set", "s", "u", stdin="v", home=home).returncode == 0
    done = run_cli("get", "s", "u", home=home)
    assert (done.returncode, done.stdout) == (0, "v\n")
    helper.write_text("#!/bin/sh\necho 'not-the-password'\n")
    done = run_cli("get", "s", "u", home=home)
    assert done.returncode == 8
    assert "not-the-password" not in done.stderr
    helper.write_text("#!/bin/sh\nexit 3\n")
    done = run_cli("get", "s", "u", home=home)
    assert done.returncode == 8
    assert "storage.password_command" in done.stderr
    assert "status 3" in done.stderr


def test_the_password_from_another_keyring(pw_database: tuple[str, str],
                                           tmp_path: Path) -> None:
    url, password = pw_database
    home = tmp_path / "host0"
    home.mkdir(mode=0o700)
    config = home / "config.toml"
    config.write_text(f'[storage]\nurl = "{url}"\npassword_keyring = "postgres.example"\n')
    config.chmod(0o600)
    env = {"PYTHON_KEYRING_BACKEND": "keyrings.alt.file.PlaintextKeyring"}
    user = url.split("//")[1].split("@")[0]
    put = subprocess.run([sys.executable, "-m", "keyring", "set", "postgres.example", user],
                         input=password + "\n", text=True, capture_output=True, check=False,
                         env=dict(os.environ, **env))
    assert put.returncode == 0, put.stderr
    assert run_cli("init", home=home, env=env).returncode == 0
    assert run_cli("set", "s", "u", stdin="v", home=home, env=env).returncode == 0
    assert run_cli("get", "s", "u", home=home, env=env).stdout == "v\n"
    # keyring-hardened itself as keyring's backend: refused, never a recursion.
    done = run_cli("get", "s", "u", home=home,
                   env={"PYTHON_KEYRING_BACKEND": "keyring_hardened.backend.HardenedKeyring"})
    assert done.returncode == 2
    assert "keyring-hardened itself" in done.stderr


def test_a_password_in_the_config_url_is_refused(pg_url: str, tmp_path: Path) -> None:
    home = tmp_path / "host0"
    home.mkdir(mode=0o700)
    config = home / "config.toml"
    config.write_text('[storage]\nurl = "postgresql://app:hunter2secret@db.example/vault"\n')
    config.chmod(0o600)
    done = run_cli("status", home=home)
    assert done.returncode == 2
    assert "storage.url" in done.stderr
    assert "hunter2secret" not in done.stderr
    done = run_cli("migrate-storage", "--to", "postgresql://a:hunter2secret@h/db", home=home)
    assert done.returncode == 2
    assert "hunter2secret" not in done.stderr


def test_migrate_storage_both_ways_verified_and_never_into_a_vault(
        pg_cluster: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "host0"
    with Store.init(home, actor="admin") as s:
        for i in range(20):
            s.set("svc", f"u{i}", f"value-{i}")
        s.set("svc", "u0", "newer")
        s.delete("svc", "u1")
        s.set("ttl", "x", "t", ttl=3600.0)
        s.keys.rotate()
        s.seal()
        s.unseal()
    target = pg_cluster.new_database()
    done = run_cli("migrate-storage", "--to", target, "--json", home=home)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["credentials"] == 20
    assert report["versions"] == 22
    # Into a vault: refused, and the target is left as it was.
    again = run_cli("migrate-storage", "--to", target, home=home)
    assert again.returncode == 2
    assert "already holds a vault" in again.stderr
    monkeypatch.setenv(URL, target)
    with Store.open(home) as s:
        assert s.get("svc", "u0").reveal() == "newer"
        assert s.get("svc", "u0", version=1).reveal() == "value-0"
        assert s.trail.verify().ok
        s.set("svc", "after", "moved")
    back = tmp_path / "back.db"
    done = run_cli("migrate-storage", "--to", f"sqlite://{back}", home=home, env={URL: target})
    assert done.returncode == 0, done.stderr
    monkeypatch.delenv(URL)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    shutil.copy2(back, other / "vault.db")
    shutil.copy2(home / "master.key", other / "master.key")
    with Store.open(other) as s:
        assert s.get("svc", "after").reveal() == "moved"
        assert s.trail.verify().ok


def test_a_vault_on_postgresql_refuses_file_copies(shared: str, tmp_path: Path) -> None:
    home = tmp_path / "host0"
    Store.init(home).close()
    done = run_cli("backup", str(tmp_path / "b.db"), home=home)
    assert done.returncode == 2
    assert "migrate-storage" in done.stderr
    assert not (tmp_path / "b.db").exists()
    done = run_cli("restore", str(tmp_path / "b.db"), home=home)
    assert done.returncode == 2
    assert "migrate-storage" in done.stderr


def test_the_root_key_is_in_no_table(shared: str, pg_cluster: PgServer, tmp_path: Path) -> None:
    home = tmp_path / "host0"
    with Store.init(home) as s:
        s.set("svc", "u", "v")
        s.keys.rotate()
    key = (home / "master.key").read_bytes()
    dump = pg_cluster.all_tables_dump(dbname_of(shared))
    for form in (key, key.hex().encode(), key.hex().upper().encode()):
        assert form not in dump


def test_a_row_edited_behind_the_vaults_back_is_exit_3(shared: str, tmp_path: Path) -> None:
    import psycopg

    home = tmp_path / "host0"
    with Store.init(home) as s:
        s.set("svc", "a", "first")
        s.set("svc", "b", "second")
    with psycopg.connect(shared, autocommit=True) as conn:
        # Swap the two credentials' ciphertexts and wrapped keys, as a DBA could.
        conn.execute("UPDATE secret_versions v SET wrapped_key = o.wrapped_key,"
                     " ciphertext = o.ciphertext, digest = o.digest FROM secret_versions o"
                     " WHERE v.credential_id <> o.credential_id")
    done = run_cli("get", "svc", "a", home=home)
    assert done.returncode == 3, done.stderr
    assert "first" not in done.stdout + done.stderr
    assert "second" not in done.stdout + done.stderr


def test_least_privilege_clients_read_and_write_but_change_no_schema(
        pg_cluster: PgServer, tmp_path: Path) -> None:
    import psycopg

    owner, client = "kh_pw_owner_" + os.urandom(3).hex(), "kh_pw_client_" + os.urandom(3).hex()
    pg_cluster.create_role(owner, "owner-pw")
    pg_cluster.create_role(client, "client-pw")
    admin = pg_cluster.new_database(owner=owner)
    db = dbname_of(admin)
    home = tmp_path / "host0"
    as_owner = {URL: pg_cluster.tcp_url(db, owner, "owner-pw")}
    assert run_cli("init", home=home, env=as_owner).returncode == 0
    with psycopg.connect(pg_cluster.tcp_url(db, owner, "owner-pw"), autocommit=True) as conn:
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
                     f" TO {client}")
        conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {client}")
    as_client = {URL: pg_cluster.tcp_url(db, client, "client-pw")}
    assert run_cli("set", "svc", "u", stdin="v", home=home, env=as_client).returncode == 0
    assert run_cli("get", "svc", "u", home=home, env=as_client).stdout == "v\n"
    assert run_cli("delete", "svc", "u", "--purge", home=home, env=as_client).returncode == 0
    assert run_cli("audit", "verify", home=home, env=as_client).returncode == 0
    # A pending migration needs the owner: the client says so, and changes nothing.
    with psycopg.connect(pg_cluster.tcp_url(db, owner, "owner-pw"), autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE name = '0006_refresh'")
        conn.execute("ALTER TABLE credentials DROP COLUMN refresh")
        conn.execute("DROP TABLE refresh_leases")
    done = run_cli("get", "svc", "u", home=home, env=as_client)
    assert done.returncode == 8
    assert "permission denied" in done.stderr
    assert "Traceback" not in done.stderr
    assert run_cli("status", home=home, env=as_owner).returncode == 0  # the owner migrates
    with psycopg.connect(pg_cluster.tcp_url(db, owner, "owner-pw"), autocommit=True) as conn:
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
                     f" TO {client}")
    assert run_cli("set", "svc", "u", stdin="w", home=home, env=as_client).returncode == 0


def test_purge_on_postgresql_says_what_remains(shared: str, tmp_path: Path) -> None:
    home = tmp_path / "host0"
    assert run_cli("init", home=home).returncode == 0
    assert run_cli("set", "svc", "u", stdin="v", home=home).returncode == 0
    done = run_cli("delete", "svc", "u", "--purge", home=home)
    assert done.returncode == 0
    assert "PostgreSQL at postgresql://" in done.stderr
    assert "until vacuum reuses the space" in done.stderr
    assert done.stderr.count("until vacuum") == 1  # told once, not by the logger too


def test_after_a_rekey_other_hosts_need_the_new_key_file(shared: str, tmp_path: Path) -> None:
    first = tmp_path / "host0"
    with Store.init(first) as s:
        s.set("svc", "u", "v")
    other = _host(tmp_path, first, 1)
    assert run_cli("get", "svc", "u", home=other).returncode == 0
    assert run_cli("key", "rekey", home=first).returncode == 0
    done = run_cli("get", "svc", "u", home=other)
    assert done.returncode == 6, done.stderr
    assert done.stdout != "v\n"
    shutil.copy2(first / "master.key", other / "master.key")
    assert run_cli("get", "svc", "u", home=other).stdout == "v\n"


def _certificates(folder: Path) -> tuple[Path, Path, Path, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def ca(text: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(text)).issuer_name(name(text))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = ca("kh test CA")
    _, other_cert = ca("another CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder().subject_name(name("127.0.0.1"))
              .issuer_name(ca_cert.subject).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName(
                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = (folder / "ca.pem", folder / "server.crt", folder / "server.key",
             folder / "other-ca.pem")
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(server.public_bytes(pem))
    paths[2].write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    paths[3].write_bytes(other_cert.public_bytes(pem))
    return paths


def test_sslmode_verify_full_checks_the_server(pg_managed_cluster: Cluster,
                                               tmp_path: Path) -> None:
    import psycopg

    ca, crt, key, other = _certificates(tmp_path)
    data = pg_managed_cluster.datadir
    owner = data.stat()
    for source in (crt, key):
        target = data / f"kh-{source.name}"
        shutil.copy2(source, target)
        os.chown(target, owner.st_uid, owner.st_gid)
        target.chmod(0o600)
    admin = pg_managed_cluster.admin_url()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET ssl_cert_file = '{data / 'kh-server.crt'}'")
        conn.execute(f"ALTER SYSTEM SET ssl_key_file = '{data / 'kh-server.key'}'")
        conn.execute("ALTER SYSTEM SET ssl = on")
        conn.execute("SELECT pg_reload_conf()")
    try:
        role = "kh_pw_tls_" + os.urandom(3).hex()
        pg_managed_cluster.create_role(role, "tls-pw")
        db = dbname_of(pg_managed_cluster.new_database(owner=role))
        base = pg_managed_cluster.tcp_url(db, role, "tls-pw")
        home = tmp_path / "host0"
        good = {URL: f"{base}?sslmode=verify-full&sslrootcert={ca}"}
        deadline = time.monotonic() + 10
        while (done := run_cli("init", home=home, env=good)).returncode != 0:
            assert time.monotonic() < deadline, done.stderr  # the reload takes a moment
            time.sleep(0.2)
        assert run_cli("set", "svc", "u", stdin="v", home=home, env=good).returncode == 0
        assert run_cli("get", "svc", "u", home=home, env=good).stdout == "v\n"
        with psycopg.connect(f"{base}?sslmode=verify-full&sslrootcert={ca}") as conn:
            assert conn.pgconn.ssl_in_use
        # A server whose certificate another CA signed: refused, exit 8, naming the server.
        bad = {URL: f"{base}?sslmode=verify-full&sslrootcert={other}"}
        done = run_cli("get", "svc", "u", home=home, env=bad)
        assert done.returncode == 8
        assert "certificate verify failed" in done.stderr
        assert "PostgreSQL vault at postgresql://" in done.stderr
        assert "tls-pw" not in done.stderr
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET ssl")
            conn.execute("SELECT pg_reload_conf()")
