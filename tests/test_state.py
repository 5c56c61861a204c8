"""The authenticated state: the tree's pure functions, the epoch rules of the chain, upgrades."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import struct
from pathlib import Path

import pytest

from keyring_hardened import audit, state
from keyring_hardened.audit import Event
from keyring_hardened.errors import ConfigError, IntegrityError, UsageError
from keyring_hardened.rootkey import KdfParams
from keyring_hardened.store import Store

from .conftest import CANARY, run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1"


def test_field_encoding_is_typed_and_unambiguous() -> None:
    # Recomputed by hand from the documented layout: a type letter, then
    # a big-endian length for text and bytes, 8 bytes for numbers.
    assert state._field(None) == b"N"
    assert state._field(7) == b"I" + struct.pack(">q", 7)
    assert state._field(1.5) == b"F" + struct.pack(">d", 1.5)
    assert state._field("é") == b"S" + struct.pack(">I", 2) + "é".encode()
    assert state._field(b"ab") == b"B\x00\x00\x00\x02ab"
    for bad in (True, 1j):
        with pytest.raises(TypeError):
            state._field(bad)
    # "1" and 1, b"" and None, "ab"+"c" and "a"+"bc" all differ.
    assert state.version_digest(1, 1, b"ab", b"c", 0.0, None, None) != \
        state.version_digest(1, 1, b"a", b"bc", 0.0, None, None)
    assert state.version_digest(1, 1, b"", b"", 0.0, None, None) != \
        state.version_digest(1, 1, b"", b"", 0.0, 0.0, None)


def test_whole_reals_hash_like_reals() -> None:
    # SQLite may return a whole REAL as int after an edit; the digest must not care.
    assert state.version_digest(1, 1, b"k", b"c", 5, 60, 65) == \
        state.version_digest(1, 1, b"k", b"c", 5.0, 60.0, 65.0)


def test_bucket_of_is_sixteen_bits_of_a_hash_of_the_service() -> None:
    expected = int.from_bytes(hashlib.sha256(b"kh-state-v1/bucket\x00svc").digest()[:2], "big")
    assert state.bucket_of("svc") == expected
    assert all(0 <= state.bucket_of(f"s{i}") < 65536 for i in range(200))


def test_path_keys_climb_four_levels_of_sixteen() -> None:
    assert state.path_keys(0xABCD) == (((3, 0xABC), 0xD), ((2, 0xAB), 0xC), ((1, 0xA), 0xB),
                                       ((0, 0), 0xA))


def test_update_paths_matches_a_full_rebuild_and_verifies() -> None:
    meta = b"m" * 32
    digests = {b: hashlib.sha256(b"%d" % b).digest() for b in (1, 17, 4096, 65535)}
    nodes = state.update_paths(digests, {})
    root = state.root_of(meta, nodes[(0, 0)])
    assert root == state.full_root(meta, digests)
    for bucket, digest in digests.items():
        assert state.verify_path(bucket, digest, nodes, meta, root)
        assert not state.verify_path(bucket, bytes(32), nodes, meta, root)
    assert not state.verify_path(2, digests[1], nodes, meta, root)
    assert not state.verify_path(1, digests[1], nodes, b"x" * 32, root)
    # Change one bucket incrementally: the same as rebuilding with the change.
    changed = {**digests, 17: hashlib.sha256(b"new").digest()}
    nodes2 = {**nodes, **state.update_paths({17: changed[17]}, nodes)}
    assert state.root_of(meta, nodes2[(0, 0)]) == state.full_root(meta, changed)
    # An emptied bucket is the empty digest; an all-empty tree is the empty root.
    assert state.full_root(meta, {}) == state.root_of(meta, state.EMPTY_NODE)
    assert state.node_digest(state.EMPTY_NODE) == state.EMPTY
    assert state.bucket_digest([]) == state.EMPTY
    truncated = {**nodes, (3, 1): nodes[(3, 1)][:-1]}
    assert not state.verify_path(17, digests[17], truncated, meta, root)


def _v2(seq: int, epoch: int, op: str, key: bytes, prev: bytes) -> Event:
    e = Event(seq, seq, "a", op, None, None, "ok", None, None, b"", epoch, bytes(32))
    return e._replace(mac=audit.chain_mac(key, prev, e))


def test_chain_epochs_only_move_forward_at_a_rekey() -> None:
    k1, k2 = b"1" * 32, b"2" * 32
    e1 = _v2(1, 1, "init", k1, audit.GENESIS)
    e2 = _v2(2, 2, "key-rekey", k2, e1.mac)
    e3 = _v2(3, 2, "read", k2, e2.mac)
    assert audit.verify({1: k1, 2: k2}, [e1, e2, e3]).ok
    # A jump outside a rekey, an epoch going back, a missing key: all refused.
    jump = _v2(2, 2, "read", k2, e1.mac)
    assert "outside a rekey" in (audit.verify({1: k1, 2: k2}, [e1, jump]).problem or "")
    back = _v2(3, 1, "read", k1, e2.mac)
    assert not audit.verify({1: k1, 2: k2}, [e1, e2, back]).ok
    assert "does not hold" in (audit.verify({1: k1}, [e1, e2]).problem or "")
    # An old-epoch key cannot make an event that passes for the new epoch.
    forged = _v2(3, 2, "read", k1, e2.mac)
    assert not audit.verify({1: k1, 2: k2}, [e1, e2, forged]).ok
    # Blanking a format-2 event's epoch and root to pass it off as format 1 breaks its mac.
    blank = e3._replace(epoch=None, root=None)
    assert not audit.verify({1: k1, 2: k2}, [e1, e2, blank], legacy_epoch=2).ok
    half = e3._replace(root=None)
    assert "lacks a state root" in (audit.verify({1: k1, 2: k2}, [e1, e2, half]).problem or "")


def test_canonical_encoding_recomputed_from_the_documented_format() -> None:
    e = Event(4, 5, "alice:app", "read", "svc", None, "ok", 1, None, b"", 2, b"\x01" * 32)
    documented = ('[4,5,"alice:app","read","svc",null,"ok",1,null,2,"' + "01" * 32 + '"]')
    assert audit.canonical(e) == documented.encode()
    legacy = Event(4, 5, "a", "read", None, None, "ok", None, None)
    assert audit.canonical(legacy) == b'[4,5,"a","read",null,null,"ok",null,null]'


@pytest.mark.parametrize("doc", [
    '{"algorithm": "argon2id", "salt": "00", "memory_kib": 65536, "iterations": 3, "lanes": 4}',
    '{"algorithm": "argon2id", "salt": "' + "00" * 16 + '", "memory_kib": 8388608,'
    ' "iterations": 3, "lanes": 4}',
    '{"algorithm": "argon2id", "salt": "' + "00" * 16 + '", "memory_kib": 65536,'
    ' "iterations": 2000000000, "lanes": 4}',
    '{"algorithm": "argon2id", "salt": "' + "00" * 16 + '", "memory_kib": 65536,'
    ' "iterations": 3, "lanes": 0}',
    '{"algorithm": "argon2id", "salt": "' + "00" * 16 + '", "memory_kib": 1024,'
    ' "iterations": 3, "lanes": 1}',
    '{"algorithm": "argon2id", "salt": "' + "00" * 16 + '", "memory_kib": "65536",'
    ' "iterations": 3, "lanes": 1}',
    '{"algorithm": "pbkdf2-sha256", "salt": "' + "00" * 16 + '", "iterations": 1000}',
    '{"algorithm": "pbkdf2-sha256", "salt": "' + "00" * 16 + '", "iterations": true}',
    '{"algorithm": "scrypt"}',
    '[]',
])
def test_stored_kdf_parameters_out_of_range_are_damage(doc: str) -> None:
    with pytest.raises(IntegrityError, match="key derivation parameters are damaged"):
        KdfParams.from_json(doc)


def test_stored_kdf_parameters_at_the_limits_are_accepted() -> None:
    salt = "00" * 16
    assert KdfParams.from_json(f'{{"algorithm": "argon2id", "salt": "{salt}", "memory_kib":'
                               ' 19456, "iterations": 2, "lanes": 1}').in_range()
    assert KdfParams.from_json(f'{{"algorithm": "pbkdf2-sha256", "salt": "{salt}",'
                               ' "iterations": 600000}').in_range()


def _legacy(tmp_path: Path) -> Path:
    home = tmp_path / "legacy"
    shutil.copytree(FIXTURE, home)
    os.chmod(home, 0o700)
    for f in home.iterdir():
        os.chmod(f, 0o600)
    return home


def test_a_0_1_vault_is_refused_until_upgraded_once(tmp_path: Path) -> None:
    home = _legacy(tmp_path)
    with pytest.raises(ConfigError, match="keyring-hardened upgrade"):
        Store.open(home)
    done = run_cli("get", "svc", "user", home=home)
    assert done.returncode == 2
    assert "upgrade" in done.stderr
    up = run_cli("upgrade", home=home)
    assert up.returncode == 0, up.stderr
    assert "2 credentials" in up.stderr
    assert run_cli("get", "svc", "user", home=home).stdout == "value-3\n"
    assert run_cli("get", "svc", "user", "--version", "1", home=home).stdout == "value-1\n"
    assert run_cli("audit", "verify", home=home).returncode == 0
    again = run_cli("upgrade", home=home)
    assert again.returncode == 2
    assert "already upgraded" in again.stderr
    with Store.open(home) as s:
        assert s._epoch == 2  # the upgrade started a new key epoch
        ops = [e.op for e in s.trail.show()]
        assert ops.count("upgrade") == 1
        s.set("svc", "user", CANARY)
        s.trail.verify()


def test_upgrade_refuses_a_tampered_0_1_vault(tmp_path: Path) -> None:
    home = _legacy(tmp_path)
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute("UPDATE credentials SET current_version = 1 WHERE service = 'svc'")
    done = run_cli("upgrade", home=home)
    assert done.returncode == 3
    assert "nothing was changed" in done.stderr
    home2 = _legacy(tmp_path / "two")
    with sqlite3.connect(home2 / "vault.db") as conn:
        conn.execute("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2")
    assert run_cli("upgrade", home=home2).returncode == 3


def test_a_downgraded_vault_never_opens_as_0_1(tmp_path: Path) -> None:
    # Setting the state version back to 0 does not let 0.1's weaker checks in:
    # the 0.1 trail no longer verifies under the upgraded vault key.
    home = _legacy(tmp_path)
    assert run_cli("upgrade", home=home).returncode == 0
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute("UPDATE vault SET state_version = 0")
    assert run_cli("upgrade", home=home).returncode == 3
    assert run_cli("get", "svc", "user", home=home).returncode == 2


def test_rekey_event_starts_the_new_epoch_and_the_chain_spans_it(home: Path) -> None:
    with Store.init(home) as s:
        s.set("svc", "u", "one")
        s.keys.rekey()
        s.keys.rekey()
        s.set("svc", "u", "two")
        events = s.trail.show()
        rekeys = [e for e in events if e.op == "key-rekey"]
        assert [e.epoch for e in rekeys] == [3, 2]
        assert events[0].epoch == 3
        assert s.trail.verify().ok
    with sqlite3.connect(home / "vault.db") as conn:
        assert [r[0] for r in conn.execute("SELECT epoch FROM vault_keys ORDER BY epoch")] == \
            [1, 2]


def test_hashed_identifiers_survive_a_rekey(home: Path) -> None:
    from keyring_hardened.config import Config

    cfg = Config(audit_hmac_identifiers=True)
    with Store.init(home, config=cfg) as s:
        s.set("svc", "u", "x")
        before = s.trail.show(service="svc")[0].service
        s.keys.rekey()
        s.get("svc", "u")
        assert s.trail.show(service="svc")[0].service == before
    with Store.open(home, config=cfg) as s:
        s.get("svc", "u")
        assert {e.service for e in s.trail.show(service="svc")} == {before}


def test_usage_errors_before_the_vault_is_touched(store: Store) -> None:
    for bad in (0, -1, True, 2**32, 2**63):
        with pytest.raises(UsageError):
            store.get("svc", "u", version=bad)


def test_fast_digests_equal_the_generic_encoding() -> None:
    for ttl, expires in ((None, None), (60, 1e9), (1.5, None)):
        assert state.version_digest(3, 2, b"wk", b"ct", 5, ttl, expires) == state._digest(
            b"version", 3, 2, b"wk", b"ct", 5.0, state._real(ttl), state._real(expires), None)
    for current in (None, 4):
        assert state.head_leaf(1, "svc", "ü", current, 4, 1, 2.5, None, b"d", b"") == \
            state._digest(b"head", 1, "svc", "ü", current, 4, 1.0, 2.5, None, b"d", b"", None)


def test_status_says_whether_a_first_set_made_the_vault(tmp_path: Path) -> None:
    import json

    first = tmp_path / "first"
    assert run_cli("set", "svc", "u", home=first, stdin="x").returncode == 0
    info = json.loads(run_cli("status", "--json", home=first).stdout)
    assert info["created_implicitly"] is True
    assert "by a first set" in run_cli("status", home=first).stdout
    made = tmp_path / "made"
    assert run_cli("init", home=made).returncode == 0
    assert json.loads(run_cli("status", "--json", home=made).stdout)["created_implicitly"] is False


def test_export_to_a_name_that_is_not_utf8_is_refused_by_the_core(store: Store,
                                                                   tmp_path: Path) -> None:
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/\xff.jsonl"))
    with pytest.raises(UsageError, match="UTF-8"):
        store.trail.export(bad)
    assert not os.path.exists(os.fsencode(bad))
