"""Proofs of the claims issue 10 found without a test: one focused test per claim.

Each test is named for the claim it proves and fails when the code stops
doing what the documentation says (``docs/claims.md`` cites them; the
mutation sample in ``docs/testing.md`` shows ten of them failing against a
one-line change of the production code). Where the claim is about the CLI,
the test runs the CLI as a real process; expected values that the docs
specify (the audit chain, hashed identifiers) are recomputed from the
documented format with ``hashlib``, ``hmac`` and ``cryptography``, never
with the code under test.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import types
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyring_hardened import backend, envelope, keys, rootkey
from keyring_hardened._aead import Aead
from keyring_hardened.config import Config
from keyring_hardened.envelope import Kek
from keyring_hardened.errors import ConfigError, IntegrityError, LockedError, UsageError
from keyring_hardened.rootkey import KdfParams, RootKey, VaultKeys
from keyring_hardened.session import _Note, _version_digest
from keyring_hardened.storage import SQLiteStorage
from keyring_hardened.store import Store
from keyring_hardened.testing import FrozenClock

from .conftest import CANARY, FAST_KDF, run_cli

NONCE = slice(1, 13)
#: A 96-bit nonce of zeros, what a broken nonce source would give.
ZERO_NONCE = bytes(12)

# -- helpers --------------------------------------------------------------------


@contextlib.contextmanager
def _db(home: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def _rows(home: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with _db(home) as conn:
        return conn.execute(sql, args).fetchall()


def _events(home: Path) -> list[tuple[Any, ...]]:
    return _rows(home, "SELECT seq, ts_us, op, service, username, outcome, reason"
                       " FROM audit_events ORDER BY seq")


def _field(value: bytes) -> bytes:
    """One length-prefixed field of associated data (4-byte big-endian length)."""
    return struct.pack(">I", len(value)) + value


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) by cryptography, not by the code under test."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _vault_key_from_key_file(home: Path) -> tuple[bytes, bytes]:
    """(vault id, vault key) unwrapped by hand from the key file, as the docs describe it."""
    (vault_id, blob), = _rows(home, "SELECT vault_id, vault_key FROM vault")
    wrap = _hkdf((home / "master.key").read_bytes(), vault_id, b"keyring-hardened/v1/kek-wrap")
    assert blob[0] == 0x01
    key = AESGCM(wrap).decrypt(blob[NONCE], blob[13:],
                               _field(b"kh1/vault-key") + _field(vault_id))
    assert len(key) == 32
    return vault_id, key


def _all_blobs(home: Path) -> dict[str, set[bytes]]:
    """Every AES-GCM blob the vault stores, by layer."""
    return {
        "payload": {r[0] for r in _rows(home, "SELECT ciphertext FROM secret_versions")},
        "data key": {r[0] for r in _rows(home, "SELECT wrapped_key FROM secret_versions")},
        "kek": {r[0] for r in _rows(home, "SELECT wrapped FROM keks WHERE wrapped IS NOT NULL")},
        "vault key": {r[0] for r in _rows(home, "SELECT vault_key FROM vault")},
        "past vault key": {r[0] for r in _rows(home, "SELECT wrapped FROM vault_keys")},
    }


def _seal_a_lot(home: Path) -> dict[str, set[bytes]]:
    """Seal many secrets and keys on every layer; every blob seen along the way, by layer."""
    seen: dict[str, set[bytes]] = {}

    def collect() -> None:
        for layer, blobs in _all_blobs(home).items():
            seen.setdefault(layer, set()).update(blobs)

    with Store.init(home) as s:
        for round_ in range(3):
            for i in range(20):
                s.set("svc", f"user{i}", f"secret {round_} {i}")
            s.keys.rotate()
            collect()
        s.keys.rewrap()
        collect()
        for _ in range(3):
            s.keys.rekey(to="key file")
            s.set("svc", "after-rekey", "x")
            collect()
    return seen


def _nonce_reuse(seen: dict[str, set[bytes]]) -> dict[str, int]:
    """Per layer, and across all of them, how many distinct blobs share a nonce."""
    found = {}
    everything = [b for blobs in seen.values() for b in blobs]
    for layer, blobs in [*seen.items(), ("all layers", set(everything))]:
        nonces = [b[NONCE] for b in blobs]
        found[layer] = len(nonces) - len(set(nonces))
    return found


# -- fresh random nonces on every layer -------------------------------------------


def test_fresh_random_nonces_on_every_layer(home: Path) -> None:
    seen = _seal_a_lot(home)
    assert {layer: len(blobs) > 0 for layer, blobs in seen.items()} == dict.fromkeys(seen, True)
    assert sum(len(b) for b in seen.values()) > 200
    for blobs in seen.values():
        assert all(b[0] == 0x01 and len(b) >= 1 + 12 + 16 for b in blobs)
    assert _nonce_reuse(seen) == dict.fromkeys([*seen, "all layers"], 0)
    assert ZERO_NONCE not in {b[NONCE] for blobs in seen.values() for b in blobs}


def test_fresh_random_nonces_check_catches_a_zero_nonce_mutant(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is not hollow: with every nonce zero, it finds reuse on every layer."""
    def zero_nonce_seal(aead: Aead, plaintext: bytes, ad: bytes,
                        rng: Callable[[int], bytes]) -> bytes:
        return b"\x01" + ZERO_NONCE + aead.seal(ZERO_NONCE, plaintext, ad)

    monkeypatch.setattr(envelope, "_seal", zero_nonce_seal)
    reuse = _nonce_reuse(_seal_a_lot(home))
    assert all(count > 0 for count in reuse.values()), reuse
    assert reuse["all layers"] > 200


