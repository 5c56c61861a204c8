"""Tests that kill mutants of keys.py which the rest of the suite let live."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from keyring_hardened import envelope, keys
from keyring_hardened._aead import Aead, random_bytes
from keyring_hardened.envelope import Kek
from keyring_hardened.errors import ConfigError, IntegrityError, LockedError, UsageError
from keyring_hardened.location import Location
from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF

PASSPHRASE = "correct horse battery staple"


def test_rewrap_batch_bounds(store: Store) -> None:
    for bad in (0, -1, 100_001):
        with pytest.raises(UsageError, match="batch"):
            store.keys.rewrap(batch=bad)
    assert store.keys.rewrap(batch=100_000).rewrapped == 0
    assert store.keys.rewrap(batch=1).batches == 0


def test_rewrap_summary_and_progress(store: Store) -> None:
    for i in range(5):
        store.set("svc", f"u{i}", f"v{i}")
    store.keys.rotate()
    calls: list[tuple[int, int]] = []
    summary = store.keys.rewrap(batch=2, progress=lambda done, total: calls.append((done, total)))
    assert (summary.rewrapped, summary.batches, summary.target_version) == (5, 3, 2)
    assert summary.seconds >= 0
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert [(k.version, k.data_keys, k.state) for k in store.keys.versions()] == [
        (1, 0, "decrypt-only"), (2, 5, "active")]
    # the batch's wraps are counted on the new key
    assert store.keys.versions()[1].wrap_count == 5
    for i in range(5):
        assert store.get("svc", f"u{i}").reveal() == f"v{i}"
    events = [e for e in store.trail.show(op="key-rewrap") if e.reason != "rewrapped-0"]
    assert sorted(e.reason or "" for e in events) == ["rewrapped-1", "rewrapped-2",
                                                      "rewrapped-2"]
    assert all(e.key_version == 2 for e in events)


def test_rewrap_leaves_payload_ciphertexts_byte_identical(store: Store) -> None:
    store.set("svc", "u", CANARY)
    head_id = next(iter(store._storage.all_heads()))[1].id
    before = store._storage.versions(head_id)
    store.keys.rotate()
    store.keys.rewrap()
    after = store._storage.versions(head_id)
    assert [r.ciphertext for r in after] == [r.ciphertext for r in before]
    assert [r.wrapped_key for r in after] != [r.wrapped_key for r in before]
    assert [r.kek_version for r in after] == [2]


def test_retire_bounds_and_what_it_retires(store: Store) -> None:
    store.set("svc", "u", "x")
    store.keys.rotate()
    store.keys.rotate()
    with pytest.raises(UsageError) as info:
        store.keys.retire(4)
    assert info.value.reason == "retire-active"
    with pytest.raises(UsageError) as info:
        store.keys.retire(2)
    assert info.value.reason == "retire-in-use"
    assert store.keys.retire(1) == []
    store.keys.rewrap()
    old = [store._keks[1], store._keks[2]]
    assert store.keys.retire(3) == [1, 2]
    assert all(k._material == bytearray(32) for k in old)  # wiped
    assert set(store._keks) == {3}
    assert store.keys.retire(3) == []
    assert [(k.version, k.state) for k in store.keys.versions()] == [
        (1, "retired"), (2, "retired"), (3, "active")]
    reasons = [e.reason for e in store.trail.show(op="key-retire")]
    assert reasons[:3] == ["none", "retired-1,2", "none"]
    assert store.get("svc", "u").reveal() == "x"
    store.close()
    with Store.open(store.location.home) as again:
        assert again.get("svc", "u").reveal() == "x"


def test_rotate_is_audited_with_its_version(store: Store) -> None:
    assert store.keys.rotate() == 2
    event = store.trail.show(op="key-rotate")[0]
    assert (event.key_version, event.reason) == (2, "manual")


def test_rekey_argument_checks(store: Store) -> None:
    with pytest.raises(UsageError):
        store.keys.rekey(to="keyfile")
    with pytest.raises(UsageError):
        store.keys.rekey(to="key file", passphrase=PASSPHRASE)
    with pytest.raises(UsageError):
        store.keys.rekey(kdf="pbkdf2")
    with pytest.raises(UsageError):
        store.keys.rekey(to="passphrase", passphrase="7 chars")
    with pytest.raises(UsageError):
        store.keys.rekey(to="passphrase")
    assert store.mode == "key file"
    assert not (store.location.home / "rekey.json").exists()


def test_rekey_to_a_passphrase_of_exactly_eight_characters(home: Path) -> None:
    with Store.init(home, config=FAST_KDF) as s:
        s.set("svc", "u", CANARY)
        summary = s.keys.rekey(to="passphrase", passphrase="8 chars!")
        assert "passphrase" in summary
        assert s.mode == "passphrase"
        event = s.trail.show(op="key-rekey")[0]
        assert (event.reason, event.key_version) == ("key-file-to-passphrase", 2)
    assert not (home / "master.key").exists()
    assert not (home / "rekey.json").exists()
    with Store.open(home, passphrase="8 chars!", config=FAST_KDF) as s:
        assert s.get("svc", "u").reveal() == CANARY
        s.keys.rekey(to="key file")
        assert s.trail.show(op="key-rekey")[0].reason == "passphrase-to-key-file"
    with Store.open(home) as s:
        assert s.get("svc", "u").reveal() == CANARY


def _corrupt_kek_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    real = envelope.wrap_kek

    def wrap_other(wrap_key: Aead, vault_id: bytes, kek: Kek,
                   rng: envelope.Rng = random_bytes) -> bytes:
        other = Kek(kek.version, bytearray(b ^ 1 for b in kek._material))
        return real(wrap_key, vault_id, other, rng)

    monkeypatch.setattr(envelope, "wrap_kek", wrap_other)


def _corrupt_vault_key(monkeypatch: pytest.MonkeyPatch) -> None:
    real = envelope.new_vault_key

    def mismatched(wrap_key: Aead, vault_id: bytes,
                   rng: envelope.Rng = random_bytes) -> tuple[bytes, bytearray]:
        blob, material = real(wrap_key, vault_id, rng)
        return blob, bytearray(b ^ 1 for b in material)

    monkeypatch.setattr(envelope, "new_vault_key", mismatched)


@pytest.mark.parametrize("corrupt", [_corrupt_kek_wrap, _corrupt_vault_key],
                         ids=["kek", "vault-key"])
def test_rekey_verifies_every_key_before_commit(
        store: Store, home: Path, monkeypatch: pytest.MonkeyPatch,
        corrupt: Callable[[pytest.MonkeyPatch], None]) -> None:
    store.set("svc", "u", CANARY)
    key = (home / "master.key").read_bytes()
    with monkeypatch.context() as m:
        corrupt(m)
        with pytest.raises(IntegrityError) as info:
            store.keys.rekey()
    assert info.value.reason == "rekey-verify"
    assert (home / "master.key").read_bytes() == key
    assert not (home / "master.key.new").exists()
    assert not (home / "rekey.json").exists()
    assert store.get("svc", "u").reveal() == CANARY
    store.close()
    with Store.open(home) as s:
        assert s.get("svc", "u").reveal() == CANARY
        assert s._vault.generation == 1
        s.trail.verify()


def test_rekey_event_and_epoch(store: Store, home: Path) -> None:
    store.set("svc", "u", "x")
    store.keys.rekey()
    assert store._epoch == 2
    event = store.trail.show(op="key-rekey")[0]
    assert (event.epoch, event.reason, event.key_version) == (2, "key-file-to-key-file", 2)
    assert [k.version for k in store.keys.versions()] == [1, 2]
    assert len(store._storage.past_keys()) == 1
    store.keys.rekey()
    assert [e for e, _ in store._storage.past_keys()] == [1, 2]
    store.close()
    with Store.open(home) as s:
        assert s.trail.verify().ok


def test_journal_generation_only_trusts_a_whole_integer() -> None:
    for text, expected in (('{"from_generation": 3}', 3), ('{"from_generation": true}', 2**62),
                           ('{"from_generation": "3"}', 2**62), ("[]", 2**62), ("{", 2**62),
                           ('{"other": 1}', 2**62), ("\udcff", 2**62)):
        assert keys._journal_generation(text.encode("utf-8", "surrogateescape")) == expected


def test_an_interrupted_rekey_that_committed_is_reported_as_such(store: Store, home: Path
                                                                ) -> None:
    # A journal from before the current generation: the rekey it describes committed.
    store.keys.rekey()
    store.close()
    (home / "rekey.json").write_text(json.dumps({"from_generation": 1}))
    with Store.open(home) as s:
        assert "had completed" in s.notices[0]
    assert not (home / "rekey.json").exists()
    (home / "rekey.json").write_text(json.dumps({"from_generation": 2}))
    with Store.open(home) as s:
        assert "had not taken effect" in s.notices[0]


def test_a_matching_new_key_file_is_moved_into_place(store: Store, home: Path) -> None:
    store.set("svc", "u", "x")
    store.close()
    key = home / "master.key"
    os.replace(key, home / "master.key.new")
    (home / "rekey.json").write_text(json.dumps({"from_generation": 0}))
    with Store.open(home) as s:
        assert "had completed" in s.notices[0]
        assert s.get("svc", "u").reveal() == "x"
    assert key.exists()
    assert not (home / "master.key.new").exists()


def test_recovery_waits_for_a_rekey_that_holds_the_lock(store: Store, home: Path) -> None:
    import fcntl

    store.close()
    (home / "rekey.json").write_text("{}")
    fd = os.open(home / "rekey.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        location = Location.resolve(home)
        from keyring_hardened.storage import SQLiteStorage

        storage = SQLiteStorage.open(location.database, "full", 5.0)
        try:
            assert keys.recover_interrupted_rekey(location, storage) is None
        finally:
            storage.close()
        assert (home / "rekey.json").exists()
    finally:
        os.close(fd)


def test_a_key_file_left_by_a_switch_to_a_passphrase_is_removed(home: Path) -> None:
    with Store.init(home, config=FAST_KDF) as s:
        s.keys.rekey(to="passphrase", passphrase=PASSPHRASE)
    stale = home / "master.key"
    stale.write_bytes(os.urandom(32))
    stale.chmod(0o600)
    (home / "rekey.json").write_text(json.dumps({"from_generation": 1}))
    with Store.open(home, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        assert "had completed" in s.notices[0]
    assert not stale.exists()


def test_opens_is_false_for_an_unreadable_key_file(tmp_path: Path) -> None:
    assert not keys._opens(tmp_path / "absent", b"v" * 16, b"x" * 32)


def test_rekey_refuses_a_vault_rekeyed_by_another_process(store: Store, home: Path) -> None:
    with Store.open(home) as other:
        other.keys.rekey()
    with pytest.raises(UsageError) as info:
        store.keys.rekey(to="passphrase", passphrase=PASSPHRASE)
    assert info.value.reason == "rekey-race"
    assert store.mode == "key file"


def test_rewrap_progress_counts_versions_not_credentials(store: Store) -> None:
    store.set("svc", "u", "one")
    store.set("svc", "u", "two")
    store.keys.rotate()
    calls: list[tuple[int, int]] = []
    store.keys.rewrap(batch=1, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    plan = store.trail.show(op="key-rewrap-plan")[0]
    assert plan.key_version == 2


def test_rewrap_time_is_an_elapsed_time(store: Store) -> None:
    import time

    summary = store.keys.rewrap()
    assert 0 <= summary.seconds <= time.perf_counter()


def test_a_manual_rotation_is_one_event(store: Store) -> None:
    store.keys.rotate()
    events = store.trail.show(op="key-rotate")
    assert len(events) == 1
    assert (events[0].reason, events[0].key_version) == ("manual", 2)


def test_key_list_shows_when_each_version_was_made(home: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, clock=lambda: now[0]) as s:
        now[0] += 10
        s.keys.rotate()
        assert [(k.version, k.created_at) for k in s.keys.versions()] == [
            (1, 1_000_000.0), (2, 1_000_010.0)]


def test_retire_of_versions_this_process_never_loaded(store: Store, home: Path) -> None:
    with Store.open(home) as other:
        other.keys.rotate()
        other.keys.rotate()
    assert set(store._keks) == {1}
    assert store.keys.retire(3) == [1, 2]
    assert set(store._keks) == set()
    store.set("svc", "u", "x")  # loads version 3 on demand
    assert store.get("svc", "u").reveal() == "x"


def test_recovery_never_deletes_a_key_file_of_a_key_file_vault(store: Store, home: Path
                                                               ) -> None:
    store.close()
    key = home / "master.key"
    real = key.read_bytes()
    key.write_bytes(os.urandom(32))  # a wrong key, left in place
    (home / "rekey.json").write_text(json.dumps({"from_generation": 1}))
    with pytest.raises(LockedError):
        Store.open(home)
    assert key.exists()
    key.unlink()
    (home / "rekey.json").write_text(json.dumps({"from_generation": 1}))
    with pytest.raises(LockedError) as info:
        Store.open(home)
    assert info.value.reason == "no-key-file"
    key.write_bytes(real)
    key.chmod(0o600)
    with Store.open(home) as s:
        assert s.mode == "key file"


REWRAP = """
import sys
from keyring_hardened.store import Store
with Store.open(sys.argv[1]) as s:
    s.keys.rewrap(batch=1)
