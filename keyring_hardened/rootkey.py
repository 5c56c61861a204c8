"""Root keys: the key file or a passphrase, and the keys derived from them.

The root key never encrypts data itself. HKDF (salted with the vault id)
derives two keys from it:

* the *wrapping key*, which wraps the KEK versions and the vault key
  (AES-256-GCM);
* the *verifier key*, whose HMAC over the vault id is stored so that a wrong
  key or passphrase is told apart from tampered key records.

The *vault key* is random, stored only wrapped under the root key, and
replaced by every ``key rekey`` (a new *key epoch*; earlier epochs' vault
keys are kept wrapped under the current one). HKDF derives from it:

* the *audit key*, which chains the audit trail's HMACs and so
  authenticates the state root every event carries;
* the *identifier key*, which hashes names when ``hmac_identifiers`` is on
  (the oldest epoch's is used, so hashes survive rekeys);
* the key that wraps the earlier epochs' vault keys;
* the *record key*, which MACed each head row in keyring-hardened 0.1 and
  is used now only to check such a vault once, when it is upgraded.

The KDF (Argon2id or PBKDF2) runs once per unlock, never per credential.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from . import _aead
from .errors import IntegrityError, LockedError

__all__ = [
    "ARGON2_DEFAULT",
    "OWASP_ARGON2_FLOOR",
    "PBKDF2_DEFAULT_ITERATIONS",
    "KdfParams",
    "RootKey",
    "create_key_file",
    "read_key_file",
]

KEYFILE = "keyfile"
ARGON2ID = "argon2id"
PBKDF2 = "pbkdf2-sha256"

#: RFC 9106 second recommendation: 64 MiB, t=3, p=4.
ARGON2_DEFAULT = {"memory_kib": 65536, "iterations": 3, "lanes": 4}
#: OWASP password storage cheat sheet floor for Argon2id: 19 MiB, t=2, p=1.
OWASP_ARGON2_FLOOR = {"memory_kib": 19456, "iterations": 2, "lanes": 1}
#: OWASP's figure for PBKDF2-HMAC-SHA256.
PBKDF2_DEFAULT_ITERATIONS = 600_000

_SALT_LEN = 16

#: The stored KDF parameters accepted, the same ranges config accepts: OWASP's
#: floors below, and above, values that still unlock in bounded time and memory.
KDF_LIMITS = {
    "memory_kib": (OWASP_ARGON2_FLOOR["memory_kib"], 4 * 1024 * 1024),
    "iterations": (OWASP_ARGON2_FLOOR["iterations"], 100),
    "lanes": (1, 64),
    "pbkdf2_iterations": (PBKDF2_DEFAULT_ITERATIONS, 100_000_000),
}


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


class KdfParams(NamedTuple):
    """How the root key is obtained: a key file, or a KDF over a passphrase."""

    algorithm: str
    salt: bytes = b""
    memory_kib: int = 0
    iterations: int = 0
    lanes: int = 0

    @property
    def uses_passphrase(self) -> bool:
        """Whether this vault is unlocked with a passphrase."""
        return self.algorithm != KEYFILE

    @classmethod
    def keyfile(cls) -> KdfParams:
        """Parameters of a key-file vault."""
        return cls(KEYFILE)

    @classmethod
    def new_argon2id(cls, memory_kib: int, iterations: int, lanes: int) -> KdfParams:
        """Fresh Argon2id parameters with a new random salt."""
        return cls(ARGON2ID, _aead.random_bytes(_SALT_LEN), memory_kib, iterations, lanes)

    @classmethod
    def new_pbkdf2(cls, iterations: int) -> KdfParams:
        """Fresh PBKDF2-HMAC-SHA256 parameters with a new random salt."""
        return cls(PBKDF2, _aead.random_bytes(_SALT_LEN), iterations=iterations)

    def to_json(self) -> str:
        """Encode for storage in the vault record."""
        doc: dict[str, Any] = {"algorithm": self.algorithm}
        if self.algorithm == ARGON2ID:
            doc.update(salt=self.salt.hex(), memory_kib=self.memory_kib,
                       iterations=self.iterations, lanes=self.lanes)
        elif self.algorithm == PBKDF2:
            doc.update(salt=self.salt.hex(), iterations=self.iterations)
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KdfParams:
        """Decode the stored form; damaged or out-of-range parameters are an integrity error.

        They are read before any key is known, so nothing authenticates them
        yet: the ranges keep an edited value from hanging every unlock or
        exhausting memory, and from passing for a wrong passphrase.
        """
        try:
            doc = json.loads(text)
            algorithm = doc["algorithm"]
            if algorithm == KEYFILE:
                return cls(KEYFILE)
            if algorithm == ARGON2ID:
                params = cls(ARGON2ID, bytes.fromhex(doc["salt"]), _whole(doc["memory_kib"]),
                             _whole(doc["iterations"]), _whole(doc["lanes"]))
            elif algorithm == PBKDF2:
                params = cls(PBKDF2, bytes.fromhex(doc["salt"]),
                             iterations=_whole(doc["iterations"]))
            else:
                raise ValueError(algorithm)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        else:
            if params.in_range():
                return params
        raise IntegrityError("vault record: key derivation parameters are damaged "
                             "(tampered?); restore the vault from a backup", "kdf-damaged")

    def in_range(self) -> bool:
        """Whether the parameters lie within what ``init`` and config can produce."""
        if len(self.salt) != _SALT_LEN:
            return False
        if self.algorithm == ARGON2ID:
            return (KDF_LIMITS["memory_kib"][0] <= self.memory_kib <= KDF_LIMITS["memory_kib"][1]
                    and KDF_LIMITS["iterations"][0] <= self.iterations
                    <= KDF_LIMITS["iterations"][1]
                    and KDF_LIMITS["lanes"][0] <= self.lanes <= KDF_LIMITS["lanes"][1])
        return (KDF_LIMITS["pbkdf2_iterations"][0] <= self.iterations
                <= KDF_LIMITS["pbkdf2_iterations"][1])

    def describe(self) -> str:
        """A one-line human description, e.g. for ``status``."""
        if self.algorithm == ARGON2ID:
            return (f"argon2id (memory {self.memory_kib} KiB, iterations {self.iterations}, "
                    f"lanes {self.lanes})")
        if self.algorithm == PBKDF2:
            return f"pbkdf2-sha256 ({self.iterations} iterations)"
        return "key file"


class RootKey:
    """An unlocked root key and the keys derived from it. Wipe with :meth:`close`."""

    __slots__ = ("_verifier_key", "_wrap_key", "wrap")

    def __init__(self, material: bytearray, vault_id: bytes) -> None:
        try:
            self._wrap_key = _aead.hkdf_sha256(material, vault_id, b"keyring-hardened/v1/kek-wrap")
            self._verifier_key = _aead.hkdf_sha256(material, vault_id,
                                                   b"keyring-hardened/v1/verify")
        finally:
            # The root key itself is needed only to derive these; drop it now.
            _aead.wipe(material)
        self.wrap = _aead.Aead(self._wrap_key)

    def verifier(self, vault_id: bytes) -> bytes:
        """The value stored in the vault record to recognise this key."""
        return _aead.hmac_sha256(self._verifier_key, b"keyring-hardened/v1/verifier" + vault_id)

    def matches(self, vault_id: bytes, stored: bytes) -> bool:
        """Whether this key is the one the vault was made with (constant time)."""
        # Constant time: how many bytes matched must not leak through timing.
        return hmac.compare_digest(self.verifier(vault_id), stored)

    def close(self) -> None:
        """Wipe the derived keys (best effort)."""
        for buf in (self._wrap_key, self._verifier_key):
            _aead.wipe(buf)

    def __repr__(self) -> str:
        return "RootKey(<hidden>)"


class VaultKeys:
    """Keys derived from one epoch's vault key (a rekey starts a new epoch).

    * ``audit_key`` chains the audit trail's HMACs (and so authenticates the
      state root each event carries);
    * ``identifier_key`` hashes names when ``hmac_identifiers`` is on (the
      session uses the oldest epoch's, so hashes stay stable across rekeys);
    * ``past`` wraps the vault keys of earlier epochs, kept to verify the
      trail they chained;
    * the record key MACed head rows in keyring-hardened 0.1; it is used
      only to check such a vault once, when it is upgraded.
    """

    __slots__ = ("_past_key", "_record_key", "audit_key", "identifier_key", "past")

    def __init__(self, material: bytearray, vault_id: bytes) -> None:
        try:
            self._record_key = _aead.hkdf_sha256(material, vault_id, b"keyring-hardened/v1/record")
            self.audit_key = _aead.hkdf_sha256(material, vault_id, b"keyring-hardened/v1/audit")
            self.identifier_key = _aead.hkdf_sha256(material, vault_id,
                                                    b"keyring-hardened/v1/identifier")
            self._past_key = _aead.hkdf_sha256(material, vault_id,
                                               b"keyring-hardened/v2/past-vault-keys")
        finally:
            _aead.wipe(material)
        self.past = _aead.Aead(self._past_key)

    def record_mac(self, data: bytes) -> bytes:
        """The 0.1 MAC of a credential head record (checked once, at upgrade)."""
        return _aead.hmac_sha256(self._record_key, data)

    def close(self) -> None:
        """Wipe the derived keys (best effort)."""
        for buf in (self._record_key, self.audit_key, self.identifier_key, self._past_key):
            _aead.wipe(buf)

    def __repr__(self) -> str:
        return "VaultKeys(<hidden>)"


def derive_from_passphrase(params: KdfParams, passphrase: str) -> bytearray:
    """Run the vault's KDF over a passphrase (NFC-normalised UTF-8)."""
    import unicodedata

    # NFC so that the same passphrase typed on two systems derives the same key.
    password = unicodedata.normalize("NFC", passphrase).encode("utf-8", "surrogatepass")
    if params.algorithm == ARGON2ID:
        return _aead.argon2id(password, params.salt, params.memory_kib, params.iterations,
                              params.lanes)
    if params.algorithm == PBKDF2:
        return _aead.pbkdf2_sha256(password, params.salt, params.iterations)
    raise LockedError("this vault is not in passphrase mode")


def read_key_file(path: Path) -> bytearray:
    """Read a 32-byte key file through the trusted-file checks.

    As ssh does with private keys: no symbolic link, a regular file (a FIFO
    or device cannot hang or flood the read), owned by you or root, and not
    accessible by group or others, since a key others can read or replace is
    not a secret. Those are exit 2 naming the file; a missing or unreadable
    key file is locked (exit 6).
    """
    from ._files import open_trusted

    try:
        fd = open_trusted(path, "key file")
    except FileNotFoundError:
        raise LockedError(f"no key file at {path} (set KEYRING_HARDENED_KEY_FILE "
                          "or restore the key file)", "no-key-file") from None
    except OSError as exc:
        raise LockedError(f"key file {path} cannot be read: {exc.strerror}",
                          "key-file-unreadable") from None
    try:
        data = bytearray(os.read(fd, _aead.KEY_LEN + 1))
    except OSError as exc:
        raise LockedError(f"key file {path} cannot be read: {exc.strerror}",
                          "key-file-unreadable") from None
    finally:
        os.close(fd)
    if len(data) != _aead.KEY_LEN:
        _aead.wipe(data)
        raise LockedError(f"key file {path} is damaged: it must hold exactly 32 bytes",
                          "key-file-damaged")
    return data


def create_key_file(path: Path) -> bool:
    """Create a key file of 32 random bytes, mode 0600, atomically.

    Returns False when a key file already exists there (it is left as it is,
    and the caller's read checks its trust: a planted key is refused there).
    The key is written to a random temporary name, created exclusively
    without following links, and hard-linked into place, so a concurrent
    reader never sees a partly written key and two concurrent creators agree
    on one key. OS failures are a :class:`StorageError` naming the path.
    """
    from .errors import StorageError
    from .location import make_home

    if os.path.lexists(path):
        return False
    if not os.path.isdir(path.parent):
        make_home(path.parent)  # 0700 with 0700 parents, whatever the umask
    tmp = path.with_name(f".{path.name}.{_aead.random_bytes(8).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, _aead.random_bytes(_aead.KEY_LEN))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot create key file {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