# -- verify-before-commit in rekey ------------------------------------------------


def _vault_rows(home: Path) -> list[list[tuple[Any, ...]]]:
    return [_rows(home, f"SELECT * FROM {table}") for table in (
        "vault", "keks", "vault_keys", "credentials", "secret_versions", "state_nodes")]


@pytest.mark.parametrize("broken", ["vault key", "kek"])
def test_rekey_verifies_before_commit(home: Path, monkeypatch: pytest.MonkeyPatch,
                                      broken: str) -> None:
    """The new root key must re-open every key it wraps, or nothing changes (exit 3)."""
    with Store.init(home) as s:
        s.set("svc", "alice", CANARY)
        s.keys.rotate()
        s.set("svc", "bob", "bob-secret")
    key_file = (home / "master.key").read_bytes()
    before = _vault_rows(home)
    n_events = len(_events(home))

    s = Store.open(home)
    old_wrap = s._root.wrap
    real = envelope

    def unwrap_vault_key(wrap_key: Any, vault_id: bytes, blob: bytes) -> bytearray:
        material = real.unwrap_vault_key(wrap_key, vault_id, blob)
        if broken == "vault key" and wrap_key is not old_wrap:  # the re-unwrap's compare
            material[0] ^= 1
        return material

    def unwrap_kek(wrap_key: Any, vault_id: bytes, version: int, blob: bytes) -> Kek:
        kek = real.unwrap_kek(wrap_key, vault_id, version, blob)
        if broken == "kek" and wrap_key is not old_wrap:
            kek._material[0] ^= 1
        return kek

    # Only keys.py sees the faulty unwrap: the rekey's own re-unwrap and compare.
    faulty = types.SimpleNamespace(**{**vars(real), "unwrap_vault_key": unwrap_vault_key,
                                      "unwrap_kek": unwrap_kek})
    monkeypatch.setattr(keys, "envelope", faulty)
    try:
        with pytest.raises(IntegrityError) as info:
            s.keys.rekey(to="key file")
        assert info.value.reason == "rekey-verify"
    finally:
        s.close()
    monkeypatch.undo()

    assert _vault_rows(home) == before
    assert (home / "master.key").read_bytes() == key_file
    assert sorted(p.name for p in home.iterdir() if p.name.startswith(("master.key",
                                                                       "rekey.json"))) \
        == ["master.key"]
    events = _events(home)
    assert len(events) == n_events + 1
    assert events[-1][2:] == ("key-rekey", None, None, "integrity", "rekey-verify")
    with Store.open(home) as s2:  # the old key still opens it, and every secret reads
        assert s2.get("svc", "alice").reveal() == CANARY
        assert s2.get("svc", "bob").reveal() == "bob-secret"
    assert run_cli("audit", "verify", home=home).returncode == 0


# -- a process opened before a rekey ------------------------------------------------


@pytest.fixture
def two_credentials(home: Path) -> Path:
    with Store.init(home) as s:
        s.set("svc", "alice", CANARY)
        s.set("svc", "bob", "bob-secret")
    return home


def test_process_opened_before_rekey_rereads_the_new_key_file_and_goes_on(
        two_credentials: Path) -> None:
    home = two_credentials
    with Store.open(home) as early:
        old_key = (home / "master.key").read_bytes()
        done = run_cli("key", "rekey", home=home)
        assert done.returncode == 0, done.stderr
        assert (home / "master.key").read_bytes() != old_key
        assert early.get("svc", "alice").reveal() == CANARY
        early.set("svc", "carol", "carol-secret")
        assert early._epoch == 2
        assert early.history("svc", "carol")[0].kek_version == 2  # the rekey's new KEK
    done = run_cli("get", "svc", "carol", home=home)
    assert (done.returncode, done.stdout) == (0, "carol-secret\n"), done.stderr
    assert run_cli("audit", "verify", home=home).returncode == 0


