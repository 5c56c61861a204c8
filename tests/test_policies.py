"""Access control through the store, the CLI and the keyring API: policies, limits, seal, throttle.

The pure decisions are in test_access.py; these tests drive the wiring: the
gate in each operation's transaction, the authenticated seal and buckets,
and the persistent unlock backoff.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tomllib
from pathlib import Path

import pytest
from keyring import errors as kerrors

from keyring_hardened import backend
from keyring_hardened.backend import AccessDenied, HardenedKeyring, RateLimited, VaultLocked
from keyring_hardened.config import Config
from keyring_hardened.errors import (
    DeniedError,
    IntegrityError,
    LockedError,
    NotFoundError,
    RateLimitedError,
    UsageError,
)
from keyring_hardened.gate import OPS, bucket_rule
from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF, PASSPHRASE, run_cli

CI_POLICY = """
default_policy = "deny"

[[policies]]                # the CI runner reads only ci/*
actors = ["ci-*"]
services = ["ci/*"]
allow = ["read", "list"]

[[policies]]                # people do everything ...
actors = ["alice", "bob"]
services = ["*"]
allow = ["*"]

[[policies]]                # ... except that bob never touches prod
actors = ["bob"]
services = ["prod/*"]
deny = ["read", "write", "delete"]
"""


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _config(text: str) -> Config:
    return Config.from_mapping(tomllib.loads(text))


@pytest.fixture
def seeded(home: Path) -> Path:
    """A vault with a CI secret, a prod secret and a canary, made with no policies."""
    with Store.init(home, actor="alice") as s:
        s.set("ci/app", "deploy", "ci-token")
        s.set("ci/other", "deploy", "ci-other")
        s.set("prod/db", "admin", CANARY)
    return home


def _open(home: Path, actor: str, text: str = CI_POLICY, clock: Clock | None = None) -> Store:
    if clock is None:
        return Store.open(home, actor=actor, config=_config(text))
    return Store.open(home, actor=actor, config=_config(text), clock=clock)


def _events(home: Path) -> list[tuple[str, str, str | None, str, str | None]]:
    with sqlite3.connect(home / "vault.db") as conn:
        return list(conn.execute("SELECT actor, op, service, outcome, reason FROM audit_events"
                                 " ORDER BY seq"))


def _write_config(home: Path, text: str) -> None:
    path = home / "config.toml"
    path.write_text(text)
    path.chmod(0o600)


# --- policies -------------------------------------------------------------------------


def test_ci_runner_reads_only_its_services(seeded: Path) -> None:
    with _open(seeded, "ci-runner-7") as s:
        assert s.get("ci/app", "deploy").reveal() == "ci-token"
        with pytest.raises(DeniedError) as info:
            s.get("prod/db", "admin")
        with pytest.raises(DeniedError):
            s.set("ci/app", "deploy", "overwritten")  # read and list only
        with pytest.raises(DeniedError):
            s.delete("ci/app", "deploy")
    message = str(info.value)
    assert info.value.exit_code == 4
    assert info.value.reason == "denied"
    # The message names the actor, the operation and the service, and the rule.
    for part in ("'ci-runner-7'", "may not read", "service 'prod/db'", "default_policy is deny"):
        assert part in message
    assert CANARY not in message
    assert CANARY not in repr(info.value)
    assert _events(seeded)[-3:] == [
        ("ci-runner-7", "read", "prod/db", "denied", "denied"),
        ("ci-runner-7", "write", "ci/app", "denied", "denied"),
        ("ci-runner-7", "delete", "ci/app", "denied", "denied"),
    ]
    with _open(seeded, "alice") as s:  # the denied write and delete did nothing
        assert s.get("ci/app", "deploy").reveal() == "ci-token"
        assert s.history("ci/app", "deploy")[0].version == 1


def test_deny_wins_over_allow(seeded: Path) -> None:
    with _open(seeded, "bob") as s:
        assert s.get("ci/app", "deploy").reveal() == "ci-token"  # the allow-all rule
        with pytest.raises(DeniedError, match=r"policies\[2\].*denies read"):
            s.get("prod/db", "admin")
        s.set("dev/x", "u", "v")  # allowed: only prod/* is denied


def test_default_policy_allow_and_deny(seeded: Path) -> None:
    rule = '[[policies]]\nactors = ["x"]\nservices = ["*"]\ndeny = ["read"]\n'
    with _open(seeded, "someone", rule) as s:  # default allow: no rule matches
        assert s.get("ci/app", "deploy").reveal() == "ci-token"
    with _open(seeded, "someone", 'default_policy = "deny"\n' + rule) as s, \
            pytest.raises(DeniedError, match="no policy matches; default_policy is deny"):
        s.get("ci/app", "deploy")


def test_list_and_usernames_show_only_what_the_actor_may_read(seeded: Path) -> None:
    with _open(seeded, "ci-runner") as s:
        assert sorted(c.service for c in s.credentials()) == ["ci/app", "ci/other"]
        assert s.usernames("ci/app") == ["deploy"]
        # keyring's get_credential must never take "no usernames" for an answer
        # where the actor may not read: a refusal, not an empty list.
        with pytest.raises(DeniedError):
            s.usernames("prod/db")
    assert ("ci-runner", "list", None, "ok", "hidden-1") in _events(seeded)
    only_list = ('default_policy = "deny"\n[[policies]]\nactors = ["*"]\nservices = ["*"]\n'
                 'allow = ["list"]\n')
    with _open(seeded, "lister", only_list) as s:
        assert s.credentials() == []  # may list, may not read: nothing shown
        with pytest.raises(DeniedError, match="may not read"):
            s.usernames("ci/app")


def test_history_needs_read_and_rollback_needs_write(seeded: Path) -> None:
    text = ('[[policies]]\nactors = ["reader"]\nservices = ["*"]\ndeny = ["write"]\n'
            '[[policies]]\nactors = ["writer"]\nservices = ["*"]\ndeny = ["read"]\n')
    with Store.open(seeded, actor="alice") as s:
        s.set("ci/app", "deploy", "ci-token-2")
    with _open(seeded, "reader", text) as s:
        assert [v.version for v in s.history("ci/app", "deploy")] == [2, 1]
        with pytest.raises(DeniedError, match="may not write"):
            s.rollback("ci/app", "deploy")
    with _open(seeded, "writer", text) as s:
        with pytest.raises(DeniedError, match="may not read"):
            s.history("ci/app", "deploy")
        assert s.rollback("ci/app", "deploy") == 3


def test_admin_commands_need_admin(seeded: Path, tmp_path: Path) -> None:
    text = ('[[policies]]\nactors = ["*"]\nservices = ["*"]\nallow = ["read", "write"]\n'
            'deny = ["admin"]\n')
    with _open(seeded, "operator", text) as s:
        for attempt in (s.keys.rotate, s.keys.versions, lambda: s.keys.retire(1), s.seal,
                        lambda: s.trail.prune(tmp_path / "archive.jsonl", keep=1.0)):
            with pytest.raises(DeniedError, match="may not admin the whole vault"):
                attempt()
        # Reading the state and the trail stays open to everyone.
        assert s.status()["sealed"] is None
        assert s.trail.verify().ok
    denied = [e for e in _events(seeded) if e[3] == "denied"]
    assert [e[1] for e in denied] == ["key-rotate", "key-list", "key-retire", "seal",
                                      "audit-prune"]


def test_vault_wide_requests_match_only_rules_that_cover_every_service(seeded: Path) -> None:
    scoped = ('default_policy = "deny"\n[[policies]]\nactors = ["*"]\nservices = ["ci/*"]\n'
              'allow = ["admin"]\n')
    with _open(seeded, "ops", scoped) as s, pytest.raises(DeniedError):
        s.keys.rotate()
    wide = scoped.replace('services = ["ci/*"]', 'services = ["*"]')
    with _open(seeded, "ops", wide) as s:
        assert s.keys.rotate() == 2


def test_every_internal_operation_has_a_gate() -> None:
    # A new operation must say how it is governed: _run_once looks it up with
    # OPS[op], so a missing entry is a KeyError, never an ungoverned default.
    assert {"read", "write", "delete", "purge", "rollback", "history", "list", "lookup",
            "seal", "unseal", "key-rotate", "key-rekey", "audit-prune"} <= OPS.keys()
    assert {op for op, g in OPS.items() if g.access == "admin"} >= {
        "key-list", "key-rotate", "key-rewrap", "key-retire", "key-rekey", "audit-prune", "seal",
        "unseal"}


# --- rate limits ----------------------------------------------------------------------

LIMIT = """
[[rate_limits]]
actors = ["*"]
services = ["*"]
operations = ["read"]
limit = 1
per = "10s"
burst = 2
"""


def test_token_bucket_under_a_frozen_clock(seeded: Path) -> None:
    clock = Clock()
    with _open(seeded, "app", LIMIT, clock) as s:
        s.get("ci/app", "deploy")
        s.get("ci/app", "deploy")  # the burst of 2
        with pytest.raises(RateLimitedError) as info:
            s.get("ci/app", "deploy")
        assert info.value.exit_code == 5
        assert info.value.reason == "rate-limited"
        assert info.value.retry_after == pytest.approx(10.0)
        assert "retry in 10 s" in str(info.value)
        assert "'app'" in str(info.value)
        clock.now += 5.0  # half a token: still short, and the wait says so
        with pytest.raises(RateLimitedError) as info:
            s.get("ci/app", "deploy")
        assert info.value.retry_after == pytest.approx(5.0)
        clock.now += 5.0
        s.get("ci/app", "deploy")
        s.set("ci/app", "deploy", "v2")  # writes are not limited by a read rule
    assert [e[3] for e in _events(seeded)[-6:]] == ["ok", "ok", "rate-limited", "rate-limited",
                                                   "ok", "ok"]


def test_a_rejected_request_keeps_its_bucket_state_but_not_the_operation(seeded: Path) -> None:
    text = LIMIT.replace('"read"', '"write"')
    clock = Clock()
    with _open(seeded, "app", text, clock) as s:
        s.set("ci/app", "deploy", "v2")
        s.set("ci/app", "deploy", "v3")
        with pytest.raises(RateLimitedError):
            s.set("ci/app", "deploy", "v4")
        # Another process sees the drained bucket: it was committed with the event.
        with _open(seeded, "app", text, clock) as other, pytest.raises(RateLimitedError):
            other.set("ci/app", "deploy", "v5")
    with Store.open(seeded, actor="alice") as s:
        assert s.get("ci/app", "deploy").reveal() == "v3"
        assert s.trail.verify().ok


def test_each_actor_has_its_own_bucket(seeded: Path) -> None:
    clock = Clock()
    with _open(seeded, "noisy", LIMIT, clock) as noisy, _open(seeded, "quiet", LIMIT,
                                                                clock) as quiet:
        noisy.get("ci/app", "deploy")
        noisy.get("ci/app", "deploy")
        with pytest.raises(RateLimitedError):
            noisy.get("ci/app", "deploy")
        assert quiet.get("ci/app", "deploy").reveal() == "ci-token"


def test_several_limits_must_all_pass(seeded: Path) -> None:
    text = LIMIT.replace("burst = 2", "burst = 5") + """
