"""Private file helpers: durable, private (0600) writes that replace a file whole."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import UsageError

__all__ = ["fsync_dir", "fsync_file", "write_private"]


def fsync_file(path: Path) -> None:
    """Flush a file's contents to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or link in it) to stable storage."""
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fsync_file(path)


def write_private(path: Path, lines: Iterable[str]) -> int:
    """Write ``lines`` to ``path``, mode 0600 whatever the umask, replacing it atomically.

    A reader sees the old file or the whole new one, never a part; after a
    crash the new file is either complete or absent. Returns the line count.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return count
