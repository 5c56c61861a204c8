"""Tests that kill mutants of store.py which the rest of the suite let live.

Mostly the bounds of what the façade accepts, each tried at the limit and
one past it, and the answers of list, usernames, history and status.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from keyring_hardened.config import Config
from keyring_hardened.errors import ExpiredError, NotFoundError, UsageError
from keyring_hardened.refresh import command_spec
from keyring_hardened.store import MAX_NAME_BYTES, MAX_SECRET_BYTES, Store

from .conftest import FAST_KDF, PASSPHRASE
from .test_refresh import install_plugin


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_limits() -> None:
    assert (MAX_NAME_BYTES, MAX_SECRET_BYTES) == (4096, 1 << 20)


def test_names_up_to_4096_utf8_bytes(store: Store) -> None:
    longest = "é" * 2048  # 4096 bytes in UTF-8, 2048 characters
    store.set(longest, longest, "x")
    assert store.get(longest, longest).reveal() == "x"
    for bad in ("é" * 2048 + "a", "a" * 4097):
        with pytest.raises(UsageError):
            store.set(bad, "u", "x")
        with pytest.raises(UsageError):
            store.get("svc", bad)


def test_secrets_up_to_one_mebibyte(store: Store) -> None:
    store.set("svc", "u", "a" * MAX_SECRET_BYTES)
    assert len(store.get("svc", "u").reveal()) == MAX_SECRET_BYTES
    with pytest.raises(UsageError):
        store.set("svc", "u", "a" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(UsageError):
        store.set("svc", "u", "é" * (MAX_SECRET_BYTES // 2) + "a")


def test_empty_service_is_refused_but_an_empty_username_is_not(store: Store) -> None:
    with pytest.raises(UsageError):
        store.set("", "u", "x")
    store.set("svc", "", "x")
    assert store.get("svc", "").reveal() == "x"
    for call in (lambda: store.delete("", "u"), lambda: store.history("", "u"),
                 lambda: store.rollback("", "u"), lambda: store.usernames("")):
        with pytest.raises(UsageError):
            call()


@pytest.mark.parametrize("version", [0, -1, 2**63, True, 1.0, "1"])
def test_version_arguments_out_of_range(store: Store, version: object) -> None:
    store.set("svc", "u", "x")
    with pytest.raises(UsageError):
        store.get("svc", "u", version=version)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        store.rollback("svc", "u", to_version=version)  # type: ignore[arg-type]


def test_largest_version_argument_is_accepted(store: Store) -> None:
    # Versions are 32-bit in the envelope's associated data: the largest is accepted
    # (and not kept), one more is a usage error, never a struct.error.
    store.set("svc", "u", "x")
    with pytest.raises(NotFoundError):
        store.get("svc", "u", version=2**32 - 1)
    with pytest.raises(UsageError):
        store.get("svc", "u", version=2**32)
    assert store.get("svc", "u", version=1).reveal() == "x"


@pytest.mark.parametrize("ttl", [0, -5, True, "60", 100 * 365 * 86400 + 1])
def test_ttl_out_of_range(store: Store, ttl: object) -> None:
    with pytest.raises(UsageError):
        store.set("svc", "u", "x", ttl=ttl)  # type: ignore[arg-type]


def test_ttl_at_its_bounds_and_expiry_at_the_exact_second(home: Path) -> None:
    clock = Clock()
    with Store.init(home, clock=clock) as s:
        s.set("svc", "long", "x", ttl=100 * 365 * 86400)
        s.set("svc", "u", "x", ttl=60)
        s.set("svc", "f", "x", ttl=0.5)
        clock.now = 1_000_000.25
        assert s.get("svc", "f").reveal() == "x"
        clock.now = 1_000_060.0
        with pytest.raises(ExpiredError):
            s.get("svc", "u")
        clock.now = 1_000_059.5
        assert s.get("svc", "u").reveal() == "x"
        history = s.history("svc", "u")
        assert history[0].expires_at == 1_000_060.0
        assert s.get("svc", "long").reveal() == "x"


def test_an_old_version_expires_on_its_own_time(home: Path) -> None:
    clock = Clock()
    with Store.init(home, clock=clock) as s:
        s.set("svc", "u", "one", ttl=10)
        s.set("svc", "u", "two")
        clock.now += 10
        with pytest.raises(ExpiredError):
            s.get("svc", "u", version=1)
        assert s.get("svc", "u").reveal() == "two"
        with pytest.raises(ExpiredError):
            s.rollback("svc", "u")
        assert s.rollback("svc", "u", allow_expired=True) == 3
        entry = s.history("svc", "u")[0]
        assert (entry.version, entry.current, entry.expires_at) == (3, True, clock.now + 10)
        assert s.trail.show(op="rollback")[0].reason == "from-version-1"
        clock.now += 9
        assert s.get("svc", "u").reveal() == "one"


def test_rollback_of_an_unexpired_version_at_the_bound(home: Path) -> None:
    clock = Clock()
    with Store.init(home, clock=clock) as s:
        s.set("svc", "u", "one", ttl=10)
        s.set("svc", "u", "two")
        clock.now += 9.99
        assert s.rollback("svc", "u") == 3
        assert s.get("svc", "u").reveal() == "one"


def test_rollback_picks_the_newest_earlier_version(store: Store) -> None:
    for value in ("a", "b", "c"):
        store.set("svc", "u", value)
    assert store.rollback("svc", "u") == 4
    assert store.get("svc", "u").reveal() == "b"
    assert store.rollback("svc", "u", to_version=1) == 5
    assert store.get("svc", "u").reveal() == "a"
    with pytest.raises(UsageError) as info:
        store.rollback("svc", "u", to_version=5)
    assert info.value.reason == "already-current"
    store.delete("svc", "u")
    assert store.rollback("svc", "u") == 6
    assert store.get("svc", "u").reveal() == "a"


def test_deleted_credentials_and_their_errors(store: Store) -> None:
    store.set("svc", "u", "x")
    store.delete("svc", "u")
    with pytest.raises(NotFoundError) as info:
        store.get("svc", "u")
    assert info.value.reason == "deleted"
    with pytest.raises(NotFoundError) as info:
        store.delete("svc", "u")
    assert info.value.reason == "deleted"
    assert store.credentials() == []
    assert store.usernames("svc") == []
    assert [v.version for v in store.history("svc", "u")] == [1]
    assert not store.history("svc", "u")[0].current


def test_usernames_most_recent_first_ties_by_creation(home: Path) -> None:
    clock = Clock()
    with Store.init(home, clock=clock) as s:
        for name in ("a", "b", "c"):
            s.set("svc", name, "x")
        assert s.usernames("svc") == ["c", "b", "a"]
        clock.now += 1
        s.set("svc", "a", "y")
        assert s.usernames("svc") == ["a", "c", "b"]
        s.set("other", "z", "x")
        assert s.usernames("svc") == ["a", "c", "b"]
        assert s.usernames("absent") == []


def test_credentials_lists_live_ones_with_their_version_and_time(home: Path) -> None:
    clock = Clock()
    with Store.init(home, clock=clock) as s:
        s.set("svc", "a", "x")
        clock.now += 5
        s.set("svc", "a", "y")
        s.set("web", "b", "x")
        found = sorted(s.credentials())
        assert [(c.service, c.username, c.version, c.updated_at) for c in found] == [
            ("svc", "a", 2, 1_000_005.0), ("web", "b", 1, 1_000_005.0)]


def test_history_newest_first_with_each_versions_kek(store: Store) -> None:
    store.set("svc", "u", "a")
    store.keys.rotate()
    store.set("svc", "u", "b")
    history = store.history("svc", "u")
    assert [(h.version, h.kek_version, h.current) for h in history] == [(2, 2, True),
                                                                       (1, 1, False)]


def test_status_facts(home: Path) -> None:
    clock = Clock()
    cfg = Config(rotate_after=3600, max_wraps=5)
    with Store.init(home, config=cfg, clock=clock) as s:
        s.set("svc", "u", "x")
        s.set("svc", "u", "y")
        status = s.status()
        assert status["mode"] == "key file"
        assert status["key_file"] == str(home / "master.key")
        assert status["key_epoch"] == 1
        assert status["vault_id"] == s._vault.vault_id.hex()
        rotation = status["rotation"]
        assert rotation == {"active_version": 1, "rotate_after": 3600, "due_at": 1_003_600.0,
                            "wraps_left": 3, "max_wraps": 5}
        assert status["keys"][0]["versions"] == 2
        assert status["keys"][0]["wrap_count"] == 2
        assert status["warnings"] == []
        for _ in range(3):
            s.set("svc", "u", "z")
        assert s.status()["rotation"]["wraps_left"] == 0
    with Store.init(tmp_home(home), config=Config()) as s:
        assert s.status()["rotation"]["due_at"] is None


def tmp_home(home: Path) -> Path:
    return home.parent / "second"


def test_status_of_a_passphrase_vault_and_its_warnings(home: Path) -> None:
    weak = Config(argon2_memory_kib=19456, argon2_iterations=2, argon2_lanes=1)
    with Store.init(home, passphrase_mode=True, passphrase="long enough", config=weak) as s:
        status = s.status()
        assert status["mode"] == "passphrase"
        assert status["key_file"] is None
        assert status["warnings"] == []
    stronger_memory = Config(argon2_memory_kib=19457, argon2_iterations=2, argon2_lanes=1)
    with Store.open(home, passphrase="long enough", config=stronger_memory) as s:
        assert any("below the configured" in w for w in s.status()["warnings"])
    stronger_time = Config(argon2_memory_kib=19456, argon2_iterations=3, argon2_lanes=1)
    with Store.open(home, passphrase="long enough", config=stronger_time) as s:
        assert any("below the configured" in w for w in s.status()["warnings"])
    (home / "master.key").write_bytes(os.urandom(32))
    with Store.open(home, passphrase="long enough", config=weak) as s:
        assert any("does not open this passphrase vault" in w for w in s.status()["warnings"])


def test_pbkdf2_warning_only_below_the_configured_iterations(home: Path) -> None:
    with Store.init(home, passphrase_mode=True, kdf="pbkdf2", passphrase="long enough",
                    config=FAST_KDF) as s:
        assert s.status()["warnings"] == []
    more = Config(pbkdf2_iterations=600_001)
    with Store.open(home, passphrase="long enough", config=more) as s:
        assert any("600001" in w for w in s.status()["warnings"])


def test_status_warns_for_a_database_others_can_read(store: Store, home: Path) -> None:
    (home / "vault.db").chmod(0o604)
    assert any("vault.db" in w for w in store.status()["warnings"])
    (home / "vault.db").chmod(0o600)
    home.chmod(0o710)
    assert any(str(home) in w for w in store.status()["warnings"])
    home.chmod(0o700)
    assert store.status()["warnings"] == []


def _same_bucket(service: str) -> str:
    from keyring_hardened.state import bucket_of

    target = bucket_of(service)
    for i in range(1_000_000):
        if bucket_of(f"n{i}") == target:
            return f"n{i}"
    raise AssertionError("no name found")


def test_usernames_keep_to_their_service_within_a_bucket(store: Store) -> None:
    neighbour = _same_bucket("svc")
    store.set("svc", "alice", "x")
    store.set(neighbour, "mallory", "x")
    assert store.usernames("svc") == ["alice"]
    assert store.usernames(neighbour) == ["mallory"]
    event = store.trail.show(op="lookup")[0]
    assert (event.service, event.username) == (neighbour, None)


# -- policy test (Store.explain): reached in-process by few tests -------------------------

_EXPLAIN = """
[[policies]]
actors = ["*"]
services = ["prod/*"]
deny = ["read"]

