"""Tests that kill mutants of rootkey.py which the rest of the suite let live.

Derived keys are recomputed with cryptography's HKDF and the standard
library's HMAC from the labels documented in rootkey.py; the KDF defaults
and floors are the published figures (RFC 9106, OWASP).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import unicodedata
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyring_hardened import rootkey
from keyring_hardened.config import Config
from keyring_hardened.errors import ConfigError, IntegrityError, LockedError
from keyring_hardened.rootkey import KdfParams, RootKey, VaultKeys

VAULT_ID = bytes(range(16))
MATERIAL = bytes(range(50, 82))
SALT = bytes(range(16))


def _hkdf(info: bytes, ikm: bytes = MATERIAL) -> bytes:
    return HKDF(hashes.SHA256(), 32, VAULT_ID, info).derive(ikm)


def test_defaults_are_rfc_9106_and_owasp() -> None:
    assert rootkey.ARGON2_DEFAULT == {"memory_kib": 65536, "iterations": 3, "lanes": 4}
    assert rootkey.OWASP_ARGON2_FLOOR == {"memory_kib": 19456, "iterations": 2, "lanes": 1}
    assert rootkey.PBKDF2_DEFAULT_ITERATIONS == 600_000
    params = Config().new_kdf_params()
    assert (params.algorithm, params.memory_kib, params.iterations, params.lanes) == (
        "argon2id", 65536, 3, 4)
    assert len(params.salt) == 16
    pbkdf2 = Config().new_kdf_params("pbkdf2")
    assert (pbkdf2.algorithm, pbkdf2.iterations, len(pbkdf2.salt)) == ("pbkdf2-sha256",
                                                                        600_000, 16)
    assert KdfParams.new_argon2id(19456, 2, 1).salt != KdfParams.new_argon2id(19456, 2, 1).salt


def _argon(m: int, t: int, p: int, salt: bytes = SALT) -> KdfParams:
    return KdfParams("argon2id", salt, m, t, p)


@pytest.mark.parametrize(("params", "ok"), [
    (_argon(19456, 2, 1), True), (_argon(19455, 2, 1), False),
    (_argon(4 * 1024 * 1024, 100, 64), True), (_argon(4 * 1024 * 1024 + 1, 3, 4), False),
    (_argon(65536, 1, 4), False), (_argon(65536, 101, 4), False),
    (_argon(65536, 3, 0), False), (_argon(65536, 3, 65), False),
    (_argon(65536, 3, 4, SALT[:15]), False), (_argon(65536, 3, 4, SALT + b"x"), False),
    (KdfParams("pbkdf2-sha256", SALT, iterations=600_000), True),
    (KdfParams("pbkdf2-sha256", SALT, iterations=599_999), False),
    (KdfParams("pbkdf2-sha256", SALT, iterations=100_000_000), True),
    (KdfParams("pbkdf2-sha256", SALT, iterations=100_000_001), False),
])
def test_kdf_ranges_at_their_bounds(params: KdfParams, ok: bool) -> None:
    assert params.in_range() is ok
    if ok:
        assert KdfParams.from_json(params.to_json()) == params
    else:
        with pytest.raises(IntegrityError):
            KdfParams.from_json(params.to_json())


def test_stored_form_is_sorted_json_of_the_algorithms_fields() -> None:
    argon = _argon(65536, 3, 4)
    assert json.loads(argon.to_json()) == {"algorithm": "argon2id", "salt": SALT.hex(),
                                           "memory_kib": 65536, "iterations": 3, "lanes": 4}
    assert argon.to_json() == json.dumps(json.loads(argon.to_json()), sort_keys=True)
    pb = KdfParams("pbkdf2-sha256", SALT, iterations=600_000)
    assert json.loads(pb.to_json()) == {"algorithm": "pbkdf2-sha256", "salt": SALT.hex(),
                                        "iterations": 600_000}
    assert json.loads(KdfParams.keyfile().to_json()) == {"algorithm": "keyfile"}
    assert KdfParams.from_json('{"algorithm": "keyfile", "salt": "zz"}') == KdfParams.keyfile()
    assert not KdfParams.keyfile().uses_passphrase
    assert argon.uses_passphrase
    assert pb.uses_passphrase


@pytest.mark.parametrize("doc", [
    {"algorithm": "argon2id", "salt": SALT.hex(), "memory_kib": 65536, "iterations": True,
     "lanes": 4},
    {"algorithm": "argon2id", "salt": SALT.hex(), "memory_kib": 65536, "iterations": 3,
     "lanes": 4.0},
    {"algorithm": "argon2id", "salt": SALT.hex(), "memory_kib": 65536, "iterations": 3},
    {"algorithm": "pbkdf2-sha256", "salt": 5, "iterations": 600_000},
    {"algorithm": "pbkdf2-sha256", "iterations": 600_000},
    {"salt": SALT.hex()},
    "argon2id",
])
def test_malformed_stored_parameters_are_damage(doc: object) -> None:
    with pytest.raises(IntegrityError) as info:
        KdfParams.from_json(json.dumps(doc))
    assert info.value.reason == "kdf-damaged"


def test_describe_names_the_algorithm() -> None:
    assert _argon(65536, 3, 4).describe().startswith("argon2id")
    assert "65536" in _argon(65536, 3, 4).describe()
    assert KdfParams("pbkdf2-sha256", SALT, iterations=600_000).describe().startswith("pbkdf2")
    assert KdfParams.keyfile().describe() == "key file"


def test_root_key_derivations_follow_the_documented_labels() -> None:
    material = bytearray(MATERIAL)
    root = RootKey(material, VAULT_ID)
    assert material == bytearray(32)  # the root key itself is wiped at once
    assert bytes(root._wrap_key) == _hkdf(b"keyring-hardened/v1/kek-wrap")
    verify_key = _hkdf(b"keyring-hardened/v1/verify")
    verifier = hmac.new(verify_key, b"keyring-hardened/v1/verifier" + VAULT_ID,
                        hashlib.sha256).digest()
    assert root.verifier(VAULT_ID) == verifier
    assert root.matches(VAULT_ID, verifier)
    assert not root.matches(VAULT_ID, bytes(32))
    blob = root.wrap.seal(bytes(12), b"x", b"ad")
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    assert blob == AESGCM(_hkdf(b"keyring-hardened/v1/kek-wrap")).encrypt(bytes(12), b"x", b"ad")
    root.close()
    assert root._wrap_key == bytearray(32)
    assert root._verifier_key == bytearray(32)
    assert repr(root) == "RootKey(<hidden>)"  # the class's name, and no key material


def test_vault_keys_derivations_follow_the_documented_labels() -> None:
    material = bytearray(MATERIAL)
    keys = VaultKeys(material, VAULT_ID)
    assert material == bytearray(32)
    assert bytes(keys.audit_key) == _hkdf(b"keyring-hardened/v1/audit")
    assert bytes(keys.identifier_key) == _hkdf(b"keyring-hardened/v1/identifier")
    record = _hkdf(b"keyring-hardened/v1/record")
    assert keys.record_mac(b"data") == hmac.new(record, b"data", hashlib.sha256).digest()
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    past = _hkdf(b"keyring-hardened/v2/past-vault-keys")
    assert keys.past.seal(bytes(12), b"x", b"") == AESGCM(past).encrypt(bytes(12), b"x", b"")
    keys.close()
    for buf in (keys._record_key, keys.audit_key, keys.identifier_key, keys._past_key):
        assert buf == bytearray(32)


def test_passphrases_are_nfc_normalised_before_the_kdf() -> None:
    composed, decomposed = "caf\u00e9 au lait", "cafe\u0301 au lait"
    params = _argon(19456, 2, 1)
    a = rootkey.derive_from_passphrase(params, composed)
    assert a == rootkey.derive_from_passphrase(params, decomposed)
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    expected = Argon2id(salt=SALT, length=32, iterations=2, lanes=1, memory_cost=19456).derive(
        unicodedata.normalize("NFC", composed).encode())
    assert a == expected
    pb = KdfParams("pbkdf2-sha256", SALT, iterations=600_000)
    assert rootkey.derive_from_passphrase(pb, decomposed) == hashlib.pbkdf2_hmac(
        "sha256", composed.encode(), SALT, 600_000, 32)
    with pytest.raises(LockedError):
        rootkey.derive_from_passphrase(KdfParams.keyfile(), composed)


def _key_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "keyfile"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_key_file_reads_exactly_32_bytes(tmp_path: Path) -> None:
    path = _key_file(tmp_path, MATERIAL)
    assert rootkey.read_key_file(path) == bytearray(MATERIAL)
    for size in (0, 31, 33, 64):
        path = _key_file(tmp_path, bytes(size))
        with pytest.raises(LockedError) as info:
            rootkey.read_key_file(path)
        assert info.value.reason == "key-file-damaged"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o610, 0o601, 0o620, 0o602])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(ConfigError):
        rootkey.read_key_file(_key_file(tmp_path, MATERIAL, mode))
    assert rootkey.read_key_file(_key_file(tmp_path, MATERIAL, 0o400)) == bytearray(MATERIAL)


def test_key_file_missing_symlinked_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(LockedError) as info:
        rootkey.read_key_file(tmp_path / "absent")
    assert info.value.reason == "no-key-file"
    real = _key_file(tmp_path, MATERIAL)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="symbolic link"):
        rootkey.read_key_file(link)  # a trusted file is never reached through a link
    folder = tmp_path / "dir"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigError):
        rootkey.read_key_file(folder)


def test_create_key_file_is_0600_whatever_the_umask_and_never_overwrites(
        tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keyfile"
    old = os.umask(0)
    try:
        assert rootkey.create_key_file(path) is True
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert len(first) == 32
    assert rootkey.create_key_file(path) is False
    assert path.read_bytes() == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["keyfile"]
    other = tmp_path / "other"
    assert rootkey.create_key_file(other)
    assert other.read_bytes() != first


def test_a_passphrase_with_a_lone_surrogate_derives_from_its_surrogatepass_bytes() -> None:
    # A passphrase read from non-UTF-8 input (surrogateescape) still derives a key,
    # from the same bytes on every system.
    passphrase = "caf\udce9 au lait"
    params = KdfParams("pbkdf2-sha256", SALT, iterations=600_000)
    assert rootkey.derive_from_passphrase(params, passphrase) == hashlib.pbkdf2_hmac(
        "sha256", passphrase.encode("utf-8", "surrogatepass"), SALT, 600_000, 32)


def test_create_key_file_never_writes_through_a_link_at_its_temporary_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from keyring_hardened import _aead
    from keyring_hardened.errors import StorageError

    real = _aead.random_bytes
    monkeypatch.setattr(_aead, "random_bytes", lambda n: bytes(n) if n == 8 else real(n))
    path = tmp_path / "master.key"
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / f".master.key.{bytes(8).hex()}.tmp").symlink_to(elsewhere)
    with pytest.raises(StorageError):
        rootkey.create_key_file(path)
    assert not elsewhere.exists()
    assert not path.exists()


def test_vault_keys_repr_names_the_class_and_no_key() -> None:
    keys = VaultKeys(bytearray(MATERIAL), VAULT_ID)
    try:
        assert repr(keys) == "VaultKeys(<hidden>)"
    finally:
        keys.close()
