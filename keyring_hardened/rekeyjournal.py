"""What a killed ``key rekey`` leaves behind, and finishing it when a vault opens.

A rekey writes a journal (``rekey.json``) before it changes anything, and
holds an exclusive lock (``rekey.lock``) for its whole run. Opening a vault
(:meth:`keyring_hardened.session.Session.open`) finds a journal whose lock
nobody holds, and calls :func:`recover_interrupted_rekey` before it unlocks
anything: the key files must agree with the vault before a key is read.
Key management (:mod:`keyring_hardened.keys`) takes the same lock and
writes the same journal. This module sits below both, so the session does
not import key management to open a vault.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ._files import fsync_dir
from .errors import HardenedError, UsageError
from .location import Location
from .rootkey import KdfParams, RootKey, read_key_file

if TYPE_CHECKING:
    from .port import Storage

__all__ = ["JOURNAL", "LOCK", "recover_interrupted_rekey"]

JOURNAL = "rekey.json"
LOCK = "rekey.lock"


@contextlib.contextmanager
def _rekey_lock(home: Path, wait: bool) -> Iterator[bool]:
    """An exclusive lock held for a whole rekey; yields False when another process holds it.

    A crashed rekey releases it (the kernel drops a dead process's locks), so
    holding the lock while a journal exists means that rekey died.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        # Without a lock two rekeys could interleave their file steps: refuse
        # rather than pretend (the read path then never finishes a journal).
        raise UsageError("key rekey needs file locking (flock), which this platform "
                         "lacks") from None
    from ._files import open_trusted
    from .errors import StorageError

    try:
        # Trusted like the journal: not a link (it would create or lock a file
        # elsewhere), not a FIFO (no hang), yours or root's, nobody else can write.
        fd = open_trusted(home / LOCK, "rekey lock", flags=os.O_RDWR | os.O_CREAT,
                          private=False)
    except OSError as exc:
        raise StorageError(f"rekey lock {home / LOCK} cannot be opened: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def recover_interrupted_rekey(location: Location, storage: Storage) -> str | None:
    """Finish or undo the file steps of a rekey that was killed; say which key opens the vault.

    Nothing in the journal is trusted to decide an action: what to do is read
    from the vault itself. A new key file (``<key file>.new``) that matches
    the vault's verifier is moved into place (the rekey committed); one that
    does not is removed. A key file left by a committed switch to a
    passphrase is removed only if it no longer opens the vault. Returns a
    sentence for the user, or None when a rekey is still running in another
    process.
    """
    from ._files import read_trusted

    journal = location.home / JOURNAL
    with _rekey_lock(location.home, wait=False) as held:
        if not held:
            return None
        try:
            # Only a trusted journal (a small regular file, yours or root's,
            # nobody else can write) is acted on at all; even then its content
            # decides no action, only the wording of the message below.
            text = read_trusted(journal, "rekey journal", private=False)
        except FileNotFoundError:
            return None
        vault = storage.vault()
        new_file = location.pending_key_file
        if new_file.exists():
            committed = _opens(new_file, vault.vault_id, vault.verifier)
            if committed:
                os.replace(new_file, location.key_file)
            else:
                new_file.unlink(missing_ok=True)
        else:
            # Whether it committed is then only the journal's word; it decides
            # the message, never an action.
            committed = _journal_generation(text) < vault.generation
            if KdfParams.from_json(vault.kdf).uses_passphrase and location.key_file.exists() \
                    and not _opens(location.key_file, vault.vault_id, vault.verifier):
                location.key_file.unlink()  # left by a committed switch to a passphrase
        fsync_dir(location.home)
        journal.unlink(missing_ok=True)
        if committed:
            return ("an interrupted rekey had completed: the new root key opens this vault "
                    "now, the old one no longer does")
        return ("an interrupted rekey had not taken effect: the old root key still opens this "
                "vault; run key rekey again")


def _opens(path: Path, vault_id: bytes, verifier: bytes) -> bool:
    """Whether the key file at ``path`` is the one the vault's verifier names."""
    try:
        root = RootKey(read_key_file(path), vault_id)
    except HardenedError:
        return False
    try:
        return root.matches(vault_id, verifier)
    finally:
        root.close()


def _journal_generation(text: bytes) -> int:
    """The generation a journal says its rekey started from (only for the message)."""
    try:
        value = json.loads(text.decode("utf-8"))["from_generation"]
    except (ValueError, KeyError, TypeError):
        return 2**62
    return value if isinstance(value, int) and not isinstance(value, bool) else 2**62
