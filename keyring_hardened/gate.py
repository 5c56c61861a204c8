"""Access control at the door of every operation: seal, policies, rate limits.

The decisions are :mod:`keyring_hardened.access`'s pure functions; this
module does their I/O inside the operation's own write transaction
(:meth:`Session._run_once <keyring_hardened.session.Session._run_once>`):

1. the vault-wide rows are read and checked against the state root, which
   covers the seal and every rate-limit bucket (``state.access_digest``);
2. a sealed vault refuses the operation (exit 6), unless it is one of the
   few that a sealed vault serves (status, the audit reads, unseal, rekey);
3. the policies decide for the session's identity (exit 4 on a denial);
4. every rate limit that applies must hold a token; the new bucket states
   are written and folded into the state root *before* the operation runs,
   so they commit with its audit event whether it is granted or rejected
   (exit 5), and a concurrent process sees them at once.

An identity verified by the agent passes through unchanged: nothing here
reads how the actor was established.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from .access import (
    AccessConfig,
    Bucket,
    BucketKey,
    Decision,
    Identity,
    LimitMatch,
    RateLimit,
    check_all,
    decide,
    limits_for,
    limits_of,
    policies_for,
    tokens_now,
)
from .errors import DeniedError, LockedError, RateLimitedError
from .humantime import utc
from .operation import Body, Meta, _Tx
from .port import BucketRow

if TYPE_CHECKING:
    from .audit import Event
    from .config import Config
    from .port import Storage

__all__ = ["ALL_SERVICES", "OPS", "Gate", "Guarded", "bucket_rule", "describe_service"]

T = TypeVar("T")


class Guarded(Protocol):
    """What the gate needs of the session whose operation it judges.

    :class:`~keyring_hardened.session.Session` passes itself. The gate
    depends on this and not on the session module, so the dependency runs
    one way: the session imports the gate and runs *every* operation
    through :func:`admit` inside :meth:`Session._run_once
    <keyring_hardened.session.Session._run_once>`, where no subclass or
    caller can leave the door out.
    """

    config: Config
    #: Access decisions for the session's fixed config (see :func:`_rules_for`).
    _access_cache: dict[Any, Any]
    _clock: Callable[[], float]

    @property
    def subject(self) -> str:
        """The actor the policies and rate limits judge."""

    def _meta(self, storage: Storage, tx: _Tx | None = None, *,
              fresh: bool = False) -> Meta:
        """The vault-wide rows, checked against the state root."""

    def _set_meta_buckets(self, tx: _Tx, meta: Meta, rows: list[BucketRow]) -> None:
        """The rate-limit buckets as just written, in the checked copy."""

    def _commit_state(self, storage: Storage) -> bytes:
        """Fold this operation's changes into the state root."""

    def _run(self, op: str, service: str | None, username: str | None, body: Body[T], *,
             writes: bool = False, finish: Body[Event] | None = None) -> T:
        """Run one audited operation."""

#: The service name a vault-wide request (admin, the whole-vault ``list``) is
#: matched with: only rules whose services glob matches ``*`` (such as ``"*"``) apply.
ALL_SERVICES = "*"


class Gate(NamedTuple):
    """What one internal operation asks of access control."""

    #: The policy operation (read, write, delete, list, admin), or None: not governed.
    access: str | None
    #: Whether a sealed vault still serves it.
    when_sealed: bool = False


