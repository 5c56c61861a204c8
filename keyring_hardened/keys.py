"""Key management: list, rotate, rewrap and retire KEK versions; rekey the root key.

Each step is an audited store operation:

* ``rotate`` adds a KEK version; new writes use it at once, older versions
  stay readable (decrypt-only).
* ``rewrap`` re-wraps data keys under the newest KEK in batches, each its
  own transaction, without touching payloads: readers and writers in other
  processes keep working, and a killed run loses nothing and resumes.
* ``retire`` removes the wrapped material of KEK versions nothing uses.
* ``rekey`` re-wraps the KEKs and the vault key under a new root key (a new
  key file, a new passphrase, or a switch between the two) in one
  transaction, after checking that the new root key unwraps every one of
  them. A journal and a ``.new`` key file make it crash-safe: whenever it
  is killed, exactly one of the old and the new root key opens the vault,
  and the next open says which.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import envelope
from ._files import fsync_dir, write_private
from .envelope import DecryptFailed, Place
from .errors import IntegrityError, UsageError
from .location import Location
from .rootkey import KdfParams, RootKey, create_key_file, derive_from_passphrase, read_key_file
from .storage import SQLiteStorage

if TYPE_CHECKING:
    from .session import Session, _Note

__all__ = ["KeyInfo", "KeyManager", "RewrapSummary", "recover_interrupted_rekey"]

CRASH_ENV = "KEYRING_HARDENED_CRASH_AT"
JOURNAL = "rekey.json"
LOCK = "rekey.lock"


class KeyInfo(NamedTuple):
    """One KEK version, as ``key list`` shows it."""

    version: int
    state: str
    created_at: float
    data_keys: int
    wrap_count: int


class RewrapSummary(NamedTuple):
    """What a ``key rewrap`` run did."""

    rewrapped: int
    batches: int
    target_version: int
    seconds: float


def _crash_point(name: str) -> None:
    """Test hook: die here, as ``kill -9`` would, when ``KEYRING_HARDENED_CRASH_AT`` names it."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _rekey_lock(home: Path, wait: bool) -> Iterator[bool]:
    """An exclusive lock held for a whole rekey; yields False when another process holds it.

    A crashed rekey releases it (the kernel drops a dead process's locks), so
    holding the lock while a journal exists means that rekey died.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
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


def _describe(mode: str) -> str:
    return "the new key file" if mode == "key file" else "the new passphrase"


def recover_interrupted_rekey(location: Location, storage: SQLiteStorage) -> str | None:
    """Finish or undo the file steps of a rekey that was killed; say which key opens the vault.

    The database says whether the rekey committed (its generation moved on).
    If it did, the new key file is moved into place (or the old one removed,
    for a switch to a passphrase); if not, the unused new key file is
    removed. Returns a sentence for the user, or None when a rekey is still
    running in another process.
    """
    from ._files import read_trusted

    journal = location.home / JOURNAL
    with _rekey_lock(location.home, wait=False) as held:
        if not held:
            return None
        try:
            # A journal decides which key file survives: only a trusted one (a
            # small regular file, yours or root's, nobody else can write) is read.
            doc = json.loads(read_trusted(journal, "rekey journal",
                                          private=False).decode("utf-8"))
            before, target = int(doc["from_generation"]), str(doc["to"])
            old_mode = str(doc["from"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            journal.unlink(missing_ok=True)
            return "removed a damaged rekey journal; the vault was not changed by it"
        new_file = location.pending_key_file
        if storage.vault().generation > before:
            if target == "key file" and new_file.exists():
                os.replace(new_file, location.key_file)
            elif target == "passphrase" and old_mode == "key file":
                location.key_file.unlink(missing_ok=True)
            message = (f"an interrupted rekey had completed: {_describe(target)} opens this "
                       "vault now, the old root key no longer does")
        else:
            new_file.unlink(missing_ok=True)
            message = ("an interrupted rekey had not taken effect: the old root key still opens "
                       "this vault; run key rekey again")
        fsync_dir(location.home)
        journal.unlink(missing_ok=True)
        return message


class KeyManager:
    """Key operations of one unlocked :class:`~keyring_hardened.store.Store`."""

    def __init__(self, store: Session) -> None:
        self._store = store

    def versions(self) -> list[KeyInfo]:
        """Every KEK version: state, creation time, data keys it wraps, wrap count."""
        def body(storage: SQLiteStorage, note: _Note) -> list[KeyInfo]:
            in_use = storage.keys_in_use()
            return [KeyInfo(k.version, k.state, k.created_at, in_use.get(k.version, 0),
                            k.wrap_count) for k in storage.keks()]

        return self._store._run("key-list", None, None, body)

    def rotate(self) -> int:
        """Add a KEK version and make it active; returns its number."""
        store = self._store

        def body(storage: SQLiteStorage, note: _Note) -> int:
            version = store._rotate_in(storage, store._clock(), "manual", record=False)
            note.key_version = version
            note.reason = "manual"
            return version

        return store._run("key-rotate", None, None, body, writes=True)

    def rewrap(self, batch: int = 1000,
               progress: Callable[[int, int], None] | None = None) -> RewrapSummary:
        """Re-wrap every data key under an older KEK with the active one, in batches.

        ``progress(done, total)`` is called after each batch. Killed at any
        point, a run loses nothing: each batch commits whole, and the next
        run continues with what is left.
        """
        if batch < 1 or batch > 100_000:
            raise UsageError("batch must be between 1 and 100000")
        store = self._store
        started = time.perf_counter()

        def count(storage: SQLiteStorage, note: _Note) -> tuple[int, int]:
            active = storage.active_kek()
            if active is None:
                raise IntegrityError("the vault has no active key version", "no-active-kek")
            note.key_version = active.version
            return active.version, storage.under_keks_below(active.version)[0]

        target, total = store._run("key-rewrap-plan", None, None, count)
        done = batches = 0

        def one_batch(storage: SQLiteStorage, note: _Note) -> int:
            active = storage.active_kek()
            assert active is not None  # noqa: S101 - checked by the plan, kept by rotate
            new = store._kek(active.version)
            updates = []
            for cred_id, service, username, version, kek_version, wrapped in \
                    storage.rewrap_candidates(active.version, batch):
                place = Place(store._vault.vault_id, service, username, version)
                try:
                    rewrapped = envelope.rewrap_key(store._kek(kek_version), new, place, wrapped)
                except DecryptFailed as exc:
                    raise IntegrityError(f"service {service!r}, user {username!r}, version "
                                         f"{version}: integrity check failed; nothing in this "
                                         "batch was changed", f"rewrap-{exc.args[0]}") from None
                updates.append((active.version, rewrapped, cred_id, version))
            storage.set_wrapped_keys(updates)
            storage.count_wrap(active.version, len(updates))
            note.key_version = active.version
            note.reason = f"rewrapped-{len(updates)}"
            return len(updates)

        while True:
            n = store._run("key-rewrap", None, None, one_batch, writes=True)
            if n == 0:
                break
            done += n
            batches += 1
            if progress is not None:
                progress(done, max(total, done))
            _crash_point("rewrap-after-batch")
        # The loop ends only on a batch that found nothing left to rewrap.
        return RewrapSummary(done, batches, target, time.perf_counter() - started)

    def retire(self, below: int) -> list[int]:
        """Retire KEK versions under ``below``; refused while anything still uses them."""
        store = self._store

        def body(storage: SQLiteStorage, note: _Note) -> list[int]:
            active = storage.active_kek()
            if active is not None and below > active.version:
                raise UsageError(f"cannot retire key version {active.version}: it is the "
                                 "active one; rotate first", "retire-active")
            versions, creds = storage.under_keks_below(below)
            if versions:
                raise UsageError(f"key versions below {below} still wrap {versions} data keys "
                                 f"of {creds} credentials; run: keyring-hardened key rewrap",
                                 "retire-in-use")
            retired = storage.retire_keks_below(below)
            note.reason = "retired-" + ",".join(map(str, retired)) if retired else "none"
            return retired

        retired = store._run("key-retire", None, None, body, writes=True)
        for version in retired:
            kek = store._keks.pop(version, None)
            if kek is not None:
                kek.wipe()
        return retired

    def rekey(self, *, to: str | None = None, passphrase: str | None = None,
              kdf: str | None = None) -> str:
        """Replace the root key; ``to`` is "key file" or "passphrase" (default: keep the mode).

        For a passphrase, ``passphrase`` is the new one (at least 8
        characters) and the KDF parameters come from config, so raising
        them there upgrades the vault here. Returns a one-line summary.
        """
        from .session import MIN_PASSPHRASE_CHARS

        store = self._store
        location = store.location
        old_mode = "passphrase" if store._kdf.uses_passphrase else "key file"
        target = to or old_mode
        if target not in ("key file", "passphrase"):
            raise UsageError("rekey target must be 'key file' or 'passphrase'")
        if target == "key file" and (passphrase is not None or kdf is not None):
            raise UsageError("a new passphrase or KDF applies only to a passphrase rekey")
        params: KdfParams
        if target == "passphrase":
            if passphrase is None or len(passphrase) < MIN_PASSPHRASE_CHARS:
                raise UsageError(f"the new passphrase must be at least {MIN_PASSPHRASE_CHARS} "
                                 "characters")
            params = store.config.new_kdf_params(kdf)
        else:
            params = KdfParams.keyfile()
        with _rekey_lock(location.home, wait=False) as held:
            if not held:
                raise UsageError("another key rekey is running on this vault")
            return self._rekey_locked(old_mode, target, params, passphrase)

    def _rekey_locked(self, old_mode: str, target: str, params: KdfParams,
                      passphrase: str | None) -> str:
        store = self._store
        location = store.location
        vault_id = store._vault.vault_id
        new_file = location.pending_key_file
        generation = store._vault.generation
        journal = {"from_generation": generation, "from": old_mode, "to": target,
                   "started_at": time.time()}
        write_private(location.home / JOURNAL, [json.dumps(journal)])
        if target == "key file":
            new_file.unlink(missing_ok=True)  # a leftover of a rekey that never committed
            create_key_file(new_file)
            material = read_key_file(new_file)
        else:
            assert passphrase is not None  # noqa: S101 - checked by rekey()
            material = derive_from_passphrase(params, passphrase)
        new_root = RootKey(material, vault_id)
        _crash_point("rekey-before-commit")

        def body(storage: SQLiteStorage, note: _Note) -> None:
            vault = storage.vault()
            if vault.generation != generation:
                raise UsageError("the root key was changed by another process; open the "
                                 "vault again", "rekey-race")
            # Re-wrap the vault key and every KEK, and prove the new root key
            # unwraps each one to the same bytes before anything is committed.
            vault_key = envelope.unwrap_vault_key(store._root.wrap, vault_id, vault.vault_key)
            new_blob = envelope.wrap_vault_key(new_root.wrap, vault_id, vault_key)
            again = envelope.unwrap_vault_key(new_root.wrap, vault_id, new_blob)
            ok = hmac.compare_digest(bytes(again), bytes(vault_key))
            for record in storage.keks():
                if record.wrapped is None:
                    continue
                kek = envelope.unwrap_kek(store._root.wrap, vault_id, record.version,
                                          record.wrapped)
                blob = envelope.wrap_kek(new_root.wrap, vault_id, kek)
                check = envelope.unwrap_kek(new_root.wrap, vault_id, record.version, blob)
                ok = ok and hmac.compare_digest(bytes(check._material), bytes(kek._material))
                kek.wipe()
                check.wipe()
                storage.set_kek_wrapped(record.version, blob)
            if not ok:
                raise IntegrityError("the new root key did not unwrap every key; nothing was "
                                     "changed", "rekey-verify")
            storage.set_root(params.to_json(), new_root.verifier(vault_id), new_blob,
                             generation + 1)
            note.reason = f"{old_mode}-to-{target}".replace(" ", "-")

        try:
            store._run("key-rekey", None, None, body, writes=True)
        except BaseException:
            new_root.close()
            new_file.unlink(missing_ok=True)
            (location.home / JOURNAL).unlink(missing_ok=True)
            raise
        _crash_point("rekey-after-commit")
        if target == "key file":
            os.replace(new_file, location.key_file)
        elif old_mode == "key file":
            location.key_file.unlink(missing_ok=True)
        fsync_dir(location.home)
        _crash_point("rekey-after-rename")
        (location.home / JOURNAL).unlink(missing_ok=True)
        store._root.close()
        store._root = new_root
        store._kdf = params
        with store._guard() as storage:
            store._vault = storage.vault()
        return (f"root key replaced: {_describe(target)} opens this vault now "
                f"({params.describe()}); the old one no longer does")
