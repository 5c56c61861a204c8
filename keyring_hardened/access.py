"""Access control decisions: policies, rate limits and unlock throttling.

Every function here is pure: a function of the validated config, an
identity, the operation, the service, ``now`` and the stored bucket state,
with no I/O and no clock of its own (STYLE item 3). The store façade reads
the state, calls these in the operation's transaction, and writes what they
return, so the decisions are tested under a frozen clock and hold the same
whether the identity was declared (direct mode) or verified by the agent.

The three config keys handled here, as tomllib parses them::

    default_policy = "deny"
    [[policies]]      actors, services (globs); allow, deny (operations)
    [[rate_limits]]   actors, services, operations (globs); limit, per, burst

:func:`parse_access` validates them and returns *every* problem, each naming
the key (``policies[2].allow[1]: unknown operation "raed"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal, NamedTuple, TypeVar

from .errors import ConfigError
from .humantime import parse_duration

__all__ = [
    "ACCESS_KEYS",
    "FREE_FAILURES",
    "MAX_UNLOCK_DELAY",
    "OPERATIONS",
    "AccessConfig",
    "Bucket",
    "BucketKey",
    "Decision",
    "Default",
    "Identity",
    "LimitMatch",
    "Policy",
    "RateDecision",
    "RateLimit",
    "check_all",
    "decide",
    "limits_for",
    "limits_of",
    "parse_access",
    "policies_for",
    "take",
    "throttle_check",
    "throttle_delay",
    "tokens_now",
]

#: The operations a policy or a limit names, in the order messages list them.
OPERATIONS: tuple[str, ...] = ("read", "write", "delete", "list", "admin")
#: The top-level config keys this module validates; config.py routes them here.
ACCESS_KEYS = frozenset({"default_policy", "policies", "rate_limits"})

Default = Literal["allow", "deny"]
#: A bucket is keyed by the rule that matched and the actor, so one noisy
#: actor drains only its own bucket.
BucketKey = tuple[int, str]

#: A limit or burst above this is a typo, not a policy, and would make the
#: token arithmetic lose its fractions.
_MAX_COUNT = 1_000_000_000
_EXPECTED_OPS = "read, write, delete, list or admin"
# Only a near-miss of an operation name ("raed") is quoted back in a message;
# anything else (a pasted password, say) is never echoed.
_ECHO = re.compile(r"[a-z]{1,8}")
_BARE_KEY = re.compile(r"[a-z_]{1,16}")


class Identity(NamedTuple):
    """Who asks: the actor name, and whether the agent verified it from the kernel.

    The decisions read only ``actor``; ``verified`` is carried for the audit
    record and ``policy test``, so an agent-verified identity needs no change here.
    """

    actor: str
    verified: bool = False


class Policy(NamedTuple):
    """One ``[[policies]]`` rule; operation globs are expanded to names at load."""

    actors: tuple[str, ...]
    services: tuple[str, ...]
    allow: frozenset[str]
    deny: frozenset[str]

    def matches(self, actor: str, service: str) -> bool:
        """Whether this rule covers the actor and the service (case-sensitive globs)."""
        return _any(self.actors, actor) and _any(self.services, service)


class RateLimit(NamedTuple):
    """One ``[[rate_limits]]`` token bucket: ``limit`` tokens per ``per`` seconds."""

    actors: tuple[str, ...]
    services: tuple[str, ...]
    operations: frozenset[str]
    limit: int
    per: float
    burst: int

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self.limit / self.per

    def describe(self, index: int) -> str:
        """The rule in words, for ``policy test``."""
        return (f"rate_limits[{index}]: {self.limit} per {_seconds(self.per)}, burst "
                f"{self.burst} (actors {_globs(self.actors)}; services "
                f"{_globs(self.services)}; operations {_ops(self.operations)})")


class AccessConfig(NamedTuple):
    """The validated access settings; the defaults govern nothing and allow all."""

    default_policy: Default = "allow"
    policies: tuple[Policy, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()


class Decision(NamedTuple):
    """The answer of :func:`decide`, with the rule that decided and why, in words."""

    allowed: bool
    #: Index into the policies of the rule that decided; None when the default did.
    rule: int | None
    reason: str
    #: Every rule whose actors and services matched, deciding or not.
    matched: tuple[int, ...] = ()


class Bucket(NamedTuple):
    """Stored token-bucket state: tokens left at time ``updated``."""

    tokens: float
    updated: float


class LimitMatch(NamedTuple):
    """A rate limit that applies to a request, and the key of its bucket."""

    key: BucketKey
    rule: RateLimit


class RateDecision(NamedTuple):
    """The answer of :func:`check_all`."""

    granted: bool
    #: The new state of every matched bucket, to be written on grant *and* reject.
    states: Mapping[BucketKey, Bucket]
    #: Seconds until every bucket holds a token; 0.0 when granted.
    retry_after: float
    #: The buckets that lacked a token; empty when granted.
    rejected_by: tuple[BucketKey, ...] = ()


# --- parsing -------------------------------------------------------------------------


def parse_access(doc: Mapping[str, Any]) -> tuple[AccessConfig | None, list[str]]:
    """Validate the access keys of a parsed TOML document.

    Returns the config and an empty list, or None and *every* problem found,
    each naming its key. Keys outside :data:`ACCESS_KEYS` are ignored (the
    rest of the file is config.py's). There is no partial result: dropping
    one bad deny rule and serving the rest would open what it was meant to close.
    """
    problems: list[str] = []
    default: Default = "allow"
    if "default_policy" in doc:
        value = doc["default_policy"]
        if value == "allow" or value == "deny":
            default = value
        elif isinstance(value, str):
            problems.append('default_policy: must be "allow" or "deny"')
        else:
            problems.append(f"default_policy: expected a string, got {_kind(value)}")
    policies = tuple(_rules(doc, "policies", _policy, problems))
    limits = tuple(_rules(doc, "rate_limits", _rate_limit, problems))
    if problems:
        return None, problems
    return AccessConfig(default, policies, limits), []


_Rule = TypeVar("_Rule", Policy, RateLimit)
_POLICY_KEYS = ("actors", "services", "allow", "deny")
_LIMIT_KEYS = ("actors", "services", "operations", "limit", "per", "burst")


def _rules(doc: Mapping[str, Any], name: str,
           parse: Callable[[str, dict[str, Any], list[str]], _Rule],
           problems: list[str]) -> list[_Rule]:
    value = doc.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        problems.append(f"{name}: expected an array of tables ([[{name}]]), got {_kind(value)}")
        return []
    found: list[_Rule] = []
    for i, table in enumerate(value):
        before = len(problems)
        rule = parse(f"{name}[{i}]", table, problems)
        if len(problems) == before:
            found.append(rule)
    return found


def _policy(key: str, table: dict[str, Any], problems: list[str]) -> Policy:
    _unknown(key, table, _POLICY_KEYS, problems)
    actors = _glob_list(key, table, "actors", problems)
    services = _glob_list(key, table, "services", problems)
    allow = _op_list(key, table, "allow", problems, required=False)
    deny = _op_list(key, table, "deny", problems, required=False)
    if "allow" not in table and "deny" not in table:
        problems.append(f"{key}: needs allow or deny (or both)")
    return Policy(actors, services, allow, deny)


def _rate_limit(key: str, table: dict[str, Any], problems: list[str]) -> RateLimit:
    _unknown(key, table, _LIMIT_KEYS, problems)
    actors = _glob_list(key, table, "actors", problems)
    services = _glob_list(key, table, "services", problems)
    ops = _op_list(key, table, "operations", problems, required=True)
    limit = _count(key, table, "limit", problems)
    per = 1.0
    if "per" not in table:
        problems.append(f"{key}.per: missing (a duration such as 1s or 10m)")
    else:
        try:
            per = parse_duration(table["per"], f"{key}.per")
        except ConfigError as exc:
            problems.append(str(exc))
    # Without a burst the bucket holds one period's worth: the plainest reading.
    burst = _count(key, table, "burst", problems) if "burst" in table else limit
    return RateLimit(actors, services, ops, limit, per, burst)


def _unknown(key: str, table: dict[str, Any], known: tuple[str, ...],
             problems: list[str]) -> None:
    for name in table:
        if name not in known:
            # A key is named back only when it looks like one; a secret
            # pasted as a quoted key is not repeated.
            where = f"{key}.{name}" if _BARE_KEY.fullmatch(name) else key
            problems.append(f"{where}: unknown key (expected {', '.join(known)})")


def _str_list(key: str, table: dict[str, Any], name: str, problems: list[str],
              required: bool = True) -> list[tuple[str, str]]:
    """The (key, string) items of a non-empty list of strings; problems for the rest."""
    where = f"{key}.{name}"
    if name not in table:
        if required:
            problems.append(f"{where}: missing (a list such as [\"*\"])")
        return []
    value = table[name]
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list of strings, got {_kind(value)}")
        return []
    if not value:
        problems.append(f"{where}: must not be empty")
    items: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(f"{where}[{i}]: expected a string, got {_kind(item)}")
        elif not item:
            problems.append(f"{where}[{i}]: must not be empty (\"*\" matches everything)")
        else:
            items.append((f"{where}[{i}]", item))
    return items


def _glob_list(key: str, table: dict[str, Any], name: str,
               problems: list[str]) -> tuple[str, ...]:
    globs: list[str] = []
    for where, glob in _str_list(key, table, name, problems):
        problem = _glob_problem(glob)
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            globs.append(glob)
    return tuple(globs)


def _op_list(key: str, table: dict[str, Any], name: str, problems: list[str],
             required: bool) -> frozenset[str]:
    """Operation names or globs (``"*"``), expanded to the names they match."""
    ops: set[str] = set()
    for where, token in _str_list(key, table, name, problems, required):
        problem = _glob_problem(token)
        named = {op for op in OPERATIONS if fnmatchcase(op, token)} if not problem else set()
        if not named:
            shown = f' "{token}"' if _near_operation(token) else ""
            problems.append(f"{where}: unknown operation{shown} (expected {_EXPECTED_OPS})")
        ops |= named
    return frozenset(ops)


def _count(key: str, table: dict[str, Any], name: str, problems: list[str]) -> int:
    where = f"{key}.{name}"
    if name not in table:
        problems.append(f"{where}: missing (a whole number of requests)")
        return 1
    value = table[name]
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where}: expected a whole number, got {_kind(value)}")
        return 1
    if not 1 <= value <= _MAX_COUNT:
        problems.append(f"{where}: must be between 1 and {_MAX_COUNT}, got {value}")
        return 1
    return value


def _near_operation(token: str) -> bool:
    """Whether ``token`` is a short misspelling of an operation name (safe to quote back)."""
    if not _ECHO.fullmatch(token):
        return False
    import difflib  # only on a config error

    return bool(difflib.get_close_matches(token, OPERATIONS, n=1, cutoff=0.7))


def _glob_problem(glob: str) -> str | None:
    """Why fnmatch would not read ``glob`` as its author meant, or None.

    fnmatch never fails: an unclosed ``[`` silently becomes a literal and a
    reversed range silently matches nothing, so a rule would quietly not
    apply. Both are refused here, following fnmatch's own bracket scan.
    """
    i, n = 0, len(glob)
    while i < n:
        if glob[i] != "[":
            i += 1
            continue
        j = i + 1
        if j < n and glob[j] == "!":
            j += 1
        if j < n and glob[j] == "]":  # a leading ] is a literal member
            j += 1
        if glob.startswith("[^", i):
            # fnmatch takes ^ literally, where shells and regexes negate: a
            # rule would match the opposite of what it seems to say.
            return 'a "[^" set in glob: fnmatch reads ^ literally (write "[!...]" to negate)'
        end = glob.find("]", j)
        if end < 0:
            return 'unbalanced "[" in glob (write "[[]" to match a literal "[")'
        body = glob[i + 1:end].removeprefix("!")
        for k in range(len(body) - 2):
            if body[k + 1] == "-" and body[k] > body[k + 2]:
                return "reversed range in glob (it would match nothing)"
        i = end + 1
    return None


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


# --- policies ------------------------------------------------------------------------


def decide(policies: Sequence[Policy], default: Default, identity: Identity, op: str,
           service: str, *, for_actor: Sequence[int] | None = None) -> Decision:
    """Whether ``identity`` may perform ``op`` on ``service``, and which rule said so.

    Among the rules whose actor and service globs match, the first that
    denies ``op`` decides (deny wins wherever it sits); else the first that
    allows it; else ``default``. ``op`` must be one of :data:`OPERATIONS`:
    anything else is a programming error (ValueError), not a denial.
    ``for_actor``, if given, is :func:`policies_for` of this actor: the same
    answer, without matching the actor's globs again.
    """
    if op not in OPERATIONS:
        raise ValueError("op must be one of read, write, delete, list, admin")
    if for_actor is None:
        for_actor = policies_for(policies, identity.actor)
    matched = tuple(i for i in for_actor if _any(policies[i].services, service))
    for verb, allowed in (("denies", False), ("allows", True)):
        for i in matched:
            rule = policies[i]
            if op in (rule.allow if allowed else rule.deny):
                reason = (f"policies[{i}] (actors {_globs(rule.actors)}; services "
                          f"{_globs(rule.services)}) {verb} {op}")
                return Decision(allowed, i, reason, matched)
    what = "no policy matches" if not matched else f"no matching policy names {op}"
    return Decision(default == "allow", None, f"{what}; default_policy is {default}", matched)


def policies_for(policies: Sequence[Policy], actor: str) -> tuple[int, ...]:
    """The indices of the rules whose actor globs match ``actor``, in order."""
    return tuple(i for i, p in enumerate(policies) if _any(p.actors, actor))


# --- rate limits ---------------------------------------------------------------------


def limits_for(limits: Sequence[RateLimit], actor: str, op: str,
               service: str, *, for_actor: Sequence[int] | None = None
               ) -> tuple[LimitMatch, ...]:
    """Every rate limit that applies to the request; all of them must pass.

    ``for_actor``, if given, is :func:`limits_of` this actor and operation.
    """
    if for_actor is None:
        for_actor = limits_of(limits, actor, op)
    return tuple(LimitMatch((i, actor), limits[i]) for i in for_actor
                 if _any(limits[i].services, service))


def limits_of(limits: Sequence[RateLimit], actor: str, op: str) -> tuple[int, ...]:
    """The indices of the limits for ``op`` whose actor globs match ``actor``."""
    return tuple(i for i, rule in enumerate(limits)
                 if op in rule.operations and _any(rule.actors, actor))


def tokens_now(state: Bucket | None, rule: RateLimit, now: float) -> Bucket:
    """The bucket refilled up to ``now`` without taking: what ``policy test`` shows.

    A new bucket (None) starts full. Time is clamped so that it never runs
    backwards: a clock set back mints no tokens, and the bucket refills again
    once the clock passes ``updated``. A corrupt stored value (NaN, infinite,
    out of range) is read as an empty bucket, which fails closed.
    """
    if state is None:
        return Bucket(float(rule.burst), now)
    tokens, updated = state
    if not (math.isfinite(tokens) and math.isfinite(updated)):
        return Bucket(0.0, now)
    # If the rule's burst shrank since this state was written, cap to the new one.
    tokens = min(max(tokens, 0.0), float(rule.burst))
    now = max(now, updated)
    return Bucket(min(float(rule.burst), tokens + (now - updated) * rule.rate), now)


def take(state: Bucket | None, rule: RateLimit, now: float) -> tuple[bool, Bucket, float]:
    """Take one token: ``(granted, new_state, retry_after)``.

    Tokens refill at ``limit / per`` a second up to ``burst``, in fractions.
    A reject still returns the refilled state (writing it changes nothing
    a later call would compute differently) and the seconds until a token.
    """
    bucket = tokens_now(state, rule, now)
    if bucket.tokens >= 1.0:
        return True, Bucket(bucket.tokens - 1.0, bucket.updated), 0.0
    return False, bucket, (1.0 - bucket.tokens) / rule.rate


def check_all(matches: Sequence[LimitMatch], states: Mapping[BucketKey, Bucket],
              now: float) -> RateDecision:
    """Grant only if every matched bucket holds a token, then take one from each.

    On a reject no bucket is debited (no partial take), and ``retry_after``
    is the longest wait among the buckets that lacked a token, since all of
    them must refill. Missing states are new, full buckets.
    """
    refilled = {m.key: tokens_now(states.get(m.key), m.rule, now) for m in matches}
    short = tuple(m for m in matches if refilled[m.key].tokens < 1.0)
    if short:
        wait = max((1.0 - refilled[m.key].tokens) / m.rule.rate for m in short)
        return RateDecision(False, refilled, wait, tuple(m.key for m in short))
    taken = {key: Bucket(b.tokens - 1.0, b.updated) for key, b in refilled.items()}
    return RateDecision(True, taken, 0.0, ())


# --- unlock throttle -----------------------------------------------------------------

#: Failed unlocks allowed before any wait.
FREE_FAILURES = 5
#: The longest wait between unlock attempts: 15 minutes.
MAX_UNLOCK_DELAY = 900.0


def throttle_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failed unlocks.

    The first five attempts are free. After the fifth failure each further
    attempt waits 1 s, doubling with each failure, up to 15 minutes
    (failures 0-4: none; 5: 1 s; 6: 2 s; ...; 14: 512 s; 15 and more: 900 s).
    """
    extra = failures - FREE_FAILURES
    if extra < 0:
        return 0.0
    # Cap the exponent before raising: a huge stored count must not build a huge int.
    return min(MAX_UNLOCK_DELAY, float(2 ** min(extra, 10)))


def throttle_check(failures: int, last_failure_at: float, now: float) -> tuple[bool, float]:
    """Whether an unlock may be tried now: ``(allowed, seconds to wait)``.

    A clock set back before ``last_failure_at`` counts as no time passed,
    so turning the clock back never shortens the wait.
    """
    delay = throttle_delay(failures)
    if delay == 0.0:
        return True, 0.0
    wait = delay - max(0.0, now - last_failure_at)
    return (wait <= 0.0), max(0.0, wait)


# --- helpers -------------------------------------------------------------------------


def _any(globs: Sequence[str], name: str) -> bool:
    return any(fnmatchcase(name, g) for g in globs)


def _globs(globs: Sequence[str]) -> str:
    return ", ".join(globs)


def _ops(ops: frozenset[str]) -> str:
    return ", ".join(op for op in OPERATIONS if op in ops)


def _seconds(seconds: float) -> str:
    return f"{seconds:g}s"
