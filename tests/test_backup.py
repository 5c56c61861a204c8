"""Keeping a copy: online backup, verified restore, and what both refuse."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keyring_hardened import backup as bk
from keyring_hardened.errors import IntegrityError, LockedError, UsageError
from keyring_hardened.store import Store

from .conftest import CANARY, run_cli


def _vault(home: Path, n: int = 5, prefix: str = "svc") -> None:
    with Store.init(home) as s:
        for i in range(n):
            s.set(f"{prefix}-{i}", "u", f"{CANARY}-{i}")


def _files(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(home.iterdir()) if p.is_file()}


def _open_copy(copy: Path, key: Path, where: Path) -> Store:
    """Open a backup file as a vault of its own, to look inside."""
    where.mkdir(mode=0o700)
    shutil.copy(copy, where / "vault.db")
    shutil.copy(key, where / "master.key")
    return Store.open(where)


def test_backup_cli_reports_and_writes_a_private_verified_copy(home: Path,
                                                                tmp_path: Path) -> None:
    _vault(home)
    target = tmp_path / "out" / "vault-backup.db"
    target.parent.mkdir()
    os.umask(0o022)
    done = run_cli("backup", str(target), home=home)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout
    assert "useless without the root key" in done.stdout
    assert "credentials: 5 live" in done.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["vault-backup.db"]
    assert CANARY.encode() not in target.read_bytes()
    assert CANARY not in done.stdout + done.stderr
    with Store.open(home) as s:
        info = s.status()
        vault_id = info["vault_id"]
        events = s.trail.show(op="backup")
    assert (events[0].reason or "").startswith(f"to {target}; head ")
    assert vault_id in done.stdout
    # The copy is one self-contained file (no -wal needed) and verifies.
    with _open_copy(target, home / "master.key", tmp_path / "look") as c:
        assert c.get("svc-3", "u").reveal() == f"{CANARY}-3"
        c.trail.verify()
    again = run_cli("backup", str(target), "--json", home=home)
    report = json.loads(again.stdout)
    assert report["vault_id"] == vault_id
    assert report["credentials"] == 5
    assert report["key_file"] == str(home / "master.key")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir", "open-dir", "missing-dir", "live",
                                  "key"])
def test_backup_refuses_bad_targets_and_writes_nothing(home: Path, tmp_path: Path,
                                                       kind: str) -> None:
    _vault(home, 1)
    where = tmp_path / "t"
    where.mkdir()
    target = where / "b.db"
    if kind == "symlink":
        (where / "real").write_text("keep")
        target.symlink_to(where / "real")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "dir":
        target.mkdir()
    elif kind == "open-dir":
        where.chmod(0o777)
    elif kind == "missing-dir":
        target = where / "absent" / "b.db"
    elif kind == "live":
        target = home / "vault.db"
    else:
        target = home / "master.key"
    before = sorted(p.name for p in where.iterdir())
    vault_before = _files(home)
    done = run_cli("backup", str(target), home=home, timeout=30)  # a FIFO must not hang
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in where.iterdir()) == before
    if kind == "symlink":
        assert (where / "real").read_text() == "keep"
    assert _files(home)["master.key"] == vault_before["master.key"]


def test_backup_in_a_sticky_world_writable_folder_is_fine(home: Path, tmp_path: Path) -> None:
    _vault(home, 1)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with Store.open(home) as s:
        report = bk.backup(s, shared / "b.db")
    assert report.credentials == 1
    assert stat.S_IMODE((shared / "b.db").stat().st_mode) == 0o600


def test_a_copy_that_fails_its_check_is_never_published(home: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _vault(home, 2)

    def broken(self: Store) -> dict[str, object]:
        raise IntegrityError("audit chain broken at event 2: injected", "audit-chain-2")

    monkeypatch.setattr(Store, "_check_copy", broken)
    with Store.open(home) as s, pytest.raises(IntegrityError, match="injected"):
        bk.backup(s, tmp_path / "b.db")
    assert not (tmp_path / "b.db").exists()
    assert not [p for p in home.iterdir() if p.name.startswith(".backup")]
    with Store.open(home) as s:
        failed = s.trail.show(op="backup")
    assert failed[0].outcome == "integrity"


WRITER = textwrap.dedent("""
    import sys
    from keyring_hardened.store import Store
    home, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Store.open(home) as s:
        for i in range(count):
            s.set(f"w-{prefix}", f"user-{i}", f"secret-{prefix}-{i}")
            print(i, flush=True)  # acknowledged after COMMIT