#: Every internal operation name, and its gate. An operation missing here is
#: a programming error (KeyError), never an ungoverned default.
OPS: dict[str, Gate] = {
    "read": Gate("read"),
    "history": Gate("read"),
    "write": Gate("write"),
    "rollback": Gate("write"),
    # TTL and refresh (refresh.py): a refresher run writes a new version, and
    # may run a command: a reader that may not write does not start one.
    "ttl": Gate("write"),
    "refresh": Gate("write"),
    "delete": Gate("delete"),
    "purge": Gate("delete"),
    "list": Gate("list"),
    "lookup": Gate("list"),
    "key-list": Gate("admin", when_sealed=True),
    "key-rotate": Gate("admin"),
    "key-rewrap-plan": Gate("admin"),
    "key-rewrap": Gate("admin"),
    "key-retire": Gate("admin"),
    # The incident drill is seal, rekey, unseal: a rekey needs the root key anyway.
    "key-rekey": Gate("admin", when_sealed=True),
    "audit-prune": Gate("admin"),
    # Moving in and keeping a copy (backup.py, moving.py). Each imported entry
    # is an admin request; a backup copies ciphertext only, so a sealed vault
    # may be backed up; a restore carries the copy's own seal state.
    "import": Gate("admin"),
    "backup": Gate("admin", when_sealed=True),
    "restore": Gate("admin", when_sealed=True),
    # Copies ciphertext only, like backup (migrate.py).
    "migrate-storage": Gate("admin", when_sealed=True),
    "seal": Gate("admin", when_sealed=True),  # says "already sealed"
    "unseal": Gate("admin", when_sealed=True),
    # Reading the state and the trail is what an operator does during an incident.
    "status": Gate(None, when_sealed=True),
    "audit-verify": Gate(None, when_sealed=True),
    "audit-show": Gate(None, when_sealed=True),
    "audit-export": Gate(None, when_sealed=True),
    "audit-checkpoint": Gate(None, when_sealed=True),
    # Chaining failed unlocks found at open, and the 0.1 upgrade's own bookkeeping.
    "unlock": Gate(None, when_sealed=True),
    # Shows the policies (which the config file shows anyway); takes no token.
    "policy-test": Gate(None, when_sealed=True),
}


