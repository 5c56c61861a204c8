"""Forged ``audit_pending`` rows: only well-formed failed unlocks are chained, the rest is exit 3.

Failed unlocks wait in ``audit_pending`` (no key to chain them) and are
folded into the chain at the next good unlock. The table is not
authenticated, so the attacker writes rows of every kind into it with plain
``sqlite3``. A well-formed failed unlock is chained with its time clamped to
the chain head; anything else makes that operation fail with exit 3 and is
recorded as a forgery, and no content of the trail makes any command exit 70
(issue 8).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from .test_replay import Result, clean_env, cli_batch, cli_steps, cmd, copy_vault, put

VALUE = "alice-value"
#: A time long before the vault existed (2001-09-09).
BACKDATED_US = 1_000_000_000_000_000


class Base(NamedTuple):
    """A vault with one credential, to copy for each forgery."""

    home: Path
    scratch: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("pending")
    env = clean_env(root)
    home = root / "vault"
    cli_steps(home, (cmd("init"), put("alice", VALUE)), env)
    return Base(home, root / "scratch", env)


class Event(NamedTuple):
    """An event as plain sqlite3 reads it from the trail."""

    seq: int
    ts_us: int
    actor: str
    op: str
    outcome: str
    reason: str | None


def _events(home: Path) -> list[Event]:
    with sqlite3.connect(home / "vault.db") as conn:
        return [Event(*r) for r in conn.execute(
            "SELECT seq, ts_us, actor, op, outcome, reason FROM audit_events ORDER BY seq")]


def _forge(base: Base, actor: str, op: str, outcome: str, reason: str | None,
           ts_us: int | None = None) -> Path:
    """A copy of the vault with one pending row written into it."""
    base.scratch.mkdir(exist_ok=True)
    home = copy_vault(base.home, Path(tempfile.mkdtemp(dir=base.scratch)) / "v")
    when = ts_us if ts_us is not None else int(time.time() * 1_000_000)
    conn = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        conn.execute("INSERT INTO audit_pending (ts_us, actor, op, outcome, reason)"
                     " VALUES (?, ?, ?, ?, ?)", (when, actor, op, outcome, reason))
    finally:
        conn.close()
    return home


def _prune_365d(home: Path) -> tuple[str, ...]:
    return ("audit", "prune", "--archive", str(home.parent / "archive.jsonl"), "--keep", "365d")


def _no_internal_errors(results: list[Result]) -> None:
    for result in results:
        assert result.code != 70, result
        assert "Traceback" not in result.err


WELL_FORMED = [
    ("locked", "wrong-key"),
    ("locked", "wrong-passphrase"),
    ("locked", "no-key-file"),
    ("locked", "key-file-damaged"),
    ("locked", "no-passphrase"),
    ("integrity", "vault-key-damaged"),
]


@pytest.mark.parametrize(("outcome", "reason"), WELL_FORMED)
def test_well_formed_failed_unlock_is_chained_with_its_time_clamped(
        base: Base, outcome: str, reason: str) -> None:
    """Even backdated to 2001, it lands no earlier than the chain head it follows."""
    home = _forge(base, "someone:keyring", "unlock", outcome, reason, ts_us=BACKDATED_US)
    head = _events(home)[-1]
    results = cli_batch([(home, cmd("get", "svc", "alice")), (home, cmd("audit", "verify"))],
                        base.env)
    _no_internal_errors(results)
    got, verified = results
    assert (got.code, got.out) == (0, VALUE + "\n"), got
    assert verified.code == 0, verified
    folded = [e for e in _events(home) if e.seq > head.seq and e.op == "unlock"]
    assert len(folded) == 1, folded
    assert (folded[0].actor, folded[0].outcome) == ("someone:keyring", outcome)
    assert reason in (folded[0].reason or "")
    assert folded[0].ts_us >= head.ts_us, "chained with the forged time"


def test_backdated_pending_row_does_not_make_prune_archive_recent_events(base: Base) -> None:
    home = _forge(base, "someone:keyring", "unlock", "locked", "wrong-key", ts_us=BACKDATED_US)
    results = cli_batch([(home, cmd("get", "svc", "alice")), (home, (_prune_365d(home), "")),
                         (home, cmd("audit", "verify"))], base.env)
    _no_internal_errors(results)
    assert [r.code for r in results] == [0, 0, 0], results
    # Nothing in the trail is a year old: nothing may be archived.
    assert not (home.parent / "archive.jsonl").exists(), results[1].err


class Forgery(NamedTuple):
    """A pending row that no failed unlock writes."""

    actor: str
    op: str
    outcome: str
    reason: str | None


FORGERIES = {
    "a write": Forgery("mallory", "write", "ok", None),
    "a delete": Forgery("mallory", "delete", "ok", None),
    "an audit-prune through-5": Forgery("mallory", "audit-prune", "ok", "through-5"),
    "a successful unlock": Forgery("mallory", "unlock", "ok", None),
    "an unlock denied by policy": Forgery("mallory", "unlock", "denied", "wrong-key"),
    "an unknown reason": Forgery("mallory", "unlock", "locked", "made-up-reason"),
    "a reason with control characters": Forgery("mallory", "unlock", "locked",
                                                "wrong-key\x1b[2J\nforged line"),
    "an actor with control characters": Forgery("mallory\n2026-01-01 root:sshd", "unlock",
                                                "locked", "wrong-key"),
    "an over-long actor": Forgery("m" * 5000, "unlock", "locked", "wrong-key"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_pending_row_fails_that_operation_and_is_recorded(base: Base, name: str) -> None:
    forged = FORGERIES[name]
    home = _forge(base, *forged)
    head = _events(home)[-1]
    first = cli_batch([(home, cmd("get", "svc", "alice"))], base.env)[0]
    assert (first.code, first.out) == (3, ""), first
    new = [e for e in _events(home) if e.seq > head.seq]
    assert any(e.outcome == "integrity" for e in new), new
    assert not [e for e in new if (e.actor, e.op, e.outcome) == forged[:3]], \
        "the forged row was chained as a genuine event"
    # Recorded once, the forgery does not break what follows (no exit 70, ever).
    results = cli_batch([(home, cmd("get", "svc", "alice")), (home, cmd("audit", "verify")),
                         (home, (_prune_365d(home), "")), (home, cmd("audit", "verify"))],
                        base.env)
    _no_internal_errors(results)
    got, verified, pruned, again = results
    assert (got.code, got.out) == (0, VALUE + "\n"), got
    assert (verified.code, pruned.code, again.code) == (0, 0, 0), results


def test_forged_audit_prune_row_never_makes_verify_or_prune_exit_70(base: Base) -> None:
    home = _forge(base, *FORGERIES["an audit-prune through-5"])
    results = cli_batch([(home, cmd("audit", "verify")), (home, cmd("audit", "verify")),
                         (home, (_prune_365d(home), "")), (home, cmd("audit", "verify"))],
                        base.env)
    _no_internal_errors(results)
    assert [r.code for r in results] == [3, 0, 0, 0], results


def test_genuine_failed_unlock_is_chained_at_the_next_good_unlock(base: Base) -> None:
    base.scratch.mkdir(exist_ok=True)
    home = copy_vault(base.home, Path(tempfile.mkdtemp(dir=base.scratch)) / "v")
    key = (home / "master.key").read_bytes()
    (home / "master.key").write_bytes(os.urandom(32))
    wrong = cli_batch([(home, cmd("get", "svc", "alice"))], base.env)[0]
    assert (wrong.code, wrong.out) == (6, ""), wrong
    (home / "master.key").write_bytes(key)
    got, verified = cli_batch([(home, cmd("get", "svc", "alice")),
                               (home, cmd("audit", "verify"))], base.env)
    assert (got.code, got.out) == (0, VALUE + "\n"), got
    assert verified.code == 0, verified
    assert [(e.op, e.outcome) for e in _events(home) if e.reason and "wrong-key" in e.reason] \
        == [("unlock", "locked")]
