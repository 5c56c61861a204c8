"""Tampering with the stored data: never a wrong secret, always a clear integrity error."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from keyring_hardened.errors import IntegrityError, LockedError
from keyring_hardened.store import Store

from .conftest import CANARY, run_cli

Tamper = Callable[[sqlite3.Connection], None]


@pytest.fixture
def vault(home: Path) -> Path:
    with Store.init(home) as s:
        s.set("svc", "alice", "alice-secret-1")
        s.set("svc", "alice", CANARY)
        s.set("svc", "bob", "bob-secret")
    return home


def _db(home: Path, change: Tamper) -> None:
    conn = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        conn.execute("BEGIN")
        change(conn)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _exec(conn: sqlite3.Connection, sql: str) -> None:
    conn.execute(sql)


def _flip(table: str, column: str, where: str, index: int) -> Tamper:
    def change(conn: sqlite3.Connection) -> None:
        blob = bytearray(conn.execute(f"SELECT {column} FROM {table} WHERE {where}").fetchone()[0])
        blob[index % len(blob)] ^= 0x01
        conn.execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (bytes(blob),))
    return change


ALICE_CURRENT = ("credential_id = (SELECT id FROM credentials WHERE username = 'alice')"
                 " AND version = 2")


def _swap_ciphertexts(conn: sqlite3.Connection) -> None:
    rows = conn.execute("SELECT credential_id, version, wrapped_key, ciphertext"
                        " FROM secret_versions ORDER BY credential_id, version").fetchall()
    (a_id, a_v, a_w, a_c), (b_id, b_v, b_w, b_c) = rows[1], rows[2]
    conn.execute("UPDATE secret_versions SET wrapped_key = ?, ciphertext = ?"
                 " WHERE credential_id = ? AND version = ?", (b_w, b_c, a_id, a_v))
    conn.execute("UPDATE secret_versions SET wrapped_key = ?, ciphertext = ?"
                 " WHERE credential_id = ? AND version = ?", (a_w, a_c, b_id, b_v))


def _swap_versions(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE secret_versions SET version = -version WHERE credential_id ="
                 " (SELECT id FROM credentials WHERE username = 'alice')")
    conn.execute("UPDATE secret_versions SET version = 3 + version WHERE version < 0")


def _swap_names(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE credentials SET username = 'tmp' WHERE username = 'alice'")
    conn.execute("UPDATE credentials SET username = 'alice' WHERE username = 'bob'")
    conn.execute("UPDATE credentials SET username = 'bob' WHERE username = 'tmp'")


def _move_pointer_back(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE credentials SET current_version = 1 WHERE username = 'alice'")


def _undelete(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE credentials SET current_version = NULL WHERE username = 'alice'")


def _drop_current_row(conn: sqlite3.Connection) -> None:
    conn.execute(f"DELETE FROM secret_versions WHERE {ALICE_CURRENT}")


def _claim_other_kek(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO keks (version, state, created_at, wrapped, wrap_count)"
                 " SELECT 2, 'decrypt-only', created_at, wrapped, 0 FROM keks WHERE version = 1")
    conn.execute(f"UPDATE secret_versions SET kek_version = 2 WHERE {ALICE_CURRENT}")


CASES: dict[str, Tamper] = {
    **{f"wrapped_key[{i}]": _flip("secret_versions", "wrapped_key", ALICE_CURRENT, i)
       for i in (0, 1, 12, 13, 40, -1)},
    **{f"ciphertext[{i}]": _flip("secret_versions", "ciphertext", ALICE_CURRENT, i)
       for i in (0, 1, 12, 13, -1)},
    "head version digest": _flip("credentials", "versions_digest", "username = 'alice'", 3),
    "head updated_at": lambda c: _exec(c, "UPDATE credentials SET updated_at = updated_at + 1"
                                          " WHERE username = 'alice'"),
    "swap ciphertexts between credentials": _swap_ciphertexts,
    "swap versions": _swap_versions,
    "swap usernames": _swap_names,
    "pointer moved back": _move_pointer_back,
    "current row deleted": _drop_current_row,
    "version under another kek": _claim_other_kek,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tampered_credential_is_integrity_error(vault: Path, name: str) -> None:
    _db(vault, CASES[name])
    with pytest.raises(IntegrityError) as info, Store.open(vault) as s:
        s.get("svc", "alice")
    assert CANARY not in str(info.value)
    assert "alice-secret-1" not in str(info.value)


@pytest.mark.parametrize("name", ["swap ciphertexts between credentials", "ciphertext[13]",
                                  "pointer moved back"])
def test_tampered_credential_via_cli(vault: Path, name: str) -> None:
    _db(vault, CASES[name])
    done = run_cli("get", "svc", "alice", home=vault)
    assert done.returncode == 3
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert CANARY not in done.stderr


def test_tampered_deletion_flag_is_detected(vault: Path) -> None:
    _db(vault, _undelete)
    with Store.open(vault) as s, pytest.raises(IntegrityError):
        s.get("svc", "alice")


def test_untouched_neighbour_still_reads(vault: Path) -> None:
    _db(vault, _flip("secret_versions", "ciphertext", ALICE_CURRENT, 20))
    with Store.open(vault) as s:
        assert s.get("svc", "bob").reveal() == "bob-secret"
        assert s.get("svc", "alice", version=1).reveal() == "alice-secret-1"
        with pytest.raises(IntegrityError):
            s.get("svc", "alice")


def test_write_over_tampered_head_is_refused(vault: Path) -> None:
    _db(vault, _move_pointer_back)
    with Store.open(vault) as s:
        with pytest.raises(IntegrityError):
            s.set("svc", "alice", "new")
        with pytest.raises(IntegrityError):
            s.delete("svc", "alice")


def test_damaged_verifier_is_locked(vault: Path) -> None:
    _db(vault, _flip("vault", "verifier", "id = 1", 0))
    with pytest.raises(LockedError):
        Store.open(vault)
    assert run_cli("get", "svc", "alice", home=vault).returncode == 6


def test_damaged_kek_is_integrity(vault: Path) -> None:
    _db(vault, _flip("keks", "wrapped", "version = 1", 30))
    with pytest.raises(IntegrityError):
        Store.open(vault)
    assert run_cli("get", "svc", "alice", home=vault).returncode == 3


def test_damaged_kdf_record_is_integrity(vault: Path) -> None:
    _db(vault, lambda c: _exec(c, "UPDATE vault SET kdf = '{\"algorithm\": 5'"))
    with pytest.raises(IntegrityError, match="key derivation"):
        Store.open(vault)


def test_missing_vault_record_is_integrity(vault: Path) -> None:
    _db(vault, lambda c: _exec(c, "DELETE FROM vault"))
    with pytest.raises(IntegrityError, match="no vault record"):
        Store.open(vault)


@pytest.mark.parametrize("keep", [0, 50, 4096, -4096])
def test_truncated_database_is_never_reinitialised(vault: Path, keep: int) -> None:
    db = vault / "vault.db"
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.truncate(keep if keep >= 0 else size + keep)
    before = db.read_bytes()
    for args in (("get", "svc", "alice"), ("set", "svc", "carol"), ("list",), ("status",)):
        done = run_cli(*args, home=vault, stdin="new-secret\n")
        assert done.returncode == 3, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert db.read_bytes() == before
    done = run_cli("init", home=vault)
    assert done.returncode == 2
    assert "already exists" in done.stderr
    assert db.read_bytes() == before


def test_foreign_sqlite_file_is_refused(home: Path) -> None:
    home.mkdir()
    conn = sqlite3.connect(home / "vault.db")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    os.chmod(home / "vault.db", 0o600)  # private, or the trust check refuses it first
    with pytest.raises(IntegrityError, match="not a keyring-hardened vault"):
        Store.open(home)


def test_garbage_file_is_refused(home: Path) -> None:
    home.mkdir()
    (home / "vault.db").write_bytes(os.urandom(8192))
    os.chmod(home / "vault.db", 0o600)  # private, or the trust check refuses it first
    with pytest.raises(IntegrityError):
        Store.open(home)


@pytest.mark.parametrize("statement", [
    "UPDATE secret_versions SET ciphertext = CAST(x'ff00' AS TEXT)",
    "UPDATE credentials SET service = CAST(x'ff' AS TEXT) WHERE username = 'alice'",
    "UPDATE credentials SET service = x'73766300' WHERE username = 'alice'",
    "UPDATE credentials SET current_version = 'two' WHERE username = 'alice'",
    "UPDATE secret_versions SET kek_version = 'one'",
    "UPDATE secret_versions SET created_at = 'yesterday'",
    "UPDATE credentials SET mac = 5 WHERE username = 'alice'",
])
def test_values_of_the_wrong_type_are_integrity_errors(vault: Path, statement: str) -> None:
    _db(vault, lambda c: _exec(c, statement))
    got = run_cli("get", "svc", "alice", home=vault)
    listed = run_cli("list", home=vault)
    # A renamed row is simply not found under its old name; every other read
    # of the damaged row is an integrity error.
    assert got.returncode in (1, 3), got.stderr
    assert 3 in (got.returncode, listed.returncode)
    for done in (got, listed):
        assert len(done.stderr.splitlines()) <= 1
        assert "\\x" not in done.stderr
        assert CANARY not in done.stdout + done.stderr


@pytest.mark.parametrize(("statement", "get_code", "verify_code"), [
    ("UPDATE vault SET verifier = 'text'", 6, 6),  # a damaged key record reads as locked
    ("UPDATE vault SET vault_id = 5", 6, 6),
    ("UPDATE keks SET wrap_count = 'many'", 3, 3),
    ("UPDATE audit_events SET ts_us = 'noon' WHERE seq = 2", 0, 3),
    # The anchor is part of the authenticated state, read at every unlock.
    ("UPDATE audit_anchor SET seq = 'zero'", 3, 3),
])
def test_wrong_types_in_key_and_audit_records(vault: Path, statement: str, get_code: int,
                                              verify_code: int) -> None:
    _db(vault, lambda c: _exec(c, statement))
    got = run_cli("get", "svc", "alice", home=vault)
    verified = run_cli("audit", "verify", home=vault)
    assert (got.returncode, verified.returncode) == (get_code, verify_code), \
        got.stderr + verified.stderr
    assert "Traceback" not in got.stderr + verified.stderr
