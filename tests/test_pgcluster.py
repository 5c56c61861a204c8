"""The PostgreSQL test harness itself: clusters, databases, roles, restarts, log, selection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from . import conftest_pg
from .conftest_pg import pg_available
from .pgcluster import (
    URL_ENV,
    Cluster,
    ExternalServer,
    PgServer,
    Selection,
    dbname_of,
    find_bindir,
    reap_stale,
    select_server,
)


def _tables(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN "
            "('pg_catalog', 'information_schema')").fetchall()


def test_two_new_databases_are_distinct_and_empty(pg_cluster: PgServer) -> None:
    first, second = pg_cluster.new_database(), pg_cluster.new_database()
    try:
        assert first != second
        with psycopg.connect(first, autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
            conn.execute("CREATE TABLE only_in_first (x int)")
            conn.execute("INSERT INTO only_in_first VALUES (1)")
        assert _tables(first) == [("public", "only_in_first")]
        assert _tables(second) == []
    finally:
        pg_cluster.drop_database(first)
        pg_cluster.drop_database(second)


def test_pg_url_is_a_fresh_database(pg_url: str) -> None:
    assert _tables(pg_url) == []


def test_password_role_over_tcp_and_socket(pg_managed_cluster: Cluster) -> None:
    cluster = pg_managed_cluster
    cluster.create_role("kh_pw_harness", "s3cret pass/word")
    name = dbname_of(cluster.new_database(owner="kh_pw_harness"))
    try:
        for url in (cluster.tcp_url(name, "kh_pw_harness", "s3cret pass/word"),
                    cluster.socket_url(name, "kh_pw_harness", "s3cret pass/word")):
            with psycopg.connect(url, autocommit=True) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("kh_pw_harness",)
                # It owns the database, so it may make its tables in public.
                conn.execute("CREATE TABLE t (x int)")
                conn.execute("DROP TABLE t")
        for url in (cluster.tcp_url(name, "kh_pw_harness"),
                    cluster.socket_url(name, "kh_pw_harness"),
                    cluster.tcp_url(name, "kh_pw_harness", "wrong"),
                    cluster.socket_url(name, "kh_pw_harness", "wrong")):
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(url, connect_timeout=10).close()
        # The superuser is trusted on the socket only, never over TCP without a password.
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(cluster.tcp_url(name, "postgres"), connect_timeout=10).close()
        # Only the SCRAM verifier reached the server, so the log never shows the password.
        assert "s3cret" not in cluster.log_text()
    finally:
        cluster.drop_database(name)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_keeps_committed_rows(pg_managed_cluster: Cluster, pg_url: str,
                                      mode: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept SELECT generate_series(1, 100)")
    conn = psycopg.connect(pg_url)
    try:
        conn.execute("INSERT INTO kept VALUES (101)")
        conn.commit()
        conn.execute("INSERT INTO kept VALUES (102)")  # never committed
        pg_managed_cluster.restart("immediate" if mode == "immediate" else "fast")
    finally:
        conn.close()  # no commit: the server is gone
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*), max(x) FROM kept").fetchone() == (101, 101)


def test_an_open_connection_sees_the_restart(pg_managed_cluster: Cluster, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        pg_managed_cluster.restart("immediate")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_log_statement_all_reaches_log_text(pg_managed_cluster: Cluster, pg_url: str) -> None:
    marker = "kh_log_marker_5d1e"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"SELECT '{marker}'")
    assert pg_managed_cluster.wait_for_log(marker)
    assert f"statement: SELECT '{marker}'" in pg_managed_cluster.log_text()


def test_all_tables_dump_shows_text_and_raw_bytes(pg_cluster: PgServer, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA other")
        conn.execute("CREATE TABLE a (name text, blob bytea)")
        conn.execute("CREATE TABLE other.b (doc jsonb)")
        conn.execute("INSERT INTO a VALUES ('in-text', %s)", (b"raw-bytes\x00\xff",))
        conn.execute("INSERT INTO other.b VALUES ('{\"k\": \"in-json\"}')")
        conn.execute("SELECT lo_from_bytea(0, 'in-large-object')")
    dump = pg_cluster.all_tables_dump(dbname_of(pg_url))
    assert b"in-text" in dump
    assert b"raw-bytes\x00\xff" in dump  # bytea as stored, not only as hex
    assert b"in-json" in dump
    assert b"in-large-object" in dump
    assert b"-- public.a" in dump
    assert b"-- other.b" in dump


def test_drop_database_refuses_what_it_did_not_make(pg_cluster: PgServer) -> None:
    for name in ("postgres", "template1", "postgresql://postgres@/postgres?host=/tmp"):
        with pytest.raises(ValueError, match="not a test database"):
            pg_cluster.drop_database(name)


def test_external_server_urls_keep_their_form() -> None:
    url = ExternalServer("postgresql://admin:pw@db.example:5433/postgres?sslmode=require")
    assert url.admin_url("kh_t_1") == (
        "postgresql://admin:pw@db.example:5433/kh_t_1?sslmode=require")
    assert url.tcp_url("kh_t_1", "kh_pw_x", "p w/") == (
        "postgresql://kh_pw_x:p%20w%2F@db.example:5433/kh_t_1")
    keyvalue = ExternalServer("host=/run/postgresql user=postgres dbname=postgres")
    assert dbname_of(keyvalue.admin_url("kh_t_1")) == "kh_t_1"
    assert keyvalue.tcp_url("kh_t_1", "u").startswith("postgresql://u@127.0.0.1:5432/")


def test_pg_cluster_fixture_matches_pg_available(pg_cluster: PgServer) -> None:
    assert pg_available()


# -- selection: which server, or skip, or fail --------------------------------

def _none() -> Path | None:
    return None


def test_ci_without_a_server_fails() -> None:
    chosen = select_server({"CI": "true"}, finder=_none)
    assert chosen.choice == "fail"
    assert "PostgreSQL is needed in CI" in chosen.detail
    assert "\n" not in chosen.detail


def test_without_a_server_outside_ci_skips_naming_how_to_install() -> None:
    for env in ({}, {"CI": "false"}, {"CI": ""}):
        chosen = select_server(env, finder=_none)
        assert chosen.choice == "skip"
        assert "apt-get install postgresql" in chosen.detail
        assert URL_ENV in chosen.detail


def test_url_wins_over_binaries_and_ci() -> None:
    url = "postgresql://postgres@db.example/postgres"
    assert select_server({URL_ENV: url, "CI": "true"}, finder=_none) == Selection("external", url)
    assert select_server({}, finder=lambda: Path("/opt/pg/bin")) == Selection(
        "cluster", "/opt/pg/bin")


def test_the_fixture_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest_pg, "_selection", select_server({"CI": "true"}, finder=_none))
    assert not pg_available()
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is needed in CI"):
        conftest_pg._require(conftest_pg.pg_selection())
    monkeypatch.setattr(conftest_pg, "_selection", select_server({}, finder=_none))
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL server"):
        conftest_pg._require(conftest_pg.pg_selection())


def test_ci_without_a_server_fails_the_run(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A real pytest run whose finder finds nothing: in CI a test needing PostgreSQL
    # errors (the run fails) with one line; outside CI the same test skips.
    (tmp_path / "conftest.py").write_text(
        "import tests.pgcluster\n"
        "tests.pgcluster.find_bindir = lambda *args: None\n"
        "pytest_plugins = ['tests.conftest_pg']\n")
    (tmp_path / "test_needs_pg.py").write_text("def test_needs_pg(pg_url):\n    pass\n")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    monkeypatch.delenv(URL_ENV, raising=False)
    outcomes = {}
    for ci in ("true", "false"):
        monkeypatch.setenv("CI", ci)
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                              "-p", "no:xdist", "-rA", "test_needs_pg.py"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120, check=False)
        outcomes[ci] = (run.returncode, run.stdout)
    code, out = outcomes["true"]
    assert code == 1, out
    assert "1 error" in out
    assert "PostgreSQL is needed in CI" in out
    code, out = outcomes["false"]
    assert code == 0, out
    assert "1 skipped" in out
    assert "apt-get install postgresql" in out


def test_find_bindir_takes_the_highest_version(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("9.6", "13", "15", "16"):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        tools = ("initdb", "pg_ctl", "postgres") if version != "16" else ("pg_ctl",)
        for tool in tools:
            (bindir / tool).write_text("#!/bin/sh\n")
            (bindir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    # 16 has no initdb (a client-only package): 15 is the highest with a server.
    assert find_bindir(str(tmp_path / "*" / "bin")) == tmp_path / "15" / "bin"
    assert find_bindir(str(tmp_path / "none" / "*" / "bin")) is None


def test_reap_stale_removes_only_clusters_whose_owner_died(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    for name, owner in (("kh-pg-dead", dead.stdout.strip()), ("kh-pg-live", str(os.getpid())),
                        ("kh-pg-unowned", None)):
        (tmp_path / name / "data").mkdir(parents=True)
        # A pid file naming a live process that is not this cluster's postmaster.
        (tmp_path / name / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n")
        if owner is not None:
            (tmp_path / name / "owner.pid").write_text(owner + "\n")
    assert reap_stale(str(tmp_path)) == [tmp_path / "kh-pg-dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kh-pg-live", "kh-pg-unowned"]
