"""Keeping a copy: online backup and verified restore (issue 14).

``backup`` copies the live vault with SQLite's online backup API, from the
store's own connection, as one consistent snapshot, while other processes
go on reading and writing. The copy is still encrypted. It is made in the
vault's private home, checked there as a whole (``audit verify``: the chain
under every epoch's key, its ends, and every row against the state root),
and only then written to the destination: 0600, under a random temporary
name created without following links, fsynced, renamed into place.

``restore`` copies the backup into the home, opens it with the root key and
checks it the same way, refuses a copy of another vault (``--force``) and a
copy older than the live vault (``--allow-rollback``), chains a ``restore``
event onto it, and only then replaces the live vault's rows in one SQLite
transaction, keeping what it replaced as ``vault.db.replaced-<timestamp>``.
See ``replace_with`` in :mod:`keyring_hardened.storage` (the SQLite engine
behind :class:`keyring_hardened.port.Storage`) for why the swap is a
transaction and not a file rename.

Copying ``vault.db`` with ``cp`` is not a backup: the newest commits live in
``vault.db-wal`` until a checkpoint, and a copy made while a writer works
can be torn (pages of different moments). ``restore`` refuses such a copy
when it does not verify, but it cannot make up what the copy lacks.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import gate
from ._files import fsync_dir
from ._seams import crash_point
from .errors import ConfigError, HardenedError, StorageError, UsageError
from .location import Location

if TYPE_CHECKING:
    from .config import Config
    from .passphrase import PassphraseProvider
    from .port import Storage
    from .session import Session

__all__ = ["BackupReport", "RestoreReport", "backup", "restore"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass
class BackupReport:
    """What ``backup`` wrote: the copy's identity and size, never a secret."""

    path: str
    vault_id: str
    credentials: int
    deleted: int
    versions: int
    audit_events: int
    head_seq: int
    head_mac: str
    epoch: int
    mode: str
    key_file: str | None
    bytes: int

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON object."""
        return dict(self.__dict__)


@dataclass
class RestoreReport:
    """What ``restore`` did."""

    path: str
    vault_id: str
    credentials: int
    audit_events: int
    head_seq: int
    replaced: str | None
    replaced_head_seq: int | None
    rollback: bool
    foreign: bool
    key_file_note: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON object."""
        return dict(self.__dict__)


def _remove(path: Path) -> None:
    """Remove a temporary file and any SQLite companion it grew (best effort)."""
    for leftover in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(OSError):
            os.unlink(leftover)


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _check_target(target: Path, location: Location, what: str = "backup") -> None:
    """Refuse a destination that would lose the copy, leak it, or hit something else.

    A link is refused (it would be replaced, not followed: say so instead
    of surprising); so is anything but a regular file (a FIFO, a device, a
    folder); so is a folder others can write without the sticky bit, where
    anyone could swap or delete the copy; so is the live vault itself.
    """
    if not target.name or target.name in (".", ".."):
        raise UsageError(f"{what} path {target} names no file")
    folder = target.parent
    try:
        fst = os.stat(folder)
    except FileNotFoundError:
        raise UsageError(f"{what} folder {folder} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} folder {folder} cannot be used: {exc.strerror}") from None
    if not stat.S_ISDIR(fst.st_mode):
        raise UsageError(f"{what} folder {folder} is not a folder")
    if fst.st_mode & stat.S_IWOTH and not fst.st_mode & stat.S_ISVTX:
        raise UsageError(f"{what} folder {folder} is writable by others and not sticky: anyone "
                         "could replace or delete the copy there; choose another folder")
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"{what} path {target} cannot be checked: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{what} path {target} is a symbolic link; give the file's own path")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} path {target} exists and is not a regular file")
    for live in (location.database, Path(f"{location.database}-wal"),
                 Path(f"{location.database}-shm"), location.key_file):
        if _same_file(target, live):
            raise UsageError(f"{what} path {target} is the live vault's own file {live}")


