"""Replaying rows of an older vault: the current value or exit 3, never an older secret.

The attacker can write ``vault.db`` (issue 8). They save its rows, let the
owner work, then write some of the saved rows back with plain ``sqlite3``.
The vault must either equal a whole state it was once in, or say it was
tampered with: every ``get`` answers what it answered before the write-back
or exits 3, and ``audit verify`` exits 3.

The suite is generic: it reads every table through ``sqlite3`` (whatever
columns the schema has), and for each scenario writes back every changed
table and every subset of the changed authenticated tables. Tables that are
not part of the authenticated state (``audit_pending``, ``schema_migrations``,
``throttle*``, ``rate*``) may be written back freely. A subset that includes
an unchanged table is the same attack as the subset without it, so only
changed tables are combined.

Commands go through the CLI's ``main`` in real processes; one process runs a
batch of commands, each on its own copy of the vault, which keeps hundreds
of cases to a few seconds.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from .conftest import CANARY, run_cli

# -- reading and writing back whole tables ------------------------------------


class Table(NamedTuple):
    """A table's columns and rows, rows in a canonical order."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


Snapshot = dict[str, Table]

#: Kept current in the generic suite ("keep the current trail").
TRAIL = frozenset({"audit_events", "audit_anchor"})


def is_free(table: str) -> bool:
    """Whether a table is outside the authenticated state (may be written back)."""
    return table in ("audit_pending", "schema_migrations") or table.startswith(("throttle",
                                                                                "rate"))


def snapshot(db: Path) -> Snapshot:
    """Every table of a vault, read with plain sqlite3 (the WAL folded in first)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        found = {}
        for name in names:
            columns = tuple(r[1] for r in conn.execute(f'PRAGMA table_info("{name}")'))
            listed = ", ".join(f'"{c}"' for c in columns)
            rows = conn.execute(f'SELECT {listed} FROM "{name}"').fetchall()
            found[name] = Table(columns, sorted(rows, key=repr))
        return found
    finally:
        conn.close()


def write_back(db: Path, saved: Snapshot, tables: Iterable[str]) -> None:
    """Replace the rows of ``tables`` with the saved ones, as an attacker would."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for name in tables:
            table = saved[name]
            listed = ", ".join(f'"{c}"' for c in table.columns)
            marks = ", ".join("?" for _ in table.columns)
            conn.execute(f'DELETE FROM "{name}"')
            conn.executemany(f'INSERT INTO "{name}" ({listed}) VALUES ({marks})', table.rows)
        conn.execute("COMMIT")
    finally:
        conn.close()


def changed_tables(before: Snapshot, after: Snapshot) -> list[str]:
    """Tables whose rows differ (a table only in ``after`` counts as emptied before)."""
    return sorted(name for name in after
                  if name in before and before[name].rows != after[name].rows)


def copy_vault(home: Path, to: Path) -> Path:
    """A copy of a vault home (database and key file), modes kept."""
    to.mkdir(mode=0o700, parents=True)
    for name in ("vault.db", "master.key"):
        if (home / name).exists():
            shutil.copy2(home / name, to / name)
    return to


# -- running many CLI commands in one process -----------------------------------


class Result(NamedTuple):
    """What one CLI command did."""

    code: int
    out: str
    err: str


Command = tuple[tuple[str, ...], str]  # argv after --home, and stdin

_DRIVER = """
import contextlib, io, json, sys
from keyring_hardened.cli import main
results = []
for argv, stdin in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, out.getvalue(), err.getvalue()])
json.dump(results, sys.__stdout__)
"""


