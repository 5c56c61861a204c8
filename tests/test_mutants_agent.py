"""Tests that kill mutants of agent.py which the rest of the suite let live.

The real-process tests (test_agent.py, test_agent_attacks.py) prove the
agent as deployed; mutmut does not count a child process as reaching a
function, so these drive the same guarantees in-process: who may connect,
what is refused, what is answered, what a caller is named, which limits the
process sets. The process-wide calls (resource limits, ``prctl``) are
recorded through stand-ins, or made in a forked child that is waited on; the
store behind the agent is a recording stand-in where the agent's own
decisions are the point, and a real vault where the secret's path is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import json
import os
import pwd
import resource
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path, PosixPath
from typing import Any

import pytest

from keyring_hardened import agent as agent_mod
from keyring_hardened.agent import Agent, Peer, bind, harden_process, identify, peer_of, program_of
from keyring_hardened.agentproto import recv_frame, send_frame
from keyring_hardened.config import Config
from keyring_hardened.errors import (
    ConfigError,
    LockedError,
    NotFoundError,
    RateLimitedError,
    UsageError,
)
from keyring_hardened.location import ENV_CONFIG, Location
from keyring_hardened.store import Store

from .conftest import CANARY

ME = os.getuid()
USER = pwd.getpwuid(ME).pw_name
NOBODY = pwd.getpwnam("nobody")

# -- stand-ins -----------------------------------------------------------------------------


class Revealed:
    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value


class FakeStore:
    """The store's surface the agent uses; records every call and who acted."""

    def __init__(self, trust: bool = False, interval: float = 45.0) -> None:
        self.config = Config(agent_trust_declared_actor=trust, refresh_interval=interval)
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.acting_as: list[tuple[str, str]] = []
        self.notices: list[str] = []
        self.hooks: dict[str, Callable[[], None]] = {}
        self.closed = False

    @contextlib.contextmanager
    def acting(self, label: str, policy: str) -> Iterator[list[str]]:
        self.acting_as.append((label, policy))
        yield list(self.notices)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))
        hook = self.hooks.get(name)
        if hook is not None:
            hook()

    def credentials(self) -> list[tuple[str, str]]:
        self._call("credentials")
        return [("api", "deploy"), ("db", "app")]

    def usernames(self, service: str) -> list[str]:
        self._call("usernames", service)
        return ["deploy"]

    def get(self, service: str, username: str, version: int | None = None) -> Revealed:
        self._call("get", service, username, version=version)
        return Revealed(CANARY)

    def set(self, service: str, username: str, secret: str, ttl: Any = None) -> int:
        self._call("set", service, username, secret, ttl=ttl)
        return 7

    def delete(self, service: str, username: str, purge: bool = False) -> None:
        self._call("delete", service, username, purge=purge)

    def rollback(self, service: str, username: str, to_version: int | None = None,
                 allow_expired: bool = False) -> int:
        self._call("rollback", service, username, to_version=to_version,
                   allow_expired=allow_expired)
        return 4

    def history(self, service: str, username: str) -> list[tuple[int, str]]:
        self._call("history", service, username)
        return [(2, "current"), (1, "old")]

    def close(self) -> None:
        self.closed = True


class FakeRefresher:
    """What ``start_background`` hands back: records how it is stopped."""

    def __init__(self, store: Any, interval: Any) -> None:
        self.store = store
        self.interval = interval
        self.stops: list[float | None] = []
        self.busy = True  # a refresher is running: waiting for it would hold up the lock

    def stop(self, timeout: float | None = None) -> None:
        self.stops.append(timeout)