def test_process_opened_before_rekey_never_loads_a_kek_under_the_old_root_key(
        two_credentials: Path) -> None:
    """A KEK row wrapped under the old root key is refused as damage on the load path.

    The row is written by a holder of the new keys, so the state root covers
    it: only the unwrap under the current root key stands between it and use.
    """
    home = two_credentials
    old_key = (home / "master.key").read_bytes()
    early = Store.open(home)
    try:
        assert run_cli("key", "rekey", home=home).returncode == 0
        with Store.open(home) as forger:
            old_root = RootKey(bytearray(old_key), forger._vault.vault_id)

            def add_old_root_kek(storage: SQLiteStorage, note: _Note) -> int:
                return forger._rotate_in(storage, forger._clock(), "forged", record=False,
                                         root=old_root)

            forged = forger._run("key-rotate", None, None, add_old_root_kek, writes=True)
            old_root.close()
        assert forged == 3
        with pytest.raises(IntegrityError) as info:
            early.get("svc", "alice")
        assert info.value.reason == "kek-damaged"
        assert forged not in early._keks
    finally:
        early.close()
    with pytest.raises(IntegrityError) as info:
        Store.open(home)
    assert info.value.reason == "kek-damaged"
    done = run_cli("get", "svc", "alice", home=home)
    assert (done.returncode, done.stdout) == (3, "")
    assert _events(home)[-1][5:] == ("integrity", "kek-damaged")


def test_process_opened_before_picks_up_kek_versions_another_process_added(
        two_credentials: Path) -> None:
    home = two_credentials
    with Store.open(home) as early:
        assert set(early._keks) == {1}
        assert run_cli("key", "rotate", home=home).returncode == 0
        assert run_cli("set", "svc", "dave", home=home, stdin="dave-secret\n").returncode == 0
        assert early.get("svc", "dave").reveal() == "dave-secret"  # wrapped under KEK 2
        early.set("svc", "erin", "erin-secret")
        assert early.history("svc", "erin")[0].kek_version == 2
        assert set(early._keks) == {1, 2}
    done = run_cli("get", "svc", "erin", home=home)
    assert (done.returncode, done.stdout) == (0, "erin-secret\n"), done.stderr


# -- a damaged wrapped vault key is integrity, not locked ----------------------------


def test_damaged_wrapped_vault_key_is_integrity_not_locked(two_credentials: Path) -> None:
    home = two_credentials
    with _db(home) as conn:
        blob = bytearray(conn.execute("SELECT vault_key FROM vault").fetchone()[0])
        blob[20] ^= 0x01
        conn.execute("UPDATE vault SET vault_key = ?", (bytes(blob),))
    with pytest.raises(IntegrityError) as info:
        Store.open(home)
    assert not isinstance(info.value, LockedError)
    assert info.value.reason == "vault-key-damaged"
    done = run_cli("get", "svc", "alice", home=home)
    assert (done.returncode, done.stdout) == (3, ""), done.stderr
    assert "wrong key" not in done.stderr
    assert _rows(home, "SELECT outcome, reason FROM audit_pending") == \
        [("integrity", "vault-key-damaged")] * 2


# -- key wiping for every key holder --------------------------------------------------


def _is_zero(buf: bytearray) -> bool:
    return len(buf) == 32 and not any(buf)


def _is_key(buf: bytearray) -> bool:
    return len(buf) == 32 and any(buf)


def test_rootkey_close_wipes_every_buffer() -> None:
    material = bytearray(os.urandom(32))
    root = RootKey(material, os.urandom(16))
    assert not any(material)  # the root key itself is dropped once derived from
    buffers = [root._wrap_key, root._verifier_key]
    assert all(map(_is_key, buffers))
    root.close()
    assert [_is_zero(b) for b in buffers] == [True, True]


def test_vaultkeys_close_wipes_every_buffer() -> None:
    material = bytearray(os.urandom(32))
    vk = VaultKeys(material, os.urandom(16))
    assert not any(material)
    buffers = [vk.audit_key, vk.identifier_key, vk._record_key, vk._past_key]
    assert all(map(_is_key, buffers))
    vk.close()
    assert [_is_zero(b) for b in buffers] == [True] * 4


def test_kek_wipe_zeroes_its_material() -> None:
    kek = envelope.new_kek(1)
    buffer = kek._material
    assert _is_key(buffer)
    kek.wipe()
    assert bytes(buffer) == bytes(32), "Kek.wipe left key material in its buffer"


def _session_buffers(s: Store) -> dict[str, bytearray]:
    found = {"root wrap": s._root._wrap_key, "root verifier": s._root._verifier_key,
             "audit": s._vkeys.audit_key, "identifier": s._vkeys.identifier_key,
             "record": s._vkeys._record_key, "past": s._vkeys._past_key}
    found.update({f"kek {v}": k._material for v, k in s._keks.items()})
    if s._ident_key is not None:
        found["ident"] = s._ident_key
    return found


def test_session_close_wipes_every_key_it_holds(home: Path) -> None:
    cfg = Config(audit_hmac_identifiers=True)
    with Store.init(home, config=cfg) as s:
        s.keys.rotate()
        s.keys.rekey(to="key file")  # an identifier key of the first epoch, KEKs 1..3
        s.set("svc", "alice", "x")
    s = Store.open(home, config=cfg)
    s.get("svc", "alice")
    buffers = _session_buffers(s)
    assert {"ident", "kek 1", "kek 2", "kek 3"} <= buffers.keys()
    assert all(map(_is_key, buffers.values()))
    s.close()
    assert {name: _is_zero(buf) for name, buf in buffers.items()} == dict.fromkeys(buffers, True)


