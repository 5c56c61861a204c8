"""Tests that kill mutants of state.py which the rest of the suite let live.

Every vault stores digests and roots built by these functions, so their
byte format is persistent: a change would make every existing vault fail
its state check. The digests are recomputed here with hashlib from the
format (a label, a NUL, typed and length-prefixed fields), not with the
code under test.
"""

from __future__ import annotations

import hashlib
import struct

from keyring_hardened import state


def _f(value: object) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, str):
        data = value.encode()
        return b"S" + struct.pack(">I", len(data)) + data
    if isinstance(value, bytes):
        return b"B" + struct.pack(">I", len(value)) + value
    if isinstance(value, float):
        return b"F" + struct.pack(">d", value)
    assert isinstance(value, int)
    return b"I" + struct.pack(">q", value)


def _h(label: bytes, *fields: object) -> bytes:
    return hashlib.sha256(b"kh-state-v1/" + label + b"\x00"
                          + b"".join(_f(x) for x in fields)).digest()


def test_constants() -> None:
    assert bytes(32) == state.EMPTY
    assert bytes(512) == state.EMPTY_NODE
    assert (state.FANOUT, state.LEVELS, state.META_KEY) == (16, 4, (255, 0))


def test_field_encodes_bytearrays_like_bytes_and_negative_ints() -> None:
    assert state._field(bytearray(b"xy")) == _f(b"xy")
    assert state._field(-2) == _f(-2)
    assert state._field("") == b"S" + bytes(4)


def test_version_digest_format() -> None:
    got = state.version_digest(3, 2, b"wk", b"ct", 10, 60, 70.5, b"x")
    assert got == _h(b"version", 3, 2, b"wk", b"ct", 10.0, 60.0, 70.5, b"x")
    assert state.version_digest(3, 2, b"wk", b"ct", 10.0, None, None) == _h(
        b"version", 3, 2, b"wk", b"ct", 10.0, None, None, None)


def test_versions_digest_format() -> None:
    h = hashlib.sha256(b"kh-state-v1/versions\x00")
    for version, digest in ((1, b"a" * 32), (4, b"b" * 32)):
        h.update(_f(version) + _f(digest))
    assert state.versions_digest([(1, b"a" * 32), (4, b"b" * 32)]) == h.digest()
    assert state.versions_digest([]) == hashlib.sha256(b"kh-state-v1/versions\x00").digest()


def test_head_leaf_format() -> None:
    got = state.head_leaf(5, "svc", "alice", 2, 3, 1, 2.5, None, b"v" * 32, b"", b"e")
    assert got == _h(b"head", 5, "svc", "alice", 2, 3, 1.0, 2.5, None, b"v" * 32, b"", b"e")
    deleted = state.head_leaf(5, "svc", "alice", None, 3, 1.0, 2.0, 9, None, b"m")
    assert deleted == _h(b"head", 5, "svc", "alice", None, 3, 1.0, 2.0, 9.0, None, b"m", None)


def test_vault_and_kek_leaf_format() -> None:
    got = state.vault_leaf(b"i" * 16, 7, "{}", b"v", b"k", 2, 1)
    assert got == _h(b"vault", b"i" * 16, 7.0, "{}", b"v", b"k", 2, 1, None)
    assert state.kek_leaf(1, "active", 3, b"w", 9) == _h(b"kek", 1, "active", 3.0, b"w", 9)
    assert state.kek_leaf(1, "retired", 3.0, None, 0) == _h(b"kek", 1, "retired", 3.0, None, 0)


def test_meta_digest_format() -> None:
    vault, keks = b"V" * 32, [b"K" * 32, b"L" * 32]
    past = [(1, b"p1"), (2, b"p2")]
    h = hashlib.sha256(b"kh-state-v1/meta\x00")
    h.update(vault)
    h.update(_f(2))
    for leaf in keks:
        h.update(leaf)
    h.update(_f(2))
    for epoch, wrapped in past:
        h.update(_f(epoch) + _f(wrapped))
    h.update(_f(7) + _f(b"a" * 32))
    assert state.meta_digest(vault, keks, past, 7, b"a" * 32) == h.digest()


