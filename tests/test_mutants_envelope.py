"""Tests that kill mutants of envelope.py which the rest of the suite let live.

Each test states the guarantee it pins; the blobs are recomputed here with
cryptography's AESGCM from the layout documented in envelope.py, not with
the code under test.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyring_hardened import _aead, envelope
from keyring_hardened.envelope import DecryptFailed, Kek, Place, Sealed

VAULT_ID = bytes(range(16))
PLACE = Place(VAULT_ID, "svc", "alice", 3)
WRAP_KEY = bytes(range(32, 64))
NONCE = bytes(range(100, 112))


def _field(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _fixed(*chunks: bytes) -> Callable[[int], bytes]:
    it = iter(chunks)

    def rng(n: int) -> bytes:
        chunk = next(it)
        assert len(chunk) == n
        return chunk
    return rng


def _blob(key: bytes, plaintext: bytes, ad: bytes, nonce: bytes = NONCE) -> bytes:
    return b"\x01" + nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def _dek_ad(place: Place, kek_version: int) -> bytes:
    return (_field(b"kh1/dek") + _field(place.vault_id) + _field(place.service.encode())
            + _field(place.username.encode()) + _field(_u32(place.version))
            + _field(_u32(kek_version)))


def _reason(call: Callable[[], object]) -> str:
    with pytest.raises(DecryptFailed) as info:
        call()
    return str(info.value.args[0]) if info.value.args else ""


@pytest.fixture
def kek() -> Kek:
    return Kek(7, bytearray(range(64, 96)))


def test_vault_key_wrap_matches_the_documented_layout() -> None:
    material = bytes(range(200, 232))
    ad = _field(b"kh1/vault-key") + _field(VAULT_ID)
    blob = envelope.wrap_vault_key(_aead.Aead(WRAP_KEY), VAULT_ID, material, _fixed(NONCE))
    assert blob == _blob(WRAP_KEY, material, ad)
    assert envelope.unwrap_vault_key(_aead.Aead(WRAP_KEY), VAULT_ID, blob) == material


def test_new_vault_key_is_random_and_wrapped_under_the_documented_layout() -> None:
    material = bytes(range(1, 33))
    blob, clear = envelope.new_vault_key(_aead.Aead(WRAP_KEY), VAULT_ID,
                                         _fixed(material, NONCE))
    assert clear == bytearray(material)
    assert blob == _blob(WRAP_KEY, material, _field(b"kh1/vault-key") + _field(VAULT_ID))


def test_past_vault_key_wrap_matches_the_documented_layout() -> None:
    material = bytes(range(150, 182))
    ad = _field(b"kh2/past-vault-key") + _field(VAULT_ID) + _field(_u32(4))
    blob = envelope.wrap_past_vault_key(_aead.Aead(WRAP_KEY), VAULT_ID, 4, material,
                                        _fixed(NONCE))
    assert blob == _blob(WRAP_KEY, material, ad)
    assert envelope.unwrap_past_vault_key(_aead.Aead(WRAP_KEY), VAULT_ID, 4, blob) == material
    # bound to its epoch
    with pytest.raises(DecryptFailed):
        envelope.unwrap_past_vault_key(_aead.Aead(WRAP_KEY), VAULT_ID, 5, blob)


def test_kek_wrap_matches_the_documented_layout(kek: Kek) -> None:
    ad = _field(b"kh1/kek") + _field(VAULT_ID) + _field(_u32(7))
    blob = envelope.wrap_kek(_aead.Aead(WRAP_KEY), VAULT_ID, kek, _fixed(NONCE))
    assert blob == _blob(WRAP_KEY, bytes(kek._material), ad)
    again = envelope.unwrap_kek(_aead.Aead(WRAP_KEY), VAULT_ID, 7, blob)
    assert again.version == 7
    assert again._material == kek._material


def test_rewrap_matches_the_documented_layout(kek: Kek) -> None:
    data_key = bytes(range(10, 42))
    wrapped = _blob(bytes(kek._material), data_key, _dek_ad(PLACE, 7))
    new = Kek(8, bytearray(range(96, 128)))
    out = envelope.rewrap_key(kek, new, PLACE, wrapped, _fixed(NONCE))
    assert out == _blob(bytes(new._material), data_key, _dek_ad(PLACE, 8))


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_unwrapped_keys_of_the_wrong_length_are_refused(length: int) -> None:
    wrap = _aead.Aead(WRAP_KEY)
    vault = _blob(WRAP_KEY, bytes(length), _field(b"kh1/vault-key") + _field(VAULT_ID))
    past = _blob(WRAP_KEY, bytes(length),
                 _field(b"kh2/past-vault-key") + _field(VAULT_ID) + _field(_u32(2)))
    kek = _blob(WRAP_KEY, bytes(length), _field(b"kh1/kek") + _field(VAULT_ID) + _field(_u32(2)))
    with pytest.raises(DecryptFailed):
        envelope.unwrap_vault_key(wrap, VAULT_ID, vault)
    with pytest.raises(DecryptFailed):
        envelope.unwrap_past_vault_key(wrap, VAULT_ID, 2, past)
    with pytest.raises(DecryptFailed):
        envelope.unwrap_kek(wrap, VAULT_ID, 2, kek)


def test_vault_key_length_reasons() -> None:
    short = _blob(WRAP_KEY, bytes(31), _field(b"kh1/vault-key") + _field(VAULT_ID))
    assert _reason(lambda: envelope.unwrap_vault_key(_aead.Aead(WRAP_KEY), VAULT_ID, short)) \
        == "vault-key-length"
    past = _blob(WRAP_KEY, bytes(33),
                 _field(b"kh2/past-vault-key") + _field(VAULT_ID) + _field(_u32(2)))
    assert _reason(lambda: envelope.unwrap_past_vault_key(_aead.Aead(WRAP_KEY), VAULT_ID, 2,
                                                           past)) == "past-vault-key-length"


def test_an_empty_secret_seals_to_the_shortest_blob_and_opens(kek: Kek) -> None:
    sealed = envelope.seal_secret(kek, PLACE, b"")
    assert len(sealed.ciphertext) == 1 + 12 + 16
    assert envelope.open_secret(kek, PLACE, sealed) == b""


def test_each_failure_has_its_own_reason_for_the_audit_record(kek: Kek) -> None:
    sealed = envelope.seal_secret(kek, PLACE, b"value")
    other = Sealed(8, sealed.wrapped_key, sealed.ciphertext)
    assert _reason(lambda: envelope.open_secret(kek, PLACE, other)) == "kek-version"
    cut = Sealed(7, sealed.wrapped_key[:28], sealed.ciphertext)
    assert _reason(lambda: envelope.open_secret(kek, PLACE, cut)) == "data-key-format"
    v2 = Sealed(7, b"\x02" + sealed.wrapped_key[1:], sealed.ciphertext)
    assert _reason(lambda: envelope.open_secret(kek, PLACE, v2)) == "data-key-format"
    flipped = bytearray(sealed.wrapped_key)
    flipped[-1] ^= 1
    bad_tag = Sealed(7, bytes(flipped), sealed.ciphertext)
    assert _reason(lambda: envelope.open_secret(kek, PLACE, bad_tag)) == "data-key-tag"
    cut_payload = Sealed(7, sealed.wrapped_key, sealed.ciphertext[:28])
    assert _reason(lambda: envelope.open_secret(kek, PLACE, cut_payload)) == "payload-format"
    v0 = Sealed(7, sealed.wrapped_key, b"\x00" + sealed.ciphertext[1:])
    assert _reason(lambda: envelope.open_secret(kek, PLACE, v0)) == "payload-format"
    flipped = bytearray(sealed.ciphertext)
    flipped[-1] ^= 1
    bad_payload = Sealed(7, sealed.wrapped_key, bytes(flipped))
    assert _reason(lambda: envelope.open_secret(kek, PLACE, bad_payload)) == "payload-tag"


def test_a_wrapped_data_key_of_the_wrong_length_is_refused(kek: Kek) -> None:
    for length in (31, 33):
        wrapped = _blob(bytes(kek._material), bytes(length), _dek_ad(PLACE, 7))
        sealed = Sealed(7, wrapped, b"\x01" + bytes(40))
        with pytest.raises(DecryptFailed) as info:
            envelope.open_secret(kek, PLACE, sealed)
        assert info.value.args == ("data-key-length",)


def test_seal_uses_a_fresh_data_key_and_fresh_nonces_from_the_rng(kek: Kek) -> None:
    data_key, n1, n2 = bytes(range(5, 37)), bytes(12), bytes(range(12))
    sealed = envelope.seal_secret(kek, PLACE, b"pw", _fixed(data_key, n1, n2))
    secret_ad = (_field(b"kh1/secret") + _field(VAULT_ID) + _field(b"svc") + _field(b"alice")
                 + _field(_u32(3)))
    assert sealed == Sealed(7, _blob(bytes(kek._material), data_key, _dek_ad(PLACE, 7), n2),
                            _blob(data_key, b"pw", secret_ad, n1))


def test_new_kek_takes_32_random_bytes_and_its_version() -> None:
    material = bytes(range(32))
    kek = envelope.new_kek(5, _fixed(material))
    assert kek.version == 5
    assert kek._material == bytearray(material)


def test_wipe_zeroes_every_byte() -> None:
    buf = bytearray(b"\xff" * 40)
    envelope.wipe(buf)
    assert buf == bytearray(40)
    kek = Kek(1, bytearray(b"\xaa" * 32))
    kek.wipe()
    assert kek._material == bytearray(32)


def test_versions_up_to_32_bits_are_bound_unsigned() -> None:
    big = 2**31 + 5
    kek = Kek(big, bytearray(range(64, 96)))
    place = Place(VAULT_ID, "svc", "alice", 2**32 - 1)
    data_key = bytes(range(10, 42))
    sealed = envelope.seal_secret(kek, place, b"pw", _fixed(data_key, NONCE, NONCE))
    ad = (_field(b"kh1/dek") + _field(VAULT_ID) + _field(b"svc") + _field(b"alice")
          + _field(b"\xff\xff\xff\xff") + _field(struct.pack(">I", big)))
    assert sealed.wrapped_key == _blob(bytes(kek._material), data_key, ad)
    assert envelope.open_secret(kek, place, sealed) == b"pw"
