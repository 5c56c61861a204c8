"""Background refresh in the unlock agent, and one store shared by threads acting for others.

The agent holds one unlocked store for every caller and refreshes due
credentials in a thread of its own. These tests prove that the thread runs
while the agent is unlocked and stops when it locks, that its events name
the agent and never a caller (nor a caller's event the agent), that each
caller hears only its own notices, and that a failing refresher's warning
reaches the caller through the agent. The in-process tests serve from a
thread (fast); the last one drives real `agent start` and CLI processes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyring_hardened import refresh
from keyring_hardened.agent import Agent
from keyring_hardened.agentproto import AgentStore
from keyring_hardened.config import Config
from keyring_hardened.location import Location
from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF, PASSPHRASE, run_cli
from .test_refresh import runs


def _counter(tmp_path: Path, *, fail: bool = False) -> str:
    """A refresh command that counts its runs in a file and prints ``fresh-<run>``."""
    script = tmp_path / "refresher.py"
    script.write_text(
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "n = len(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text('x' * n)\n"
        + ("sys.stderr.write('issuer said no\\n'); sys.exit(3)\n" if fail
           else "print('fresh-' + str(n))\n"))
    return f"{sys.executable} {script}"


def _until(check: object, what: str, timeout: float = 60.0) -> None:
    """Wait, bounded, until ``check()`` is true: the event is tested, not the time."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _events(home: Path, op: str) -> list[tuple[str, str]]:
    with sqlite3.connect(home / "vault.db") as conn:
        return [(a, o) for a, o in conn.execute(
            "SELECT actor, outcome FROM audit_events WHERE op = ? ORDER BY seq", (op,))]


