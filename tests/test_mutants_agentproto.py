"""Tests that kill mutants of agentproto.py which the rest of the suite let live.

The client's refusals (who may answer on the socket, the framing, one
retry) are proven by the real-process tests of test_agent.py and
test_agent_attacks.py: another user's agent, a planted socket. mutmut does
not count a child process as reaching a function, so these drive the same
refusals in-process: a listening socket in a folder of the test's own,
served by a thread that answers as scripted; "another user" is this
process with ``os.getuid`` made to answer otherwise, or a socket whose
``SO_PEERCRED`` answer names another uid.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyring_hardened import agentproto
from keyring_hardened.agentproto import (
    ENV_AGENT_SOCK,
    MAX_FRAME,
    AgentStore,
    connect,
    raise_error,
    recv_frame,
    send_frame,
    socket_path,
)
from keyring_hardened.errors import (
    ConfigError,
    DeniedError,
    LockedError,
    NotFoundError,
    RateLimitedError,
    StorageError,
    UsageError,
)
from keyring_hardened.location import ENV_ACTOR, Location
from keyring_hardened.secret import Secret
from keyring_hardened.store import CredentialInfo, Store, VersionInfo

Handler = Callable[["FakeAgent", socket.socket, int], None]


class FakeAgent:
    """A listening socket in a folder of its own; each connection is served by ``handler``."""

    def __init__(self, folder: Path, handler: Handler) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = folder / "agent.sock"
        self.handler = handler
        self.received: list[Any] = []
        self.connections = 0
        self.stop = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        workers: list[threading.Thread] = []
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            worker = threading.Thread(target=self._one, args=(conn, self.connections),
                                      daemon=True)
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join(10)

    def _one(self, conn: socket.socket, n: int) -> None:
        with conn, contextlib.suppress(OSError, ValueError):
            conn.settimeout(10)
            self.handler(self, conn, n)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)
        self.listener.close()


def answering(*answers: Any) -> Handler:
    """Answer each request with the next of ``answers`` (the last one repeats)."""
    queue = list(answers)

    def handler(agent: FakeAgent, conn: socket.socket, n: int) -> None:
        while True:
            doc = recv_frame(conn)
            if doc is None:
                return
            agent.received.append(doc)
            answer = queue.pop(0) if len(queue) > 1 else queue[0]
            if isinstance(answer, bytes):
                conn.sendall(answer)
            else:
                send_frame(conn, answer)

    return handler


def ok(result: Any = None, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "ok": True, "result": result, **extra}


@contextlib.contextmanager
def fake_agent(folder: Path, handler: Handler) -> Iterator[FakeAgent]:
    agent = FakeAgent(folder, handler)
    try:
        yield agent
    finally:
        agent.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


# -- the framing -------------------------------------------------------------------------


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(10)
    b.settimeout(10)
    return a, b


def _read_in_thread(sock: socket.socket, frames: int = 1,
                    **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []

    def read() -> None:
        try:
            for _ in range(frames):
                got.append(recv_frame(sock, **kwargs))
        except (OSError, ValueError) as exc:
            got.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, got


def test_a_frame_is_a_big_endian_length_then_ascii_json() -> None:
    a, b = _pair()
    with a, b:
        # Non-ASCII and a lone surrogate travel as escapes, not lost in transit.
        send_frame(a, {"service": "caf\u00e9", "username": "\ud800"})
        head = b.recv(4)
        (n,) = struct.unpack(">I", head)
        body = b.recv(n)
        assert len(body) == n
        assert body.isascii()
        assert json.loads(body) == {"service": "caf\u00e9", "username": "\ud800"}
        send_frame(a, {"service": "caf\u00e9", "username": "\ud800"})
        assert recv_frame(b) == {"service": "caf\u00e9", "username": "\ud800"}


def test_a_frame_of_exactly_max_frame_bytes_goes_one_more_is_refused() -> None:
    # {"s":"xxx"} is the string plus 8 bytes, as compact JSON.
    fits = {"s": "x" * (MAX_FRAME - 8)}
    a, b = _pair()
    with a, b:
        thread, got = _read_in_thread(b)
        send_frame(a, fits)
        thread.join(30)
        assert got == [fits]
        with pytest.raises(UsageError) as info:
            send_frame(a, {"s": "x" * (MAX_FRAME - 7)})
        assert str(info.value) == "the request is too large for the agent"
        # Nothing of the refused frame was sent.
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)


def test_a_length_of_max_frame_is_read_one_more_is_refused_unread() -> None:
    a, b = _pair()
    with a, b:
        body = json.dumps("x" * (MAX_FRAME - 2)).encode()
        assert len(body) == MAX_FRAME
        thread, got = _read_in_thread(b)
        a.sendall(struct.pack(">I", MAX_FRAME) + body)
        thread.join(30)
        assert got == ["x" * (MAX_FRAME - 2)]
        a.sendall(struct.pack(">I", MAX_FRAME + 1) + b'"x"')
        with pytest.raises(ValueError, match="too long"):
            recv_frame(b)
        assert b.recv(3) == b'"x"'  # the body was never read


def test_frames_larger_than_one_read_arrive_whole_and_back_to_back() -> None:
    first = {"secret": "a" * 200_000}
    second = {"op": "ping"}
    a, b = _pair()
    with a, b:
        thread, got = _read_in_thread(b, frames=2)
        data = b"".join(struct.pack(">I", len(d)) + d for d in (
            json.dumps(first).encode(), json.dumps(second).encode()))
        a.sendall(data)
        thread.join(30)
        assert got == [first, second]


def test_a_peer_that_closes_before_a_frame_gives_none() -> None:
    a, b = _pair()
    with b:
        a.close()
        assert recv_frame(b) is None


def test_a_frame_cut_short_is_malformed() -> None:
    a, b = _pair()
    with b:
        a.sendall(struct.pack(">I", 10) + b'"abc')
        a.close()
        with pytest.raises(ValueError, match="cut short"):
            recv_frame(b)


@pytest.mark.parametrize("body", [b"\xff\xfe\xfd", b"[" * 100_000, b"{x", b""])
def test_a_malformed_body_raises_value_error(body: bytes) -> None:
    a, b = _pair()
    with a, b:
        thread, got = _read_in_thread(b)
        a.sendall(struct.pack(">I", len(body)) + body)
        thread.join(30)
        assert len(got) == 1
        assert isinstance(got[0], ValueError)


def test_a_whole_body_within_the_timeout_is_read() -> None:
    a, b = _pair()
    with a, b:
        send_frame(a, {"op": "ping"})
        assert recv_frame(b, body_timeout=0.5) == {"op": "ping"}


def test_a_slow_body_is_cut_off_after_the_timeout_for_the_whole_body() -> None:
    a, b = _pair()
    with a, b:
        body = json.dumps({"op": "x" * 40}).encode()

        def drip() -> None:
            # The length at once, then a byte every 0.05 s: each read is quick,
            # the whole body is not (2.3 s).
            a.sendall(struct.pack(">I", len(body)))
            for byte in body:
                if stop.is_set():
                    return
                a.sendall(bytes([byte]))
                time.sleep(0.05)

        stop = threading.Event()
        sender = threading.Thread(target=drip, daemon=True)
        sender.start()
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                recv_frame(b, body_timeout=0.5)
            assert time.monotonic() - started < 1.5
        finally:
            stop.set()
            sender.join(10)


def test_a_sender_that_stalls_mid_body_is_cut_off_at_the_deadline() -> None:
    # Not only between reads: a read that waits for a stalled sender ends at the deadline.
    a, b = _pair()
    with b:
        a.sendall(struct.pack(">I", 100) + b'"abc')
        closer = threading.Timer(3.0, a.close)  # stalled for 3 s, then gone
        closer.start()
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                recv_frame(b, body_timeout=0.5)
            assert time.monotonic() - started < 2.5
        finally:
            closer.cancel()
            a.close()


def test_a_slow_length_is_not_cut_off() -> None:
    # The timeout starts once the length has arrived: an idle connection waits.
    a, b = _pair()
    with a, b:
        def late() -> None:
            time.sleep(0.5)
            send_frame(a, {"op": "ping"})

        sender = threading.Thread(target=late, daemon=True)
        sender.start()
        assert recv_frame(b, body_timeout=0.3) == {"op": "ping"}
        sender.join(10)


# -- errors carried by answers ----------------------------------------------------------


def test_an_answers_error_keeps_its_reason() -> None:
    with pytest.raises(NotFoundError) as info:
        raise_error({"kind": "not-found", "message": "gone", "reason": "no-such-entry"})
    assert info.value.reason == "no-such-entry"
    assert str(info.value) == "gone"
    with pytest.raises(DeniedError) as denied:
        raise_error({"kind": "denied", "message": "no", "reason": 5})
    assert denied.value.reason is None  # not a string: not passed on
    with pytest.raises(RateLimitedError) as limited:
        raise_error({"kind": "rate-limited", "message": "slow down", "retry_after": 3,
                     "reason": "rate-limited"})
    assert limited.value.retry_after == 3.0
    assert limited.value.reason == "rate-limited"
    assert str(limited.value) == "slow down"
    with pytest.raises(StorageError) as other:
        raise_error({"kind": None, "message": None})
    assert str(other.value) == "the agent refused the request"
    assert type(other.value) is StorageError
    with pytest.raises(StorageError) as listed:
        raise_error({"kind": ["locked"], "message": "m", "reason": "r"})  # not a kind
    assert type(listed.value) is StorageError
    assert listed.value.reason == "r"
    with pytest.raises(StorageError) as malformed:
        raise_error(None)
    assert malformed.value.reason == "agent-protocol"


# -- the client: requests, one connection, one retry -------------------------------------


def test_requests_carry_the_version_op_arguments_and_declared_actor(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_agent(run_dir, answering(ok("v"))) as agent:
        monkeypatch.setenv(ENV_ACTOR, "from-env")
        client = AgentStore(agent.path, Location.resolve(run_dir))
        with client:
            assert client.get("s", "u", version=3).reveal() == "v"
            assert client.get("s", "u").reveal() == "v"
        quiet = AgentStore(agent.path, Location.resolve(run_dir), declared="")
        with quiet:
            quiet.request("ping")
        named = AgentStore(agent.path, Location.resolve(run_dir), declared="ci")
        with named:
            named.request("ping")
    assert agent.received == [
        {"v": 1, "op": "get", "service": "s", "username": "u", "version": 3,
         "declared": "from-env"},
        {"v": 1, "op": "get", "service": "s", "username": "u", "version": None,
         "declared": "from-env"},
        {"v": 1, "op": "ping"},
        {"v": 1, "op": "ping", "declared": "ci"},
    ]


def test_each_operation_sends_its_arguments_and_reads_its_answer(run_dir: Path) -> None:
    answers = [ok(4), ok(None), ok(5), ok(["b", 7]), ok([["s", "u", 2, 1.5, None]]),
               ok([[2, 1, 1.5, True]]), ok(6)]
    with fake_agent(run_dir, answering(*answers)) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        assert client.set("s", "u", Secret("hush"), ttl=60.0) == 4
        client.delete("s", "u", purge=True)
        assert client.rollback("s", "u", to_version=2, allow_expired=True) == 5
        assert client.usernames("s") == ["b", "7"]
        assert client.credentials() == [CredentialInfo("s", "u", 2, 1.5, None)]
        assert client.history("s", "u") == [VersionInfo(2, 1, 1.5, True)]
        assert client.set("s", "u", "plain") == 6
        client.delete("s", "u")
        assert client.rollback("s", "u") == 6
    assert agent.received == [
        {"v": 1, "op": "set", "service": "s", "username": "u", "secret": "hush", "ttl": 60.0},
        {"v": 1, "op": "delete", "service": "s", "username": "u", "purge": True},
        {"v": 1, "op": "rollback", "service": "s", "username": "u", "to_version": 2,
         "allow_expired": True},
        {"v": 1, "op": "usernames", "service": "s"},
        {"v": 1, "op": "list"},
        {"v": 1, "op": "history", "service": "s", "username": "u"},
        {"v": 1, "op": "set", "service": "s", "username": "u", "secret": "plain", "ttl": None},
        {"v": 1, "op": "delete", "service": "s", "username": "u", "purge": False},
        {"v": 1, "op": "rollback", "service": "s", "username": "u", "to_version": None,
         "allow_expired": False},
    ]
    assert agent.connections == 1  # one connection, reused


def test_close_and_a_fork_make_a_new_connection(run_dir: Path) -> None:
    with fake_agent(run_dir, answering(ok())) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        client.request("ping")
        client.request("ping")
        assert agent.connections == 1
        client.close()
        client.close()  # twice is harmless
        client.request("ping")
        assert agent.connections == 2
        parents = client._sock
        client._pid = -1  # as in a child after fork: the parent's connection is not ours
        client.request("ping")
        client.request("ping")
        assert parents is not None
        assert client._sock is not parents
        parents.close()  # the parent's to close, not the child's
        assert agent.connections == 3
        assert client._pid == os.getpid()
        assert repr(client) == f"AgentStore(socket={str(agent.path)!r})"
        # Store's surface: the CLI reads .location of whichever store it got.
        assert client.location == Location.resolve(run_dir)


def test_a_broken_connection_is_made_again_once(run_dir: Path) -> None:
    def first_breaks(agent: FakeAgent, conn: socket.socket, n: int) -> None:
        if n == 1:
            return  # closed without an answer
        answering(ok("second"))(agent, conn, n)

    with fake_agent(run_dir, first_breaks) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        assert client.request("ping") == "second"
        assert agent.connections == 2


def test_an_agent_that_never_answers_is_down_after_two_tries(run_dir: Path) -> None:
    def hang_up(agent: FakeAgent, conn: socket.socket, n: int) -> None:
        agent.received.append(recv_frame(conn))

    with fake_agent(run_dir, hang_up) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        with pytest.raises(LockedError) as info:
            client.request("ping")
        assert info.value.reason == "agent-down"
        assert "did not answer (the agent closed the connection)" in str(info.value)
        assert agent.connections == 2
        assert client._sock is None


def test_a_garbled_answer_is_not_retried(run_dir: Path) -> None:
    with fake_agent(run_dir, answering(struct.pack(">I", 2) + b"{x")) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        with pytest.raises(LockedError) as info:
            client.request("ping")
        assert info.value.reason == "agent-down"
        assert "did not answer (" in str(info.value)
        assert agent.connections == 1


def test_a_silent_agent_times_out_once_not_twice(run_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def silent(agent: FakeAgent, conn: socket.socket, n: int) -> None:
        recv_frame(conn)
        agent.stop.wait(10)

    monkeypatch.setattr(agentproto, "_TIMEOUT", 0.3)
    with fake_agent(run_dir, silent) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        started = time.monotonic()
        with pytest.raises(LockedError) as info:
            client.request("ping")
        assert time.monotonic() - started < 5
        assert info.value.reason == "agent-down"
        assert "did not answer (timed out)" in str(info.value)
        assert agent.connections == 1


def test_nobody_listening_is_named_as_refused(run_dir: Path) -> None:
    run_dir.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(run_dir / "agent.sock"))
    dead.close()
    with AgentStore(run_dir / "agent.sock", Location.resolve(run_dir)) as client, \
            pytest.raises(LockedError) as info:
        client.request("ping")
    assert info.value.reason == "agent-down"
    assert "did not answer (connection refused)" in str(info.value)


def test_a_refusing_agents_answer_is_read_even_if_it_closed_first(run_dir: Path) -> None:
    def refuse(agent: FakeAgent, conn: socket.socket, n: int) -> None:
        send_frame(conn, {"v": 1, "ok": False, "error": {
            "kind": "denied", "message": "uid 5 may not use this agent", "reason": "peer"}})

    with fake_agent(run_dir, refuse) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        with pytest.raises(DeniedError) as info:
            client.request("ping")
        assert info.value.reason == "peer"
        assert agent.connections == 1


def test_an_answer_waiting_behind_a_closed_connection_is_read(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The agent says why it refuses and closes before the request goes out: the
    # request's send fails (EPIPE), and the answer is read all the same.
    gone = threading.Event()

    def refuse_and_close(agent: FakeAgent, conn: socket.socket, n: int) -> None:
        send_frame(conn, {"v": 1, "ok": False, "error": {
            "kind": "denied", "message": "uid 5 may not use this agent", "reason": "peer"}})
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()
        gone.set()

    real_check = agentproto._check_server

    def check_once_closed(sock: socket.socket, path: Path) -> None:
        assert gone.wait(5)
        real_check(sock, path)

    monkeypatch.setattr(agentproto, "_check_server", check_once_closed)
    with fake_agent(run_dir, refuse_and_close) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        with pytest.raises(DeniedError) as info:
            client.request("get", service="s", username="u")
        assert info.value.reason == "peer"
        assert agent.connections == 1


@pytest.mark.parametrize("answer", [[1, "ok"], {"v": 2, "ok": True}, {"ok": True},
                                    "text"])
def test_an_answer_in_another_protocol_is_refused(run_dir: Path, answer: Any) -> None:
    with fake_agent(run_dir, answering(answer)) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client, \
            pytest.raises(StorageError) as info:
        client.request("ping")
    assert info.value.reason == "agent-protocol"


def test_a_failed_answer_raises_its_error_and_get_needs_a_value(run_dir: Path) -> None:
    answers = [{"v": 1, "ok": False, "error": {"kind": "not-found", "message": "none",
                                               "reason": "r1"}},
               {"v": 1, "error": {"kind": "usage", "message": "bad"}},
               ok(None)]
    with fake_agent(run_dir, answering(*answers)) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        with pytest.raises(NotFoundError) as info:
            client.request("get")
        assert info.value.reason == "r1"
        with pytest.raises(UsageError, match="bad"):
            client.request("get")  # no "ok" is not ok
        with pytest.raises(StorageError) as empty:
            client.get("s", "u")
        assert empty.value.reason == "agent-protocol"


def test_notices_are_bounded_printable_and_logged(run_dir: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    many = [f"n{i}" for i in range(25)]
    answers = [ok(1, notices=["fine", "bad\x1b[2J", 7, "x" * 1500]),
               ok(2, notices=many),
               ok(3, notices=["last"]),
               ok(4, notices="not a list")]
    with fake_agent(run_dir, answering(*answers)) as agent, \
            AgentStore(agent.path, Location.resolve(run_dir)) as client:
        with caplog.at_level(logging.WARNING, logger="keyring_hardened"):
            assert client.request("a") == 1
        assert client.notices == ["fine", "x" * 1000]
        assert [r.getMessage() for r in caplog.records] == ["fine", "x" * 1000]
        assert client.request("b") == 2
        assert client.notices == many[:20]  # at most 20 an answer, the latest kept
        assert client.request("c") == 3
        assert client.notices == [*many[1:20], "last"]
        assert client.request("d") == 4
        assert len(client.notices) == 20


# -- who may answer -----------------------------------------------------------------------


class _PeerSock(socket.socket):
    """A real socket whose SO_PEERCRED answer names ``fake_uid`` (another user's agent)."""

    fake_uid = 0

    def getsockopt(self, *args: Any) -> Any:
        raw = super().getsockopt(*args)
        if args[:2] == (socket.SOL_SOCKET, socket.SO_PEERCRED) and isinstance(raw, bytes):
            pid, _uid, gid = struct.unpack("iII", raw)
            return struct.pack("iII", pid, self.fake_uid, gid)  # struct ucred, as the kernel
        return raw


def test_the_callers_own_agent_is_trusted_wherever_its_socket_is(run_dir: Path) -> None:
    with fake_agent(run_dir, answering(ok("mine"))) as agent:
        run_dir.chmod(0o777)  # a folder others may write: still this user's own agent
        try:
            with AgentStore(agent.path, Location.resolve(run_dir)) as client:
                assert client.request("ping") == "mine"
        finally:
            run_dir.chmod(0o700)


@pytest.mark.parametrize(("mode", "trusted"), [(0o700, True), (0o711, True), (0o750, True),
                                               (0o757, False), (0o770, False),
                                               (0o702, False)])
def test_another_users_agent_is_trusted_only_in_its_own_closed_folder(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: int, trusted: bool) -> None:
    with fake_agent(run_dir, answering(ok("served"))) as agent:
        run_dir.chmod(mode)
        # This process plays another user: the agent's uid owns socket and folder.
        real = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real + 4242)
        try:
            with AgentStore(agent.path, Location.resolve(run_dir)) as client:
                if trusted:
                    assert client.request("ping") == "served"
                else:
                    with pytest.raises(LockedError) as info:
                        client.request("ping")
                    assert info.value.reason == "agent-untrusted"
                    assert agent.received == []  # nothing was sent
        finally:
            monkeypatch.undo()
            run_dir.chmod(0o700)


