"""The vault's authenticated state: pure functions of rows, no I/O.

Every audit event carries a *state root*, a SHA-256 digest over everything
the vault stores apart from the trail itself, and the event's HMAC covers
the root. So the newest event, which nobody can forge without the audit
key, pins the whole state: a row written back from an older snapshot, a
deleted row or a re-inserted one no longer matches the root, and the first
operation that reads it fails with an integrity error. Only a whole
earlier vault (rows and trail together) is self-consistent; a checkpoint
kept elsewhere catches that.

The root is built in two parts::

    root = H("root", meta, node_digest(level-0 node))

* ``meta`` covers the few vault-wide rows: the vault record, every KEK row,
  the past vault keys and the audit anchor; and, through the vault
  record's leaf, the seal and the rate-limit buckets (see
  :func:`access_digest`). Operations that use any of them recompute it
  from the rows.
* the credential tree covers every credential head. Heads fall into
  2**16 buckets by a hash of their *service* (so every username of a
  service shares a bucket, and "which usernames does this service have"
  is answerable from one verified bucket). A bucket's digest covers its
  heads in (service, username) order; four levels of nodes, 16 children
  each, lead to the level-0 node. A node is stored as its 16 children's
  digests (512 bytes); an absent node means 16 empty children.
* a head's leaf covers its columns and ``versions_digest``, a digest of the
  (version, digest) pairs of its kept versions; each version row stores the
  digest of its own columns (ciphertext, wrapped key, KEK version, TTL and
  expiry included). So reading one credential checks one bucket, four
  nodes and that credential's version list: a handful of rows, whatever
  the vault's size.

Plain SHA-256 suffices inside the tree: the root is authenticated by the
event's HMAC, and the tree only has to be collision resistant.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "EMPTY",
    "EMPTY_NODE",
    "FANOUT",
    "LEVELS",
    "META_KEY",
    "access_digest",
    "bucket_digest",
    "bucket_of",
    "full_root",
    "head_leaf",
    "node_digest",
    "path_keys",
    "root_of",
    "update_paths",
    "verify_path",
    "version_digest",
    "versions_digest",
]

#: The digest of an empty bucket or an empty node.
EMPTY = bytes(32)
#: Children per node, and node levels above the buckets (16**4 = 65,536 buckets).
FANOUT = 16
LEVELS = 4
_BITS = 4
_NODE_LEN = FANOUT * 32
_EMPTY_NODE = EMPTY_NODE = bytes(_NODE_LEN)
#: Where the stored meta digest lives among the nodes.
META_KEY = (255, 0)

NodeKey = tuple[int, int]


_PACK_Q = struct.Struct(">q").pack
_PACK_D = struct.Struct(">d").pack
_PACK_I = struct.Struct(">I").pack


def _field(value: Any) -> bytes:
    """One field, typed and length-prefixed, so no two rows share an encoding."""
    kind = type(value)
    if kind is str:
        data: bytes = value.encode("utf-8", "surrogatepass")
        return b"S" + _PACK_I(len(data)) + data
    if kind is int:
        return b"I" + _PACK_Q(value)
    if kind is bytes or kind is bytearray:
        return b"B" + _PACK_I(len(value)) + bytes(value)
    if kind is float:
        return b"F" + _PACK_D(value)
    if value is None:
        return b"N"
    # bool (never stored) and anything else: refuse rather than guess.
    raise TypeError(f"cannot encode {kind.__name__}")


def _digest(label: bytes, *fields: Any) -> bytes:
    return hashlib.sha256(b"kh-state-v1/" + label + b"\x00"
                          + b"".join(map(_field, fields))).digest()


def _real(value: float | int | None) -> float | None:
    # SQLite may hand back a whole REAL as int after an edit; the digest must
    # not depend on that.
    return None if value is None else float(value)


def bucket_of(service: str) -> int:
    """The bucket of every head of ``service``: 16 bits of a hash of the name."""
    digest = hashlib.sha256(b"kh-state-v1/bucket\x00" + service.encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest()[:2], "big")


_VERSION_LABEL = b"kh-state-v1/version\x00"
_HEAD_LABEL = b"kh-state-v1/head\x00"


def _opt_real(value: float | int | None) -> bytes:
    return b"N" if value is None else b"F" + _PACK_D(float(value))


def version_digest(version: int, kek_version: int, wrapped_key: bytes, ciphertext: bytes,
                   created_at: float, ttl: float | None, expires_at: float | None,
                   extra: bytes | None = None) -> bytes:
    """The digest of one stored version's columns (TTL and expiry included).

    The same bytes as ``_digest(b"version", ...)`` of the fields, written out
    for speed: every read and every rewrap computes it.
    """
    return hashlib.sha256(b"".join((
        _VERSION_LABEL, b"I", _PACK_Q(version), b"I", _PACK_Q(kek_version),
        b"B", _PACK_I(len(wrapped_key)), wrapped_key, b"B", _PACK_I(len(ciphertext)), ciphertext,
        b"F", _PACK_D(float(created_at)), _opt_real(ttl), _opt_real(expires_at),
        _field(extra)))).digest()


def versions_digest(pairs: Iterable[tuple[int, bytes]]) -> bytes:
    """The digest of a credential's kept versions: (version, digest) in version order."""
    h = hashlib.sha256(b"kh-state-v1/versions\x00")
    for version, digest in pairs:
        h.update(_field(version) + _field(digest))
    return h.digest()