def _copy_bytes(src_fd: int, dst_fd: int) -> int:
    total = 0
    while chunk := os.read(src_fd, 1 << 20):
        view = memoryview(chunk)
        while view:
            written = os.write(dst_fd, view)
            view = view[written:]
            total += written
    return total


def _private_tmp(folder: Path, stem: str) -> tuple[Path, int]:
    """A new 0600 file under an unpredictable name, created without following links."""
    for _attempt in range(100):
        tmp = folder / f".{stem}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        except FileExistsError:
            continue
        os.fchmod(fd, 0o600)  # whatever the umask
        return tmp, fd
    raise StorageError(f"no free temporary name in {folder}")  # pragma: no cover


def _open_source(path: Path, what: str) -> int:
    """A read descriptor of a regular file: no link followed, no FIFO waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        if os.path.islink(path):
            raise UsageError(f"{what} {path} is a symbolic link; give the file's own "
                             "path") from None
        raise UsageError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{what} {path} is not a regular file")
    return fd


def _stage(source: Path, folder: Path, stem: str, what: str) -> Path:
    """Copy ``source`` into a private temporary file in ``folder``; returns its path."""
    src = _open_source(source, what)
    try:
        tmp, dst = _private_tmp(folder, stem)
        try:
            _copy_bytes(src, dst)
            os.fsync(dst)
        except OSError as exc:
            os.close(dst)
            _remove(tmp)
            raise StorageError(f"cannot copy {source} to {folder}: {exc.strerror}") from None
        os.close(dst)
    finally:
        os.close(src)
    return tmp


# -- backup ---------------------------------------------------------------------


def backup(store: Session, target: Path) -> BackupReport:
    """Write a verified, consistent copy of the vault ``store`` holds to ``target``.

    Other processes keep reading and writing meanwhile. The copy is checked
    as a whole with this session's root key before anything is written to
    ``target``; a copy that fails is never published. Audited as ``backup``
    (the path and the copy's head event as its reason).
    """
    from .engines import shared
    from .store import Store

    gate.require_admin(store, "backup")
    if shared(store.config):
        # A copy is a SQLite file checked by the SQLite engine; migrate-storage
        # makes one from PostgreSQL, verified entry by entry.
        raise UsageError("backup of a PostgreSQL vault: use keyring-hardened migrate-storage "
                         "--to sqlite:///FILE (a verified copy), and PostgreSQL's own backups",
                         "engine-refused")
    _check_target(target, store.location)
    home = store.location.home
    staged = home / f".backup.{secrets.token_hex(8)}.tmp"
    published: Path | None = None
    try:
        with store._guard() as storage:
            storage.backup_to(staged)
        try:
            copy = Store._open_copy(store.location, store.config, staged, root=store._root,
                                    clock=store._clock, actor=store.actor)
            try:
                facts = copy._check_copy()
            finally:
                copy.close()
        except HardenedError as exc:
            failure = exc

            def failed(storage: Storage, note: Any) -> None:
                raise failure

            store._run("backup", None, None, failed)
        # Publish: bytes of the checked copy into a private temporary file
        # beside the target (same file system, so the rename is atomic).
        src = _open_source(staged, "backup copy")
        try:
            tmp, dst = _private_tmp(target.parent, target.name)
            published = tmp
            try:
                size = _copy_bytes(src, dst)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

        def body(storage: Storage, note: Any) -> None:
            note.reason = f"to {_path_text(target)}; head {facts['head_seq']}"
            crash_point("backup-before-rename")
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise StorageError(f"cannot write backup {target}: {exc.strerror}") from None

        store._run("backup", None, None, body)
        published = None
        fsync_dir(target.parent)
    except OSError as exc:
        raise StorageError(f"cannot write backup {target}: {exc.strerror}") from None
    finally:
        _remove(staged)
        if published is not None:
            _remove(published)
    return BackupReport(
        path=str(target), vault_id=str(facts["vault_id"]), credentials=int(facts["credentials"]),
        deleted=int(facts["deleted"]), versions=int(facts["versions"]),
        audit_events=int(facts["audit_events"]), head_seq=int(facts["head_seq"]),
        head_mac=str(facts["head_mac"]), epoch=int(facts["epoch"]), mode=store.mode,
        key_file=None if store.mode == "passphrase" else str(store.location.key_file),
        bytes=size)


def _path_text(path: Path) -> str:
    """A path as the trail records it; a name that is not UTF-8 is refused, not mangled."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the backup path must be UTF-8 text") from None
    return text