def test_an_agent_of_a_uid_that_owns_neither_socket_nor_folder_is_refused(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_agent(run_dir, answering(ok())) as agent, \
            _PeerSock(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(agent.path))
        real = os.getuid()
        sock.fake_uid = real + 7  # a stranger's agent, on a socket this user owns
        with pytest.raises(LockedError) as info:
            agentproto._check_server(sock, agent.path)
        assert info.value.reason == "agent-untrusted"
        assert f"runs as uid {real + 7}" in str(info.value)
        # Even when this process is not the owner either.
        monkeypatch.setattr(os, "getuid", lambda: real + 9)
        with pytest.raises(LockedError) as info:
            agentproto._check_server(sock, agent.path)
        assert info.value.reason == "agent-untrusted"
        monkeypatch.undo()
        sock.fake_uid = real
        agentproto._check_server(sock, agent.path)  # the caller's own: trusted


def test_the_callers_own_agent_is_trusted_for_a_uid_of_2_31_or_more(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = 2**31 + 5  # a valid Linux uid (uid_t is 32 bits, unsigned)
    with fake_agent(run_dir, answering(ok())) as agent, \
            _PeerSock(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(agent.path))
        sock.fake_uid = big
        monkeypatch.setattr(os, "getuid", lambda: big)
        agentproto._check_server(sock, agent.path)


def test_a_socket_gone_after_connecting_is_not_trusted(run_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_agent(run_dir, answering(ok())) as agent, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(agent.path))
        agent.path.unlink()  # the owner cannot be checked any more
        real = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real + 4242)
        with pytest.raises(LockedError) as info:
            agentproto._check_server(sock, agent.path)
        assert info.value.reason == "agent-untrusted"


# -- discovery ----------------------------------------------------------------------------


def test_the_socket_is_the_homes_unless_the_variable_names_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    location = Location.resolve(tmp_path / "vault")
    assert socket_path(location) == tmp_path / "vault" / "agent.sock"
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    monkeypatch.setenv(ENV_AGENT_SOCK, "~/a.sock")
    assert socket_path(location) == tmp_path / "h" / "a.sock"
    monkeypatch.setenv(ENV_AGENT_SOCK, "")
    assert socket_path(location) == tmp_path / "vault" / "agent.sock"


def _key_file_vault(home: Path) -> Location:
    with Store.init(home) as s:
        s.set("x", "y", "z")
    return Location.resolve(home)


def test_connect_pings_with_the_declared_actor_and_returns_the_client(home: Path) -> None:
    location = _key_file_vault(home)
    with fake_agent(home, answering(ok("pong"))) as agent:
        client = connect(location, declared="ci-runner")
        assert client is not None
        with client:
            assert client.path == agent.path
            assert client.location == location
            assert client.request("status") == "pong"
    assert agent.received == [{"v": 1, "op": "ping", "declared": "ci-runner"},
                              {"v": 1, "op": "status", "declared": "ci-runner"}]


def test_connect_checks_the_home_before_sending_anything(home: Path) -> None:
    location = _key_file_vault(home)
    with fake_agent(home, answering(ok())) as agent:
        home.chmod(0o777)
        try:
            with pytest.raises(ConfigError):
                connect(location)
        finally:
            home.chmod(0o700)
        assert agent.connections == 0


def test_a_named_socket_is_not_held_to_the_homes_checks(
        home: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    location = _key_file_vault(home)
    home.chmod(0o777)  # the home is not used: the variable names the socket
    try:
        with fake_agent(run_dir, answering(ok())) as agent:
            monkeypatch.setenv(ENV_AGENT_SOCK, str(agent.path))
            client = connect(location)
            assert client is not None
            client.close()
            assert agent.received == [{"v": 1, "op": "ping"}]
    finally:
        home.chmod(0o700)


def test_a_named_socket_that_is_missing_is_an_error(home: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    location = _key_file_vault(home)
    monkeypatch.setenv(ENV_AGENT_SOCK, str(home / "none.sock"))
    with pytest.raises(LockedError) as info:
        connect(location)
    assert info.value.reason == "agent-down"
    (home / "none.sock").write_text("not a socket")
    with pytest.raises(LockedError) as info:
        connect(location)
    assert info.value.reason == "agent-down"


def test_a_file_that_is_not_a_socket_means_direct_mode(home: Path) -> None:
    location = _key_file_vault(home)
    (home / "agent.sock").write_text("not a socket")
    assert connect(location) is None


def test_a_locked_agents_refusal_is_the_answer(home: Path) -> None:
    location = _key_file_vault(home)
    refusal = {"v": 1, "ok": False, "error": {"kind": "locked", "message": "agent is locked",
                                              "reason": "agent-locked"}}
    with fake_agent(home, answering(refusal)):
        with pytest.raises(LockedError) as info:
            connect(location)
        assert info.value.reason == "agent-locked"
        assert str(info.value) == "agent is locked"
        del info
        gc.collect()


def test_connect_closes_the_connection_of_a_refused_ping(home: Path) -> None:
    location = _key_file_vault(home)
    closed = threading.Event()

    def refuse(agent: FakeAgent, conn: socket.socket, n: int) -> None:
        recv_frame(conn)
        send_frame(conn, {"v": 1, "ok": False, "error": {
            "kind": "locked", "message": "agent is locked", "reason": "agent-locked"}})
        if recv_frame(conn) is None:  # the client hung up
            closed.set()

    with fake_agent(home, refuse):
        seen = refused = False
        try:
            connect(location)
        except LockedError:
            refused = True
            # While the refusal is in hand, before anything collects it.
            seen = closed.wait(2)
        finally:
            gc.collect()
        assert refused
        assert seen, "connect() left the refused connection open"


def test_a_named_socket_that_cannot_be_looked_up_is_an_error(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A path the kernel refuses to look up (a name longer than 255 bytes) is
    # not there: an error, never a silent switch to direct mode.
    location = _key_file_vault(home)
    monkeypatch.setenv(ENV_AGENT_SOCK, str(home / ("x" * 300)))
    with pytest.raises(LockedError) as info:
        connect(location)
    assert info.value.reason == "agent-down"
    assert "no agent socket at" in str(info.value)


def test_a_dead_agent_with_a_key_file_that_cannot_be_looked_up_is_an_error(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The key file cannot be checked: not a vault this process could open itself.
    _key_file_vault(home)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(home / "agent.sock"))
    dead.close()
    monkeypatch.setenv("KEYRING_HARDENED_KEY_FILE", str(home / ("k" * 300)))
    with pytest.raises(LockedError) as info:
        connect(Location.resolve(home))
    assert info.value.reason == "agent-down"
    assert "is not running; start it" in str(info.value)
