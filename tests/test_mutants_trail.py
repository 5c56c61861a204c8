"""Tests that kill mutants of trail.py which the rest of the suite let live.

The export's header mac is recomputed from the format documented in
trail.py with the standard library; the file checks are driven with
hand-edited files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from keyring_hardened import trail
from keyring_hardened.audit import VerifyResult
from keyring_hardened.config import Config
from keyring_hardened.errors import ConfigError, IntegrityError, UsageError
from keyring_hardened.store import Store

FIELDS = ("format", "vault_id", "anchor_seq", "anchor_mac", "last_seq", "last_mac", "count",
          "epoch")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def _write(path: Path, docs: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), "utf-8")


def _mac(key: bytes | bytearray, header: dict[str, Any]) -> str:
    data = json.dumps([header[k] for k in FIELDS], separators=(",", ":")).encode()
    return hmac.new(bytes(key), b"keyring-hardened/audit-file\x00" + data,
                    hashlib.sha256).hexdigest()


@pytest.fixture
def exported(store: Store, tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    store.set("svc", "alice", "one")
    store.set("svc", "alice", "two")
    path = tmp_path / "export.jsonl"
    count = store.trail.export(path)
    docs = _lines(path)
    assert count == len(docs) - 1 == 3  # init and two writes
    return path, docs


def test_export_header_is_the_documented_format_with_its_mac(
        store: Store, exported: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = exported
    header, events = docs[0], docs[1:]
    assert header["format"] == "keyring-hardened audit v2"
    assert header["vault_id"] == store._vault.vault_id.hex()
    assert (header["anchor_seq"], header["anchor_mac"]) == (0, bytes(32).hex())
    assert (header["last_seq"], header["last_mac"]) == (events[-1]["seq"], events[-1]["mac"])
    assert header["count"] == 3
    assert header["epoch"] == store._epoch
    assert header["header_mac"] == _mac(store._vkeys.audit_key, header)


def test_an_empty_export_names_the_anchor_as_its_last_event(store: Store, tmp_path: Path
                                                            ) -> None:
    header = store.trail._header(store._storage, 4, b"m" * 32, [])
    assert (header["last_seq"], header["last_mac"], header["count"]) == (4, (b"m" * 32).hex(), 0)
    assert header["header_mac"] == _mac(store._vkeys.audit_key, header)


def test_export_verifies_and_counts_match(store: Store,
                                          exported: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = exported
    result = store.trail.verify_file(path)
    assert (result.ok, result.verified, result.head_seq) == (True, 3, 3)


def _reason(store: Store, path: Path, checkpoint: dict[str, Any] | None = None) -> str:
    with pytest.raises(IntegrityError) as info:
        store.trail.verify_file(path, checkpoint)
    return info.value.reason or ""


def test_a_resigned_header_that_lies_about_the_count_is_caught(
        store: Store, exported: tuple[Path, list[dict[str, Any]]]) -> None:
    path, docs = exported
    key = store._vkeys.audit_key
    for field, value in (("count", 2), ("last_seq", 2), ("last_mac", "00" * 32)):
        header = {**docs[0], field: value}
        header["header_mac"] = _mac(key, header)
        _write(path, [header, *docs[1:]])
        assert _reason(store, path) == "audit-file-truncated"


def test_a_header_of_an_unknown_epoch_or_bad_mac_is_refused(
        store: Store, exported: tuple[Path, list[dict[str, Any]]]) -> None:
    path, docs = exported
    _write(path, [{**docs[0], "epoch": 99}, *docs[1:]])
    assert _reason(store, path) == "audit-file-header"
    _write(path, [{**docs[0], "header_mac": "00" * 32}, *docs[1:]])
    assert _reason(store, path) == "audit-file-header"
    _write(path, [{**docs[0], "vault_id": "00" * 16}, *docs[1:]])
    assert _reason(store, path) == "vault-id"


def test_a_format_1_file_verifies_its_chain_but_not_its_ends(
        store: Store, exported: tuple[Path, list[dict[str, Any]]]) -> None:
    path, docs = exported
    old = {"format": "keyring-hardened audit v1", "vault_id": docs[0]["vault_id"],
           "anchor_seq": 0, "anchor_mac": docs[0]["anchor_mac"]}
    _write(path, [old, *docs[1:]])
    assert _reason(store, path) == "audit-file-ends"


@pytest.mark.parametrize(("field", "value"), [
    ("format", "keyring-hardened audit v3"), ("anchor_mac", "zz"), ("anchor_seq", "0"),
    ("vault_id", 5), ("last_mac", "zz"), ("header_mac", "zz"), ("last_seq", True),
    ("count", "3"), ("epoch", None),
])
def test_malformed_headers_are_integrity_errors(
        store: Store, exported: tuple[Path, list[dict[str, Any]]], field: str,
        value: object) -> None:
    path, docs = exported
    _write(path, [{**docs[0], field: value}, *docs[1:]])
    with pytest.raises(IntegrityError, match="line 1"):
        trail.read_jsonl(path)


def test_missing_header_fields_and_bad_event_lines(
        exported: tuple[Path, list[dict[str, Any]]]) -> None:
    path, docs = exported
    for field in ("anchor_mac", "anchor_seq", "last_mac", "header_mac", "count", "epoch"):
        _write(path, [{k: v for k, v in docs[0].items() if k != field}, *docs[1:]])
        with pytest.raises(IntegrityError, match="line 1"):
            trail.read_jsonl(path)
    _write(path, [docs[0], docs[1], {**docs[2], "seq": "2"}])
    with pytest.raises(IntegrityError, match="line 3"):
        trail.read_jsonl(path)
    path.write_text("", "utf-8")
    with pytest.raises(IntegrityError, match="line 1"):
        trail.read_jsonl(path)
    with pytest.raises(UsageError):
        trail.read_jsonl(path.parent / "absent.jsonl")


def test_a_file_checkpoint_must_name_an_event_in_the_file(
        store: Store, exported: tuple[Path, list[dict[str, Any]]]) -> None:
    path, docs = exported
    vault_id = docs[0]["vault_id"]
    good = {"format": "keyring-hardened audit v1", "vault_id": vault_id, "seq": 2,
            "mac": docs[2]["mac"]}
    assert store.trail.verify_file(path, good).ok
    assert _reason(store, path, {**good, "mac": docs[1]["mac"]}) == "audit-checkpoint-mismatch"
    assert _reason(store, path, {**good, "seq": 9}) == "audit-truncated"
    with pytest.raises(UsageError):
        store.trail.verify_file(path, {**good, "vault_id": "00" * 16})
    with pytest.raises(UsageError):
        store.trail.verify_file(path, {**good, "format": "other"})


def test_checkpoints_against_the_vault(store: Store) -> None:
    store.set("svc", "alice", "one")
    cp = store.trail.checkpoint()
    assert cp["format"] == "keyring-hardened audit v1"
    assert cp["vault_id"] == store._vault.vault_id.hex()
    store.set("svc", "alice", "two")
    assert store.trail.verify(cp).ok
    with pytest.raises(IntegrityError) as info:
        store.trail.verify({**cp, "mac": "00" * 32})
    assert info.value.reason == "audit-checkpoint-mismatch"
    with pytest.raises(IntegrityError) as info:
        store.trail.verify({**cp, "seq": 99})
    assert info.value.reason == "audit-truncated"
    for bad in ({**cp, "seq": "x"}, {**cp, "mac": "zz"}, {"format": cp["format"]}):
        with pytest.raises(UsageError):
            store.trail.verify(bad)


def test_a_checkpoint_at_the_anchor_after_a_prune(home: Path, tmp_path: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, clock=lambda: now[0]) as s:
        s.set("svc", "alice", "one")
        now[0] += 100
        s.set("svc", "alice", "two")
        cp = s.trail.checkpoint()
        early = {**cp, "seq": 1, "mac": s.trail.show(limit=3)[-1].mac.hex()}
        now[0] += 100
        moved = s.trail.prune(tmp_path / "archive.jsonl", keep=150)
        assert moved == 2
        anchor_seq, anchor_mac = s._storage.audit_anchor()
        assert anchor_seq == 2
        at_anchor = {**cp, "seq": 2, "mac": anchor_mac.hex()}
        assert s.trail.verify(at_anchor).ok
        with pytest.raises(UsageError, match="pruned"):
            s.trail.verify(early)
        assert s.trail.verify(cp).ok
        # nothing more is old enough: a second prune moves nothing
        assert s.trail.prune(tmp_path / "archive2.jsonl", keep=150) == 0
        assert not (tmp_path / "archive2.jsonl").exists()
        assert s.trail.verify_file(tmp_path / "archive.jsonl").verified == 2


def test_prune_uses_the_configured_window(home: Path, tmp_path: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, config=Config(audit_keep=50), clock=lambda: now[0]) as s:
        now[0] += 49
        assert s.trail.prune(tmp_path / "a.jsonl") == 0
        now[0] += 2
        assert s.trail.prune(tmp_path / "a.jsonl") == 1


def test_show_limits_and_filters(store: Store) -> None:
    for i in range(3):
        store.set(f"svc{i}", "alice", "v")
    assert len(store.trail.show(limit=1)) == 1
    newest = store.trail.show(op="write", limit=2)
    assert [e.service for e in newest] == ["svc2", "svc1"]
    assert len(store.trail.show(op="write")) == 3
    assert [e.service for e in store.trail.show(service="svc1")] == ["svc1"]
    for bad in (0, -1):
        with pytest.raises(UsageError):
            store.trail.show(limit=bad)
    assert store.trail.show(since=1e12) == []


def test_show_hashes_the_service_filter_with_hmac_identifiers(home: Path) -> None:
    with Store.init(home, config=Config(audit_hmac_identifiers=True)) as s:
        s.set("svc", "alice", "v")
        found = s.trail.show(service="svc")
        assert len(found) == 1
        assert found[0].service == s._ident("svc")
        assert found[0].service != "svc"


def test_a_prune_event_with_a_bad_range_is_refused(store: Store) -> None:
    from keyring_hardened.audit import Event

    class Fake:
        def __init__(self, reason: str | None) -> None:
            self.reason = reason

        def last_event(self, op: str) -> Event | None:
            assert op == "audit-prune"
            return Event(7, 0, "a", op, None, None, "ok", None, self.reason)

    assert trail._last_prune(Fake("through-12")) == 12  # type: ignore[arg-type]
    assert trail._last_prune(Fake("through-" + "9" * 18)) == int("9" * 18)  # type: ignore[arg-type]
    for reason in ("through-", "through-x1", "thru-12", None, "through-" + "9" * 19, "12"):
        with pytest.raises(IntegrityError) as info:
            trail._last_prune(Fake(reason))  # type: ignore[arg-type]
        assert info.value.reason == "audit-chain-7"


def test_each_trail_operation_is_audited_under_its_own_name(
        store: Store, exported: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = exported
    export = store.trail.show(op="audit-export")
    assert [e.reason for e in export] == [str(path)]
    store.trail.verify_file(path)
    store.trail.checkpoint()
    store.trail.verify()
    ops = [(e.op, e.reason) for e in store.trail.show(limit=3)]
    assert ops == [("audit-verify", None), ("audit-checkpoint", None), ("audit-verify", "file")]


def test_a_checkpoint_at_the_anchor_with_another_mac_is_a_mismatch(home: Path,
                                                                  tmp_path: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, clock=lambda: now[0]) as s:
        s.set("svc", "alice", "one")
        now[0] += 100
        cp = s.trail.checkpoint()
        s.trail.prune(tmp_path / "archive.jsonl", keep=50)
        anchor_seq, _ = s._storage.audit_anchor()
        with pytest.raises(IntegrityError) as info:
            s.trail.verify({**cp, "seq": anchor_seq, "mac": "00" * 32})
        assert info.value.reason in ("audit-checkpoint-mismatch", "audit-truncated")


def test_checkpoint_errors_name_the_events(store: Store, tmp_path: Path) -> None:
    store.set("svc", "alice", "one")
    cp = store.trail.checkpoint()
    with pytest.raises(IntegrityError, match="at event 2:"):
        store.trail.verify({**cp, "seq": 2, "mac": "00" * 32})
    path = tmp_path / "e.jsonl"
    store.trail.export(path)
    with pytest.raises(IntegrityError, match="chain ends at 4 "):
        store.trail.verify_file(path, {**cp, "seq": 9})
    with pytest.raises(IntegrityError, match="at event 2:"):
        store.trail.verify_file(path, {**cp, "seq": 2, "mac": "00" * 32})


def test_prune_cutoff_is_exact_to_the_microsecond(home: Path, tmp_path: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, clock=lambda: now[0]) as s:  # event 1 at 1_000_000.0
        now[0] = 1_000_000.9
        s.set("svc", "u", "x")  # event 2 at 1_000_000.9
        now[0] = 1_000_010.5
        # keep 10 s: the cutoff is 1_000_000.5, between the two events
        assert s.trail.prune(tmp_path / "a.jsonl", keep=10) == 1


def test_an_export_after_a_prune_starts_at_the_anchor_and_verifies(home: Path,
                                                                   tmp_path: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, clock=lambda: now[0]) as s:
        s.set("svc", "u", "x")
        now[0] += 100
        assert s.trail.prune(tmp_path / "archive.jsonl", keep=50) == 2
        s.set("svc", "u", "y")
        path = tmp_path / "export.jsonl"
        s.trail.export(path)
        header = _lines(path)[0]
        assert header["anchor_seq"] == 2
        assert header["anchor_mac"] != bytes(32).hex()
        assert s.trail.verify_file(path).ok


def test_a_checkpoint_against_an_empty_file_says_the_file_ends_at_its_anchor(
        store: Store, tmp_path: Path) -> None:
    header = store.trail._header(store._storage, 0, bytes(32), [])
    path = tmp_path / "empty.jsonl"
    _write(path, [header])
    assert store.trail.verify_file(path).verified == 0
    cp = {"format": "keyring-hardened audit v1", "vault_id": header["vault_id"], "seq": 1,
          "mac": "00" * 32}
    with pytest.raises(IntegrityError, match="chain ends at 0 ") as info:
        store.trail.verify_file(path, cp)
    assert info.value.reason == "audit-truncated"


def test_checkpoint_to_a_file_writes_the_document_it_returns(store: Store,
                                                             tmp_path: Path) -> None:
    store.set("svc", "alice", "one")
    path = tmp_path / "checkpoint.json"
    cp = store.trail.checkpoint(path)
    assert json.loads(path.read_text("utf-8")) == cp
    assert (path.stat().st_mode & 0o777) == 0o600
    assert store.trail.verify(json.loads(path.read_text("utf-8"))).ok


def test_an_audit_file_may_be_larger_than_a_small_trusted_file(
        store: Store, exported: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    # Exports and archives are read up to AUDIT_FILE_LIMIT (1 GiB), not the 1 MiB
    # limit of config and key files: a line padded past 1 MiB still reads.
    path, docs = exported
    lines = path.read_text("utf-8").splitlines()
    padded = tmp_path / "padded.jsonl"
    padded.write_text("\n".join([lines[0], " " * (1 << 20) + lines[1], *lines[2:]]) + "\n",
                      "utf-8")
    assert padded.stat().st_size > 1 << 20
    header, events = trail.read_jsonl(padded)
    assert header == docs[0]
    assert [e.seq for e in events] == [d["seq"] for d in docs[1:]]
    assert store.trail.verify_file(padded).ok


def test_an_audit_file_reached_through_a_link_is_refused_by_name(
        exported: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    path, _ = exported
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match=r"^audit file .* is a symbolic link"):
        trail.read_jsonl(link)


class _CutStorage:
    """The vault's storage as a cut trail would show it (store.open refuses such a
    vault before any operation, so the trail's own checks are driven directly)."""

    def __init__(self, storage: Any, anchor: tuple[int, bytes] | None = None,
                 empty: bool = False) -> None:
        self._storage, self._anchor, self._empty = storage, anchor, empty

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def audit_anchor(self) -> tuple[int, bytes]:
        return self._anchor or self._storage.audit_anchor()

    def events(self, **kwargs: Any) -> Any:
        return [] if self._empty else self._storage.events(**kwargs)