[[rate_limits]]
actors = ["*"]
services = ["prod/*"]
operations = ["read"]
limit = 1
per = "1h"
burst = 1
"""
    clock = Clock()
    with _open(seeded, "app", text, clock) as s:
        s.get("prod/db", "admin")
        with pytest.raises(RateLimitedError, match=r"rate_limits\[1\]") as info:
            s.get("prod/db", "admin")
        assert info.value.retry_after == pytest.approx(3600.0)
        # The rejection took nothing from the wide bucket: 4 reads of it remain.
        for _ in range(4):
            s.get("ci/app", "deploy")
        with pytest.raises(RateLimitedError, match=r"rate_limits\[0\]"):
            s.get("ci/app", "deploy")


def test_buckets_survive_reordering_and_reset_when_the_rule_changes(seeded: Path) -> None:
    clock = Clock()
    other = ('[[rate_limits]]\nactors = ["x"]\nservices = ["*"]\noperations = ["write"]\n'
             'limit = 1\nper = "1s"\n')
    with _open(seeded, "app", LIMIT + other, clock) as s:
        s.get("ci/app", "deploy")
        s.get("ci/app", "deploy")
    with _open(seeded, "app", other + LIMIT, clock) as s, pytest.raises(RateLimitedError):
        s.get("ci/app", "deploy")  # same rule, now rate_limits[1]: same bucket
    with _open(seeded, "app", LIMIT.replace("burst = 2", "burst = 3"), clock) as s:
        s.get("ci/app", "deploy")  # a changed rule is a new rule, with a full bucket


def test_full_buckets_are_dropped(seeded: Path) -> None:
    clock = Clock()
    with _open(seeded, "a", LIMIT, clock) as s:
        s.get("ci/app", "deploy")
    with sqlite3.connect(seeded / "vault.db") as conn:
        assert conn.execute("SELECT count(*) FROM rate_buckets").fetchone() == (1,)
    clock.now += 60  # a's bucket is full again
    with _open(seeded, "b", LIMIT, clock) as s:
        s.get("ci/app", "deploy")
    with sqlite3.connect(seeded / "vault.db") as conn:
        assert conn.execute("SELECT actor FROM rate_buckets").fetchall() == [("b",)]


def test_a_process_with_another_config_keeps_the_others_buckets(seeded: Path) -> None:
    clock = Clock()
    other = LIMIT.replace('operations = ["read"]', 'operations = ["read", "write"]')
    with _open(seeded, "a", LIMIT, clock) as s:
        s.get("ci/app", "deploy")
        s.get("ci/app", "deploy")
    with _open(seeded, "a", other, clock) as s:  # another rule: its own bucket
        s.get("ci/app", "deploy")
    with _open(seeded, "a", LIMIT, clock) as s, pytest.raises(RateLimitedError):
        s.get("ci/app", "deploy")  # the first rule's bucket survived the other config
    clock.now += 86400 + 60
    with _open(seeded, "a", other, clock) as s:
        s.get("ci/app", "deploy")
    with sqlite3.connect(seeded / "vault.db") as conn:  # a day on, the foreign one is gone
        assert conn.execute("SELECT count(*) FROM rate_buckets").fetchone() == (1,)


@pytest.mark.parametrize("edit", [
    "UPDATE rate_buckets SET tokens = 100",
    "DELETE FROM rate_buckets",
    "UPDATE rate_buckets SET updated = updated - 3600",
])
def test_editing_a_bucket_is_an_integrity_failure(seeded: Path, edit: str) -> None:
    clock = Clock()
    with _open(seeded, "app", LIMIT, clock) as s:
        s.get("ci/app", "deploy")
        s.get("ci/app", "deploy")
    with sqlite3.connect(seeded / "vault.db") as conn:
        conn.execute(edit)
    with pytest.raises(IntegrityError), _open(seeded, "app", LIMIT, clock) as s:
        s.get("ci/app", "deploy")


def test_bucket_rule_names_the_whole_rule() -> None:
    from keyring_hardened.access import RateLimit

    a = RateLimit(("*",), ("*",), frozenset({"read"}), 1, 10.0, 2)
    assert bucket_rule(a) == bucket_rule(a._replace(actors=("*",)))
    for changed in (a._replace(limit=2), a._replace(per=11.0), a._replace(burst=3),
                    a._replace(actors=("x",)), a._replace(services=("y",)),
                    a._replace(operations=frozenset({"write"}))):
        assert bucket_rule(changed) != bucket_rule(a)


# --- seal -----------------------------------------------------------------------------


def test_seal_refuses_every_credential_request_until_unseal(seeded: Path) -> None:
    clock = Clock()
    with Store.open(seeded, actor="alice", clock=clock) as s:
        s.seal()
        status = s.status()
        assert status["sealed"] == {"since": clock.now, "by": "alice"}
        for attempt in (lambda: s.get("ci/app", "deploy"), lambda: s.set("ci/app", "u", "v"),
                        lambda: s.delete("ci/app", "deploy"), s.credentials,
                        lambda: s.usernames("ci/app"), lambda: s.history("ci/app", "deploy"),
                        lambda: s.rollback("ci/app", "deploy"), s.keys.rotate):
            with pytest.raises(LockedError, match="sealed") as info:
                attempt()
            assert info.value.exit_code == 6
            assert info.value.reason == "sealed"
        with pytest.raises(UsageError, match="already sealed"):
            s.seal()
        assert s.trail.verify().ok  # the trail stays readable during an incident
        s.unseal()
        assert s.get("ci/app", "deploy").reveal() == "ci-token"
        with pytest.raises(UsageError, match="not sealed"):
            s.unseal()
    ops = [e[1:4] for e in _events(seeded)]
    assert ("seal", None, "ok") in ops
    assert ("unseal", None, "ok") in ops
    assert ("read", "ci/app", "locked") in ops


@pytest.mark.parametrize("edit", [
    "DELETE FROM seal",
    "UPDATE seal SET actor = 'someone else'",
    "UPDATE seal SET sealed_at = 0",
])
def test_editing_the_seal_is_an_integrity_failure(seeded: Path, edit: str) -> None:
    with Store.open(seeded, actor="alice") as s:
        s.seal()
    with sqlite3.connect(seeded / "vault.db") as conn:
        conn.execute(edit)
    done = run_cli("get", "ci/app", "deploy", home=seeded)
    assert done.returncode == 3, done.stderr
    assert "seal" in done.stderr


def test_writing_a_seal_row_back_after_unseal_is_an_integrity_failure(seeded: Path) -> None:
    with Store.open(seeded, actor="alice") as s:
        s.seal()
    with sqlite3.connect(seeded / "vault.db") as conn:
        row = conn.execute("SELECT id, sealed_at, actor FROM seal").fetchone()
    with Store.open(seeded, actor="alice") as s:
        s.unseal()
    with sqlite3.connect(seeded / "vault.db") as conn:
        conn.execute("INSERT INTO seal VALUES (?, ?, ?)", row)
    assert run_cli("get", "ci/app", "deploy", home=seeded).returncode == 3


def test_unseal_proves_the_key_file(seeded: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)
    with Store.open(seeded, actor="alice") as s:
        s.seal()
        with pytest.raises(LockedError, match="wrong key file"):
            s.unseal(key_file=wrong)
        assert s.status()["sealed"] is not None
        s.unseal(key_file=seeded / "master.key")
        assert s.status()["sealed"] is None
    assert ("alice", "unseal", None, "locked", "wrong-key") in _events(seeded)


def test_unseal_proves_the_passphrase(home: Path) -> None:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("svc", "u", "v")
        s.seal()
        with pytest.raises(LockedError, match="wrong passphrase"):
            s.unseal(passphrase="not the passphrase")
        with pytest.raises(UsageError, match="passphrase, not a key file"):
            s.unseal(key_file=home / "master.key")
        with pytest.raises(LockedError, match="sealed"):
            s.get("svc", "u")
        s.unseal(passphrase=PASSPHRASE)
        assert s.get("svc", "u").reveal() == "v"


def test_sealed_cli_and_keyring_api(seeded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_cli("seal", home=seeded).returncode == 0
    status = run_cli("status", home=seeded)
    assert status.returncode == 0
    assert "sealed: since" in status.stdout
    done = run_cli("get", "ci/app", "deploy", home=seeded)
    assert done.returncode == 6
    assert "sealed" in done.stderr
    assert done.stdout == ""
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(seeded))
    backend._close_all()
    kr = HardenedKeyring()
    with pytest.raises(VaultLocked, match="sealed"):
        kr.get_password("ci/app", "deploy")
    with pytest.raises(kerrors.KeyringError):
        kr.set_password("ci/app", "deploy", CANARY)
    backend._close_all()
    assert run_cli("unseal", home=seeded).returncode == 0
    assert run_cli("get", "ci/app", "deploy", home=seeded).stdout == "ci-token\n"
    assert "sealed: no" in run_cli("status", home=seeded).stdout


# --- the keyring API and the CLI ------------------------------------------------------


def test_keyring_api_raises_access_denied_and_rate_limited(
        seeded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_config(seeded, CI_POLICY + LIMIT.replace('actors = ["*"]', 'actors = ["ci-*"]'))
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(seeded))
    monkeypatch.setenv("KEYRING_HARDENED_ACTOR", "ci-runner")
    backend._close_all()
    kr = HardenedKeyring()
    with pytest.raises(AccessDenied, match="may not read service 'prod/db'") as denied:
        kr.get_password("prod/db", "admin")
    assert isinstance(denied.value, kerrors.KeyringError)
    with pytest.raises(AccessDenied):
        kr.get_credential("prod/db", None)  # never a silent None
    assert kr.get_password("ci/app", "deploy") == "ci-token"
    kr.get_password("ci/app", "deploy")  # the burst of 2 is spent
    with pytest.raises(RateLimited) as limited:
        kr.get_password("ci/app", "deploy")
    assert isinstance(limited.value, kerrors.KeyringError)
    assert 0 < limited.value.retry_after <= 10.0
    backend._close_all()


def test_keyring_command_fails_on_a_denial(seeded: Path) -> None:
    import subprocess
    import sys

    _write_config(seeded, CI_POLICY)
    env = dict(os.environ, KEYRING_HARDENED_HOME=str(seeded), KEYRING_HARDENED_ACTOR="ci-x",
               PYTHON_KEYRING_BACKEND="keyring_hardened.backend.HardenedKeyring")
    done = subprocess.run([sys.executable, "-m", "keyring", "get", "prod/db", "admin"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "may not read" in done.stderr
    assert CANARY not in done.stdout + done.stderr
    ok = subprocess.run([sys.executable, "-m", "keyring", "get", "ci/app", "deploy"],
                        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0
    assert ok.stdout == "ci-token\n"


def test_cli_exit_codes_for_denied_and_limited(seeded: Path) -> None:
    _write_config(seeded, CI_POLICY + LIMIT.replace('actors = ["*"]', 'actors = ["ci-*"]'))
    env = {"KEYRING_HARDENED_ACTOR": "ci-runner"}
    denied = run_cli("get", "prod/db", "admin", home=seeded, env=env)
    assert denied.returncode == 4
    assert denied.stderr.count("\n") == 1
    assert "Traceback" not in denied.stderr
    codes = [run_cli("get", "ci/app", "deploy", home=seeded, env=env) for _ in range(3)]
    assert [c.returncode for c in codes[:2]] == [0, 0]
    assert codes[2].returncode == 5
    assert "retry in" in codes[2].stderr
    listed = run_cli("list", "--json", home=seeded, env=env)
    assert [c["service"] for c in json.loads(listed.stdout)] == ["ci/app", "ci/other"]


def test_policy_test_explains_allow_deny_default_and_limits(seeded: Path) -> None:
    _write_config(seeded, CI_POLICY + LIMIT)
    allow = run_cli("policy", "test", "--actor", "ci-9", "--service", "ci/app", "--op", "read",
                    home=seeded)
    assert allow.returncode == 0, allow.stderr
    assert "decision: allow: policies[0] (actors ci-*; services ci/*) allows read" in allow.stdout
    assert "rate limit: rate_limits[0]: 1 per 10s, burst 2" in allow.stdout
    assert "2.00 tokens now" in allow.stdout
    assert "result: allowed" in allow.stdout
    deny = run_cli("policy", "test", "--actor", "bob", "--service", "prod/db", "--op", "write",
                   home=seeded)
    assert deny.returncode == 4
    assert "decision: deny: policies[2] (actors bob; services prod/*) denies write" in deny.stdout
    assert "rate limits: none apply" in deny.stdout
    default = run_cli("policy", "test", "--actor", "nobody", "--op", "admin", home=seeded)
    assert default.returncode == 4
    assert "no policy matches; default_policy is deny" in default.stdout
    # Drain the actor's bucket, then ask: allowed by policy, limited right now.
    for _ in range(2):
        assert run_cli("get", "ci/app", "deploy", home=seeded,
                       env={"KEYRING_HARDENED_ACTOR": "ci-9"}).returncode == 0
    limited = run_cli("policy", "test", "--actor", "ci-9", "--service", "ci/app", "--op",
                      "read", "--json", home=seeded)
    assert limited.returncode == 5
    doc = json.loads(limited.stdout)
    assert doc["decision"] == "allow"
    assert doc["result"] == "rate limited now"
    assert doc["limits"][0]["tokens"] < 1
    assert doc["limits"][0]["retry_after"] > 0
    # Asking took nothing: the counts are unchanged by policy test itself.
    again = run_cli("policy", "test", "--actor", "ci-9", "--service", "ci/app", "--op",
                    "read", "--json", home=seeded)
    assert json.loads(again.stdout)["limits"][0]["tokens"] >= doc["limits"][0]["tokens"]
    assert run_cli("policy", "test", "--actor", "x", "--op", "read",
                   home=seeded).returncode == 2  # read needs a service


def test_policy_test_without_a_config(seeded: Path) -> None:
    done = run_cli("policy", "test", "--service", "ci/app", "--op", "read", home=seeded)
    assert done.returncode == 0
    assert "policy: none configured" in done.stdout
    assert "result: allowed" in done.stdout


def test_config_check_reports_every_access_error(seeded: Path) -> None:
    _write_config(seeded, """