def test_bucket_node_and_root_format() -> None:
    leaves = [b"1" * 32, b"2" * 32]
    h = hashlib.sha256(b"kh-state-v1/bucket-digest\x00")
    h.update(_f(2))
    for leaf in leaves:
        h.update(leaf)
    assert state.bucket_digest(leaves) == h.digest()
    blob = bytes(31) + b"\x01" + bytes(480)
    node = hashlib.sha256(b"kh-state-v1/node\x00" + blob).digest()
    assert state.node_digest(blob) == node
    meta = b"m" * 32
    assert state.root_of(meta, blob) == hashlib.sha256(b"kh-state-v1/root\x00" + meta
                                                       + node).digest()
    # an empty top node contributes the empty digest
    assert state.root_of(meta, bytes(512)) == hashlib.sha256(
        b"kh-state-v1/root\x00" + meta + bytes(32)).digest()


def test_update_paths_places_each_digest_in_its_slot_and_hashes_up() -> None:
    d = b"d" * 32
    nodes = state.update_paths({0x1234: d}, {})
    assert set(nodes) == {(3, 0x123), (2, 0x12), (1, 0x1), (0, 0)}
    assert nodes[(3, 0x123)] == bytes(4 * 32) + d + bytes(11 * 32)
    assert nodes[(2, 0x12)][3 * 32:4 * 32] == state.node_digest(nodes[(3, 0x123)])
    assert nodes[(1, 0x1)][2 * 32:3 * 32] == state.node_digest(nodes[(2, 0x12)])
    assert nodes[(0, 0)][1 * 32:2 * 32] == state.node_digest(nodes[(1, 0x1)])
    assert all(len(blob) == 512 for blob in nodes.values())


def test_update_paths_keeps_siblings_and_reports_emptied_nodes() -> None:
    a, b = b"a" * 32, b"b" * 32
    nodes = state.update_paths({0x0001: a, 0x0002: b}, {})
    # both buckets share every node; each keeps its own slot
    assert nodes[(3, 0)][32:96] == a + b
    emptied = state.update_paths({0x0001: state.EMPTY, 0x0002: state.EMPTY}, nodes)
    assert emptied[(3, 0)] == bytes(512)
    assert emptied[(0, 0)] == bytes(512)
    one_left = state.update_paths({0x0001: state.EMPTY}, nodes)
    assert one_left[(3, 0)] == bytes(64) + b + bytes(13 * 32)
    assert state.full_root(b"m" * 32, {1: a, 2: state.EMPTY}) == state.root_of(
        b"m" * 32, state.update_paths({1: a}, {})[(0, 0)])


def test_verify_path_reads_missing_nodes_as_empty_and_checks_the_root() -> None:
    meta = b"m" * 32
    empty_root = state.root_of(meta, state.EMPTY_NODE)
    assert state.verify_path(0xBEEF, state.EMPTY, {}, meta, empty_root)
    assert not state.verify_path(0xBEEF, b"x" * 32, {}, meta, empty_root)
    assert not state.verify_path(0xBEEF, state.EMPTY, {}, meta, b"r" * 32)
    d = b"d" * 32
    nodes = state.update_paths({0xBEEF: d}, {})
    root = state.root_of(meta, nodes[(0, 0)])
    assert state.verify_path(0xBEEF, d, nodes, meta, root)
    longer = {**nodes, (0, 0): nodes[(0, 0)] + bytes(32)}
    assert not state.verify_path(0xBEEF, d, longer, meta, root)


def test_bucket_and_fields_take_any_str_even_a_lone_surrogate() -> None:
    name = "svc\ud800"
    raw = name.encode("utf-8", "surrogatepass")
    expected = int.from_bytes(hashlib.sha256(b"kh-state-v1/bucket\x00" + raw).digest()[:2],
                              "big")
    assert state.bucket_of(name) == expected
    assert state._field(name) == b"S" + struct.pack(">I", len(raw)) + raw
