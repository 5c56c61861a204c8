from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyring_hardened import audit, backend, sinks
from keyring_hardened.audit import Event
from keyring_hardened.config import Config
from keyring_hardened.errors import IntegrityError, NotFoundError, StorageError, UsageError
from keyring_hardened.store import Store
from keyring_hardened.testing import FrozenClock

from .conftest import CANARY, FAST_KDF, PASSPHRASE, run_cli


def _events(home: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(home / "vault.db") as conn:
        return conn.execute("SELECT seq, actor, op, service, username, outcome, key_version,"
                            " reason FROM audit_events ORDER BY seq").fetchall()


def _dump(home: Path) -> str:
    with sqlite3.connect(home / "vault.db") as conn:
        return repr(conn.execute("SELECT * FROM audit_events").fetchall()) + repr(
            conn.execute("SELECT * FROM audit_pending").fetchall())


def _sql(home: Path, *statements: str) -> None:
    conn = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        for s in statements:
            conn.execute(s)
    finally:
        conn.close()


def test_every_operation_appends_one_event(store: Store, home: Path) -> None:
    store.set("svc", "u", "one")
    store.set("svc", "u", "two")
    store.get("svc", "u")
    with pytest.raises(NotFoundError):
        store.get("svc", "nobody")
    store.history("svc", "u")
    store.credentials()
    store.usernames("svc")
    store.rollback("svc", "u")
    store.delete("svc", "u")
    with pytest.raises(NotFoundError):
        store.get("svc", "u")
    store.status()
    store.delete("svc", "u", purge=True)
    rows = _events(home)
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert [(r[2], r[5]) for r in rows] == [
        ("init", "ok"), ("write", "ok"), ("write", "ok"), ("read", "ok"),
        ("read", "not-found"), ("history", "ok"), ("list", "ok"), ("lookup", "ok"),
        ("rollback", "ok"), ("delete", "ok"), ("read", "not-found"), ("status", "ok"),
        ("purge", "ok")]
    assert all(r[1] == "test" for r in rows)
    assert rows[0][7] == "keyfile"
    assert rows[3][3:5] == ("svc", "u")
    assert rows[3][6] == 1  # key version of the read
    assert rows[4][7] == "no-credential"
    assert rows[8][7] == "from-version-1"
    assert rows[10][7] == "deleted"


def test_integrity_reason_goes_to_the_audit_only(store: Store, home: Path) -> None:
    store.set("svc", "u", CANARY)
    _sql(home, "UPDATE secret_versions SET ciphertext = substr(ciphertext, 1, 20) ||"
               " zeroblob(length(ciphertext) - 20)")
    with pytest.raises(IntegrityError) as info:
        store.get("svc", "u")
    assert "state-version" not in str(info.value)
    last = _events(home)[-1]
    # The row no longer matches its digest in the authenticated state.
    assert (last[2], last[5], last[7]) == ("read", "integrity", "state-version")


def test_failed_write_is_undone_but_audited(store: Store, home: Path) -> None:
    store.set("svc", "u", "one")
    _sql(home, "UPDATE credentials SET last_version = 7")  # breaks the state root
    with pytest.raises(IntegrityError):
        store.set("svc", "u", "two")
    assert _events(home)[-1][5:8:2] == ("integrity", "state-bucket")
    with sqlite3.connect(home / "vault.db") as conn:
        assert conn.execute("SELECT count(*) FROM secret_versions").fetchone()[0] == 1


def test_canary_never_in_audit_sinks_show_or_export(home: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sink = tmp_path / "sink.jsonl"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text(f'[audit]\nsinks = ["file:{sink}"]\n')
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))
    with Store.init(home) as s:
        s.set("svc", "u", CANARY)
        s.get("svc", "u")
        for bad in (lambda: s.set("svc", "\x00", CANARY), lambda: s.get("svc", "x")):
            with pytest.raises((UsageError, NotFoundError)):
                bad()
    kr = backend.HardenedKeyring()
    kr.set_password("svc", "kr", CANARY)
    assert kr.get_password("svc", "kr") == CANARY
    backend._close_all()
    assert run_cli("set", "svc", "cli", home=home, stdin=CANARY).returncode == 0
    assert run_cli("get", "svc", "cli", home=home).stdout == CANARY + "\n"
    _sql(home, "UPDATE secret_versions SET ciphertext = zeroblob(40) WHERE version = 1 AND"
               " credential_id = (SELECT id FROM credentials WHERE username = 'cli')")
    assert run_cli("get", "svc", "cli", home=home).returncode == 3
    shown = run_cli("audit", "show", home=home).stdout + \
        run_cli("audit", "show", "--json", home=home).stdout
    assert run_cli("audit", "export", str(tmp_path / "export.jsonl"), home=home).returncode == 0
    for text in (_dump(home), sink.read_text(), shown, (tmp_path / "export.jsonl").read_text()):
        assert CANARY not in text
    assert "svc" in shown
    assert len(sink.read_text().splitlines()) == len(_events(home))