"""


@pytest.mark.parametrize("point", ["rewrap-mid-batch", "rewrap-after-batch"])
def test_rewrap_crash_points_are_where_they_are_named(store: Store, home: Path,
                                                      point: str) -> None:
    import subprocess
    import sys

    store.set("svc", "a", "one")
    store.set("svc", "b", "two")
    store.keys.rotate()
    store.keys.rewrap(batch=1)  # in-process too: ties this test to rewrap for mutmut
    store.keys.rotate()
    store.close()
    env = {**os.environ, "KEYRING_HARDENED_CRASH_AT": point}
    done = subprocess.run([sys.executable, "-c", REWRAP, str(home)], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == -9, done.stderr
    with Store.open(home) as s:
        in_use = {k.version: k.data_keys for k in s.keys.versions()}
        # mid-batch: the first batch died uncommitted; after a batch: one moved
        assert in_use[3] == (0 if point == "rewrap-mid-batch" else 1)
        assert s.get("svc", "a").reveal() == "one"
        assert s.get("svc", "b").reveal() == "two"


def test_an_untrusted_rekey_journal_is_refused_by_name_and_left_alone(store: Store,
                                                                     home: Path) -> None:
    store.close()
    target = home.parent / "elsewhere.json"
    target.write_text(json.dumps({"from_generation": 0}))
    (home / "rekey.json").symlink_to(target)
    with pytest.raises(ConfigError, match=r"^rekey journal .* is a symbolic link"):
        Store.open(home)
    assert (home / "rekey.json").is_symlink()
    assert target.exists()


def test_listing_the_keys_is_audited_as_key_list(store: Store) -> None:
    assert [k.version for k in store.keys.versions()] == [1]
    assert store.trail.show(limit=1)[0].op == "key-list"


REKEY = """
import sys
from keyring_hardened.store import Store
with Store.open(sys.argv[1]) as s:
    s.keys.rekey()