class Clock:
    """``time`` as agent.py sees it: a monotonic clock the test moves."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if not isinstance(seconds, int | float) or seconds < 0:
            raise TypeError("sleep needs a number of seconds")
        self.slept.append(seconds)


@pytest.fixture
def refreshers(monkeypatch: pytest.MonkeyPatch) -> list[FakeRefresher]:
    started: list[FakeRefresher] = []

    def start(store: Any, interval: Any) -> FakeRefresher:
        handle = FakeRefresher(store, interval)
        started.append(handle)
        return handle

    monkeypatch.setattr(agent_mod, "start_background", start)
    return started


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """A fresh table of held lock files; whatever a test leaves in it is closed."""
    table: dict[str, int] = {}
    monkeypatch.setattr(agent_mod, "_HELD", table)
    yield table
    for fd in table.values():
        with contextlib.suppress(OSError):
            os.close(fd)


@pytest.fixture
def place(home: Path) -> Path:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    return home


class Opener:
    def __init__(self, store: Any = None) -> None:
        self.asked: list[str | None] = []
        self.stores: list[Any] = []
        self.store = store

    def __call__(self, passphrase: str | None) -> Any:
        self.asked.append(passphrase)
        store = self.store if self.store is not None else FakeStore()
        self.stores.append(store)
        return store


def make_agent(place: Path, opener: Callable[[str | None], Any] | None = None,
               idle: float = 600.0, lifetime: float | None = None) -> Agent:
    return Agent(Location.resolve(place), place / "agent.sock", opener or Opener(),
                 idle_timeout=idle, max_lifetime=lifetime)


def ask(path: Path, doc: Any, timeout: float = 10.0) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        send_frame(s, doc)
        return recv_frame(s)


def _poke(path: Path) -> None:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(path))


@contextlib.contextmanager
def serving(agent: Agent, daemon: bool = True) -> Iterator[threading.Thread]:
    """``agent.serve`` in a thread until the block ends; it must end cleanly."""
    ready = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            agent.serve(ready.set)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-serve", daemon=daemon)
    thread.start()
    try:
        assert ready.wait(10), "the agent never said it was ready"
        yield thread
    finally:
        agent.stop()
        for _ in range(3):
            thread.join(5)
            if not thread.is_alive():
                break
            _poke(agent.path)  # an accept that never times out wakes for a connection
    assert not thread.is_alive()
    assert errors == []


def converse(agent: Agent, *frames: Any) -> list[Any]:
    """Send ``frames`` on one connection, hang up, let the agent serve it; its answers."""
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with client:
        client.settimeout(10)
        for frame in frames:
            send_frame(client, frame)
        client.shutdown(socket.SHUT_WR)
        agent._serve_one(server)
        answers: list[Any] = []
        while True:
            try:
                answer = recv_frame(client)
            except ConnectionResetError:  # it hung up on requests it never read
                return answers
            if answer is None:
                return answers
            answers.append(answer)


def req(op: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "op": op, **fields}


def unlocked(place: Path, refreshers: list[FakeRefresher], store: FakeStore | None = None,
             **kwargs: Any) -> tuple[Agent, FakeStore]:
    fake = store or FakeStore()
    agent = make_agent(place, Opener(fake), **kwargs)
    agent.unlock(None)
    return agent, fake


# -- peer_of: what the kernel says about a caller ------------------------------------------


def test_a_caller_is_named_by_the_kernel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_of(a)
    assert peer == Peer(os.getpid(), os.getuid(), os.getgid(), peer.groups)
    assert type(peer.groups) is tuple
    assert set(peer.groups) == set(os.getgroups())


class KernelConn:
    """A connection whose peer credentials are scripted, answered as Linux answers."""

    def __init__(self, pid: int, uid: int, gid: int, groups: list[int] | bytes | None) -> None:
        self.creds = struct.pack("iII", pid, uid, gid)
        self.groups = groups

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        if level != socket.SOL_SOCKET:
            raise OSError(errno.ENOPROTOOPT, "no such option")
        if option == socket.SO_PEERCRED:
            return self.creds[:buflen]
        if option == 59 and self.groups is not None:  # SO_PEERGROUPS
            data = self.groups if isinstance(self.groups, bytes) \
                else struct.pack(f"{len(self.groups)}I", *self.groups)
            if buflen < len(data):
                raise OSError(errno.ERANGE, "result too large")
            return data
        raise OSError(errno.ENOPROTOOPT, "no such option")


def test_a_caller_in_many_groups_is_named_with_all_of_them_or_by_its_primary_group() -> None:
    many = list(range(1000, 1256))
    peer = peer_of(KernelConn(42, 1001, 1002, many))  # type: ignore[arg-type]
    assert peer == Peer(42, 1001, 1002, tuple(many))
    # More than the agent asks for: never a partial list, the primary group alone.
    assert peer_of(KernelConn(42, 1001, 1002, [*many, 2000])) == Peer(  # type: ignore[arg-type]
        42, 1001, 1002, ())
    # An older kernel without SO_PEERGROUPS: the primary group alone.
    assert peer_of(KernelConn(-1, 5, 6, None)) == Peer(-1, 5, 6, ())  # type: ignore[arg-type]
    # Only whole entries are read.
    odd = struct.pack("I", 77) + b"\x01\x00"
    assert peer_of(KernelConn(3, 4, 5, odd)).groups == (77,)  # type: ignore[arg-type]


# -- program_of and identify: what a caller is called ---------------------------------------


def _within(check: Callable[[], None], seconds: float = 30.0) -> None:
    """Run ``check`` with a deadline (a wrong option scan could loop)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            check()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the scan did not finish"
    if failure:
        raise failure[0]


PROGRAMS = [
    ("/usr/bin/ls", ["ls", "-l"], "ls"),
    ("", [], "?"),
    ("/", ["x"], "?"),
    ("/usr/bin/python3", ["python3", "/home/a/bin/keyring", "get"], "keyring"),
    ("/usr/bin/python3", ["python3"], "python3"),
    ("/usr/bin/python3", ["python3", "tool.py"], "tool.py"),
    ("/opt/pypy3/bin/pypy3", ["pypy3", "/srv/job.py", "x"], "job.py"),
    ("/usr/bin/python3.11", ["python", "-m", "pkg", "arg"], "pkg"),
    ("/usr/bin/python3.11", ["python", "-mpkg", "arg"], "pkg"),
    ("/usr/bin/python3.11", ["python", "-I", "-m", "pkg"], "pkg"),
    ("/usr/bin/python3.11", ["python", "-m"], "python3.11"),
    ("/usr/bin/python3.11", ["python", "-c", "print(1)", "x"], "python3.11 -c"),
    ("/usr/bin/python3.11", ["python", "-Ic", "print(1)"], "python3.11 -c"),
    ("/usr/bin/python3.11", ["python", "-cprint(1)"], "python3.11 -c"),
    ("/usr/bin/python3.11", ["python", "-W", "ignore", "s.py", "get"], "s.py"),
    ("/usr/bin/python3.11", ["python", "-Wdefault", "s.py", "get"], "s.py"),
    ("/usr/bin/python3.11", ["python", "-X", "dev", "-E", "s.py"], "s.py"),
    ("/usr/bin/python3.11", ["python", "-bb", "-E", "-s", "s.py", "get"], "s.py"),
    ("/usr/bin/python3.11", ["python", "-W"], "python3.11"),
    ("/usr/bin/python3.11", ["python", "--", "s.py", "get"], "s.py"),
    ("/usr/bin/python3.11", ["python", "--"], "python3.11"),
    # After "--" the next word is the script, even one that looks like an option.
    ("/usr/bin/python3.11", ["python", "--", "-tool.py"], "-tool.py"),
    ("/usr/bin/python3.11", ["python", "-"], "python3.11"),
    # "-" is the script read from stdin; what follows are its arguments.
    ("/usr/bin/python3.11", ["python", "-", "x.py"], "python3.11"),
    ("/usr/bin/python3.11", ["python", "", "x"], "python3.11"),
    ("/usr/bin/python3.11", ["python", "--version", "x.py"], "x.py"),
    # A long option is one word, never a cluster of short ones (--compat is not -c).
    ("/usr/bin/python3.11", ["python", "--compat", "tool.py"], "tool.py"),
    ("/usr/bin/python3.11", ["python", "-I"], "python3.11"),
]


def test_a_callers_program_is_its_script_for_an_interpreter() -> None:
    def check() -> None:
        for exe, argv, expected in PROGRAMS:
            assert program_of(exe, argv) == expected, (exe, argv)

    _within(check)