@pytest.fixture
def chain(store: Store, home: Path) -> Path:
    for i in range(6):
        store.set("svc", f"u{i}", "x")
    store.close()
    return home


def _verify(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("audit", "verify", *args, home=home)


def test_intact_chain_verifies(chain: Path) -> None:
    done = _verify(chain)
    assert done.returncode == 0, done.stderr
    assert "intact: 7 events" in done.stdout


@pytest.mark.parametrize(("name", "statements", "bad"), [
    ("edit", ["UPDATE audit_events SET actor = 'mallory' WHERE seq = 3"], 3),
    ("edit outcome", ["UPDATE audit_events SET outcome = 'denied' WHERE seq = 4"], 4),
    ("delete", ["DELETE FROM audit_events WHERE seq = 4"], 5),
    ("insert", ["UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 5",
                "UPDATE audit_events SET seq = seq - 999 WHERE seq >= 1000",
                "INSERT INTO audit_events SELECT 5, ts_us, actor, op, service, username, outcome,"
                " key_version, reason, mac, epoch, root FROM audit_events WHERE seq = 4"],
     # the newest event now follows another mac: every command's first check
     "audit event 8 does not match its mac"),
    ("reorder", ["UPDATE audit_events SET seq = 100 WHERE seq = 3",
                 "UPDATE audit_events SET seq = 3 WHERE seq = 4",
                 "UPDATE audit_events SET seq = 4 WHERE seq = 100"], 3),
])
def test_tampering_is_detected(chain: Path, name: str, statements: list[str],
                              bad: int | str) -> None:
    _sql(chain, *statements)
    done = _verify(chain)
    assert done.returncode == 3, done.stdout
    assert (bad if isinstance(bad, str) else f"audit chain broken at event {bad}") in done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("anchor_mac", ["zero", "event 2"])
def test_oldest_cut_with_a_moved_anchor_is_detected(chain: Path, anchor_mac: str) -> None:
    # The anchor is part of the authenticated state: moving it, even to a
    # real event's mac, fails every command at unlock.
    with sqlite3.connect(chain / "vault.db") as conn:
        mac = conn.execute("SELECT mac FROM audit_events WHERE seq = 2").fetchone()[0]
        conn.execute("DELETE FROM audit_events WHERE seq <= 2")
        conn.execute("UPDATE audit_anchor SET seq = 2, mac = ?",
                     (mac if anchor_mac == "event 2" else bytes(32),))
    for args in (("audit", "verify"), ("get", "svc", "u1"), ("list",)):
        done = run_cli(*args, home=chain)
        assert done.returncode == 3, done.stderr
        assert "authenticated state" in done.stderr


def test_truncation_detected_against_checkpoint(chain: Path, tmp_path: Path) -> None:
    # Cutting events that wrote something contradicts the rows (plain verify);
    # cutting only reads leaves a whole earlier state, which a checkpoint catches.
    for _ in range(2):
        assert run_cli("get", "svc", "u1", home=chain).returncode == 0
    cp = tmp_path / "cp.json"
    assert run_cli("audit", "checkpoint", str(cp), home=chain).returncode == 0
    assert json.loads(cp.read_text())["seq"] == 9
    assert _verify(chain, "--from-checkpoint", str(cp)).returncode == 0
    _sql(chain, "DELETE FROM audit_events WHERE seq >= 8")
    assert _verify(chain).returncode == 0  # the rest is a valid chain and state...
    done = _verify(chain, "--from-checkpoint", str(cp))
    assert done.returncode == 3  # ...but not the one the checkpoint saw
    assert "truncated" in done.stderr
    _sql(chain, "DELETE FROM audit_events WHERE seq >= 6")  # now writes are cut too
    assert _verify(chain).returncode == 3


def test_checkpoint_to_stdout_and_bad_checkpoints(chain: Path, tmp_path: Path) -> None:
    doc = json.loads(run_cli("audit", "checkpoint", home=chain).stdout)
    assert set(doc) == {"format", "vault_id", "seq", "mac"}
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**doc, "mac": "00" * 32}))
    assert _verify(chain, "--from-checkpoint", str(wrong)).returncode == 3
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "vault_id": "ab" * 16}))
    assert "another vault" in _verify(chain, "--from-checkpoint", str(other)).stderr
    for text in ("not json", "[1]", '{"format": "x"}'):
        wrong.write_text(text)
        assert _verify(chain, "--from-checkpoint", str(wrong)).returncode == 2
    assert _verify(chain, "--from-checkpoint", str(tmp_path / "none.json")).returncode == 2


