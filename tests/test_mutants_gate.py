"""Tests that kill mutants of gate.py which the rest of the suite let live.

The door's decisions are proven in test_policies.py; these pin what it
keeps between requests (the per-session cache of decisions, bounded) and
what it does with the stored buckets: a bucket of a rule this process does
not know is kept for exactly a day, every other actor's bucket is kept
while it is short of tokens, and the tokens a request took stay taken when
the operation itself fails.
"""

from __future__ import annotations

import sqlite3
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

from keyring_hardened import access, gate
from keyring_hardened.config import Config
from keyring_hardened.errors import DeniedError, LockedError, NotFoundError, RateLimitedError
from keyring_hardened.store import Store

POLICIES = """
default_policy = "deny"

[[policies]]
actors = ["app", "other-*"]
services = ["ci/*"]
allow = ["read", "delete"]

[[policies]]
actors = ["ops"]
services = ["*"]
allow = ["*"]

[[policies]]
actors = ["app"]
services = ["ci/secret"]
deny = ["read"]
"""

LIMIT = """
[[rate_limits]]
actors = ["*"]
services = ["ci/*"]
operations = ["read", "delete"]
limit = 1
per = "10s"
burst = 2
"""


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _open(home: Path, actor: str, text: str, clock: Clock) -> Store:
    return Store.open(home, actor=actor, config=Config.from_mapping(tomllib.loads(text)),
                      clock=clock)


@pytest.fixture
def seeded(home: Path) -> Path:
    with Store.init(home, actor="ops") as s:
        for service in ("ci/a", "ci/b", "ci/c", "ci/secret"):
            s.set(service, "deploy", f"{service}-token")
    return home


def _buckets(home: Path) -> list[tuple[str, float]]:
    with sqlite3.connect(home / "vault.db") as conn:
        return list(conn.execute("SELECT actor, tokens FROM rate_buckets ORDER BY actor"))


