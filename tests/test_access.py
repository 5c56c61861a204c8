"""Pure access-control decisions: policies, token buckets, unlock throttle, config errors.

No test sleeps: every clock is an explicit ``now``.
"""

from __future__ import annotations

import math
import textwrap
import tomllib
from fnmatch import fnmatchcase
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyring_hardened.access import (
    ACCESS_KEYS,
    MAX_UNLOCK_DELAY,
    OPERATIONS,
    AccessConfig,
    Bucket,
    BucketKey,
    Identity,
    LimitMatch,
    Policy,
    RateLimit,
    check_all,
    decide,
    limits_for,
    parse_access,
    take,
    throttle_check,
    throttle_delay,
    tokens_now,
)

from .conftest import CANARY


def _config(doc: dict[str, Any]) -> AccessConfig:
    config, problems = parse_access(doc)
    assert problems == []
    assert config is not None
    return config


def _problems(doc: dict[str, Any]) -> list[str]:
    config, problems = parse_access(doc)
    assert config is None
    assert problems
    return problems


def _policy(actors: list[str], services: list[str], allow: list[str] | None = None,
            deny: list[str] | None = None) -> Policy:
    table: dict[str, Any] = {"actors": actors, "services": services}
    if allow is not None:
        table["allow"] = allow
    if deny is not None:
        table["deny"] = deny
    return _config({"policies": [table]}).policies[0]


def _limit(limit: int = 5, per: str = "10s", burst: int | None = None,
           operations: tuple[str, ...] = ("*",)) -> RateLimit:
    table: dict[str, Any] = {"actors": ["*"], "services": ["*"], "operations": list(operations),
                             "limit": limit, "per": per}
    if burst is not None:
        table["burst"] = burst
    return _config({"rate_limits": [table]}).rate_limits[0]


# --- parsing: the valid shapes --------------------------------------------------------


def test_the_design_example_parses() -> None:
    config = _config({
        "max_versions": 10,  # not ours: ignored here, config.py checks it
        "default_policy": "allow",
        "policies": [{"actors": ["ci-*"], "services": ["prod/*"],
                      "deny": ["read", "write", "delete"]}],
        "rate_limits": [{"actors": ["*"], "services": ["*"], "operations": ["read"],
                         "limit": 50, "per": "1s", "burst": 100}],
    })
    assert config.default_policy == "allow"
    assert config.policies == (Policy(("ci-*",), ("prod/*",), frozenset(),
                                      frozenset({"read", "write", "delete"})),)
    limit = config.rate_limits[0]
    assert limit == RateLimit(("*",), ("*",), frozenset({"read"}), 50, 1.0, 100)
    assert limit.rate == 50.0
    assert limit.describe(0) == ("rate_limits[0]: 50 per 1s, burst 100 "
                                 "(actors *; services *; operations read)")


def test_toml_as_tomllib_parses_it() -> None:
    doc = tomllib.loads(textwrap.dedent("""
        default_policy = "deny"

        [[policies]]
        actors = ["ci-*"]
        services = ["ci/*"]
        allow = ["read", "list"]

        [[rate_limits]]
        actors = ["*"]
        services = ["*"]
        operations = ["read"]
        limit = 5
        per = "10s"
        burst = 5
    """))
    config = _config(doc)
    assert config.default_policy == "deny"
    assert config.policies[0].allow == frozenset({"read", "list"})
    assert config.rate_limits[0].rate == 0.5


def test_empty_document_is_allow_everything() -> None:
    assert _config({}) == AccessConfig("allow", (), ())
    assert {"default_policy", "policies", "rate_limits"} == ACCESS_KEYS


def test_operation_globs_expand_to_names() -> None:
    assert _policy(["*"], ["*"], deny=["*"]).deny == frozenset(OPERATIONS)
    assert _policy(["*"], ["*"], allow=["[rl]*"]).allow == frozenset({"read", "list"})
    assert _limit(operations=("d*", "write")).operations == frozenset({"delete", "write"})


def test_burst_defaults_to_limit() -> None:
    assert _limit(limit=7).burst == 7
    assert _limit(limit=7, burst=3).burst == 3


# --- parsing: every error kind, all at once ---------------------------------------------