@contextlib.contextmanager
def child(argv: list[str | bytes]) -> Iterator[Peer]:
    """A real process running ``argv``, once it runs (it then waits for its stdin to close)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"  # past exec: its arguments are in place
        yield Peer(proc.pid, os.getuid(), os.getgid())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_caller_is_its_user_and_program(tmp_path: Path) -> None:
    body = b"import sys\nprint('ready', flush=True)\nsys.stdin.read()\n"
    plain = tmp_path / "tool.py"
    plain.write_bytes(body)
    odd = os.fsencode(tmp_path) + b"/t\xffo\x1bl.py"  # not UTF-8, and a control character
    with open(odd, "wb") as f:
        f.write(body)
    long_name = tmp_path / ("n" * 250 + ".py")
    long_name.write_bytes(body)
    with child([sys.executable, str(plain), "get"]) as peer:
        assert identify(peer) == f"{USER}:tool.py"
    with child([sys.executable, odd]) as peer:
        assert identify(peer) == f"{USER}:t\ufffdo?l.py"
    with child([sys.executable, str(long_name)]) as peer:
        named = identify(peer)
    assert named == f"{USER}:{'n' * 250}"[:200]


def test_a_caller_that_is_gone_or_has_no_account_is_still_named() -> None:
    # No such process (beyond the kernel's pid limit) and no passwd entry.
    assert identify(Peer(2**22 + 12345, 2**31 - 3, 0)) == "uid2147483645:?"
    assert identify(Peer(2**22 + 12345, ME, 0)) == f"{USER}:?"


# -- harden_process: no core dumps, no ptrace by the user's other processes -----------------


class FakeLibc:
    def __init__(self, result: int) -> None:
        self.result = result
        self.calls: list[tuple[int, ...]] = []

    def prctl(self, *args: int | None) -> int:
        # ctypes passes None as a NULL pointer: 0.
        self.calls.append(tuple(0 if a is None else a for a in args))
        return self.result


def _fake_os_calls(monkeypatch: pytest.MonkeyPatch, result: int
                   ) -> tuple[list[tuple[int, tuple[int, int]]], FakeLibc, list[Any]]:
    limits: list[tuple[int, tuple[int, int]]] = []
    libc = FakeLibc(result)
    opened: list[Any] = []
    saved = {"errno": 0}

    def setrlimit(which: int, limit: tuple[int, int]) -> None:
        limits.append((which, limit))

    def cdll(name: Any, use_errno: bool = False) -> FakeLibc:
        opened.append((name, use_errno))
        if use_errno and result != 0:
            saved["errno"] = errno.EPERM  # ctypes keeps errno only when asked to
        return libc

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(ctypes, "get_errno", lambda: saved["errno"])
    return limits, libc, opened


def test_the_agent_process_allows_no_core_dump_and_no_ptrace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    limits, libc, opened = _fake_os_calls(monkeypatch, 0)
    harden_process()
    assert limits == [(resource.RLIMIT_CORE, (0, 0))]
    pr_set_dumpable = 4
    assert libc.calls == [(pr_set_dumpable, 0, 0, 0, 0)]
    assert [name for name, _ in opened] == [None]


def test_a_refused_prctl_stops_the_agent_with_the_kernels_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, libc, _ = _fake_os_calls(monkeypatch, -1)
    with pytest.raises(OSError, match=r"(?i)pr_set_dumpable") as info:
        harden_process()
    assert info.value.errno == errno.EPERM
    assert "pr_set_dumpable" in str(info.value).lower()
    assert len(libc.calls) == 1


def test_a_hardened_process_has_no_core_limit_and_is_not_dumpable() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: harden for real, report, exit
        os.close(read)
        try:
            harden_process()
            libc = ctypes.CDLL(None, use_errno=True)
            doc = {"core": list(resource.getrlimit(resource.RLIMIT_CORE)),
                   "dumpable": libc.prctl(3, 0, 0, 0, 0)}  # PR_GET_DUMPABLE
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            doc = {"error": repr(exc)}
        os.write(write, json.dumps(doc).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        report = json.loads(f.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {"core": [0, 0], "dumpable": 0}


# -- the agent's state: unlock, lock, status, the watchdog ----------------------------------


def test_status_names_the_agent_and_counts_down(place: Path, refreshers: list[FakeRefresher],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(1000.0)
    monkeypatch.setattr(agent_mod, "time", clock)
    opener = Opener()
    agent = make_agent(place, opener, idle=20.0, lifetime=50.0)
    common = {"pid": os.getpid(), "socket": str(place / "agent.sock"),
              "home": str(Location.resolve(place).home)}
    assert agent.status() == {"state": "locked", **common, "served": 0, "idle_left": None,
                              "lifetime_left": 50.0}
    clock.now = 1003.0
    agent.unlock(None)
    assert agent.status() == {"state": "unlocked", **common, "served": 0,
                              "idle_left": 17.0, "lifetime_left": 47.0}
    clock.now = 1005.0
    assert agent._answer(req("usernames", service="api"), "me:x")["ok"] is True
    assert agent.served == 1
    clock.now = 1010.0
    assert agent.status()["idle_left"] == 15.0  # the request reset the idle clock
    assert agent.status()["served"] == 1
    clock.now = 5000.0
    assert agent.status() == {"state": "unlocked", **common, "served": 1,
                              "idle_left": 0.0, "lifetime_left": 0.0}
    forever = make_agent(place, opener, idle=20.0, lifetime=None)
    assert forever.status()["lifetime_left"] is None


def test_unlock_opens_once_and_starts_the_refresher(place: Path,
                                                  refreshers: list[FakeRefresher]) -> None:
    opener = Opener()
    agent = make_agent(place, opener)
    assert agent.store is None
    agent.unlock("pass phrase")
    agent.unlock("again")  # already open: not opened twice
    assert opener.asked == ["pass phrase"]
    store = opener.stores[0]
    assert agent.store is store
    assert [(r.store, r.interval) for r in refreshers] == [(store, 45.0)]


def test_lock_wipes_the_keys_and_does_not_wait_for_the_refresher(
        place: Path, refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)
    agent.lock()
    assert store.closed
    assert agent.store is None
    assert refreshers[0].stops == [0]  # told to stop, never waited for
    agent.lock()  # locking a locked agent is harmless
    assert agent.status()["state"] == "locked"
    agent.unlock(None)
    assert len(refreshers) == 2
    assert agent.status()["state"] == "unlocked"


class SimStop(threading.Event):
    """The watchdog's stop event: each wait moves the clock to the next time in ``times``."""

    def __init__(self, clock: Clock, times: list[float]) -> None:
        super().__init__()
        self.clock = clock
        self.times = list(times)

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            raise AssertionError("the watchdog would wait forever")
        if not self.times or self.is_set():
            self.set()
            return True
        self.clock.now = self.times.pop(0)
        return False


