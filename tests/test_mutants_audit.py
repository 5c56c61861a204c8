"""Tests that kill mutants of audit.py which the rest of the suite let live.

Macs and hashes are recomputed here from the format documented in
audit.py (HMAC-SHA256 over the previous mac and compact JSON), with the
standard library, not with the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from keyring_hardened import audit
from keyring_hardened.audit import Event

K1, K2 = b"1" * 32, b"2" * 32
ROOT = bytes(range(32))


def _doc_mac(key: bytes, prev: bytes, e: Event) -> bytes:
    fields: list[object] = [e.seq, e.ts_us, e.actor, e.op, e.service, e.username, e.outcome,
                            e.key_version, e.reason]
    if e.epoch is not None or e.root is not None:
        fields += [e.epoch, e.root.hex() if e.root is not None else None]
    data = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
    return hmac.new(key, prev + data, hashlib.sha256).digest()


def _ev(seq: int, epoch: int | None, op: str, key: bytes, prev: bytes,
        root: bytes | None = ROOT) -> Event:
    e = Event(seq, seq * 10, "actor", op, None, None, "ok", None, None, b"", epoch,
              root if epoch is not None else None)
    return e._replace(mac=_doc_mac(key, prev, e))


def test_genesis_is_32_zero_bytes() -> None:
    assert bytes(32) == audit.GENESIS


def test_chain_mac_is_hmac_sha256_over_previous_mac_and_canonical_json() -> None:
    e = Event(3, 44, "bob", "write", "svc", "ünï", "ok", 2, "why", b"", 5, ROOT)
    assert audit.chain_mac(bytearray(K1), b"p" * 32, e) == _doc_mac(K1, b"p" * 32, e)
    legacy = Event(3, 44, "bob", "write", None, None, "denied", None, None)
    assert audit.chain_mac(K1, audit.GENESIS, legacy) == _doc_mac(K1, audit.GENESIS, legacy)


def test_canonical_keeps_an_epoch_or_a_root_given_alone() -> None:
    epoch_only = Event(1, 2, "a", "read", None, None, "ok", None, None, b"", 3, None)
    assert audit.canonical(epoch_only) == b'[1,2,"a","read",null,null,"ok",null,null,3,null]'
    root_only = Event(1, 2, "a", "read", None, None, "ok", None, None, b"", None, b"\xab")
    assert audit.canonical(root_only) == b'[1,2,"a","read",null,null,"ok",null,null,null,"ab"]'


def test_export_form_round_trips_a_format_2_event() -> None:
    e = Event(9, 1_000_001, "a", "read", "s", "u", "ok", 3, "r", b"\x02" * 32, 4, ROOT)
    doc = e.to_json()
    assert doc["root"] == ROOT.hex()
    assert doc["epoch"] == 4
    assert doc["mac"] == "02" * 32
    assert doc["time"] == "1970-01-01T00:00:01.000001Z"
    assert Event.from_json(doc) == e
    legacy = Event(1, 0, "a", "read", None, None, "ok", None, None, b"")
    assert legacy.to_json()["root"] is None
    assert Event.from_json(legacy.to_json()) == legacy


@pytest.mark.parametrize(("key", "value"), [
    ("seq", True), ("ts_us", False), ("ts_us", 1.5), ("epoch", True), ("epoch", "1"),
    ("root", 5), ("key_version", 1.0), ("op", None), ("outcome", 1), ("username", 2),
    ("reason", b"x"),
])
def test_export_form_refuses_wrong_types(key: str, value: object) -> None:
    doc = Event(1, 5, "a", "read", "s", "u", "ok", 1, "r", b"\x01", 1, ROOT).to_json()
    with pytest.raises(TypeError):
        Event.from_json({**doc, key: value})


def test_verify_continues_from_an_anchor_and_reports_the_head() -> None:
    anchor = b"a" * 32
    e6 = _ev(6, 1, "read", K1, anchor)
    e7 = _ev(7, 1, "write", K1, e6.mac)
    result = audit.verify({1: K1}, [e6, e7], 5, anchor)
    assert result == audit.VerifyResult(True, 2, 7, e7.mac, None, None)
    # the same events do not continue from genesis
    wrong = audit.verify({1: K1}, [e6, e7])
    assert (wrong.ok, wrong.verified, wrong.head_seq, wrong.head_mac, wrong.first_bad) == (
        False, 0, 0, audit.GENESIS, 6)


def test_verify_names_the_first_missing_event() -> None:
    e1 = _ev(1, 1, "init", K1, audit.GENESIS)
    e4 = _ev(4, 1, "read", K1, e1.mac)
    result = audit.verify({1: K1}, [e1, e4])
    assert (result.ok, result.verified, result.head_seq, result.head_mac, result.first_bad) == (
        False, 1, 1, e1.mac, 4)
    assert "2 to 3 are missing" in (result.problem or "")


def test_verify_reports_a_bad_mac_at_the_event_with_its_predecessor_as_head() -> None:
    e1 = _ev(1, 1, "init", K1, audit.GENESIS)
    e2 = _ev(2, 1, "read", K1, e1.mac)._replace(actor="mallory")
    result = audit.verify({1: K1}, [e1, e2])
    assert (result.ok, result.verified, result.head_seq, result.head_mac, result.first_bad) == (
        False, 1, 1, e1.mac, 2)
    assert "mac" in (result.problem or "")


def test_an_upgrade_may_start_the_next_epoch_but_not_skip_one() -> None:
    e1 = _ev(1, 1, "init", K1, audit.GENESIS)
    up = _ev(2, 2, "upgrade", K2, e1.mac)
    assert audit.verify({1: K1, 2: K2}, [e1, up]).ok
    k3 = b"3" * 32
    skip = _ev(2, 3, "key-rekey", k3, e1.mac)
    assert not audit.verify({1: K1, 3: k3}, [e1, skip]).ok


def test_the_anchor_epoch_binds_the_first_event() -> None:
    e6 = _ev(6, 2, "read", K2, b"a" * 32)
    assert audit.verify({2: K2}, [e6], 5, b"a" * 32, anchor_epoch=2).ok
    assert not audit.verify({2: K2}, [e6], 5, b"a" * 32, anchor_epoch=1).ok
    rekey = _ev(6, 2, "key-rekey", K2, b"a" * 32)
    assert audit.verify({2: K2}, [rekey], 5, b"a" * 32, anchor_epoch=1).ok


def test_legacy_events_use_the_legacy_key_and_fix_the_epoch_that_follows() -> None:
    e1 = _ev(1, None, "init", K1, audit.GENESIS)
    e2 = _ev(2, 1, "read", K1, e1.mac)
    assert audit.verify({1: K1, 2: K2}, [e1, e2], legacy_epoch=1).ok
    # After legacy events of epoch 1, a plain read cannot jump to epoch 2.
    jump = _ev(2, 2, "read", K2, e1.mac)
    assert not audit.verify({1: K1, 2: K2}, [e1, jump], legacy_epoch=1).ok
    # Without a legacy epoch a format-1 event has no key.
    none = audit.verify({1: K1}, [e1])
    assert (none.ok, none.first_bad) == (False, 1)


def test_a_legacy_event_after_a_format_2_event_is_refused() -> None:
    e1 = _ev(1, 1, "init", K1, audit.GENESIS)
    e2 = _ev(2, None, "read", K1, e1.mac)
    result = audit.verify({1: K1}, [e1, e2], legacy_epoch=1)
    assert (result.ok, result.first_bad) == (False, 2)
    assert "lacks an epoch" in (result.problem or "")


def test_an_event_with_a_root_but_no_epoch_is_refused() -> None:
    e = Event(1, 1, "a", "read", None, None, "ok", None, None, b"", None, ROOT)
    e = e._replace(mac=_doc_mac(K1, audit.GENESIS, e))
    result = audit.verify({1: K1}, [e], legacy_epoch=1)
    assert (result.ok, result.first_bad) == (False, 1)
    assert "lacks an epoch" in (result.problem or "")


def test_hash_identifier_is_128_bits_of_hmac_in_unpadded_urlsafe_base64() -> None:
    key = bytes(range(32))
    digest = hmac.new(key, "sérvice".encode(), hashlib.sha256).digest()[:16]
    expected = "h:" + base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert audit.hash_identifier(bytearray(key), "sérvice") == expected
    assert len(expected) == 2 + 22


def test_filters_match_globs_and_keep_events_at_the_since_bound() -> None:
    events = [Event(1, 100, "alice", "read", "db", None, "ok", None, None),
              Event(2, 200, "bob", "write", None, None, "ok", None, None),
              Event(3, 300, "alice", "write", "web", None, "ok", None, None)]
    assert [e.seq for e in audit.filtered(events, since_us=200)] == [2, 3]
    assert [e.seq for e in audit.filtered(events, service="d*")] == [1]
    assert [e.seq for e in audit.filtered(events, actor="alice", op="wr*")] == [3]
    assert [e.seq for e in audit.filtered(events)] == [1, 2, 3]
    assert audit.matches(None, None)
    assert not audit.matches(None, "*")
    assert not audit.matches("DB", "db")


def test_outcomes_are_ok_and_exactly_the_kinds_of_every_error() -> None:
    from keyring_hardened import errors

    kinds = {cls.kind for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.HardenedError)
             and cls is not errors.HardenedError}
    assert audit.OUTCOMES[0] == "ok"
    assert set(audit.OUTCOMES[1:]) == kinds
    assert len(audit.OUTCOMES) == len(kinds) + 1


def test_parse_since_today_is_midnight_to_the_microsecond(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import time

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert audit.parse_since("today", 1_700_000_000.654321) == 1_699_920_000.0
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_parse_since_reads_a_naive_date_in_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        assert audit.parse_since("2023-11-14T00:00:00", 0) == 1_699_920_000.0 + 5 * 3600
        assert audit.parse_since("2023-11-14T00:00:00Z", 0) == 1_699_920_000.0
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_parse_since_names_the_option_in_a_bad_duration() -> None:
    from keyring_hardened.errors import UsageError

    with pytest.raises(UsageError, match=r"^since"):
        audit.parse_since("3xd", 0)
    with pytest.raises(UsageError, match=r"^since"):
        audit.parse_since("not a date", 0)


@pytest.mark.parametrize(("key", "value"), [("seq", True), ("ts_us", "5")])
def test_export_form_names_the_bad_number(key: str, value: object) -> None:
    doc = Event(1, 5, "a", "read", None, None, "ok", None, None).to_json()
    with pytest.raises(TypeError, match=f"^{key}$"):
        Event.from_json({**doc, key: value})