def test_every_error_is_reported_at_once() -> None:
    problems = _problems({
        "default_policy": "maybe",
        "policies": [
            {"actors": ["*"], "services": ["*"], "allow": ["read"]},
            {"actors": ["a[bc"], "services": [], "deny": ["read"], "alow": ["write"]},
            {"actors": ["*"], "services": ["*"], "allow": ["read", "raed"]},
        ],
        "rate_limits": [
            {"actors": ["*"], "services": ["*"], "operations": ["read"], "limit": 0,
             "per": "soon", "burst": -3},
        ],
    })
    assert problems == [
        'default_policy: must be "allow" or "deny"',
        'policies[1].alow: unknown key (expected actors, services, allow, deny)',
        'policies[1].actors[0]: unbalanced "[" in glob (write "[[]" to match a literal "[")',
        "policies[1].services: must not be empty",
        'policies[2].allow[1]: unknown operation "raed" '
        "(expected read, write, delete, list or admin)",
        "rate_limits[0].limit: must be between 1 and 1000000000, got 0",
        "rate_limits[0].per: expected a positive duration such as 90s, 15m, 12h or 30d",
        "rate_limits[0].burst: must be between 1 and 1000000000, got -3",
    ]


@pytest.mark.parametrize(("doc", "expected"), [
    ({"default_policy": True}, "default_policy: expected a string, got a boolean"),
    ({"policies": {"actors": ["*"]}},
     "policies: expected an array of tables ([[policies]]), got a table"),
    ({"policies": ["x"]}, "policies: expected an array of tables ([[policies]]), got a list"),
    ({"rate_limits": 3},
     "rate_limits: expected an array of tables ([[rate_limits]]), got an integer"),
    ({"policies": [{"services": ["*"], "deny": ["read"]}]},
     'policies[0].actors: missing (a list such as ["*"])'),
    ({"policies": [{"actors": "ci-*", "services": ["*"], "deny": ["read"]}]},
     "policies[0].actors: expected a list of strings, got a string"),
    ({"policies": [{"actors": ["*", 7], "services": ["*"], "deny": ["read"]}]},
     "policies[0].actors[1]: expected a string, got an integer"),
    ({"policies": [{"actors": [""], "services": ["*"], "deny": ["read"]}]},
     'policies[0].actors[0]: must not be empty ("*" matches everything)'),
    ({"policies": [{"actors": ["*"], "services": ["*"]}]},
     "policies[0]: needs allow or deny (or both)"),
    ({"policies": [{"actors": ["*"], "services": ["*"], "allow": []}]},
     "policies[0].allow: must not be empty"),
    ({"policies": [{"actors": ["*"], "services": ["db[z-a]"], "deny": ["read"]}]},
     "policies[0].services[0]: reversed range in glob (it would match nothing)"),
    ({"policies": [{"actors": ["*"], "services": ["*"], "deny": ["[re"]}]},
     'policies[0].deny[0]: unknown operation (expected read, write, delete, list or admin)'),
    ({"policies": [{"actors": ["*"], "services": ["*"], "deny": ["READ"]}]},
     "policies[0].deny[0]: unknown operation (expected read, write, delete, list or admin)"),
    ({"policies": [{"actors": ["*"], "services": ["*"], "deny": ["x*"]}]},
     'policies[0].deny[0]: unknown operation (expected read, write, delete, list or admin)'),
    ({"rate_limits": [{"actors": ["*"], "services": ["*"], "limit": 1, "per": "1s"}]},
     'rate_limits[0].operations: missing (a list such as ["*"])'),
    ({"rate_limits": [{"actors": ["*"], "services": ["*"], "operations": ["*"], "per": "1s"}]},
     "rate_limits[0].limit: missing (a whole number of requests)"),
    ({"rate_limits": [{"actors": ["*"], "services": ["*"], "operations": ["*"], "limit": 1}]},
     "rate_limits[0].per: missing (a duration such as 1s or 10m)"),
    ({"rate_limits": [{"actors": ["*"], "services": ["*"], "operations": ["*"], "limit": 1.5,
                       "per": "1s"}]},
     "rate_limits[0].limit: expected a whole number, got a number"),
    ({"rate_limits": [{"actors": ["*"], "services": ["*"], "operations": ["*"], "limit": True,
                       "per": "1s"}]},
     "rate_limits[0].limit: expected a whole number, got a boolean"),
    ({"rate_limits": [{"actors": ["*"], "services": ["*"], "operations": ["*"], "limit": 1,
                       "per": 10}]},
     "rate_limits[0].per: expected a duration such as 90s, 15m, 12h or 30d"),
    ({"rate_limits": [{"actors": ["*"], "services": ["*"], "operations": ["*"], "limit": 1,
                       "per": "1s", "burst": 10**10}]},
     "rate_limits[0].burst: must be between 1 and 1000000000, got 10000000000"),
    ({"rate_limits": [{"actors": ["*"], "services": ["*"], "operations": ["*"], "limit": 1,
                       "per": "1s", "window": "1m"}]},
     "rate_limits[0].window: unknown key "
     "(expected actors, services, operations, limit, per, burst)"),
    ({"rate_limits": [{"actors": ["*"], "services": ["*"], "operations": ["*"], "limit": 1,
                       "per": "1s", "a key with spaces": 1}]},
     "rate_limits[0]: unknown key (expected actors, services, operations, limit, per, burst)"),
])
def test_each_error_names_its_key(doc: dict[str, Any], expected: str) -> None:
    assert _problems(doc) == [expected]