default_policy = "maybe"
[[policies]]
actors = ["ci-["]
services = ["*"]
allow = ["raed"]
colour = "blue"
[[rate_limits]]
actors = ["*"]
services = ["*"]
operations = ["read"]
limit = 0
per = "soon"
""")
    done = run_cli("config", "check", home=seeded)
    assert done.returncode == 2
    for key in ('default_policy: must be "allow" or "deny"', 'policies[0].actors[0]: unbalanced',
                'policies[0].allow[0]: unknown operation "raed"', "policies[0].colour: unknown key",
                "rate_limits[0].limit: must be between 1", "rate_limits[0].per: expected a"):
        assert key in done.stderr, key
    # Found when the config loads, before anything is served: get refuses too.
    got = run_cli("get", "ci/app", "deploy", home=seeded)
    assert got.returncode == 2
    assert got.stdout == ""


# --- unlock throttle ------------------------------------------------------------------


@pytest.fixture
def locked_vault(home: Path) -> Path:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("svc", "u", "v")
    return home


def _failures(home: Path) -> tuple[int, float] | None:
    with sqlite3.connect(home / "vault.db") as conn:
        row = conn.execute("SELECT failures, last_at FROM unlock_throttle").fetchone()
    return None if row is None else (row[0], row[1])


def test_unlock_backoff_under_a_frozen_clock(locked_vault: Path) -> None:
    clock = Clock()
    for n in range(1, 6):  # five free attempts
        with pytest.raises(LockedError, match="wrong passphrase"):
            Store.open(locked_vault, passphrase="wrong guess", config=FAST_KDF, clock=clock)
        assert _failures(locked_vault) == (n, clock.now)
    # After the fifth failure, even the right passphrase waits 1 s.
    with pytest.raises(LockedError, match="try again in 1 s") as info:
        Store.open(locked_vault, passphrase=PASSPHRASE, config=FAST_KDF, clock=clock)
    assert info.value.exit_code == 6
    assert info.value.reason == "unlock-throttled"
    clock.now += 1.0
    with pytest.raises(LockedError, match="wrong passphrase"):  # the 6th failure: 2 s
        Store.open(locked_vault, passphrase="wrong guess", config=FAST_KDF, clock=clock)
    clock.now += 1.5
    with pytest.raises(LockedError, match="try again in 1 s"):
        Store.open(locked_vault, passphrase=PASSPHRASE, config=FAST_KDF, clock=clock)
    clock.now += 0.5
    with Store.open(locked_vault, passphrase=PASSPHRASE, config=FAST_KDF, clock=clock) as s:
        assert s.get("svc", "u").reveal() == "v"
    assert _failures(locked_vault) is None  # a correct unlock resets the count
    # Each failure was audited (chained at the good unlock); the refusals were not guesses.
    events = [e for e in _events(locked_vault) if e[1] == "unlock"]
    assert len(events) == 6
    assert all(e[4] == "wrong-passphrase; recorded before unlock"
                                    for e in events)


def test_backoff_doubles_to_fifteen_minutes(locked_vault: Path) -> None:
    with sqlite3.connect(locked_vault / "vault.db") as conn:
        conn.execute("INSERT INTO unlock_throttle VALUES (1, 40, ?)", (Clock().now,))
    with pytest.raises(LockedError, match="try again in 900 s"):
        Store.open(locked_vault, passphrase=PASSPHRASE, config=FAST_KDF, clock=Clock())


def test_a_missing_passphrase_is_not_a_guess(locked_vault: Path) -> None:
    for _ in range(7):
        with pytest.raises(LockedError):
            Store.open(locked_vault, config=FAST_KDF)  # no passphrase source at all
    assert _failures(locked_vault) is None


def test_backoff_persists_across_processes(locked_vault: Path) -> None:
    wrong = {"KEYRING_HARDENED_PASSPHRASE": "wrong guess"}
    for n in range(1, 6):
        done = run_cli("get", "svc", "u", home=locked_vault, env=wrong)
        assert done.returncode == 6
        assert "wrong passphrase" in done.stderr
        found = _failures(locked_vault)
        assert found is not None
        assert found[0] == n  # counted by each process in the database
    # From here each failure doubles the wait; a loaded machine may let a short
    # wait pass between two processes, but not the longer ones that follow.
    for _ in range(10):
        done = run_cli("get", "svc", "u", home=locked_vault, env=wrong)
        assert done.returncode == 6
        if "try again in" in done.stderr:
            break
    else:
        pytest.fail("ten more wrong guesses were never paused")
    assert "unlocking is paused after" in done.stderr
    right = {"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE}
    with sqlite3.connect(locked_vault / "vault.db") as conn:  # the wait passes
        conn.execute("UPDATE unlock_throttle SET last_at = last_at - 2000")
    done = run_cli("get", "svc", "u", home=locked_vault, env=right)
    assert done.returncode == 0
    assert done.stdout == "v\n"
    assert _failures(locked_vault) is None


def test_a_wrong_unseal_counts_in_the_throttle(seeded: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)
    clock = Clock()
    with Store.open(seeded, actor="alice", clock=clock) as s:
        s.seal()
        for _ in range(5):
            with pytest.raises(LockedError, match="wrong key file"):
                s.unseal(key_file=wrong)
        with pytest.raises(LockedError, match="try again in"):
            s.unseal(key_file=seeded / "master.key")
        clock.now += 1
        s.unseal(key_file=seeded / "master.key")
    assert _failures(seeded) is None


def test_a_damaged_throttle_row_does_not_open_the_door(locked_vault: Path) -> None:
    with sqlite3.connect(locked_vault / "vault.db") as conn:
        conn.execute("INSERT INTO unlock_throttle VALUES (1, 'many', 'later')")
    with pytest.raises(LockedError, match="try again in"):
        Store.open(locked_vault, passphrase=PASSPHRASE, config=FAST_KDF, clock=Clock())


def test_not_found_still_costs_a_token(seeded: Path) -> None:
    # Probing for names is limited like reading them.
    clock = Clock()
    with _open(seeded, "prober", LIMIT, clock) as s:
        for name in ("a", "b"):
            with pytest.raises(NotFoundError):
                s.get("ci/app", name)
        with pytest.raises(RateLimitedError):
            s.get("ci/app", "c")


@pytest.mark.sqlite_only("vaults made by 0.1 are SQLite files; a PostgreSQL vault is never one")
def test_upgrade_of_a_0_1_vault_needs_admin(tmp_path: Path) -> None:
    from .test_state import _legacy

    home = _legacy(tmp_path)
    text = '[[policies]]\nactors = ["*"]\nservices = ["*"]\ndeny = ["admin"]\n'
    with Store.open(home, upgrade=True, actor="operator", config=_config(text)) as s, \
            pytest.raises(DeniedError, match="may not admin the whole vault"):
        s.upgrade()
    with Store.open(home, upgrade=True, actor="operator") as s:
        assert "2 credentials" in s.upgrade()


def test_a_long_lived_process_verifies_the_rows_as_they_are(seeded: Path) -> None:
    # A session keeps the vault-wide rows it verified while the root stays the
    # same; audit verify reads them again all the same.
    with Store.open(seeded, actor="alice") as s:
        s.seal()
        assert s.status()["sealed"] is not None
        with sqlite3.connect(seeded / "vault.db") as conn:
            conn.execute("DELETE FROM seal")
        with pytest.raises(LockedError, match="sealed"):  # decided on the verified copy
            s.get("ci/app", "deploy")
        with pytest.raises(IntegrityError, match="rows do not match the state"):
            s.trail.verify()


def test_import_backup_and_restore_need_admin(seeded: Path, tmp_path: Path) -> None:
    _write_config(seeded, '[[policies]]\nactors = ["ops"]\nservices = ["*"]\ndeny = ["admin"]\n')
    entries = tmp_path / "entries.txt"
    entries.write_text("ci/app\tdeploy\n")
    env = {"KEYRING_HARDENED_ACTOR": "ops"}
    for argv in (["backup", str(tmp_path / "copy.db")],
                 ["import", "--from", "keyrings.alt.file.PlaintextKeyring", "--entries",
                  str(entries)]):
        done = run_cli(*argv, home=seeded, env=env)
        assert done.returncode == 4, (argv, done.stderr)
        assert "may not admin the whole vault" in done.stderr
    assert not (tmp_path / "copy.db").exists()
    made = run_cli("backup", str(tmp_path / "copy.db"), home=seeded)  # another actor may
    assert made.returncode == 0, made.stderr
    done = run_cli("restore", str(tmp_path / "copy.db"), home=seeded, env=env)
    assert done.returncode == 4, done.stderr
    ops = [e[1] for e in _events(seeded) if e[3] == "denied"]
    assert ops == ["backup", "import"]  # the restore's refusal is in the copy it refused