def _watch_at(agent: Agent, clock: Clock, *times: float) -> list[bool]:
    stopped: list[bool] = []
    agent._stop = SimStop(clock, list(times))
    agent.stop = lambda: stopped.append(True)  # type: ignore[method-assign]
    agent._watch()
    return stopped


def test_the_watchdog_stops_at_the_lifetime_and_locks_when_idle(
        place: Path, refreshers: list[FakeRefresher], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(1000.0)
    monkeypatch.setattr(agent_mod, "time", clock)
    agent = make_agent(place, idle=5.0, lifetime=10.0)
    assert _watch_at(agent, clock, 1002.0, 1010.0) == []  # exactly the lifetime: not past it
    assert _watch_at(agent, clock, 1010.5) == [True]
    endless = make_agent(place, idle=5.0, lifetime=None)
    assert _watch_at(endless, clock, 9999.0) == []

    store = FakeStore()
    clock.now = 1000.0
    idle = make_agent(place, Opener(store), idle=5.0, lifetime=100.0)
    idle.unlock(None)
    assert _watch_at(idle, clock, 1001.0, 1005.0) == []
    assert idle.store is store  # exactly the idle timeout: still unlocked
    assert _watch_at(idle, clock, 1005.5) == []
    assert idle.store is None
    assert store.closed


# -- who may connect ------------------------------------------------------------------------


def _allowed(agent: Agent, monkeypatch: pytest.MonkeyPatch, cfg: Config | None,
             peer: Peer) -> bool:
    monkeypatch.setattr(agent, "_config", lambda: cfg)
    return agent._allowed(peer)


def test_who_may_connect_own_user_listed_users_and_groups(
        place: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = make_agent(place)
    other = Peer(1, NOBODY.pw_uid, NOBODY.pw_gid, (4242,))
    nogroup = grp.getgrgid(NOBODY.pw_gid).gr_name
    # The agent's own user, whatever the config says (even when it cannot be read).
    assert _allowed(agent, monkeypatch, None, Peer(1, ME, 12345))
    # Nobody else without a readable config that names them.
    assert not _allowed(agent, monkeypatch, None, other)
    assert not _allowed(agent, monkeypatch, Config(), other)
    # By name or by uid, in the list of users alone.
    assert _allowed(agent, monkeypatch, Config(agent_allow_users=("nobody",)), other)
    assert _allowed(agent, monkeypatch, Config(agent_allow_users=(NOBODY.pw_uid,)), other)
    assert not _allowed(agent, monkeypatch, Config(agent_allow_users=("daemon", 4)), other)
    # An allowance for someone else is no allowance for this caller, named or not.
    nameless = Peer(1, 2**31 - 2, 2**31 - 2)
    assert not _allowed(agent, monkeypatch, Config(agent_allow_users=("nobody",)), nameless)
    assert _allowed(agent, monkeypatch, Config(agent_allow_users=(2**31 - 2,)), nameless)
    # By group: a supplementary group, or the primary one alone, by id or by name.
    assert _allowed(agent, monkeypatch, Config(agent_allow_groups=(4242,)), other)
    assert _allowed(agent, monkeypatch, Config(agent_allow_groups=(nogroup,)),
                    other._replace(groups=()))
    assert _allowed(agent, monkeypatch, Config(agent_allow_groups=(NOBODY.pw_gid,)),
                    other._replace(groups=()))
    # An unknown group name is skipped, not the end of the list.
    assert _allowed(agent, monkeypatch, Config(agent_allow_groups=("no-such-grp", 4242)), other)
    assert not _allowed(agent, monkeypatch, Config(agent_allow_groups=("no-such-grp", 4243)),
                        other)
    assert not _allowed(agent, monkeypatch, Config(agent_allow_groups=(4243,)), other)
    assert not _allowed(agent, monkeypatch,
                        Config(agent_allow_users=("daemon",), agent_allow_groups=(4243,)), other)


def test_the_config_names_who_else_may_connect_and_a_bad_one_nobody(
        place: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = place / "config.toml"
    config.write_text('agent_allow_users = ["someone", 4321]\n')
    config.chmod(0o600)
    agent = make_agent(place)
    cfg = agent._config()
    assert cfg is not None
    assert cfg.agent_allow_users == ("someone", 4321)
    # A config named in the environment must exist: without it, nobody else is allowed.
    monkeypatch.setenv(ENV_CONFIG, str(place / "missing.toml"))
    assert make_agent(place)._config() is None


# -- one connection: refused, or served request by request ---------------------------------


def test_another_user_is_told_why_then_dropped(place: Path, refreshers: list[FakeRefresher],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    agent, store = unlocked(place, refreshers)
    agent._uid = ME + 1  # this process is "another user" to the agent
    monkeypatch.setattr(agent, "_config", lambda: None)
    answers = converse(agent, req("get", service="api", username="deploy"))
    assert len(answers) == 1
    assert answers[0]["ok"] is False
    assert answers[0]["error"]["kind"] == "locked"
    assert answers[0]["error"]["reason"] == "agent-peer"
    assert answers[0]["error"]["code"] == LockedError.exit_code
    assert store.calls == []


def test_a_refused_caller_that_hung_up_is_dropped_quietly(
        place: Path, refreshers: list[FakeRefresher], monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _ = unlocked(place, refreshers)
    agent._uid = ME + 1
    monkeypatch.setattr(agent, "_config", lambda: None)
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client.close()
    agent._serve_one(server)  # the refusal cannot be sent: no error escapes


def test_a_connection_that_names_no_peer_is_dropped(place: Path, refreshers: list[FakeRefresher],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    agent, store = unlocked(place, refreshers)

    def no_peer(conn: socket.socket) -> Peer:
        raise OSError(errno.ENOTCONN, "gone")

    monkeypatch.setattr(agent_mod, "peer_of", no_peer)
    assert converse(agent, req("ping")) == []
    assert store.calls == []


def test_a_connection_is_served_request_by_request_as_its_caller(
        place: Path, refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)
    answers = converse(agent, req("ping"), ["not", "a", "request"],
                       req("get", service="api", username="deploy"), req("status"))
    assert [a["ok"] for a in answers] == [True, False, True, True]
    assert answers[0]["result"] == "pong"
    assert answers[1]["error"]["reason"] == "agent-protocol"
    assert answers[2]["result"] == CANARY
    assert answers[3]["result"]["state"] == "unlocked"
    me = identify(Peer(os.getpid(), ME, os.getgid()))
    assert store.acting_as == [(me, me)]


def test_an_allowed_other_user_may_use_credentials_but_not_run_the_agent(
        place: Path, refreshers: list[FakeRefresher], monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _ = unlocked(place, refreshers)
    agent._uid = ME + 1
    monkeypatch.setattr(agent, "_config", lambda: Config(agent_allow_users=(ME,)))
    answers = converse(agent, req("get", service="api", username="deploy"), req("status"),
                       req("ping"))
    assert answers[0] == {"v": 1, "ok": True, "result": CANARY}
    assert answers[1]["error"]["reason"] == "agent-control"
    assert answers[2]["result"] == "pong"
    # A stop, even refused, ends the connection.
    answers = converse(agent, req("stop"), req("ping"))
    assert len(answers) == 1
    assert answers[0]["error"]["kind"] == "denied"
    assert not agent._stop.is_set()


def test_a_stop_request_is_answered_then_the_connection_ends(
        place: Path, refreshers: list[FakeRefresher]) -> None:
    agent, _ = unlocked(place, refreshers)
    assert converse(agent, req("stop"), req("ping")) == [{"v": 1, "ok": True, "result": None}]
    assert agent._stop.is_set()
    # A stopped agent serves no further request.
    assert converse(agent, req("ping")) == []


def test_an_idle_or_slow_connection_is_cut_off(place: Path, refreshers: list[FakeRefresher],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _ = unlocked(place, refreshers)

    def served_until_dropped(prepare: Callable[[socket.socket], None]) -> None:
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        done = threading.Event()

        def serve() -> None:
            agent._serve_one(server)
            done.set()

        thread = threading.Thread(target=serve, daemon=True)
        with client:
            client.settimeout(30)
            prepare(client)
            thread.start()
            try:
                assert done.wait(20), "the agent kept the connection"
            finally:
                client.shutdown(socket.SHUT_RDWR)
                thread.join(10)

    # Idle between requests: dropped after CONNECTION_IDLE.
    monkeypatch.setattr(agent_mod, "CONNECTION_IDLE", 0.3)
    served_until_dropped(lambda client: None)
    # A request whose body never arrives: dropped after READ_TIMEOUT, however long the idle limit.
    monkeypatch.setattr(agent_mod, "CONNECTION_IDLE", 300.0)
    monkeypatch.setattr(agent_mod, "READ_TIMEOUT", 0.3)
    served_until_dropped(lambda client: client.sendall(struct.pack(">I", 100) + b'{"v": 1'))

    # An answer the caller never reads: dropped after READ_TIMEOUT, not held forever.
    store = agent.store
    big = "x" * (3 << 20)
    monkeypatch.setattr(store, "get", lambda *a, **k: Revealed(big))
    served_until_dropped(lambda client: send_frame(
        client, req("get", service="api", username="deploy")))


# -- answers --------------------------------------------------------------------------------


def test_answers_carry_the_version_and_the_result(place: Path,
                                                  refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)
    assert agent._answer(req("ping"), "me:x", True) == {"v": 1, "ok": True, "result": "pong"}
    for bad in ({"op": "ping"}, {"v": True, "op": "ping"}, {"v": 2, "op": "ping"},
                {"v": "1", "op": "ping"}, [1], "v"):
        answer = agent._answer(bad, "me:x", True)
        assert answer["ok"] is False, bad
        assert answer["error"]["reason"] == "agent-protocol", bad
        assert answer["error"]["kind"] == "usage", bad
    store.notices = ["the refresher of api/deploy failed"]
    assert agent._answer(req("list"), "me:x", True) == {
        "v": 1, "ok": True, "result": [["api", "deploy"], ["db", "app"]],
        "notices": ["the refresher of api/deploy failed"]}


def test_a_bug_is_an_internal_error_answer_without_the_secret(
        place: Path, refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)

    def broken() -> None:
        raise ZeroDivisionError(CANARY)

    store.hooks["usernames"] = broken
    answer = agent._answer(req("usernames", service="api"), "me:x", True)
    message = answer["error"].pop("message")
    assert answer == {"v": 1, "ok": False, "error": {
        "kind": "internal", "code": 70, "reason": "agent-internal"}}
    assert "ZeroDivisionError" in message
    assert CANARY not in json.dumps(answer) + message


def test_errors_keep_their_kind_code_reason_and_retry(place: Path,
                                                      refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)

    def limited() -> None:
        raise RateLimitedError("slow down", 2.5, "rate-read")

    store.hooks["get"] = limited
    assert agent._answer(req("get", service="a", username="b"), "me:x", True) == {
        "v": 1, "ok": False, "error": {"kind": RateLimitedError.kind,
                                       "code": RateLimitedError.exit_code,
                                       "reason": "rate-read", "message": "slow down",
                                       "retry_after": 2.5}}

    def missing() -> None:
        raise NotFoundError("no such credential", "absent")

    store.hooks["get"] = missing
    assert agent._answer(req("get", service="a", username="b"), "me:x", True) == {
        "v": 1, "ok": False, "error": {"kind": NotFoundError.kind,
                                       "code": NotFoundError.exit_code,
                                       "reason": "absent", "message": "no such credential"}}


def test_only_the_agents_own_user_may_run_it(place: Path,
                                             refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)
    for op in ("status", "lock", "unlock", "stop"):
        answer = agent._answer(req(op), "other:x", False)
        assert answer["error"]["kind"] == "denied", op
        assert answer["error"]["reason"] == "agent-control", op
    assert agent.store is store
    assert not agent._stop.is_set()
    assert agent._answer(req("ping"), "other:x", False)["result"] == "pong"
    assert agent._answer(req("get", service="a", username="b"), "other:x", False)["ok"]
    # The own user may.
    assert agent._answer(req("status"), "me:x", True)["result"]["state"] == "unlocked"
    assert agent._answer(req("lock"), "me:x", True) == {"v": 1, "ok": True, "result": None}
    assert agent.store is None
    locked = agent._answer(req("get", service="a", username="b"), "me:x", True)
    assert locked["error"]["reason"] == "agent-locked"
    assert agent._answer(req("unlock", passphrase="pw"), "me:x", True)["ok"]
    assert agent.store is not None
    agent.lock()
    assert agent._answer(req("unlock", passphrase=5), "me:x", True)["ok"]
    assert agent._open.asked == [None, "pw", None]
    assert agent._answer(req("stop"), "me:x", True) == {"v": 1, "ok": True, "result": None}
    assert agent._stop.is_set()
    for op in ("frobnicate", "STATUS", None, ""):
        answer = agent._answer({"v": 1, "op": op}, "me:x", True)
        assert answer["error"]["reason"] == "agent-protocol"


def test_every_operation_reaches_the_store_with_its_arguments(
        place: Path, refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)

    def result(op: str, **fields: Any) -> Any:
        answer = agent._answer(req(op, **fields), "me:x", True)
        assert answer["ok"] is True, answer
        return answer["result"]

    assert result("list") == [["api", "deploy"], ["db", "app"]]
    assert result("usernames", service="api") == ["deploy"]
    assert result("get", service="api", username="deploy") == CANARY
    assert result("get", service="api", username="deploy", version=3) == CANARY
    assert result("set", service="s", username="u", secret="new") == 7
    assert result("set", service="s", username="u", secret="new", ttl="1h") == 7
    assert result("delete", service="s", username="u") is None
    assert result("delete", service="s", username="u", purge=True) is None
    assert result("delete", service="s", username="u", purge="yes") is None
    assert result("rollback", service="s", username="u") == 4
    assert result("rollback", service="s", username="u", to_version=2, allow_expired=True) == 4
    assert result("rollback", service="s", username="u", allow_expired=1) == 4
    assert result("history", service="s", username="u") == [[2, "current"], [1, "old"]]
    assert store.calls == [
        ("credentials", (), {}),
        ("usernames", ("api",), {}),
        ("get", ("api", "deploy"), {"version": None}),
        ("get", ("api", "deploy"), {"version": 3}),
        ("set", ("s", "u", "new"), {"ttl": None}),
        ("set", ("s", "u", "new"), {"ttl": "1h"}),
        ("delete", ("s", "u"), {"purge": False}),
        ("delete", ("s", "u"), {"purge": True}),
        ("delete", ("s", "u"), {"purge": False}),
        ("rollback", ("s", "u"), {"to_version": None, "allow_expired": False}),
        ("rollback", ("s", "u"), {"to_version": 2, "allow_expired": True}),
        ("rollback", ("s", "u"), {"to_version": None, "allow_expired": False}),
        ("history", ("s", "u"), {}),
    ]
    assert agent.served == 13


def test_names_must_be_strings(place: Path, refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)
    for op, fields in (("usernames", {}), ("get", {"service": 1, "username": "u"}),
                       ("get", {"service": "s"}), ("history", {"service": "s", "username": 2}),
                       ("set", {"service": "s", "username": "u", "secret": 5})):
        answer = agent._answer(req(op, **fields), "me:x", True)
        assert answer["error"]["kind"] == "usage", (op, fields)
        assert answer["error"]["reason"] == "agent-protocol", (op, fields)
    assert store.calls == []


def test_a_declared_actor_is_shown_and_trusted_only_when_configured(
        place: Path, refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)
    get = req("get", service="a", username="b")
    for declared in (None, 5, "bad\x00name", ""):
        assert agent._answer({**get, "declared": declared}, "me:x", True)["ok"]
    assert agent._answer({**get, "declared": "deploy-job"}, "me:x", True)["ok"]
    assert agent._answer({**get, "declared": "d" * 130}, "me:x", True)["ok"]
    assert store.acting_as == [("me:x", "me:x")] * 4 + [
        ("me:x (declared deploy-job)", "me:x"),
        (f"me:x (declared {'d' * 120})", "me:x")]

    trusting, trusted_store = unlocked(place, refreshers, FakeStore(trust=True))
    assert trusting._answer({**get, "declared": "deploy-job"}, "me:x", True)["ok"]
    assert trusting._answer(get, "me:x", True)["ok"]
    assert trusted_store.acting_as == [("me:x (declared deploy-job)", "deploy-job"),
                                       ("me:x", "me:x")]
    # The label is cut to what an actor may be.
    long_actor = "u:" + "p" * 198
    assert trusting._answer({**get, "declared": "e" * 120}, long_actor, True)["ok"]
    label, _ = trusted_store.acting_as[-1]
    assert label == f"{long_actor} (declared {'e' * 120})"[:256]


def test_a_rekey_elsewhere_or_a_lock_during_a_request_says_unlock(
        place: Path, refreshers: list[FakeRefresher]) -> None:
    agent, store = unlocked(place, refreshers)
    get = req("get", service="a", username="b")

    def replaced() -> None:
        raise LockedError("rekeyed", "root-replaced")

    store.hooks["get"] = replaced
    answer = agent._answer(get, "me:x", True)
    assert answer["error"]["reason"] == "agent-locked"
    assert agent.store is None
    assert store.closed

    agent2, store2 = unlocked(place, refreshers)

    def other_lock() -> None:
        raise LockedError("the vault is busy", "busy")

    store2.hooks["get"] = other_lock
    assert agent2._answer(get, "me:x", True)["error"]["reason"] == "busy"
    assert agent2.store is store2

    def bad_use() -> None:
        raise UsageError("bad version", "bad-version")

    store2.hooks["get"] = bad_use
    assert agent2._answer(get, "me:x", True)["error"]["reason"] == "bad-version"

    def locked_meanwhile() -> None:
        agent2.lock()
        raise UsageError("store closed", "closed")

    store2.hooks["get"] = locked_meanwhile
    answer = agent2._answer(get, "me:x", True)
    assert answer["error"]["kind"] == "locked"
    assert answer["error"]["reason"] == "agent-locked"


# -- bind: where the agent listens -----------------------------------------------------------


def test_bind_listens_privately_and_holds_the_place(place: Path, held: dict[str, int]) -> None:
    path = place / "agent.sock"
    modes: list[int] = []
    real_chmod = os.chmod

    def chmod(target: Any, mode: int) -> None:
        modes.append(os.lstat(target).st_mode & 0o777)  # as bound, before the chmod
        real_chmod(target, mode)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "chmod", chmod)
        listener = bind(path)
    with listener:
        assert modes == [0o600]
        assert path.is_socket()
        assert path.stat().st_mode & 0o777 == 0o600
        lock = path.with_name("agent.sock.lock")
        assert lock.is_file()
        assert lock.stat().st_mode & 0o077 == 0
        assert listener.gettimeout() == 1.0
        # The place is held: a second start is refused (and the refused one holds nothing).
        with pytest.raises(UsageError) as info:
            bind(path)
        assert info.value.reason == "agent-running"
        assert list(held) == [str(path)]
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
            conn, _ = listener.accept()
            conn.close()


def test_a_shared_agent_listens_for_others_in_a_passable_folder(
        place: Path, held: dict[str, int]) -> None:
    os.chmod(place, 0o711)
    path = place / "agent.sock"
    with pytest.raises(ConfigError, match="chmod 700"):
        bind(path)
    with bind(path, shared=True):
        assert path.stat().st_mode & 0o777 == 0o666
    for mode in (0o731, 0o715, 0o751, 0o770):
        os.chmod(place, mode)
        with pytest.raises(ConfigError, match="chmod 711"):
            bind(place / "other.sock", shared=True)
    os.chmod(place, 0o700)


def test_bind_refuses_an_open_or_foreign_folder(place: Path, held: dict[str, int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for mode in (0o701, 0o710, 0o740, 0o704):
        os.chmod(place, mode)
        with pytest.raises(ConfigError, match="chmod 700"):
            bind(place / "agent.sock")
    os.chmod(place, 0o700)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(ConfigError, match="must be yours"):
        bind(place / "agent.sock")
    monkeypatch.undo()
    assert held == {}
    with bind(place / "agent.sock"):
        pass


def test_bind_needs_peer_credentials(place: Path, held: dict[str, int],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(socket, "SO_PEERCRED")
    with pytest.raises(ConfigError, match="SO_PEERCRED"):
        bind(place / "agent.sock")
    assert not (place / "agent.sock").exists()


def test_bind_leaves_what_is_not_its_socket_and_frees_the_place(
        place: Path, held: dict[str, int]) -> None:
    path = place / "agent.sock"
    path.write_text("the user's file")
    with pytest.raises(ConfigError, match="not this user's agent socket"):
        bind(path)
    assert path.read_text() == "the user's file"
    assert held == {}
    path.unlink()
    with bind(path):  # the failed start freed the lock
        pass


def test_bind_does_not_follow_a_planted_lock_link(place: Path, held: dict[str, int],
                                                  tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (place / "agent.sock.lock").symlink_to(target)
    with pytest.raises(OSError, match="symbolic links") as info:
        bind(place / "agent.sock")
    assert info.value.errno == errno.ELOOP
    assert not target.exists()


def test_bind_replaces_a_stale_socket_and_refuses_a_live_one(
        place: Path, held: dict[str, int]) -> None:
    path = place / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with bind(path):
        pass
    live_path = place / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(live_path))
        live.listen(1)
        with pytest.raises(UsageError) as info:
            bind(live_path)
        assert info.value.reason == "agent-running"
        assert live_path.is_socket()
        assert str(live_path) not in held


def test_bind_gives_up_on_a_listener_that_never_answers(place: Path, held: dict[str, int]
                                                        ) -> None:
    path = place / "agent.sock"
    jammed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued: list[socket.socket] = []
    got: list[Any] = []
    try:
        jammed.bind(str(path))
        jammed.listen(0)
        for _ in range(3):  # fill its backlog: a further connect would wait
            q = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            q.setblocking(False)
            queued.append(q)
            with contextlib.suppress(BlockingIOError):
                q.connect(str(path))

        def start() -> None:
            try:
                got.append(bind(path))
            except BaseException as exc:  # noqa: BLE001 - reported below
                got.append(exc)

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "bind waited for a listener that never answers"
    finally:
        for q in queued:
            q.close()
        jammed.close()
    assert len(got) == 1
    assert isinstance(got[0], socket.socket)
    got[0].close()


# -- serve: the listening loop ---------------------------------------------------------------


def test_serve_answers_until_stopped_then_frees_the_place(
        place: Path, refreshers: list[FakeRefresher], held: dict[str, int]) -> None:
    agent, store = unlocked(place, refreshers)
    with serving(agent):
        assert ask(agent.path, req("ping")) == {"v": 1, "ok": True, "result": "pong"}
        assert agent.path.stat().st_mode & 0o777 == 0o600
    assert not agent.path.exists()
    assert held == {}
    assert store.closed
    assert agent.store is None
    # The place is free: the next agent serves there.
    again, _ = unlocked(place, refreshers)
    with serving(again):
        assert ask(again.path, req("ping"))["result"] == "pong"


def test_an_agent_never_unlocked_answers_locked_and_stops_cleanly(
        place: Path, refreshers: list[FakeRefresher], held: dict[str, int]) -> None:
    agent = make_agent(place)
    with serving(agent):
        answer = ask(agent.path, req("get", service="a", username="b"))
        assert answer["error"]["reason"] == "agent-locked"
        assert ask(agent.path, req("status"))["result"]["state"] == "locked"
    assert refreshers == []
    assert held == {}


def test_a_shared_agent_serves_from_a_passable_folder(
        place: Path, refreshers: list[FakeRefresher], held: dict[str, int]) -> None:
    config = place / "config.toml"
    config.write_text('agent_allow_users = ["nobody"]\n')
    config.chmod(0o600)
    os.chmod(place, 0o711)
    agent, _ = unlocked(place, refreshers)
    with serving(agent):
        assert agent.path.stat().st_mode & 0o777 == 0o666
        assert ask(agent.path, req("ping"))["result"] == "pong"
    os.chmod(place, 0o700)
    config.write_text('agent_allow_groups = ["nogroup"]\n')
    os.chmod(place, 0o711)
    again, _ = unlocked(place, refreshers)
    with serving(again):
        assert again.path.stat().st_mode & 0o777 == 0o666
    os.chmod(place, 0o700)


def test_a_private_agent_socket_is_the_users_alone_whatever_the_config(
        place: Path, refreshers: list[FakeRefresher], held: dict[str, int]) -> None:
    config = place / "config.toml"
    config.write_text("agent_trust_declared_actor = true\n")
    config.chmod(0o600)
    agent, _ = unlocked(place, refreshers)
    with serving(agent):
        assert agent.path.stat().st_mode & 0o777 == 0o600


def test_the_agents_threads_are_named_and_never_hold_the_process(
        place: Path, refreshers: list[FakeRefresher], held: dict[str, int]) -> None:
    agent, _ = unlocked(place, refreshers)
    before = set(threading.enumerate())
    with serving(agent, daemon=False) as server, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(agent.path))
        send_frame(conn, req("ping"))
        assert recv_frame(conn)["result"] == "pong"
        started = set(threading.enumerate()) - before - {server}
        assert "agent-watchdog" in {t.name for t in started}
        assert len(started) >= 2  # the watchdog and the held connection's thread
        assert all(t.daemon for t in started)


class FlakyListener:
    """The agent's listener, but its first accepts fail as a busy system's may."""

    def __init__(self, real: socket.socket, failures: list[BaseException]) -> None:
        self.real = real
        self.failures = failures

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            raise self.failures.pop(0)
        return self.real.accept()

    def close(self) -> None:
        self.real.close()


def test_serve_keeps_serving_through_timeouts_and_failed_accepts(
        place: Path, refreshers: list[FakeRefresher], held: dict[str, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    real_bind = bind
    failures: list[BaseException] = [TimeoutError(), OSError(errno.EMFILE, "no descriptors"),
                                      TimeoutError()]
    monkeypatch.setattr(agent_mod, "bind",
                        lambda path, shared=False: FlakyListener(real_bind(path, shared),
                                                                 failures))
    agent, _ = unlocked(place, refreshers)
    monkeypatch.setattr(agent_mod, "time", clock)
    with serving(agent):
        assert ask(agent.path, req("ping"))["result"] == "pong"
        assert failures == []
    assert len(clock.slept) == 1


def test_connections_past_the_cap_are_closed_at_once(
        place: Path, refreshers: list[FakeRefresher], held: dict[str, int]) -> None:
    agent, _ = unlocked(place, refreshers)
    agent._slots = threading.BoundedSemaphore(1)
    with serving(agent):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.settimeout(10)
            first.connect(str(agent.path))
            send_frame(first, req("ping"))
            assert recv_frame(first)["result"] == "pong"  # it holds the only slot
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second:
                second.settimeout(10)
                second.connect(str(agent.path))
                with contextlib.suppress(OSError):
                    send_frame(second, req("ping"))
                with contextlib.suppress(ConnectionResetError):
                    assert second.recv(10) == b""  # closed, not kept waiting
        # The slot is back: the agent serves again.
        for _ in range(100):
            try:
                assert ask(agent.path, req("ping"))["result"] == "pong"
                break
            except (AssertionError, OSError, TypeError):
                threading.Event().wait(0.1)
        else:
            raise AssertionError("the agent never served again")


def test_an_agent_whose_socket_cannot_be_removed_still_frees_and_locks(
        place: Path, refreshers: list[FakeRefresher], held: dict[str, int]) -> None:
    class Stubborn(PosixPath):
        def unlink(self, missing_ok: bool = False) -> None:
            raise PermissionError(errno.EACCES, "read-only")

    agent, store = unlocked(place, refreshers)
    agent.path = Stubborn(place / "agent.sock")
    with serving(agent):
        assert ask(agent.path, req("ping"))["result"] == "pong"
    assert held == {}
    assert store.closed
    os.unlink(place / "agent.sock")


def test_the_watchdog_of_a_serving_agent_ends_it(place: Path, refreshers: list[FakeRefresher],
                                                 held: dict[str, int]) -> None:
    agent, store = unlocked(place, refreshers, lifetime=0.0)
    ready = threading.Event()
    thread = threading.Thread(target=agent.serve, args=(ready.set,), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        assert agent._stop.wait(20), "the lifetime was never enforced"
    finally:
        agent.stop()
        thread.join(10)
        _poke(agent.path)
        thread.join(10)
    assert not thread.is_alive()
    assert store.closed


# -- run: harden, unlock, serve ---------------------------------------------------------------


def test_run_hardens_unlocks_and_serves_until_stopped(
        place: Path, refreshers: list[FakeRefresher], held: dict[str, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[Any] = []
    clock = Clock(500.0)
    monkeypatch.setattr(agent_mod, "time", clock)
    monkeypatch.setattr(agent_mod, "harden_process", lambda: events.append("harden"))
    store = FakeStore()

    def opener(passphrase: str | None) -> FakeStore:
        events.append(("open", passphrase))
        return store

    path = place / "agent.sock"
    ready = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agent_mod.run(
        Location.resolve(place), path, 7.0, 90.0, opener, ready.set)), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "run never said it was ready"
        status = ask(path, req("status"))["result"]
        assert status == {"state": "unlocked", "pid": os.getpid(), "socket": str(path),
                          "home": str(Location.resolve(place).home), "served": 0,
                          "idle_left": 7.0, "lifetime_left": 90.0}
        assert ask(path, req("stop"))["ok"] is True
        thread.join(15)
    finally:
        if thread.is_alive():
            _poke(path)
            thread.join(10)
    assert result == [0]
    assert events == ["harden", ("open", None)]
    assert store.closed


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_run_refuses_without_linux_peer_credentials(
        place: Path, platform: str, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(sys, "platform", platform)
    if platform == "linux":
        monkeypatch.delattr(socket, "SO_PEERCRED")
    monkeypatch.setattr(agent_mod, "harden_process", lambda: events.append("harden"))
    with pytest.raises(ConfigError, match="SO_PEERCRED"):
        agent_mod.run(Location.resolve(place), place / "agent.sock", 60.0, None,
                      lambda _p: events.append("open"))
    assert events == []  # refused before the process is changed or the vault opened


# -- a real vault behind a serving agent ------------------------------------------------------


def test_a_real_vault_through_the_agent_shows_the_secret_only_to_a_read(
        home: Path, held: dict[str, int]) -> None:
    with Store.init(home) as s:
        s.set("db", "app", CANARY)
    path = home / "agent.sock"
    agent = Agent(Location.resolve(home), path, lambda _p: Store.open(home),
                  idle_timeout=600, max_lifetime=None)
    agent.unlock(None)
    with serving(agent):
        got = ask(path, req("get", service="db", username="app"))
        assert got == {"v": 1, "ok": True, "result": CANARY}
        for doc in (req("history", service="db", username="app"), req("list"),
                    req("get", service="db", username="nope"), req("status")):
            assert CANARY not in json.dumps(ask(path, doc))
        refused = ask(path, req("frobnicate"))
        assert refused["error"]["kind"] == "usage"
    assert agent.store is None
