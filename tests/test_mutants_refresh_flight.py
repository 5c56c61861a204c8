"""Tests that kill mutants of refresh.py's single flight (``refresh_one``, ``_finish``).

The suite drives the paths where several processes share one credential
(another runner holds the lease, this reader waits for it, a newer version
appears meanwhile) in child processes, which mutmut does not count. Here
they run in one process: a second :class:`Store` on the same vault stands
for the other process, a thread for its runner, and a wrapper around one
internal step (``_take_lease``, ``_wait``) lands the other process's move
exactly between two steps of this one. No test waits for a time.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyring_hardened import refresh
from keyring_hardened.config import Config
from keyring_hardened.errors import IntegrityError, StorageError
from keyring_hardened.refresh import Outcome, RefreshContext
from keyring_hardened.storage import SQLiteStorage
from keyring_hardened.store import Store

from .test_refresh import Clock, counting, events, install_plugin, runs

#: A bound on every wait for another thread: reached only when a test fails.
BOUND = 20.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(home: Path, clock: Clock) -> Iterator[Store]:
    s = Store.init(home, config=Config(refresh_timeout=5.0), actor="test", clock=clock)
    yield s
    s.close()


@pytest.fixture
def other(store: Store, home: Path, clock: Clock) -> Iterator[Store]:
    """The same vault opened by another process (here: another store in this one)."""
    s = Store.open(home, config=Config(refresh_timeout=5.0), actor="other", clock=clock)
    yield s
    s.close()


def _sql(home: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def _head_id(home: Path) -> int:
    return int(_sql(home, "SELECT id FROM credentials")[0][0])


def _lease_tokens(home: Path) -> list[bytes]:
    return [bytes(r[0]) for r in _sql(home, "SELECT token FROM refresh_leases")]


class Gated:
    """A Python refresher that records its context, says it runs, and waits to be let go."""

    def __init__(self, value: str = "from-other") -> None:
        self.value = value
        self.seen: list[RefreshContext] = []
        self.running = threading.Event()
        self.release = threading.Event()

    def __call__(self, context: RefreshContext) -> str:
        self.seen.append(context)
        self.running.set()
        self.release.wait(BOUND)
        return self.value


# -- waiting for a runner in another process ------------------------------------------------


def test_refresh_one_waits_by_default_for_the_runner_of_another_process(
        store: Store, other: Store, clock: Clock, home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    gated = Gated()
    store.set("svc", "u", "old", ttl=60, refresher=install_plugin(monkeypatch, "gated", gated))
    clock.now += 60
    head_id = _head_id(home)

    # The other process's runner: it holds the lease while its refresher runs.
    theirs: list[Outcome] = []
    runner = threading.Thread(target=lambda: theirs.append(
        refresh.refresh_one(other, "svc", "u", head_id, 1, wait=True)))
    runner.start()
    real_wait = refresh._wait
    waited: list[str] = []

    def wait(*args: Any) -> str:
        # This reader now waits: the other runner finishes (its new version
        # committed) before this reader's first look.
        gated.release.set()
        runner.join(BOUND)
        why = real_wait(*args)
        waited.append(why)
        return why

    monkeypatch.setattr(refresh, "_wait", wait)
    try:
        assert gated.running.wait(BOUND)
        # No ``wait=`` given: the default is to wait for the runner, not to give up.
        mine = refresh.refresh_one(store, "svc", "u", head_id, 1)
    finally:
        gated.release.set()
        runner.join(BOUND)
    assert not runner.is_alive()
    assert mine == Outcome("svc", "u", "changed")
    assert waited == ["changed"]  # it waited, and saw the other runner's new version
    assert theirs == [Outcome("svc", "u", "refreshed", 2)]
    # The refresher ran once, in the other process, for this very credential.
    assert [(c.service, c.username, c.version) for c in gated.seen] == [("svc", "u", 1)]
    assert store.get("svc", "u").reveal() == "from-other"


def test_a_reader_not_waiting_says_another_runner_holds_the_credential(
        store: Store, other: Store, clock: Clock, home: Path, tmp_path: Path) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    clock.now += 60
    head_id, theirs = _head_id(home), b"o" * 16
    assert refresh._take_lease(other, head_id, 1, theirs) == "ours"
    outcome = refresh.refresh_one(store, "svc", "u", head_id, 1, wait=False)
    assert outcome == Outcome("svc", "u", "held")
    assert (outcome.service, outcome.username) == ("svc", "u")
    assert _lease_tokens(home) == [theirs]  # the other runner's lease is left alone
    assert runs(tmp_path) == 0


def test_when_both_runners_let_go_without_a_value_the_reader_reports_it(
        store: Store, other: Store, clock: Clock, home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Two runners of other processes in a row give up (failed, or refused at
    # the door): the reader tries once more after the first, then reports it.
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    clock.now += 60
    head_id = _head_id(home)
    first, second = b"1" * 16, b"2" * 16
    assert refresh._take_lease(other, head_id, 1, first) == "ours"
    real_wait = refresh._wait
    waited: list[str] = []

    def wait(*args: Any) -> str:
        if not waited:
            refresh._drop_lease(other, head_id, first)
            why = real_wait(*args)
            # Before this reader looks again, another runner takes the lease.
            assert refresh._take_lease(other, head_id, 1, second) == "ours"
        else:
            refresh._drop_lease(other, head_id, second)
            why = real_wait(*args)
        waited.append(why)
        return why

    monkeypatch.setattr(refresh, "_wait", wait)
    outcome = refresh.refresh_one(store, "svc", "u", head_id, 1, wait=True)
    assert waited == ["gone", "gone"]
    assert outcome == Outcome("svc", "u", "waited-failed")
    assert runs(tmp_path) == 0  # the reader did not run the refresher itself
    assert _lease_tokens(home) == []
    assert store.history("svc", "u")[0].version == 1


def test_a_reader_waiting_on_a_tokenless_planted_lease_takes_over_when_it_expires(
        home: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    # The lease table is not trusted: one recreated without its constraints
    # can hold a lease with no token. It is a live runner's until it
    # expires, and a reader already waiting on it then takes over.
    # (refresh_timeout 1 s: a lease lasts at most 3 s.)
    spec = install_plugin(monkeypatch, "rot", lambda context: "taken-over")
    with Store.init(home, config=Config(refresh_timeout=1.0), actor="test",
                    clock=clock) as s:
        s.set("svc", "u", "old", ttl=60, refresher=spec)
        clock.now += 60
        head_id = _head_id(home)
        _sql(home, "DROP TABLE refresh_leases")
        _sql(home, "CREATE TABLE refresh_leases (credential_id INTEGER PRIMARY KEY,"
                   " holder TEXT, token BLOB, base_version INTEGER, expires_at REAL)")
        _sql(home, "INSERT INTO refresh_leases VALUES (?, 'ghost:1', NULL, 1, ?)",
             head_id, clock.now + 2)
        real_wait = refresh._wait
        waited: list[str] = []

        def wait(*args: Any) -> str:
            if not waited:
                clock.now += 2  # the planted lease runs out while the reader waits
            why = real_wait(*args)
            waited.append(why)
            return why

        monkeypatch.setattr(refresh, "_wait", wait)
        outcome = refresh.refresh_one(s, "svc", "u", head_id, 1, wait=True)
        assert waited == ["expired"]
        assert outcome == Outcome("svc", "u", "refreshed", 2)
        assert s.get("svc", "u").reveal() == "taken-over"


# -- a newer version appears while the lease is taken ---------------------------------------


def test_a_version_set_before_the_lease_is_taken_ends_the_refresh_unaudited(
        store: Store, other: Store, clock: Clock, home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    clock.now += 60
    head_id = _head_id(home)
    real_take = refresh._take_lease
    took: list[str] = []

    def take(*args: Any) -> str:
        # Another process sets a value between this reader's look and its lease.
        other.set("svc", "u", "by hand")
        found = real_take(*args)
        took.append(found)
        return found

    monkeypatch.setattr(refresh, "_take_lease", take)
    outcome = refresh.refresh_one(store, "svc", "u", head_id, 1, wait=True)
    assert took == ["changed"]
    assert outcome == Outcome("svc", "u", "changed")
    # Nothing was started: no refresh event, no refresher run, the set stands.
    assert events(home, "refresh") == []
    assert runs(tmp_path) == 0
    assert _lease_tokens(home) == []
    assert store.get("svc", "u").reveal() == "by hand"


# -- the refresher ----------------------------------------------------------------------------


def test_a_python_refresher_is_told_which_credential_it_refreshes(
        store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[RefreshContext] = []

    def rotator(context: RefreshContext) -> str:
        seen.append(context)
        return f"new-{context.service}-{context.username}"

    store.set("svc", "alice", "old", ttl=60, refresher=install_plugin(monkeypatch, "rot", rotator))
    clock.now += 60
    assert store.get("svc", "alice").reveal() == "new-svc-alice"
    assert [(c.service, c.username, c.version, c.expires_at) for c in seen] == [
        ("svc", "alice", 1, clock.now)]


def test_a_reader_interrupted_while_its_refresher_runs_lets_go_of_the_lease(
        store: Store, other: Store, clock: Clock, home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    clock.now += 60
    head_id = _head_id(home)

    def interrupted(*args: Any, **kwargs: Any) -> bytes:
        assert _lease_tokens(home) != []  # it holds the lease while the command runs
        raise KeyboardInterrupt  # Ctrl-C

    with monkeypatch.context() as patch:
        patch.setattr(refresh, "run_command", interrupted)
        with pytest.raises(KeyboardInterrupt):
            refresh.refresh_one(store, "svc", "u", head_id, 1, wait=True)
    assert _lease_tokens(home) == []
    # The next reader (another process) refreshes at once: no lease to wait out.
    assert refresh.refresh_one(other, "svc", "u", head_id, 1, wait=False) \
        == Outcome("svc", "u", "refreshed", 2)
    assert store.get("svc", "u").reveal() == "fresh-1"


# -- the write ------------------------------------------------------------------------------


def test_a_refresh_write_that_fails_part_way_keeps_nothing_of_it(
        store: Store, clock: Clock, home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The new version is written, then the refresh record cannot be (disk
    # error): the whole write is undone, so the credential reads as before.
    store.set("svc", "u", "old", ttl=600, refresher=counting(tmp_path))

    def broken(self: SQLiteStorage, head_id: int, blob: bytes | None) -> None:
        raise StorageError("disk I/O error", "io")

    with monkeypatch.context() as patch:
        patch.setattr(SQLiteStorage, "set_refresh", broken)
        with pytest.raises(StorageError, match="disk I/O error"):
            store.refresh("svc", "u")
    assert runs(tmp_path) == 1
    assert store.get("svc", "u").reveal() == "old"
    assert [v.version for v in store.history("svc", "u")] == [1]
    assert _lease_tokens(home) == []
    store.trail.verify()
    # And the next refresh writes normally.
    assert store.refresh("svc", "u") == Outcome("svc", "u", "refreshed", 2)
    assert store.get("svc", "u").reveal() == "fresh-2"


def test_a_refresh_write_refused_by_an_integrity_check_leaves_the_lease_as_it_was(
        store: Store, clock: Clock, home: Path, tmp_path: Path) -> None:
    # The current version is edited while the refresher runs: the write
    # transaction is refused whole, the lease drop in it included (letting
    # go is then the runner's own step, see refresh_one).
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    clock.now += 60
    head_id, token = _head_id(home), b"t" * 16
    assert refresh._take_lease(store, head_id, 1, token) == "ours"
    started = refresh._start(store, "svc", "u", head_id, 1, token, force=False)
    assert isinstance(started, refresh._Started)
    _sql(home, "UPDATE secret_versions SET ttl = 6000 WHERE version = 1")
    with pytest.raises(IntegrityError):
        refresh._finish(store, "svc", "u", started, token, b"late", None)
    assert _lease_tokens(home) == [token]
