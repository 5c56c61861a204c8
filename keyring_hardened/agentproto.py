"""The unlock agent's protocol, and the client every surface uses to reach it.

Frames over a Unix stream socket: a 4-byte big-endian length, then that many
bytes of UTF-8 JSON, at most :data:`MAX_FRAME`. A request is an object
``{"v": 1, "op": OP, ...arguments}``; the answer is ``{"v": 1, "ok": true,
"result": ...}`` or ``{"v": 1, "ok": false, "error": {"kind", "code",
"reason", "message", "retry_after"}}``, which the client raises as the same
:class:`~keyring_hardened.errors.HardenedError` subclass direct mode would
(same exit code, same keyring exception through the backend).

Requests carry names and values, never key material. The agent learns who
asks from the kernel (``SO_PEERCRED``), not from the request; a request may
carry ``declared``, the caller's ``KEYRING_HARDENED_ACTOR``, which is
recorded beside the verified identity (see docs/agent.md).

:func:`connect` is what the keyring backend, the CLI's credential commands
and the Ansible plugins call before opening the vault themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from . import errors
from .errors import HardenedError, LockedError, StorageError
from .location import ENV_ACTOR, Location
from .secret import Secret

__all__ = ["ENV_AGENT_SOCK", "MAX_FRAME", "PEERCRED", "VERSION", "AgentStore", "connect",
           "recv_frame",
           "send_frame", "socket_path"]

#: Overrides ``<home>/agent.sock``.
ENV_AGENT_SOCK = "KEYRING_HARDENED_AGENT_SOCK"
log = logging.getLogger("keyring_hardened")
VERSION = 1
#: A request or an answer is at most this long: a secret (1 MiB) plus names, as JSON.
MAX_FRAME = 8 << 20
_LEN = struct.Struct(">I")
#: ``SO_PEERCRED``'s struct ucred, read by the client and the agent alike:
#: pid_t (signed), uid_t and gid_t (unsigned: a uid of 2**31 or more must not
#: read as negative and refuse the caller's own agent).
PEERCRED = struct.Struct("iII")

#: The error classes by their ``kind``, to raise what the agent raised.
_KINDS: dict[str, type[HardenedError]] = {
    cls.kind: cls for cls in (errors.NotFoundError, errors.UsageError, errors.ConfigError,
                              errors.IntegrityError, errors.DeniedError, errors.LockedError,
                              errors.ExpiredError, errors.StorageError)}


def socket_path(location: Location) -> Path:
    """Where the agent of this vault listens: ``KEYRING_HARDENED_AGENT_SOCK``, else the home's."""
    override = os.environ.get(ENV_AGENT_SOCK)
    return Path(override).expanduser() if override else location.home / "agent.sock"