@pytest.fixture
def served(home: Path) -> Iterator[tuple[Agent, Path]]:
    """A key-file vault and its agent serving from a thread, refreshing every second."""
    Store.init(home).close()
    path = home / "agent.sock"

    def opener(passphrase: str | None) -> Store:
        return Store.open(home, config=Config(refresh_interval=1.0), actor="owner:agent")

    agent = Agent(Location.resolve(home), path, opener, idle_timeout=600, max_lifetime=None)
    ready = threading.Event()
    thread = threading.Thread(target=agent.serve, args=(ready.set,), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield agent, home
    finally:
        agent.stop()
        thread.join(30)


def test_acting_is_per_thread(home: Path) -> None:
    with Store.init(home, actor="base:owner") as store:
        inside = threading.Event()
        leave = threading.Event()
        seen: list[tuple[str, str | None, str]] = []

        def caller() -> None:
            with store.acting("alice:app", "alice:judged") as notices:
                seen.append((store.actor, store.policy_actor, store.subject))
                store.notice("for alice only")
                inside.set()
                assert leave.wait(10)
                store.set("svc", "alice", "a")
            seen.append((store.actor, store.policy_actor, str(len(notices))))

        thread = threading.Thread(target=caller)
        thread.start()
        assert inside.wait(10)
        # Another thread, while alice's block is open, acts as the store's own actor.
        assert (store.actor, store.policy_actor, store.subject) == ("base:owner", None,
                                                                    "base:owner")
        store.set("svc", "base", "b")
        leave.set()
        thread.join(10)
        assert seen == [("alice:app", "alice:judged", "alice:judged"),
                        ("base:owner", None, "1")]
        assert store.notices == []  # alice's notice went to her block's list only
        store.notice("the owner's")
        assert store.notices == ["the owner's"]
    with sqlite3.connect(home / "vault.db") as conn:
        rows = dict(conn.execute("SELECT username, actor FROM audit_events WHERE op = 'write'"))
    assert rows == {"alice": "alice:app", "base": "base:owner"}


def test_the_agent_refreshes_in_the_background_and_stops_when_locked(
        served: tuple[Agent, Path], tmp_path: Path) -> None:
    agent, home = served
    with Store.open(home) as s:
        # Due at once (inside its refresh-ahead window) and still valid.
        s.set("cloud", "token", "old", ttl=600, refresher=refresh.command_spec(_counter(tmp_path)),
              refresh_ahead=599)
    assert refresh.background_of(agent.store) is None  # locked: no thread
    agent.unlock(None)
    handle = refresh.background_of(agent.store)
    assert handle is not None
    assert handle.alive
    # No caller reads it: the agent's thread renews it on its own.
    _until(lambda: runs(tmp_path) >= 1, "the background refresh")
    with Store.open(home) as s:
        # Each new version is due a second later again (600 s, 599 s ahead).
        _until(lambda: s.history("cloud", "token")[0].version >= 2, "version 2")
        assert s.get("cloud", "token", version=2).reveal() == "fresh-1"
    events = _events(home, "refresh")
    assert events
    assert all(actor == "owner:agent" for actor, _ in events)
    agent.lock()
    assert getattr(agent, "store") is None  # noqa: B009 - keep mypy from narrowing it for good
    # Told to stop, not waited for (the keys are wiped at once): it ends soon after.
    _until(lambda: not handle.alive, "the thread to end")
    agent.unlock(None)
    again = agent.store  # a new store, and a new thread for it
    assert refresh.background_of(again) is not None
    assert refresh.background_of(again) is not handle
    agent.lock()


def test_callers_and_the_background_thread_never_trade_labels(
        served: tuple[Agent, Path], tmp_path: Path) -> None:
    agent, home = served
    with Store.open(home) as s:
        for i in range(3):
            s.set("cloud", f"t{i}", "old", ttl=600,
                  refresher=refresh.command_spec(_counter(tmp_path)), refresh_ahead=599)
        s.set("api", "deploy", "api-token")
    agent.unlock(None)
    errors: list[BaseException] = []

    def reader(n: int) -> None:
        try:
            with AgentStore(agent.path, Location.resolve(home), declared=f"ci-{n}") as c:
                for _ in range(15):
                    assert c.get("api", "deploy").reveal() == "api-token"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Three refreshes written whole: a started and an outcome event each.
    _until(lambda: len(_events(home, "refresh")) >= 6, "three background refreshes")
    agent.lock()
    assert errors == []
    reads = _events(home, "read")
    assert len(reads) == 60
    assert all("(declared ci-" in actor for actor, _ in reads)
    refreshes = _events(home, "refresh")
    assert len(refreshes) >= 6
    assert {a for a, _ in refreshes} == {"owner:agent"}


def test_a_failing_refresher_warns_the_caller_through_the_agent(
        served: tuple[Agent, Path], tmp_path: Path) -> None:
    agent, home = served
    with Store.open(home) as s:
        s.set("cloud", "token", CANARY, ttl=600,
              refresher=refresh.command_spec(_counter(tmp_path, fail=True)), refresh_ahead=599)
    agent.unlock(None)
    _until(lambda: runs(tmp_path) >= 1, "the failing refresh")
    with Store.open(home) as s:
        _until(lambda: refresh.counts(s)["failing"] == 1, "the failure recorded")
    with AgentStore(agent.path, Location.resolve(home)) as client:
        assert client.get("cloud", "token").reveal() == CANARY  # still valid: the value
        assert len(client.notices) == 1
        assert "is failing (exit 3: issuer said no)" in client.notices[0]
        assert CANARY not in client.notices[0]
        # Another caller's request hears nothing of it.
        with AgentStore(agent.path, Location.resolve(home)) as other:
            other.set("api", "deploy", "x")
            assert other.notices == []
    assert agent.store.notices == []  # nothing piles up in the agent
    agent.lock()


def test_the_inline_reader_is_warned_while_its_refresher_backs_off(home: Path,
                                                                     tmp_path: Path) -> None:
    now = [1_000_000.0]
    with Store.init(home, clock=lambda: now[0]) as s:
        s.set("cloud", "token", "old", ttl=600,
              refresher=refresh.command_spec(_counter(tmp_path, fail=True)), refresh_ahead=60)
        now[0] += 550  # inside the window, still valid
        assert s.get("cloud", "token").reveal() == "old"  # runs it: fails
        assert runs(tmp_path) == 1
        assert "failed (exit 3" in s.notices[-1]
        s.notices.clear()
        assert s.get("cloud", "token").reveal() == "old"  # backing off: not run, but said
        assert runs(tmp_path) == 1
        assert len(s.notices) == 1
        assert "is failing: the last refresh failed" in s.notices[0]


@pytest.mark.slow
def test_a_real_agent_refreshes_without_reads_and_its_cli_callers_see_the_warning(
        home: Path, tmp_path: Path) -> None:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("cloud", "token", "old", ttl=600,
              refresher=refresh.command_spec(_counter(tmp_path)), refresh_ahead=599)
        bad = tmp_path / "bad"
        bad.mkdir()
        s.set("cloud", "broken", CANARY, ttl=600,
              refresher=refresh.command_spec(_counter(bad, fail=True)), refresh_ahead=599)
    (home / "config.toml").write_text('[refresh]\ninterval = "1s"\n')
    env = {k: v for k, v in os.environ.items() if k != "KEYRING_HARDENED_PASSPHRASE"}
    started = run_cli("agent", "start", home=home,
                      env={**env, "KEYRING_HARDENED_PASSPHRASE": PASSPHRASE})
    assert started.returncode == 0, started.stderr
    try:
        _until(lambda: runs(tmp_path) >= 1 and runs(bad) >= 1, "both background refreshes")
        status = run_cli("agent", "status", "--json", home=home, env={})
        assert json.loads(status.stdout)["state"] == "unlocked"
        got = run_cli("get", "cloud", "token", home=home, env={})
        # Renewed again each second (600 s, 599 s ahead): some run's value.
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith("fresh-")
        broken = run_cli("get", "cloud", "broken", home=home, env={})
        assert broken.returncode == 0
        assert broken.stdout == f"{CANARY}\n"
        assert "is failing (exit 3: issuer said no)" in broken.stderr
        assert CANARY not in broken.stderr
        # The refresh events name the agent's process; the reads, the CLI's.
        refreshes = {a for a, _ in _events(home, "refresh")}
        assert refreshes
        assert all(a.startswith("root:") for a in refreshes)
        assert {a for a, _ in _events(home, "read")} == {"root:keyring_hardened"}
    finally:
        run_cli("agent", "stop", home=home, env={})


def test_a_request_the_agent_locks_under_is_told_it_is_locked(
        served: tuple[Agent, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import keyring_hardened.agent as agent_mod
    from keyring_hardened.errors import LockedError, UsageError

    agent, home = served
    agent.unlock(None)
    real = agent_mod._call

    def locked_midway(store: Store, op: str, request: dict[str, object]) -> object:
        agent.lock()  # the idle timeout, or `agent lock`, while this request runs
        return real(store, op, request)

    with AgentStore(agent.path, Location.resolve(home)) as client:
        with pytest.raises(UsageError, match="service must not be empty"):
            client.get("", "u")  # bad input stays bad input
        monkeypatch.setattr(agent_mod, "_call", locked_midway)
        with pytest.raises(LockedError, match="locked during the request") as caught:
            client.get("api", "deploy")
        assert caught.value.reason == "agent-locked"