def test_other_types_are_named_by_type() -> None:
    assert _problems({"default_policy": None}) == [
        "default_policy: expected a string, got NoneType"]


def test_a_secret_pasted_anywhere_is_never_echoed() -> None:
    doc = {
        "default_policy": CANARY,
        "policies": [{"actors": [f"[{CANARY}"], "services": ["*"], "deny": [CANARY],
                      CANARY: 1, "allow": [CANARY.lower()]}],
        "rate_limits": [{"actors": ["*"], "services": ["*"], "operations": [CANARY],
                         "limit": CANARY, "per": CANARY, "burst": CANARY}],
    }
    problems = _problems(doc)
    assert len(problems) == 9
    for problem in problems:
        assert CANARY not in problem
        assert CANARY.lower() not in problem
        assert "7f3a9c1e" not in problem


# --- policies -----------------------------------------------------------------------


def test_deny_beats_allow_whatever_the_order() -> None:
    allow = _policy(["ci-*"], ["prod/*"], allow=["read"])
    deny = _policy(["*"], ["prod/db"], deny=["read"])
    for policies in ([allow, deny], [deny, allow]):
        d = decide(policies, "allow", Identity("ci-1"), "read", "prod/db")
        assert not d.allowed
        assert d.rule == policies.index(deny)
        assert d.reason == f"policies[{d.rule}] (actors *; services prod/db) denies read"
        assert set(d.matched) == {0, 1}


def test_deny_beats_allow_in_one_rule() -> None:
    both = _policy(["*"], ["*"], allow=["read", "write"], deny=["write"])
    assert decide([both], "deny", Identity("a"), "read", "s").allowed
    assert not decide([both], "allow", Identity("a"), "write", "s").allowed


def test_allow_names_its_rule() -> None:
    policies = [_policy(["ops"], ["*"], deny=["admin"]), _policy(["ci-*"], ["ci/*"], ["read"])]
    d = decide(policies, "deny", Identity("ci-7"), "read", "ci/token")
    assert d.allowed
    assert d.rule == 1
    assert d.reason == "policies[1] (actors ci-*; services ci/*) allows read"
    assert d.matched == (1,)


@pytest.mark.parametrize("default", ["allow", "deny"])
def test_default_applies_when_no_rule_matches(default: Any) -> None:
    ci = _policy(["ci-*"], ["ci/*"], allow=["read"])
    d = decide([ci], default, Identity("alice:python"), "read", "ci/token")
    assert d.allowed is (default == "allow")
    assert d.rule is None
    assert d.matched == ()
    assert d.reason == f"no policy matches; default_policy is {default}"
    # A rule that matches but says nothing about the operation does not decide.
    d = decide([ci], default, Identity("ci-1"), "write", "ci/token")
    assert d.allowed is (default == "allow")
    assert (d.rule, d.matched) == (None, (0,))
    assert d.reason == f"no matching policy names write; default_policy is {default}"
    assert decide([], default, Identity("x"), "admin", "y").allowed is (default == "allow")


def test_verified_identity_is_decided_alike() -> None:
    rule = [_policy(["uid:1000"], ["*"], deny=["read"])]
    assert decide(rule, "allow", Identity("uid:1000", verified=True), "read", "s") == \
        decide(rule, "allow", Identity("uid:1000"), "read", "s")


def test_unknown_operation_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="op must be one of"):
        decide([], "allow", Identity("a"), "raed", "s")