@pytest.fixture
def matched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every name access control matches a glob list against, in order."""
    names: list[str] = []
    real = access._any

    def counting(globs: Sequence[str], name: str) -> bool:
        names.append(name)
        return real(globs, name)

    monkeypatch.setattr(access, "_any", counting)
    return names


def test_a_repeated_request_matches_no_glob_again(seeded: Path, matched: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    named: list[object] = []
    real = gate.bucket_rule

    def naming(rule: access.RateLimit) -> str:
        named.append(rule)
        return real(rule)

    monkeypatch.setattr(gate, "bucket_rule", naming)
    clock = Clock()
    with _open(seeded, "app", POLICIES + LIMIT, clock) as s:
        assert s.get("ci/a", "deploy").reveal() == "ci/a-token"
        first = list(matched)
        assert "app" in first  # the actor's globs were matched
        assert "ci/a" in first  # and the services'
        assert named  # and the buckets named
        matched.clear()
        named.clear()
        clock.now += 10
        assert s.get("ci/a", "deploy").reveal() == "ci/a-token"
        assert matched == []  # the same request: decided from the session's cache
        assert named == []  # and its buckets' names, and the rules by name, too


def test_an_actors_globs_are_matched_once_then_only_services(seeded: Path,
                                                            matched: list[str]) -> None:
    clock = Clock()
    with _open(seeded, "app", POLICIES + LIMIT, clock) as s:
        s.get("ci/a", "deploy")
        matched.clear()
        assert s.get("ci/b", "deploy").reveal() == "ci/b-token"
        assert matched  # the new service's globs were matched
        assert "app" not in matched  # the actor's were not, for policies nor limits
        matched.clear()
        with pytest.raises(DeniedError):
            s.get("ci/secret", "deploy")
        assert "app" not in matched
        # Another operation of the same actor matches the actor's globs once more.
        matched.clear()
        clock.now += 20
        with pytest.raises(NotFoundError):
            s.delete("ci/c", "nobody")
        assert "app" in matched


def test_the_decision_cache_is_bounded_and_decides_the_same_after_a_reset(
        seeded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Policies only: with rate limits the cache also keeps the rules by bucket name.
    monkeypatch.setattr(gate, "_CACHE_LIMIT", 4)
    clock = Clock()
    with _open(seeded, "app", POLICIES, clock) as s:
        for _ in range(3):
            for service in ("ci/a", "ci/b", "ci/c"):
                clock.now += 10
                assert s.get(service, "deploy").reveal() == f"{service}-token"
                assert len(s._access_cache) <= 4
            clock.now += 10
            with pytest.raises(DeniedError):
                s.get("ci/secret", "deploy")
            assert len(s._access_cache) <= 4
            with pytest.raises(DeniedError):
                s.get("prod/db", "deploy")
            assert len(s._access_cache) <= 4


def test_a_foreign_rules_bucket_is_kept_for_exactly_a_day(seeded: Path) -> None:
    clock = Clock()
    other = LIMIT.replace("burst = 2", "burst = 3")  # another process's rule
    with _open(seeded, "app", other, clock) as s:
        s.get("ci/a", "deploy")
    assert _buckets(seeded) == [("app", 2.0)]
    clock.now += 86400  # a day to the second: still kept
    with _open(seeded, "ops", LIMIT, clock) as s:
        s.get("ci/a", "deploy")
    assert _buckets(seeded) == [("app", 2.0), ("ops", 1.0)]
    clock.now += 0.5  # a day and a half second: dropped
    with _open(seeded, "ops", LIMIT, clock) as s:
        s.get("ci/a", "deploy")
    assert [actor for actor, _ in _buckets(seeded)] == ["ops"]
    with Store.open(seeded, actor="ops") as s:
        assert s.trail.verify().ok


def test_every_other_actors_bucket_is_kept_while_short(seeded: Path) -> None:
    clock = Clock()
    for actor in ("app", "other-1", "other-2"):
        with _open(seeded, actor, POLICIES + LIMIT, clock) as s:
            s.get("ci/a", "deploy")
            clock.now += 1
    # "app" sorts first among the stored buckets; its next request must keep the others.
    with _open(seeded, "app", POLICIES + LIMIT, clock) as s:
        s.get("ci/a", "deploy")
    assert [actor for actor, _ in _buckets(seeded)] == ["app", "other-1", "other-2"]
    # The state root covers them all: a fresh open verifies, and each is still short.
    for actor in ("other-1", "other-2"):
        with _open(seeded, actor, POLICIES + LIMIT, clock) as s:
            s.get("ci/a", "deploy")
            with pytest.raises(RateLimitedError):
                s.get("ci/a", "deploy")
    with Store.open(seeded, actor="ops") as s:
        assert s.trail.verify().ok


def test_tokens_taken_stay_taken_when_the_operation_fails(seeded: Path) -> None:
    clock = Clock()
    with _open(seeded, "app", POLICIES + LIMIT, clock) as s:
        for _ in range(2):
            with pytest.raises(NotFoundError):
                s.delete("ci/a", "nobody")  # granted, then fails: the token is spent
        with pytest.raises(RateLimitedError):
            s.delete("ci/a", "nobody")
    with _open(seeded, "app", POLICIES + LIMIT, clock) as s, \
            pytest.raises(RateLimitedError):
        s.get("ci/b", "deploy")  # the same bucket (read and delete), seen by a new process
    with Store.open(seeded, actor="ops") as s:
        assert s.trail.verify().ok


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.04, "0.1 s"), (0.44, "0.4 s"), (9.94, "9.9 s"), (10.0, "10 s"), (10.5, "10 s"),
    (119.4, "119 s"), (120.0, "2 min"), (120.5, "2 min"), (3600.0, "60 min")])
def test_a_wait_is_shown_as_a_person_reads_it(seconds: float, shown: str) -> None:
    assert gate._wait(seconds) == shown


def test_a_sealed_vaults_refusal_names_when_and_by_whom(seeded: Path) -> None:
    clock = Clock(1_800_000_000.0)  # 2027-01-15T08:00:00Z
    with Store.open(seeded, actor="ops", clock=clock) as s:
        s.seal()
        clock.now += 3600
        with pytest.raises(LockedError) as info:
            s.get("ci/a", "deploy")
    assert info.value.reason == "sealed"
    assert "the vault is sealed (since 2027-01-15T08:00:00Z, by ops)" in str(info.value)


def test_admin_is_judged_over_the_whole_vault(seeded: Path) -> None:
    # Admin is over the whole vault, matched as the service "*": a rule for some
    # services never grants it; one whose glob matches "*" (such as "?") does.
    text = ('default_policy = "deny"\n[[policies]]\nactors = ["app"]\nservices = ["ci/*"]\n'
            'allow = ["*"]\n')
    clock = Clock()
    with _open(seeded, "app", text, clock) as s:
        with pytest.raises(DeniedError) as info:
            s.keys.rotate()
        assert "actor 'app' may not admin the whole vault" in str(info.value)
        assert s.get("ci/a", "deploy").reveal() == "ci/a-token"
    with _open(seeded, "app", text.replace('"ci/*"', '"?"'), clock) as s:
        assert s.keys.rotate() == 2


def test_an_imported_entry_is_judged_as_admin_over_the_whole_vault(seeded: Path) -> None:
    # Each imported entry is an admin request, and admin is over the whole vault:
    # a rule about the entry's service neither grants nor denies it.
    text = POLICIES + ('[[policies]]\nactors = ["ops"]\nservices = ["ci/*"]\n'
                       'deny = ["admin"]\n')
    with _open(seeded, "ops", text, Clock()) as s:
        assert s.import_secret("ci/new", "u", "v", source="old") == ("imported", 1)


def test_a_rate_limit_refusal_names_every_rule_that_refused(seeded: Path) -> None:
    both = LIMIT + LIMIT.replace('services = ["ci/*"]', 'services = ["ci/a"]')
    clock = Clock()
    with _open(seeded, "app", POLICIES + both, clock) as s:
        s.get("ci/a", "deploy")
        s.get("ci/a", "deploy")
        with pytest.raises(RateLimitedError) as info:
            s.get("ci/a", "deploy")
    assert "(rate_limits[0], rate_limits[1]); retry in 10 s" in str(info.value)