def clean_env(base: Path) -> dict[str, str]:
    """The environment of ``_isolate``, for module-scoped fixtures that run before it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEYRING_HARDENED_", "KEYRING_PROPERTY_", "PYTHON_KEYRING"))}
    env.update(XDG_DATA_HOME=str(base / "xdg-data"), XDG_CONFIG_HOME=str(base / "xdg-config"),
               HOME=str(base / "home"))
    return env


def _drive(calls: list[tuple[Path, Command]], env: dict[str, str]) -> list[Result]:
    payload = json.dumps([[["--home", str(home), *argv], stdin] for home, (argv, stdin)
                          in calls])
    done = subprocess.run([sys.executable, "-c", _DRIVER], input=payload, capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return [Result(*r) for r in json.loads(done.stdout)]


def cli_batch(calls: Sequence[tuple[Path, Command]], env: dict[str, str]) -> list[Result]:
    """Run ``keyring-hardened --home HOME ARGV`` for each call, in order for each home.

    Homes are shared out among a process per CPU (at most 4), run at once.
    """
    homes = list(dict.fromkeys(home for home, _ in calls))
    workers = max(1, min(4, os.cpu_count() or 1, len(homes)))
    share = {home: n % workers for n, home in enumerate(homes)}
    parts: list[list[int]] = [[] for _ in range(workers)]
    for index, (home, _) in enumerate(calls):
        parts[share[home]].append(index)
    with ThreadPoolExecutor(workers) as pool:
        done = pool.map(lambda part: _drive([calls[i] for i in part], env), parts)
        results = {i: r for part, found in zip(parts, done, strict=True)
                   for i, r in zip(part, found, strict=True)}
    return [results[i] for i in range(len(calls))]


def cli_steps(home: Path, steps: Sequence[Command], env: dict[str, str]) -> None:
    """Run setup commands on one vault; each must succeed."""
    for (argv, _), result in zip(steps, cli_batch([(home, s) for s in steps], env),
                                 strict=True):
        assert result.code == 0, (argv, result.err)


# -- scenarios ------------------------------------------------------------------


def put(user: str, value: str, *options: str) -> Command:
    """``set svc USER [options]`` with the value on stdin."""
    return ("set", "svc", user, *options), value + "\n"


def cmd(*argv: str) -> Command:
    """A command without stdin."""
    return argv, ""


USERS = ("alice", "bob", "carol")
BASE = (cmd("init"), put("alice", "alice-1"), put("alice", "alice-2"), put("bob", "bob-1"),
        put("carol", "carol-1", "--ttl", "30d"))
CHECKS = (*(cmd("get", "svc", u) for u in USERS), cmd("list", "--json"),
          cmd("audit", "verify"))


class Scenario(NamedTuple):
    """Commands after the base vault, before (prepare) and after (work) the snapshot."""

    prepare: tuple[Command, ...]
    work: tuple[Command, ...]
    #: What each ``get`` answers afterwards: the value, or the exit code.
    expect: dict[str, str | int]
    #: Seconds to wait after the work (a TTL of 1s runs out).
    wait: float = 0.0


UNCHANGED = {"alice": "alice-2", "bob": "bob-1", "carol": "carol-1"}
SCENARIOS = {
    "update": Scenario((), (put("alice", CANARY), put("bob", "bob-2")),
                       {**UNCHANGED, "alice": CANARY, "bob": "bob-2"}),
    "delete": Scenario((), (cmd("delete", "svc", "alice"),), {**UNCHANGED, "alice": 1}),
    "purge": Scenario((), (cmd("delete", "--purge", "svc", "bob"),), {**UNCHANGED, "bob": 1}),
    "rollback": Scenario((), (cmd("rollback", "svc", "alice"),),
                         {**UNCHANGED, "alice": "alice-1"}),
    "key rotate": Scenario((), (cmd("key", "rotate"), put("alice", CANARY)),
                           {**UNCHANGED, "alice": CANARY}),
    "key rewrap": Scenario((cmd("key", "rotate"), put("bob", "bob-2")), (cmd("key", "rewrap"),),
                           {**UNCHANGED, "bob": "bob-2"}),
    "key retire": Scenario((cmd("key", "rotate"), cmd("key", "rewrap")),
                           (cmd("key", "retire", "--below", "2"), put("alice", CANARY)),
                           {**UNCHANGED, "alice": CANARY}),
    "key rekey": Scenario((), (cmd("key", "rekey"), put("alice", CANARY)),
                          {**UNCHANGED, "alice": CANARY}),
    "ttl changed by set": Scenario((), (put("carol", "carol-2", "--ttl", "1s"),
                                        put("bob", "bob-2", "--ttl", "30d")),
                                   {**UNCHANGED, "bob": "bob-2", "carol": 7}, wait=1.1),
}


class Worked(NamedTuple):
    """A scenario done once: the vault after the work and its rows before and after."""

    name: str
    home: Path
    before: Snapshot
    after: Snapshot
    scratch: Path
    env: dict[str, str]


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def worked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Worked:
    name: str = request.param
    scenario = SCENARIOS[name]
    base = tmp_path_factory.mktemp("replay")
    env = clean_env(base)
    home = base / "vault"
    cli_steps(home, BASE + scenario.prepare, env)
    before = snapshot(home / "vault.db")
    cli_steps(home, scenario.work, env)
    time.sleep(scenario.wait)
    return Worked(name, home, before, snapshot(home / "vault.db"), base / "cases", env)


def tampered_copies(worked: Worked, cases: dict[str, list[str]]) -> dict[str, Path]:
    """A copy of the current vault for each case, the case's tables written back."""
    worked.scratch.mkdir(exist_ok=True)
    batch = Path(tempfile.mkdtemp(dir=worked.scratch))
    homes = {}
    for n, (label, tables) in enumerate(cases.items()):
        homes[label] = copy_vault(worked.home, batch / str(n))
        write_back(homes[label] / "vault.db", worked.before, tables)
    return homes