@pytest.mark.parametrize(("glob", "name", "matches"), [
    ("*", "", True),                 # * matches the empty name too
    ("*", "any/thing:with spaces", True),
    ("*:*", ":python", True),        # an empty user part
    (":*", ":python", True),
    ("?*:*", ":python", False),      # a user part of one character or more
    ("ci-?", "ci-1", True),
    ("ci-?", "ci-12", False),
    ("ci-?", "ci-", False),
    ("db[ab]", "dba", True),
    ("db[ab]", "dbc", False),
    ("db[!ab]", "dbc", True),
    ("prod/*", "prod/", True),
    ("prod/*", "prod/a/b", True),    # * crosses slashes: services are not paths
    ("prod/*", "Prod/a", False),     # case-sensitive on every platform
    ("weird[[]1]", "weird[1]", True),  # a literal [ via [[]
    ("what[?]", "what?", True),        # a literal ?
    ("what[?]", "whatx", False),
    ("star[*]", "star*", True),        # a literal *
    ("star[*]", "starx", False),
    ("a]b", "a]b", True),              # a lone ] is a literal
    ("x[]]", "x]", True),              # a leading ] inside brackets is a member
    ("x[!]]", "xa", True),
])
def test_glob_edge_cases(glob: str, name: str, matches: bool) -> None:
    rule = _policy([glob], [glob], deny=["read"])
    assert rule.matches(name, name) is matches
    d = decide([rule], "allow", Identity(name), "read", name)
    assert d.allowed is not matches
    assert limits_for([_with_globs(glob)], name, "read", name) == (
        (LimitMatch((0, name), _with_globs(glob)),) if matches else ())


def _with_globs(glob: str) -> RateLimit:
    return _config({"rate_limits": [{"actors": [glob], "services": [glob], "operations": ["*"],
                                     "limit": 1, "per": "1s"}]}).rate_limits[0]


def test_literal_glob_characters_without_escaping_also_match_themselves() -> None:
    # A service literally named "a*b" is matched by the glob "a*b" (and by more).
    assert _policy(["*"], ["a*b"], deny=["read"]).matches("x", "a*b")


def test_reversed_range_really_matches_nothing_in_fnmatch() -> None:
    # Why the parser refuses it: fnmatch would silently never match.
    assert not any(fnmatchcase(c, "[z-a]") for c in "az-")


@pytest.mark.parametrize("glob", ["[", "a[b", "[!]", "[]", "x[!", "ok[a]then[b"])
def test_unbalanced_brackets_are_refused(glob: str) -> None:
    problems = _problems({"policies": [{"actors": [glob], "services": ["*"],
                                        "deny": ["read"]}]})
    assert problems == ['policies[0].actors[0]: unbalanced "[" in glob '
                        '(write "[[]" to match a literal "[")']


@pytest.mark.parametrize("glob", ["[a-z]", "[--0]", "[a-]", "[-a]", "[!a-c]", "x[]-a]"])
def test_valid_ranges_are_accepted(glob: str) -> None:
    _config({"policies": [{"actors": [glob], "services": ["*"], "deny": ["read"]}]})


# --- rate limits: matching ------------------------------------------------------------


def test_limits_for_matches_actor_service_and_operation() -> None:
    config = _config({"rate_limits": [
        {"actors": ["*"], "services": ["*"], "operations": ["read"], "limit": 50, "per": "1s"},
        {"actors": ["ci-*"], "services": ["*"], "operations": ["*"], "limit": 5, "per": "1m"},
        {"actors": ["*"], "services": ["prod/*"], "operations": ["write"], "limit": 1,
         "per": "1h"},
    ]})
    limits = config.rate_limits
    assert [m.key for m in limits_for(limits, "ci-1", "read", "dev/x")] == [(0, "ci-1"),
                                                                          (1, "ci-1")]
    assert [m.key for m in limits_for(limits, "bob", "write", "prod/db")] == [(2, "bob")]
    assert limits_for(limits, "bob", "delete", "dev/x") == ()
    assert limits_for(limits, "ci-1", "read", "dev/x")[1].rule is limits[1]


# --- token arithmetic under explicit clocks -------------------------------------------


def test_a_new_bucket_starts_full_and_drains() -> None:
    rule = _limit(limit=5, per="10s", burst=5)  # 0.5 token a second
    state: Bucket | None = None
    for expected in (4.0, 3.0, 2.0, 1.0, 0.0):
        granted, state, wait = take(state, rule, 100.0)
        assert granted
        assert wait == 0.0
        assert state == Bucket(expected, 100.0)
    granted, after, wait = take(state, rule, 100.0)
    assert not granted
    assert after == Bucket(0.0, 100.0)
    assert wait == 2.0  # one token at 0.5/s


