"""A leaked root key: after ``key rekey`` the old key file and an old copy are worth nothing new.

The attacker holds the pre-rekey ``master.key`` and a pre-rekey copy of
``vault.db``, and can write the current ``vault.db``. With the CLI and plain
``sqlite3`` they try to read what was written after the rekey, to forge a
head, and to append an event; the owner must never be handed the forgery,
and ``audit verify`` must catch whatever they wrote (issue 8).

Deleted material must reach the disk too: purge, retire, rekey and version
pruning check their WAL checkpoint, and warn when a reader blocks it.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from .conftest import CANARY, run_cli
from .test_replay import (
    TRAIL,
    Result,
    Snapshot,
    changed_tables,
    clean_env,
    cli_batch,
    cli_steps,
    cmd,
    copy_vault,
    is_free,
    put,
    snapshot,
    write_back,
)

NEW_ALICE = "after-rekey-" + CANARY
NEW_DAVE = "dave-after-rekey"
FORGED = "forged-by-the-old-key"
SECRET_TABLES = frozenset({"credentials", "secret_versions"})


class Leak(NamedTuple):
    """A vault rekeyed after its key file and database were copied."""

    home: Path        # current vault (new key file), never modified by tests
    old: Path         # the attacker's copies: pre-rekey vault.db and master.key
    before: Snapshot  # rows of the old copy
    after: Snapshot   # rows of the current vault
    scratch: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def leak(tmp_path_factory: pytest.TempPathFactory) -> Leak:
    base = tmp_path_factory.mktemp("leak")
    env = clean_env(base)
    home = base / "vault"
    cli_steps(home, (cmd("init"), put("alice", "alice-before-rekey"),
                     put("bob", "bob-before-rekey")), env)
    before = snapshot(home / "vault.db")
    old = copy_vault(home, base / "old")
    cli_steps(home, (cmd("key", "rekey"), put("alice", NEW_ALICE), put("dave", NEW_DAVE)), env)
    assert (home / "master.key").read_bytes() != (old / "master.key").read_bytes()
    return Leak(home, old, before, snapshot(home / "vault.db"), base / "scratch", env)


def _key_tables(leak: Leak) -> list[str]:
    """Tables the rekey changed that hold no credential and no trail: the key records."""
    return [t for t in changed_tables(leak.before, leak.after)
            if t not in SECRET_TABLES and t not in TRAIL and not is_free(t)]


def _copy(leak: Leak, source: Path, name: str, key_from: Path) -> Path:
    """A copy of ``source`` with the key file of ``key_from``."""
    home = copy_vault(source, leak.scratch / name)
    shutil.copy2(key_from / "master.key", home / "master.key")
    return home


def _gets(leak: Leak, home: Path, *users: str) -> list[Result]:
    return cli_batch([(home, cmd("get", "svc", u)) for u in users], leak.env)


def test_old_key_file_does_not_open_the_rekeyed_vault(leak: Leak) -> None:
    home = _copy(leak, leak.home, "old-key-current-db", leak.old)
    for result in _gets(leak, home, "alice", "dave", "bob"):
        assert (result.code, result.out) == (6, ""), result.err


def test_pre_rekey_vault_record_with_the_current_key_reveals_nothing(leak: Leak) -> None:
    home = _copy(leak, leak.home, "current-key-old-record", leak.home)
    write_back(home / "vault.db", leak.before, ["vault"])
    for result in _gets(leak, home, "alice", "dave", "bob"):
        assert result.code in (3, 6), result
        assert result.out == ""


def test_old_key_records_written_back_decrypt_no_secret_written_after_the_rekey(
        leak: Leak) -> None:
    keys = _key_tables(leak)
    assert "vault" in keys
    variants = {"+".join(keys): keys, **{t: [t] for t in keys}}
    problems = []
    for n, (label, tables) in enumerate(variants.items()):
        home = _copy(leak, leak.home, f"old-records-{n}", leak.old)
        write_back(home / "vault.db", leak.before, tables)
        alice, dave = _gets(leak, home, "alice", "dave")
        for user, result in (("alice", alice), ("dave", dave)):
            if result.code not in (3, 6) or result.out:
                problems.append(f"old key, {label} written back: get {user} -> exit "
                                f"{result.code} {result.out.strip()!r}")
    assert not problems, "\n".join(problems)


def test_new_secret_rows_moved_into_the_old_copy_do_not_decrypt_with_the_old_key(
        leak: Leak) -> None:
    rest = [t for t in leak.after if t not in _key_tables(leak) and not is_free(t)]
    problems = []
    for n, tables in enumerate((sorted(SECRET_TABLES), rest)):
        home = _copy(leak, leak.old, f"old-copy-new-rows-{n}", leak.old)
        write_back(home / "vault.db", leak.after, tables)
        for user, result in zip(("alice", "dave"), _gets(leak, home, "alice", "dave"),
                                strict=True):
            if result.code not in (3, 6) or result.out:
                problems.append(f"old copy, current {'+'.join(tables)}: get {user} -> exit "
                                f"{result.code} {result.out.strip()!r}")
    assert not problems, "\n".join(problems)


def test_head_forged_on_the_old_copy_is_rejected_by_the_rekeyed_vault(leak: Leak) -> None:
    forger = _copy(leak, leak.old, "forger", leak.old)
    cli_steps(forger, (put("alice", FORGED),), leak.env)
    forged = snapshot(forger / "vault.db")
    home = _copy(leak, leak.home, "victim", leak.home)
    write_back(home / "vault.db", forged, sorted(SECRET_TABLES))
    got, verified = cli_batch([(home, cmd("get", "svc", "alice")),
                               (home, cmd("audit", "verify"))], leak.env)
    assert got.code == 3, got
    assert got.out == ""
    assert verified.code == 3, verified


def test_event_appended_with_the_old_key_does_not_verify(leak: Leak) -> None:
    keys = _key_tables(leak)
    home = _copy(leak, leak.home, "append", leak.old)
    db = home / "vault.db"
    write_back(db, leak.before, keys)  # the old key opens the current vault again?
    attacker = cli_batch([(home, put("alice", FORGED))], leak.env)[0]
    appended = snapshot(db)["audit_events"].rows != leak.after["audit_events"].rows
    write_back(db, leak.after, keys)  # cover the tracks: the owner's key records back
    shutil.copy2(leak.home / "master.key", home / "master.key")
    got, verified = cli_batch([(home, cmd("get", "svc", "alice")),
                               (home, cmd("audit", "verify"))], leak.env)
    assert FORGED not in got.out, f"the old key forged a value (attacker's set: {attacker})"
    assert got.code in (0, 3), got
    if appended:
        assert verified.code == 3, f"an event appended with the old key verifies: {verified}"


# -- deleted material reaches the disk, or the command says what remains -----------------


@pytest.fixture
def reader_blocked(home: Path) -> Iterator[Path]:
    """A vault whose key 1 is unused and alice has two versions; then a reader holds it open."""
    steps = [("init",), ("set", "svc", "alice"), ("set", "svc", "alice"), ("key", "rotate"),
             ("key", "rewrap")]
    for args in steps:
        assert run_cli(*args, home=home, stdin="value-1\n").returncode == 0
    # A short busy timeout, so a checkpoint blocked by the reader gives up quickly.
    (home / "config.toml").write_text('max_versions = 2\n[storage]\nbusy_timeout = "1s"\n')
    (home / "config.toml").chmod(0o600)
    reader = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM secret_versions").fetchone()
        yield home
    finally:
        reader.close()


@pytest.mark.parametrize("args", [
    ("delete", "--purge", "svc", "alice"),
    ("key", "retire", "--below", "2"),
    ("key", "rekey"),
    # A version pruned by max_versions is not checkpointed at once (that would
    # cost an fsync per write); docs/credential-storage-security.md says so.
], ids=["purge", "retire", "rekey"])
def test_checkpoint_blocked_by_a_reader_says_what_remains_on_disk(
        reader_blocked: Path, args: tuple[str, ...]) -> None:
    done = run_cli(*args, home=reader_blocked, stdin="value-3\n")
    assert done.returncode == 0, done.stderr
    assert "vault.db-wal" in done.stderr, done.stderr


def test_purge_without_a_reader_says_nothing_remains(home: Path) -> None:
    for args in (("init",), ("set", "svc", "alice")):
        assert run_cli(*args, home=home, stdin="value\n").returncode == 0
    done = run_cli("delete", "--purge", "svc", "alice", home=home)
    assert done.returncode == 0, done.stderr
    assert "vault.db-wal" not in done.stderr