def _answer(result: Result) -> str | int:
    """A get's value or exit code; a listing as its names and versions."""
    if result.code != 0:
        return result.code
    if result.out.startswith("["):
        return ", ".join(f"{c['username']} v{c['version']}" for c in json.loads(result.out))
    return result.out.removesuffix("\n")


def _run_checks(worked: Worked, cases: dict[str, list[str]]
                ) -> tuple[list[Result], dict[str, list[Result]]]:
    """Write each case's tables back into a copy of the current vault; run CHECKS on each.

    Returns the answers of the untouched vault and of each case.
    """
    homes = tampered_copies(worked, {"untouched": [], **cases})
    calls = [(home, check) for home in homes.values() for check in CHECKS]
    results = iter(cli_batch(calls, worked.env))
    answers = {label: [next(results) for _ in CHECKS] for label in homes}
    return answers.pop("untouched"), answers


def _problems(label: str, got: list[Result], current: list[Result], allowed: set[int]
              ) -> list[str]:
    """What is wrong with one tampered vault's answers."""
    found = []
    for check, result, now in zip(CHECKS, got, current, strict=True):
        what = f"{label}: {' '.join(check[0])} -> exit {result.code}"
        if result.code == 70 or "Traceback" in result.err:
            found.append(f"{what} (internal error) {result.err.strip()}")
        elif check[0][0] == "audit":
            if result.code not in allowed:
                found.append(f"{what}: the replay was not detected")
        elif result.code not in allowed and (result.code, result.out) != (now.code, now.out):
            found.append(f"{what} {_answer(result)!r}, not the current answer "
                         f"{_answer(now)!r}")
        elif result.code in allowed and result.out:
            found.append(f"{what} printed {result.out.strip()!r}")
    return found


def test_untouched_vault_gives_the_scenarios_answers(worked: Worked) -> None:
    current, _ = _run_checks(worked, {})
    assert [_answer(r) for r in current[:len(USERS)]] == [
        SCENARIOS[worked.name].expect[u] for u in USERS], [r.err for r in current]
    assert current[-1].code == 0, current[-1].err


def test_written_back_tables_give_the_current_value_or_exit_3(worked: Worked) -> None:
    """Every changed table alone, and every subset of the changed authenticated tables."""
    changed = changed_tables(worked.before, worked.after)
    authenticated = [t for t in changed if not is_free(t) and t not in TRAIL]
    cases = {f"{t} written back": [t] for t in changed if t not in authenticated}
    for size in range(1, len(authenticated) + 1):
        for subset in itertools.combinations(authenticated, size):
            cases["+".join(subset) + " written back"] = list(subset)
    assert authenticated, "the scenario changed no authenticated table"
    current, answers = _run_checks(worked, cases)
    # A written-back key record reads like a wrong key: exit 6 is as good as 3 there.
    detected = {3, 6} if worked.name == "key rekey" else {3}
    problems = []
    for label, got in answers.items():
        if is_free(cases[label][0]):
            if [(r.code, r.out) for r in got] != [(r.code, r.out) for r in current]:
                problems.append(f"{label}: answers changed: "
                                f"{[_answer(r) for r in got]} != {[_answer(r) for r in current]}")
            continue
        problems += _problems(label, got, current, detected)
    assert not problems, "\n".join(problems)


