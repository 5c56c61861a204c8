"""Non-interactive passphrase sources: the environment and ``passphrase_command``.

Adapters add the interactive source (a TTY prompt) on top of these.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from .config import Config
from .errors import LockedError
from .location import ENV_PASSPHRASE

__all__ = ["PassphraseProvider", "from_environment", "provider"]

#: Returns the passphrase, or raises :class:`LockedError` when none can be had.
PassphraseProvider = Callable[[], str]

_COMMAND_TIMEOUT = 30.0
#: The most a helper may print before its first newline: a passphrase is a line.
_OUTPUT_LIMIT = 64 * 1024

#: What the helper inherits: enough to find programs, locale and the user's
#: agents (gpg-agent, ssh-agent, the D-Bus secret service, a pinentry's
#: display), nothing else. In particular no KEYRING_HARDENED_* variable: a
#: rekey holds the *new* passphrase in KEYRING_HARDENED_NEW_PASSPHRASE.
_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME",
    "DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY", "GNUPGHOME", "GPG_TTY",
    "SSH_AUTH_SOCK", "SYSTEMROOT",
})
_ENV_PREFIXES = ("LC_", "PASSWORD_STORE_")


def _helper_env() -> dict[str, str]:
    """The scrubbed environment a passphrase helper runs with."""
    return {k: v for k, v in os.environ.items()
            if k in _ENV_NAMES or k.startswith(_ENV_PREFIXES)}


def from_environment(config: Config) -> str | None:
    """``KEYRING_HARDENED_PASSPHRASE``, else the output of ``passphrase_command``, else None."""
    value = os.environ.get(ENV_PASSPHRASE)
    if value:
        return value
    if config.passphrase_command:
        return run_command(config.passphrase_command)
    return None


def _kill_group(pid: int) -> None:
    """Kill the helper and everything it started (its own session, see below)."""
    import signal

    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _read_line(fd: int, deadline: float) -> bytes | None:
    """Bytes up to the first newline, or to EOF; None when the deadline passes first."""
    import selectors

    data = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return bytes(data)
            data += chunk
            end = data.find(b"\n")
            if end >= 0:
                # The answer is complete: a background job the helper left
                # holding its stdout must not cost the rest of the timeout.
                return bytes(data[:end])
            if len(data) > _OUTPUT_LIMIT:
                raise LockedError(f"passphrase_command: printed more than {_OUTPUT_LIMIT} "
                                  "bytes without a newline")


def run_command(argv: tuple[str, ...], label: str = "passphrase_command") -> str:
    """Run ``passphrase_command`` (or another helper, named ``label``): its first line.

    No shell, a scrubbed environment, its own session (a timeout kills the
    whole group), a bounded wait and a capped answer; its stderr is never
    shown, since a failing helper may print what it was given.
    """
    import subprocess  # only here: it costs import time on every unlock otherwise

    # argv, never a shell: the command line in config is not interpreted.
    # Its own session, so a timeout kills the whole group it starts, not only
    # the direct child; its stderr is dropped (a failing helper may print what
    # it was given).
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # noqa: S603
                                stderr=subprocess.DEVNULL, env=_helper_env(),
                                start_new_session=True, close_fds=True)
    except FileNotFoundError:
        raise LockedError(f"{label}: program {argv[0]!r} not found") from None
    except OSError as exc:
        raise LockedError(f"{label}: cannot run {argv[0]!r}: {exc.strerror}") from None
    deadline = time.monotonic() + _COMMAND_TIMEOUT
    if proc.stdout is None:  # pragma: no cover - stdout=PIPE above
        raise LockedError(f"{label}: no output pipe")
    try:
        line = _read_line(proc.stdout.fileno(), deadline)
        if line is None:
            raise LockedError(f"{label}: no answer within {_COMMAND_TIMEOUT:.0f}s")
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise LockedError(f"{label}: did not exit within "
                              f"{_COMMAND_TIMEOUT:.0f}s") from None
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if code != 0:
        raise LockedError(f"{label}: {argv[0]!r} exited with status {code}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise LockedError(f"{label}: output is not UTF-8 text") from None
    text = text.removesuffix("\r")
    if not text:
        raise LockedError(f"{label}: printed an empty "
                          f"{'passphrase' if label == 'passphrase_command' else 'password'}")
    return text


def provider(config: Config, prompt: PassphraseProvider | None = None) -> PassphraseProvider:
    """A provider trying the environment, the command, then ``prompt`` if given."""

    def get() -> str:
        value = from_environment(config)
        if value is not None:
            return value
        if prompt is not None:
            return prompt()
        raise LockedError("this vault needs a passphrase: set KEYRING_HARDENED_PASSPHRASE, "
                          "configure passphrase_command, or run on a terminal", "no-passphrase")

    return get
