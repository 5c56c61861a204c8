from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyring_hardened import _aead, envelope
from keyring_hardened.envelope import DecryptFailed, Kek, Place, Sealed

VECTORS = json.loads((Path(__file__).parent / "vectors" / "envelope_v1.json").read_text("utf-8"))


def _fixed(*chunks: bytes) -> Any:
    it: Iterator[bytes] = iter(chunks)

    def rng(n: int) -> bytes:
        chunk = next(it)
        assert len(chunk) == n
        return chunk
    return rng


def _field(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["service"])
def test_known_answer_seal(case: dict[str, Any]) -> None:
    kek = Kek(case["kek_version"], bytearray.fromhex(case["kek"]))
    place = Place(bytes.fromhex(case["vault_id"]), case["service"], case["username"],
                  case["version"])
    rng = _fixed(bytes.fromhex(case["data_key"]), bytes.fromhex(case["secret_nonce"]),
                 bytes.fromhex(case["wrap_nonce"]))
    sealed = envelope.seal_secret(kek, place, case["plaintext"].encode(), rng)
    assert sealed.wrapped_key.hex() == case["wrapped_key"]
    assert sealed.ciphertext.hex() == case["ciphertext"]
    assert envelope.open_secret(kek, place, sealed).decode() == case["plaintext"]


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["service"])
def test_known_answer_matches_documented_layout(case: dict[str, Any]) -> None:
    """Re-derive the vectors from the layout in envelope.py's docstring, by hand."""
    vault_id = bytes.fromhex(case["vault_id"])
    names = [case["service"].encode(), case["username"].encode()]
    ver, kv = struct.pack(">I", case["version"]), struct.pack(">I", case["kek_version"])
    dek_ad = _field(b"kh1/dek") + b"".join(_field(x) for x in [vault_id, *names, ver, kv])
    secret_ad = _field(b"kh1/secret") + b"".join(_field(x) for x in [vault_id, *names, ver])
    wrapped = bytes.fromhex(case["wrapped_key"])
    ct = bytes.fromhex(case["ciphertext"])
    assert wrapped[0] == 1
    assert ct[0] == 1
    data_key = AESGCM(bytes.fromhex(case["kek"])).decrypt(wrapped[1:13], wrapped[13:], dek_ad)
    assert data_key.hex() == case["data_key"]
    assert AESGCM(data_key).decrypt(ct[1:13], ct[13:], secret_ad).decode() == case["plaintext"]
    kek_ad = _field(b"kh1/kek") + _field(vault_id) + _field(kv)
    wk = bytes.fromhex(case["wrapped_kek"])
    assert AESGCM(bytes.fromhex(case["root_wrap_key"])).decrypt(wk[1:13], wk[13:], kek_ad) \
        == bytes.fromhex(case["kek"])


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["service"])
def test_known_answer_kek_wrap(case: dict[str, Any]) -> None:
    wrap = _aead.Aead(bytes.fromhex(case["root_wrap_key"]))
    vault_id = bytes.fromhex(case["vault_id"])
    kek = Kek(case["kek_version"], bytearray.fromhex(case["kek"]))
    blob = envelope.wrap_kek(wrap, vault_id, kek, _fixed(bytes.fromhex(case["kek_nonce"])))
    assert blob.hex() == case["wrapped_kek"]
    again = envelope.unwrap_kek(wrap, vault_id, case["kek_version"], blob)
    assert again._material == kek._material
    with pytest.raises(DecryptFailed):
        envelope.unwrap_kek(wrap, vault_id, case["kek_version"] + 1, blob)


@pytest.fixture
def kek() -> Kek:
    return envelope.new_kek(1)


PLACE = Place(b"v" * 16, "svc", "alice", 1)


def test_every_place_field_is_bound(kek: Kek) -> None:
    sealed = envelope.seal_secret(kek, PLACE, b"secret")
    for other in (Place(b"w" * 16, "svc", "alice", 1), Place(b"v" * 16, "svc2", "alice", 1),
                  Place(b"v" * 16, "svc", "bob", 1), Place(b"v" * 16, "svc", "alice", 2),
                  # field boundaries are length-prefixed: no shifting between fields
                  Place(b"v" * 16, "sv", "calice", 1)):
        with pytest.raises(DecryptFailed):
            envelope.open_secret(kek, other, sealed)