def head_leaf(head_id: int, service: str, username: str, current: int | None, last: int,
              created_at: float, updated_at: float, expires_at: float | None,
              versions: bytes | None, mac: bytes, extra: bytes | None = None) -> bytes:
    """The digest of one credential head row (the bytes ``_digest(b"head", ...)`` gives)."""
    svc = service.encode("utf-8", "surrogatepass")
    user = username.encode("utf-8", "surrogatepass")
    return hashlib.sha256(b"".join((
        _HEAD_LABEL, b"I", _PACK_Q(head_id), b"S", _PACK_I(len(svc)), svc,
        b"S", _PACK_I(len(user)), user, _field(current), b"I", _PACK_Q(last),
        b"F", _PACK_D(float(created_at)), b"F", _PACK_D(float(updated_at)),
        _opt_real(expires_at), _field(versions), _field(mac), _field(extra)))).digest()


def vault_leaf(vault_id: bytes, created_at: float, kdf: str, verifier: bytes,
               vault_key: bytes, generation: int, state_version: int,
               extra: bytes | None = None) -> bytes:
    """The digest of the vault record (the bytes ``_digest(b"vault", ...)`` gives)."""
    return hashlib.sha256(_vault_prefix(vault_id, created_at, kdf, verifier, vault_key,
                                        generation, state_version) + _field(extra)).digest()


@functools.lru_cache(maxsize=8)
def _vault_prefix(vault_id: bytes, created_at: float, kdf: str, verifier: bytes,
                  vault_key: bytes, generation: int, state_version: int) -> bytes:
    # The record itself rarely changes; its extra (the access digest) changes
    # with every rate-limited request, so the rest is encoded once.
    return b"kh-state-v1/vault\x00" + b"".join(map(_field, (
        vault_id, _real(created_at), kdf, verifier, vault_key, generation, state_version)))


@functools.lru_cache(maxsize=64)
def kek_leaf(version: int, state: str, created_at: float, wrapped: bytes | None,
             wrap_count: int) -> bytes:
    """The digest of one KEK row."""
    return _digest(b"kek", version, state, _real(created_at), wrapped, wrap_count)


def access_digest(seal: tuple[float, str] | None,
                  buckets: Iterable[tuple[str, str, float, float]]) -> bytes:
    """The digest of the access-control rows: the seal, and every rate-limit bucket.

    It goes into the vault record's leaf (its ``extra``) whenever either
    exists, so unsealing by deleting the row, or refilling a bucket by
    editing it, no longer matches the state root. Buckets are taken in
    (rule, actor) order whatever order they come in.
    """
    h = hashlib.sha256(b"kh-state-v1/access\x00")
    h.update(_field(None) if seal is None else _field(_real(seal[0])) + _field(seal[1]))
    rows = sorted(buckets)
    h.update(_field(len(rows)))
    for rule, actor, tokens, updated in rows:
        h.update(_field(rule) + _field(actor) + _field(_real(tokens)) + _field(_real(updated)))
    return h.digest()


