"""``keyring-hardened``: the admin CLI.

Secrets come only from a pipe or a prompt, never from argv. ``get`` prints
only the secret; everything else a person reads goes to stderr or, for
machines, to ``--json`` on stdout. Every error is one line on stderr and the
exit code of its class (see :mod:`keyring_hardened.errors`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from . import __version__
from .errors import ExpiredError, HardenedError, StorageError, UsageError

PROG = "keyring-hardened"
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug, reported without a traceback


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _stamp(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _shown(name: str) -> str:
    """A name as a terminal may show it: control characters escaped.

    ``isprintable`` is False for C0 and C1 controls (ANSI escape sequences),
    bidi overrides and other format characters, line separators and lone
    surrogates, so each of those is shown escaped, never sent raw.
    """
    return name if name.isprintable() and name.strip() == name and name else repr(name)


def _cell(value: str | None) -> str:
    """A table cell: ``-`` for none, else :func:`_shown`."""
    return "-" if value is None else _shown(value)


def _escaped(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:  # JSON spells these as a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def _json(doc: Any) -> str:
    """JSON for stdout: UTF-8 kept readable, but no raw control or format character.

    ``ensure_ascii=False`` lets C1 controls, bidi overrides, line separators
    and lone surrogates through raw; each is escaped here as a JSON ``u`` escape
    (valid JSON: they can only occur inside strings).
    """
    text = json.dumps(doc, ensure_ascii=False)
    return "".join(c if c.isprintable() or c == " " else _escaped(c) for c in text)


def _one_line(text: str) -> str:
    """A message made safe for a terminal: every non-printable character escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _debug() -> bool:
    """``KEYRING_HARDENED_DEBUG``: on unless unset, empty, 0, false, no or off."""
    value = os.environ.get("KEYRING_HARDENED_DEBUG", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


def _int_arg(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``lo`` to ``hi`` (SQLite holds up to 2^63-1)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also a string of more digits than int() takes
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer from {lo} to {hi}")
        return value
    return parse


_MAX_INT = 2**62
_count = _int_arg(1, _MAX_INT)


def _out_path(text: str, what: str) -> Any:
    """An output path argument; refused (exit 2) unless it is UTF-8 text.

    The path goes into the audit event's reason and the export's lines,
    which are UTF-8: an undecodable name could be written but not audited.
    """
    from pathlib import Path

    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} {_one_line(text)!s}: the path is not valid UTF-8; "
                         "choose a name that is") from None
    return Path(text)


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _prompt_once() -> str:
    return getpass.getpass("Passphrase: ")


def _prompt_new() -> str:
    first = getpass.getpass("New passphrase: ")
    if getpass.getpass("Repeat passphrase: ") != first:
        raise UsageError("the two passphrases did not match; nothing was changed")
    return first


def _tty() -> bool:
    """Whether stdin is an open terminal (a closed or absent stdin is not)."""
    stdin = sys.stdin
    try:
        return stdin is not None and not stdin.closed and stdin.isatty()
    except (ValueError, OSError, AttributeError):
        return False


#: Stores this command opened, whose later notices are printed when it ends.
_OPENED: list[Any] = []


def _print_notices(store: Any) -> None:
    for notice in store.notices:
        sys.stderr.write(f"{PROG}: note: {notice}\n")
    store.notices.clear()


def _open(args: argparse.Namespace, create: bool = False) -> Any:
    from .store import Store

    store = Store.open(args.home, prompt=_prompt_once if _tty() else None, create=create)
    _print_notices(store)
    _OPENED.append(store)
    return store


def _credentials(args: argparse.Namespace, create: bool = False) -> Any:
    """The vault for a credential command: its agent when one serves it, else opened here."""
    from .agentproto import connect
    from .location import Location

    location = Location.resolve(args.home)
    agent = connect(location)
    if agent is not None:
        _OPENED.append(agent)
        return agent
    return _open(args, create=create)


