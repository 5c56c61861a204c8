"""Tests that kill mutants of session.py which the rest of the suite let live.

Several paths were reached only by tests that run the CLI in a child
process (the 0.1 upgrade, a checkpoint blocked by a reader); these run
them in-process, where a mutant can be told apart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import struct
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyring_hardened import audit
from keyring_hardened.config import Config
from keyring_hardened.errors import (
    DeniedError,
    ExpiredError,
    IntegrityError,
    LockedError,
    StorageError,
    UsageError,
)
from keyring_hardened.store import Store

from .conftest import FAST_KDF, PASSPHRASE

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    home = tmp_path / "legacy"
    shutil.copytree(FIXTURE, home)
    os.chmod(home, 0o700)
    for f in home.iterdir():
        os.chmod(f, 0o600)
    return home


def test_upgrade_in_process(legacy: Path, tmp_path: Path) -> None:
    with Store.open(legacy, upgrade=True) as s:
        old_events = s._storage.newest_events(100)
        assert all(e.epoch is None for e in old_events)
        message = s.upgrade()
        assert "2 credentials" in message
        assert "key epoch 2" in message
        assert s._epoch == 2
        assert s._vault.state_version == 1
        assert s.get("svc", "user").reveal() == "value-3"
        assert s.get("svc", "user", version=1).reveal() == "value-1"
        event = s.trail.show(op="upgrade")[0]
        assert (event.epoch, event.reason, event.key_version, event.outcome) == (
            2, "from-0.1-2", None, "ok")
        assert event.seq == max(e.seq for e in old_events) + 1
        assert [e for e, _ in s._storage.past_keys()] == [1]
        assert s.trail.verify().ok
        # an export spans the 0.1 events (keyed by the oldest epoch) and the new ones
        s.trail.export(tmp_path / "export.jsonl")
        result = s.trail.verify_file(tmp_path / "export.jsonl")
        assert result.ok
        assert result.verified == len(old_events) + 5  # upgrade, two reads, show, verify
        with pytest.raises(UsageError, match="already upgraded"):
            s.upgrade()
    with Store.open(legacy) as again:
        assert again.get("svc", "user").reveal() == "value-3"
        assert again.trail.verify().ok


def test_upgrade_takes_the_oldest_identifier_key(legacy: Path) -> None:
    cfg = Config(audit_hmac_identifiers=True)
    with Store.open(legacy, upgrade=True, config=cfg) as s:
        s.upgrade()
        s.get("svc", "user")
        hashed = s.trail.show(op="read")[0].service
    with Store.open(legacy, config=cfg) as s:
        s.get("svc", "user")
        assert s.trail.show(op="read")[0].service == hashed


@pytest.mark.parametrize(("statement", "reason"), [
    ("UPDATE credentials SET current_version = 1 WHERE service = 'svc'", "head-mac"),
    ("UPDATE credentials SET last_version = 9 WHERE service = 'svc'", "head-mac"),
    ("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2", "upgrade-trail"),
    ("DELETE FROM audit_events WHERE seq = 2", "upgrade-trail"),
])
def test_upgrade_refuses_a_tampered_0_1_vault_and_changes_nothing(
        legacy: Path, statement: str, reason: str) -> None:
    with sqlite3.connect(legacy / "vault.db") as conn:
        conn.execute(statement)
    before = (legacy / "vault.db").read_bytes()
    with Store.open(legacy, upgrade=True) as s:
        with pytest.raises(IntegrityError) as info:
            s.upgrade()
        assert info.value.reason == reason
        assert s._epoch == 1
    with sqlite3.connect(legacy / "vault.db") as conn:
        assert conn.execute("SELECT state_version, generation FROM vault").fetchone() == (0, 1)
    assert len(before) > 0


@pytest.fixture
def blocked(home: Path) -> Iterator[Store]:
    """A store whose checkpoints a reader holding an old snapshot blocks."""
    with Store.init(home, config=Config(busy_timeout=1.0)) as s:
        s.set("svc", "alice", "one")
        s.set("svc", "bob", "two")
        reader = sqlite3.connect(home / "vault.db", isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM secret_versions").fetchone()
            s.set("svc", "carol", "three")
            yield s
        finally:
            reader.close()


def test_a_blocked_checkpoint_is_a_notice(blocked: Store, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    with caplog.at_level(logging.WARNING, logger="keyring_hardened"):
        blocked.delete("svc", "alice", purge=True)
    assert len(blocked.notices) == 1
    assert "purge is done" in blocked.notices[0]
    assert "vault.db-wal" in blocked.notices[0]
    assert [r.getMessage() for r in caplog.records] == blocked.notices


def test_an_unblocked_purge_gives_no_notice(store: Store) -> None:
    store.set("svc", "alice", "one")
    store.delete("svc", "alice", purge=True)
    assert store.notices == []
    wal = store.location.database.with_name("vault.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_expiry_message_names_the_time_in_utc(home: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, clock=lambda: now[0]) as s:
        s.set("svc", "u", "x", ttl=60)
        now[0] += 60
        with pytest.raises(ExpiredError, match="1970-01-12T13:47:40Z"):
            s.get("svc", "u")


def test_an_unlock_failure_reaches_the_sinks(home: Path, tmp_path: Path) -> None:
    sink = tmp_path / "sink.jsonl"
    cfg = Config(audit_sinks=(f"file:{sink}",))
    with Store.init(home, config=cfg) as s:
        s.set("svc", "u", "x")
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute("UPDATE keks SET wrap_count = wrap_count + 1")
    with pytest.raises(IntegrityError):
        Store.open(home, config=cfg)
    last = json.loads(sink.read_text().splitlines()[-1])
    assert (last["op"], last["outcome"]) == ("unlock", "integrity")
    assert audit.OUTCOMES.count(last["outcome"]) == 1


def test_close_wipes_every_key_it_holds(home: Path) -> None:
    with Store.init(home, config=Config(audit_hmac_identifiers=True)) as s:
        s.set("svc", "u", "x")
        s.keys.rotate()
        keks = list(s._keks.values())
        root, vkeys = s._root, s._vkeys
        s._ident_key = bytearray(b"\x01" * 32)
        ident = s._ident_key
    assert len(keks) == 2
    assert all(k._material == bytearray(32) for k in keks)
    assert root._wrap_key == bytearray(32)
    assert root._verifier_key == bytearray(32)
    assert vkeys.audit_key == bytearray(32)
    assert vkeys.identifier_key == bytearray(32)
    assert ident == bytearray(32)
    assert s._keks == {}
    with pytest.raises(UsageError):
        s.get("svc", "u")


def test_rotation_by_age_at_the_exact_second(home: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, config=Config(rotate_after=3600), clock=lambda: now[0]) as s:
        now[0] += 3599.5
        s.set("svc", "u", "x")
        assert [k.version for k in s.keys.versions()] == [1]
        now[0] = 1_003_600.0
        s.set("svc", "u", "y")
        assert [k.version for k in s.keys.versions()] == [1, 2]
        event = s.trail.show(op="key-rotate")[0]
        assert (event.reason, event.key_version) == ("auto-age", 2)


# -- the 0.1 upgrade, from a copy of the fixture changed in the ways a 0.1 vault could be --


def test_the_0_1_head_mac_layout_recomputed(store: Store) -> None:
    # Each name length-prefixed (">I"), current (0 for none) and last as ">QQ",
    # then, for an expiring head, 0x01 and the expiry as a big-endian double.
    def prefixed(part: bytes) -> bytes:
        return struct.pack(">I", len(part)) + part

    base = (prefixed(store._vault.vault_id) + prefixed(b"svc") + prefixed("é".encode())
            + struct.pack(">QQ", 0, 7))
    assert store._head_mac("svc", "é", None, 7) == store._vkeys.record_mac(base)
    assert store._head_mac("svc", "é", None, 7, 12.5) == store._vkeys.record_mac(
        base + b"\x01" + struct.pack(">d", 12.5))


def test_upgrade_checks_an_expiring_head_with_its_expiry(legacy: Path) -> None:
    expires = 4_000_000_000.0
    with Store.open(legacy, upgrade=True) as s:
        mac = s._head_mac("svc", "user", 3, 3, expires)
        with sqlite3.connect(legacy / "vault.db") as conn:
            conn.execute("UPDATE credentials SET expires_at = ?, mac = ? WHERE service = 'svc'",
                         (expires, mac))
        conn.close()
        assert "2 credentials" in s.upgrade()
    with Store.open(legacy) as s:
        assert s.get("svc", "user").reveal() == "value-3"


def test_upgrade_of_a_pruned_0_1_trail_starts_at_its_anchor(legacy: Path) -> None:
    with sqlite3.connect(legacy / "vault.db") as conn:
        mac = conn.execute("SELECT mac FROM audit_events WHERE seq = 1").fetchone()[0]
        conn.execute("DELETE FROM audit_events WHERE seq = 1")
        conn.execute("UPDATE audit_anchor SET seq = 1, mac = ?", (mac,))
    conn.close()
    with Store.open(legacy, upgrade=True) as s:
        # a pruned chain continues from the anchor's mac, not from the genesis value
        assert "2 credentials" in s.upgrade()


def test_upgrade_of_a_head_without_version_rows(legacy: Path) -> None:
    with sqlite3.connect(legacy / "vault.db") as conn:
        conn.execute("DELETE FROM secret_versions WHERE credential_id = 2")
    conn.close()
    with Store.open(legacy, upgrade=True) as s:
        assert "2 credentials" in s.upgrade()
    with Store.open(legacy) as s:
        assert s.get("svc", "user").reveal() == "value-3"


def test_upgrade_of_an_empty_0_1_vault(legacy: Path) -> None:
    with sqlite3.connect(legacy / "vault.db") as conn:
        conn.execute("DELETE FROM secret_versions")
        conn.execute("DELETE FROM credentials")
    conn.close()
    with Store.open(legacy, upgrade=True) as s:
        assert "0 credentials" in s.upgrade()
    with Store.open(legacy) as s:
        assert s.credentials() == []
        assert s.trail.verify().ok


def test_upgrade_event_time_sink_and_kdf(legacy: Path, tmp_path: Path) -> None:
    sink = tmp_path / "sink.jsonl"
    cfg = Config(audit_sinks=(f"file:{sink}",))
    with Store.open(legacy, upgrade=True, config=cfg, clock=lambda: 1_900_000_000.25) as s:
        s.upgrade()
        event = s.trail.show(op="upgrade")[0]
        assert event.ts_us == 1_900_000_000_250_000
        assert s.status()["kdf"] == s._kdf.describe()
        assert s._kdf is not None
    sent = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [(e["op"], e["seq"]) for e in sent if e["op"] == "upgrade"] == [("upgrade", event.seq)]


def test_upgrade_refused_names_the_actor(legacy: Path) -> None:
    text = '[[policies]]\nactors = ["*"]\nservices = ["*"]\ndeny = ["admin"]\n'
    cfg = Config.from_mapping(tomllib.loads(text))
    with Store.open(legacy, upgrade=True, actor="operator", config=cfg) as s, \
            pytest.raises(DeniedError, match="actor 'operator' may not admin"):
        s.upgrade()


# -- failed unlocks waiting in audit_pending, folded in-process ------------------------------
# (tests/test_pending_forgery.py drives the same through the CLI, in child processes)


def _pending(home: Path, *rows: tuple[object, str, str, str, str | None]) -> None:
    with sqlite3.connect(home / "vault.db") as conn:
        conn.executemany("INSERT INTO audit_pending (ts_us, actor, op, outcome, reason)"
                         " VALUES (?, ?, ?, ?, ?)", rows)
    conn.close()


@pytest.mark.parametrize("row", [
    (1, "mallory", "audit-prune", "locked", "wrong-key"),  # not an unlock
    (1, "mallory", "unlock", "ok", "wrong-key"),           # not a failure
    (1, "mallory", "unlock", "locked", "made-up"),         # an unknown reason
    (1, "mallory", "read", "ok", None),
    ("x", "mallory", "unlock", "locked", "wrong-key"),     # a time that is not a number
    (1, "bad\nactor", "unlock", "locked", "wrong-key"),
])
def test_a_forged_pending_row_fails_the_open(home: Path,
                                             row: tuple[object, str, str, str, str | None]
                                             ) -> None:
    Store.init(home).close()
    _pending(home, row)
    with pytest.raises(IntegrityError) as info:
        Store.open(home)
    assert info.value.reason == "forged-pending"


def test_forged_rows_are_counted_and_good_ones_clamped(home: Path) -> None:
    clock = lambda: 1_900_000_000.0  # noqa: E731
    Store.init(home, clock=clock).close()
    _pending(home, (1, "mallory", "unlock", "ok", None), (2, "mallory", "read", "ok", None))
    with pytest.raises(IntegrityError):
        Store.open(home, clock=clock)
    with Store.open(home, clock=clock) as s:
        assert s.trail.show(op="unlock")[0].reason == "forged-pending-2"
    _pending(home, (5_000_000_000_000_000, "eve", "unlock", "locked", "wrong-key"),
             (1, "eve", "unlock", "locked", "no-key-file"))
    sink = home.parent / "sink.jsonl"
    with Store.open(home, clock=clock, config=Config(audit_sinks=(f"file:{sink}",))) as s:
        sent = [json.loads(line) for line in sink.read_text().splitlines()]
        assert [(e["actor"], e["reason"]) for e in sent if e["op"] == "unlock"] == [
            ("eve", "wrong-key; recorded before unlock"),
            ("eve", "no-key-file; recorded before unlock")]
        late, early = [e for e in s.trail.show(op="unlock") if e.actor == "eve"][:2][::-1]
        assert late.ts_us == 1_900_000_000_000_000  # a future time is clamped to now
        assert early.ts_us == late.ts_us  # a backdated one to the newest event before it
        assert s.trail.verify().ok


def test_a_notice_is_logged_as_it_is(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        store.notice("100% done, %s left")
    assert [r.getMessage() for r in caplog.records] == ["100% done, %s left"]


def test_unseal_proof_of_a_passphrase_vault(home: Path) -> None:
    command = (sys.executable, "-c", f"print({PASSPHRASE!r})")
    cfg = FAST_KDF._replace(passphrase_command=command)
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=cfg) as s:
        s.seal()
        with pytest.raises(LockedError) as info:
            s.unseal(passphrase="not the passphrase")
        assert info.value.reason == "wrong-passphrase"
        s.unseal()  # the configured passphrase command
        assert s.status()["sealed"] is None


def test_a_notice_is_marked_for_the_cli_handler(store: Store,
                                                caplog: pytest.LogCaptureFixture) -> None:
    # The CLI prints notices from the session's list and filters the records
    # marked notice=True out of its stderr handler: unmarked, each is printed twice.
    with caplog.at_level(logging.WARNING):
        store.notice("the checkpoint was blocked")
    (record,) = caplog.records
    assert getattr(record, "notice", False) is True


def test_a_restore_event_says_what_was_restored_over_what(home: Path, tmp_path: Path) -> None:
    from keyring_hardened import backup

    with Store.init(home) as s:
        s.set("svc", "u", "one")
    copy = tmp_path / "b.db"
    with Store.open(home) as s:
        backup.backup(s, copy)
        s.keys.rotate()
        s.set("svc", "u", "two")
    report = backup.restore(copy, home, allow_rollback=True)
    assert report.replaced_head_seq is not None
    with Store.open(home) as s:
        (event,) = s.trail.show(op="restore")
        # Chained onto the copy: the copy's newest event is the one before it.
        assert event.reason == (f"rollback; copy-head {event.seq - 1}; "
                                f"replaced-head {report.replaced_head_seq}")
        assert report.replaced_head_seq > event.seq - 1
        # The replaced vault's KEK 2 is retired; the copy's new active key is 3.
        assert event.key_version == 3
        assert s.trail.verify().ok


def test_a_backup_leaves_the_root_key_with_its_owner(home: Path, tmp_path: Path) -> None:
    # The copy is checked with the live session's own root key, borrowed: closing
    # the copy must not wipe it, or the session no longer recognises its own
    # vault (the verifier key is zeros) and its next backup is refused.
    from keyring_hardened import backup

    with Store.init(home) as s:
        s.set("svc", "u", "one")
        backup.backup(s, tmp_path / "b.db")
        backup.backup(s, tmp_path / "c.db")
        s.keys.rotate()  # wraps a new KEK under the root key
        s.set("svc", "u", "two")
    with Store.open(home) as s:
        assert s.get("svc", "u").reveal() == "two"
        assert s.trail.verify().ok


def test_a_restore_asks_the_prompt_for_the_copys_passphrase(home: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from keyring_hardened import backup

    monkeypatch.delenv("KEYRING_HARDENED_PASSPHRASE", raising=False)
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("svc", "u", "one")
        backup.backup(s, tmp_path / "b.db")
    asked: list[bool] = []

    def prompt() -> str:
        asked.append(True)
        return PASSPHRASE

    report = backup.restore(tmp_path / "b.db", home, prompt=prompt)
    assert asked
    assert report.credentials == 1


def test_a_blocked_purge_retries_its_checkpoint_for_about_a_second(
        blocked: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import time as time_module

    waits: list[float] = []
    real_sleep = time_module.sleep

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time_module, "sleep", sleep)
    blocked.delete("svc", "alice", purge=True)
    assert len(waits) == 5
    assert waits == sorted(waits)  # backing off
    assert sum(waits) <= 1.0
    assert len(blocked.notices) == 1


def test_a_throttle_dated_in_the_future_keeps_its_count(home: Path) -> None:
    # A clock set back (or an edited row) puts the last failure in the future:
    # the wait counts from now, and the count of failures is kept, so one
    # delay later the right passphrase opens the vault.
    from keyring_hardened.access import throttle_delay

    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("svc", "u", "v")
    now = [2_000_000_000.0]
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute(f"INSERT INTO unlock_throttle VALUES (1, 7, {now[0] + 10_000})")
    conn.close()
    wait = throttle_delay(7)
    with pytest.raises(LockedError, match=f"after 7 failed attempts in a row; try again in "
                                          f"{int(wait)} s"):
        Store.open(home, passphrase=PASSPHRASE, config=FAST_KDF, clock=lambda: now[0])
    now[0] += wait + 1
    with Store.open(home, passphrase=PASSPHRASE, config=FAST_KDF, clock=lambda: now[0]) as s:
        assert s.get("svc", "u").reveal() == "v"


def test_a_key_file_vault_past_its_wait_keeps_the_count(home: Path) -> None:
    # Past the free failures, an allowed attempt on a key-file vault restarts
    # the wait with the same count; an attempt that then fails for a reason
    # that is not a guess (the key file missing) leaves that row as it is.
    from keyring_hardened.access import throttle_delay

    with Store.init(home) as s:
        s.set("svc", "u", "v")
    wait = throttle_delay(7)
    now = [2_000_000_000.0]
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute(f"INSERT INTO unlock_throttle VALUES (1, 7, {now[0] - wait - 1})")
    conn.close()
    key = home / "master.key"
    aside = home / "master.key.aside"
    key.rename(aside)
    with pytest.raises(LockedError):
        Store.open(home, clock=lambda: now[0])
    aside.rename(key)
    with sqlite3.connect(home / "vault.db") as conn:
        assert conn.execute("SELECT failures, last_at FROM unlock_throttle"
                            ).fetchone() == (7, now[0])
    conn.close()
    now[0] += wait + 1
    with Store.open(home, clock=lambda: now[0]) as s:
        assert s.get("svc", "u").reveal() == "v"


def test_a_vault_made_by_a_first_open_says_so(home: Path) -> None:
    with Store.open(home, create=True) as s:
        assert s.status()["created_implicitly"] is True
    with Store.open(home) as s:
        (made,) = s.trail.show(op="init")
        assert made.reason is not None
        assert made.reason.endswith("; made by a first set")


def test_an_open_that_lost_the_race_to_create_uses_the_other_vault(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process created the vault between this open's look and its own
    # create: the open uses theirs, with the configured busy timeout.
    real_create = Store._create

    def lost(*args: Any, **kwargs: Any) -> None:
        other = real_create(*args, **kwargs)  # made "by another process"
        assert other is not None
        with other:
            other.set("svc", "u", "theirs")
        return None

    monkeypatch.setattr(Store, "_create", lost)
    with Store.open(home, create=True, config=Config(busy_timeout=7.5)) as s:
        assert s.get("svc", "u").reveal() == "theirs"
        with s._guard() as storage:
            assert storage._busy_ms == 7500  # type: ignore[attr-defined]


def test_init_keeps_the_configured_durability(home: Path) -> None:
    with Store.init(home, config=Config(synchronous="full")) as s, s._guard() as storage:
        conn = storage._conn  # type: ignore[attr-defined]
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_init_over_a_vault_refuses_before_asking_for_a_passphrase(home: Path) -> None:
    with Store.init(home) as s:
        s.set("svc", "u", "v")
    before = {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()}
    asked: list[bool] = []

    def prompt() -> str:
        asked.append(True)
        return PASSPHRASE

    with pytest.raises(UsageError, match="already exists"):
        Store.init(home, passphrase_mode=True, prompt=prompt, config=FAST_KDF)
    assert asked == []
    assert {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()} == before


def test_transient_failures_are_retried_with_growing_waits(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # A shared server's serialization failure or dropped connection: the whole
    # operation runs again, after 20 ms, then 40 ms, ... (at most 0.5 s each).
    import time as time_module

    failures = [StorageError("the server dropped the connection", "transient")] * 3
    real_run_once = Store._run_once
    waits: list[float] = []
    real_sleep = time_module.sleep

    def flaky(self: Store, *args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_run_once(self, *args, **kwargs)

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(Store, "_run_once", flaky)
    monkeypatch.setattr(time_module, "sleep", sleep)
    store.set("svc", "u", "v")
    assert waits == [0.02, 0.04, 0.08]
    assert store.get("svc", "u").reveal() == "v"


def test_a_right_key_file_resets_earlier_failures(home: Path) -> None:
    # Fewer failures than the free ones: no wait, and the next correct
    # unlock sets the count back to zero.
    with Store.init(home) as s:
        s.set("svc", "u", "v")
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute("INSERT INTO unlock_throttle VALUES (1, 2, 1000.0)")
    conn.close()
    with Store.open(home) as s:
        assert s.get("svc", "u").reveal() == "v"
    with sqlite3.connect(home / "vault.db") as conn:
        row = conn.execute("SELECT failures FROM unlock_throttle").fetchone()
    conn.close()
    assert row is None or row == (0,)


def test_a_read_fetches_its_credential_and_versions_in_one_query(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # The common case, one credential, is one round trip for its bucket and
    # its versions (it matters most on a shared server).
    from keyring_hardened.storage import SQLiteStorage

    store.set("svc", "u", "v")
    calls: list[str] = []
    for name in ("bucket_rows", "heads_in_buckets", "versions"):
        real = getattr(SQLiteStorage, name)

        def counted(self: SQLiteStorage, *args: Any, _real: Any = real, _name: str = name
                    ) -> Any:
            calls.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(SQLiteStorage, name, counted)
    assert store.get("svc", "u").reveal() == "v"
    assert calls == ["bucket_rows"]
