"""Private file helpers: trusted opens, as ssh's StrictModes, and exclusive atomic writes.

Every file the tool *trusts* (key file, config, database, rekey journal and
lock, checkpoint, audit export or archive read back, file sinks) is opened
through :func:`open_trusted`:

* ``O_NOFOLLOW``: a symbolic link planted at the path is refused, never
  followed to a file its planter chose;
* ``O_NONBLOCK`` at open (then cleared): a FIFO or device at the path cannot
  hang the process waiting for a peer;
* the checks run on the *open descriptor* (``fstat``), so the file checked is
  the file read, with no window to swap it after the check;
* regular files only, owned by the effective user or root, and for private
  files not accessible to group or others;
* reads are capped (:func:`read_trusted`), so ``/dev/zero`` or a huge file
  cannot exhaust memory.

Files the tool writes whole are created under an unpredictable name with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (as :func:`tempfile.mkstemp` does), then
renamed over the target: a link planted at a guessable temporary name can
neither redirect nor truncate anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError, UsageError

__all__ = [
    "describe_owner",
    "fsync_dir",
    "fsync_file",
    "open_trusted",
    "read_trusted",
    "trust_problem",
    "trust_problems",
    "write_private",
]

#: Cap for small trusted files: config, checkpoint, rekey journal.
SMALL_FILE_LIMIT = 1 << 20

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)


def fsync_file(path: Path) -> None:
    """Flush a file's contents to stable storage."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or link in it) to stable storage."""
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fsync_file(path)


def _euid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else 0


def describe_owner(uid: int) -> str:
    """``name (uid N)`` for messages, or ``uid N`` when the user has no passwd entry."""
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError, OSError):
        return f"uid {uid}"


def trust_problems(st: os.stat_result, path: Path | str, what: str, *,
                   private: bool = True) -> list[str]:
    """Every reason a file with this ``stat`` may not be trusted (empty when it may).

    ``private``: the file holds or guards secrets (key file, config,
    database, journal, lock), so group and others may not even read it.
    Otherwise (an audit file read back, a sink) others may read it but
    nobody else may write it.
    """
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO"
                if stat.S_ISFIFO(st.st_mode) else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket"
                if stat.S_ISSOCK(st.st_mode) else "a symbolic link"
                if stat.S_ISLNK(st.st_mode) else "not a regular file")
        return [f"{what} {path} is {kind}, not a regular file"]
    problems = []
    # Root owns what the system installs; anyone else's file could be edited
    # or swapped by them (ssh's StrictModes accepts the same two owners).
    if st.st_uid not in (_euid(), 0):
        problems.append(f"{what} {path} is owned by {describe_owner(st.st_uid)}, not by you "
                        "or root; refusing to trust it")
    mode = stat.S_IMODE(st.st_mode)
    if private and mode & 0o077:
        problems.append(f"{what} {path} is accessible by group or others (mode {mode:04o}); "
                        f"run: chmod 600 {path}")
    if not private and mode & 0o022:
        problems.append(f"{what} {path} is writable by group or others (mode {mode:04o}); "
                        f"run: chmod go-w {path}")
    return problems


def trust_problem(st: os.stat_result, path: Path | str, what: str, *,
                  private: bool = True) -> str | None:
    """The first of :func:`trust_problems`, or None."""
    problems = trust_problems(st, path, what, private=private)
    return problems[0] if problems else None


def open_trusted(path: Path, what: str, *, flags: int = os.O_RDONLY, private: bool = True,
                 mode: int = 0o600, report: list[str] | None = None) -> int:
    """Open ``path`` without following a link or blocking; check the descriptor; return it.

    Trust failures raise :class:`ConfigError` (exit 2) naming the file and
    why; other ``OSError`` (not found, permission, read-only) propagate for
    the caller to classify. The descriptor is blocking again on return.
    With ``report``, owner and mode problems are appended to it instead of
    raised (``config check`` lists them all); a file that is not a regular
    file is refused even then.
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _NOCTTY, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise ConfigError(f"{what} {path} is a symbolic link; refusing to follow it "
                              "(point the setting at the file itself)") from None
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, opened for writing
            raise ConfigError(f"{what} {path} is a FIFO, not a regular file") from None
        if exc.errno == errno.EISDIR:
            raise ConfigError(f"{what} {path} is a directory, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        problems = trust_problems(st, path, what, private=private)
        if problems and (report is None or not stat.S_ISREG(st.st_mode)):
            raise ConfigError(problems[0])
        if report is not None:
            report.extend(problems)
        if _NONBLOCK:
            import fcntl  # POSIX only, where O_NONBLOCK exists

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_trusted(path: Path, what: str, limit: int = SMALL_FILE_LIMIT, *,
                 private: bool = True, report: list[str] | None = None) -> bytes:
    """The contents of a trusted file, refusing one larger than ``limit`` bytes."""
    fd = open_trusted(path, what, private=private, report=report)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes; refusing to read it")
    return b"".join(chunks)


def write_private(path: Path, lines: Iterable[str]) -> int:
    """Write ``lines`` to ``path``, mode 0600 whatever the umask, replacing it atomically.

    A reader sees the old file or the whole new one, never a part; after a
    crash the new file is either complete or absent. The temporary file has
    a random name and is created exclusively without following links, so
    nothing planted beside ``path`` is written through. Returns the line
    count. Any OS failure is a :class:`UsageError` naming ``path``: the
    caller chose it.
    """
    count = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    else:
        # Replacing a regular file or a link (the link itself, not its target)
        # is what was asked; renaming over a device, FIFO or socket would
        # destroy a node that is not ours to remove (think /dev/zero as root).
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise UsageError(f"cannot write {path}: not a regular file")
    for _attempt in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
                         0o600)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    else:  # pragma: no cover - 100 collisions of 64 random bits
        raise UsageError(f"cannot write {path}: no free temporary name")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            for line in lines:
                f.write((line + "\n").encode("utf-8"))
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    except UnicodeEncodeError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"cannot write {path}: text that is not valid UTF-8 "
                         "(an undecodable name?)") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return count