def test_refill_is_fractional_and_retry_after_counts_the_fraction() -> None:
    rule = _limit(limit=5, per="10s", burst=5)
    granted, state, wait = take(Bucket(0.0, 100.0), rule, 101.0)  # 0.5 token
    assert not granted
    assert state == Bucket(0.5, 101.0)
    assert wait == 1.0
    granted, state, wait = take(state, rule, 101.5)  # 0.75
    assert (granted, wait) == (False, 0.5)
    granted, state, wait = take(state, rule, 102.0)  # exactly 1.0
    assert (granted, state, wait) == (True, Bucket(0.0, 102.0), 0.0)
    assert tokens_now(Bucket(0.25, 0.0), rule, 1.0) == Bucket(0.75, 1.0)


def test_refill_is_capped_at_burst() -> None:
    rule = _limit(limit=50, per="1s", burst=100)
    assert tokens_now(Bucket(10.0, 0.0), rule, 3600.0) == Bucket(100.0, 3600.0)
    assert tokens_now(Bucket(10.0, 0.0), rule, 1.0) == Bucket(60.0, 1.0)
    # A burst that shrank since the state was written caps what is stored.
    assert tokens_now(Bucket(100.0, 5.0), _limit(limit=5, burst=3), 5.0) == Bucket(3.0, 5.0)


def test_a_clock_going_backwards_mints_nothing() -> None:
    rule = _limit(limit=1, per="1s", burst=10)
    state = Bucket(2.0, 1000.0)
    assert tokens_now(state, rule, 400.0) == Bucket(2.0, 1000.0)
    granted, state, _ = take(state, rule, 400.0)
    assert granted
    assert state == Bucket(1.0, 1000.0)
    # Forward again from the latest time seen, not from the earlier reading.
    assert tokens_now(state, rule, 1001.0) == Bucket(2.0, 1001.0)
    # An oscillating clock gains nothing either.
    for now in (500.0, 1000.0, 500.0, 1000.0):
        assert tokens_now(state, rule, now) == Bucket(1.0, 1000.0)


@pytest.mark.parametrize("state", [Bucket(math.nan, 0.0), Bucket(math.inf, 0.0),
                                   Bucket(1.0, math.nan), Bucket(1.0, -math.inf)])
def test_a_corrupt_state_reads_as_empty(state: Bucket) -> None:
    rule = _limit(limit=5, per="10s", burst=5)
    assert tokens_now(state, rule, 50.0) == Bucket(0.0, 50.0)
    assert take(state, rule, 50.0) == (False, Bucket(0.0, 50.0), 2.0)


def test_negative_tokens_are_read_as_zero() -> None:
    assert tokens_now(Bucket(-7.0, 0.0), _limit(limit=1, per="1s"), 1.0) == Bucket(1.0, 1.0)


# --- several limits on one request ----------------------------------------------------


def _matches(*rules: RateLimit, actor: str = "a") -> list[LimitMatch]:
    return [LimitMatch((i, actor), r) for i, r in enumerate(rules)]


def test_all_limits_must_pass_and_a_reject_takes_nothing() -> None:
    roomy = _limit(limit=100, per="1s", burst=100)
    tight = _limit(limit=1, per="10s", burst=1)
    matches = _matches(roomy, tight)
    states: dict[BucketKey, Bucket] = {}
    result = check_all(matches, states, 0.0)
    assert result.granted
    assert result.retry_after == 0.0
    assert result.rejected_by == ()
    assert result.states == {(0, "a"): Bucket(99.0, 0.0), (1, "a"): Bucket(0.0, 0.0)}
    result = check_all(matches, result.states, 1.0)
    assert not result.granted
    assert result.rejected_by == ((1, "a"),)
    assert result.retry_after == pytest.approx(9.0)
    # The roomy bucket was refilled (capped) but not debited.
    assert result.states == {(0, "a"): Bucket(100.0, 1.0), (1, "a"): Bucket(0.1, 1.0)}


