"""Audit sinks: copies of each committed event outside the vault.

Configured by ``[audit] sinks = ["syslog", "file:PATH"]``. A sink receives
an event only after its transaction committed, so it never shows an
operation that did not happen. A failing sink cannot undo the operation;
it is reported through the ``keyring_hardened.audit`` logger instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .audit import Event

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
                # O_APPEND: concurrent writers each add whole lines; 0600 like the vault.
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, (line + "\n").encode("utf-8"))
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("audit sink file:%s failed: %s", path, exc.strerror)
        if self._syslog:
            self._syslog_log().info("keyring-hardened audit %s", line)

    def _syslog_log(self) -> logging.Logger:
        if self._syslog_logger is None:
            from logging.handlers import SysLogHandler

            logger = logging.getLogger("keyring_hardened.audit.syslog")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            if not logger.handlers:
                # The local daemon's socket, else its UDP port on loopback.
                address: str | tuple[str, int] = SYSLOG_SOCKET \
                    if os.path.exists(SYSLOG_SOCKET) else ("localhost", 514)
                logger.addHandler(SysLogHandler(address=address,
                                                facility=SysLogHandler.LOG_AUTH))
            self._syslog_logger = logger
        return self._syslog_logger
