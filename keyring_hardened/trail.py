"""The audit trail's operations: verify, show, export, checkpoint, prune.

Each is itself an audited operation of the store, run in one transaction.
Exports and archives are JSON lines: a header line, then one event a line
with its chain fields, so a copy can be verified away from the vault by
anyone holding the vault's keys. The header (format 2) names the vault, the
anchor (the seq and mac the first event follows) and the last event's seq
and mac, and carries an HMAC under the audit key over all of it, so a file
cut at either end, or with an edited header, fails ``verify --file``.
"""

from __future__ import annotations

import hmac
import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import audit
from ._files import write_private
from .audit import Event, VerifyResult
from .errors import IntegrityError, UsageError

if TYPE_CHECKING:
    from .operation import _Note
    from .port import Storage
    from .session import Session

__all__ = ["AuditTrail"]

FORMAT = "keyring-hardened audit v1"
#: Exports and archives whose header authenticates both ends.
FORMAT_2 = "keyring-hardened audit v2"
_HEADER_FIELDS = ("format", "vault_id", "anchor_seq", "anchor_mac", "last_seq", "last_mac",
                  "count", "epoch")


def _header_mac(key: bytes | bytearray, header: Mapping[str, Any]) -> str:
    """The HMAC over a format-2 header's fields, in a fixed order."""
    data = json.dumps([header[k] for k in _HEADER_FIELDS], separators=(",", ":"))
    return hmac.digest(bytes(key), b"keyring-hardened/audit-file\x00" + data.encode(),
                       "sha256").hex()


#: The largest export or archive read back (about four million events).
AUDIT_FILE_LIMIT = 1 << 30


def _write_jsonl(path: Path, header: dict[str, Any], events: Iterable[Event]) -> int:
    """Write header and events to ``path`` (0600, replaced atomically); returns the count."""
    lines = itertools.chain([json.dumps(header)],
                            (json.dumps(e.to_json(), ensure_ascii=False) for e in events))
    return write_private(path, lines) - 1


def read_jsonl(path: Path) -> tuple[dict[str, Any], list[Event]]:
    """Read an export or archive; a malformed file is an integrity error naming the line."""
    from ._files import read_trusted

    try:
        # No link followed, no FIFO hang, no /dev/zero: a capped regular file
        # that nobody else can write (others may read an export).
        lines = read_trusted(path, "audit file", AUDIT_FILE_LIMIT,
                             private=False).decode("utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"audit file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"audit file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"audit file {path} cannot be read: not UTF-8 text") from None
    try:
        header = json.loads(lines[0]) if lines else None
        if not isinstance(header, dict) or header.get("format") not in (FORMAT, FORMAT_2):
            raise ValueError
        bytes.fromhex(header["anchor_mac"])
        if not isinstance(header["anchor_seq"], int) or not isinstance(header["vault_id"], str):
            raise TypeError
        if header["format"] == FORMAT_2:
            bytes.fromhex(header["last_mac"])
            bytes.fromhex(header["header_mac"])
            for name in ("last_seq", "count", "epoch"):
                if not isinstance(header[name], int) or isinstance(header[name], bool):
                    raise TypeError(name)
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"audit file {path}: line 1 is not a {FORMAT_2} header") from None
    events = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            events.append(Event.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"audit file {path}: line {n} is not an audit event") from None
    return header, events