def send_frame(sock: socket.socket, doc: Any) -> None:
    """Send one frame."""
    # ASCII escapes: a lone surrogate in a name travels as \ud800 and is refused
    # by the agent as bad input, as direct mode refuses it, not lost in transit.
    data = json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if len(data) > MAX_FRAME:
        raise errors.UsageError("the request is too large for the agent")
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("frame too slow")
            sock.settimeout(left)
        chunk = sock.recv(min(n - got, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, body_timeout: float | None = None) -> Any:
    """Receive one frame; None when the peer closed the connection before one began.

    ``body_timeout``: once the length has arrived, the whole rest must
    arrive within this many seconds (a slow sender is cut off). Raises
    ValueError on a malformed frame (too long, not UTF-8 JSON, too deep,
    cut short) and TimeoutError on a slow one.
    """
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError("frame too long")
    deadline = None if body_timeout is None else time.monotonic() + body_timeout
    body = _recv_exact(sock, n, deadline)
    if body is None:
        raise ValueError("frame cut short")
    try:
        return json.loads(body.decode("utf-8"))
    except (RecursionError, UnicodeDecodeError) as exc:
        raise ValueError("malformed frame") from exc


def raise_error(doc: Any) -> None:
    """Raise the error an answer carries, as the class direct mode raises."""
    if not isinstance(doc, dict):
        raise StorageError("the agent answered with a malformed error", "agent-protocol")
    kind, message = doc.get("kind"), doc.get("message")
    text = message if isinstance(message, str) else "the agent refused the request"
    reason = doc.get("reason") if isinstance(doc.get("reason"), str) else None
    if kind == "rate-limited":
        wait = doc.get("retry_after")
        raise errors.RateLimitedError(text, float(wait) if isinstance(wait, int | float)
                                      else 1.0, reason)
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    raise (cls or StorageError)(text, reason)


class AgentStore:
    """The credential operations of a vault, performed by its agent.

    The same methods and answers as :class:`~keyring_hardened.store.Store`
    for what the agent serves (get, set, delete, credentials, usernames,
    history, rollback); it holds no key. One connection, reused, one
    request at a time; a broken connection is made again once.
    """

    def __init__(self, path: Path, location: Location, declared: str | None = None) -> None:
        self.path = path
        self.location = location
        #: The actor this caller declares (recorded beside the verified one).
        self.declared = declared if declared is not None else os.environ.get(ENV_ACTOR)
        self.notices: list[str] = []
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"AgentStore(socket={str(self.path)!r})"

    def __enter__(self) -> AgentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the agent keeps running)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_TIMEOUT)
        try:
            sock.connect(str(self.path))
            _check_server(sock, self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, op: str, **args: Any) -> Any:
        """Send one request and return its result, or raise its error."""
        doc = {"v": VERSION, "op": op, **args}
        if self.declared:
            doc["declared"] = self.declared
        with self._lock:
            if os.getpid() != self._pid:  # after fork: the parent's connection is not ours
                self._sock, self._pid = None, os.getpid()
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    # An agent that refuses a caller says why and closes at once, maybe
                    # before this request went out: its answer may be waiting all the same.
                    with contextlib.suppress(OSError):
                        send_frame(self._sock, doc)
                    answer = recv_frame(self._sock)
                    if answer is None:
                        raise ConnectionResetError("the agent closed the connection")
                    break
                except (OSError, ValueError) as exc:
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                    if attempt == 2 or isinstance(exc, ValueError | TimeoutError):
                        raise LockedError(f"the agent at {self.path} did not answer ({_why(exc)})"
                                          f"; is it running? start it: keyring-hardened agent "
                                          "start", "agent-down") from None
        if not isinstance(answer, dict) or answer.get("v") != VERSION:
            raise StorageError("the agent answered in an unknown protocol version",
                               "agent-protocol")
        if not answer.get("ok"):
            raise_error(answer.get("error"))
        said = answer.get("notices")
        if isinstance(said, list):
            # Shown on stderr by the CLI like a local store's notices; bounded,
            # and printable text only, so an answer cannot flood or spoof a terminal.
            for notice in said[:_NOTICES_MAX]:
                if isinstance(notice, str) and notice.isprintable():
                    # As a local store's notice: the CLI prints the list, an app
                    # hears it through logging; only the latest are kept.
                    self.notices.append(notice[:_NOTICE_MAX])
                    log.warning("%s", notice[:_NOTICE_MAX])
            del self.notices[:-_NOTICES_MAX]
        return answer.get("result")

    # -- the credential operations, as Store has them ---------------------------------

    def get(self, service: str, username: str, *, version: int | None = None) -> Secret:
        """The current secret (or ``version``); NotFoundError if absent."""
        value = self.request("get", service=service, username=username, version=version)
        if not isinstance(value, str):
            raise StorageError("the agent answered get without a value", "agent-protocol")
        return Secret(value)

    def set(self, service: str, username: str, secret: str | Secret, *,
            ttl: float | None = None) -> int:
        """Store a new version; returns its number."""
        value = secret.reveal() if isinstance(secret, Secret) else secret
        return int(self.request("set", service=service, username=username, secret=value,
                                ttl=ttl))

    def delete(self, service: str, username: str, *, purge: bool = False) -> None:
        """Delete a credential (``purge``: every kept version too)."""
        self.request("delete", service=service, username=username, purge=purge)

    def rollback(self, service: str, username: str, *, to_version: int | None = None,
                 allow_expired: bool = False) -> int:
        """Restore a kept version as a new version; returns its number."""
        return int(self.request("rollback", service=service, username=username,
                                to_version=to_version, allow_expired=allow_expired))

    def usernames(self, service: str) -> list[str]:
        """The usernames of a service, most recently updated first."""
        return [str(u) for u in self.request("usernames", service=service)]

    def credentials(self) -> list[Any]:
        """Every live credential the caller may see (names and versions only)."""
        from .store import CredentialInfo

        return [CredentialInfo(*row) for row in self.request("list")]

    def history(self, service: str, username: str) -> list[Any]:
        """Kept versions of a credential, newest first (no values)."""
        from .store import VersionInfo

        return [VersionInfo(*row) for row in self.request("history", service=service,
                                                          username=username)]