def test_rekey_wipes_the_keys_it_replaces(home: Path) -> None:
    with Store.init(home) as s:
        s.set("svc", "alice", "x")
        old = {"root wrap": s._root._wrap_key, "root verifier": s._root._verifier_key,
               "audit": s._vkeys.audit_key, "identifier": s._vkeys.identifier_key,
               "record": s._vkeys._record_key, "past": s._vkeys._past_key}
        s.keys.rekey(to="key file")
        assert {n: _is_zero(b) for n, b in old.items()} == dict.fromkeys(old, True)
        assert all(map(_is_key, _session_buffers(s).values()))


# -- NFC passphrases ----------------------------------------------------------------

NFC_PASSPHRASE = "Crème brûlée façade naïve"
NFD_PASSPHRASE = unicodedata.normalize("NFD", NFC_PASSPHRASE)


@pytest.mark.parametrize(("made_with", "opened_with"), [
    (NFD_PASSPHRASE, NFC_PASSPHRASE), (NFC_PASSPHRASE, NFD_PASSPHRASE)], ids=["nfd", "nfc"])
def test_passphrases_are_nfc_normalised(home: Path, made_with: str, opened_with: str) -> None:
    assert made_with != opened_with
    assert made_with.encode() != opened_with.encode()
    with Store.init(home, passphrase_mode=True, passphrase=made_with, config=FAST_KDF) as s:
        s.set("svc", "alice", CANARY)
    with Store.open(home, passphrase=opened_with, config=FAST_KDF) as s:
        assert s.get("svc", "alice").reveal() == CANARY
    with pytest.raises(LockedError):  # a different passphrase still does not open it
        Store.open(home, passphrase=opened_with + "!", config=FAST_KDF)


def test_derive_from_passphrase_normalises_to_nfc() -> None:
    params = KdfParams("pbkdf2-sha256", os.urandom(16), iterations=1000)  # fast, not stored
    nfc = rootkey.derive_from_passphrase(params, NFC_PASSPHRASE)
    assert rootkey.derive_from_passphrase(params, NFD_PASSPHRASE) == nfc
    assert nfc == bytearray(hashlib.pbkdf2_hmac("sha256", NFC_PASSPHRASE.encode(), params.salt,
                                                1000, 32))


# -- default KDF parameters and their floors -----------------------------------------


def test_default_kdf_parameters_are_rfc9106_second_recommendation_and_owasp_pbkdf2() -> None:
    params = Config().new_kdf_params()
    assert (params.algorithm, params.memory_kib, params.iterations, params.lanes) == \
        ("argon2id", 64 * 1024, 3, 4)
    assert len(params.salt) == 16
    assert Config().new_kdf_params().salt != params.salt
    pbkdf2 = Config().new_kdf_params("pbkdf2")
    assert (pbkdf2.algorithm, pbkdf2.iterations, len(pbkdf2.salt)) == \
        ("pbkdf2-sha256", 600_000, 16)


def test_default_kdf_parameters_are_what_a_passphrase_vault_stores(home: Path) -> None:
    Store.init(home, passphrase_mode=True, passphrase="a default passphrase").close()
    (stored,), = _rows(home, "SELECT kdf FROM vault")
    doc = json.loads(stored)
    assert (doc["algorithm"], doc["memory_kib"], doc["iterations"], doc["lanes"]) == \
        ("argon2id", 65536, 3, 4)
    assert len(bytes.fromhex(doc["salt"])) == 16


@pytest.mark.parametrize(("key", "below", "floor"), [
    ("argon2_memory_kib", 19 * 1024 - 1, 19 * 1024),
    ("argon2_iterations", 1, 2),
    ("argon2_lanes", 0, 1),
    ("pbkdf2_iterations", 599_999, 600_000),
])
def test_config_refuses_kdf_parameters_below_the_owasp_floor(key: str, below: int,
                                                             floor: int) -> None:
    with pytest.raises(ConfigError, match=f"kdf.{key}"):
        Config.from_mapping({"kdf": {key: below}})
    assert getattr(Config.from_mapping({"kdf": {key: floor}}), key) == floor


@pytest.mark.parametrize("change", [
    {"memory_kib": 19 * 1024 - 1}, {"iterations": 1}, {"lanes": 0}, {"salt": "00" * 8},
    {"algorithm": "pbkdf2-sha256", "iterations": 599_999},
], ids=["memory", "iterations", "lanes", "salt", "pbkdf2"])
def test_stored_kdf_parameters_out_of_range_are_refused_exit_3(
        home: Path, change: dict[str, Any]) -> None:
    Store.init(home, passphrase_mode=True, passphrase="a good passphrase",
               config=FAST_KDF).close()
    (stored,), = _rows(home, "SELECT kdf FROM vault")
    with _db(home) as conn:
        conn.execute("UPDATE vault SET kdf = ?", (json.dumps({**json.loads(stored), **change}),))
    done = run_cli("get", "svc", "alice", home=home,
                   env={"KEYRING_HARDENED_PASSPHRASE": "a good passphrase"})
    assert (done.returncode, done.stdout) == (3, ""), done.stderr
    assert "key derivation parameters are damaged" in done.stderr


