"""Attacks on access control: policies, rate limits, the seal and the unlock throttle.

Each test here is an attack, a local attacker's or a demanding user's. A
test that passes proves a defence; a test marked ``xfail(strict=True)`` is
a finding that still holds (its reason says what is wrong and how to fix
it), so fixing the code makes it pass and the mark must then go.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from keyring import errors as kerrors

from keyring_hardened import backend, cli
from keyring_hardened.access import parse_access
from keyring_hardened.backend import AccessDenied, HardenedKeyring
from keyring_hardened.config import Config
from keyring_hardened.errors import (
    ConfigError,
    DeniedError,
    HardenedError,
    IntegrityError,
    LockedError,
    RateLimitedError,
)
from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF, PASSPHRASE

POLICY = """
default_policy = "deny"

[[policies]]                # the CI runner reads only ci/*
actors = ["ci-*"]
services = ["ci/*"]
allow = ["read", "list"]

[[policies]]                # alice does everything
actors = ["alice"]
services = ["*"]
allow = ["*"]
"""

LIMIT = """
[[rate_limits]]
actors = ["*"]
services = ["*"]
operations = ["read"]
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


def _config(text: str) -> Config:
    return Config.from_mapping(tomllib.loads(text))


def _open(home: Path, actor: str, text: str = POLICY, clock: Clock | None = None) -> Store:
    return Store.open(home, actor=actor, config=_config(text), clock=clock or Clock())


def _write_config(home: Path, text: str) -> None:
    path = home / "config.toml"
    path.write_text(text)
    path.chmod(0o600)


def _sql(home: Path, *statements: str) -> None:
    with sqlite3.connect(home / "vault.db") as conn:
        for statement in statements:
            conn.execute(statement)


def _audit_text(home: Path) -> str:
    with sqlite3.connect(home / "vault.db") as conn:
        rows = conn.execute("SELECT actor, op, service, username, outcome, reason"
                            " FROM audit_events").fetchall()
    return repr(rows)


def _throttle_row(home: Path) -> tuple[object, object] | None:
    with sqlite3.connect(home / "vault.db") as conn:
        row = conn.execute("SELECT failures, last_at FROM unlock_throttle").fetchone()
    return None if row is None else (row[0], row[1])


@pytest.fixture
def seeded(home: Path) -> Path:
    """A key-file vault with a CI secret and the canary in prod, made with no policies."""
    with Store.init(home, actor="alice") as s:
        s.set("ci/app", "deploy", "ci-token")
        s.set("prod/db", "admin", CANARY)
    return home


@pytest.fixture
def locked_vault(home: Path) -> Path:
    """A passphrase vault (the only mode where guessing matters)."""
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("svc", "u", "v")
    return home


def _wrong_key(tmp_path: Path) -> Path:
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)
    return wrong


def _cli(home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         *argv: str, actor: str | None = None) -> tuple[int, str, str]:
    """Run the admin CLI in this process (fast): exit code, stdout, stderr."""
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))
    if actor is not None:
        monkeypatch.setenv("KEYRING_HARDENED_ACTOR", actor)
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- unlock throttle: parallel guessers -------------------------------------------------