@functools.lru_cache(maxsize=256)
def bucket_rule(rule: RateLimit) -> str:
    """The stored name of a rule's buckets: a digest of the rule's whole definition.

    Not its position in the file, so reordering the config keeps every
    bucket with its rule; a rule whose numbers change starts with full buckets.
    """
    text = json.dumps([sorted(rule.actors), sorted(rule.services), sorted(rule.operations),
                       rule.limit, rule.per, rule.burst], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def describe_service(service: str | None) -> str:
    """How a message names the target of a request."""
    return "the whole vault" if service is None else f"service {service!r}"


def sealed_error(seal: tuple[float, str]) -> LockedError:
    """The refusal of a sealed vault, naming when and by whom it was sealed."""
    return LockedError(f"the vault is sealed (since {utc(seal[0])}, by {seal[1]}); every "
                       "credential request is refused until: keyring-hardened unseal", "sealed")


def decision(config: AccessConfig, actor: str, access: str, service: str | None) -> Decision:
    """The policy decision for one request (a vault-wide one is matched as ``*``)."""
    target = ALL_SERVICES if service is None else service
    return decide(config.policies, config.default_policy, Identity(actor), access, target)


def denied(actor: str, access: str, service: str | None, found: Decision) -> DeniedError:
    """The refusal of a policy: actor, operation, target and the deciding rule.

    The rule is named by its place only, never by its globs: a secret
    pasted into a rule would otherwise reach the stderr (and CI logs) of
    every actor it denies. ``policy test`` shows the globs to the operator.
    """
    why = found.reason if found.rule is None else f"policies[{found.rule}] denies {access}"
    return DeniedError(f"access denied: actor {actor!r} may not {access} "
                       f"{describe_service(service)} ({why})", "denied")


def require_admin(session: Guarded, op: str) -> None:
    """Refuse ``op`` before any work unless the session's subject has ``admin``.

    For commands that do work outside one operation (import, backup,
    restore, unseal's proof): the refusal goes through the door as ``op``,
    so it is audited like any other; every later request passes it again.
    """
    config = session.config.access
    if config is None or decision(config, session.subject, "admin", None).allowed:
        return
    session._run(op, None, None, nothing)  # raises DeniedError, audited
    raise RuntimeError("the door let a denied admin request in")  # pragma: no cover


def nothing(storage: Storage, note: Any) -> None:
    """An operation that does nothing: only the door's check and its audit event."""


def admit(session: Guarded, storage: Storage, tx: _Tx, op: str,
          service: str | None, *, limited: bool = True) -> None:
    """Seal, policy, then rate limits, for ``op`` on ``service`` (see the module's docstring).

    ``limited=False``: seal and policy only, for the second step of an
    operation whose first step already drew its tokens.

    Raises :class:`LockedError` (sealed), :class:`DeniedError` or
    :class:`RateLimitedError`; the caller audits the refusal. Bucket
    changes are already in the state root when a rate limit rejects.
    """
    gate = OPS[op]
    meta = session._meta(storage, tx)
    if meta.seal is not None and not gate.when_sealed:
        raise sealed_error(meta.seal)
    config = session.config.access
    if gate.access is None or config is None:
        return
    actor = session.subject
    if gate.access == "admin":
        service = None  # admin is over the whole vault, even when one entry is named
    found, matches, names = _rules_for(session, config, actor, gate.access, service)
    if found is not None and not found.allowed:
        raise denied(actor, gate.access, service, found)
    if not matches or not limited:
        return
    now = session._clock()
    stored = {(b.rule, b.actor): b for b in meta.buckets}
    states: dict[BucketKey, Bucket] = {}
    for m in matches:
        row = stored.get((names[m.key], actor))
        if row is not None:
            states[m.key] = Bucket(row.tokens, row.updated)
    result = check_all(matches, states, now)
    _store_buckets(session, storage, tx, meta, config, actor, now,
                   {(names[k], actor): b for k, b in result.states.items()})
    if not result.granted:
        rules = ", ".join(f"rate_limits[{i}]" for i, _ in result.rejected_by)
        raise RateLimitedError(
            f"rate limited: actor {actor!r}, {gate.access} {describe_service(service)} "
            f"({rules}); retry in {_wait(result.retry_after)}", result.retry_after,
            "rate-limited")


#: Decisions kept per session, at most this many (then forgotten all at once).
_CACHE_LIMIT = 4096
#: How long a bucket of a rule not in this config is kept (seconds).
_FOREIGN_BUCKET_LIFE = 86400.0
#: The cache key of the session's rate limits by bucket name.
_BY_NAME = ("rules by name",)
_Rules = tuple[Decision | None, tuple[LimitMatch, ...], dict[BucketKey, str]]


def _rules_for(session: Guarded, config: AccessConfig, actor: str, access: str,
               service: str | None) -> _Rules:
    """The policy decision, the limits that apply and their bucket names, for a request.

    Pure functions of the session's fixed config and the request, so they
    are kept per session: a process that reads the same credential again
    does not match twenty globs again. The whole-vault ``list`` has no
    decision here (it is filtered entry by entry, in Store.credentials).
    """
    key = (actor, access, service)
    cache = session._access_cache
    found = cache.get(key)
    if found is None:
        # The rules that name this actor (and operation) are few, and the same
        # for every service: matched once per actor, then only services are.
        who = cache.get((actor, access))
        if who is None:
            who = cache[(actor, access)] = (policies_for(config.policies, actor),
                                            limits_of(config.rate_limits, actor, access))
        target = ALL_SERVICES if service is None else service
        decided = None if access == "list" and service is None else decide(
            config.policies, config.default_policy, Identity(actor), access, target,
            for_actor=who[0])
        matches = limits_for(config.rate_limits, actor, access, target, for_actor=who[1])
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()  # the per-actor rules and rules by name go too, and come back
        found = cache[key] = (decided, matches, {m.key: bucket_rule(m.rule) for m in matches})
    return found


def _store_buckets(session: Guarded, storage: Storage, tx: _Tx, meta: Meta,
                   config: AccessConfig, actor: str, now: float,
                   new: dict[tuple[str, str], Bucket]) -> None:
    """Write the matched buckets, drop those that refilled (or lost their rule), re-root.

    A full bucket and a missing one mean the same, so only buckets still
    short of tokens stay stored: the table holds the actors active lately.
    A bucket of a rule this config does not have (another process may run
    with another config) is left alone for a day, then dropped.
    """
    rules = session._access_cache.get(_BY_NAME)
    if rules is None:
        rules = session._access_cache[_BY_NAME] = {bucket_rule(r): r for r in config.rate_limits}
    keep: list[BucketRow] = []
    drop: list[tuple[str, str]] = []
    for row in meta.buckets:
        key = (row.rule, row.actor)
        if key in new:
            continue
        rule = rules.get(row.rule)
        if (now - row.updated > _FOREIGN_BUCKET_LIFE if rule is None else
                tokens_now(Bucket(row.tokens, row.updated), rule, now).tokens >= rule.burst):
            drop.append(key)
        else:
            keep.append(row)
    written = [BucketRow(rule, who, b.tokens, b.updated) for (rule, who), b in new.items()]
    storage.put_buckets(written)
    if drop:
        storage.drop_buckets(drop)
    session._set_meta_buckets(tx, meta, keep + written)
    # Folded into the root now, and made the operation's starting point: a
    # failure of the operation itself rolls back to here, not before.
    session._commit_state(storage)
    tx.begin = (tx.root, tx.last)


def _wait(seconds: float) -> str:
    """A wait as a person reads it: 0.4 s, 12 s, 3 min."""
    if seconds < 10:
        return f"{max(seconds, 0.1):.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"
