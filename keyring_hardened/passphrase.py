"""Non-interactive passphrase sources: the environment and ``passphrase_command``.

Adapters add the interactive source (a TTY prompt) on top of these.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .config import Config
from .errors import LockedError
from .location import ENV_PASSPHRASE

__all__ = ["PassphraseProvider", "from_environment", "provider"]

#: Returns the passphrase, or raises :class:`LockedError` when none can be had.
PassphraseProvider = Callable[[], str]

_COMMAND_TIMEOUT = 30.0


def from_environment(config: Config) -> str | None:
    """``KEYRING_HARDENED_PASSPHRASE``, else the output of ``passphrase_command``, else None."""
    value = os.environ.get(ENV_PASSPHRASE)
    if value:
        return value
    if config.passphrase_command:
        return _run_command(config.passphrase_command)
    return None


def _run_command(argv: tuple[str, ...]) -> str:
    import subprocess  # only here: it costs import time on every unlock otherwise

    # argv, never a shell: the command line in config is not interpreted.
    try:
        done = subprocess.run(argv, capture_output=True, timeout=_COMMAND_TIMEOUT,  # noqa: S603
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise LockedError(f"passphrase_command: program {argv[0]!r} not found") from None
    except subprocess.TimeoutExpired:
        raise LockedError(f"passphrase_command: no answer within {_COMMAND_TIMEOUT:.0f}s") from None
    except OSError as exc:
        raise LockedError(f"passphrase_command: cannot run {argv[0]!r}: {exc.strerror}") from None
    if done.returncode != 0:
        # Its stderr is not shown: a failing helper may print what it was given.
        raise LockedError(f"passphrase_command: {argv[0]!r} exited with status {done.returncode}")
    try:
        text = done.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise LockedError("passphrase_command: output is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise LockedError("passphrase_command: printed an empty passphrase")
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