def _guess_in_parallel(home: Path, threads: int) -> tuple[int, list[str]]:
    """``threads`` unlocks at once with a wrong passphrase: (guesses made, outcomes).

    The passphrase source blocks until every thread has reached it (or a
    second passes), so a guess that is let through while others are let
    through too is counted, whatever the scheduling.
    """
    barrier = threading.Barrier(threads, timeout=1.0)
    guesses: list[int] = []
    outcomes: list[str] = []

    def prompt() -> str:
        guesses.append(1)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        return "a wrong guess"

    def attempt() -> None:
        try:
            Store.open(home, prompt=prompt, config=FAST_KDF).close()
            outcomes.append("opened")
        except HardenedError as exc:
            outcomes.append(exc.reason or exc.kind)

    workers = [threading.Thread(target=attempt) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    return len(guesses), sorted(outcomes)


@pytest.mark.parametrize(("failures", "free"), [(0, 5), (4, 1)])
def test_parallel_guessers_get_no_more_than_the_free_attempts(
        locked_vault: Path, failures: int, free: int) -> None:
    if failures:
        _sql(locked_vault, f"INSERT INTO unlock_throttle VALUES (1, {failures}, {time.time()})")
    guesses, outcomes = _guess_in_parallel(locked_vault, 6)
    assert "opened" not in outcomes
    assert guesses <= free, outcomes


def test_parallel_guessers_past_the_free_attempts_share_one_attempt(locked_vault: Path) -> None:
    # Past the free five, the claim is taken in a write transaction: one guess per wait.
    _sql(locked_vault, f"INSERT INTO unlock_throttle VALUES (1, 9, {time.time() - 600})")
    guesses, outcomes = _guess_in_parallel(locked_vault, 5)
    assert guesses == 1
    assert outcomes == ["unlock-throttled"] * 4 + ["wrong-passphrase"]
    row = _throttle_row(locked_vault)
    assert row is not None
    assert row[0] == 10


GUESS = textwrap.dedent("""
    import sys
    from keyring_hardened import cli
    sys.stdin.readline()  # imported ahead; guess when told
    sys.exit(cli.main(["get", "svc", "u"]))
""")


@pytest.mark.slow
def test_five_guessing_processes_past_the_free_attempts_get_one_guess(locked_vault: Path,
                                                                      tmp_path: Path) -> None:
    # A wait of 16 s (9 failures) is far longer than the processes' spread.
    _sql(locked_vault, f"INSERT INTO unlock_throttle VALUES (1, 9, {time.time() - 600})")
    env = dict(os.environ, KEYRING_HARDENED_HOME=str(locked_vault),
               KEYRING_HARDENED_PASSPHRASE="a wrong guess")
    logs = [tmp_path / f"err{i}" for i in range(5)]
    procs = []
    for log in logs:
        with log.open("w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", GUESS], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=err, env=env))
    time.sleep(0.5)  # all started; they import while waiting for the word
    for p in procs:  # the word to all, then wait for all: the guesses run side by side
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.close()
    for p in procs:
        p.wait(timeout=120)
    results = [(p.returncode, log.read_text()) for p, log in zip(procs, logs, strict=True)]
    assert [code for code, _ in results] == [6] * 5, results
    guessed = [err for _, err in results if "wrong passphrase" in err]
    paused = [err for _, err in results if "unlocking is paused after" in err]
    assert (len(guessed), len(paused)) == (1, 4), results


def test_a_denied_actor_cannot_throttle_everyone_through_unseal(seeded: Path,
                                                                tmp_path: Path) -> None:
    wrong = _wrong_key(tmp_path)
    clock = Clock()
    with _open(seeded, "ci-runner", clock=clock) as s:
        for _ in range(6):
            with pytest.raises(DeniedError):
                s.unseal(key_file=wrong)
    with _open(seeded, "alice", clock=clock) as s:  # the vault's owner, right key file
        assert s.get("ci/app", "deploy").reveal() == "ci-token"


@pytest.mark.parametrize("row", [
    "(1, -1, {now})",                        # a negative count
    "(1, 2.5, {now})",                       # not a whole number
    "(1, 'many', {now})",                    # text
    "(1, X'07', {now})",                     # a blob
    "(1, 9223372036854775807, {now})",       # the largest SQLite integer
    "(1, 7, 'later')",                   # a time that is not a number
    "(1, 7, X'00')",
    "(1, 7, 9e999)",                     # infinity
    "(1, 7, 1e300)",                     # far in the future
])
def test_a_damaged_throttle_row_never_shortens_the_wait(locked_vault: Path, row: str) -> None:
    # A damaged count, stamped now: it must read as "wait", not as "no failures".
    _sql(locked_vault, "INSERT INTO unlock_throttle VALUES " + row.format(now=Clock().now))
    with pytest.raises(LockedError, match="try again in") as info:
        Store.open(locked_vault, passphrase=PASSPHRASE, config=FAST_KDF, clock=Clock())
    assert info.value.exit_code == 6
    assert info.value.reason == "unlock-throttled"