# -- restore --------------------------------------------------------------------


def _stamp(ts: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts))


def _replaced_name(database: Path, now: float) -> Path:
    base = database.with_name(f"{database.name}.replaced-{_stamp(now)}")
    candidate, n = base, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}.{n}")
    return candidate


class _Live:
    """What restore reads of the live vault, raw: identity, newest event, newest key."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.vault_id = storage.vault().vault_id
        self.head = storage.audit_head()
        newest = storage.newest_events(1)
        #: The state root the vault's newest event carries (unverified: only compared).
        self.root = newest[0].root if newest else None
        self.key_version = max((k.version for k in storage.keks()), default=0)


def restore(source: Path, home: str | os.PathLike[str] | None = None, *,
            key_file: Path | None = None, allow_rollback: bool = False, force: bool = False,
            passphrase: str | None = None, prompt: PassphraseProvider | None = None,
            config: Config | None = None, clock: Any = time.time,
            actor: str | None = None) -> RestoreReport:
    """Replace the vault at ``home`` with the verified copy at ``source``.

    Order, each step a gate for the next: copy ``source`` into the home
    (the file checked is the file restored); open it with the root key
    (the home's key file, ``key_file``, or the passphrase sources) and
    check it as a whole; compare it with the live vault (another vault
    needs ``force``, an older state ``allow_rollback``; a live vault that
    cannot be read needs ``force``); chain a ``restore`` event onto it;
    then replace the live rows in one transaction, keeping the replaced
    ones as ``vault.db.replaced-<timestamp>``. Any refusal leaves the live
    vault as it was.
    """
    from .config import load_config
    from .engines import file_engine, shared
    from .location import make_home
    from .store import Store

    location = Location.resolve(home)
    if not os.path.lexists(location.home):
        make_home(location.home)
    location.check_home()
    cfg = config if config is not None else load_config(location.config_file,
                                                        location.config_required)
    if shared(cfg):
        raise UsageError("restore into a PostgreSQL vault: use keyring-hardened migrate-storage "
                         "--to URL from the backup file into an empty database, or PostgreSQL's "
                         "own restore", "engine-refused")
    database = location.database
    src_fd = _open_source(source, "backup file")  # refuse a bad path before any work
    try:
        if _same_file(source, database):
            raise UsageError(f"backup file {source} is the live vault itself")
    finally:
        os.close(src_fd)
    staged = _stage(source, location.home, "restore", "backup file")
    live: _Live | None = None
    live_error: HardenedError | None = None
    notes: list[str] = []
    try:
        keyed = location._replace(key_file=key_file) if key_file is not None else location
        copy = Store._open_copy(keyed, cfg, staged, passphrase=passphrase, prompt=prompt,
                                clock=clock, actor=actor)
        try:
            gate.require_admin(copy, "restore")
            facts = copy._check_copy()
            if os.path.lexists(database):
                try:
                    live = _Live(file_engine().open(database, cfg.synchronous, cfg.busy_timeout))
                except HardenedError as exc:
                    if isinstance(exc, ConfigError):
                        raise  # an untrusted vault file is not "damaged": never replace it
                    live_error = exc
            foreign = live is not None and live.vault_id != copy._vault.vault_id
            # The copy extends the vault (holds its newest event): nothing is undone.
            # Otherwise, a copy whose state equals the vault's undoes only events
            # that changed nothing (reads, backups, verifies): they stay in the
            # replaced vault, which is said. Any other copy is an older state.
            behind = live is not None and not foreign and not copy._holds_event(*live.head)
            rollback = behind and live is not None and live.root != facts["root"]
            if behind and not rollback and live is not None:
                notes.append(f"the vault's events after {facts['head_seq']} up to "
                             f"{live.head[0]} changed nothing (reads and the like); they "
                             "stay only in the replaced vault")
            if live_error is not None and not force:
                raise UsageError(f"the vault at {location.home} cannot be read ({live_error}); "
                                 "restore --force replaces it (it is kept beside it)")
            if foreign and not force:
                raise UsageError(f"{source} is a copy of another vault (id "
                                 f"{copy._vault.vault_id.hex()}, this one is "
                                 f"{live.vault_id.hex() if live else '-'}); restore --force "
                                 "replaces this vault with it")
            if rollback and not allow_rollback and live is not None:
                raise UsageError(f"{source} is an older state of this vault: its newest event is "
                                 f"{facts['head_seq']}, the vault's is {live.head[0]}, and the "
                                 "changes since would be undone; restore --allow-rollback does "
                                 "that (the replaced vault is kept)")
            reason = "; ".join(part for part in (
                "rollback" if rollback else "", "foreign" if foreign else "",
                "forced" if live_error is not None else "",
                f"copy-head {facts['head_seq']}",
                f"replaced-head {live.head[0]}" if live is not None else "no-vault") if part)
            copy._record_restore(reason, live.key_version if live is not None else 0)
        finally:
            copy.close()
        now = clock()
        replaced: Path | None = None
        if live is not None:
            replaced = _replaced_name(database, now)
            keep_tmp = location.home / f".{replaced.name}.{secrets.token_hex(8)}.tmp"
            try:
                live.storage.replace_with(staged, keep_tmp,
                                          None if allow_rollback or force else live.root,
                                          live.key_version)
                os.replace(keep_tmp, replaced)
                fsync_dir(location.home)
            finally:
                _remove(keep_tmp)
        else:
            if os.path.lexists(database):
                replaced = _replaced_name(database, now)
                _set_aside(database, replaced)
            fresh = file_engine().open_copy(staged, cfg.synchronous, cfg.busy_timeout)
            try:
                fresh.use_wal()
            finally:
                fresh.close()
            try:
                os.link(staged, database)
            except FileExistsError:
                raise StorageError(f"a vault appeared at {location.home} while restoring; "
                                   "nothing was changed: run restore again") from None
            fsync_dir(location.home)
    except OSError as exc:
        raise StorageError(f"restore into {location.home} failed: {exc.strerror}") from None
    finally:
        if live is not None:
            live.storage.close()
        _remove(staged)
    key_note = None
    if key_file is not None and not _same_file(key_file, location.key_file):
        key_note = (f"the restored vault opens with {key_file}, not with "
                    f"{location.key_file}: copy it there (mode 0600) or set "
                    "KEYRING_HARDENED_KEY_FILE to it")
    return RestoreReport(
        path=str(source), vault_id=str(facts["vault_id"]), credentials=int(facts["credentials"]),
        audit_events=int(facts["audit_events"]) + 1, head_seq=int(facts["head_seq"]) + 1,
        replaced=str(replaced) if replaced is not None else None,
        replaced_head_seq=live.head[0] if live is not None else None,
        rollback=rollback, foreign=foreign, key_file_note=key_note, notes=notes)


def _set_aside(database: Path, replaced: Path) -> None:
    """Move a damaged vault (and its WAL) aside under ``replaced`` (``--force``)."""
    os.rename(database, replaced)
    wal = Path(f"{database}-wal")
    if os.path.lexists(wal):
        os.rename(wal, Path(f"{replaced}-wal"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(f"{database}-shm"))
