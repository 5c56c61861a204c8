"""Audit sinks: copies of each committed event outside the vault.

Configured by ``[audit] sinks = ["syslog", "file:PATH"]``. A sink receives
an event only after its transaction committed, so it never shows an
operation that did not happen. A failing sink cannot undo the operation;
it is reported through the ``keyring_hardened.audit`` logger instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from pathlib import Path

from .audit import Event
from .errors import ConfigError

__all__ = ["Sinks"]

log = logging.getLogger("keyring_hardened.audit")

#: Where the "syslog" sink sends (the local syslog daemon's socket).
SYSLOG_SOCKET = "/dev/log"


class Sinks:
    """The configured sinks of one store."""

    def __init__(self, specs: tuple[str, ...]) -> None:
        self._files = [Path(s.removeprefix("file:")).expanduser() for s in specs
                       if s.startswith("file:")]
        self._syslog = "syslog" in specs
        self._syslog_logger: logging.Logger | None = None

    def emit(self, event: Event) -> None:
        """Mirror one committed event to every sink."""
        if not self._files and not self._syslog:
            return
        line = json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":"))
        for path in self._files:
            try:
                _append_line(path, (line + "\n").encode("utf-8", "backslashreplace"))
            except ConfigError as exc:
                log.warning("audit sink file:%s refused: %s", path, exc)
            except OSError as exc:
                log.warning("audit sink file:%s failed: %s", path, exc.strerror)
        if self._syslog:
            logger = self._syslog_log()
            if logger is not None:
                logger.info("keyring-hardened audit %s", line)

    def _syslog_log(self) -> logging.Logger | None:
        if self._syslog_logger is None:
            from logging.handlers import SysLogHandler

            class _Handler(SysLogHandler):
                def handleError(self, record: logging.LogRecord) -> None:
                    # Reported like a failing file sink, not as a traceback on stderr.
                    log.warning("audit sink syslog failed: cannot send to %s", SYSLOG_SOCKET)

            logger = logging.getLogger("keyring_hardened.audit.syslog")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            # Ours, not any handler: one an application (or a test harness)
            # put on this logger must not stand in for the syslog socket.
            if not any(isinstance(h, _Handler) or getattr(h, "_kh_syslog", False)
                       for h in logger.handlers):
                # The local daemon's socket only. No fallback to UDP on
                # localhost: that would send the trail unauthenticated to
                # whatever listens on port 514, and report success.
                try:
                    if not os.path.exists(SYSLOG_SOCKET):
                        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
                    handler = _Handler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_AUTH)
                    handler._kh_syslog = True  # type: ignore[attr-defined]
                    logger.addHandler(handler)
                except OSError as exc:
                    log.warning("audit sink syslog: cannot connect to %s: %s; events are not "
                                "copied to syslog", SYSLOG_SOCKET, exc.strerror)
                    self._syslog = False
                    return None
            self._syslog_logger = logger
        return self._syslog_logger


def _append_line(path: Path, data: bytes) -> None:
    """Append one whole line to a sink file, or nothing.

    Opened through the trusted-file checks (no link followed, no FIFO to
    hang on, a regular file of yours or root's that nobody else can write),
    created 0600. An exclusive ``flock`` is held while writing, so that after
    a short write (a full disk) the partial line can be cut off again
    without cutting another writer's line: lines are never spliced.
    """
    import fcntl

    from ._files import open_trusted

    fd = open_trusted(path, "audit sink", flags=os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                      private=False)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = os.fstat(fd).st_size
        done = 0
        try:
            while done < len(data):
                written = os.write(fd, data[done:])
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += written
        except OSError:
            if done:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)  # releases the lock