def test_export_verifies_offline_and_detects_edits(chain: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    assert run_cli("audit", "export", str(out), home=chain).returncode == 0
    assert out.stat().st_mode & 0o777 == 0o600
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["anchor_seq"] == 0
    assert json.loads(lines[1])["op"] == "init"
    assert _verify(chain, "--file", str(out)).returncode == 0
    edited = json.loads(lines[3])
    edited["username"] = "someone-else"
    lines[3] = json.dumps(edited)
    out.write_text("\n".join(lines) + "\n")
    done = _verify(chain, "--file", str(out))
    assert done.returncode == 3
    assert "event 3" in done.stderr
    out.write_text(lines[0] + "\nnot json\n")
    assert _verify(chain, "--file", str(out)).returncode == 3
    out.write_text("garbage\n")
    assert _verify(chain, "--file", str(out)).returncode == 3
    assert _verify(chain, "--file", str(tmp_path / "none")).returncode == 2


@pytest.mark.sqlite_only("two vaults in one test; a PostgreSQL run has one database")
def test_export_of_another_vault_is_refused(chain: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    run_cli("audit", "export", str(out), home=chain)
    other = tmp_path / "other"
    Store.init(other).close()
    done = run_cli("audit", "verify", "--file", str(out), home=other)
    assert done.returncode == 3
    assert "another vault" in done.stderr


def test_prune_archives_and_verification_spans_both(home: Path, tmp_path: Path) -> None:
    clock = FrozenClock(1_000_000.0)
    with Store.init(home, clock=clock, config=Config(audit_keep=86400.0)) as s:
        for i in range(5):
            s.set("svc", f"u{i}", "x")
        cp = s.trail.checkpoint()
        clock.advance(2 * 86400)
        s.set("svc", "late", "x")
        archive = tmp_path / "archive.jsonl"
        assert s.trail.prune(archive) == 7  # init, 5 writes, the checkpoint
        assert s.trail.prune(archive) == 0
        result = s.trail.verify()
        assert result.ok
        header, events = audit_file(archive)
        assert header["anchor_seq"] == 0
        assert [e.seq for e in events] == list(range(1, 8))
        s.trail.verify_file(archive)
        s.trail.verify_file(archive, checkpoint=cp)
        with pytest.raises(UsageError, match="pruned into an archive"):
            s.trail.verify(checkpoint=cp)
        clock.advance(3 * 86400)
        archive2 = tmp_path / "archive2.jsonl"
        assert s.trail.prune(archive2, keep=3600.0) > 0
        s.trail.verify()
        assert audit_file(archive2)[0]["anchor_seq"] == 7
    assert run_cli("audit", "verify", home=home).returncode == 0


def audit_file(path: Path) -> tuple[dict[str, object], list[Event]]:
    from keyring_hardened.trail import read_jsonl

    return read_jsonl(path)


def test_prune_needs_a_retention_and_an_intact_chain(store: Store, tmp_path: Path,
                                                     home: Path) -> None:
    with pytest.raises(UsageError, match="no retention"):
        store.trail.prune(tmp_path / "a.jsonl")
    _sql(home, "UPDATE audit_events SET actor = 'x' WHERE seq = 1")
    with pytest.raises(IntegrityError):
        store.trail.prune(tmp_path / "a.jsonl", keep=1.0)
    assert not (tmp_path / "a.jsonl").exists()


def test_prune_cli(home: Path, tmp_path: Path) -> None:
    Store.init(home).close()
    done = run_cli("audit", "prune", "--archive", str(tmp_path / "a.jsonl"), "--keep", "30d",
                   home=home)
    assert done.returncode == 0
    assert "no events older" in done.stderr
    assert run_cli("audit", "prune", "--archive", str(tmp_path / "a"), home=home).returncode == 2


def test_show_filters(home: Path) -> None:
    clock = FrozenClock(1_700_000_000.0)
    with Store.init(home, clock=clock, actor="alice") as s:
        s.set("prod/db", "app", "x")
        clock.advance(86400)
        s.get("prod/db", "app")
        s.set("dev/db", "app", "y")
    with Store.open(home, clock=clock, actor="ci-runner") as s:
        s.get("prod/db", "app")
        reads = s.trail.show(service="prod/*", op="read")
        assert [e.actor for e in reads] == ["ci-runner", "alice"]
        assert [e.op for e in s.trail.show(actor="ci-*")] == ["audit-show", "read"]
        assert len(s.trail.show(limit=2)) == 2
        recent = s.trail.show(since=1_700_000_000.0 + 3600)
        assert {e.op for e in recent} >= {"read", "write", "audit-show"}
        assert all(e.ts_us >= (1_700_000_000 + 3600) * 10**6 for e in recent)
        with pytest.raises(UsageError):
            s.trail.show(limit=0)


def test_show_cli_table_and_json(home: Path) -> None:
    Store.init(home).close()
    run_cli("set", "svc", "u", home=home, stdin="x")
    table = run_cli("audit", "show", "--service", "svc", home=home).stdout.splitlines()
    assert table[0].split() == ["TIME", "ACTOR", "OP", "SERVICE", "USERNAME", "OUTCOME", "KEY",
                                "REASON"]
    assert "write" in table[1]
    lines = run_cli("audit", "show", "--json", "--since", "1d", "--limit", "3",
                    home=home).stdout.splitlines()
    assert 1 <= len(lines) <= 3
    assert json.loads(lines[0])["seq"] >= 1
    assert run_cli("audit", "show", "--since", "someday", home=home).returncode == 2
    assert run_cli("audit", "show", "--limit", "0", home=home).returncode == 2


@pytest.mark.parametrize(("text", "expected"), [
    ("3d", 1_700_000_000.0 - 3 * 86400), ("90m", 1_700_000_000.0 - 5400),
    ("2023-11-14T00:00:00Z", 1_699_920_000.0), ("2023-11-14T00:00:00+00:00", 1_699_920_000.0),
])
def test_parse_since(text: str, expected: float) -> None:
    assert audit.parse_since(text, 1_700_000_000.0) == expected


def test_parse_since_local_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        now = 1_700_000_000.0  # Tuesday 2023-11-14 22:13 UTC
        assert audit.parse_since("today", now) == 1_699_920_000.0
        assert audit.parse_since("yesterday", now) == 1_699_920_000.0 - 86400
        assert audit.parse_since("Tuesday", now) == 1_699_920_000.0
        assert audit.parse_since("monday", now) == 1_699_920_000.0 - 86400
        assert audit.parse_since("wednesday", now) == 1_699_920_000.0 - 6 * 86400
        assert audit.parse_since("2023-11-14", now) == 1_699_920_000.0
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_hmac_identifiers(home: Path) -> None:
    with Store.init(home, config=Config(audit_hmac_identifiers=True)) as s:
        s.set("prod/db", "app", "x")
        s.get("prod/db", "app")
        found = s.trail.show(service="prod/db", op="read")
        assert len(found) == 1
        assert found[0].service is not None
        assert found[0].service.startswith("h:")
        assert s.trail.show(service="prod/*") == []
    assert "prod/db" not in _dump(home)


def test_fail_closed_when_audit_cannot_be_written(store: Store, home: Path) -> None:
    store.set("svc", "u", CANARY)
    _sql(home, "CREATE TRIGGER no_audit BEFORE INSERT ON audit_events"
               " BEGIN SELECT RAISE(ABORT, 'audit disabled'); END")
    with pytest.raises(StorageError, match="audit trail could not be written") as info:
        store.get("svc", "u")
    assert CANARY not in str(info.value)
    with pytest.raises(StorageError, match="write was not performed"):
        store.set("svc", "u", "new")
    with pytest.raises(StorageError):
        store.get("svc", "missing")
    done = run_cli("get", "svc", "u", home=home)
    assert done.returncode == 8
    assert done.stdout == ""
    assert "audit trail could not be written" in done.stderr
    _sql(home, "DROP TRIGGER no_audit")
    assert store.get("svc", "u").reveal() == CANARY
    assert store.history("svc", "u")[0].version == 1


def test_failed_unlocks_are_chained_later(home: Path) -> None:
    Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF).close()
    for _ in range(2):
        done = run_cli("get", "svc", "u", home=home,
                       env={"KEYRING_HARDENED_PASSPHRASE": "wrong passphrase " + CANARY,
                            "KEYRING_HARDENED_ACTOR": "intruder"})
        assert done.returncode == 6
    assert "intruder" in _dump(home)
    with Store.open(home, passphrase=PASSPHRASE) as s:
        events = s.trail.show(actor="intruder")
        assert [(e.op, e.outcome) for e in events] == [("unlock", "locked")] * 2
        assert events[0].reason == "wrong-passphrase; recorded before unlock"
        s.trail.verify()
    assert CANARY not in _dump(home)


def test_damaged_kek_is_audited(store: Store, home: Path) -> None:
    store.close()
    _sql(home, "UPDATE keks SET wrapped = zeroblob(61)")
    with pytest.raises(IntegrityError):
        Store.open(home)
    last = _events(home)[-1]
    # A KEK blob edited in place no longer matches the authenticated state.
    assert (last[2], last[5], last[7]) == ("unlock", "integrity", "state-meta")


@pytest.fixture
def syslog_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setattr(sinks, "SYSLOG_SOCKET", path)
    logger = logging.getLogger("keyring_hardened.audit.syslog")
    yield sock
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    sock.close()


def test_syslog_sink(home: Path, syslog_socket: socket.socket) -> None:
    with Store.init(home, config=Config(audit_sinks=("syslog",))) as s:
        s.set("svc", "u", CANARY)
    messages = [syslog_socket.recv(65536).decode() for _ in range(2)]
    assert "keyring-hardened audit" in messages[1]
    assert '"op":"write"' in messages[1]
    assert all(CANARY not in m for m in messages)


def test_file_sink_failure_does_not_undo(home: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "missing-dir" / "sink.jsonl"
    with Store.init(home, config=Config(audit_sinks=(f"file:{bad}",))) as s:
        s.set("svc", "u", "x")
        assert s.get("svc", "u").reveal() == "x"
    assert "audit sink file:" in caplog.text


CONCURRENT = textwrap.dedent("""
    import sys
    from keyring_hardened.config import Config
    from keyring_hardened.store import Store
    home, me = sys.argv[1], sys.argv[2]
    # The chain under contention is the point, not latency: on a loaded
    # machine a writer may wait its turn longer than the default 10 s.
    with Store.open(home, actor=f"proc-{me}", config=Config(busy_timeout=120.0)) as s:
        for i in range(100):
            s.set("svc", f"{me}-{i}", "x")
            s.get("svc", f"{me}-{i}")
""")


@pytest.mark.slow
def test_four_processes_keep_one_valid_chain(store: Store, home: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(home), str(n)],
                              stderr=subprocess.PIPE, text=True) for n in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    result = store.trail.verify()
    assert result.ok
    assert result.verified == 1 + 4 * 200
    seqs = [r[0] for r in _events(home)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(store.trail.show(actor="proc-2", op="read")) == 100


def test_event_json_round_trip_and_bad_input() -> None:
    e = Event(1, 1_700_000_000_123_456, "a", "read", "s", None, "ok", 1, None, b"\x01" * 32)
    doc = e.to_json()
    assert doc["time"] == "2023-11-14T22:13:20.123456Z"
    assert Event.from_json(doc) == e
    for key, value in (("seq", "1"), ("key_version", "1"), ("actor", 5), ("service", 5)):
        with pytest.raises(TypeError):
            Event.from_json({**doc, key: value})


def test_verify_pure_cases() -> None:
    key = b"k" * 32
    e1 = Event(1, 1, "a", "read", None, None, "ok", None, None)
    e1 = e1._replace(mac=audit.chain_mac(key, audit.GENESIS, e1))
    e2 = Event(2, 2, "a", "read", None, None, "ok", None, None)
    e2 = e2._replace(mac=audit.chain_mac(key, e1.mac, e2))
    keys = {1: key}
    assert audit.verify(keys, [e1, e2], legacy_epoch=1).ok
    bad = audit.verify(keys, [e2, e1], legacy_epoch=1)
    assert (bad.ok, bad.first_bad) == (False, 2)
    back = audit.verify(keys, [e1, e1], legacy_epoch=1)
    assert "out of order" in (back.problem or "")
    assert not audit.verify({1: b"x" * 32}, [e1], legacy_epoch=1).ok


def test_audit_survives_vault_reopen_in_backend(home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))
    monkeypatch.setenv("KEYRING_HARDENED_ACTOR", "my-app")
    kr = backend.HardenedKeyring()
    kr.set_password("svc", "u", "x")
    kr.get_password("svc", "u")
    backend._close_all()
    ops = [(r[1], r[2]) for r in _events(home)]
    assert ops == [("my-app", "init"), ("my-app", "write"), ("my-app", "read")]
    assert os.environ["KEYRING_HARDENED_ACTOR"] == "my-app"


def test_unwritable_output_paths_are_usage_errors(chain: Path, tmp_path: Path) -> None:
    time.sleep(1.1)  # so that a 1s retention has events to archive
    before = len(_events(chain))
    for args in (("audit", "export", "/nonexistent/dir/x.jsonl"),
                 ("audit", "checkpoint", "/nonexistent/dir/cp.json"),
                 ("audit", "prune", "--archive", "/nonexistent/dir/a.jsonl", "--keep", "1s")):
        done = run_cli(*args, home=chain)
        assert done.returncode == 2, (args, done.stderr)
        assert "cannot write /nonexistent/dir/" in done.stderr
    # Nothing was pruned when the archive could not be written; the three
    # failures are audited like any other.
    rows = _events(chain)
    assert rows[0][0] == 1
    assert len(rows) == before + 3
    # Each failure is audited as the usage error it was (the checkpoint's file
    # is written inside its operation, so it cannot be recorded as "ok").
    assert [r[5] for r in rows[-3:]] == ["usage", "usage", "usage"]
    assert _verify(chain).returncode == 0