def _check_cut(store: Store, **cut: Any) -> VerifyResult:
    result: VerifyResult = store._run(
        "audit-verify", None, None,
        lambda storage, note: store.trail._check_table(
            _CutStorage(storage, **cut)))  # type: ignore[arg-type]
    return result


def test_an_emptied_trail_fails_at_the_event_after_the_anchor(store: Store) -> None:
    store.set("svc", "a", "1")
    assert _check_cut(store).ok is True  # the trail as it is verifies
    result = _check_cut(store, empty=True)
    assert (result.ok, result.first_bad) == (False, 1)
    assert result.problem == ("the trail is empty although the vault exists "
                              "(its events were removed)")


def test_events_cut_before_the_anchor_without_a_prune_fail_after_the_anchor(
        store: Store) -> None:
    for value in ("1", "2", "3"):
        store.set("svc", "a", value)
    second = sorted(store.trail.show(), key=lambda e: e.seq)[1]
    result = _check_cut(store, anchor=(second.seq, second.mac))
    assert (result.ok, result.first_bad) == (False, second.seq + 1)
    assert result.problem == f"events 1 to {second.seq} were removed without a recorded prune"


def test_rows_that_contradict_the_newest_event_fail_after_it(store: Store, home: Path) -> None:
    import sqlite3

    store.set("svc", "a", "1")
    store.set("svc", "a", "2")
    conn = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        conn.execute("UPDATE secret_versions SET created_at = created_at + 1 WHERE version = 1")
    finally:
        conn.close()
    head_seq, _ = store._storage.audit_head()
    result = _check_cut(store)  # nothing cut: the rows alone contradict the trail
    assert (result.ok, result.first_bad) == (False, head_seq + 1)
    head_seq, _ = store._storage.audit_head()  # that check was audited too
    with pytest.raises(IntegrityError) as info:
        store.trail.verify()
    assert info.value.reason == f"audit-chain-{head_seq + 1}"
    assert "the vault's rows do not match the state its newest event records" in str(
        info.value)


def test_a_verify_against_a_checkpoint_is_audited_with_its_seq(store: Store) -> None:
    store.set("svc", "a", "1")
    cp = store.trail.checkpoint()
    store.set("svc", "a", "2")
    assert store.trail.verify(cp).ok
    event = store.trail.show(limit=1)[0]
    assert (event.op, event.reason) == ("audit-verify", f"checkpoint-{cp['seq']}")


def test_show_since_is_exact_to_the_microsecond(home: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, clock=lambda: now[0]) as s:  # init at 1_000_000.0
        now[0] = 1_000_000.5
        s.set("svc", "u", "x")
        assert [e.op for e in s.trail.show(since=1_000_000.25)] == ["write"]
        assert [e.op for e in s.trail.show(since=1_000_000.5)][-1] == "write"
        assert s.trail.show(since=1_000_000.500001, op="write") == []


def test_show_without_a_service_filter_lists_every_event_with_hmac_identifiers(
        home: Path) -> None:
    with Store.init(home, config=Config(audit_hmac_identifiers=True)) as s:
        s.set("svc", "alice", "v")
        assert [e.op for e in s.trail.show(op="write")] == ["write"]
        assert len(s.trail.show()) >= 2  # init and the write, whatever their services