def test_deleting_the_throttle_row_resets_it_as_documented(locked_vault: Path) -> None:
    _sql(locked_vault, f"INSERT INTO unlock_throttle VALUES (1, 40, {Clock().now})")
    with pytest.raises(LockedError, match="try again in 900 s"):
        Store.open(locked_vault, passphrase=PASSPHRASE, config=FAST_KDF, clock=Clock())
    _sql(locked_vault, "DELETE FROM unlock_throttle")  # THROTTLE-3: the documented limit
    with Store.open(locked_vault, passphrase=PASSPHRASE, config=FAST_KDF, clock=Clock()) as s:
        assert s.get("svc", "u").reveal() == "v"


# --- database edits without the key: buckets and seal ----------------------------------


def _drained(home: Path, clock: Clock) -> None:
    with _open(home, "ci-runner", POLICY + LIMIT, clock) as s:
        s.get("ci/app", "deploy")


@pytest.mark.parametrize("edit", [
    "UPDATE rate_buckets SET tokens = 9e999",
    "UPDATE rate_buckets SET tokens = -9e999",
    "UPDATE rate_buckets SET tokens = 1e308",
    "UPDATE rate_buckets SET tokens = 'lots'",
    "UPDATE rate_buckets SET tokens = X'00'",
    "UPDATE rate_buckets SET updated = 9e999",
    "UPDATE rate_buckets SET updated = -1",
    "UPDATE rate_buckets SET updated = 'now'",
    "UPDATE rate_buckets SET rule = X'00'",
    "UPDATE rate_buckets SET actor = 'ci-other'",   # moved to another actor
    "UPDATE rate_buckets SET rule = 'x' || rule",    # moved to another rule
    "INSERT INTO rate_buckets VALUES ('r', 'ci-victim', 0, 1800000000)",  # starve another
    "DELETE FROM rate_buckets",
])
def test_a_hostile_bucket_row_is_an_integrity_failure(seeded: Path, edit: str) -> None:
    clock = Clock()
    _drained(seeded, clock)
    _sql(seeded, edit)
    with pytest.raises(IntegrityError) as info, _open(seeded, "ci-runner", POLICY + LIMIT,
                                                      clock) as s:
        s.get("ci/app", "deploy")
    assert info.value.exit_code == 3


def test_an_older_bucket_row_written_back_is_an_integrity_failure(seeded: Path) -> None:
    clock = Clock()
    _drained(seeded, clock)  # one token left
    with sqlite3.connect(seeded / "vault.db") as conn:
        old = conn.execute("SELECT rule, actor, tokens, updated FROM rate_buckets").fetchone()
    _drained(seeded, clock)  # none left
    with sqlite3.connect(seeded / "vault.db") as conn:
        conn.execute("INSERT OR REPLACE INTO rate_buckets VALUES (?, ?, ?, ?)", old)
    with pytest.raises(IntegrityError), _open(seeded, "ci-runner", POLICY + LIMIT, clock) as s:
        s.get("ci/app", "deploy")


@pytest.mark.parametrize("edit", [
    "UPDATE seal SET sealed_at = 9e999",
    "UPDATE seal SET sealed_at = 'never'",
    "UPDATE seal SET actor = X'00'",
    "UPDATE seal SET actor = 42",
    "DELETE FROM seal",
])
def test_a_hostile_seal_row_is_an_integrity_failure_never_an_unseal(seeded: Path,
                                                                     edit: str) -> None:
    with Store.open(seeded, actor="alice") as s:
        s.seal()
    _sql(seeded, edit)
    with pytest.raises(IntegrityError) as info, Store.open(seeded, actor="alice") as s:
        s.get("ci/app", "deploy")
    assert info.value.exit_code == 3