def test_written_back_tables_with_the_old_trail_fail_audit_verify(worked: Worked) -> None:
    """The trail written back with some, not all, of the changed tables: a state never seen."""
    changed = changed_tables(worked.before, worked.after)
    trail = [t for t in changed if t in TRAIL]
    authenticated = [t for t in changed if not is_free(t) and t not in TRAIL]
    # Each table alone, and all but one: the nearest miss of a whole earlier vault.
    cases = {}
    for size in {1, len(authenticated) - 1} - {0, len(authenticated)}:
        for subset in itertools.combinations(authenticated, size):
            cases["+".join(subset) + " and the trail written back"] = [*subset, *trail]
    if not cases:
        pytest.skip("only one authenticated table changed")
    homes = tampered_copies(worked, cases)
    verified = cli_batch([(home, cmd("audit", "verify")) for home in homes.values()],
                         worked.env)
    detected = {3, 6} if worked.name == "key rekey" else {3}
    problems = [f"{label}: audit verify -> exit {r.code} {r.out.strip()}"
                for label, r in zip(homes, verified, strict=True) if r.code not in detected]
    assert not problems, "\n".join(problems)


# -- single edited rows: TTLs, KDF parameters, the newest user -----------------------


@pytest.fixture(scope="module")
def expired(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A credential with two versions, both expired (TTL 1s)."""
    base = tmp_path_factory.mktemp("ttl")
    env = clean_env(base)
    cli_steps(base / "vault", (cmd("init"), put("t", "ttl-1", "--ttl", "1s"),
                               put("t", "ttl-2", "--ttl", "1s")), env)
    time.sleep(1.1)
    return base / "vault", env


def _fresh(home: Path) -> Path:
    return copy_vault(home, Path(tempfile.mkdtemp(dir=home.parent)) / "v")


def test_expired_versions_stay_expired_and_rollback_needs_allow_expired(
        expired: tuple[Path, dict[str, str]]) -> None:
    home, env = expired
    copy = _fresh(home)
    got = cli_batch([(copy, cmd("get", "svc", "t")),
                     (copy, cmd("get", "svc", "t", "--version", "2")),
                     (copy, cmd("get", "svc", "t", "--version", "1")),
                     (copy, cmd("rollback", "svc", "t", "--version", "1")),
                     (copy, cmd("rollback", "svc", "t", "--version", "1", "--allow-expired")),
                     (copy, cmd("history", "svc", "t", "--json"))], env)
    assert [(r.code, r.out) for r in got[:4]] == [(7, "")] * 4, got
    assert got[4].code == 0, got[4]
    # Revived with its TTL counted anew, not forever.
    assert [v["expires_at"] is not None for v in json.loads(got[5].out)] == [True] * 3


@pytest.mark.parametrize("edit", [
    "expires_at = NULL", "expires_at = expires_at + 3153600000", "ttl = NULL", "ttl = 3153600000",
])
def test_edited_version_ttl_or_expiry_is_integrity_failure(
        expired: tuple[Path, dict[str, str]], edit: str) -> None:
    home, env = expired
    copy = _fresh(home)
    conn = sqlite3.connect(copy / "vault.db", isolation_level=None)
    try:
        conn.execute(f"UPDATE secret_versions SET {edit}")
    finally:
        conn.close()
    commands = (cmd("get", "svc", "t"), cmd("get", "svc", "t", "--version", "2"),
                cmd("get", "svc", "t", "--version", "1"),
                cmd("rollback", "svc", "t", "--version", "1", "--allow-expired"),
                cmd("audit", "verify"))
    got = cli_batch([(copy, c) for c in commands], env)
    assert [(r.code, r.out) for r in got] == [(3, "")] * len(commands), got


PASSPHRASE_ENV = {"KEYRING_HARDENED_PASSPHRASE": "correct horse battery staple"}


@pytest.fixture(scope="module")
def passphrase_vault(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                     ) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("kdf")
    env = {**clean_env(base), **PASSPHRASE_ENV}
    home = base / "vault"
    home.mkdir(mode=0o700)
    config = home / "config.toml"
    config.write_text("[kdf]\nargon2_memory_kib = 19456\nargon2_iterations = 2\n"
                      "argon2_lanes = 1\n")
    config.chmod(0o600)
    cli_steps(home, (cmd("init", "--passphrase", "--kdf", request.param), put("alice", CANARY)),
              env)
    return home, env


def _limit_memory() -> None:
    """Keep an 8 GiB Argon2 allocation from thrashing the machine: it fails instead."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.parametrize(("passphrase_vault", "field", "value"), [
    ("argon2id", "iterations", 2_000_000_000), ("argon2id", "memory_kib", 8_388_608),
    ("argon2id", "lanes", 0), ("argon2id", "salt", "00" * 8), ("argon2id", "salt", "00" * 64),
    ("pbkdf2", "iterations", 2_000_000_000), ("pbkdf2", "salt", "00" * 8),
], ids=["argon2id iterations 2e9", "argon2id memory 8 GiB", "argon2id lanes 0",
        "argon2id salt 8 bytes", "argon2id salt 64 bytes", "pbkdf2 iterations 2e9",
        "pbkdf2 salt 8 bytes"], indirect=["passphrase_vault"])