def _read_secret(args: argparse.Namespace) -> str:
    if _tty():
        first = getpass.getpass(f"Secret for {args.service} / {args.username}: ")
        if getpass.getpass("Repeat secret: ") != first:
            raise UsageError("the two entries did not match; nothing was stored")
        return first
    if sys.stdin is None or sys.stdin.closed:
        raise UsageError("no secret: stdin is closed (pipe the secret in, or run on a terminal)")
    try:
        data = sys.stdin.buffer.read()
    except (OSError, ValueError) as exc:
        raise UsageError("cannot read the secret from stdin: "
                         f"{getattr(exc, 'strerror', None) or 'closed'}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("secret on stdin is not UTF-8 text") from None
    if not args.no_strip:
        # As the keyring CLI does: one trailing newline is the pipe's, not the secret's.
        text = text.removesuffix("\n")
    if not text and not args.allow_empty:
        # An empty pipe is far more often a mistake (</dev/null, a failed command)
        # than a wish to store nothing; it would replace the current value.
        raise UsageError("the secret on stdin is empty; nothing was stored (use --allow-empty "
                         "to store an empty secret)")
    return text


# -- commands -----------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    """Create a vault (key-file mode, or passphrase mode with --passphrase)."""
    from .store import Store

    store = Store.init(args.home, passphrase_mode=args.passphrase, kdf=args.kdf,
                       prompt=_prompt_new if _tty() else None)
    with store:
        info = store.status()
    print(f"created vault at {info['home']} ({info['kdf']})")
    if info["key_file"]:
        print(f"key file: {info['key_file']}: back it up; without it the vault cannot be opened")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    """Store a new version of a credential; the secret comes from stdin or a prompt."""
    from .config import parse_duration

    # "is not None": an empty --ttl is a mistake to refuse, not "never expires".
    ttl = parse_duration(args.ttl, "--ttl") if args.ttl is not None else None
    # The refresher is checked before the secret is read: bad input changes nothing.
    refresher = _refresher_arg(args)
    ahead = (parse_duration(args.refresh_ahead, "--refresh-ahead")
             if args.refresh_ahead is not None else None)
    secret = _read_secret(args)
    existed = _vault_exists(args.home, lenient=True)
    # The agent protocol does not carry a refresher (its spec is a secret of
    # its own): a set that attaches one opens the vault here.
    opener = _open if refresher is not None or ahead is not None else _credentials
    with opener(args, create=True) as store:
        if not existed:
            sys.stderr.write(f"{PROG}: created a new key-file vault at {store.location.home}; "
                             f"back up {store.location.key_file}: without it the vault cannot "
                             "be opened\n")
        refresh = {} if opener is _credentials else {"refresher": refresher,
                                                      "refresh_ahead": ahead}
        version = store.set(args.service, args.username, secret, ttl=ttl, **refresh)
    if args.verbose:
        sys.stderr.write(f"stored version {version}\n")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    """Print the secret (only the secret) to stdout."""
    with _credentials(args) as store:
        secret = store.get(args.service, args.username, version=args.version)
    sys.stdout.write(secret.reveal() + "\n")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete a credential (kept versions stay for rollback unless --purge)."""
    with _credentials(args) as store:
        store.delete(args.service, args.username, purge=args.purge)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List live credentials: names and versions, never values."""
    with _credentials(args) as store:
        items = store.credentials()
    if args.json:
        sys.stdout.write(_json([{"service": c.service, "username": c.username,
                                 "version": c.version, "updated_at": _stamp(c.updated_at),
                                 "expires_at": _stamp(c.expires_at) if c.expires_at else None,
                                 "refresher": c.refresher,
                                 "refresh_failure": c.refresh_failure}
                                for c in items]) + "\n")
    elif items:
        # Expiry and refresh columns only when some credential has them.
        extra = any(c.expires_at is not None or c.refresher for c in items)
        _table([["SERVICE", "USERNAME", "VERSION", "UPDATED"]
                + (["EXPIRES", "REFRESH"] if extra else [])]
               + [[_shown(c.service), _shown(c.username), str(c.version), _stamp(c.updated_at)]
                  + ([_stamp(c.expires_at), _refresh_cell(c.refresher, c.refresh_failure)]
                     if extra else [])
                  for c in items], sys.stdout)
    return 0


def _refresh_cell(kind: str | None, failure: str | None) -> str:
    """A refresher's kind (never its spec), and "failing" after a failed refresh."""
    if kind is None:
        return "-"
    return f"{kind} (failing)" if failure else kind


def cmd_history(args: argparse.Namespace) -> int:
    """List the kept versions of a credential."""
    with _credentials(args) as store:
        versions = store.history(args.service, args.username)
    if args.json:
        sys.stdout.write(_json([{"version": v.version, "key_version": v.kek_version,
                                 "created_at": _stamp(v.created_at), "current": v.current,
                                 "expires_at": _stamp(v.expires_at) if v.expires_at else None,
                                 "refresher": v.refresher,
                                 "refresh_failure": v.refresh_failure}
                                for v in versions]) + "\n")
    else:
        _table([["VERSION", "KEY", "CREATED", "EXPIRES", "REFRESH", ""]]
               + [[str(v.version), str(v.kek_version), _stamp(v.created_at),
                   _stamp(v.expires_at),
                   _refresh_cell(v.refresher, v.refresh_failure) if v.current else "",
                   "current" if v.current else ""] for v in versions],
               sys.stdout)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Restore a kept version as the new current version."""
    with _credentials(args) as store:
        version = store.rollback(args.service, args.username, to_version=args.version,
                                 allow_expired=args.allow_expired)
    sys.stderr.write(f"restored as version {version}\n")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Authenticate the state of a vault made by keyring-hardened 0.1 (once)."""
    from .store import Store

    with Store.open(args.home, prompt=_prompt_once if _tty() else None, upgrade=True) as store:
        message = store.upgrade()
    sys.stderr.write(message + "\n")
    return 0


def _vault_exists(home: Any, lenient: bool = False) -> bool:
    """Whether the vault exists where ``home``'s config puts it (PostgreSQL: asks the server).

    ``lenient``: a config that cannot be read is left to the open that
    follows (set, import); otherwise (status) it is the error reported.
    """
    from .config import load_config
    from .engines import shared, vault_exists
    from .location import Location

    location = Location.resolve(home)
    try:
        config = load_config(location.config_file, location.config_required)
    except HardenedError:
        if not lenient:
            raise
        # Reported by the open that follows, if it reads the config; an agent
        # that serves the vault does not, and then nothing was created here.
        return shared(None) or _exists(location.database)
    if not shared(config):
        return _exists(location.database)
    return vault_exists(location, config)


def _exists(path: Any) -> bool:
    """Whether ``path`` exists; an unreadable folder is a storage error naming it, not False."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"{path} cannot be checked: {exc.strerror}") from None
    return True


def _trust_problems(location: Any) -> list[str]:
    """Every trust problem of a vault's home and files, for ``status`` and ``config check``."""
    import stat as st_mod
    from pathlib import Path

    from ._files import trust_problems
    from .location import home_problems

    nearest = location.home
    while not os.path.lexists(nearest) and nearest.parent != nearest:
        nearest = nearest.parent  # a home not made yet: check where it would be made
    problems = home_problems(nearest, leaf_is_home=nearest == location.home)
    db = location.database
    files = [(location.key_file, "key file", True), (db, "vault database", True),
             (Path(f"{db}-wal"), "vault database file", True),
             (Path(f"{db}-shm"), "vault database file", True),
             (location.home / "rekey.json", "rekey journal", False),
             (location.home / "rekey.lock", "rekey lock", False)]
    for path, what, private in files:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{what} {path} cannot be checked: {exc.strerror}")
            continue
        if st_mod.S_ISLNK(st.st_mode):
            problems.append(f"{what} {path} is a symbolic link; refusing to follow it")
        else:
            problems.extend(trust_problems(st, path, what, private=private))
    return problems


def _report(problems: list[str]) -> int:
    for problem in problems:
        sys.stderr.write(f"{PROG}: error: {_one_line(problem)}\n")
    return 2


def cmd_status(args: argparse.Namespace) -> int:
    """Show where the vault is, how it was made and what it holds (no secrets)."""
    from .location import Location

    location = Location.resolve(args.home)
    problems = _trust_problems(location)
    if problems:
        return _report(problems)
    if not _vault_exists(args.home):
        if args.json:
            print(_json({"home": str(location.home), "exists": False}))
        else:
            print(f"home: {location.home}\nvault: none (run: {PROG} init)")
        return 0
    with _open(args) as store:
        info = store.status()
    info["exists"] = True
    if args.json:
        print(_json(info))
        return 0
    print(f"home: {info['home']}")
    if info["database"].startswith("postgresql://"):
        print(f"storage: {_one_line(info['database'])} (shared; PostgreSQL)")
    print(f"mode: {info['mode']}" + (f" ({info['key_file']})" if info["key_file"] else ""))
    print(f"kdf: {info['kdf']}")
    # Who made the vault: "init", or the first set of an app or the keyring
    # command, which makes a key-file vault without asking.
    by = f" by {_shown(info['created_by'])}" if info["created_by"] else ""
    if info["created_implicitly"]:
        by += " (by a first set, without init: back up the key file)"
    print(f"created: {_stamp(info['created_at'])}{by}")
    print(f"credentials: {info['credentials']} live, {info['deleted']} deleted, "
          f"{info['versions']} versions kept (max {info['max_versions']} each)")
    print(f"audit events: {info['audit_events']}")
    r = info["refresh"]
    print(f"expiry: {r['expired']} expired, {r['expiring']} within their refresh-ahead window; "
          f"refreshers: {r['refreshers']}, {r['failing']} failing")
    if info["sealed"] is not None:
        print(f"sealed: since {_stamp(info['sealed']['since'])} by "
              f"{_shown(info['sealed']['by'])}; credential requests are refused until "
              f"{PROG} unseal")
    else:
        print("sealed: no")
    if info.get("last_restore"):
        r = info["last_restore"]
        print(f"restored: {_stamp(r['at'])} by {_shown(r['by'])} (event {r['event']}: "
              f"{_shown(r['reason'] or '')})")
    for k in info["keys"]:
        print(f"key version {k['version']}: {k['state']}, created {_stamp(k['created_at'])}, "
              f"{k['versions']} versions, {k['wrap_count']} wraps")
    rot = info["rotation"]
    if rot.get("active_version") is not None:
        when = (f"by {_stamp(rot['due_at'])} (rotate_after)" if rot["due_at"] is not None
                else "not scheduled (no rotate_after)")
        print(f"next rotation: {when}, or after {rot['wraps_left']:,} more wraps")
    print(f"schema: {', '.join(info['schema'])}")
    print(f"config: {info['config'] or 'defaults (no config file)'}")
    for warning in info["warnings"]:
        sys.stderr.write(f"{PROG}: warning: {_one_line(warning)}\n")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the config file and the trust of the vault's files; list every problem."""
    from .config import check_config
    from .location import Location

    location = Location.resolve(args.home)
    config, problems = check_config(location.config_file, location.config_required)
    problems = _trust_problems(location) + problems
    if problems:
        return _report(problems)
    if config is None:
        print(f"no config file at {location.config_file}: defaults apply")
    else:
        print(f"config file {config.path}: OK")
    return 0


def _refresher_arg(args: argparse.Namespace) -> Any:
    """The refresher named by --refresh-command or --refresher, or None."""
    from .refresh import command_spec, plugin_spec

    if args.refresh_command is not None:
        return command_spec(args.refresh_command)
    if args.refresher is not None:
        return plugin_spec(args.refresher)
    return None


def cmd_ttl(args: argparse.Namespace) -> int:
    """Change a credential's TTL (DUR or none), refresher or refresh-ahead window."""
    from .config import parse_duration
    from .store import KEEP

    ttl: Any = KEEP
    if args.duration is not None:
        ttl = None if args.duration == "none" else parse_duration(args.duration, "TTL")
    if args.no_refresh and (args.refresh_command is not None or args.refresher is not None):
        raise UsageError("--no-refresh: cannot be combined with a new refresher")
    refresher: Any = None if args.no_refresh else _refresher_arg(args) or KEEP
    ahead: Any = KEEP
    if args.refresh_ahead is not None:
        ahead = None if args.refresh_ahead == "none" else parse_duration(
            args.refresh_ahead, "--refresh-ahead")
    with _open(args) as store:
        store.ttl(args.service, args.username, ttl=ttl, refresher=refresher,
                  refresh_ahead=ahead)
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    """Refresh credentials now: one (SERVICE USER), or every due one (--due); for cron."""
    if (args.service is None) != (args.username is None):
        raise UsageError("refresh: give both SERVICE and USER, or neither (with --due)")
    if args.service is None and not args.due:
        raise UsageError("refresh: give SERVICE USER, or --due to refresh every due credential")
    with _open(args) as store:
        if args.service is not None:
            outcomes = [store.refresh(args.service, args.username, due_only=args.due)]
        else:
            outcomes = store.refresh_due()
    failed = 0
    for o in outcomes:
        label = f"service {o.service!r}, user {o.username!r}"
        if o.result == "refreshed":
            print(f"{label}: refreshed (version {o.version})")
        elif o.result in ("failed", "waited-failed", "timed-out", "backoff"):
            failed += 1
            why = o.summary or ("another process's refresh failed" if o.result == "waited-failed"
                                else "another process is still refreshing it")
            sys.stderr.write(f"{PROG}: error: {label}: refresh failed: {_one_line(why)}\n")
        else:
            print(f"{label}: {o.result.replace('-', ' ')}")
    return ExpiredError.exit_code if failed else 0


def cmd_seal(args: argparse.Namespace) -> int:
    """Seal the vault: refuse every credential request until unseal (emergency stop)."""
    with _open(args) as store:
        store.seal()
    sys.stderr.write(f"{PROG}: sealed: every credential request is refused (exit 6) until "
                     f"{PROG} unseal\n")
    return 0


def cmd_unseal(args: argparse.Namespace) -> int:
    """Lift the seal, after proving the root key (the key file, or the passphrase) again."""
    from pathlib import Path

    key_file = Path(args.key_file) if args.key_file else None
    with _open(args) as store:
        store.unseal(prompt=_prompt_once if _tty() else None, key_file=key_file)
    sys.stderr.write(f"{PROG}: unsealed\n")
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    """Explain what access control would do with a request (exit 0 allowed, 4, 5, 6)."""
    from .location import default_actor

    with _open(args) as store:
        found = store.explain(args.actor if args.actor is not None else default_actor(),
                              args.op, args.service)
    code = (6 if found.sealed else 4 if not found.allowed else 5 if found.limited else 0)
    verdict = {0: "allowed", 4: "denied", 5: "rate limited now", 6: "sealed"}[code]
    if args.json:
        print(_json({"actor": found.actor, "op": found.op, "service": found.service,
                     "decision": "allow" if found.allowed else "deny", "reason": found.reason,
                     "result": verdict, "configured": not found.unconfigured,
                     "sealed": found.seal is not None,
                     "limits": [{"rule": lim.rule, "tokens": round(lim.tokens, 3),
                                 "retry_after": round(lim.retry_after, 3)}
                                for lim in found.limits]}))
        return code
    target = "the whole vault" if found.service is None else f"service {_shown(found.service)}"
    print(f"request: actor {_shown(found.actor)}, {found.op} {target}")
    if found.unconfigured:
        print("policy: none configured (default_policy allow)")
    print(f"decision: {'allow' if found.allowed else 'deny'}: {_one_line(found.reason)}")
    if not found.limits:
        print("rate limits: none apply")
    for lim in found.limits:
        wait = f"; next token in {lim.retry_after:.1f} s" if lim.retry_after else ""
        print(f"rate limit: {_one_line(lim.rule)}: {lim.tokens:.2f} tokens now{wait}")
    if found.seal is not None:
        print(f"note: the vault is sealed (since {_stamp(found.seal[0])}); every credential "
              "request is refused until unseal")
    print(f"result: {verdict}")
    return code


def _agent_client(args: argparse.Namespace) -> Any:
    from .agentproto import AgentStore, socket_path
    from .location import Location

    location = Location.resolve(args.home)
    path = Path(args.socket) if getattr(args, "socket", None) else socket_path(location)
    return AgentStore(path, location)


def cmd_agent_start(args: argparse.Namespace) -> int:
    """Unlock the vault once and serve it from a background agent; prints the socket path."""
    import subprocess

    from .agentproto import socket_path
    from .location import Location
    from .passphrase import provider

    location = Location.resolve(args.home)
    location.check_home()
    path = Path(args.socket) if args.socket else socket_path(location)
    secret = None
    if _vault_uses_passphrase(location):
        from .config import load_config

        # Asked here, where the terminal is; handed to the agent through a pipe.
        secret = provider(load_config(location.config_file, location.config_required),
                          _prompt_once if _tty() else None)()
    argv = [sys.executable, "-m", "keyring_hardened", "agent", "run", "--detached",
            "--home", str(location.home), "--socket", str(path),
            "--idle-timeout", args.idle_timeout]
    if args.max_lifetime:
        argv += ["--max-lifetime", args.max_lifetime]
    # This interpreter and this package, no shell: nothing in argv comes from elsewhere.
    # The passphrase goes through the pipe only: the agent's environment keeps none.
    env = {k: v for k, v in os.environ.items()
           if k not in ("KEYRING_HARDENED_PASSPHRASE", "KEYRING_HARDENED_NEW_PASSPHRASE")}
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,  # noqa: S603
                             stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                             env=env)
    if child.stdin is None or child.stderr is None:  # pragma: no cover - PIPE always gives both
        raise StorageError("the agent could not be started")
    with contextlib.suppress(BrokenPipeError):
        child.stdin.write(((secret or "") + "\n").encode("utf-8", "surrogatepass"))
    child.stdin.close()
    # The agent says "ready" on stderr once its socket answers, or why it failed.
    line = child.stderr.readline().decode("utf-8", "replace").strip()
    child.stderr.close()
    if line != "ready":
        code = child.wait(timeout=60)
        sys.stderr.write(f"{PROG}: error: {_one_line(line.removeprefix(PROG + ': error: '))}\n"
                         if line else f"{PROG}: error: the agent did not start\n")
        return code or 8
    print(path)
    return 0