def test_every_bit_flip_fails(kek: Kek) -> None:
    sealed = envelope.seal_secret(kek, PLACE, b"secret")
    for field in ("wrapped_key", "ciphertext"):
        blob = getattr(sealed, field)
        for i in range(len(blob)):
            for bit in (0, 7):
                damaged = bytearray(blob)
                damaged[i] ^= 1 << bit
                changed = Sealed(sealed.kek_version,
                                 bytes(damaged) if field == "wrapped_key" else sealed.wrapped_key,
                                 bytes(damaged) if field == "ciphertext" else sealed.ciphertext)
                with pytest.raises(DecryptFailed):
                    envelope.open_secret(kek, PLACE, changed)


def test_truncated_and_wrong_kek(kek: Kek) -> None:
    sealed = envelope.seal_secret(kek, PLACE, b"secret")
    with pytest.raises(DecryptFailed):
        envelope.open_secret(kek, PLACE, Sealed(1, sealed.wrapped_key[:10], sealed.ciphertext))
    with pytest.raises(DecryptFailed):
        envelope.open_secret(envelope.new_kek(2), PLACE, sealed)
    with pytest.raises(DecryptFailed):
        envelope.open_secret(Kek(1, bytearray(32)), PLACE, sealed)


def test_fresh_nonces_and_data_keys(kek: Kek) -> None:
    a = envelope.seal_secret(kek, PLACE, b"same")
    b = envelope.seal_secret(kek, PLACE, b"same")
    assert a.ciphertext != b.ciphertext
    assert a.wrapped_key != b.wrapped_key


def test_rewrap_keeps_payload(kek: Kek) -> None:
    sealed = envelope.seal_secret(kek, PLACE, b"payload")
    newer = envelope.new_kek(2)
    wrapped = envelope.rewrap_key(kek, newer, PLACE, sealed.wrapped_key)
    moved = Sealed(2, wrapped, sealed.ciphertext)
    assert envelope.open_secret(newer, PLACE, moved) == b"payload"


def test_wipe_and_repr(kek: Kek) -> None:
    assert "hidden" in repr(kek)
    assert "hidden" in repr(kek._aead)
    kek.wipe()
    assert kek._material == bytearray(32)


def test_aead_rejects_short_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        _aead.Aead(b"short")


def test_unwrap_kek_rejects_wrong_length_material() -> None:
    wrap = _aead.Aead(bytes(32))
    vault_id = b"v" * 16
    nonce = b"n" * 12
    ad = _field(b"kh1/kek") + _field(vault_id) + _field(struct.pack(">I", 1))
    blob = b"\x01" + nonce + AESGCM(bytes(32)).encrypt(nonce, b"too short", ad)
    with pytest.raises(DecryptFailed):
        envelope.unwrap_kek(wrap, vault_id, 1, blob)


# RFC 5869 appendix A test cases 1 to 3 (SHA-256).
RFC5869 = [
    ("0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes(range(0x00, 0x50)).hex(), bytes(range(0x60, 0xb0)).hex(),
     bytes(range(0xb0, 0x100)).hex(), 82,
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c6"
     "5e590e09da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    ("0b" * 22, "", "", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), RFC5869)
def test_hkdf_rfc5869(ikm: str, salt: str, info: str, length: int, okm: str) -> None:
    out = _aead.hkdf_sha256(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length)
    assert out.hex() == okm


def test_hkdf_matches_cryptography() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    for n in (1, 16, 32, 33, 64, 100):
        ikm, salt, info = bytes([n]) * 32, bytes([n + 1]) * 16, b"info" * n
        ours = _aead.hkdf_sha256(ikm, salt, info, n)
        assert ours == HKDF(hashes.SHA256(), n, salt, info).derive(ikm)
    with pytest.raises(ValueError, match="length"):
        _aead.hkdf_sha256(b"k", b"s", b"i", 0)


def test_aesgcm_is_cryptographys_public_class() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM as PUBLIC

    assert _aead.AESGCM is PUBLIC