[[rate_limits]]
actors = ["*"]
services = ["*"]
operations = ["read"]
limit = 1
per = "10s"
burst = 2

[[rate_limits]]
actors = ["*"]
services = ["*"]
operations = ["list"]
limit = 5
per = "1s"
burst = 5

[[rate_limits]]
actors = ["*"]
services = ["prod/*"]
operations = ["read"]
limit = 1
per = "1h"
burst = 1
"""


def _access(text: str) -> Config:
    return Config.from_mapping(tomllib.loads(text))


def test_explain_answers_for_the_request_asked(home: Path) -> None:
    clock = Clock()
    with Store.init(home, actor="admin", clock=clock) as s:
        s.set("ci/app", "deploy", "x")
        s.set("prod/db", "root", "y")
    with Store.open(home, actor="app", config=_access(_EXPLAIN), clock=clock) as s:
        e = s.explain("app", "read", "ci/app")
        assert (e.actor, e.op, e.service, e.allowed, e.unconfigured, e.seal) == (
            "app", "read", "ci/app", True, False, None)
        assert [(lim.rule.split(":")[0], lim.tokens, lim.retry_after) for lim in e.limits] == [
            ("rate_limits[0]", 2.0, 0.0)]
        # write is allowed where read is not; list of a service needs read too
        assert s.explain("app", "write", "prod/db").allowed
        assert not s.explain("app", "list", "prod/db").allowed
        assert s.explain("app", "list", "ci/app").allowed
        assert not s.explain("app", "read", "prod/db").allowed
        # a vault-wide list is matched by the list limit (index 1) for every service
        wide = s.explain("app", "list", None)
        assert [lim.rule.split(":")[0] for lim in wide.limits] == ["rate_limits[1]"]
        assert wide.service is None
        assert wide.allowed
        for bad in ("", "\x00"):
            with pytest.raises(UsageError):
                s.explain("app", "read", bad)
        with pytest.raises(UsageError):
            s.explain("app", "read", None)
        # the buckets as they stand: one read left, then none, then half a token
        s.get("ci/app", "deploy")
        one = s.explain("app", "read", "ci/app").limits[0]
        assert (one.tokens, one.retry_after) == (1.0, 0.0)
        s.get("ci/app", "deploy")
        none = s.explain("app", "read", "ci/app").limits[0]
        assert (none.tokens, none.retry_after) == (0.0, 10.0)
        clock.now += 5
        half = s.explain("app", "read", "ci/app").limits[0]
        assert half.tokens == pytest.approx(0.5)
        assert half.retry_after == pytest.approx(5.0)
        clock.now += 10
        more = s.explain("app", "read", "ci/app").limits[0]
        assert more.tokens == pytest.approx(1.5)
        assert more.retry_after == 0.0
        # a limit on prod/* applies to prod/db only
        assert [lim.rule.split(":")[0] for lim in s.explain("app", "read", "prod/db").limits] \
            == ["rate_limits[0]", "rate_limits[2]"]
    with Store.open(home, actor="admin", clock=clock) as s:
        assert s.explain("admin", "read", "ci/app").unconfigured
        s.seal()
        assert s.explain("admin", "read", "ci/app").seal == (clock.now, "admin")


# -- ttl: reached in-process only by the refresh tests -------------------------------------


def test_ttl_checks_its_arguments(store: Store) -> None:
    store.set("svc", "", "x")
    store.ttl("svc", "", ttl=100)  # an empty username is a username
    for kwargs in ({"ttl": -5}, {"ttl": True}, {"refresh_ahead": -5}, {"refresh_ahead": 0}):
        with pytest.raises(UsageError):
            store.ttl("svc", "", **kwargs)
    for service in ("", "a" * (MAX_NAME_BYTES + 1)):
        with pytest.raises(UsageError):
            store.ttl(service, "", ttl=100)
    with pytest.raises(UsageError):
        store.ttl("svc", "a" * (MAX_NAME_BYTES + 1), ttl=100)


def test_ttl_is_stored_audited_and_survives_reopening(home: Path) -> None:
    clock = Clock()
    with Store.init(home, clock=clock) as s:
        s.set("svc", "u", "x")
        s.set("svc", "u", "y")
        s.ttl("svc", "u", ttl=100)
        event = s.trail.show(op="ttl")[0]
        assert (event.service, event.username, event.reason) == ("svc", "u", "ttl-100s")
        assert [v.expires_at for v in s.history("svc", "u")] == [clock.now + 100, None]
    with Store.open(home, clock=clock) as s:
        assert s.get("svc", "u").reveal() == "y"
        clock.now += 100
        with pytest.raises(ExpiredError):
            s.get("svc", "u")
        s.ttl("svc", "u", ttl=None)
        assert s.trail.show(op="ttl")[0].reason == "ttl-none"
        assert s.get("svc", "u").reveal() == "y"
    with Store.open(home, clock=clock) as s:
        assert s.trail.verify().ok
        assert s.get("svc", "u").reveal() == "y"


def test_a_refused_ttl_change_leaves_nothing_behind(home: Path) -> None:
    clock = Clock()
    with Store.init(home, clock=clock) as s:
        s.set("svc", "u", "x")
        with pytest.raises(UsageError) as info:
            s.ttl("svc", "u", ttl=100, refresh_ahead=10)  # no refresher to refresh ahead
        assert info.value.reason == "no-refresher"
        assert [v.expires_at for v in s.history("svc", "u")] == [None]
    with Store.open(home, clock=clock) as s:
        clock.now += 1000
        assert s.get("svc", "u").reveal() == "x"


def test_ttl_keeps_the_stored_ttl_for_the_refresh_ahead_check(store: Store) -> None:
    store.set("svc", "u", "x")
    store.ttl("svc", "u", ttl=100)
    spec = command_spec(f"{sys.executable} -c pass")
    with pytest.raises(UsageError):
        store.ttl("svc", "u", refresher=spec, refresh_ahead=200)
    store.ttl("svc", "u", refresher=spec, refresh_ahead=50)
    store.ttl("svc", "u", refresh_ahead=None)
    assert store.trail.show(op="ttl")[0].reason == "ahead-none"
    store.ttl("svc", "u", refresh_ahead=50)
    # removing the refresher drops its window: a shorter TTL is no conflict then
    store.ttl("svc", "u", ttl=10, refresher=None)
    assert store.trail.show(op="ttl")[0].reason == "ttl-10s; refresher-removed"


# -- import (issue 14), in-process ---------------------------------------------------------


def test_import_secret_outcomes_and_events(store: Store) -> None:
    assert store.import_secret("svc", "", "a", source="old") == ("imported", 1)
    event = store.trail.show(op="import")[0]
    assert (event.service, event.username, event.reason) == ("svc", "", "from old")
    assert store.import_secret("svc", "", "b", source="old") == ("skipped", None)
    assert store.trail.show(op="import")[0].reason == "skipped, exists; from old"
    assert store.get("svc", "").reveal() == "a"
    assert store.import_secret("svc", "", "c", source="old", update=True) == ("updated", 2)
    assert store.trail.show(op="import")[0].reason == "from old"
    assert store.get("svc", "").reveal() == "c"


def test_import_secret_checks_its_arguments(store: Store) -> None:
    store.import_secret("svc", "u", "x", source="s" * 200)
    for kwargs in ({"source": ""}, {"source": "s" * 201}, {"source": "a\nb"},
                   {"source": "a\x00b"}):
        with pytest.raises(UsageError):
            store.import_secret("svc", "u", "x", **kwargs)  # type: ignore[arg-type]
    for service, username in (("", "u"), ("a" * (MAX_NAME_BYTES + 1), "u"),
                              ("svc", "a" * (MAX_NAME_BYTES + 1))):
        with pytest.raises(UsageError):
            store.import_secret(service, username, "x", source="s")


# -- refresh now, seal, unseal ---------------------------------------------------------------


def test_refresh_without_a_refresher_names_the_credential(store: Store) -> None:
    store.set("svc", "", "x")
    with pytest.raises(UsageError) as info:
        store.refresh("svc", "")
    assert info.value.reason == "no-refresher"
    event = store.trail.show(op="refresh")[0]
    assert (event.service, event.username, event.outcome) == ("svc", "", "usage")
    for service in ("", "a" * (MAX_NAME_BYTES + 1)):
        with pytest.raises(UsageError):
            store.refresh(service, "")


def test_unseal_is_audited_with_the_seal_time(home: Path) -> None:
    clock = Clock()
    with Store.init(home, clock=clock) as s:
        s.seal()
        clock.now += 7
        s.unseal()
        assert s.trail.show(op="unseal")[0].reason == f"sealed-since-{int(clock.now) - 7}"


def test_unseal_of_a_passphrase_vault_asks_the_prompt(home: Path) -> None:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.seal()
        s.unseal(prompt=lambda: PASSPHRASE)
        assert s.status()["sealed"] is None


def test_argument_errors_name_the_argument(store: Store) -> None:
    store.set("svc", "u", "x")
    long = "a" * (MAX_NAME_BYTES + 1)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("service", lambda: store.ttl("", "u", ttl=1)),
        ("username", lambda: store.ttl("svc", long, ttl=1)),
        ("ttl", lambda: store.ttl("svc", "u", ttl=-1)),
        ("refresh_ahead", lambda: store.ttl("svc", "u", refresh_ahead=-1)),
        ("service", lambda: store.import_secret("", "u", "x", source="s")),
        ("username", lambda: store.import_secret("svc", long, "x", source="s")),
        ("source", lambda: store.import_secret("svc", "u", "x", source="")),
        ("service", lambda: store.refresh("", "u")),
        ("username", lambda: store.refresh("svc", long)),
        ("service", lambda: store.explain("a", "read", "")),
    ]
    for what, call in calls:
        with pytest.raises(UsageError) as info:
            call()
        assert str(info.value).startswith(f"{what} "), (what, str(info.value))


def test_refresh_tries_three_times_while_others_keep_changing_it(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each round found a newer version than the one it started from (another
    # writer got there first): refresh gives up after three rounds and says so.
    from keyring_hardened import refresh as refreshing

    calls: list[tuple[bool, bool]] = []

    def changed(store: object, service: str, username: str, head_id: int, current: int, *,
                force: bool, wait: bool) -> refreshing.Outcome:
        calls.append((force, wait))
        return refreshing.Outcome(service, username, "changed")

    with Store.init(home) as s:
        s.set("svc", "u", "old", ttl=600, refresher=command_spec(f"{sys.executable} -c pass"))
        monkeypatch.setattr(refreshing, "refresh_one", changed)
        assert s.refresh("svc", "u") == refreshing.Outcome("svc", "u", "changed")
        assert calls == [(True, True)] * 3  # waits for a runner in another process
        calls.clear()
        assert s.refresh("svc", "u", due_only=True).result == "changed"
        assert calls == [(False, True)] * 3


def test_history_of_a_credential_without_username(store: Store) -> None:
    store.set("svc", "", "one")
    assert [v.version for v in store.history("svc", "")] == [1]


def test_refresh_ahead_window_starts_exactly_ahead_of_expiry(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process (a Python refresher), so it runs for mutants of the read path:
    # outside the window a read runs nothing; inside, the reader refreshes and
    # still gets the valid value.
    from keyring_hardened import refresh as refreshing

    runs: list[str] = []

    def rotate(context: refreshing.RefreshContext) -> str:
        runs.append(context.service)
        return f"fresh-{len(runs)}"

    spec = install_plugin(monkeypatch, "rotate", rotate)
    now = [1_000_000.0]
    with Store.init(home, clock=lambda: now[0]) as s:
        s.set("svc", "u", "old", ttl=600, refresher=spec,
              refresh_ahead=120)
        now[0] += 479  # one second before the window
        assert s.get("svc", "u").reveal() == "old"
        assert runs == []
        now[0] += 1  # at its start
        assert s.get("svc", "u").reveal() == "old"
        assert runs == ["svc"]
        assert s.get("svc", "u").reveal() == "fresh-1"


def test_a_new_value_clears_the_refreshers_failure_count(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The back-off after failed refreshes grows with their count; a value set
    # by hand starts it over.
    from keyring_hardened import refresh as refreshing

    def down(context: refreshing.RefreshContext) -> str:
        raise RuntimeError("upstream down")

    spec = install_plugin(monkeypatch, "down", down)

    def refresh_state(s: Store) -> refreshing.RefreshState:
        with s._guard() as storage:
            (hint,) = storage.refresh_hints()
        return refreshing.decode_state(hint[5])

    with Store.init(home) as s:
        s.set("svc", "u", "old", ttl=600, refresher=spec)
        assert s.refresh("svc", "u").result == "failed"
        assert s.refresh("svc", "u").result == "failed"
        assert refresh_state(s).failures == 2
        s.set("svc", "u", "set by hand")
        state = refresh_state(s)
        assert (state.failure, state.failed_at, state.failures) == (None, None, 0)
