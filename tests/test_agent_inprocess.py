"""The agent's server and client in one process: every operation, error and edge, fast.

The real-process tests (test_agent.py, test_agent_attacks.py) prove the
deployment; these drive the same code paths with the agent serving from a
thread, so each branch is exercised and measured quickly.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyring_hardened import agent as agent_mod
from keyring_hardened.agent import Agent, Peer, bind, identify, peer_of
from keyring_hardened.agentproto import (
    ENV_AGENT_SOCK,
    AgentStore,
    connect,
    raise_error,
    recv_frame,
    send_frame,
    socket_path,
)
from keyring_hardened.config import Config
from keyring_hardened.errors import (
    ConfigError,
    DeniedError,
    ExpiredError,
    IntegrityError,
    LockedError,
    NotFoundError,
    RateLimitedError,
    StorageError,
    UsageError,
)
from keyring_hardened.location import Location
from keyring_hardened.store import Store

from .conftest import CANARY


@pytest.fixture
def served(home: Path) -> Iterator[tuple[Agent, AgentStore, Path]]:
    """A key-file vault, its agent serving from a thread, and a client."""
    with Store.init(home) as s:
        s.set("api", "deploy", "api-token")
        s.set("db", "app", CANARY)
    config = {"value": Config()}

    def opener(passphrase: str | None) -> Store:
        return Store.open(home, config=config["value"])

    path = home / "agent.sock"
    agent = Agent(Location.resolve(home), path, opener, idle_timeout=600, max_lifetime=None)
    agent.unlock(None)
    ready = threading.Event()
    thread = threading.Thread(target=agent.serve, args=(ready.set,), daemon=True)
    thread.start()
    assert ready.wait(10)
    client = AgentStore(path, Location.resolve(home))
    try:
        yield agent, client, home
    finally:
        client.close()
        agent.stop()
        thread.join(10)


def test_every_credential_operation(served: tuple[Agent, AgentStore, Path]) -> None:
    agent, client, _ = served
    assert client.get("api", "deploy").reveal() == "api-token"
    assert client.set("api", "deploy", "v2") == 2
    assert client.history("api", "deploy")[0].version == 2
    assert client.rollback("api", "deploy") == 3
    assert client.get("api", "deploy").reveal() == "api-token"
    assert client.get("api", "deploy", version=2).reveal() == "v2"
    assert client.usernames("api") == ["deploy"]
    assert sorted(c.service for c in client.credentials()) == ["api", "db"]
    client.delete("api", "deploy")
    with pytest.raises(NotFoundError):
        client.get("api", "deploy")
    client.delete("db", "app", purge=True)
    assert client.credentials() == []
    assert agent.served >= 10
    status = client.request("status")
    assert status["state"] == "unlocked"
    assert status["pid"] == os.getpid()
    assert repr(client).startswith("AgentStore(")
    with client as same:
        assert same is client


def test_bad_requests_get_usage_errors(served: tuple[Agent, AgentStore, Path]) -> None:
    _, client, _ = served
    for op, args in (("get", {"service": 1, "username": "u"}),
                     ("get", {"service": "s", "username": ["u"]}),
                     ("set", {"service": "s", "username": "u", "secret": 5}),
                     ("frobnicate", {})):
        with pytest.raises(UsageError):
            client.request(op, **args)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(client.path))
    send_frame(sock, {"v": True, "op": "ping"})
    answer = recv_frame(sock)
    assert answer["ok"] is False
    assert answer["error"]["reason"] == "agent-protocol"
    sock.close()


def test_lock_unlock_and_the_idle_watchdog(served: tuple[Agent, AgentStore, Path]) -> None:
    agent, client, _ = served
    client.request("lock")
    with pytest.raises(LockedError, match="agent is locked"):
        client.get("api", "deploy")
    assert client.request("status")["idle_left"] is None
    client.request("unlock")
    assert client.get("api", "deploy").reveal() == "api-token"
    agent.idle_timeout = 0.1
    time.sleep(0.6)
    assert agent.store is None  # the watchdog locked it
    client.request("unlock")
    agent.idle_timeout = 600


def test_max_lifetime_and_stop(served: tuple[Agent, AgentStore, Path]) -> None:
    agent, _, _ = served
    agent.max_lifetime = 0.0
    for _ in range(50):
        if agent._stop.is_set():
            break
        time.sleep(0.1)
    assert agent._stop.is_set()


def test_stop_request(served: tuple[Agent, AgentStore, Path]) -> None:
    agent, client, _ = served
    assert client.request("stop") is None
    assert agent._stop.wait(5)


def test_errors_keep_their_kind(served: tuple[Agent, AgentStore, Path]) -> None:
    agent, client, home = served
    store = agent.store
    assert store is not None
    limited = Config.from_mapping(tomllib.loads(
        'default_policy = "deny"\n[[policies]]\nactors = ["*"]\nservices = ["api"]\n'
        'allow = ["read"]\n[[rate_limits]]\nactors = ["*"]\nservices = ["*"]\n'
        'operations = ["read"]\nlimit = 1\nper = "1h"\nburst = 1\n'))
    agent.store = Store.open(home, config=limited)
    try:
        with pytest.raises(DeniedError):
            client.get("db", "app")
        client.get("api", "deploy")
        with pytest.raises(RateLimitedError) as info:
            client.get("api", "deploy")
        assert info.value.retry_after > 0
    finally:
        agent.store.close()
        agent.store = store


def test_a_rekey_elsewhere_locks_a_passphrase_agent(served: tuple[Agent, AgentStore, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    agent, client, _ = served

    def replaced(*args: Any, **kwargs: Any) -> Any:
        raise LockedError("rekeyed", "root-replaced")

    monkeypatch.setattr(agent.store, "get", replaced)
    with pytest.raises(LockedError, match="unlock it again"):
        client.get("api", "deploy")
    assert agent.store is None
    client.request("unlock")


def test_an_internal_error_is_answered_not_raised(served: tuple[Agent, AgentStore, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    agent, client, _ = served

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError(CANARY)

    monkeypatch.setattr(agent.store, "usernames", broken)
    with pytest.raises(StorageError) as info:
        client.usernames("api")
    assert "internal error in the agent (ZeroDivisionError)" in str(info.value)
    assert CANARY not in str(info.value)
    assert client.get("api", "deploy").reveal() == "api-token"


def test_held_connections_are_capped(served: tuple[Agent, AgentStore, Path]) -> None:
    agent, client, _ = served
    agent._slots = threading.BoundedSemaphore(2)
    held = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(client.path))
        held.append(s)
    time.sleep(0.3)
    for s in held:
        s.close()
    time.sleep(0.3)
    assert client.get("api", "deploy").reveal() == "api-token"


def test_malformed_frames_close_only_their_connection(
        served: tuple[Agent, AgentStore, Path]) -> None:
    _, client, _ = served
    for junk in (struct.pack(">I", 3) + b"\xff\xfe\xfd", struct.pack(">I", 2) + b"{x",
                 struct.pack(">I", 50_000) + b"[" * 50_000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(client.path))
        s.sendall(junk)
        assert s.recv(10) == b""  # dropped, no answer
        s.close()
    assert client.get("api", "deploy").reveal() == "api-token"


def test_who_may_connect(served: tuple[Agent, AgentStore, Path],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    import grp
    import pwd

    agent, _, _ = served
    me = os.getuid()
    assert agent._allowed(Peer(1, me, 0))
    nobody = pwd.getpwnam("nobody")
    other = Peer(1, nobody.pw_uid, nobody.pw_gid, (4242,))
    monkeypatch.setattr(agent, "_config", lambda: None)
    assert not agent._allowed(other)
    monkeypatch.setattr(agent, "_config", lambda: Config(agent_allow_users=("nobody",)))
    assert agent._allowed(other)
    monkeypatch.setattr(agent, "_config", lambda: Config(agent_allow_users=(nobody.pw_uid,)))
    assert agent._allowed(other)
    monkeypatch.setattr(agent, "_config", lambda: Config(agent_allow_groups=(4242,)))
    assert agent._allowed(other)
    group = grp.getgrgid(nobody.pw_gid).gr_name
    monkeypatch.setattr(agent, "_config", lambda: Config(agent_allow_groups=(group,)))
    assert agent._allowed(other._replace(groups=()))
    monkeypatch.setattr(agent, "_config", lambda: Config(agent_allow_groups=("no-such-grp",)))
    assert not agent._allowed(other)
    assert not agent._allowed(Peer(1, 2**31 - 2, 2**31 - 2))  # no passwd entry
    config_path = agent.location.config_file
    config_path.write_text("agent_allow_users = 5\n")
    config_path.chmod(0o600)
    monkeypatch.undo()
    assert agent._config() is None  # a bad config allows nobody else


def test_identity_of_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        peer = peer_of(a)
    finally:
        a.close()
        b.close()
    assert peer.pid == os.getpid()
    assert peer.uid == os.getuid()
    assert ":" in identify(peer)
    assert identify(Peer(2**22 + 12345, 2**31 - 3, 0)).startswith("uid2147483645:")


def test_bind_refuses_what_it_must(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir(mode=0o700)
    path = folder / "agent.sock"
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="is not this user's agent socket"):
        bind(path)
    path.unlink()
    os.chmod(folder, 0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        bind(path)
    os.chmod(folder, 0o711)
    shared = bind(path, shared=True)
    try:
        assert path.stat().st_mode & 0o777 == 0o666
        with pytest.raises(UsageError, match="starting or already serves"):
            bind(path, shared=True)  # the lock is held by this process's first bind
    finally:
        shared.close()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "g"
    folder.mkdir(mode=0o700)
    path = folder / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    monkeypatch.setattr(agent_mod, "_HELD", {})
    listener = bind(path)
    try:
        live = folder / "live.sock"
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(live))
        other.listen(1)
        try:
            with pytest.raises(UsageError, match="already serves"):
                bind(live)
        finally:
            other.close()
    finally:
        listener.close()


def test_connect_finds_or_refuses(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.init(home) as s:
        s.set("x", "y", "z")
    location = Location.resolve(home)
    assert socket_path(location) == home / "agent.sock"
    assert connect(location) is None  # no socket: direct mode
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(home / "agent.sock"))
    dead.close()
    assert connect(location) is None  # dead socket, key-file mode: direct
    os.rename(home / "master.key", home / "away.key")
    with pytest.raises(LockedError, match="is not running; start it"):
        connect(location)
    monkeypatch.setenv(ENV_AGENT_SOCK, str(home / "elsewhere.sock"))
    assert socket_path(location) == home / "elsewhere.sock"
    with pytest.raises(LockedError, match="no agent socket at"):
        connect(location)


def test_answers_raise_the_errors_of_direct_mode() -> None:
    for kind, cls in (("not-found", NotFoundError), ("usage", UsageError),
                      ("config", ConfigError), ("integrity", IntegrityError),
                      ("denied", DeniedError), ("locked", LockedError),
                      ("expired", ExpiredError), ("storage", StorageError),
                      ("something-new", StorageError)):
        with pytest.raises(cls, match="words"):
            raise_error({"kind": kind, "message": "words", "reason": "r"})
    with pytest.raises(RateLimitedError) as info:
        raise_error({"kind": "rate-limited", "message": "m", "retry_after": 2.5})
    assert info.value.retry_after == 2.5
    with pytest.raises(RateLimitedError) as info:
        raise_error({"kind": "rate-limited", "message": "m", "retry_after": "soon"})
    assert info.value.retry_after == 1.0
    with pytest.raises(StorageError, match="malformed"):
        raise_error("nonsense")
    with pytest.raises(StorageError, match="refused"):
        raise_error({"kind": 5, "message": 5})


def test_the_client_checks_the_answer(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    answers = [{"v": 2, "ok": True}, {"v": 1, "ok": True, "result": 5}]

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            with conn:
                recv_frame(conn)
                send_frame(conn, answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = AgentStore(path, Location.resolve(tmp_path), declared="me")
    try:
        with pytest.raises(StorageError, match="unknown protocol version"):
            client.request("ping")
        client.close()
        with pytest.raises(StorageError, match="without a value"):
            client.get("s", "u")
    finally:
        client.close()
        listener.close()
        thread.join(5)
    with socket.socket(socket.AF_UNIX) as unused, pytest.raises(UsageError, match="too large"):
        send_frame(unused, {"x": "a" * (9 << 20)})
