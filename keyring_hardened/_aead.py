"""Private cryptographic primitives: the only module that touches AEAD and KDFs.

Nothing but :mod:`keyring_hardened.envelope` and
:mod:`keyring_hardened.rootkey` imports this module. It holds no policy:
which key wraps what, and with which associated data, is decided there.
The KDF modules are imported on first use, so a key-file unlock never pays
for loading Argon2id or PBKDF2.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag

try:
    # The public ``cryptography.hazmat.primitives.ciphers.aead.AESGCM`` is this
    # same class, re-exported; importing it through the public module also loads
    # the whole ciphers package (about 1.6 ms), on every cold ``keyring get``.
    # A test checks that both names are one class; if cryptography moves it,
    # the public import below takes over.
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    AESGCM = _rust_openssl.aead.AESGCM
except (ImportError, AttributeError):  # pragma: no cover - depends on cryptography's layout
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16


class DecryptFailed(Exception):
    """Raised when an AEAD open fails; callers turn it into one opaque error."""


class Aead:
    """AES-256-GCM under one key.

    The cipher object keeps its own copy of the key inside cryptography's
    Rust core; that copy cannot be wiped from Python (see the security guide).
    """

    __slots__ = ("_cipher",)

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != KEY_LEN:
            raise ValueError("AES-256-GCM key must be 32 bytes")
        self._cipher = AESGCM(bytes(key))

    def seal(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt and authenticate; returns ciphertext with the 16-byte tag."""
        return self._cipher.encrypt(nonce, plaintext, associated_data)

    def open(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
        """Authenticate and decrypt, or raise :class:`DecryptFailed`."""
        try:
            return self._cipher.decrypt(nonce, ciphertext, associated_data)
        except InvalidTag:
            raise DecryptFailed from None

    def __repr__(self) -> str:
        return "Aead(<key hidden>)"


def random_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the operating system's CSPRNG."""
    return os.urandom(n)


def hkdf_sha256(ikm: bytes | bytearray, salt: bytes, info: bytes,
                length: int = KEY_LEN) -> bytearray:
    """Derive ``length`` bytes with HKDF-SHA256 (RFC 5869).

    Written over the standard library's HMAC rather than taken from
    cryptography's HKDF: importing that costs about a millisecond on every
    unlock, and an unlock happens in every ``keyring get`` process. The tests
    check it against RFC 5869's vectors and against cryptography's HKDF.
    """
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF-SHA256 length must be 1 to 8160 bytes")
    prk = hmac.new(salt or bytes(32), bytes(ikm), hashlib.sha256).digest()
    okm, block, counter = bytearray(), b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    del okm[length:]
    return okm


def hmac_sha256(key: bytes | bytearray, data: bytes) -> bytes:
    """Return HMAC-SHA256 of ``data`` under ``key``."""
    return hmac.new(bytes(key), data, hashlib.sha256).digest()


def argon2id(password: bytes, salt: bytes, memory_kib: int, iterations: int,
             lanes: int) -> bytearray:
    """Derive a 32-byte key from a passphrase with Argon2id (RFC 9106)."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    kdf = Argon2id(salt=salt, length=KEY_LEN, iterations=iterations, lanes=lanes,
                   memory_cost=memory_kib)
    return bytearray(kdf.derive(password))


def pbkdf2_sha256(password: bytes, salt: bytes, iterations: int) -> bytearray:
    """Derive a 32-byte key from a passphrase with PBKDF2-HMAC-SHA256."""
    return bytearray(hashlib.pbkdf2_hmac("sha256", password, salt, iterations, KEY_LEN))


def wipe(buf: bytearray) -> None:
    """Overwrite a key buffer with zeros (best effort: CPython may hold copies)."""
    for i in range(len(buf)):
        buf[i] = 0