_TIMEOUT = 60.0
#: At most this many notices per answer, each at most this long.
_NOTICES_MAX = 20
_NOTICE_MAX = 1000


def _check_server(sock: socket.socket, path: Path) -> None:
    """Refuse an agent this caller has no reason to trust, before sending it anything.

    Secrets go to the agent (set) and come from it (get): whoever answers
    must be this user, or the owner of both the socket and its folder, a
    folder nobody else can write (the shared service account's). Anyone who
    could plant a socket there could otherwise collect and forge secrets.
    """
    if not hasattr(socket, "SO_PEERCRED"):  # pragma: no cover - the agent is Linux only
        raise LockedError("this platform cannot check who answers on the agent socket",
                          "agent-untrusted")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
    _pid, uid, _gid = PEERCRED.unpack(raw)
    if uid == os.getuid():
        return
    try:
        sock_st, folder_st = os.lstat(path), os.stat(path.parent)
        trusted = sock_st.st_uid == folder_st.st_uid == uid and not folder_st.st_mode & 0o022
    except OSError:
        trusted = False
    if not trusted:
        raise LockedError(f"the agent at {path} runs as uid {uid}, which owns neither the "
                          "socket nor a folder closed to others; not trusted (planted?)",
                          "agent-untrusted")


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def connect(location: Location, declared: str | None = None) -> AgentStore | None:
    """The vault's agent, if one serves it; None to open the vault directly.

    No socket: None (direct mode). A socket nobody answers on (an agent
    killed with -9): None in key-file mode, where this process can open the
    vault itself; otherwise :class:`LockedError` (exit 6) naming the socket
    and how to start the agent, since the passphrase is not at hand here.
    """
    path = socket_path(location)
    if not os.environ.get(ENV_AGENT_SOCK):
        # <home>/agent.sock is trusted only as far as the home is: the same
        # checks as direct mode, before anything is sent there.
        location.check_home()
    try:
        found = path.is_socket()
    except OSError:
        found = False
    if not found:
        if os.environ.get(ENV_AGENT_SOCK):
            # Asked for by name: not finding it is an error, not a reason to go direct.
            raise LockedError(f"no agent socket at {path} ({ENV_AGENT_SOCK}); start the agent "
                              "or unset the variable", "agent-down")
        return None
    store = AgentStore(path, location, declared)
    try:
        store.request("ping")
    except BaseException as exc:
        store.close()  # whatever the answer, this connection is not handed out
        if not isinstance(exc, LockedError) or exc.reason != "agent-down":
            raise  # a locked agent answers: its refusal is the answer
        try:
            key_file_mode = location.key_file.exists()
        except OSError:  # not ours to read: not a vault this process could open itself
            key_file_mode = False
        if key_file_mode:
            return None  # key-file mode: this process can unlock the vault itself
        raise LockedError(f"the agent at {path} is not running; start it: keyring-hardened "
                          "agent start", "agent-down") from None
    return store
