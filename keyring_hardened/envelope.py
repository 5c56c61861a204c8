"""The envelope format: every cryptographic choice of the vault, in one place.

Key hierarchy (DESIGN.md section 4)::

    root key ──wraps──▶ KEK version k ──wraps──▶ data key ──encrypts──▶ secret

* All three layers use AES-256-GCM with a fresh random 96-bit nonce.
* Every blob is ``FORMAT_V1 || nonce (12) || ciphertext || tag (16)``; the
  leading byte versions the layout so a later format can sit beside it.
* Associated data binds each blob to its place, as length-prefixed fields
  behind a purpose label, so no two places can share an encoding:

  - wrapped KEK:  ``"kh1/kek"  | vault id | KEK version``
  - wrapped data key: ``"kh1/dek" | vault id | service | username |
    credential version | KEK version``
  - secret:  ``"kh1/secret" | vault id | service | username | credential version``

  The secret's associated data leaves out the KEK version on purpose: that
  lets ``key rewrap`` re-wrap data keys under a newer KEK without touching
  payloads. The payload stays bound to its KEK through its data key, which
  exists only wrapped under that KEK with the KEK version in its own
  associated data. Moving or swapping any blob fails like tampering does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from . import _aead
from ._aead import KEY_LEN, NONCE_LEN, TAG_LEN, Aead, DecryptFailed

__all__ = [
    "FORMAT_V1",
    "KEY_LEN",
    "DecryptFailed",
    "Kek",
    "Place",
    "Sealed",
    "open_secret",
    "seal_secret",
    "unwrap_kek",
    "wrap_kek",
]

FORMAT_V1 = 1
_HEADER = bytes([FORMAT_V1])
_MIN_BLOB = 1 + NONCE_LEN + TAG_LEN

Rng = Callable[[int], bytes]


class Place(NamedTuple):
    """Where a credential version lives; bound into its associated data."""

    vault_id: bytes
    service: str
    username: str
    version: int


class Sealed(NamedTuple):
    """A sealed credential version: its wrapped data key and its ciphertext."""

    kek_version: int
    wrapped_key: bytes
    ciphertext: bytes


class Kek:
    """One unwrapped key-encryption key version, ready to wrap and unwrap data keys."""

    __slots__ = ("_aead", "_material", "version")

    def __init__(self, version: int, material: bytearray) -> None:
        self.version = version
        self._material = material
        self._aead = Aead(material)

    def wipe(self) -> None:
        """Zero this KEK's key buffer (best effort)."""
        _aead.wipe(self._material)

    def __repr__(self) -> str:
        return f"Kek(version={self.version}, <key hidden>)"


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _ad(label: bytes, *fields: bytes) -> bytes:
    return _field(label) + b"".join(_field(f) for f in fields)


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _dek_ad(place: Place, kek_version: int) -> bytes:
    return _ad(b"kh1/dek", place.vault_id, place.service.encode(), place.username.encode(),
               _u32(place.version), _u32(kek_version))


def _secret_ad(place: Place) -> bytes:
    return _ad(b"kh1/secret", place.vault_id, place.service.encode(), place.username.encode(),
               _u32(place.version))


def _kek_ad(vault_id: bytes, kek_version: int) -> bytes:
    return _ad(b"kh1/kek", vault_id, _u32(kek_version))


def _seal(aead: Aead, plaintext: bytes, ad: bytes, rng: Rng) -> bytes:
    """One blob: ``FORMAT_V1 || nonce || ciphertext || tag``, bound to ``ad``.

    Every seal takes a fresh random 96-bit nonce from the OS CSPRNG: GCM's
    security rests on never repeating a nonce under a key, and random nonces
    are safe for the 2^32 seals per key that ``max_wraps`` stays far below.
    """
    nonce = rng(NONCE_LEN)
    return _HEADER + nonce + aead.seal(nonce, plaintext, ad)


def _open(aead: Aead, blob: bytes, ad: bytes) -> bytes:
    """Check a blob's format and tag under ``ad`` and decrypt it, or raise DecryptFailed.

    A blob moved to another place has other associated data, so its tag
    fails exactly like a flipped byte does.
    """
    if len(blob) < _MIN_BLOB or blob[0] != FORMAT_V1:
        raise DecryptFailed("format")
    return aead.open(blob[1:1 + NONCE_LEN], blob[1 + NONCE_LEN:], ad)


def seal_secret(kek: Kek, place: Place, plaintext: bytes,
                rng: Rng = _aead.random_bytes) -> Sealed:
    """Encrypt ``plaintext`` under a fresh data key wrapped by ``kek``."""
    data_key = bytearray(rng(KEY_LEN))
    try:
        ciphertext = _seal(Aead(data_key), plaintext, _secret_ad(place), rng)
        wrapped = _seal(kek._aead, bytes(data_key), _dek_ad(place, kek.version), rng)
    finally:
        _aead.wipe(data_key)
    return Sealed(kek.version, wrapped, ciphertext)