class AuditTrail:
    """The audit operations of one unlocked :class:`~keyring_hardened.store.Store`."""

    def __init__(self, store: Session) -> None:
        self._store = store

    def _keys(self, storage: Storage) -> dict[int, bytearray]:
        return self._store._audit_keys(self._store._meta(storage))

    def _header(self, storage: Storage, anchor_seq: int, anchor_mac: bytes,
                events: list[Event]) -> dict[str, Any]:
        """A format-2 header whose HMAC authenticates both ends of ``events``."""
        last_seq, last_mac = (events[-1].seq, events[-1].mac) if events \
            else (anchor_seq, anchor_mac)
        header: dict[str, Any] = {
            "format": FORMAT_2, "vault_id": self._store._vault.vault_id.hex(),
            "anchor_seq": anchor_seq, "anchor_mac": anchor_mac.hex(), "last_seq": last_seq,
            "last_mac": last_mac.hex(), "count": len(events), "epoch": self._store._epoch}
        header["header_mac"] = _header_mac(self._store._vkeys.audit_key, header)
        return header

    def _check_table(self, storage: Storage) -> VerifyResult:
        """The whole chain, and its ends: the newest event's state root against every row."""
        keys = self._keys(storage)
        anchor_seq, anchor_mac = storage.audit_anchor()
        result = audit.verify(keys, storage.events(after=anchor_seq), anchor_seq, anchor_mac,
                              legacy_epoch=min(keys))
        if not result.ok:
            return result
        if result.verified == 0:
            return result._replace(ok=False, first_bad=anchor_seq + 1,
                                   problem="the trail is empty although the vault exists "
                                           "(its events were removed)")
        # The anchor moves only with a prune, and each prune is chained:
        # an anchor ahead of the last recorded prune means events were cut.
        pruned = _last_prune(storage)
        if anchor_seq != pruned:
            return result._replace(ok=False, first_bad=anchor_seq + 1,
                                   problem=f"events {pruned + 1} to {anchor_seq} were "
                                           "removed without a recorded prune")
        # The trail's newest event pins the whole state: a row written after
        # a cut of the trail's tail, or written back, contradicts it.
        try:
            self._store._full_check(storage)
        except IntegrityError:
            return result._replace(ok=False, first_bad=result.head_seq + 1,
                                   problem="the vault's rows do not match the state its newest "
                                           "event records (rows written back or deleted, or "
                                           "the trail's newest events removed)")
        return result

    def verify(self, checkpoint: dict[str, Any] | None = None) -> VerifyResult:
        """Verify the chain in the vault, its ends, and a checkpoint if given.

        Raises :class:`IntegrityError` naming the first bad sequence number.
        """
        def body(storage: Storage, note: _Note) -> VerifyResult:
            result = self._check_table(storage)
            _raise_if_bad(result)
            if checkpoint is not None:
                _check_checkpoint(checkpoint, self._store._vault.vault_id.hex(), storage)
                note.reason = f"checkpoint-{checkpoint['seq']}"
            return result

        return self._store._run("audit-verify", None, None, body)

    def verify_file(self, path: Path, checkpoint: dict[str, Any] | None = None) -> VerifyResult:
        """Verify an export or archive file with this vault's keys, both ends included."""
        header, events = read_jsonl(path)

        def body(storage: Storage, note: _Note) -> VerifyResult:
            note.reason = "file"
            if header["vault_id"] != self._store._vault.vault_id.hex():
                raise IntegrityError(f"audit file {path} belongs to another vault", "vault-id")
            keys = self._keys(storage)
            anchor_seq = header["anchor_seq"]
            if header["format"] == FORMAT_2:
                key = keys.get(header["epoch"])
                if key is None or not hmac.compare_digest(_header_mac(key, header),
                                                          header["header_mac"]):
                    raise IntegrityError(f"audit file {path}: its header does not match its "
                                         "mac (edited?)", "audit-file-header")
            result = audit.verify(keys, events, anchor_seq, bytes.fromhex(header["anchor_mac"]),
                                  legacy_epoch=min(keys))
            _raise_if_bad(result)
            if header["format"] != FORMAT_2:
                raise IntegrityError(f"audit file {path}: the chain of its {result.verified} "
                                     "events is intact, but its header (written by "
                                     "keyring-hardened 0.1) does not authenticate where the "
                                     "file starts and ends; export it again",
                                     "audit-file-ends")
            if (result.head_seq, result.head_mac.hex(), result.verified) != (
                    header["last_seq"], header["last_mac"], header["count"]):
                raise IntegrityError(f"audit file {path}: it ends at event {result.head_seq}, "
                                     f"but its header says {header['last_seq']} (cut short?)",
                                     "audit-file-truncated")
            if checkpoint is not None:
                _check_checkpoint_events(checkpoint, header["vault_id"], events)
            return result

        return self._store._run("audit-verify", None, None, body)

    def show(self, *, since: float | None = None, service: str | None = None,
             actor: str | None = None, op: str | None = None,
             limit: int | None = None) -> list[Event]:
        """Events matching the filters (globs), newest first, at most ``limit``.

        With ``hmac_identifiers`` on, ``service`` must be an exact name: it
        is hashed the way the trail stores it.
        """
        if limit is not None and limit < 1:
            raise UsageError("limit must be a positive integer")
        pattern = service
        if service is not None and self._store.config.audit_hmac_identifiers:
            pattern = self._store._ident(service)

        def body(storage: Storage, note: _Note) -> list[Event]:
            since_us = int(since * 1_000_000) if since is not None else None
            found = []
            for event in audit.filtered(storage.events(newest_first=True), since_us=since_us,
                                        service=pattern, actor=actor, op=op):
                found.append(event)
                if limit is not None and len(found) >= limit:
                    break
            return found

        return self._store._run("audit-show", None, None, body)

    def export(self, path: Path) -> int:
        """Write every kept event, with chain fields, to ``path``; returns the count."""
        def body(storage: Storage, note: _Note) -> int:
            anchor_seq, anchor_mac = storage.audit_anchor()
            note.reason = _path_text(path)
            events = list(storage.events(after=anchor_seq))
            return _write_jsonl(path, self._header(storage, anchor_seq, anchor_mac, events),
                                events)

        return self._store._run("audit-export", None, None, body)

    def checkpoint(self, path: Path | None = None) -> dict[str, Any]:
        """The head of the chain (seq and mac) to keep somewhere else; written to ``path``.

        The file is written inside the operation, so a file that cannot be
        written fails the operation and its audit event says so.
        """
        def body(storage: Storage, note: _Note) -> dict[str, Any]:
            seq, mac = storage.audit_head()
            doc = {"format": FORMAT, "vault_id": self._store._vault.vault_id.hex(),
                   "seq": seq, "mac": mac.hex()}
            if path is not None:
                write_private(path, [json.dumps(doc)])
            return doc

        return self._store._run("audit-checkpoint", None, None, body)

    def prune(self, archive: Path, keep: float | None = None) -> int:
        """Move events older than ``keep`` seconds (config ``[audit] keep``) to ``archive``.

        The archive holds the moved events with their chain fields; the
        table's anchor becomes the newest archived event, and a chained
        ``audit-prune`` event records it, so verification spans both.
        Returns how many events moved.
        """
        window = keep if keep is not None else self._store.config.audit_keep
        if window is None:
            raise UsageError("no retention set: give --keep or set [audit] keep in config")

        def body(storage: Storage, note: _Note) -> int:
            result = self._check_table(storage)
            _raise_if_bad(result)  # never archive a chain that does not verify
            cutoff = int((self._store._clock() - window) * 1_000_000)
            through = storage.events_before(cutoff)
            anchor_seq, anchor_mac = storage.audit_anchor()
            if through <= anchor_seq:
                note.reason = f"through-{anchor_seq}"
                return 0
            self._store._meta(storage)  # the anchor is part of the checked state
            moved = list(storage.events(after=anchor_seq, through=through))
            _write_jsonl(archive, self._header(storage, anchor_seq, anchor_mac, moved), moved)
            storage.drop_events_through(through, moved[-1].mac)
            self._store._touch_meta()
            note.reason = f"through-{through}"
            return len(moved)

        moved = self._store._run("audit-prune", None, None, body, writes=True)
        if moved:
            self._store._checkpoint("prune")
        return moved


