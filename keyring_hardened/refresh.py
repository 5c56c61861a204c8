"""TTL auto-refresh: refreshers, single flight across processes, refresh ahead, background.

A credential may carry a *refresher*: a command (argv, no shell) or a Python
callable registered in the entry-point group ``keyring_hardened.refreshers``.
When a read finds the current version expired (or inside its
``refresh-ahead`` window), the refresher makes the next value, which is
stored as a new version and audited as ``refresh``.

Where things live, and why:

* The refresher's *spec* (the command line, or the plugin name and its
  argument) may hold tokens, so it is sealed like a secret value: a fresh
  data key under the active KEK, bound to the vault, service and username
  (version slot 0, which no secret value uses). Only its *kind* is ever
  shown (``list``, ``status``, the trail).
* The spec, the ``refresh-ahead`` window and the last failure live in one
  small blob on the credential's head row (:class:`RefreshState`). The
  head's leaf of the state tree covers it (``state.head_leaf``'s ``extra``),
  so the state root pins it: editing, deleting or writing back an older
  blob is an integrity failure (exit 3), like any other row.
* The *lease* that elects one runner among many processes is a row of its
  own (``refresh_leases``: holder, random token, base version, expiry). It
  is deliberately **not** trusted: it only decides who runs the refresher.
  Whatever it says, a value is written only by the process whose token is
  still in the lease, only onto the version the refresh started from, in a
  transaction that checks the state root like any other write. A planted
  or edited lease can at worst delay a refresh by one lease period (an
  expiry further out than that is ignored) or make a second run happen; it
  cannot make the store accept a value it did not get from the refresher.

The refresher never runs inside a write transaction: it may take up to
``refresh_timeout`` (30 s by default), and a write transaction blocks every
other writer of the vault. So a refresh is: take the lease (one short
transaction, not audited), check and start (one audited ``refresh`` event,
which also passes the access-control door as a *write*), run the
refresher with no transaction open, and write the new version (or the
failure) in one more audited transaction that checks the lease again.
Readers that find the lease held by a live runner wait for the new version
(polling cheap, unauthenticated hints; the value itself always comes from a
checked read), up to the lease's end; a runner killed mid-refresh leaves a
lease that expires, and the next reader takes over.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from . import envelope
from ._seams import crash_point
from .envelope import DecryptFailed, Place, Sealed
from .errors import (
    DeniedError,
    ExpiredError,
    HardenedError,
    IntegrityError,
    RateLimitedError,
    UsageError,
)
from .secret import Secret

if TYPE_CHECKING:
    from .operation import _Note
    from .port import HeadRow, Storage
    from .session import Session

__all__ = [
    "PLUGIN_GROUP",
    "BackgroundRefresh",
    "Outcome",
    "RefreshContext",
    "RefreshFailedError",
    "RefreshSpec",
    "RefreshState",
    "command_spec",
    "file_refresher",
    "generate_refresher",
    "lease_decision",
    "plugin_spec",
    "refresh_due",
    "refresh_one",
    "run_command",
    "start_background",
]

log = logging.getLogger("keyring_hardened")

#: The entry-point group Python refreshers register in.
PLUGIN_GROUP = "keyring_hardened.refreshers"
#: The version slot a spec is sealed in: secret values use versions 1 and up.
SPEC_SLOT = 0
#: A lease lasts the refresher's timeout plus this, for the two short transactions around it.
LEASE_GRACE = 2.0
#: How often a waiter looks for the new version (a cheap query, no transaction).
POLL_SECONDS = 0.005
#: The most a refresher may print (the secret size limit), and stderr kept for the summary.
OUTPUT_LIMIT = 1 << 20
_STDERR_KEPT = 4096
#: A failure summary is cut to this many characters.
SUMMARY_CHARS = 200
_FORMAT = 1
#: After a failed refresh, reads and ``refresh --due`` wait before the next
#: attempt: 5 s, doubling with each failure in a row, at most 5 min. A failing
#: refresher is not run again by every read (``refresh SERVICE USER`` is).
RETRY_BASE = 5.0
RETRY_MAX = 300.0
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
#: Variables a refresh command always gets from the caller, if set.
BASE_ENV = ("PATH", "HOME", "LANG")


class RefreshFailedError(ExpiredError):
    """A refresher failed (non-zero exit, timeout, empty or oversized output, an exception).

    ``reason`` is the short summary (exit code or "timed out", and the first
    line of stderr cut to 200 characters, with the spec's arguments redacted);
    never the output, never the secret.
    """


class RefreshSpec(NamedTuple):
    """What a refresher runs. A secret (it may hold tokens): its ``repr`` shows only the kind."""

    kind: str
    argv: tuple[str, ...] = ()
    name: str = ""
    argument: str | None = None

    def __repr__(self) -> str:
        return f"RefreshSpec(kind={self.kind!r}, ...)"

    def to_bytes(self) -> bytes:
        """The plaintext that is sealed."""
        doc: dict[str, Any] = {"kind": self.kind}
        if self.kind == "command":
            doc["argv"] = list(self.argv)
        else:
            doc["name"] = self.name
            doc["argument"] = self.argument
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> RefreshSpec:
        """Parse a decrypted spec (authenticated by its AEAD tag)."""
        doc = json.loads(data.decode("utf-8"))
        if doc["kind"] == "command":
            return cls("command", tuple(str(a) for a in doc["argv"]))
        arg = doc.get("argument")
        return cls("python", (), str(doc["name"]), None if arg is None else str(arg))

    def sensitive(self) -> list[str]:
        """Pieces of the spec that must never appear in a summary (tokens in arguments)."""
        found: list[str] = []
        for arg in [*self.argv[1:], *([self.argument] if self.argument else [])]:
            # The argument, its option values (--token=T, user:T), and any long
            # word inside it (a token inside an inline script): a stderr line
            # that repeats any of them loses it. Over-redaction is the safe side.
            found.append(arg)
            found.extend(p for p in re.split(r"[=:,]", arg) if len(p) >= 4)
            found.extend(_words(arg))
        return [p for p in found if len(p) >= 4]


#: What splits an argument or an output into the words redacted on their own:
#: blanks, quotes, brackets, and the separators of options and URLs (a token
#: is often a URL's path segment, query value or user part).
_WORD_SPLIT = re.compile(r"[\s=:,;'\"()\[\]{}<>|&/?.@#+%!*$]+")


def _words(text: str) -> list[str]:
    """The long words of ``text`` (8 characters or more): each is redacted on its own."""
    return [w for w in _WORD_SPLIT.split(text) if len(w) >= 8]


def _output_pieces(data: bytes | bytearray) -> list[str]:
    """What of a refresher's output must not reach a summary: all of it, each line, long words.

    stderr often repeats part of what stdout printed (a token in pretty-printed
    JSON, then again in the error line), so the value is hidden whole, line
    by line and word by word. Over-redaction is the safe side.
    """
    text = bytes(data).decode("utf-8", "replace").strip()
    if not text:
        return []
    lines = [line.strip() for line in text.splitlines()]
    return [text, *(line for line in lines if len(line) >= 4), *_words(text)]


class RefreshState(NamedTuple):
    """A credential's refresher (sealed) and refresh state, as its head row stores it."""

    kind: str
    ahead: float | None
    kek_version: int
    wrapped_key: bytes
    ciphertext: bytes
    #: The last failure's summary and time, and failures in a row; None after a success.
    failure: str | None = None
    failed_at: float | None = None
    failures: int = 0

    def encode(self) -> bytes:
        """The stored blob (covered by the head's leaf of the state tree)."""
        return json.dumps({
            "v": _FORMAT, "kind": self.kind, "ahead": self.ahead, "kek": self.kek_version,
            "wk": self.wrapped_key.hex(), "ct": self.ciphertext.hex(),
            "failure": self.failure, "failed_at": self.failed_at, "failures": self.failures,
        }, separators=(",", ":"), sort_keys=True).encode("utf-8")


@lru_cache(maxsize=1024)
def decode_state(blob: bytes) -> RefreshState:
    """Parse a stored blob; raise IntegrityError (exit 3) if it does not parse.

    It was checked against the state root before this is called, so a blob
    that does not parse is damage this code did not write.
    """
    try:
        doc = json.loads(blob.decode("utf-8"))
        if doc["v"] != _FORMAT or doc["kind"] not in ("command", "python"):
            raise ValueError("format")
        ahead = doc["ahead"]
        failed_at = doc["failed_at"]
        state = RefreshState(
            doc["kind"], None if ahead is None else float(ahead), int(doc["kek"]),
            bytes.fromhex(doc["wk"]), bytes.fromhex(doc["ct"]),
            None if doc["failure"] is None else str(doc["failure"]),
            None if failed_at is None else float(failed_at), int(doc["failures"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
        raise IntegrityError("a credential's refresh record is damaged (tampered?)",
                             "refresh-record") from None
    return state


def retry_at(state: RefreshState) -> float | None:
    """When a failing refresher may run again on its own, or None if it is not failing."""
    if state.failed_at is None or state.failures <= 0:
        return None
    return state.failed_at + min(RETRY_MAX, RETRY_BASE * 2.0 ** min(state.failures - 1, 16))


def state_of(head: HeadRow) -> RefreshState | None:
    """The refresh state of a checked head, or None when it has no refresher."""
    return None if head.refresh is None else decode_state(head.refresh)


# -- specs --------------------------------------------------------------------


def command_spec(text: str, what: str = "--refresh-command") -> RefreshSpec:
    """A command refresher from a command line, split as a shell would (never run by one)."""
    import shlex

    if not isinstance(text, str):
        raise UsageError(f"{what}: expected a command line")
    try:
        argv = tuple(shlex.split(text))
    except ValueError:
        # Not echoed: the line may hold a token.
        raise UsageError(f"{what}: cannot be split into arguments (check its quotes)") from None
    if not argv or not argv[0]:
        raise UsageError(f"{what}: must name a program")
    if any("\x00" in a for a in argv):
        raise UsageError(f"{what}: must not contain NUL characters")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        # A lone surrogate: no program could be given it (every run would fail).
        raise UsageError(f"{what}: must be valid Unicode text (no lone surrogates)") from None
    if size > 65536:
        raise UsageError(f"{what}: longer than 64 KiB")
    if "/" in argv[0] and not os.path.isabs(argv[0]):
        # It would be looked up in whatever folder a reader happens to be in
        # (a shared /tmp, a checkout someone else controls).
        raise UsageError(f"{what}: the program must be an absolute path or a name looked up "
                         "on PATH, not a relative path")
    return RefreshSpec("command", argv)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plugins() -> dict[str, Any]:
    from importlib import metadata

    return {ep.name: ep for ep in metadata.entry_points(group=PLUGIN_GROUP)}


def plugin_spec(text: str, what: str = "--refresher") -> RefreshSpec:
    """A Python refresher: ``NAME`` or ``NAME:ARGUMENT``; NAME must be installed."""
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected NAME or NAME:ARGUMENT")
    name, sep, argument = text.partition(":")
    if not _NAME.fullmatch(name):
        raise UsageError(f"{what}: expected NAME or NAME:ARGUMENT (a name of letters, digits, "
                         "'.', '_' and '-')")
    found = _plugins()
    if name not in found:
        raise UsageError(f"{what}: no refresher named {name!r} is installed (installed: "
                         f"{', '.join(sorted(found)) or 'none'})")
    if "\x00" in argument or len(argument) > 65536 or not _encodable(argument):
        raise UsageError(f"{what}: the argument must be text of at most 64 KiB, without NUL")
    return RefreshSpec("python", (), name, argument if sep else None)


def seal_spec(store: Session, storage: Storage, service: str, username: str,
              spec: RefreshSpec, ahead: float | None) -> RefreshState:
    """Seal a spec under the active KEK (inside an operation's transaction); no failure."""
    active = store._meta(storage).active
    kek = store._kek(active.version)
    # Bound to this credential's place (version slot 0), like a secret value:
    # a spec moved to another credential, or swapped with a value, fails to open.
    sealed = envelope.seal_secret(kek, Place(store._vault.vault_id, service, username, SPEC_SLOT),
                                  spec.to_bytes())
    store._count_wrap(storage, kek.version)
    return RefreshState(spec.kind, ahead, sealed.kek_version, sealed.wrapped_key,
                        sealed.ciphertext)


def open_spec(store: Session, head: HeadRow, state: RefreshState) -> RefreshSpec:
    """Decrypt a checked head's spec; one opaque integrity error for any failure."""
    place = Place(store._vault.vault_id, head.service, head.username, SPEC_SLOT)
    try:
        data = envelope.open_secret(store._kek(state.kek_version), place,
                                    Sealed(state.kek_version, state.wrapped_key,
                                           state.ciphertext))
        return RefreshSpec.from_bytes(data)
    except (DecryptFailed, IntegrityError, ValueError, KeyError, TypeError):
        raise IntegrityError(f"service {head.service!r}, user {head.username!r}: the "
                             "refresher's integrity check failed", "refresh-spec") from None


def specs_below(storage: Storage, below: int) -> int:
    """How many refresher specs are sealed under a KEK version below ``below`` (retire)."""
    found = 0
    for row in storage.refresh_hints():
        blob = row[5]
        if isinstance(blob, bytes) and decode_state(blob).kek_version < below:
            found += 1
    return found


def rewrap_specs(store: Session) -> int:
    """Re-seal every refresher spec under an older KEK with the active one (``key rewrap``).

    One audited ``key-rewrap`` transaction; each head is checked against the
    state root before its spec is opened. Returns how many moved.
    """
    with store._guard() as storage:
        kek_versions = {decode_state(row[5]).kek_version for row in storage.refresh_hints()
                        if isinstance(row[5], bytes)}
    if not kek_versions:
        return 0  # no refresher at all: no event (the common case)

    def body(storage: Storage, note: _Note) -> int:
        active = store._meta(storage).active.version
        moved = 0
        for _id, service, username, _cur, _exp, blob in storage.refresh_hints():
            if not (isinstance(blob, bytes) and isinstance(service, str)
                    and isinstance(username, str)) or decode_state(blob).kek_version >= active:
                continue
            head = store._existing(storage, service, username)
            state = state_of(head)
            if state is None or state.kek_version >= active:
                continue
            new = seal_spec(store, storage, service, username, open_spec(store, head, state),
                            state.ahead)
            storage.set_refresh(head.id, new._replace(failure=state.failure,
                                                      failed_at=state.failed_at,
                                                      failures=state.failures).encode())
            store._touch(service)
            moved += 1
        note.key_version = active
        note.reason = f"rewrapped-refreshers-{moved}"
        return moved

    return store._run("key-rewrap", None, None, body, writes=True)


# -- running refreshers --------------------------------------------------------


def _summary(text: str, hidden: Iterable[str]) -> str:
    """The first line, without anything in ``hidden``, printable, cut to 200 characters."""
    line = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
    # Longest first, so a token is removed whole before any piece of it.
    for piece in sorted({p for p in hidden if p}, key=len, reverse=True):
        line = line.replace(piece, "[redacted]")
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line[:SUMMARY_CHARS]


def _fail(what: str, stderr: str, hidden: Iterable[str]) -> RefreshFailedError:
    detail = _summary(stderr, hidden)
    summary = f"{what}: {detail}" if detail else what
    return RefreshFailedError(f"the refresher failed ({summary})", summary)


def _kill_group(pid: int) -> None:
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@lru_cache(maxsize=1)
def _prctl() -> Callable[..., int] | None:
    """Libc's ``prctl``, looked up once per process; None where there is none."""
    import ctypes

    try:
        found: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return found


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel kill the child when its parent dies (Linux)."""
    import signal

    prctl = _prctl()
    if prctl is None:
        return None  # not Linux: the reader's own timeout is the only bound
    parent = os.getpid()

    def arm() -> None:
        # PR_SET_PDEATHSIG: a reader killed mid-refresh (kill -9) cannot enforce
        # refresh_timeout any more, so the refresher must not outlive it.
        prctl(1, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the reader died before the line above ran
            os._exit(1)

    return arm


def _child_env(env_names: Iterable[str]) -> dict[str, str]:
    """PATH, HOME, LANG and the ``refresh_env`` names; PATH without relative entries."""
    env = {k: os.environ[k] for k in (*BASE_ENV, *env_names) if k in os.environ}
    if "PATH" in env:
        # An empty or relative PATH entry is the working folder: a program
        # name must not be found in a folder someone else controls.
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                      if os.path.isabs(p))
    return env


def run_command(argv: tuple[str, ...], timeout: float, env_names: Iterable[str] = (),
                cwd: str | os.PathLike[str] = "/") -> bytes:
    """Run a refresh command; its stdout minus one trailing newline is the new secret.

    No shell; stdin closed; a minimal environment (PATH, HOME, LANG and the
    configured ``refresh_env`` names); in ``cwd`` (the vault's folder when a
    store runs it), never the reader's working folder; a session of its own,
    so a timeout kills everything it started, and killed by the kernel if the
    reader dies. Raises :class:`RefreshFailedError` on a non-zero exit, a
    timeout, empty output or output over 1 MiB; the summary never holds the
    output, and the spec's arguments and the output are redacted from the
    stderr line it quotes.
    """
    import selectors
    import subprocess

    hidden = RefreshSpec("command", argv).sensitive()
    env = _child_env(env_names)
    try:
        # argv, never a shell: the stored command line is not interpreted again.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # noqa: S603
                                stderr=subprocess.PIPE, env=env, start_new_session=True,
                                close_fds=True, cwd=cwd, preexec_fn=_die_with_parent())
    except FileNotFoundError:
        raise _fail(f"program {os.path.basename(argv[0])!r} not found", "", hidden) from None
    except OSError as exc:
        raise _fail(f"cannot run {os.path.basename(argv[0])!r}: {exc.strerror}", "",
                    hidden) from None
    assert proc.stdout is not None  # noqa: S101 - PIPE above
    assert proc.stderr is not None  # noqa: S101 - PIPE above
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    failure: RefreshFailedError | None = None
    exited_at: float | None = None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ, out)
            selector.register(proc.stderr, selectors.EVENT_READ, err)
            while selector.get_map():
                now = time.monotonic()
                if now >= deadline:
                    # What it printed so far may be the value: hidden too.
                    failure = _fail(f"timed out after {timeout:g}s", err.decode(
                        "utf-8", "replace"), [*hidden, *_output_pieces(out)])
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.5:
                    break  # a background job it left holds the pipes: the answer is in
                for key, _ in selector.select(min(deadline - now, 0.1)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buf: bytearray = key.data
                    if buf is err:
                        # Keep the start of stderr for the summary; drain the rest.
                        err += chunk[:max(0, _STDERR_KEPT - len(err))]
                    else:
                        buf += chunk
                        if len(out) > OUTPUT_LIMIT + 1:
                            failure = _fail(f"printed more than {OUTPUT_LIMIT} bytes", "",
                                            hidden)
                            break
                if failure is not None:
                    break
    finally:
        if failure is not None or proc.poll() is None:
            _kill_group(proc.pid)
        code = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if failure is not None:
        raise failure
    text_err = err.decode("utf-8", "replace")
    value = bytes(out).removesuffix(b"\n")
    # The new value never goes into a summary, even if stderr repeats it, or
    # one line or word of it.
    hidden = [*hidden, *_output_pieces(value)]
    if code != 0:
        what = f"exit {code}" if code > 0 else f"killed by signal {-code}"
        raise _fail(what, text_err, hidden)
    return _checked_output(value, text_err, hidden)


def _checked_output(value: bytes, stderr: str, hidden: list[str]) -> bytes:
    if not value:
        raise _fail("empty output", stderr, hidden)
    if len(value) > OUTPUT_LIMIT:
        raise _fail(f"printed more than {OUTPUT_LIMIT} bytes", "", hidden)
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("output is not UTF-8 text", stderr, hidden) from None
    return value


class RefreshContext(NamedTuple):
    """What a Python refresher is called with.

    A refresher is a callable ``refresher(context) -> str`` (or a
    :class:`~keyring_hardened.secret.Secret`) registered in the entry-point
    group ``keyring_hardened.refreshers``. It returns the new secret, or
    raises to fail (the exception's type and first line, redacted, are the
    failure summary). It runs in a thread of the reading process, with the
    same ``refresh_timeout``; a refresher past its time is abandoned (a
    Python thread cannot be killed), so it should honour ``timeout`` itself.
    """

    service: str
    username: str
    #: The current version number (the one being replaced).
    version: int
    #: The current version's expiry (epoch seconds), if it has one.
    expires_at: float | None
    #: What followed ``NAME:`` in ``--refresher``, if anything.
    argument: str | None
    #: Seconds the refresher has.
    timeout: float

    def __repr__(self) -> str:
        # The argument is part of the spec, a secret: a plugin that logs its
        # context, or a traceback that shows it, must not print it.
        return (f"RefreshContext(service={self.service!r}, username={self.username!r}, "
                f"version={self.version!r}, expires_at={self.expires_at!r}, argument=..., "
                f"timeout={self.timeout!r})")

    def __str__(self) -> str:
        return repr(self)


#: The thread of each Python refresher run, by (name, service, username): at
#: most one runs per credential in a process, even once abandoned at its timeout.
_workers: dict[tuple[str, str, str], threading.Thread] = {}
_workers_lock = threading.Lock()


def run_python(spec: RefreshSpec, context: RefreshContext) -> bytes:
    """Run a Python refresher in a thread, bounded by ``context.timeout``."""
    hidden = spec.sensitive()
    found = _plugins().get(spec.name)
    if found is None:
        raise _fail(f"refresher {spec.name!r} is not installed", "", hidden)
    result: list[Any] = []
    error: list[BaseException] = []

    def call() -> None:
        try:
            result.append(found.load()(context))
        except BaseException as exc:  # noqa: BLE001 - reported as the refresh's failure
            error.append(exc)

    key = (spec.name, context.service, context.username)
    with _workers_lock:
        earlier = _workers.get(key)
        if earlier is not None and earlier.is_alive():
            # A thread cannot be killed: one past its time is still running, and
            # starting another beside it each attempt would pile them up.
            raise _fail(f"refresher {spec.name!r} is still running from an earlier attempt",
                        "", hidden)
        worker = threading.Thread(target=call, name=f"refresher-{spec.name}", daemon=True)
        _workers[key] = worker
    worker.start()
    worker.join(context.timeout)
    if worker.is_alive():
        raise _fail(f"timed out after {context.timeout:g}s", "", hidden)
    if error:
        exc = error[0]
        raise _fail(type(exc).__name__, str(exc), hidden)
    value = result[0] if result else None
    if isinstance(value, Secret):
        value = value.reveal()
    if not isinstance(value, str):
        raise _fail(f"returned {type(value).__name__}, not a string", "", hidden)
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail("output is not UTF-8 text", "", hidden) from None
    return _checked_output(data, "", [*hidden, value])


# -- the refreshers shipped in the package ---------------------------------------


def generate_refresher(context: RefreshContext) -> str:
    """``--refresher generate[:N]``: a new random token of N random bytes (default 32).

    URL-safe base64, for secrets the vault owns (an internal API token, say).
    """
    import secrets

    size = 32
    if context.argument:
        if not context.argument.isdigit() or not 16 <= int(context.argument) <= 1024:
            raise ValueError("generate: the argument is a byte count from 16 to 1024")
        size = int(context.argument)
    return secrets.token_urlsafe(size)


def file_refresher(context: RefreshContext) -> str:
    """``--refresher file:/PATH``: the contents of a file another program keeps fresh.

    A Kubernetes projected service-account token, a Vault agent sink: the
    file minus one trailing newline, at most 1 MiB; empty is a failure.
    """
    from ._files import trust_problems

    path = context.argument or ""
    if not os.path.isabs(path):
        raise ValueError("file: the argument must be an absolute path")
    # O_NONBLOCK: a FIFO planted at the path must not hang the reader. Links are
    # followed (a Kubernetes token path is one), but the file itself must be
    # trusted like a config file: owned by you or root, writable by nobody
    # else, so another user cannot choose the secret.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        problems = trust_problems(os.fstat(fd), path, "file:", private=False)
        if problems:
            raise ValueError(problems[0])
        data = os.read(fd, OUTPUT_LIMIT + 2)
    finally:
        os.close(fd)
    return data.removesuffix(b"\n").decode("utf-8")


# -- single flight ----------------------------------------------------------------


def lease_decision(lease: tuple[Any, ...] | None, now: float, token: bytes, base: int,
                   longest: float) -> str:
    """Who may run the refresher, from the (untrusted) lease row: a pure function.

    ``"ours"``: this token holds it; ``"held"``: a live runner for the same
    base version holds it, until an expiry no further out than ``longest``
    from now; ``"free"``: none, or an expired, stale, damaged or implausible one.
    """
    if lease is None or len(lease) != 4:
        return "free"
    _holder, held_token, held_base, expires = lease
    if held_token == token:
        return "ours"
    if isinstance(expires, bool) or not isinstance(expires, int | float) \
            or held_base != base:
        return "free"
    # An expiry further out than any runner could have been given is planted:
    # it must not stop refreshes for longer than one lease.
    return "held" if now < expires <= now + longest else "free"


class Outcome(NamedTuple):
    """What became of one refresh attempt."""

    service: str
    username: str
    #: refreshed, failed, not-due, held (another runner), changed (a newer version
    #: exists), superseded (our value was discarded), waited-failed, timed-out,
    #: backoff (failing: not retried yet).
    result: str
    version: int | None = None
    summary: str | None = None


class _Started(NamedTuple):
    head_id: int
    base: int
    spec: RefreshSpec
    ttl: float | None
    expires_at: float | None


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _longest(store: Session) -> float:
    return store.config.refresh_timeout + LEASE_GRACE


def _holder(store: Session) -> str:
    return f"{store.actor}:{os.getpid()}"


def _take_lease(store: Session, head_id: int, base: int, token: bytes) -> str:
    """Take the lease if it is free: one short transaction, not audited.

    The hint of the current version only saves a run; the audited start
    checks the real one.
    """
    with store._guard() as storage, storage.transaction():
        if storage.current_hint(head_id) != base:
            return "changed"
        now = store._clock()
        found = lease_decision(storage.lease(head_id), now, token, base, _longest(store))
        if found == "held":
            return "held"
        storage.put_lease(head_id, _holder(store), token, base, now + _longest(store))
        return "ours"


def _drop_lease(store: Session, head_id: int, token: bytes) -> None:
    with store._guard() as storage, storage.transaction():
        storage.drop_lease(head_id, token)


def _wait(store: Session, head_id: int, base: int, token: bytes, deadline: float) -> str:
    """Wait while another process's lease is live; returns why the wait ended.

    ``changed``: a new version is there (read it); ``gone``: the runner let
    go without one (it failed); ``expired``: its lease ran out (take over);
    ``timed-out``. Only cheap unauthenticated hints are read here, outside
    any transaction; the answer is always read through a checked read.
    """
    while True:
        with store._guard() as storage:
            current = storage.current_hint(head_id)
            lease = storage.lease(head_id)
        if current != base:
            return "changed"
        if lease is None:
            return "gone"
        if lease_decision(lease, store._clock(), token, base, _longest(store)) == "free":
            return "expired"
        if time.monotonic() >= deadline:
            return "timed-out"
        time.sleep(POLL_SECONDS)


def _start(store: Session, service: str, username: str, head_id: int, base: int,
           token: bytes, force: bool) -> _Started | Outcome:
    """The audited start: the door (a write), the lease still ours, due, the spec opened."""

    def body(storage: Storage, note: _Note) -> _Started | Outcome:
        head = store._existing(storage, service, username)
        lease = storage.lease(head.id)
        if head.id != head_id or head.current_version != base or lease is None \
                or lease[1] != token:
            note.reason = "not-started; changed"
            return Outcome(service, username, "changed")
        state = state_of(head)
        if state is None:
            raise UsageError(f"no refresher is configured for service {service!r}, user "
                             f"{username!r}", "no-refresher")
        now = store._clock()
        if not force and not _due(head.expires_at, state, now):
            note.reason = "not-started; not due"
            return Outcome(service, username, "not-due")
        again = retry_at(state)
        if not force and again is not None and now < again:
            note.reason = "not-started; failing, retried later"
            return Outcome(service, username, "backoff", None,
                           f"the last refresh failed ({state.failure}); the next attempt is "
                           f"after {_utc(again)}")
        row = next((store._checked(head, r) for r in store._versions(storage, head)
                    if r.version == base), None)
        if row is None:
            raise IntegrityError(f"service {service!r}, user {username!r}: current version "
                                 "is missing", "missing-version")
        spec = open_spec(store, head, state)
        note.key_version = state.kek_version
        note.reason = f"started; {state.kind}"
        return _Started(head.id, base, spec, row.ttl, head.expires_at)

    return store._run("refresh", service, username, body)


def _due(expires_at: float | None, state: RefreshState, now: float) -> bool:
    return expires_at is not None and now >= expires_at - (state.ahead or 0.0)


def _finish(store: Session, service: str, username: str, started: _Started, token: bytes,
            value: bytes | None, failure: RefreshFailedError | None) -> Outcome:
    """Write the new version (or the failure) if the lease and the base version still hold."""
    lost: list[bool] = []

    def body(storage: Storage, note: _Note) -> int | None:
        head = store._existing(storage, service, username)
        lease = storage.lease(head.id)
        if head.current_version != started.base or lease is None or lease[1] != token:
            # Someone else refreshed (or set) meanwhile, or took the lease
            # over: our value is discarded, never written over theirs.
            lost.append(True)
            note.reason = "superseded; value discarded"
            return None
        state = state_of(head)
        if state is None or open_spec(store, head, state) != started.spec:
            # The refresher was removed or replaced meanwhile (the owner pointed
            # it elsewhere, or purged the credential and made it again with
            # another): what the old one printed is not this credential's value.
            # The spec is compared opened, as key rotation re-seals it.
            lost.append(True)
            note.reason = "superseded; refresher " + ("removed" if state is None
                                                      else "replaced")
            storage.drop_lease(head.id, token)
            return None
        now = store._clock()
        storage.drop_lease(head.id, token)
        if failure is not None:
            storage.set_refresh(head.id, state._replace(
                failure=failure.reason, failed_at=now, failures=state.failures + 1).encode())
            store._touch(service)
            return None
        assert value is not None  # noqa: S101 - value or failure, never neither
        # The TTL as it is now: one changed during the run (`ttl ... none`) stands.
        current = next((store._checked(head, r) for r in store._versions(storage, head)
                        if r.version == started.base), None)
        ttl = current.ttl if current is not None else started.ttl
        version = store._write_version(storage, head, value, now, note, ttl)
        # A success clears the failure; the spec moves to the active KEK
        # (so rotated keys can retire) whenever it was sealed under an older one.
        new_state = state._replace(failure=None, failed_at=None, failures=0)
        if state.kek_version != store._meta(storage).active.version:
            new_state = seal_spec(store, storage, service, username, started.spec,
                                  state.ahead)
        storage.set_refresh(head.id, new_state.encode())
        note.reason = f"refreshed; version {version}"
        return version

    # The start drew this refresh's write token; the write is the same
    # refresh, so it does not draw another (a limit of one write must not let
    # the refresher run and then throw its value away). Seal and policy still hold.
    if failure is None:
        version = store._run("refresh", service, username, body, writes=True, admitted=True)
    else:
        def finish(storage: Storage, note: _Note) -> Any:
            # The failure is recorded (the state changes) and audited with
            # outcome "expired" and its summary: commit the new root first,
            # then chain the failure event carrying it.
            store._commit_state(storage)
            return store._append(storage, "refresh", service, username,
                                 failure if not lost else None, None,
                                 note.reason)

        version = store._run("refresh", service, username, body, writes=True, finish=finish,
                             admitted=True)
    if lost:
        return Outcome(service, username, "superseded")
    if failure is not None:
        return Outcome(service, username, "failed", None, failure.reason)
    return Outcome(service, username, "refreshed", version)


def _run_spec(store: Session, service: str, username: str, started: _Started) -> bytes:
    if started.spec.kind == "command":
        return run_command(started.spec.argv, store.config.refresh_timeout,
                           store.config.refresh_env, cwd=store.location.home)
    return run_python(started.spec, RefreshContext(
        service, username, started.base, started.expires_at, started.spec.argument,
        store.config.refresh_timeout))


def refresh_one(store: Session, service: str, username: str, head_id: int, base: int, *,
                force: bool = False, wait: bool = True) -> Outcome:
    """Refresh one credential from version ``base``, once across every process.

    Takes the lease or, with ``wait``, waits for the process that holds it
    (taking over if its lease runs out). Never raises for a refresher's
    failure: the outcome says it, and the head records it.
    """
    token = os.urandom(16)
    deadline = time.monotonic() + _longest(store)
    gave_up = False
    while True:
        # A look before the write transaction: when a runner already holds the
        # lease, its waiters add no writer to the queue it must get through.
        with store._guard() as storage:
            peek = (storage.current_hint(head_id), storage.lease(head_id))
        if peek[0] != base:
            return Outcome(service, username, "changed")
        live = lease_decision(peek[1], store._clock(), token, base, _longest(store)) == "held"
        taken = "held" if live else _take_lease(store, head_id, base, token)
        if taken == "changed":
            return Outcome(service, username, "changed")
        if taken == "held":
            if not wait:
                return Outcome(service, username, "held")
            why = _wait(store, head_id, base, token, deadline)
            if why == "expired":
                deadline = time.monotonic() + _longest(store)
                continue  # the runner died: take over
            if why == "gone" and not gave_up:
                # The runner let go without a new version: it failed (its
                # back-off now stops a second run at the start), or it was
                # refused at the door (an actor denied write): one more try
                # here, so such a reader cannot stop the allowed ones.
                gave_up = True
                continue
            return Outcome(service, username, {"changed": "changed", "gone": "waited-failed"}
                           .get(why, "timed-out"))
        break
    try:
        started = _start(store, service, username, head_id, base, token, force)
    except BaseException:
        _drop_lease(store, head_id, token)
        raise
    if not isinstance(started, _Started):
        _drop_lease(store, head_id, token)
        return started
    crash_point("refresh-running")
    # No transaction is open while the refresher runs (it may take 30 s).
    try:
        value: bytes | None = _run_spec(store, service, username, started)
        failure: RefreshFailedError | None = None
    except RefreshFailedError as exc:
        value, failure = None, exc
    except BaseException:
        _drop_lease(store, head_id, token)
        raise
    crash_point("refresh-before-write")
    try:
        return _finish(store, service, username, started, token, value, failure)
    except BaseException:
        # Refused (sealed, denied, rekeyed) or failed: let go, so readers do not
        # wait out the lease of a runner that has given up.
        with contextlib.suppress(HardenedError):
            _drop_lease(store, head_id, token)
        raise


class _Hint(NamedTuple):
    head_id: int
    service: str
    username: str
    current: int
    expires_at: float | None
    state: RefreshState | None


def _hints(store: Session) -> list[_Hint]:
    """Credentials with a refresher, from the rows as stored (unchecked: candidates only)."""
    with store._guard() as storage:
        rows = storage.refresh_hints()
    found = []
    for head_id, service, username, current, expires_at, blob in rows:
        if not (isinstance(head_id, int) and isinstance(service, str)
                and isinstance(username, str) and isinstance(current, int)
                and isinstance(blob, bytes)):
            continue
        try:
            state: RefreshState | None = decode_state(blob)
        except IntegrityError:
            state = None  # a checked operation on it will say so
        found.append(_Hint(head_id, service, username, current,
                           expires_at if isinstance(expires_at, int | float) else None, state))
    return found


def refresh_due(store: Session, *, wait: bool = False) -> list[Outcome]:
    """Refresh every credential that is expired or inside its refresh-ahead window.

    Candidates come from the rows as stored; each refresh re-checks, through
    a checked read, that the credential is due before it runs anything.
    """
    now = store._clock()
    outcomes = []
    for hint in _hints(store):
        if hint.state is not None and not _due(hint.expires_at, hint.state, now):
            continue
        outcomes.append(refresh_one(store, hint.service, hint.username, hint.head_id,
                                    hint.current, wait=wait))
    return outcomes


def counts(store: Session) -> dict[str, int]:
    """For ``status``: credentials with a refresher, expired, expiring and failing refresh.

    Read from the rows as stored, like the other counts of ``status``.
    """
    now = store._clock()
    hints = _hints(store)
    with store._guard() as storage:
        expired = storage.expired_count(now)
    return {
        "refreshers": len(hints),
        "expired": expired,
        "expiring": sum(1 for h in hints if h.state is not None and h.expires_at is not None
                        and h.expires_at > now and _due(h.expires_at, h.state, now)),
        "failing": sum(1 for h in hints if h.state is not None and h.state.failure is not None),
    }


# -- refresh ahead and the background thread -----------------------------------------


class BackgroundRefresh:
    """A daemon thread that refreshes due credentials of one store.

    Started by :func:`start_background`. It wakes every ``interval`` seconds,
    or at once when a read finds a credential inside its refresh-ahead
    window, and refreshes what is due through the same lease as everyone
    else, so it never runs one credential's refresher twice at once.
    """

    def __init__(self, store: Session, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._stop = threading.Event()
        self._poke = threading.Event()
        #: Refresh passes made (for tests and status).
        self.passes = 0
        self._thread = threading.Thread(target=self._loop, name="keyring-hardened-refresh",
                                        daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._store._closed:
                break  # the store was closed under us: nothing left to refresh
            try:
                for outcome in refresh_due(self._store):
                    if outcome.result == "failed":
                        log.warning("refresh of service %r, user %r failed: %s",
                                    outcome.service, outcome.username, outcome.summary)
            except HardenedError as exc:
                if self._stop.is_set():
                    break  # stopped (and its store closed) mid-pass: nothing to report
                log.warning("background refresh: %s", exc)
            except Exception:
                log.exception("background refresh: internal error")
            self.passes += 1
            self._poke.wait(self._interval)
            self._poke.clear()

    def poke(self) -> None:
        """Run a pass now (a read found a credential due)."""
        self._poke.set()

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread and wait for it (a refresher it runs finishes first)."""
        self._stop.set()
        self._poke.set()
        if timeout != 0 and self._thread.is_alive() \
                and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None
                              else self._store.config.refresh_timeout + LEASE_GRACE + 5)
        _running.pop(id(self._store), None)


#: The background refresher of each store, by id (weakly: a closed store's entry goes).
_running: dict[int, BackgroundRefresh] = {}
_running_lock = threading.Lock()


def start_background(store: Session, interval: float = 30.0) -> BackgroundRefresh:
    """Refresh ``store``'s due credentials in a daemon thread; returns a handle with ``stop()``.

    For the unlock agent and for a long-running process using the backend
    with ``[refresh] background = true``. One per store: a second call
    returns the running one. Stopped cleanly at interpreter exit.
    """
    if not 0 < interval <= 86400:
        raise UsageError("the background refresh interval must be between 0 and 1 day")
    with _running_lock:
        found = _running.get(id(store))
        if found is not None and found.alive:
            return found
        handle = BackgroundRefresh(store, interval)
        _running[id(store)] = handle
        weakref.finalize(store, _running.pop, id(store), None)
        handle._thread.start()
    atexit.register(handle.stop, 5.0)
    return handle


def background_of(store: Session) -> BackgroundRefresh | None:
    """The running background refresher of ``store``, if any."""
    found = _running.get(id(store))
    return found if found is not None and found.alive else None


def after_read(store: Session, service: str, username: str, head_id: int, base: int,
               failing: str | None = None) -> None:
    """A read found the current version inside its refresh-ahead window (still valid).

    With a background thread, wake it; otherwise refresh inline if this
    process wins the lease (the others keep the current value at once). A
    failure is a warning (stderr in the CLI, ``logging`` in an app), never an
    error: the current value is still good. ``failing``: the failure the head
    records, so a reader is warned while the refresher keeps failing, also
    when the attempt is left to the background thread or is backing off.
    """
    handle = background_of(store)
    if handle is not None:
        handle.poke()
        if failing is not None:
            store.notice(f"refresh of service {service!r}, user {username!r} is failing "
                         f"({failing}); the current value is used until it expires")
        return
    try:
        outcome = refresh_one(store, service, username, head_id, base, wait=False)
    except HardenedError as exc:
        store.notice(f"refresh of service {service!r}, user {username!r} did not run: {exc}")
        return
    if outcome.result == "failed":
        store.notice(f"refresh of service {service!r}, user {username!r} failed "
                     f"({outcome.summary}); the current value is used until it expires")
    elif outcome.result == "backoff":
        store.notice(f"refresh of service {service!r}, user {username!r} is failing: "
                     f"{outcome.summary}; the current value is used until it expires")
    elif failing is not None and outcome.result != "refreshed":
        store.notice(f"refresh of service {service!r}, user {username!r} is failing "
                     f"({failing}); the current value is used until it expires")


def after_expired(store: Session, service: str, username: str, head_id: int, base: int
                  ) -> str | None:
    """A read found the current version expired: refresh (or wait for the runner).

    Returns why no new version may be there, for the expired message; the
    caller reads again either way.
    """
    try:
        outcome = refresh_one(store, service, username, head_id, base, wait=True)
    except (DeniedError, RateLimitedError) as exc:
        # Denied or rate limited as a write: the refresher was not run.
        return f"the refresher was not run: {exc}"
    if outcome.result == "timed-out":
        return "another process is still refreshing it"
    return None


def ttl_for(store: Session, service: str) -> float | None:
    """The ``default_ttl`` of a new credential of ``service``: the first glob that matches."""
    from fnmatch import fnmatchcase

    for glob, seconds in store.config.default_ttl:
        if fnmatchcase(service, glob):
            return seconds
    return None


#: For the type checker: what a Python refresher is.
Refresher = Callable[[RefreshContext], "str | Secret"]