# -- purge zeroes freed pages and truncates the WAL -------------------------------------


@contextlib.contextmanager
def _idle_reader(db: Path) -> Iterator[None]:
    """Another process with the vault open and idle, as a long-lived keyring user would be.

    It keeps the purging process from being the last connection, whose close
    would fold the WAL anyway. It lives in a child process: closing any file
    descriptor of ``vault.db`` in the process that holds a connection drops
    that connection's POSIX locks, so the raw reads below must not share one.
    """
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('SELECT count(*) FROM vault').fetchall(); print('ready', flush=True); "
            "sys.stdin.read(); c.close()")
    child = subprocess.Popen([sys.executable, "-c", code, str(db)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        yield
    finally:
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(timeout=60) == 0
        assert child.stdout is not None
        child.stdout.close()


def test_purge_zeroes_freed_pages_and_truncates_the_wal(home: Path) -> None:
    db, wal = home / "vault.db", home / "vault.db-wal"
    assert run_cli("init", home=home).returncode == 0
    with _idle_reader(db):
        for i in range(3):
            done = run_cli("set", "svc", "alice", home=home, stdin=f"{CANARY}-{i}\n")
            assert done.returncode == 0, done.stderr
        assert run_cli("set", "svc", "bob", home=home, stdin="bob\n").returncode == 0
        secret_bytes = [b for row in _rows(
            home, "SELECT ciphertext, wrapped_key FROM secret_versions WHERE credential_id ="
                  " (SELECT id FROM credentials WHERE username = 'alice')") for b in row]
        assert len(secret_bytes) == 6
        assert wal.stat().st_size > 0
        before = db.read_bytes() + wal.read_bytes()
        assert all(b in before for b in secret_bytes)  # so the check below can fail
        done = run_cli("delete", "svc", "alice", "--purge", home=home)
        assert done.returncode == 0, done.stderr
        assert "note" not in done.stderr
        assert wal.exists()  # the reader kept it: the purge itself truncated it
        assert wal.stat().st_size == 0
        on_disk = db.read_bytes()
        assert [b for b in secret_bytes if b in on_disk] == []
    done = run_cli("get", "svc", "bob", home=home)
    assert (done.returncode, done.stdout) == (0, "bob\n")


# -- the audit chain's encoding and genesis, recomputed independently -----------------


def test_audit_chain_encoding_and_genesis_recomputed_from_the_documented_format(
        home: Path, tmp_path: Path) -> None:
    assert run_cli("init", home=home).returncode == 0
    assert run_cli("set", "café ☕", "ユーザー", home=home, stdin="x\n").returncode == 0
    assert run_cli("get", "café ☕", "nobody", home=home).returncode == 1
    assert run_cli("get", "café ☕", "ユーザー", home=home).returncode == 0
    export = tmp_path / "export.jsonl"
    assert run_cli("audit", "export", str(export), home=home).returncode == 0
    lines = export.read_text(encoding="utf-8").splitlines()
    header, events = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]

    vault_id, vault_key = _vault_key_from_key_file(home)
    assert header["vault_id"] == vault_id.hex()
    audit_key = _hkdf(vault_key, vault_id, b"keyring-hardened/v1/audit")
    previous = bytes(32)  # genesis: 32 zero bytes
    assert header["anchor_mac"] == previous.hex()
    for e in events:
        encoding = json.dumps([e["seq"], e["ts_us"], e["actor"], e["op"], e["service"],
                               e["username"], e["outcome"], e["key_version"], e["reason"],
                               e["epoch"], e["root"]],
                              separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        mac = hmac.new(audit_key, previous + encoding, hashlib.sha256).digest()
        assert mac.hex() == e["mac"], \
            f"event {e['seq']} ({e['op']}): its mac is not the documented chain's"
        previous = mac
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["op"] == "init"
    assert {"write", "read"} <= {e["op"] for e in events}
    assert "café ☕" in {e["service"] for e in events}
    # The same chain stored in the vault, not only in the export.
    assert _rows(home, "SELECT mac FROM audit_events ORDER BY seq")[len(events) - 1][0] \
        == previous


# -- failed unlocks chained with their original time ------------------------------------


def test_failed_unlocks_are_chained_with_their_original_time(home: Path) -> None:
    clock = FrozenClock()
    with Store.init(home, clock=clock) as s:
        clock.advance(10)
        s.set("svc", "alice", "x")
    key, away = home / "master.key", home / "master.key.away"
    key.rename(away)
    clock.advance(100)
    failed_at = clock.now
    with pytest.raises(LockedError):
        Store.open(home, clock=clock)
    away.rename(key)
    clock.advance(50)
    with Store.open(home, clock=clock):
        pass
    unlock = [e for e in _events(home) if e[2] == "unlock"]
    assert [(ts, op, outcome, reason) for _, ts, op, _s, _u, outcome, reason in unlock] == [
        (int(failed_at * 1_000_000), "unlock", "locked", "no-key-file; recorded before unlock")]


def test_failed_unlocks_older_than_the_newest_event_are_clamped_to_it(home: Path) -> None:
    clock = FrozenClock()
    with Store.init(home, clock=clock) as s:
        clock.advance(1000)
        s.set("svc", "alice", "x")
    newest_ts = _events(home)[-1][1]
    key, away = home / "master.key", home / "master.key.away"
    key.rename(away)
    clock.now -= 500  # the clock went back: this failure predates the newest event
    with pytest.raises(LockedError):
        Store.open(home, clock=clock)
    assert _rows(home, "SELECT ts_us FROM audit_pending") == [(int(clock.now * 1_000_000),)]
    away.rename(key)
    clock.advance(2000)
    with Store.open(home, clock=clock):
        pass
    chained = [e for e in _events(home) if e[2] == "unlock"]
    assert [(e[1], e[5]) for e in chained] == [(newest_ts, "locked")]


# -- hashed identifiers in sinks and exports -------------------------------------------

HASHED = re.compile(r"h:[A-Za-z0-9_-]{22}")


def _config(home: Path, text: str) -> None:
    home.mkdir(mode=0o700, exist_ok=True)
    (home / "config.toml").write_text(text)
    os.chmod(home / "config.toml", 0o600)


def test_hashed_identifiers_never_show_names_in_sinks_or_exports(home: Path,
                                                                tmp_path: Path) -> None:
    sink = tmp_path / "sink.jsonl"
    _config(home, f'[audit]\nhmac_identifiers = true\nsinks = ["file:{sink}"]\n')
    service, user = "db.example.com", "alice-admin"
    assert run_cli("init", home=home).returncode == 0
    assert run_cli("set", service, user, home=home, stdin="x\n").returncode == 0
    assert run_cli("get", service, user, home=home).returncode == 0
    assert run_cli("get", service, "nobody", home=home).returncode == 1
    assert run_cli("delete", service, user, home=home).returncode == 0
    export = tmp_path / "export.jsonl"
    assert run_cli("audit", "export", str(export), home=home).returncode == 0

    vault_id, vault_key = _vault_key_from_key_file(home)
    ident_key = _hkdf(vault_key, vault_id, b"keyring-hardened/v1/identifier")

    def hashed(name: str) -> str:
        digest = hmac.new(ident_key, name.encode(), hashlib.sha256).digest()[:16]
        return "h:" + base64.urlsafe_b64encode(digest).decode().rstrip("=")

    for path in (sink, export):
        text = path.read_text()
        for name in (service, user, "nobody", "db.example", "alice"):
            assert name not in text, (path.name, name)
        events = [json.loads(line) for line in text.splitlines() if '"seq"' in line]
        named = [e for e in events if e["service"] is not None]
        assert len(named) >= 4
        for e in named:
            assert HASHED.fullmatch(e["service"]), e["service"]
            assert e["service"] == hashed(service)
            assert HASHED.fullmatch(e["username"]), e["username"]
        assert {e["username"] for e in named} == {hashed(user), hashed("nobody")}


# -- sink, checkpoint, export, -wal and -shm modes whatever the umask --------------------


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> str:
    return f"{stat.S_IMODE(path.stat().st_mode):04o}"


@pytest.mark.usefixtures("umask_000")
def test_sink_checkpoint_and_export_files_are_0600_whatever_the_umask(
        home: Path, tmp_path: Path) -> None:
    sink, checkpoint, export = (tmp_path / n for n in ("sink.jsonl", "head.json", "out.jsonl"))
    _config(home, f'[audit]\nsinks = ["file:{sink}"]\n')
    assert os.umask(0) == 0  # children inherit it
    assert run_cli("init", home=home).returncode == 0
    assert run_cli("set", "svc", "u", home=home, stdin="x\n").returncode == 0
    assert run_cli("audit", "checkpoint", str(checkpoint), home=home).returncode == 0
    assert run_cli("audit", "export", str(export), home=home).returncode == 0
    # sink, checkpoint, export
    assert [_mode(p) for p in (sink, checkpoint, export)] == ["0600", "0600", "0600"]


@pytest.mark.usefixtures("umask_000")
def test_wal_and_shm_files_are_0600_whatever_the_umask(home: Path) -> None:
    with Store.init(home) as s:
        s.set("svc", "u", "x")
        companions = [home / "vault.db-wal", home / "vault.db-shm"]
        assert all(p.exists() for p in companions)
        assert [_mode(p) for p in companions] == ["0600", "0600"]
    with Store.open(home) as s:  # made again by the next opener: the same mode
        s.get("svc", "u")
        assert [_mode(p) for p in companions] == ["0600", "0600"]


# -- replay of a whole older vault copy caught by a checkpoint ------------------------


def test_replay_of_a_whole_older_vault_copy_is_caught_by_a_checkpoint(
        home: Path, tmp_path: Path) -> None:
    assert run_cli("init", home=home).returncode == 0
    assert run_cli("set", "svc", "alice", home=home, stdin="old-value\n").returncode == 0
    old_copy = tmp_path / "old-vault.db"
    shutil.copy2(home / "vault.db", old_copy)
    assert run_cli("set", "svc", "alice", home=home, stdin="new-value\n").returncode == 0
    checkpoint = tmp_path / "head.json"
    assert run_cli("audit", "checkpoint", str(checkpoint), home=home).returncode == 0
    assert run_cli("audit", "verify", "--from-checkpoint", str(checkpoint),
                   home=home).returncode == 0

    shutil.copy2(old_copy, home / "vault.db")  # the whole vault, rows and trail together
    assert run_cli("get", "svc", "alice", home=home).stdout == "old-value\n"
    assert run_cli("audit", "verify", home=home).returncode == 0  # self-consistent
    done = run_cli("audit", "verify", "--from-checkpoint", str(checkpoint), home=home)
    assert (done.returncode, "audit chain broken" in done.stderr) == (3, True), done.stderr


# -- get_credential(service, None) with several users ----------------------------------


def test_get_credential_without_username_returns_the_most_recently_updated(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FrozenClock(start=1_000_000_000.0)  # 2001: long before the backend's writes
    with Store.init(home, clock=clock) as s:
        for user in ("u1", "u2", "u3"):
            clock.advance(1)
            s.set("svc", user, f"{user}-secret")
        s.set("other", "zz", "other")
        assert s.usernames("svc") == ["u3", "u2", "u1"]
        clock.advance(1)
        s.set("svc", "u1", "u1-newer")
        assert s.usernames("svc") == ["u1", "u3", "u2"]
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))
    kr = backend.HardenedKeyring()
    try:
        cred = kr.get_credential("svc", None)
        assert cred is not None
        assert (cred.username, cred.password) == ("u1", "u1-newer")
        kr.set_password("svc", "u2", "u2-newest")  # now, well after the frozen clock
        cred = kr.get_credential("svc", None)
        assert cred is not None
        assert (cred.username, cred.password) == ("u2", "u2-newest")
    finally:
        backend._close_all()


# -- rewrap leaves payload ciphertexts byte-identical --------------------------------


def test_rewrap_leaves_payload_ciphertexts_byte_identical(home: Path) -> None:
    with Store.init(home) as s:
        for i in range(5):
            s.set("svc", f"u{i}", f"secret-{i}")
        s.set("svc", "u0", "secret-0-v2")
    query = ("SELECT credential_id, version, kek_version, wrapped_key, ciphertext"
             " FROM secret_versions ORDER BY credential_id, version")
    before = _rows(home, query)
    assert run_cli("key", "rotate", home=home).returncode == 0
    done = run_cli("key", "rewrap", home=home)
    assert done.returncode == 0, done.stderr
    after = _rows(home, query)
    assert len(after) == len(before) == 6
    assert [(r[0], r[1], r[4]) for r in after] == [(r[0], r[1], r[4]) for r in before]
    assert {r[2] for r in before} == {1}
    assert {r[2] for r in after} == {2}
    assert all(a[3] != b[3] for a, b in zip(after, before, strict=True))
    for i in range(1, 5):
        assert run_cli("get", "svc", f"u{i}", home=home).stdout == f"secret-{i}\n"
    assert run_cli("get", "svc", "u0", "--version", "1", home=home).stdout == "secret-0\n"


# -- one opaque message across integrity failure kinds -------------------------------


def _vault_with(home: Path) -> None:
    with Store.init(home) as s:
        s.set("svc", "alice", "alice-secret-1")
        s.set("svc", "alice", CANARY)
        s.set("svc", "bob", "bob-secret")


def _flip(blob: bytes, index: int) -> bytes:
    out = bytearray(blob)
    out[index] ^= 0x01
    return bytes(out)


def _raw_tamper(home: Path, kind: str) -> None:
    """Tamper as someone without keys: plain SQL (the state root catches it)."""
    where = ("credential_id = (SELECT id FROM credentials WHERE username = 'alice')"
             " AND version = 2")
    with _db(home) as conn:
        if kind == "swapped ciphertexts":
            (bob,), = conn.execute("SELECT ciphertext FROM secret_versions WHERE credential_id ="
                                   " (SELECT id FROM credentials WHERE username = 'bob')")
            (alice,), = conn.execute(f"SELECT ciphertext FROM secret_versions WHERE {where}")
            conn.execute(f"UPDATE secret_versions SET ciphertext = ? WHERE {where}", (bob,))
            conn.execute("UPDATE secret_versions SET ciphertext = ? WHERE credential_id ="
                         " (SELECT id FROM credentials WHERE username = 'bob')", (alice,))
            return
        column = "ciphertext" if kind == "flipped ciphertext" else "wrapped_key"
        (blob,), = conn.execute(f"SELECT {column} FROM secret_versions WHERE {where}")
        conn.execute(f"UPDATE secret_versions SET {column} = ? WHERE {where}",
                     (_flip(blob, 20),))


def _resealed_tamper(home: Path, kind: str) -> None:
    """Tamper with the vault's keys in hand, so the state root agrees: only AES-GCM is left."""
    with Store.open(home) as s:
        def body(storage: SQLiteStorage, note: _Note) -> None:
            head = s._existing(storage, "svc", "alice")
            row = next(r for r in s._versions(storage, head) if r.version == 2)
            if kind == "swapped ciphertexts":
                bob = s._existing(storage, "svc", "bob")
                new = row._replace(ciphertext=s._versions(storage, bob)[0].ciphertext)
            elif kind == "flipped ciphertext":
                new = row._replace(ciphertext=_flip(row.ciphertext, 20))
            else:
                new = row._replace(wrapped_key=_flip(row.wrapped_key, 20))
            new = new._replace(digest=_version_digest(new))
            storage._conn.execute(
                "UPDATE secret_versions SET wrapped_key = ?, ciphertext = ?, digest = ?"
                " WHERE credential_id = ? AND version = 2",
                (new.wrapped_key, new.ciphertext, new.digest, head.id))
            s._move_head(storage, head, head.current_version, head.last_version,
                         head.updated_at, head.expires_at)

        s._run("write", "svc", "alice", body, writes=True)


KINDS = ("flipped ciphertext", "flipped wrapped key", "swapped ciphertexts")


@pytest.mark.parametrize(("tamper", "reasons"), [
    (_raw_tamper, ["state-version"] * 3),
    (_resealed_tamper, ["payload-tag", "data-key-tag", "payload-tag"]),
], ids=["state layer", "aead layer"])
def test_one_opaque_message_across_integrity_failure_kinds(
        tmp_path: Path, tamper: Callable[[Path, str], None], reasons: list[str]) -> None:
    messages, found = [], []
    for i, kind in enumerate(KINDS):
        home = tmp_path / f"vault{i}"
        _vault_with(home)
        tamper(home, kind)
        done = run_cli("get", "svc", "alice", home=home)
        assert (done.returncode, done.stdout) == (3, ""), (kind, done.stderr)
        messages.append(done.stderr)
        found.append(_events(home)[-1])
    assert len(set(messages)) == 1, messages
    assert len(messages[0].splitlines()) == 1
    assert [(e[2], e[5], e[6]) for e in found] == [("read", "integrity", r) for r in reasons]
    for reason in {*reasons, "tag", "payload", "data-key", "digest"}:
        assert reason not in messages[0]
    assert CANARY not in messages[0]


# -- arguments refused before the vault is touched are not audited -------------------


def test_arguments_refused_before_the_vault_is_touched_are_not_audited(home: Path) -> None:
    with Store.init(home) as s:
        s.set("svc", "alice", "x")
        before = _events(home)
        refused: list[Callable[[], object]] = [
            lambda: s.get("", "alice"), lambda: s.set("", "alice", "x"),
            lambda: s.delete("", "alice"), lambda: s.history("", "alice"),
            lambda: s.rollback("", "alice"), lambda: s.usernames(""),
            lambda: s.get("svc", "al\x00ice"), lambda: s.set("svc\x00", "alice", "x"),
            lambda: s.delete("svc", "\x00"), lambda: s.get("svc", "alice", version=0),
        ]
        for call in refused:
            with pytest.raises(UsageError):
                call()
        assert _events(home) == before
    for args in (("get", "", "alice"), ("set", "", "alice"), ("delete", "", "alice"),
                 ("history", "", "alice")):
        done = run_cli(*args, home=home, stdin="x\n")
        assert done.returncode == 2, (args, done.stderr)
    assert _events(home) == before
    assert _rows(home, "SELECT count(*) FROM audit_pending") == [(0,)]



# -- found while proving the purge claim -----------------------------------------------


# Found while proving the purge claim: the header check once opened and closed
# vault.db with a plain descriptor, which drops every POSIX lock this process's
# connection holds on it (SQLite's "How To Corrupt" 2.2.1); another process then
# took itself for the last connection and deleted the WAL under this one.
def test_a_second_open_in_one_process_keeps_every_commit_visible_and_durable(
        home: Path) -> None:
    Store.init(home).close()
    first = Store.open(home)
    try:
        first.set("svc", "a", "1")
        Store.open(home).close()  # a second open of the same vault in this process
        assert run_cli("set", "svc", "b", home=home, stdin="2\n").returncode == 0
        first.set("svc", "c", "3")
        done = run_cli("get", "svc", "c", home=home)
        assert (done.returncode, done.stdout) == (0, "3\n"), done.stderr
        assert run_cli("set", "svc", "d", home=home, stdin="4\n").returncode == 0
    finally:
        first.close()
    for name, value in (("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")):
        done = run_cli("get", "svc", name, home=home)
        assert (done.returncode, done.stdout) == (0, value + "\n"), (name, done.stderr)
    assert run_cli("audit", "verify", home=home).returncode == 0
