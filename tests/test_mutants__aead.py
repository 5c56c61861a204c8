"""Tests that kill mutants of _aead.py which the rest of the suite let live.

The KDFs are pinned against the primitives' own implementations (hashlib,
cryptography) with every parameter distinct, so a swapped or dropped
parameter changes the answer.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from keyring_hardened import _aead


def test_sizes_are_aes_256_gcm_with_96_bit_nonces() -> None:
    assert (_aead.KEY_LEN, _aead.NONCE_LEN, _aead.TAG_LEN) == (32, 12, 16)


def test_seal_and_open_are_aes_gcm_with_the_given_associated_data() -> None:
    key, nonce = bytes(range(32)), bytes(range(12))
    aead = _aead.Aead(bytearray(key))
    sealed = aead.seal(nonce, b"plain", b"ad")
    assert sealed == AESGCM(key).encrypt(nonce, b"plain", b"ad")
    assert aead.open(nonce, sealed, b"ad") == b"plain"
    with pytest.raises(_aead.DecryptFailed):
        aead.open(nonce, sealed, b"other ad")


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_aead_takes_only_32_byte_keys(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        _aead.Aead(bytes(length))


def test_random_bytes_are_the_length_asked_and_not_repeated() -> None:
    seen = {_aead.random_bytes(12) for _ in range(1000)}
    assert len(seen) == 1000
    assert all(len(n) == 12 for n in seen)
    assert len(_aead.random_bytes(32)) == 32


def test_hkdf_length_limits() -> None:
    assert len(_aead.hkdf_sha256(b"k", b"s", b"i", 255 * 32)) == 8160
    assert len(_aead.hkdf_sha256(b"k", b"s", b"i", 1)) == 1
    assert len(_aead.hkdf_sha256(b"k", b"s", b"i")) == 32
    for bad in (0, -1, 8161):
        with pytest.raises(ValueError, match="length"):
            _aead.hkdf_sha256(b"k", b"s", b"i", bad)


def test_hkdf_empty_salt_is_32_zero_bytes_as_rfc_5869_says() -> None:
    assert _aead.hkdf_sha256(b"ikm", b"", b"info") == _aead.hkdf_sha256(b"ikm", bytes(32),
                                                                          b"info")


def test_hmac_sha256_is_the_standard_one() -> None:
    key, data = bytearray(range(32)), b"message"
    assert _aead.hmac_sha256(key, data) == hmac.new(bytes(key), data, hashlib.sha256).digest()


def test_argon2id_passes_every_parameter_to_the_kdf() -> None:
    salt = bytes(range(16))
    ours = _aead.argon2id(b"passphrase", salt, 8 * 5, 3, 2)
    theirs = Argon2id(salt=salt, length=32, iterations=3, lanes=2, memory_cost=40)
    assert ours == theirs.derive(b"passphrase")
    assert isinstance(ours, bytearray)
    assert len(ours) == 32


def test_pbkdf2_passes_every_parameter_to_the_kdf() -> None:
    salt = bytes(range(16))
    ours = _aead.pbkdf2_sha256(b"passphrase", salt, 1000)
    assert ours == hashlib.pbkdf2_hmac("sha256", b"passphrase", salt, 1000, 32)
    assert isinstance(ours, bytearray)


def test_wipe_zeroes_every_byte() -> None:
    buf = bytearray(range(1, 41))
    _aead.wipe(buf)
    assert buf == bytearray(40)