def test_a_seal_row_inserted_by_hand_is_an_integrity_failure(seeded: Path) -> None:
    _sql(seeded, "INSERT INTO seal VALUES (1, 1800000000, 'mallory')")  # a forged seal
    with pytest.raises(IntegrityError), Store.open(seeded, actor="alice") as s:
        s.get("ci/app", "deploy")


# --- concurrency ------------------------------------------------------------------------


def test_a_seal_stops_a_reader_that_holds_the_verified_rows(seeded: Path) -> None:
    with Store.open(seeded, actor="reader") as reader, Store.open(seeded, actor="alice") as op:
        assert reader.get("ci/app", "deploy").reveal() == "ci-token"  # keeps the rows it saw
        op.seal()
        with pytest.raises(LockedError, match="sealed"):
            reader.get("ci/app", "deploy")
        with pytest.raises(LockedError, match="sealed"):
            reader.credentials()
        op.unseal()
        assert reader.get("ci/app", "deploy").reveal() == "ci-token"


def test_threads_racing_on_one_bucket_share_its_burst(seeded: Path) -> None:
    clock = Clock()  # frozen: no refill, so exactly the burst is granted in all
    text = POLICY + LIMIT.replace("burst = 2", "burst = 7")
    granted: list[int] = []
    refused: list[int] = []

    def reader() -> None:
        with _open(seeded, "ci-runner", text, clock) as s:
            for _ in range(6):
                try:
                    s.get("ci/app", "deploy")
                    granted.append(1)
                except RateLimitedError:
                    refused.append(1)

    workers = [threading.Thread(target=reader) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert (len(granted), len(refused)) == (7, 11)


# --- surfaces: a denied actor through every door ----------------------------------------


def test_the_keyring_api_never_answers_none_to_a_denied_actor(
        seeded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_config(seeded, POLICY)
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(seeded))
    monkeypatch.setenv("KEYRING_HARDENED_ACTOR", "ci-runner")
    backend._close_all()
    kr = HardenedKeyring()
    calls: list[Callable[[], object]] = [
        lambda: kr.get_password("prod/db", "admin"),
        lambda: kr.get_password("prod/missing", "x"),      # no existence oracle either
        lambda: kr.get_credential("prod/db", "admin"),
        lambda: kr.get_credential("prod/db", None),
        lambda: kr.set_password("prod/db", "admin", CANARY + "2"),
        lambda: kr.delete_password("prod/db", "admin"),
    ]
    try:
        for call in calls:
            with pytest.raises(AccessDenied) as info:
                call()
            assert isinstance(info.value, kerrors.KeyringError)
            assert CANARY not in str(info.value)
    finally:
        backend._close_all()
    with Store.open(seeded, actor="alice") as s:
        assert s.get("prod/db", "admin").reveal() == CANARY  # nothing was changed
    assert CANARY not in _audit_text(seeded)


def test_history_rollback_and_list_refuse_or_hide_for_a_denied_actor(
        seeded: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    with Store.open(seeded, actor="alice") as s:
        s.set("prod/db", "admin", "newer")
    _write_config(seeded, POLICY)
    for argv, want in ((["history", "prod/db", "admin"], 4),
                       (["rollback", "prod/db", "admin"], 4),
                       (["get", "prod/db", "admin", "--version", "1"], 4),
                       (["delete", "prod/db", "admin", "--purge"], 4),
                       (["key", "rewrap"], 4),
                       (["seal"], 4)):
        code, out, err = _cli(seeded, monkeypatch, capsys, *argv, actor="ci-runner")
        assert code == want, (argv, err)
        assert out == ""
        assert CANARY not in err
    code, out, _ = _cli(seeded, monkeypatch, capsys, "list", "--json", actor="ci-runner")
    assert code == 0
    assert [c["service"] for c in json.loads(out)] == ["ci/app"]
    with Store.open(seeded, actor="alice") as s:
        assert s.get("prod/db", "admin").reveal() == "newer"  # no rollback happened


def test_the_canary_never_shows_in_refusals_audit_or_policy_test(
        seeded: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    with _open(seeded, "ci-runner", POLICY + LIMIT, clock) as s:
        seen = []
        for attempt in (lambda: s.get("prod/db", "admin"),
                        lambda: s.set("prod/db", "admin", CANARY),
                        lambda: s.get("ci/app", "deploy"), lambda: s.get("ci/app", "deploy"),
                        lambda: s.set("ci/app", "deploy", CANARY),  # write: denied
                        lambda: s.get("ci/app", "deploy")):         # limited
            try:
                attempt()
            except HardenedError as exc:
                seen.append(f"{exc} {exc.reason}")
        assert len(seen) == 4
        assert CANARY not in " ".join(seen)
    with _open(seeded, "alice", POLICY + LIMIT, clock) as s:
        s.seal()
        with pytest.raises(LockedError) as info:
            s.set("prod/db", "admin", CANARY)
        assert CANARY not in str(info.value)
        s.unseal()
    _write_config(seeded, POLICY + LIMIT)
    for actor in ("ci-runner", "alice"):
        code, out, err = _cli(seeded, monkeypatch, capsys, "policy", "test", "--actor", actor,
                              "--service", "prod/db", "--op", "read", "--json")
        assert code in (0, 4)
        assert CANARY not in out + err
    assert CANARY not in _audit_text(seeded)


# --- policy test against what the request really does -----------------------------------


def test_policy_test_for_list_says_what_list_does(seeded: Path) -> None:
    with _open(seeded, "ci-runner") as s:
        shown = [c.service for c in s.credentials()]
        explained = s.explain("ci-runner", "list", None)
    assert shown == ["ci/app"]  # list works for the runner ...
    assert explained.allowed    # ... so policy test must not say it is denied


def test_policy_test_does_not_call_a_sealed_request_allowed(
        seeded: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    with Store.open(seeded, actor="alice") as s:
        s.seal()
    code, out, _ = _cli(seeded, monkeypatch, capsys, "policy", "test", "--actor", "alice",
                        "--service", "ci/app", "--op", "read")
    assert "sealed" in out  # it does say so in a note ...
    assert "result: allowed" not in out  # ... but the verdict and the exit code say allowed
    assert code != 0


# --- hostile config ---------------------------------------------------------------------


def test_a_caret_negation_glob_is_refused(seeded: Path) -> None:
    text = '[[policies]]\nactors = ["*"]\nservices = ["[^c]*"]\ndeny = ["read"]\n'
    config, problems = parse_access(tomllib.loads(text))
    # Accepted, it would let prod/db be read and deny ci/app: the opposite of its words.
    with pytest.raises(ConfigError, match=r"services\[0\]: a \"\[\^\" set"):
        _open(seeded, "anyone", text)
    assert config is None
    assert any("services[0]" in p for p in problems)


def test_globs_that_fnmatch_would_misread_are_refused() -> None:
    for glob, why in (("ci-[", "unbalanced"), ("[z-a]*", "reversed"), ("[!z-a]", "reversed"),
                      ("[!]", "unbalanced"), ("a[c-a-z]", "reversed"), ("[a--]", "reversed")):
        text = f'[[policies]]\nactors = ["*"]\nservices = ["{glob}"]\ndeny = ["read"]\n'
        config, problems = parse_access(tomllib.loads(text))
        assert config is None, glob
        assert any(why in p and "services[0]" in p for p in problems), (glob, problems)
        assert not any(glob in p for p in problems)  # the glob itself is not echoed


def test_a_lowercase_secret_pasted_as_an_operation_is_not_echoed() -> None:
    secret = "swordfish"
    text = f'[[policies]]\nactors = ["*"]\nservices = ["*"]\nallow = ["{secret}"]\n'
    config, problems = parse_access(tomllib.loads(text))
    assert config is None
    assert problems
    assert secret not in " ".join(problems)


def test_a_secret_pasted_into_a_glob_is_not_echoed_in_a_denial(seeded: Path) -> None:
    text = POLICY + f'[[policies]]\nactors = ["ci-*"]\nservices = ["prod/*", "{CANARY}"]\n' \
                    'deny = ["read"]\n'
    with _open(seeded, "ci-runner", text) as s, pytest.raises(DeniedError) as info:
        s.get("prod/db", "admin")
    assert "may not read service 'prod/db'" in str(info.value)
    assert CANARY not in str(info.value)


@pytest.mark.xfail(strict=True, reason=(
    "a documented limitation (docs/credential-storage-security.md, Honest scope): the "
    "policies in force are those of the config the caller loads, and KEYRING_HARDENED_CONFIG "
    "lets a caller load its own; pinning the access settings in the authenticated state "
    "would close it, and is left for the agent, which loads the config itself"))
def test_another_config_file_cannot_lift_the_vaults_policy(
        seeded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_config(seeded, POLICY)
    mine = tmp_path / "mine.toml"
    mine.write_text("max_versions = 10\n")
    mine.chmod(0o600)
    with Store.open(seeded, actor="ci-runner") as s, pytest.raises(DeniedError):
        s.get("prod/db", "admin")  # the vault's own config denies it
    monkeypatch.setenv("KEYRING_HARDENED_CONFIG", str(mine))
    with Store.open(seeded, actor="ci-runner") as s, pytest.raises(HardenedError):
        s.get("prod/db", "admin")


def test_a_vault_wide_request_is_matched_only_by_globs_that_match_a_star(seeded: Path) -> None:
    # ACL-5 holds as written, and its edge: any glob matching the one character
    # "*" (such as "?*", "[!a-z]*", "[*]") also governs admin and the whole-vault list.
    for services, admin in (('"ci/*"', False), ('"prod/*", "ci/*"', False), ('"?*"', True),
                            ('"[!a-z]*"', True), ('"[*]"', True)):
        text = ('default_policy = "deny"\n[[policies]]\nactors = ["ops"]\n'
                f'services = [{services}]\nallow = ["*"]\n')
        with _open(seeded, "ops", text) as s:
            assert s.explain("ops", "admin", None).allowed is admin, services
            if not admin:
                with pytest.raises(DeniedError):
                    s.keys.rotate()


def test_unknown_keys_huge_and_reordered_rules(seeded: Path) -> None:
    # Unknown keys fail with the key named (a quoted key that looks like a secret is not).
    text = f'[[policies]]\nactors = ["*"]\nservices = ["*"]\nallow = ["read"]\n"{CANARY}" = 1\n'
    config, problems = parse_access(tomllib.loads(text))
    assert config is None
    assert problems == ["policies[0]: unknown key (expected actors, services, allow, deny)"]
    # A thousand rules with long globs: loads, decides, and deny still wins from the end.
    many = "".join(f'[[policies]]\nactors = ["x{i}-*"]\nservices = ["{"s" * 200}*"]\n'
                   'allow = ["*"]\n' for i in range(1000))
    deny = '[[policies]]\nactors = ["*"]\nservices = ["prod/*"]\ndeny = ["read"]\n'
    allow = '[[policies]]\nactors = ["*"]\nservices = ["*"]\nallow = ["*"]\n'
    for order in (deny + many + allow, allow + many + deny):
        with _open(seeded, "anyone", order) as s:
            with pytest.raises(DeniedError):
                s.get("prod/db", "admin")
            assert s.get("ci/app", "deploy").reveal() == "ci-token"


def test_a_process_without_the_limit_does_not_refill_the_others_buckets(seeded: Path) -> None:
    clock = Clock()
    with _open(seeded, "ci-runner", POLICY + LIMIT, clock) as s:
        s.get("ci/app", "deploy")
        s.get("ci/app", "deploy")  # the burst of 2 is spent
    with _open(seeded, "ci-runner", POLICY, clock) as s:  # a config with no limit
        s.get("ci/app", "deploy")
    with _open(seeded, "ci-runner", POLICY + LIMIT, clock) as s, \
            pytest.raises(RateLimitedError):
        s.get("ci/app", "deploy")