def test_retry_after_is_the_longest_wait() -> None:
    a = _limit(limit=1, per="2s", burst=1)    # 0.5/s
    b = _limit(limit=1, per="10s", burst=1)   # 0.1/s
    states = {(0, "a"): Bucket(0.0, 0.0), (1, "a"): Bucket(0.5, 0.0)}
    result = check_all(_matches(a, b), states, 0.0)
    assert not result.granted
    assert result.rejected_by == ((0, "a"), (1, "a"))
    assert result.retry_after == pytest.approx(5.0)  # b needs 0.5 token at 0.1/s; a needs 2 s


def test_no_limits_means_granted() -> None:
    assert check_all([], {}, 0.0) == (True, {}, 0.0, ())


def test_buckets_are_per_actor() -> None:
    rule = _limit(limit=1, per="1h", burst=1)
    noisy = check_all(_matches(rule, actor="noisy"), {}, 0.0)
    assert noisy.granted
    states = dict(noisy.states)
    assert not check_all(_matches(rule, actor="noisy"), states, 1.0).granted
    assert check_all(_matches(rule, actor="quiet"), states, 1.0).granted


# --- unlock throttle ------------------------------------------------------------------


def test_throttle_schedule() -> None:
    assert [throttle_delay(n) for n in range(-1, 5)] == [0.0] * 6
    assert [throttle_delay(n) for n in range(5, 17)] == [
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 900.0, 900.0]
    assert throttle_delay(10**9) == MAX_UNLOCK_DELAY == 900.0


def test_throttle_check() -> None:
    assert throttle_check(4, 100.0, 100.0) == (True, 0.0)
    assert throttle_check(5, 100.0, 100.0) == (False, 1.0)
    assert throttle_check(7, 100.0, 100.0) == (False, 4.0)
    assert throttle_check(7, 100.0, 103.5) == (False, 0.5)
    assert throttle_check(7, 100.0, 104.0) == (True, 0.0)
    assert throttle_check(7, 100.0, 5000.0) == (True, 0.0)
    # A clock set back never lengthens the wait beyond the delay, nor shortens it.
    assert throttle_check(7, 100.0, 50.0) == (False, 4.0)


# --- properties -----------------------------------------------------------------------

_times = st.lists(st.floats(min_value=0.0, max_value=1000.0, allow_nan=False), min_size=1,
                  max_size=60)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 50), per=st.sampled_from(["1s", "10s", "1m"]),
       burst=st.integers(1, 20), times=_times)
def test_grants_never_exceed_burst_plus_rate_times_elapsed(
        limit: int, per: str, burst: int, times: list[float]) -> None:
    rule = _limit(limit=limit, per=per, burst=burst)
    times.sort()
    state: Bucket | None = None
    grants = 0
    for now in times:
        granted, state, wait = take(state, rule, now)
        grants += granted
        assert 0.0 <= state.tokens <= burst
        assert (wait == 0.0) is granted
    assert grants <= burst + rule.rate * (times[-1] - times[0]) + 1e-9


@settings(max_examples=300, deadline=None)
@given(times=_times)
def test_unsorted_clocks_grant_no_more_than_the_latest_time_allows(times: list[float]) -> None:
    rule = _limit(limit=3, per="1s", burst=4)
    state: Bucket | None = None
    grants = 0
    for now in times:
        granted, state, _ = take(state, rule, now)
        grants += granted
    assert grants <= 4 + rule.rate * (max(times) - times[0]) + 1e-9


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=5),
       now=st.floats(min_value=0.0, max_value=100.0))
def test_check_all_is_all_or_nothing(tokens: list[float], now: float) -> None:
    rules = [_limit(limit=1, per="1m", burst=5) for _ in tokens]
    states = {(i, "a"): Bucket(t, now) for i, t in enumerate(tokens)}
    result = check_all(_matches(*rules), states, now)
    assert result.granted is all(t >= 1.0 for t in tokens)
    for key, before in states.items():
        after = result.states[key]
        assert after.tokens == (before.tokens - 1.0 if result.granted else before.tokens)
    if not result.granted:
        # Waiting retry_after is enough for every bucket, and no less would do.
        later = check_all(_matches(*rules), states, now + result.retry_after + 1e-6)
        assert later.granted


@settings(max_examples=200, deadline=None)
@given(failures=st.integers(0, 100), last=st.floats(0.0, 1e6), since=st.floats(0.0, 2000.0))
def test_throttle_wait_is_never_more_than_the_delay(failures: int, last: float,
                                                    since: float) -> None:
    allowed, wait = throttle_check(failures, last, last + since)
    assert 0.0 <= wait <= throttle_delay(failures)
    assert allowed is (wait == 0.0)