def _vault_uses_passphrase(location: Any) -> bool:
    from .config import load_config
    from .engines import engine
    from .rootkey import KdfParams

    config = load_config(location.config_file, location.config_required)
    storage = engine(config).open(location.database, config.synchronous, config.busy_timeout)
    try:
        return KdfParams.from_json(storage.vault().kdf).uses_passphrase
    finally:
        storage.close()


def cmd_agent_run(args: argparse.Namespace) -> int:
    """Run the agent in the foreground (for a systemd user service or a supervisor)."""
    from .agent import run
    from .agentproto import socket_path
    from .config import parse_duration
    from .location import Location
    from .store import Store

    location = Location.resolve(args.home)
    path = Path(args.socket) if args.socket else socket_path(location)
    idle = parse_duration(args.idle_timeout, "--idle-timeout")
    lifetime = parse_duration(args.max_lifetime, "--max-lifetime") if args.max_lifetime \
        else None
    first = sys.stdin.readline().rstrip("\n") if args.detached else ""
    given = [first or None]

    def opener(passphrase: str | None) -> Any:
        secret, given[0] = passphrase or given[0], None  # the piped one serves once
        store = Store.open(location.home, passphrase=secret,
                           prompt=_prompt_once if _tty() and not args.detached else None)
        # Once unlocked, nothing in this process unlocks again by itself: after
        # a lock, an unlock must bring the passphrase (or passphrase_command).
        os.environ.pop("KEYRING_HARDENED_PASSPHRASE", None)
        return store

    def ready() -> None:
        sys.stderr.write("ready\n")
        sys.stderr.flush()
        if args.detached:  # from here on nobody reads our stderr
            _quiet_stdio()
        else:
            sys.stderr.write(f"{PROG}: agent serving {location.home} at {path}\n")

    try:
        return run(location, path, idle, lifetime, opener, ready)
    except HardenedError as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(str(exc))}\n")
        return exc.exit_code


