"""The unlock agent: one unlock per login session, credential operations for verified callers.

The agent opens (unlocks) the vault once and serves the credential
operations over a Unix socket (protocol: :mod:`keyring_hardened.agentproto`).
It identifies each caller from the kernel (``SO_PEERCRED``: uid, gid, pid;
the program from ``/proc/<pid>/exe`` and its script argument), refuses
callers of another uid unless the config allows them, and runs each
request through the same door as direct mode (seal, policies, rate limits,
audit) with that verified identity. No key material ever leaves it; its
memory is kept from core dumps and from other processes of the same user
(``PR_SET_DUMPABLE`` 0).

Linux only: without peer credentials the agent refuses to start.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from . import agentproto
from .errors import ConfigError, DeniedError, HardenedError, LockedError, UsageError
from .location import Location, validate_actor
from .refresh import BackgroundRefresh, start_background

__all__ = ["Agent", "Peer", "harden_process", "identify", "program_of"]

#: Seconds a started request frame may take to arrive in full.
READ_TIMEOUT = 10.0
#: Seconds a connection may stay idle between requests.
CONNECTION_IDLE = 300.0
#: Connections served at once; more are closed at once (the limit of open files
#: and threads must not be reachable by holding connections open).
MAX_CONNECTIONS = 64
#: SO_PEERGROUPS (Linux 4.13): the supplementary groups of the connecting process.
_SO_PEERGROUPS = 59
_OPS = ("get", "set", "delete", "rollback", "usernames", "list", "history")
#: Lock files this process holds while it serves, by socket path (one agent per socket).
_HELD: dict[str, int] = {}


class Peer(NamedTuple):
    """A caller as the kernel names it."""

    pid: int
    uid: int
    gid: int
    #: The process's supplementary groups, as it holds them (not /etc/group's list).
    groups: tuple[int, ...] = ()


def peer_of(conn: socket.socket) -> Peer:
    """The connecting process's pid, uid, gid and groups (``SO_PEERCRED``, ``SO_PEERGROUPS``)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, agentproto.PEERCRED.size)
    pid, uid, gid = agentproto.PEERCRED.unpack(raw)
    try:
        data = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
        groups = struct.unpack(f"{len(data) // 4}I", data[:len(data) // 4 * 4])
    except OSError:  # an older kernel: only the primary group counts
        groups = ()
    return Peer(pid, uid, gid, tuple(groups))


def program_of(exe: str, argv: list[str]) -> str:
    """A caller's program, as ``user:program`` names it: the script for an interpreter.

    ``/usr/bin/python3 /home/a/bin/keyring get`` is ``keyring``; ``python -m
    pkg`` is ``pkg``; ``python -c ...`` is ``python3.11 -c``; anything else
    is the executable's name.
    """
    name = os.path.basename(exe) or "?"
    if not name.startswith(("python", "pypy")):
        return name
    args = argv[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--" or not arg.startswith("-") or arg == "-":
            script = args[i] if arg == "--" and i < len(args) else arg
            return os.path.basename(script) if script not in ("", "-", "--") else name
        if arg.startswith("--"):
            continue  # --version and the like take no value
        # A cluster of short options, read as Python reads it: "-Ic CODE",
        # "-cCODE", "-Wdefault", "-mpkg". c and m end the options.
        for k, flag in enumerate(arg[1:], start=2):
            if flag == "c":
                return f"{name} -c"
            if flag == "m":
                rest = arg[k:]
                return rest or (args[i] if i < len(args) else name)
            if flag in "WX":
                if not arg[k:]:
                    i += 1  # the value is the next argument
                break
    return name


def identify(peer: Peer) -> str:
    """The verified actor of a caller: ``user:program`` from the kernel's answers."""
    try:
        import pwd

        user = pwd.getpwuid(peer.uid).pw_name
    except (ImportError, KeyError):
        user = f"uid{peer.uid}"
    try:
        exe = os.readlink(f"/proc/{peer.pid}/exe")
        with open(f"/proc/{peer.pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        exe, argv = "?", []
    text = f"{user}:{program_of(exe, argv)}"
    shown = "".join(c if c.isprintable() else "?" for c in text)[:200]
    return validate_actor(shown or "?")


def harden_process() -> None:
    """No core dumps, and no ptrace or /proc/<pid>/mem reads by the user's other processes."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_dumpable = 4
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


class Agent:
    """A running agent: the unlocked store, the socket, the counters."""

    def __init__(self, location: Location, path: Path, opener: Callable[[str | None], Any],
                 idle_timeout: float, max_lifetime: float | None) -> None:
        self.location = location
        self.path = path
        self._open = opener
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.started = time.monotonic()
        self.last = self.started
        self.served = 0
        self.store: Any = None
        #: The background refresh of the unlocked store (refresh.py), if unlocked:
        #: a pass every ``[refresh] interval``, and at once when a read finds a
        #: credential inside its refresh-ahead window.
        self._refresher: BackgroundRefresh | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._uid = os.getuid()
        #: Connections served at once, at most.
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    # -- state ------------------------------------------------------------------------

    def unlock(self, passphrase: str | None) -> None:
        """Open the vault (again): the key file, or ``passphrase`` / the usual sources."""
        with self._lock:
            if self.store is None:
                store = self._open(passphrase)
                # Due credentials are refreshed while the agent holds the vault
                # (refresh ahead, and expired ones with a refresher), so callers
                # find them fresh; the thread's events name the agent itself.
                self._refresher = start_background(store, store.config.refresh_interval)
                self.store = store

    def lock(self) -> None:
        """Close the vault and wipe its keys; requests are refused (exit 6) until unlock."""
        with self._lock:
            if self._refresher is not None:
                # Told to stop, not waited for: a refresher it runs may take up
                # to refresh_timeout, and the keys are wiped now. Its write then
                # finds the store closed and is dropped; its lease expires.
                self._refresher.stop(timeout=0)
                self._refresher = None
            if self.store is not None:
                self.store.close()
                self.store = None

    def status(self) -> dict[str, Any]:
        """What ``agent status`` shows."""
        now = time.monotonic()
        return {"state": "unlocked" if self.store is not None else "locked",
                "pid": os.getpid(), "socket": str(self.path),
                "home": str(self.location.home), "served": self.served,
                "idle_left": max(0.0, self.idle_timeout - (now - self.last))
                if self.store is not None else None,
                "lifetime_left": None if self.max_lifetime is None
                else max(0.0, self.max_lifetime - (now - self.started))}

    # -- serving ----------------------------------------------------------------------

    def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Listen until ``stop``: one thread per connection, a watchdog for the timeouts."""
        cfg = self._config()
        shared = cfg is not None and bool(cfg.agent_allow_users or cfg.agent_allow_groups)
        listener = bind(self.path, shared)
        self._listener = listener
        watchdog = threading.Thread(target=self._watch, name="agent-watchdog", daemon=True)
        watchdog.start()
        if ready is not None:
            ready()
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    time.sleep(0.1)  # out of descriptors, say: back off, keep serving
                    continue
                if not self._slots.acquire(blocking=False):
                    conn.close()  # at the cap: held connections must not starve the agent
                    continue
                try:
                    threading.Thread(target=self._connection, args=(conn,), daemon=True).start()
                except RuntimeError:  # no thread to be had
                    self._slots.release()
                    conn.close()
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                if self.path.is_socket():
                    self.path.unlink()
            held = _HELD.pop(str(self.path), None)
            if held is not None:
                os.close(held)  # the place is free for the next start
            self.lock()

    def stop(self) -> None:
        """Stop serving (the main loop notices within a second)."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            if self.max_lifetime is not None and now - self.started > self.max_lifetime:
                self.stop()
            elif self.store is not None and now - self.last > self.idle_timeout:
                self.lock()

    def _allowed(self, peer: Peer) -> bool:
        """The agent's own uid, or a user or group the config allows (shared service account)."""
        if peer.uid == self._uid:
            return True
        cfg = self._config()
        if cfg is None or not (cfg.agent_allow_users or cfg.agent_allow_groups):
            return False
        import grp
        import pwd

        try:
            name = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            name = None
        if peer.uid in cfg.agent_allow_users or (name and name in cfg.agent_allow_users):
            return True
        gids = {peer.gid} | set(peer.groups)
        for group in cfg.agent_allow_groups:
            try:
                gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
            except KeyError:
                continue
            if gid in gids:
                return True
        return False

    def _config(self) -> Any:
        from .config import load_config

        try:
            return load_config(self.location.config_file, self.location.config_required)
        except HardenedError:
            return None

    def _connection(self, conn: socket.socket) -> None:
        try:
            self._serve_one(conn)
        finally:
            self._slots.release()

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            try:
                peer = peer_of(conn)
            except OSError:
                return
            if not self._allowed(peer):
                # Told why, then dropped: a refusal is no secret, and it saves a guess.
                with contextlib.suppress(OSError):
                    conn.settimeout(1.0)
                    agentproto.send_frame(conn, _error(LockedError(
                        f"uid {peer.uid} may not use this agent (agent_allow_users)",
                        "agent-peer")))
                return
            actor = identify(peer)
            own = peer.uid == self._uid
            while not self._stop.is_set():
                conn.settimeout(CONNECTION_IDLE)
                try:
                    request = agentproto.recv_frame(conn, READ_TIMEOUT)
                except Exception:  # noqa: BLE001 - any bad frame: drop the connection, quietly
                    return  # slow, cut short, too long, too deep or not JSON
                if request is None:
                    return
                answer = self._answer(request, actor, own)
                try:
                    conn.settimeout(READ_TIMEOUT)
                    agentproto.send_frame(conn, answer)
                except (OSError, HardenedError):
                    return
                if request.get("op") == "stop" if isinstance(request, dict) else False:
                    return

    def _answer(self, request: Any, actor: str, own: bool = True) -> dict[str, Any]:
        """One request's answer; never raises (a bug is an internal error answer)."""
        try:
            version = request.get("v") if isinstance(request, dict) else None
            if type(version) is not int or version != agentproto.VERSION:
                raise UsageError("unknown protocol version (expected v 1)", "agent-protocol")
            notices: list[str] = []
            answer = {"v": agentproto.VERSION, "ok": True,
                      "result": self._perform(request, actor, own, notices)}
            if notices:
                # What the caller's CLI prints on stderr (a failing refresher, say).
                answer["notices"] = notices
            return answer
        except HardenedError as exc:
            return _error(exc)
        except Exception as exc:  # noqa: BLE001 - the agent must keep serving
            return {"v": agentproto.VERSION, "ok": False, "error": {
                "kind": "internal", "code": 70, "reason": "agent-internal",
                "message": f"internal error in the agent ({type(exc).__name__})"}}

    def _perform(self, request: dict[str, Any], actor: str, own: bool,
                 notices: list[str]) -> Any:
        op = request.get("op")
        if op == "ping":
            return "pong"
        if op in ("status", "lock", "unlock", "stop") and not own:
            # Users the config allows may ask for credentials, not run the agent.
            raise DeniedError(f"only the agent's own user may {op} it", "agent-control")
        if op == "status":
            return self.status()
        if op == "lock":
            self.lock()
            return None
        if op == "unlock":
            secret = request.get("passphrase")
            self.unlock(secret if isinstance(secret, str) else None)
            return None
        if op == "stop":
            self.stop()
            return None
        if op not in _OPS:
            raise UsageError(f"unknown operation {str(op)[:20]!r}", "agent-protocol")
        declared = request.get("declared")
        declared = declared[:120] if isinstance(declared, str) and declared.isprintable() \
            else None
        with self._lock:
            store = self.store
            if store is None:
                raise LockedError("the agent is locked; unlock it: keyring-hardened agent "
                                  "unlock", "agent-locked")
            self.last = time.monotonic()
            self.served += 1
        trust = store.config.agent_trust_declared_actor
        policy = declared if trust and declared else actor
        label = f"{actor} (declared {declared})" if declared else actor
        # Outside the agent's lock: the store serialises its own transactions,
        # and a read that waits for a refresher (up to refresh_timeout) must
        # not hold up the other callers. The label is this thread's only
        # (Session.acting): other callers and the background refresh write
        # under their own names at the same time.
        try:
            with store.acting(validate_actor(label[:256]), policy) as said:
                result = _call(store, op, request)
            notices.extend(said)
            return result
        except LockedError as exc:
            if exc.reason != "root-replaced":
                raise
            # A rekey elsewhere revoked the key this agent holds (passphrase
            # mode cannot re-read it): lock, and say how to go on.
            self.lock()
            raise LockedError("the vault was rekeyed after the agent unlocked it; unlock "
                              "it again: keyring-hardened agent unlock",
                              "agent-locked") from None
        except UsageError:
            if store is not self.store:
                # Locked (idle timeout, `agent lock`) while this request ran.
                raise LockedError("the agent was locked during the request; unlock it: "
                                  "keyring-hardened agent unlock", "agent-locked") from None
            raise


def _text(request: dict[str, Any], key: str) -> Any:
    value = request.get(key)
    if not isinstance(value, str):
        raise UsageError(f"{key} must be a string", "agent-protocol")
    return value


def _call(store: Any, op: str, request: dict[str, Any]) -> Any:
    """Perform one credential operation on the store; the answer as JSON values."""
    if op == "list":
        return [list(c) for c in store.credentials()]
    service = _text(request, "service")
    if op == "usernames":
        return store.usernames(service)
    username = _text(request, "username")
    if op == "get":
        return store.get(service, username, version=request.get("version")).reveal()
    if op == "set":
        return store.set(service, username, _text(request, "secret"), ttl=request.get("ttl"))
    if op == "delete":
        store.delete(service, username, purge=request.get("purge") is True)
        return None
    if op == "rollback":
        return store.rollback(service, username, to_version=request.get("to_version"),
                              allow_expired=request.get("allow_expired") is True)
    return [list(v) for v in store.history(service, username)]


def _error(exc: HardenedError) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": exc.kind, "code": exc.exit_code, "reason": exc.reason,
                           "message": str(exc)}
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        doc["retry_after"] = retry
    return {"v": agentproto.VERSION, "ok": False, "error": doc}


def bind(path: Path, shared: bool = False) -> socket.socket:
    """Listen at ``path``: 0600, in a folder that is the user's and closed to others.

    ``shared`` (the config allows other users): the socket is 0666 and its
    folder may be 0711, so that they can connect at all; who is served is
    then decided by the peer check alone. A stale socket (nobody answers)
    is replaced; a live agent there is a refusal (exit 2). Anything else at
    the path is left alone (exit 2).
    """
    if not hasattr(socket, "SO_PEERCRED"):
        raise ConfigError("the agent needs peer credentials (SO_PEERCRED), which this "
                          "platform does not have; use direct mode")
    folder = path.parent
    st = folder.stat()
    closed = 0o066 if shared else 0o077
    if st.st_uid != os.getuid() or st.st_mode & closed:
        want = "711" if shared else "700"
        raise ConfigError(f"the agent's socket folder {folder} must be yours and closed to "
                          f"others (chmod {want} {folder})")
    # One agent per socket: the lock is taken before the probe below and held
    # for the agent's life, so two starts can never both replace a stale socket.
    import fcntl

    lock_fd = os.open(path.with_name(path.name + ".lock"),
                      os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        raise UsageError(f"an agent is starting or already serves this vault at {path}",
                         "agent-running") from None
    try:
        if os.path.lexists(path):
            if not path.is_socket() or path.lstat().st_uid != os.getuid():
                raise ConfigError(f"{path} exists and is not this user's agent socket; "
                                  "remove it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(2.0)
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale: left by an agent that was killed
            else:
                raise UsageError(f"an agent already serves this vault at {path}; stop it first "
                                 "(keyring-hardened agent stop)", "agent-running")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is made 0600 at bind, never wider for a moment
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o666 if shared else 0o600)
    except BaseException:
        os.close(lock_fd)  # a start that failed leaves the place free for the next
        raise
    _HELD[str(path)] = lock_fd
    listener.listen(64)
    listener.settimeout(1.0)
    return listener


def run(location: Location, path: Path, idle_timeout: float, max_lifetime: float | None,
        opener: Callable[[str | None], Any], ready: Callable[[], None] | None = None) -> int:
    """Harden this process, unlock, serve until stopped; returns the exit code."""
    if sys.platform != "linux" or not hasattr(socket, "SO_PEERCRED"):
        raise ConfigError("the agent needs Linux peer credentials (SO_PEERCRED); this platform "
                          "has none, so callers could not be identified: use direct mode")
    harden_process()
    agent = Agent(location, path, opener, idle_timeout, max_lifetime)
    agent.unlock(None)
    agent.serve(ready)
    return 0