def open_secret(kek: Kek, place: Place, sealed: Sealed) -> bytes:
    """Decrypt a sealed version, or raise :class:`DecryptFailed` for any failure."""
    if sealed.kek_version != kek.version:
        raise DecryptFailed("kek-version")
    try:
        data_key = bytearray(_open(kek._aead, sealed.wrapped_key, _dek_ad(place, kek.version)))
    except DecryptFailed as exc:
        raise DecryptFailed(f"data-key-{exc.args[0] if exc.args else 'tag'}") from None
    try:
        if len(data_key) != KEY_LEN:
            raise DecryptFailed("data-key-length")
        try:
            return _open(Aead(data_key), sealed.ciphertext, _secret_ad(place))
        except DecryptFailed as exc:
            raise DecryptFailed(f"payload-{exc.args[0] if exc.args else 'tag'}") from None
    finally:
        _aead.wipe(data_key)


def rewrap_key(old: Kek, new: Kek, place: Place, wrapped_key: bytes,
               rng: Rng = _aead.random_bytes) -> bytes:
    """Re-wrap a data key from ``old`` to ``new`` without touching the payload."""
    data_key = bytearray(_open(old._aead, wrapped_key, _dek_ad(place, old.version)))
    try:
        return _seal(new._aead, bytes(data_key), _dek_ad(place, new.version), rng)
    finally:
        _aead.wipe(data_key)


def wrap_kek(wrap_key: Aead, vault_id: bytes, kek: Kek, rng: Rng = _aead.random_bytes) -> bytes:
    """Wrap a KEK under the root wrapping key."""
    return _seal(wrap_key, bytes(kek._material), _kek_ad(vault_id, kek.version), rng)


def unwrap_kek(wrap_key: Aead, vault_id: bytes, version: int, blob: bytes) -> Kek:
    """Unwrap a KEK version, or raise :class:`DecryptFailed`."""
    material = bytearray(_open(wrap_key, blob, _kek_ad(vault_id, version)))
    if len(material) != KEY_LEN:
        _aead.wipe(material)
        raise DecryptFailed
    return Kek(version, material)


def _vault_key_ad(vault_id: bytes) -> bytes:
    return _ad(b"kh1/vault-key", vault_id)


def wrap_vault_key(wrap_key: Aead, vault_id: bytes, material: bytes | bytearray,
                   rng: Rng = _aead.random_bytes) -> bytes:
    """Wrap the vault key under the root wrapping key."""
    return _seal(wrap_key, bytes(material), _vault_key_ad(vault_id), rng)


def new_vault_key(wrap_key: Aead, vault_id: bytes, rng: Rng = _aead.random_bytes
                  ) -> tuple[bytes, bytearray]:
    """Make a random vault key: (wrapped under ``wrap_key``, the clear key to wipe after use)."""
    material = bytearray(rng(KEY_LEN))
    return wrap_vault_key(wrap_key, vault_id, material, rng), material


def unwrap_vault_key(wrap_key: Aead, vault_id: bytes, blob: bytes) -> bytearray:
    """Unwrap the vault key, or raise :class:`DecryptFailed`."""
    material = bytearray(_open(wrap_key, blob, _vault_key_ad(vault_id)))
    if len(material) != KEY_LEN:
        _aead.wipe(material)
        raise DecryptFailed("vault-key-length")
    return material


def _past_key_ad(vault_id: bytes, epoch: int) -> bytes:
    return _ad(b"kh2/past-vault-key", vault_id, _u32(epoch))


def wrap_past_vault_key(wrap_key: Aead, vault_id: bytes, epoch: int,
                        material: bytes | bytearray, rng: Rng = _aead.random_bytes) -> bytes:
    """Wrap an earlier epoch's vault key under the current vault key's wrapping key."""
    return _seal(wrap_key, bytes(material), _past_key_ad(vault_id, epoch), rng)


def unwrap_past_vault_key(wrap_key: Aead, vault_id: bytes, epoch: int, blob: bytes) -> bytearray:
    """Unwrap an earlier epoch's vault key, or raise :class:`DecryptFailed`."""
    material = bytearray(_open(wrap_key, blob, _past_key_ad(vault_id, epoch)))
    if len(material) != KEY_LEN:
        _aead.wipe(material)
        raise DecryptFailed("past-vault-key-length")
    return material


def wipe(buf: bytearray) -> None:
    """Overwrite a clear key with zeros (best effort: CPython may hold copies)."""
    _aead.wipe(buf)


def new_kek(version: int, rng: Rng = _aead.random_bytes) -> Kek:
    """Create a fresh random KEK."""
    return Kek(version, bytearray(rng(KEY_LEN)))