def _quiet_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def cmd_agent_status(args: argparse.Namespace) -> int:
    """Show whether an agent serves the vault: locked or unlocked, idle time left, requests."""
    with _agent_client(args) as client:
        info = client.request("status")
    if args.json:
        print(_json(info))
        return 0
    print(f"agent: running (pid {info['pid']}), {info['state']}, at {_shown(info['socket'])}")
    if info.get("idle_left") is not None:
        print(f"locks after {int(info['idle_left'])} s more idle")
    print(f"requests served: {info['served']}")
    return 0


def cmd_agent_lock(args: argparse.Namespace) -> int:
    """Wipe the agent's keys; it keeps serving "locked" (exit 6) until unlock."""
    with _agent_client(args) as client:
        client.request("lock")
    return 0


def cmd_agent_unlock(args: argparse.Namespace) -> int:
    """Unlock the agent again (the key file, or the passphrase asked here)."""
    from .config import load_config
    from .location import Location
    from .passphrase import provider

    location = Location.resolve(args.home)
    secret = None
    if _vault_uses_passphrase(location):
        secret = provider(load_config(location.config_file, location.config_required),
                          _prompt_once if _tty() else None)()
    with _agent_client(args) as client:
        client.request("unlock", passphrase=secret)
    return 0


def cmd_agent_stop(args: argparse.Namespace) -> int:
    """Stop the agent (its keys are wiped)."""
    with _agent_client(args) as client:
        client.request("stop")
        # Return once it is gone, so that a start right after finds the place free.
        deadline = time.monotonic() + 10
        while client.path.is_socket() and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