""")


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_backup_during_four_writers_holds_every_acknowledged_write(home: Path,
                                                                   tmp_path: Path) -> None:
    _vault(home, 1)
    procs = [_spawn(str(home), str(n), "150") for n in range(4)]
    acked: dict[int, int] = {}
    for n, p in enumerate(procs):  # wait until each writer is well under way
        assert p.stdout is not None
        for line in p.stdout:
            acked[n] = int(line)
            if acked[n] >= 20:
                break
    # Every write acknowledged so far was committed before the backup began.
    before = dict(acked)
    done = run_cli("backup", str(tmp_path / "b.db"), home=home, timeout=300)
    assert done.returncode == 0, done.stderr
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with _open_copy(tmp_path / "b.db", home / "master.key", tmp_path / "look") as c:
        c.trail.verify()
        for n, last in before.items():
            for i in range(last + 1):
                assert c.get(f"w-{n}", f"user-{i}").reveal() == f"secret-{n}-{i}"
    with Store.open(home) as s:
        s.trail.verify()
        assert len(s.credentials()) == 601


# -- restore --------------------------------------------------------------------


def _backup(home: Path, target: Path) -> None:
    with Store.open(home) as s:
        bk.backup(s, target)


def test_round_trip_backup_writes_restore(home: Path, tmp_path: Path) -> None:
    _vault(home, 3)
    copy = tmp_path / "b.db"
    _backup(home, copy)
    with Store.open(home) as s:
        s.set("svc-0", "u", "changed")
        s.set("later", "u", "later")
        s.delete("svc-1", "u")
    refused = run_cli("restore", str(copy), home=home)
    assert refused.returncode == 2
    assert "older state" in refused.stderr
    assert "--allow-rollback" in refused.stderr
    done = run_cli("restore", str(copy), "--allow-rollback", home=home)
    assert done.returncode == 0, done.stderr
    assert "rolled the vault back" in done.stderr
    replaced = [p for p in home.iterdir() if p.name.startswith("vault.db.replaced-")]
    assert len(replaced) == 1
    assert stat.S_IMODE(replaced[0].stat().st_mode) == 0o600
    assert str(replaced[0]) in done.stdout
    with Store.open(home) as s:
        assert sorted((c.service, c.username) for c in s.credentials()) == [
            ("svc-0", "u"), ("svc-1", "u"), ("svc-2", "u")]
        for i in range(3):
            assert s.get(f"svc-{i}", "u").reveal() == f"{CANARY}-{i}"
        s.trail.verify()
        event = s.trail.show(op="restore")[0]
        assert event.reason is not None
        assert event.reason.startswith("rollback; copy-head ")
        last = s.status()["last_restore"]
        assert last["event"] == event.seq
        assert "rollback" in last["reason"]
        s.set("after", "u", "fine")
    status = run_cli("status", home=home)
    assert "restored: " in status.stdout
    assert "rollback" in status.stdout
    # The replaced vault is whole: it holds what the restore undid.
    look = tmp_path / "old"
    look.mkdir(mode=0o700)
    shutil.copy(replaced[0], look / "vault.db")
    shutil.copy(home / "master.key", look / "master.key")
    with Store.open(look) as old:
        assert old.get("later", "u").reveal() == "later"
        old.trail.verify()
    assert CANARY not in done.stdout + done.stderr + status.stdout


def test_restore_of_the_same_or_newer_state_needs_no_flag(home: Path, tmp_path: Path) -> None:
    _vault(home, 2)
    copy = tmp_path / "b.db"
    _backup(home, copy)
    # The vault's newest event (the backup's own) changed nothing: no rollback, but said.
    report = bk.restore(copy, home)
    assert not report.rollback
    assert not report.foreign
    assert "changed nothing" in report.notes[0]
    # A vault file put back from an older disk snapshot, then a newer verified copy:
    # the copy holds the vault's newest event, so nothing is undone.
    old_file = (home / "vault.db").read_bytes()
    with Store.open(home) as s:
        s.set("x", "y", "z")
    newer = tmp_path / "newer.db"
    _backup(home, newer)
    (home / "vault.db").write_bytes(old_file)
    report = bk.restore(newer, home)
    assert not report.rollback
    assert report.notes == []
    with Store.open(home) as s:
        assert s.get("x", "y").reveal() == "z"
    # After a restore the trail has forked: going back to the other branch is a rollback.
    with Store.open(home) as s:
        s.set("x", "y", "changed")
    with pytest.raises(UsageError, match="older state"):
        bk.restore(copy, home)


def _tamper_copy(copy: Path, sql: str, *params: object) -> None:
    conn = sqlite3.connect(copy)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("damage", ["flipped", "written-back", "truncated", "garbage", "cp-torn",
                                    "event-removed"])
def test_restore_refuses_a_damaged_copy_and_leaves_the_vault_unchanged(
        home: Path, tmp_path: Path, damage: str) -> None:
    _vault(home, 4)
    old = tmp_path / "old.db"
    _backup(home, old)
    with Store.open(home) as s:
        s.set("svc-1", "u", "newer value")
    copy = tmp_path / "b.db"
    _backup(home, copy)
    if damage == "flipped":
        _tamper_copy(copy, "UPDATE secret_versions SET ciphertext = zeroblob(length(ciphertext))"
                     " WHERE version = 2")
    elif damage == "written-back":
        conn = sqlite3.connect(old)
        row = conn.execute("SELECT * FROM credentials WHERE service = 'svc-1'").fetchone()
        versions = conn.execute("SELECT * FROM secret_versions WHERE credential_id = ?",
                                (row[0],)).fetchall()
        conn.close()
        conn = sqlite3.connect(copy)
        conn.execute("DELETE FROM secret_versions WHERE credential_id = ?", (row[0],))
        conn.execute("DELETE FROM credentials WHERE id = ?", (row[0],))
        conn.execute(f"INSERT INTO credentials VALUES ({','.join('?' * len(row))})", row)
        for v in versions:
            conn.execute(f"INSERT INTO secret_versions VALUES ({','.join('?' * len(v))})", v)
        conn.commit()
        conn.close()
    elif damage == "truncated":
        data = copy.read_bytes()
        copy.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        copy.write_bytes(b"not a vault at all" * 100)
    elif damage == "cp-torn":
        shutil.copy(home / "vault.db", copy)  # a file copy without its -wal: not the newest
        torn = bytearray(copy.read_bytes())
        torn[len(torn) - 4096:] = bytes(4096)
        copy.write_bytes(bytes(torn))
    else:
        _tamper_copy(copy, "DELETE FROM audit_events WHERE seq = 3")
    before = _files(home)
    done = run_cli("restore", str(copy), "--allow-rollback", "--force", home=home)
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("keyring-hardened: error: ")
    assert done.stderr.count("\n") == 1
    assert _files(home) == before  # byte for byte, and nothing left beside it
    assert CANARY not in done.stderr


def test_restore_refuses_a_copy_of_another_vault_unless_forced(home: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    _vault(home, 2)
    other = tmp_path / "other"
    # Another vault that the same key file opens (a key file shared by two vaults).
    monkeypatch.setenv("KEYRING_HARDENED_KEY_FILE", str(home / "master.key"))
    _vault(other, 1, prefix="foreign")
    monkeypatch.delenv("KEYRING_HARDENED_KEY_FILE")
    copy = tmp_path / "foreign.db"
    _backup_with_key(other, home / "master.key", copy)
    before = _files(home)
    done = run_cli("restore", str(copy), "--allow-rollback", home=home)
    assert done.returncode == 2
    assert "another vault" in done.stderr
    assert _files(home) == before
    forced = run_cli("restore", str(copy), "--force", home=home)
    assert forced.returncode == 0, forced.stderr
    assert "copy of another vault" in forced.stderr
    with Store.open(home) as s:
        assert [c.service for c in s.credentials()] == ["foreign-0"]
        assert "foreign" in (s.trail.show(op="restore")[0].reason or "")


def _backup_with_key(home: Path, key: Path, target: Path) -> None:
    env = {"KEYRING_HARDENED_KEY_FILE": str(key)}
    done = run_cli("backup", str(target), home=home, env=env)
    assert done.returncode == 0, done.stderr


def test_restore_needs_the_root_key_of_the_copy(home: Path, tmp_path: Path) -> None:
    _vault(home, 2)
    copy = tmp_path / "b.db"
    _backup(home, copy)
    old_key = tmp_path / "old.key"
    shutil.copy(home / "master.key", old_key)
    with Store.open(home) as s:
        s.keys.rekey()
    before = _files(home)
    done = run_cli("restore", str(copy), "--allow-rollback", home=home)
    assert done.returncode == 6, done.stderr
    assert _files(home) == before
    with pytest.raises(LockedError):
        bk.restore(copy, home, allow_rollback=True)
    report = bk.restore(copy, home, allow_rollback=True, key_file=old_key)
    assert report.key_file_note is not None
    assert str(old_key) in report.key_file_note
    with pytest.raises(LockedError):  # the home's new key file does not open the older copy
        Store.open(home)
    shutil.copy(old_key, home / "master.key")
    with Store.open(home) as s:
        assert s.get("svc-1", "u").reveal() == f"{CANARY}-1"
        s.trail.verify()


def test_restore_into_a_lost_or_damaged_vault(home: Path, tmp_path: Path) -> None:
    _vault(home, 2)
    copy = tmp_path / "b.db"
    _backup(home, copy)
    (home / "vault.db").unlink()
    report = bk.restore(copy, home)  # disaster recovery: no vault to compare with
    assert report.replaced is None
    with Store.open(home) as s:
        assert s.get("svc-1", "u").reveal() == f"{CANARY}-1"
        s.trail.verify()
    (home / "vault.db").write_bytes((home / "vault.db").read_bytes()[:5000])
    with pytest.raises(UsageError, match="cannot be read"):
        bk.restore(copy, home)
    report = bk.restore(copy, home, force=True)
    assert report.replaced is not None
    assert Path(report.replaced).stat().st_size == 5000
    with Store.open(home) as s:
        assert s.get("svc-0", "u").reveal() == f"{CANARY}-0"


def test_restore_refuses_bad_paths(home: Path, tmp_path: Path) -> None:
    _vault(home, 1)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(home / "vault.db")
    for path, why in [(tmp_path / "absent", "does not exist"), (fifo, "not a regular file"),
                      (link, "symbolic link"), (home / "vault.db", "live vault itself"),
                      (tmp_path, "not a regular file")]:
        with pytest.raises(UsageError, match=why):
            bk.restore(path, home)
    assert not [p for p in home.iterdir() if p.name.startswith(".")]


def test_key_versions_move_forward_across_a_restore(home: Path, tmp_path: Path) -> None:
    """A process that held the vault open keeps working, and never seals under a dropped key."""
    _vault(home, 1)
    copy = tmp_path / "b.db"
    _backup(home, copy)
    stale = Store.open(home)
    try:
        stale.keys.rotate()  # version 2, cached by this long-running process
        stale.set("svc-0", "u", "under v2")
        bk.restore(copy, home, allow_rollback=True)
        with Store.open(home) as s:
            assert [(k.version, k.state) for k in s.keys.versions()] == [
                (1, "decrypt-only"), (2, "retired"), (3, "active")]
            s.keys.rotate()  # version 4: a number no process has seen
        stale.set("stale", "u", "written by the old process")
        assert stale.get("svc-0", "u").reveal() == f"{CANARY}-0"
    finally:
        stale.close()
    with Store.open(home) as s:
        assert s.get("stale", "u").reveal() == "written by the old process"
        assert s.history("stale", "u")[0].kek_version == 4
        s.trail.verify()


RESTORE_WRITER = textwrap.dedent("""
    import sys
    from keyring_hardened.store import Store
    home, count = sys.argv[1], int(sys.argv[2])
    with Store.open(home) as s:
        for i in range(count):
            s.set("live", f"user-{i}", f"value-{i}")
            print(i, flush=True)