def test_out_of_range_kdf_parameters_are_integrity_failures_not_wrong_passphrase(
        passphrase_vault: tuple[Path, dict[str, str]], field: str, value: int | str) -> None:
    home, env = passphrase_vault
    vault = snapshot(home / "vault.db")["vault"]
    kdf = json.loads(vault.rows[0][vault.columns.index("kdf")])
    copy = _fresh(home)
    shutil.copy2(home / "config.toml", copy / "config.toml")
    conn = sqlite3.connect(copy / "vault.db", isolation_level=None)
    try:
        conn.execute("UPDATE vault SET kdf = ?", (json.dumps({**kdf, field: value}),))
    finally:
        conn.close()
    try:
        done = subprocess.run([sys.executable, "-m", "keyring_hardened", "--home", str(copy),
                               "get", "svc", "alice"], capture_output=True, text=True, env=env,
                              timeout=20, check=False, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{kdf['algorithm']} {field} = {value}: unlock hangs")
    assert (done.returncode, done.stdout) == (3, ""), done.stderr
    assert "wrong passphrase" not in done.stderr.lower()


_NEWEST = """
from keyring_hardened.backend import HardenedKeyring
try:
    found = HardenedKeyring().get_credential("svc", None)
    print(found.username, found.password)
except Exception as exc:
    print(type(exc).__name__)
"""


@pytest.mark.parametrize("attack", [
    "UPDATE credentials SET updated_at = updated_at + 86400 WHERE username = 'older'",
    "DELETE FROM credentials WHERE username = 'newest'",
], ids=["older user's updated_at bumped", "newest user's head deleted"])
def test_get_credential_without_username_never_hands_out_another_account(
        home: Path, attack: str) -> None:
    for user in ("older", "newest"):
        assert run_cli("set", "svc", user, home=home, stdin=f"{user}-secret\n").returncode == 0

    def newest() -> str:
        done = subprocess.run([sys.executable, "-c", _NEWEST], capture_output=True, text=True,
                              env={**os.environ, "KEYRING_HARDENED_HOME": str(home)},
                              timeout=60, check=False)
        return done.stdout.strip() + done.stderr.strip()

    assert newest() == "newest newest-secret"
    conn = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        conn.execute(attack)
    finally:
        conn.close()
    assert newest() == "IntegrityFailure"
    assert run_cli("list", home=home).returncode == 3