#: A checkpoint is one short JSON line.
_CHECKPOINT_LIMIT = 64 * 1024


def _read_checkpoint(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from pathlib import Path

    from ._files import read_trusted

    try:
        if path == "-":
            raw = sys.stdin.buffer.read(_CHECKPOINT_LIMIT + 1)
            if len(raw) > _CHECKPOINT_LIMIT:
                raise UsageError(f"checkpoint on stdin is larger than {_CHECKPOINT_LIMIT} bytes")
        else:
            # No link, FIFO or device; capped; nobody else may have written it.
            raw = read_trusted(Path(path), "checkpoint", _CHECKPOINT_LIMIT, private=False)
        doc = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise UsageError(f"checkpoint {path} cannot be read: {exc.strerror}") from None
    except (ValueError, AttributeError):  # also UnicodeDecodeError; closed stdin
        raise UsageError(f"checkpoint {path} is not JSON") from None
    if not isinstance(doc, dict):
        raise UsageError(f"checkpoint {path} is not a keyring-hardened audit checkpoint")
    return doc


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Verify the audit chain (exit 3 naming the first bad event)."""
    from pathlib import Path

    checkpoint = _read_checkpoint(args.from_checkpoint)
    with _open(args) as store:
        if args.file:
            result = store.trail.verify_file(Path(args.file), checkpoint)
        else:
            result = store.trail.verify(checkpoint)
    where = f"audit file {args.file}" if args.file else "audit trail"
    print(f"{where}: intact: {result.verified} events verified, head event {result.head_seq}"
          + (", matches the checkpoint" if checkpoint else ""))
    return 0


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    """Write the head of the chain (seq and mac) for safekeeping elsewhere."""
    to_file = bool(args.file and args.file != "-")
    path = _out_path(args.file, "checkpoint") if to_file else None
    with _open(args) as store:
        doc = store.trail.checkpoint(path)
    if to_file:
        sys.stderr.write(f"checkpoint at event {doc['seq']} written to {args.file}\n")
    else:
        sys.stdout.write(json.dumps(doc) + "\n")
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    """Show audit events, newest first: who did what to which credential."""
    from .audit import parse_since

    since = parse_since(args.since, time.time()) if args.since else None
    with _open(args) as store:
        events = store.trail.show(since=since, service=args.service, actor=args.actor,
                                  op=args.op, limit=args.limit)
    if args.json:
        for e in events:
            sys.stdout.write(_json(e.to_json()) + "\n")
    elif events:
        # Every cell escaped: the reason of an export holds a path someone chose.
        _table([["TIME", "ACTOR", "OP", "SERVICE", "USERNAME", "OUTCOME", "KEY", "REASON"]]
               + [[_stamp(e.ts_us / 1_000_000), _cell(e.actor), _cell(e.op), _cell(e.service),
                   _cell(e.username), _cell(e.outcome),
                   str(e.key_version) if e.key_version is not None else "-",
                   _shown(e.reason) if e.reason else ""]
                  for e in events], sys.stdout)
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    """Export every kept event, with chain fields, as JSON lines."""
    target = _out_path(args.file, "export")
    with _open(args) as store:
        count = store.trail.export(target)
    sys.stderr.write(f"{_plural(count, 'event')} written to {_one_line(args.file)}\n")
    return 0


def cmd_audit_prune(args: argparse.Namespace) -> int:
    """Archive events older than the retention to a JSON-lines file."""
    from .config import parse_duration

    keep = parse_duration(args.keep, "--keep") if args.keep is not None else None
    archive = _out_path(args.archive, "archive")
    with _open(args) as store:
        count = store.trail.prune(archive, keep)
    sys.stderr.write(f"{_plural(count, 'event')} archived to {_one_line(args.archive)}\n"
                     if count else "no events older than the retention\n")
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    """List KEK versions: state, creation time, data keys wrapped, wrap count."""
    with _open(args) as store:
        keys = store.keys.versions()
    if args.json:
        sys.stdout.write(_json([{"version": k.version, "state": k.state,
                                 "created_at": _stamp(k.created_at), "data_keys": k.data_keys,
                                 "wrap_count": k.wrap_count} for k in keys]) + "\n")
    else:
        _table([["VERSION", "STATE", "CREATED", "DATA KEYS", "WRAPS"]]
               + [[str(k.version), k.state, _stamp(k.created_at), str(k.data_keys),
                   str(k.wrap_count)] for k in keys], sys.stdout)
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    """Add a KEK version; new writes use it at once."""
    with _open(args) as store:
        version = store.keys.rotate()
    sys.stderr.write(f"key version {version} is active; older versions stay readable "
                     f"(run: {PROG} key rewrap, then key retire --below {version})\n")
    return 0


def _progress() -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A progress bar on a terminal (tqdm if installed, else a plain counter)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        def plain(done: int, total: int) -> None:
            sys.stderr.write(f"\rrewrapped {done}/{total}")
            sys.stderr.flush()

        def newline() -> None:
            sys.stderr.write("\n")
        return plain, newline
    bar = tqdm(total=0, unit="key", desc="rewrap", file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    return update, bar.close


def cmd_key_rewrap(args: argparse.Namespace) -> int:
    """Re-wrap data keys under older KEK versions with the newest, in batches."""
    progress, finish = _progress()
    try:
        with _open(args) as store:
            summary = store.keys.rewrap(batch=args.batch, progress=progress)
    finally:
        finish()
    rate = summary.rewrapped / summary.seconds if summary.seconds else 0.0
    sys.stderr.write(f"rewrapped {_plural(summary.rewrapped, 'data key')} to key version "
                     f"{summary.target_version} in {_plural(summary.batches, 'batch', 'batches')} "
                     f"({summary.seconds:.1f}s, {rate:,.0f}/s); none left under older versions\n")
    return 0


def cmd_key_retire(args: argparse.Namespace) -> int:
    """Retire KEK versions below N (refused while anything uses them)."""
    with _open(args) as store:
        retired = store.keys.retire(args.below)
    noun = "key version" if len(retired) == 1 else "key versions"
    sys.stderr.write(f"retired {noun} {', '.join(map(str, retired))}\n" if retired
                     else f"no key versions below {args.below} to retire\n")
    return 0


def _new_passphrase() -> str:
    value = os.environ.get("KEYRING_HARDENED_NEW_PASSPHRASE")
    if value:
        return value
    if not _tty():
        raise UsageError("a new passphrase is needed: set KEYRING_HARDENED_NEW_PASSPHRASE or "
                         "run on a terminal")
    return _prompt_new()


def cmd_key_rekey(args: argparse.Namespace) -> int:
    """Replace the root key (new key file or passphrase, or switch modes)."""
    with _open(args) as store:
        current = store.mode
        target = "passphrase" if args.passphrase else "key file" if args.key_file else current
        if args.kdf and target != "passphrase":
            raise UsageError("--kdf applies only to a passphrase")
        secret = _new_passphrase() if target == "passphrase" else None
        message = store.keys.rekey(to=target, passphrase=secret, kdf=args.kdf)
    sys.stderr.write(message + "\n")
    return 0


# -- moving in and keeping a copy (issue 14) ----------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    """Import credentials from another keyring backend, each read back before it counts."""
    from pathlib import Path

    from . import moving

    kr = moving.current_backend() if args.from_current else moving.load_backend(args.source)
    name = args.source or moving._class_path(kr)
    entries = moving.read_entries(Path(args.entries)) if args.entries else \
        moving.list_entries(kr)
    bar: Any = None
    progress = None
    if sys.stderr.isatty() and entries:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the test extra
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=len(entries), unit="entry", desc="import", file=sys.stderr)

            def progress(done: int, total: int) -> None:
                bar.update(done - bar.n)
    existed = _vault_exists(args.home, lenient=True)
    try:
        # Like a first set, a first import makes a key-file vault (never a dry run).
        with _open(args, create=not args.dry_run) as store:
            if not existed:
                sys.stderr.write(f"{PROG}: created a new key-file vault at "
                                 f"{store.location.home}; back up {store.location.key_file}: "
                                 "without it the vault cannot be opened\n")
            report = moving.import_entries(store, kr, entries, source=name, update=args.update,
                                           dry_run=args.dry_run,
                                           delete_source=args.delete_source,
                                           progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        sys.stdout.write(_json(report.to_json()) + "\n")
    else:
        for r in report.results:
            who = f"service {_shown(r.service)}, user {_shown(r.username)}"
            if args.dry_run:
                sys.stdout.write(f"{r.outcome}: {who}" + (f": {_one_line(r.detail)}"
                                                          if r.detail else "") + "\n")
            elif r.outcome == "failed" or r.source == "delete-failed":
                sys.stderr.write(f"{PROG}: {r.outcome if r.outcome == 'failed' else 'source'}: "
                                 f"{who}: {_one_line(r.detail or '')}\n")
            elif r.outcome == "skipped":
                sys.stderr.write(f"skipped: {who}: {r.detail}\n")
        c = report.counts()
        would = "would be " if args.dry_run else ""
        sys.stderr.write(f"{would}imported {c['imported']}, {would}updated {c['updated']}, "
                         f"{would}skipped {c['skipped']}, failed {c['failed']}"
                         + (f"; deleted from the source {c['source_deleted']}"
                            if args.delete_source else "") + f" (from {_one_line(name)})\n")
    return _import_exit(report)


def _import_exit(report: Any) -> int:
    """0 when nothing failed; else the code of the first failed entry's class."""
    for r in report.results:
        if r.outcome == "failed" or r.source == "delete-failed":
            return int(r.code)
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """Write a verified online copy of the vault (still encrypted) to PATH, 0600."""
    from . import backup

    target = _out_path(args.path, "backup")
    with _open(args) as store:
        report = backup.backup(store, target)
    if args.json:
        sys.stdout.write(_json(report.to_json()) + "\n")
        return 0
    keep = (f"the key file {report.key_file}" if report.key_file
            else "the passphrase")
    print(f"backup written to {_one_line(report.path)} ({report.bytes:,} bytes, mode 0600), "
          "verified")
    print(f"vault id: {report.vault_id}")
    print(f"credentials: {report.credentials} live, {report.deleted} deleted, "
          f"{report.versions} versions")
    print(f"audit events: {report.audit_events}, head event {report.head_seq} "
          f"(mac {report.head_mac[:16]}...)")
    print(f"the copy is useless without the root key: keep {keep} apart from it, never in the "
          "same place or the same backup set")
    return 0


def cmd_migrate_storage(args: argparse.Namespace) -> int:
    """Copy the vault into an empty PostgreSQL database or new SQLite file, verified."""
    from .migrate import migrate_storage

    with _open(args) as store:
        report = migrate_storage(store, args.to)
    if args.json:
        sys.stdout.write(_json(report._asdict()) + "\n")
        return 0
    print(f"copied {report.rows:,} rows to {_one_line(report.target)} and verified them entry "
          f"by entry: {report.credentials} credentials, {report.versions} versions, "
          f"{report.audit_events} audit events (head event {report.head_seq}) intact")
    if args.to.startswith("sqlite:"):
        print("to use it: put it in place as a vault home's vault.db, and drop [storage] url "
              "(and KEYRING_HARDENED_STORAGE_URL)")
    else:
        print("to use it: set [storage] url to it on every client; each client keeps the "
              "root key (key file or passphrase) as before")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Replace the vault with a verified backup copy; the replaced vault is kept beside it."""
    from pathlib import Path

    from . import backup

    report = backup.restore(Path(args.path), args.home,
                            key_file=Path(args.key_file) if args.key_file else None,
                            allow_rollback=args.allow_rollback, force=args.force,
                            prompt=_prompt_once if _tty() else None)
    if args.json:
        sys.stdout.write(_json(report.to_json()) + "\n")
    else:
        print(f"restored {_one_line(report.path)}: vault id {report.vault_id}, "
              f"{report.credentials} credentials, head event {report.head_seq}")
        if report.replaced:
            print(f"the replaced vault is kept as {_one_line(report.replaced)}")
    if report.rollback:
        sys.stderr.write(f"{PROG}: warning: this restore rolled the vault back: events after "
                         f"{report.head_seq - 1} up to {report.replaced_head_seq} are undone "
                         f"(they remain in {report.replaced})\n")
    if report.foreign:
        sys.stderr.write(f"{PROG}: warning: the vault was replaced by a copy of another vault "
                         f"({report.vault_id})\n")
    for note in [*report.notes, *([report.key_file_note] if report.key_file_note else [])]:
        sys.stderr.write(f"{PROG}: note: {_one_line(note)}\n")
    return 0


# -- parser -------------------------------------------------------------------


def _refresh_args(p: argparse.ArgumentParser, ahead_none: bool = False) -> None:
    """--refresh-command | --refresher, and --refresh-ahead (set and ttl)."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--refresh-command", metavar="CMD",
                       help="renew the value with this command (split like a shell would, "
                            "run without one); its stdout is the new secret")
    which.add_argument("--refresher", metavar="NAME[:ARG]",
                       help="renew the value with an installed Python refresher "
                            "(built in: generate[:BYTES], file:/PATH)")
    p.add_argument("--refresh-ahead", metavar="DUR|none" if ahead_none else "DUR",
                   help="refresh this long before expiry; reads keep the current value")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``keyring-hardened``."""
    common = _Parser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="vault home (default: $KEYRING_HARDENED_HOME or keyring's data root)")
    parser = _Parser(prog=PROG, description="Administer a keyring-hardened vault.",
                     parents=[common])
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int],
            *names: str) -> argparse.ArgumentParser:
        doc = (func.__doc__ or "").split("\n")[0]
        p = sub.add_parser(name, help=doc, description=doc, parents=[common])
        for n in names:
            p.add_argument(n)
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init)
    p.add_argument("--passphrase", action="store_true",
                   help="passphrase mode (Argon2id) instead of a key file")
    p.add_argument("--kdf", choices=["argon2id", "pbkdf2"],
                   help="key derivation for --passphrase (default: argon2id)")

    p = add("set", cmd_set, "service", "username")
    p.add_argument("--no-strip", action="store_true",
                   help="keep a trailing newline read from stdin")
    p.add_argument("--allow-empty", action="store_true",
                   help="store an empty secret (refused by default)")
    p.add_argument("--ttl", metavar="DUR",
                   help="the value expires after this long (90s, 15m, 12h, 30d); reads then "
                        "fail with exit 7")
    _refresh_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="report the stored version")

    p = add("get", cmd_get, "service", "username")
    p.add_argument("--version", type=_count, metavar="N", help="read kept version N")

    p = add("delete", cmd_delete, "service", "username")
    p.add_argument("--purge", action="store_true", help="wipe every kept version too")

    p = add("list", cmd_list)
    p.add_argument("--json", action="store_true", help="JSON output")

    p = add("history", cmd_history, "service", "username")
    p.add_argument("--json", action="store_true", help="JSON output")

    p = add("rollback", cmd_rollback, "service", "username")
    p.add_argument("--version", type=_count, metavar="N",
                   help="version to restore (default: the one before the current)")
    p.add_argument("--allow-expired", action="store_true",
                   help="restore a version past its expiry (its TTL then counts anew)")

    # TTL and refresh (refresh.py)
    p = add("ttl", cmd_ttl, "service", "username")
    p.add_argument("duration", nargs="?", metavar="DUR|none",
                   help="the current value expires this long from now (none: never)")
    _refresh_args(p, ahead_none=True)
    p.add_argument("--no-refresh", action="store_true", help="remove the refresher")
    p = add("refresh", cmd_refresh)
    p.add_argument("service", nargs="?")
    p.add_argument("username", nargs="?")
    p.add_argument("--due", action="store_true",
                   help="only what is expired or inside its refresh-ahead window")

    add("upgrade", cmd_upgrade)

    p = add("status", cmd_status)
    p.add_argument("--json", action="store_true", help="JSON output")

    agent = sub.add_parser("agent", help="the unlock agent", parents=[common],
                           description="The unlock agent: one unlock per session.")
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="ACTION", required=True)

    def add_agent(name: str, func: Callable[[argparse.Namespace], int]
                  ) -> argparse.ArgumentParser:
        doc = (func.__doc__ or "").split("\n")[0]
        p = agent_sub.add_parser(name, help=doc, description=doc, parents=[common])
        p.add_argument("--socket", metavar="PATH",
                       help="the socket (default: $KEYRING_HARDENED_AGENT_SOCK or HOME/agent.sock)")
        p.set_defaults(func=func)
        return p

    for name, func in (("start", cmd_agent_start), ("run", cmd_agent_run)):
        p = add_agent(name, func)
        p.add_argument("--idle-timeout", default="8h", metavar="DUR",
                       help="lock after this long without requests (default 8h)")
        p.add_argument("--max-lifetime", metavar="DUR", help="stop after this long")
        if name == "run":
            p.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    p = add_agent("status", cmd_agent_status)
    p.add_argument("--json", action="store_true", help="JSON output")
    add_agent("lock", cmd_agent_lock)
    add_agent("unlock", cmd_agent_unlock)
    add_agent("stop", cmd_agent_stop)

    add("seal", cmd_seal)
    p = add("unseal", cmd_unseal)
    p.add_argument("--key-file", metavar="PATH",
                   help="prove the root key with this key file (default: the vault's own)")
    policy = sub.add_parser("policy", help="access policy commands", parents=[common],
                            description="Access policies and rate limits.")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    doc = (cmd_policy_test.__doc__ or "").split("\n")[0]
    p = policy_sub.add_parser("test", help="explain a request's decision", description=doc,
                              parents=[common])
    p.add_argument("--actor", metavar="A", help="the actor (default: this process's own)")
    p.add_argument("--service", metavar="S",
                   help="the service (leave out for admin, or list of the whole vault)")
    p.add_argument("--op", required=True, choices=["read", "write", "delete", "list", "admin"])
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_policy_test)

    keys = sub.add_parser("key", help="key management commands", parents=[common],
                          description="Key management: list, rotate, rewrap, retire, rekey.")
    keys_sub = keys.add_subparsers(dest="key_command", metavar="ACTION", required=True)

    def add_key(name: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        doc = (func.__doc__ or "").split("\n")[0]
        p = keys_sub.add_parser(name, help=doc, description=doc, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add_key("list", cmd_key_list)
    p.add_argument("--json", action="store_true", help="JSON output")
    add_key("rotate", cmd_key_rotate)
    p = add_key("rewrap", cmd_key_rewrap)
    p.add_argument("--batch", type=_int_arg(1, 1_000_000), default=1000, metavar="N",
                   help="data keys per transaction (default 1000)")
    p = add_key("retire", cmd_key_retire)
    p.add_argument("--below", type=_count, required=True, metavar="N")
    p = add_key("rekey", cmd_key_rekey)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--passphrase", action="store_true",
                      help="a new passphrase (or switch to one)")
    mode.add_argument("--key-file", action="store_true", help="a new key file (or switch to one)")
    p.add_argument("--kdf", choices=["argon2id", "pbkdf2"], help="KDF for the new passphrase")

    trail = sub.add_parser("audit", help="audit trail commands", parents=[common],
                           description="The audit trail: verify, checkpoint, show, export, "
                                       "prune.")
    trail_sub = trail.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    def add_audit(name: str, func: Callable[[argparse.Namespace], int]
                  ) -> argparse.ArgumentParser:
        doc = (func.__doc__ or "").split("\n")[0]
        p = trail_sub.add_parser(name, help=doc, description=doc, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add_audit("verify", cmd_audit_verify)
    p.add_argument("--from-checkpoint", metavar="FILE",
                   help="also check against a checkpoint (detects truncation); - for stdin")
    p.add_argument("--file", metavar="FILE", help="verify an export or archive file instead")
    p = add_audit("checkpoint", cmd_audit_checkpoint)
    p.add_argument("file", nargs="?", help="write here (default: stdout)")
    p = add_audit("show", cmd_audit_show)
    p.add_argument("--json", action="store_true", help="JSON lines")
    p.add_argument("--since", metavar="WHEN",
                   help="a date, date-time, weekday, today, yesterday, or a duration like 3d")
    p.add_argument("--service", metavar="GLOB")
    p.add_argument("--actor", metavar="GLOB")
    p.add_argument("--op", metavar="OP", help="read, write, delete, purge, rollback, list, ...")
    p.add_argument("--limit", type=_count, metavar="N")
    p = add_audit("export", cmd_audit_export)
    p.add_argument("file")
    p = add_audit("prune", cmd_audit_prune)
    p.add_argument("--archive", required=True, metavar="FILE",
                   help="JSON-lines file to receive the pruned events")
    p.add_argument("--keep", metavar="DUR", help="retention (default: [audit] keep)")

    config = sub.add_parser("config", help="configuration commands", parents=[common],
                            description="Configuration commands.")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    doc = (cmd_config_check.__doc__ or "").split("\n")[0]
    p = config_sub.add_parser("check", help="validate the config file", description=doc,
                              parents=[common])
    p.set_defaults(func=cmd_config_check)

    # Moving in and keeping a copy (issue 14).
    p = add("import", cmd_import)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", metavar="BACKEND",
                        help="a keyring backend: class path (as keyring -b takes) or "
                             "entry-point name")
    source.add_argument("--from-current", action="store_true",
                        help="the backend keyring would use if this one were not installed")
    p.add_argument("--entries", metavar="FILE",
                   help="the entries to import: service<TAB>username lines or a JSON list "
                        "(needed when the source cannot be listed)")
    p.add_argument("--dry-run", action="store_true", help="say what would happen; change nothing")
    p.add_argument("--update", action="store_true",
                   help="an existing credential gets the imported value as a new version "
                        "(default: skipped)")
    p.add_argument("--delete-source", action="store_true",
                   help="delete each entry from the source once its copy reads back equal")
    p.add_argument("--json", action="store_true", help="a JSON report on stdout")
    p = add("backup", cmd_backup, "path")
    p.add_argument("--json", action="store_true", help="JSON output")
    # A shared vault on PostgreSQL (issue 15, docs/teams.md).
    p = add("migrate-storage", cmd_migrate_storage)
    p.add_argument("--to", required=True, metavar="URL",
                   help="an empty target: postgresql://USER@HOST/DB or sqlite:///ABSOLUTE/PATH "
                        "(no password in it: PGPASSFILE or [storage] password_command)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p = add("restore", cmd_restore, "path")
    p.add_argument("--key-file", metavar="FILE",
                   help="the key file that opens the copy (default: the vault's)")
    p.add_argument("--allow-rollback", action="store_true",
                   help="restore a copy older than the vault (events since are undone)")
    p.add_argument("--force", action="store_true",
                   help="replace the vault with a copy of another vault, or a vault that "
                        "cannot be read")
    p.add_argument("--json", action="store_true", help="JSON output")
    return parser


def _log_to_stderr() -> None:
    """Warnings to stderr as Python's last-resort handler would, but not notices twice.

    A session's notices reach the logger and the session's list; the CLI
    prints the list (``note:``), so the logger's copy is dropped here.
    """
    import logging

    logger = logging.getLogger("keyring_hardened")
    if any(getattr(h, "_kh_cli", False) for h in logger.handlers):
        return
    class Stderr(logging.Handler):
        _kh_cli = True

        def emit(self, record: logging.LogRecord) -> None:
            # sys.stderr looked up now: it may have been replaced since.
            sys.stderr.write(self.format(record) + "\n")

    handler = Stderr(logging.WARNING)
    handler.addFilter(lambda record: not getattr(record, "notice", False))
    logger.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not hasattr(args, "home"):
        args.home = None
    _log_to_stderr()
    try:
        try:
            code = int(args.func(args))
            sys.stdout.flush()  # here, not at exit: a full disk (> /dev/full) is an error of ours
            return code
        finally:
            while _OPENED:
                _print_notices(_OPENED.pop())
    except HardenedError as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(str(exc))}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader (say, head) stopped reading: not an error of ours.
        _drop_stdout()
        return 0
    except OSError as exc:
        # An OS condition on a path the tool chose, that no layer below named:
        # storage unavailable (exit 8), never an internal error.
        _drop_stdout()
        where = (f"{_one_line(os.fsdecode(exc.filename))}: " if exc.filename is not None
                 else "output: " if exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT)
                 else "")
        sys.stderr.write(f"{PROG}: error: {where}{exc.strerror or type(exc).__name__}\n")
        return StorageError.exit_code
    except Exception as exc:
        if _debug():
            raise
        # The type only: an unexpected exception's text could hold anything.
        sys.stderr.write(f"{PROG}: internal error ({type(exc).__name__}); "
                         "set KEYRING_HARDENED_DEBUG=1 for a traceback\n")
        return EXIT_INTERNAL


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is left stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # no stdout to quiet
