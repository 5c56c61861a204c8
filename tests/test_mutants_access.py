"""Tests that kill mutants of access.py which the rest of the suite let live."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from keyring_hardened.access import parse_access


def _problems(doc: dict[str, Any]) -> list[str]:
    config, problems = parse_access(doc)
    assert config is None
    return problems


def test_a_value_of_another_type_is_named_by_its_own_type() -> None:
    # tomllib gives dates and times for bare TOML dates; the message names that type.
    assert _problems({"default_policy": datetime.date(2024, 1, 2)}) == [
        "default_policy: expected a string, got date"]
    assert _problems({"policies": [{"actors": [datetime.time(1, 2)], "services": ["*"],
                                    "deny": ["read"]}]}) == [
        "policies[0].actors[0]: expected a string, got time"]


@pytest.mark.parametrize("name", ["actors", "services"])
def test_a_rate_limits_globs_are_checked_and_named_by_their_key(name: str) -> None:
    table: dict[str, Any] = {"actors": ["*"], "services": ["*"], "operations": ["read"],
                             "limit": 1, "per": "1s"}
    table[name] = ["ok", "db[z-a]", ""]
    assert _problems({"rate_limits": [{"actors": ["*"], "services": ["*"],
                                       "operations": ["read"], "limit": 1, "per": "1s"},
                                      table]}) == [
        f'rate_limits[1].{name}[2]: must not be empty ("*" matches everything)',
        f"rate_limits[1].{name}[1]: reversed range in glob (it would match nothing)",
    ]
    del table[name]
    assert _problems({"rate_limits": [table]}) == [
        f'rate_limits[0].{name}: missing (a list such as ["*"])']


def test_limit_and_burst_accept_their_whole_range() -> None:
    config, problems = parse_access({"rate_limits": [
        {"actors": ["*"], "services": ["*"], "operations": ["*"], "limit": 1_000_000_000,
         "per": "1s", "burst": 1_000_000_000}]})
    assert problems == []
    assert config is not None
    assert (config.rate_limits[0].limit, config.rate_limits[0].burst) == (1_000_000_000,) * 2


def _globs_ok(glob: str) -> bool:
    config, problems = parse_access({"policies": [{"actors": [glob], "services": ["*"],
                                                   "deny": ["read"]}]})
    assert (config is None) == bool(problems)
    return config is not None


@pytest.mark.parametrize(("glob", "ok"), [
    ("[[]x", True),      # the escape for a literal "[" that the message recommends
    ("[a]-[b]", True),   # a "-" between two sets is no range
    ("[!- ]x", True),    # "!" negates; "-" right after it is a member, not a range
    ("[a-a]", True),     # a one-character range is not reversed
    ("[z-a]x", False),   # reversed, at the start of the glob
    ("[a][", False),     # an unclosed "[" right after a set
    ("[a][z-a]", False),  # a reversed range right after a set
    ("a[^x]", False),    # "[^" is refused wherever it starts, not only at the start
])
def test_glob_checks_follow_fnmatchs_own_bracket_scan(glob: str, ok: bool) -> None:
    assert _globs_ok(glob) is ok


def test_an_operation_glob_with_a_reversed_range_is_refused_though_fnmatch_matches() -> None:
    # fnmatch quietly drops the empty range z-a, so "[z-ar]ead" would match "read";
    # the rule is refused instead of granting or denying something unintended.
    assert _problems({"policies": [{"actors": ["*"], "services": ["*"],
                                    "deny": ["[z-ar]ead"]}]}) == [
        "policies[0].deny[0]: unknown operation (expected read, write, delete, list or admin)"]