"""


@pytest.mark.parametrize("point", ["rekey-before-commit", "rekey-after-commit",
                                   "rekey-after-rename"])
def test_a_rekey_writes_its_journal_first_and_dies_where_its_crash_points_say(
        store: Store, home: Path, point: str) -> None:
    import subprocess
    import sys
    import time

    store.keys.rekey()  # in-process too: ties this test to the rekey for mutmut
    store.close()
    env = {**os.environ, "KEYRING_HARDENED_CRASH_AT": point}
    started = time.time()
    done = subprocess.run([sys.executable, "-c", REKEY, str(home)], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == -9, done.stderr  # died at the named point
    journal = home / "rekey.json"
    assert (journal.stat().st_mode & 0o777) == 0o600
    doc = json.loads(journal.read_text("utf-8"))
    assert started <= doc.pop("started_at") <= time.time()
    assert doc == {"from_generation": 2, "from": "key file", "to": "key file"}
    # the new key file is renamed into place after the commit, before the last point
    assert (home / "master.key.new").exists() is (point != "rekey-after-rename")
    with Store.open(home) as s:
        committed = point != "rekey-before-commit"
        assert ("had completed" if committed else "had not taken effect") in s.notices[0]
        assert s._vault.generation == (3 if committed else 2)
    assert not journal.exists()


def test_a_rekey_rewraps_every_kek_after_a_retired_one(store: Store, home: Path) -> None:
    store.set("svc", "old", "one")
    store.keys.rotate()
    store.set("svc", "new", "two")
    store.keys.rewrap()
    assert store.keys.retire(2) == [1]  # version 1 has no wrapped key any more
    store.keys.rekey()
    store.close()
    with Store.open(home) as s:
        assert s.get("svc", "old").reveal() == "one"
        assert s.get("svc", "new").reveal() == "two"


def test_a_rekey_adds_its_kek_without_a_rotate_event_of_its_own(store: Store) -> None:
    store.keys.rekey()
    assert store.trail.show(op="key-rotate") == []
    event = store.trail.show(op="key-rekey")[0]
    assert (event.key_version, event.reason) == (2, "key-file-to-key-file")
    assert store.trail.verify().ok


def test_a_rekey_to_a_passphrase_when_the_key_file_is_already_gone(home: Path) -> None:
    with Store.init(home, config=FAST_KDF) as s:
        s.set("svc", "u", "x")
        (home / "master.key").unlink()  # removed by hand while the vault was open
        s.keys.rekey(to="passphrase", passphrase=PASSPHRASE)
        assert s.mode == "passphrase"
    with Store.open(home, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        assert s.get("svc", "u").reveal() == "x"