""")


@pytest.mark.slow
def test_a_writer_in_another_process_loses_nothing_across_a_restore(home: Path,
                                                                    tmp_path: Path) -> None:
    _vault(home, 20)
    copy = tmp_path / "b.db"
    _backup(home, copy)
    proc = subprocess.Popen([sys.executable, "-c", RESTORE_WRITER, str(home), "400"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if int(line) >= 30:
            break
    done = run_cli("restore", str(copy), "--allow-rollback", home=home, timeout=300)
    assert done.returncode == 0, done.stderr
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    acked = max(int(x) for x in out.split()) if out.split() else 30
    replaced = next(p for p in home.iterdir() if p.name.startswith("vault.db.replaced-"))
    look = tmp_path / "old"
    look.mkdir(mode=0o700)
    shutil.copy(replaced, look / "vault.db")
    shutil.copy(home / "master.key", look / "master.key")
    with Store.open(home) as now, Store.open(look) as old:
        now.trail.verify()
        old.trail.verify()
        for i in range(acked + 1):
            # Each acknowledged write is in the restored vault (written after the swap)
            # or in the kept replaced vault (written before it).
            found = [s.get("live", f"user-{i}").reveal() for s in (now, old)
                     if f"user-{i}" in {c.username for c in s.credentials()}]
            assert f"value-{i}" in found, i


@pytest.mark.slow
@pytest.mark.parametrize("point", ["restore-before-swap", "restore-before-commit"])
def test_restore_killed_midway_leaves_the_vault_as_it_was(home: Path, tmp_path: Path,
                                                          point: str) -> None:
    _vault(home, 3)
    copy = tmp_path / "b.db"
    _backup(home, copy)
    with Store.open(home) as s:
        s.set("after", "u", "kept")
    done = run_cli("restore", str(copy), "--allow-rollback", home=home,
                   env={"KEYRING_HARDENED_CRASH_AT": point})
    assert done.returncode == -signal.SIGKILL
    assert not [p for p in home.iterdir() if p.name.startswith("vault.db.replaced-")]
    with Store.open(home) as s:
        assert s.get("after", "u").reveal() == "kept"
        s.trail.verify()
        assert not s.trail.show(op="restore")
    # And a restore afterwards still works.
    assert run_cli("restore", str(copy), "--allow-rollback", home=home).returncode == 0