def _path_text(path: Path) -> str:
    """A path as the trail records it; a name that is not UTF-8 is refused, not mangled."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the file name must be UTF-8 text") from None
    return text


def _last_prune(storage: Storage) -> int:
    """The seq through which the newest recorded prune archived (0 if none).

    The event is chained, so its reason was written by this code; it is
    still parsed strictly, so that no content of the trail can crash a verify.
    """
    event = storage.last_event("audit-prune")
    if event is None:
        return 0
    digits = (event.reason or "").removeprefix("through-")
    if not (event.reason or "").startswith("through-") or not digits.isdigit() \
            or len(digits) > 18:
        raise IntegrityError(f"audit event {event.seq} is a prune without a valid range",
                             f"audit-chain-{event.seq}")
    return int(digits)


def _raise_if_bad(result: VerifyResult) -> None:
    if not result.ok:
        raise IntegrityError(f"audit chain broken at event {result.first_bad}: {result.problem}",
                             f"audit-chain-{result.first_bad}")


def _checkpoint_fields(checkpoint: dict[str, Any], vault_id: str) -> tuple[int, bytes]:
    try:
        if checkpoint.get("format") != FORMAT:
            raise ValueError
        seq, mac = int(checkpoint["seq"]), bytes.fromhex(checkpoint["mac"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError("checkpoint is not a keyring-hardened audit checkpoint") from None
    if checkpoint.get("vault_id") != vault_id:
        raise UsageError("checkpoint belongs to another vault")
    return seq, mac


def _check_checkpoint(checkpoint: dict[str, Any], vault_id: str,
                      storage: Storage) -> None:
    seq, mac = _checkpoint_fields(checkpoint, vault_id)
    head_seq, _ = storage.audit_head()
    anchor_seq, anchor_mac = storage.audit_anchor()
    if seq == anchor_seq and mac == anchor_mac:
        return
    if seq < anchor_seq:
        raise UsageError(f"the checkpoint names event {seq}, which was pruned into an archive; "
                         "verify the archive with --file")
    found = next(iter(storage.events(after=seq - 1, through=seq)), None)
    _compare_checkpoint(seq, mac, found, head_seq)


def _check_checkpoint_events(checkpoint: dict[str, Any], vault_id: str,
                             events: list[Event]) -> None:
    seq, mac = _checkpoint_fields(checkpoint, vault_id)
    found = next((e for e in events if e.seq == seq), None)
    _compare_checkpoint(seq, mac, found, events[-1].seq if events else 0)


def _compare_checkpoint(seq: int, mac: bytes, found: Event | None, head_seq: int) -> None:
    if found is None:
        raise IntegrityError(f"audit chain broken at event {head_seq + 1}: the checkpoint names "
                             f"event {seq} but the chain ends at {head_seq} (truncated)",
                             "audit-truncated")
    if found.mac != mac:
        raise IntegrityError(f"audit chain broken at event {seq}: it differs from the "
                             "checkpoint", "audit-checkpoint-mismatch")
