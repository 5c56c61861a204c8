"""Every storage call turns SQLite's failures into the documented error classes.

A connection that fails under a call (closed here, the cheapest way to make
every statement fail) must surface as a HardenedError naming the vault,
never as a raw sqlite3 exception a caller would see as an internal error.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keyring_hardened.errors import HardenedError
from keyring_hardened.storage import BucketRow, KekRecord, SQLiteStorage
from keyring_hardened.store import Store

CALLS: list[tuple[str, Callable[[SQLiteStorage], Any]]] = [
    ("vault", lambda s: s.vault()),
    ("meta_rows", lambda s: s.meta_rows()),
    ("put_buckets", lambda s: s.put_buckets([BucketRow("r", "a", 1.0, 2.0)])),
    ("drop_buckets", lambda s: s.drop_buckets([("r", "a")])),
    ("set_seal", lambda s: s.set_seal(1.0, "a")),
    ("unlock_throttle", lambda s: s.unlock_throttle()),
    ("unlock_attempts", lambda s: s.unlock_attempts(0.0)),
    ("set_unlock_throttle", lambda s: s.set_unlock_throttle(1, 1.0)),
    ("end_unlock_attempt", lambda s: s.end_unlock_attempt(None, "guess", 1.0)),
    ("set_kek_state", lambda s: s.set_kek_state(1, "active")),
    ("retire_kek", lambda s: s.retire_kek(1)),
    ("count_wrap", lambda s: s.count_wrap(1, 1)),
    ("bucket_rows", lambda s: s.bucket_rows(1)),
    ("heads_in_buckets", lambda s: s.heads_in_buckets([1])),
    ("versions_of", lambda s: s.versions_of([1])),
    ("versions", lambda s: s.versions(1)),
    ("purge", lambda s: s.purge(1)),
    ("all_heads", lambda s: list(s.all_heads())),
    ("all_versions", lambda s: list(s.all_versions())),
    ("counts", lambda s: s.counts()),
    ("keys_in_use", lambda s: s.keys_in_use()),
    ("schema", lambda s: s.schema()),
    ("nodes", lambda s: s.nodes({(0, 0)})),
    ("put_nodes", lambda s: s.put_nodes({(0, 0): b"\x01" * 512, (1, 0): None})),
    ("audit_anchor", lambda s: s.audit_anchor()),
    ("newest_events", lambda s: s.newest_events(2)),
    ("event", lambda s: s.event(1)),
    ("events", lambda s: list(s.events(after=0))),
    ("last_event", lambda s: s.last_event("init")),
    ("events_before", lambda s: s.events_before(1)),
    ("has_pending", lambda s: s.has_pending()),
    ("take_pending", lambda s: s.take_pending(1)),
    ("add_pending", lambda s: s.add_pending(1, "a", "unlock", "locked", None)),
    ("keks", lambda s: s.keks()),
    ("add_kek", lambda s: s.add_kek(KekRecord(9, "active", 1.0, b"x", 0))),
    ("set_kek_wrapped", lambda s: s.set_kek_wrapped(1, b"x")),
    ("past_keys", lambda s: s.past_keys()),
    ("set_past_keys", lambda s: s.set_past_keys([(1, b"x")])),
    ("under_keks_below", lambda s: s.under_keks_below(2)),
    ("rewrap_candidates", lambda s: s.rewrap_candidates(2, 10)),
    ("set_wrapped_keys", lambda s: s.set_wrapped_keys([(1, b"x", b"d", 1, 1)])),
    ("set_versions_digests", lambda s: s.set_versions_digests([(b"d", 1)])),
    ("new_head", lambda s: s.new_head("s", "u", 1, 1.0)),
    ("update_head", lambda s: s.update_head(1, 1, 1, 1.0, None, b"d")),
    ("set_root", lambda s: s.set_root("{}", b"v", b"k", 2)),
    ("fill_state_columns", lambda s: s.fill_state_columns([(1, b"d", 1)], [(b"d", 1, 1)])),
    ("prune", lambda s: s.prune(1, 1)),
    ("clear_nodes", lambda s: s.clear_nodes()),
    ("audit_head", lambda s: s.audit_head()),
    ("drop_events_through", lambda s: s.drop_events_through(1, b"m")),
    ("checkpoint", lambda s: s.checkpoint()),
    ("use_wal", lambda s: s.use_wal()),
    ("savepoint", lambda s: s.savepoint()),
    ("transaction", lambda s: s.transaction().__enter__()),
    ("snapshot", lambda s: s.snapshot().__enter__()),
]


@pytest.fixture
def broken(home: Path) -> SQLiteStorage:
    with Store.init(home) as s:
        s.set("svc", "u", "v")
    storage = SQLiteStorage.open(home / "vault.db")
    storage._conn.close()  # every statement now fails inside SQLite's module
    return storage


@pytest.mark.parametrize(("name", "call"), CALLS, ids=[n for n, _ in CALLS])
def test_a_failing_connection_is_a_storage_error(broken: SQLiteStorage, name: str,
                                                 call: Callable[[SQLiteStorage], Any]) -> None:
    with pytest.raises(HardenedError) as info:
        call(broken)
    assert not isinstance(info.value, sqlite3.Error)
    assert info.value.exit_code in (3, 8), name