def meta_digest(vault: bytes, keks: Sequence[bytes], past_keys: Sequence[tuple[int, bytes]],
                anchor_seq: int, anchor_mac: bytes) -> bytes:
    """The digest of the vault-wide rows: vault record, KEKs, past vault keys, audit anchor."""
    h = hashlib.sha256(b"kh-state-v1/meta\x00")
    h.update(vault)
    h.update(_field(len(keks)))
    for leaf in keks:
        h.update(leaf)
    h.update(_field(len(past_keys)))
    for epoch, wrapped in past_keys:
        h.update(_field(epoch) + _field(wrapped))
    h.update(_field(anchor_seq) + _field(anchor_mac))
    return h.digest()


def bucket_digest(leaves: Sequence[bytes]) -> bytes:
    """The digest of a bucket's head leaves, in (service, username) order."""
    if not leaves:
        return EMPTY
    h = hashlib.sha256(b"kh-state-v1/bucket-digest\x00")
    h.update(_field(len(leaves)))
    for leaf in leaves:
        h.update(leaf)
    return h.digest()


def node_digest(blob: bytes) -> bytes:
    """The digest of a stored node (its children's digests); an empty node is EMPTY."""
    if blob.count(0) == len(blob):  # all zero bytes, counted at C speed
        return EMPTY
    return hashlib.sha256(b"kh-state-v1/node\x00" + blob).digest()


def root_of(meta: bytes, top: bytes) -> bytes:
    """The state root from the meta digest and the level-0 node."""
    return hashlib.sha256(b"kh-state-v1/root\x00" + meta + node_digest(top)).digest()


@functools.lru_cache(maxsize=4096)
def path_keys(bucket: int) -> tuple[tuple[NodeKey, int], ...]:
    """The nodes from a bucket up to the top, each with the bucket's slot in it."""
    keys = []
    for level in range(LEVELS - 1, -1, -1):
        shift = _BITS * (LEVELS - 1 - level)
        keys.append(((level, bucket >> (shift + _BITS)), (bucket >> shift) & (FANOUT - 1)))
    return tuple(keys)


def _slot(blob: bytes, slot: int) -> bytes:
    return blob[slot * 32:(slot + 1) * 32]


def verify_path(bucket: int, digest: bytes, nodes: Mapping[NodeKey, bytes], meta: bytes,
                root: bytes) -> bool:
    """Whether a bucket with this digest, under these stored nodes, gives ``root``."""
    child = digest
    for key, slot in path_keys(bucket):
        blob = nodes.get(key, _EMPTY_NODE)
        if len(blob) != _NODE_LEN or _slot(blob, slot) != child:
            return False
        child = node_digest(blob)
    return root_of(meta, nodes.get((0, 0), _EMPTY_NODE)) == root


def update_paths(digests: Mapping[int, bytes], nodes: Mapping[NodeKey, bytes]
                 ) -> dict[NodeKey, bytes]:
    """New node blobs after buckets take new digests; ``nodes`` must hold their paths.

    Returns every node that changed (an all-empty node is returned as 512
    zero bytes, which the caller may delete instead of storing).
    """
    changed: dict[NodeKey, bytearray] = {}

    def blob(key: NodeKey) -> bytearray:
        if key not in changed:
            changed[key] = bytearray(nodes.get(key, _EMPTY_NODE))
        return changed[key]

    level_children: dict[NodeKey, bytes] = {}
    for bucket, digest in digests.items():
        key, slot = path_keys(bucket)[0]
        blob(key)[slot * 32:(slot + 1) * 32] = digest
        level_children[key] = b""
    # Walk up one level at a time, so a shared parent is rehashed once.
    for level in range(LEVELS - 1, 0, -1):
        parents: dict[NodeKey, bytes] = {}
        for key in [k for k in level_children if k[0] == level]:
            idx = key[1]
            parent = (level - 1, idx >> _BITS)
            slot = idx & (FANOUT - 1)
            blob(parent)[slot * 32:(slot + 1) * 32] = node_digest(bytes(blob(key)))
            parents[parent] = b""
        level_children = parents
    return {k: bytes(v) for k, v in changed.items()}


def full_root(meta: bytes, buckets: Mapping[int, bytes]) -> bytes:
    """The root computed from scratch from every non-empty bucket's digest."""
    nodes = update_paths({b: d for b, d in buckets.items() if d != EMPTY}, {})
    return root_of(meta, nodes.get((0, 0), _EMPTY_NODE))
