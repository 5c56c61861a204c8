"""The audit chain: pure functions of events, keys and ``now``.

Every event carries ``mac = HMAC-SHA256(audit key, previous mac || canonical
encoding)``. The audit key is derived with HKDF from the vault key of the
event's *epoch* (the vault key is random, stored only wrapped under the
root key, and replaced by every ``key rekey``), so nobody without it can
forge, edit, insert, reorder or delete an event without :func:`verify`
noticing. Sequence numbers are contiguous, so a deleted event is named by
the gap it leaves. Each event also carries the vault's state root (see
:mod:`keyring_hardened.state`), so the newest event pins every row of the
vault, and a cut of the trail's tail that drops a write contradicts the rows.

The canonical encoding is compact JSON of a fixed field list, so other tools
can recompute a chain from an export given the key:
``[seq, ts_us, actor, op, service, username, outcome, key_version, reason,
epoch, root_hex]`` (format 2). Events written by keyring-hardened 0.1 have
no epoch and no root, and are encoded without those two fields (format 1).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

__all__ = [
    "GENESIS",
    "OUTCOMES",
    "Event",
    "canonical",
    "chain_mac",
    "hash_identifier",
    "verify",
]

#: The "previous mac" of the first event of a vault.
GENESIS = bytes(32)

#: What an event's outcome may be: ok, or the kind of the error that ended it.
OUTCOMES = ("ok", "not-found", "usage", "config", "integrity", "denied", "rate-limited",
            "locked", "expired", "storage")


class Event(NamedTuple):
    """One audit event. Never holds a secret, a ciphertext or key material."""

    seq: int
    ts_us: int
    actor: str
    op: str
    service: str | None
    username: str | None
    outcome: str
    key_version: int | None
    reason: str | None
    mac: bytes = b""
    #: The vault-key epoch whose audit key made ``mac`` (None: a 0.1 event).
    epoch: int | None = None
    #: The vault's state root after this event (None: a 0.1 event).
    root: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """The export form: every field, the time as ISO 8601 too, the mac in hex."""
        import time

        secs, micros = divmod(self.ts_us, 1_000_000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}Z"
        return {"seq": self.seq, "time": stamp, "ts_us": self.ts_us, "actor": self.actor,
                "op": self.op, "service": self.service, "username": self.username,
                "outcome": self.outcome, "key_version": self.key_version,
                "reason": self.reason, "mac": self.mac.hex(), "epoch": self.epoch,
                "root": self.root.hex() if self.root is not None else None}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Event:
        """Read the export form back; raises ValueError, KeyError or TypeError if malformed."""
        ts_us = doc["ts_us"]
        seq = doc["seq"]
        key_version = doc["key_version"]
        for name, v in (("seq", seq), ("ts_us", ts_us)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(name)
        if key_version is not None and not isinstance(key_version, int):
            raise TypeError("key_version")
        epoch, root = doc.get("epoch"), doc.get("root")
        if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
            raise TypeError("epoch")
        if root is not None and not isinstance(root, str):
            raise TypeError("root")
        strings = [doc[k] for k in ("actor", "op", "outcome")]
        optional = [doc[k] for k in ("service", "username", "reason")]
        if not all(isinstance(s, str) for s in strings) or not all(
                s is None or isinstance(s, str) for s in optional):
            raise TypeError("text fields")
        return cls(seq, ts_us, doc["actor"], doc["op"], doc["service"], doc["username"],
                   doc["outcome"], key_version, doc["reason"], bytes.fromhex(doc["mac"]),
                   epoch, bytes.fromhex(root) if root is not None else None)


_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def canonical(event: Event) -> bytes:
    """The bytes the mac covers: compact JSON of every field but the mac.

    Format 2 (epoch and root present) appends ``epoch`` and the root in hex
    to the nine fields of format 1. Blanking the epoch or root of a format-2
    event to pass it off as format 1 changes the bytes, so its mac fails.
    """
    fields: list[object] = list(event[:9])
    if event.root is not None or event.epoch is not None:
        fields += [event.epoch, event.root.hex() if event.root is not None else None]
    return _ENCODE(fields).encode("utf-8")


def chain_mac(key: bytes | bytearray, previous: bytes, event: Event) -> bytes:
    """The mac of ``event`` following an event whose mac is ``previous``."""
    return hmac.digest(bytes(key), previous + canonical(event), "sha256")


class VerifyResult(NamedTuple):
    """The outcome of :func:`verify`."""

    ok: bool
    verified: int
    head_seq: int
    head_mac: bytes
    first_bad: int | None
    problem: str | None


#: Operations that may move the chain to the next vault-key epoch.
EPOCH_CHANGES = ("key-rekey", "upgrade")


def verify(keys: Mapping[int, bytes | bytearray], events: Iterable[Event], anchor_seq: int = 0,
           anchor_mac: bytes = GENESIS, legacy_epoch: int | None = None,
           anchor_epoch: int | None = None) -> VerifyResult:
    """Check a chain that continues from ``(anchor_seq, anchor_mac)``.

    ``keys`` maps each vault-key epoch to its audit key. Epochs never go
    back, and move forward by one only at a rekey (or the upgrade of a 0.1
    vault); format-1 events (no epoch) may only come before format-2 ones
    and use the key of ``legacy_epoch``. Returns at the first bad event:
    its sequence number and what is wrong (a gap means deleted events; a
    bad mac means an edited, inserted or reordered one).
    """
    prev_seq, prev_mac, count = anchor_seq, anchor_mac, 0
    epoch = anchor_epoch
    seen_v2 = False
    raw = {e: bytes(k) for e, k in keys.items()}
    for event in events:
        problem: str | None = None
        if event.seq != prev_seq + 1:
            if event.seq <= prev_seq:
                problem = f"event {event.seq} is out of order after {prev_seq}"
            else:
                problem = f"events {prev_seq + 1} to {event.seq - 1} are missing"
            return VerifyResult(False, count, prev_seq, prev_mac, event.seq, problem)
        if event.epoch is None:
            use = legacy_epoch
            if seen_v2 or event.root is not None:
                problem = f"event {event.seq} lacks an epoch (edited?)"
        else:
            use = event.epoch
            if event.root is None:
                problem = f"event {event.seq} lacks a state root (edited?)"
            elif epoch is not None and event.epoch != epoch and not (
                    event.epoch == epoch + 1 and event.op in EPOCH_CHANGES):
                problem = (f"event {event.seq} changes the key epoch from {epoch} to "
                           f"{event.epoch} outside a rekey")
            seen_v2 = True
        key = raw.get(use) if use is not None else None
        if problem is None and key is None:
            problem = f"event {event.seq} names key epoch {use}, which this vault does not hold"
        if problem is None and key is not None:
            expected = hmac.digest(key, prev_mac + canonical(event), "sha256")
            # Constant time, like every MAC comparison here.
            if not hmac.compare_digest(expected, event.mac):
                problem = (f"event {event.seq} does not match its mac (edited, inserted "
                           "or reordered)")
        if problem is not None:
            return VerifyResult(False, count, prev_seq, prev_mac, event.seq, problem)
        epoch = event.epoch if event.epoch is not None else use
        prev_seq, prev_mac, count = event.seq, event.mac, count + 1
    return VerifyResult(True, count, prev_seq, prev_mac, None, None)


_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def parse_since(text: str, now: float) -> float:
    """When ``--since`` starts, as epoch seconds.

    Accepts a duration back from ``now`` (``90m``, ``3d``), an ISO 8601 date
    or date-time (local time unless it carries ``Z`` or an offset), a weekday
    name (its most recent midnight, local time, today included), ``today``
    and ``yesterday``.
    """
    import datetime as dt

    from .errors import UsageError
    from .humantime import parse_duration

    word = text.strip().lower()
    local_now = dt.datetime.fromtimestamp(now).astimezone()
    midnight = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
    if word in ("today", "yesterday"):
        return (midnight - dt.timedelta(days=word == "yesterday")).timestamp()
    if word in _WEEKDAYS:
        back = (local_now.weekday() - _WEEKDAYS.index(word)) % 7
        return (midnight - dt.timedelta(days=back)).timestamp()
    if word and word[-1] in "smhdw" and word[0].isdigit():
        return now - parse_duration(word, "since")
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError("since: expected a date (2026-11-24), a date-time, a weekday name, "
                         "or a duration such as 3d") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def hash_identifier(key: bytes | bytearray, name: str) -> str:
    """A keyed hash of a service or username, for ``hmac_identifiers``."""
    import base64

    digest = hmac.new(bytes(key), name.encode("utf-8"), hashlib.sha256).digest()[:16]
    return "h:" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def matches(value: str | None, pattern: str | None) -> bool:
    """Glob match for ``audit show`` filters (None pattern matches anything)."""
    if pattern is None:
        return True
    import fnmatch

    return value is not None and fnmatch.fnmatchcase(value, pattern)


def filtered(events: Iterable[Event], *, since_us: int | None = None, service: str | None = None,
             actor: str | None = None, op: str | None = None) -> Iterator[Event]:
    """Events that pass every given filter."""
    for e in events:
        if since_us is not None and e.ts_us < since_us:
            continue
        if matches(e.service, service) and matches(e.actor, actor) and matches(e.op, op):
            yield e
