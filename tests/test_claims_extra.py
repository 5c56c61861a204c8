"""Proofs of claims that had none: the key hierarchy by hand, a rotation that commits whole."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import struct
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyring_hardened.errors import StorageError
from keyring_hardened.store import Store


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    # RFC 5869 by hand, with the salt as the HMAC key of the extract step.
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _ad(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def test_root_key_only_wraps_keys_derived_with_hkdf(home: Path) -> None:
    # The key file's bytes never encrypt data: HKDF-SHA256 (salt = vault id,
    # info = "keyring-hardened/v1/kek-wrap") derives the wrapping key, which
    # opens the stored KEK and vault key blobs with plain AES-GCM; the key
    # file's bytes themselves open neither.
    with Store.init(home) as s:
        s.set("svc", "u", "x")
    key = (home / "master.key").read_bytes()
    with sqlite3.connect(home / "vault.db") as conn:
        vault_id, vault_key = conn.execute("SELECT vault_id, vault_key FROM vault").fetchone()
        kek = conn.execute("SELECT wrapped FROM keks WHERE version = 1").fetchone()[0]
    wrap = _hkdf(key, vault_id, b"keyring-hardened/v1/kek-wrap")
    assert AESGCM(wrap).decrypt(kek[1:13], kek[13:], _ad(b"kh1/kek", vault_id,
                                                       struct.pack(">I", 1)))
    assert len(AESGCM(wrap).decrypt(vault_key[1:13], vault_key[13:],
                                    _ad(b"kh1/vault-key", vault_id))) == 32
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(kek[1:13], kek[13:], _ad(b"kh1/kek", vault_id, struct.pack(">I", 1)))
    # The verifier is an HMAC under the other derived key, so it reveals nothing of the first.
    verifier_key = _hkdf(key, vault_id, b"keyring-hardened/v1/verify")
    with sqlite3.connect(home / "vault.db") as conn:
        stored = conn.execute("SELECT verifier FROM vault").fetchone()[0]
    assert stored == hmac.new(verifier_key, b"keyring-hardened/v1/verifier" + vault_id,
                              hashlib.sha256).digest()


def test_rotation_commits_with_its_event_or_not_at_all(home: Path) -> None:
    with Store.init(home) as s:
        s.set("svc", "u", "x")
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute("CREATE TRIGGER no_events BEFORE INSERT ON audit_events"
                      " BEGIN SELECT RAISE(ABORT, 'no'); END")
    with Store.open(home) as s:
        with pytest.raises(StorageError, match="the key-rotate was not performed"):
            s.keys.rotate()
        assert sorted(s._keks) == [1]  # the new KEK was not kept in memory either
    with sqlite3.connect(home / "vault.db") as conn:
        assert conn.execute("SELECT count(*) FROM keks").fetchone()[0] == 1
        conn.execute("DROP TRIGGER no_events")
    with Store.open(home) as s:
        assert [(k.version, k.state) for k in s.keys.versions()] == [(1, "active")]
        assert s.get("svc", "u").reveal() == "x"
        s.trail.verify()
