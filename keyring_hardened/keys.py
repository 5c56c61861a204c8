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

import hmac
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from . import audit, envelope, state
from ._files import fsync_dir, write_private
from ._seams import crash_point as _crash_point
from .envelope import DecryptFailed, Place
from .errors import IntegrityError, UsageError
from .port import Storage, VersionRow
from .rekeyjournal import JOURNAL, _rekey_lock, recover_interrupted_rekey

# Re-exported: their home before the rekey journal had its own module.
from .rekeyjournal import LOCK as LOCK
from .rekeyjournal import _journal_generation as _journal_generation
from .rekeyjournal import _opens as _opens
from .rootkey import (
    KdfParams,
    RootKey,
    VaultKeys,
    create_key_file,
    derive_from_passphrase,
    read_key_file,
)
from .session import _version_digest
from .state import bucket_of

if TYPE_CHECKING:
    from .operation import _Note
    from .session import Session

__all__ = ["KeyInfo", "KeyManager", "RewrapSummary", "recover_interrupted_rekey"]


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


def _describe(mode: str) -> str:
    return "the new key file" if mode == "key file" else "the new passphrase"


class KeyManager:
    """Key operations of one unlocked :class:`~keyring_hardened.store.Store`."""

    def __init__(self, store: Session) -> None:
        self._store = store

    def versions(self) -> list[KeyInfo]:
        """Every KEK version: state, creation time, data keys it wraps, wrap count."""
        def body(storage: Storage, note: _Note) -> list[KeyInfo]:
            in_use = storage.keys_in_use()
            return [KeyInfo(k.version, k.state, k.created_at, in_use.get(k.version, 0),
                            k.wrap_count) for k in self._store._meta(storage).keks]

        return self._store._run("key-list", None, None, body)

    def rotate(self) -> int:
        """Add a KEK version and make it active; returns its number."""
        store = self._store

        def body(storage: Storage, note: _Note) -> int:
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

        def count(storage: Storage, note: _Note) -> tuple[int, int]:
            active = store._meta(storage).active
            note.key_version = active.version
            return active.version, storage.under_keks_below(active.version)[0]

        target, total = store._run("key-rewrap-plan", None, None, count)
        done = batches = 0

        def one_batch(storage: Storage, note: _Note) -> int:
            active = store._meta(storage).active
            new = store._kek(active.version)
            found = storage.rewrap_candidates(active.version, batch)
            # Only rows of checked heads, whose version lists are checked whole,
            # are re-wrapped; everything is read in a few queries per batch.
            buckets = store._buckets(storage, store._state(),
                                     {bucket_of(service) for _, service, _ in found})
            heads = {h.id: h for hs in buckets.values() for h in hs}
            versions = storage.versions_of({head_id for head_id, _, _ in found})
            for head_id, rows in versions.items():
                if head_id not in heads:
                    raise IntegrityError("a stored version belongs to no credential "
                                         "(tampered?)", "state-version")
                store._check_versions(heads[head_id], rows)
            moved: dict[tuple[int, int], VersionRow] = {}
            for head_id, _service, row in found:
                head = heads[head_id]
                store._checked(head, row)
                place = Place(store._vault.vault_id, head.service, head.username, row.version)
                try:
                    rewrapped = envelope.rewrap_key(store._kek(row.kek_version), new, place,
                                                    row.wrapped_key)
                except DecryptFailed as exc:
                    raise IntegrityError(f"service {head.service!r}, user {head.username!r}, "
                                         f"version {row.version}: integrity check failed; "
                                         "nothing in this batch was changed",
                                         f"rewrap-{exc.args[0] if exc.args else 'tag'}") from None
                after = row._replace(kek_version=active.version, wrapped_key=rewrapped)
                moved[(head_id, row.version)] = after._replace(digest=_version_digest(after))
            storage.set_wrapped_keys((r.kek_version, r.wrapped_key, r.digest or b"", head_id,
                                      r.version) for (head_id, _), r in moved.items())
            _crash_point("rewrap-mid-batch")
            storage.set_versions_digests(
                (state.versions_digest([(r.version, moved.get((head_id, r.version), r).digest
                                         or b"") for r in rows]), head_id)
                for head_id, rows in versions.items())
            for head_id in versions:
                store._touch(heads[head_id].service)
            store._count_wrap(storage, active.version, len(moved))
            note.key_version = active.version
            note.reason = f"rewrapped-{len(moved)}"
            return len(moved)

        while True:
            n = store._run("key-rewrap", None, None, one_batch, writes=True)
            if n == 0:
                break
            done += n
            batches += 1
            if progress is not None:
                progress(done, max(total, done))
            _crash_point("rewrap-after-batch")
        # Refresher specs are sealed like values: they move to the active KEK too.
        from .refresh import rewrap_specs

        done += rewrap_specs(store)
        # The loop ends only on a batch that found nothing left to rewrap.
        return RewrapSummary(done, batches, target, time.perf_counter() - started)

    def retire(self, below: int) -> list[int]:
        """Retire KEK versions under ``below``; refused while anything still uses them."""
        store = self._store

        def body(storage: Storage, note: _Note) -> list[int]:
            active = store._meta(storage).active
            if below > active.version:
                raise UsageError(f"cannot retire key version {active.version}: it is the "
                                 "active one; rotate first", "retire-active")
            versions, creds = storage.under_keks_below(below)
            from .refresh import specs_below

            specs = specs_below(storage, below)
            if specs:
                raise UsageError(f"key versions below {below} still seal {specs} refresher "
                                 "specs; run: keyring-hardened key rewrap", "retire-in-use")
            if versions:
                raise UsageError(f"key versions below {below} still wrap {versions} data keys "
                                 f"of {creds} credentials; run: keyring-hardened key rewrap",
                                 "retire-in-use")
            retired = [k.version for k in store._meta(storage).keks
                       if k.version < below and k.state != "retired"]
            for version in retired:
                storage.retire_kek(version)
            if retired:
                store._touch_meta()
            note.reason = "retired-" + ",".join(map(str, retired)) if retired else "none"
            return retired

        retired = store._run("key-retire", None, None, body, writes=True)
        for version in retired:
            kek = store._keks.pop(version, None)
            if kek is not None:
                kek.wipe()
        if retired:
            store._checkpoint("retire")
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
        """Replace the root key, the vault key and the active KEK, in one transaction.

        Revocation: the new vault key starts a new epoch (the rekey event is
        its first, MACed under it), and a new KEK wrapped under the new root
        key becomes active. So a holder of the old root key, even with an old
        copy of the vault, cannot read what is written afterwards, nor forge
        the state or an event that verifies. Older KEKs and the old vault key
        stay readable to the new root key only (history and old events).
        Every re-wrapped key is unwrapped again with the new root key and
        compared before anything commits.
        """
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
            if passphrase is None:  # pragma: no cover - checked by rekey()
                raise UsageError("a new passphrase is needed")
            material = derive_from_passphrase(params, passphrase)
        new_root = RootKey(material, vault_id)
        _crash_point("rekey-before-commit")
        made: list[VaultKeys] = []

        def body(storage: Storage, note: _Note) -> None:
            meta = store._meta(storage)
            vault = meta.vault
            if vault.generation != generation:
                raise UsageError("the root key was changed by another process; open the "
                                 "vault again", "rekey-race")
            old_vault_key = envelope.unwrap_vault_key(store._root.wrap, vault_id, vault.vault_key)
            new_blob, new_material = envelope.new_vault_key(new_root.wrap, vault_id)
            check = envelope.unwrap_vault_key(new_root.wrap, vault_id, new_blob)
            ok = hmac.compare_digest(bytes(check), bytes(new_material))
            envelope.wipe(check)
            new_keys = VaultKeys(new_material, vault_id)
            made.append(new_keys)
            # Earlier epochs' vault keys, now wrapped under the new one.
            past = [(e, envelope.wrap_past_vault_key(
                new_keys.past, vault_id, e, store._past_material(e, blob)))
                for e, blob in meta.past_keys]
            past.append((generation, envelope.wrap_past_vault_key(
                new_keys.past, vault_id, generation, old_vault_key)))
            envelope.wipe(old_vault_key)
            storage.set_past_keys(past)
            for record in meta.keks:
                if record.wrapped is None:
                    continue
                kek = envelope.unwrap_kek(store._root.wrap, vault_id, record.version,
                                          record.wrapped)
                blob = envelope.wrap_kek(new_root.wrap, vault_id, kek)
                again = envelope.unwrap_kek(new_root.wrap, vault_id, record.version, blob)
                ok = ok and hmac.compare_digest(bytes(again._material), bytes(kek._material))
                kek.wipe()
                again.wipe()
                storage.set_kek_wrapped(record.version, blob)
            # Verify before commit: the new root key must open every key it now wraps.
            if not ok:
                raise IntegrityError("the new root key did not unwrap every key; nothing was "
                                     "changed", "rekey-verify")
            storage.set_root(params.to_json(), new_root.verifier(vault_id), new_blob,
                             generation + 1)
            store._touch_meta()
            # A new active KEK, under the new root key only: what is written
            # from now on is out of the old root key's reach.
            note.key_version = store._rotate_in(storage, store._clock(), "rekey", record=False,
                                                root=new_root)
            note.reason = f"{old_mode}-to-{target}".replace(" ", "-")

        def finish(storage: Storage, note: _Note) -> audit.Event:
            store._state().meta = None  # the vault record changed; let the commit re-read it
            return store._append(storage, "key-rekey", None, None, None, note.key_version,
                                 note.reason, keys=made[-1], epoch=generation + 1)

        try:
            store._run("key-rekey", None, None, body, writes=True, finish=finish)
        except BaseException:
            new_root.close()
            for keys in made:
                keys.close()
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
        for keys in made[:-1]:
            keys.close()
        store._adopt(new_root, made[-1], params)
        store._checkpoint("rekey")
        return (f"root key replaced: {_describe(target)} opens this vault now "
                f"({params.describe()}); the old one no longer does, and cannot read or "
                "forge what is written from now on")
