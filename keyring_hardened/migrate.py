"""``migrate-storage``: copy a vault between engines, verified entry by entry.

SQLite to PostgreSQL (``--to postgresql://...``) and back
(``--to sqlite:///ABSOLUTE/PATH``). The copy is every row of the vault
(``schema.TABLE_COLUMNS``) from one consistent snapshot of the source,
written to an empty target in one transaction. Before the command says it
worked, the target is checked twice:

* **entry by entry**: every row read back from the target equals the row
  read from the source, table by table, column by column;
* **as a whole**: the target is opened with this vault's root key and its
  audit chain is verified under every epoch's key, and every credential row
  against the state root its newest event carries (what ``backup`` checks).

The ciphertexts and wrapped keys move as they are: nothing is decrypted,
and the root key never reaches the target (it stays with each client). The
source is not changed except for the ``migrate-storage`` event chained onto
it afterwards; the target's trail ends at the copied head. A target that
holds a vault already is refused (exit 2) and left alone.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import gate
from .errors import HardenedError, IntegrityError, UsageError
from .schema import TABLE_COLUMNS

if TYPE_CHECKING:
    from .operation import _Note
    from .port import Engine, Storage
    from .session import Session

__all__ = ["MigrateReport", "migrate_storage"]


class MigrateReport(NamedTuple):
    """What ``migrate-storage`` copied and verified (never a secret)."""

    target: str
    rows: int
    credentials: int
    versions: int
    audit_events: int
    head_seq: int


def _target(url: str, store: Session) -> tuple[Engine, Path, str]:
    """The engine, path and display name of ``--to``; refuses what cannot be a target."""
    from .config import check_url
    from .engines import file_engine, postgres_engine

    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            raise UsageError("--to: a SQLite target is sqlite:///ABSOLUTE/PATH")
        path = Path(url.removeprefix("sqlite://"))
        if path.name in ("", ".", ".."):
            raise UsageError("--to: sqlite:/// needs a file name")
        from .backup import _check_target

        # As for a backup: no link, no folder where others could replace the
        # copy or plant its journal, not the live vault's own files.
        _check_target(path, store.location, "migrate-storage target")
        if os.path.lexists(path):
            raise UsageError(f"--to: {path} exists; migrate-storage only fills a new, empty "
                             "target")
        if not path.parent.is_dir():
            raise UsageError(f"--to: folder {path.parent} does not exist")
        return file_engine(), path, str(path)
    # On the command line a password would be visible to every local user
    # (ps): refused, as in the config file.
    problem = check_url(url, in_config=True)
    if problem:
        raise UsageError(f"--to: {problem}".replace(
            "the config file may be read by others", "a command line is seen by other users"))
    target = postgres_engine(url, store.config)
    return target, Path(), str(getattr(target, "where", "PostgreSQL"))


def _same(a: Any, b: Any) -> bool:
    """Whether two stored values are the same entry, across engines' Python types."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (isinstance(a, float) and isinstance(b, float)
                          and math.isnan(a) and math.isnan(b))
    if isinstance(a, bytes | bytearray | memoryview) and isinstance(b, bytes | bytearray
                                                                  | memoryview):
        return bytes(a) == bytes(b)
    return type(a) is type(b) and a == b


def migrate_storage(store: Session, url: str) -> MigrateReport:
    """Copy the vault ``store`` holds into an empty target at ``url`` and verify it.

    Raises :class:`UsageError` for a bad or non-empty target,
    :class:`IntegrityError` when the target does not read back the same,
    and :class:`StorageError` when the target cannot be reached.
    """
    from .store import Store

    gate.require_admin(store, "migrate-storage")
    target, path, where = _target(url, store)
    from .engines import storage_url

    if storage_url(store.config) == url:
        raise UsageError("--to names the vault being copied")
    with store._guard() as storage, storage.snapshot():
        rows = {table: storage.export_rows(table) for table in TABLE_COLUMNS}
    made = False
    try:
        if not target.create_from(path, rows):
            raise UsageError(f"--to: {where} already holds a vault; migrate-storage only "
                             "fills an empty target", "target-not-empty")
        made = True
        copied = target.open(path, store.config.synchronous, store.config.busy_timeout)
        try:
            for table in TABLE_COLUMNS:
                back = copied.export_rows(table)
                if len(back) != len(rows[table]) or not all(
                        len(x) == len(y) and all(map(_same, x, y))
                        for x, y in zip(rows[table], back, strict=False)):
                    raise IntegrityError(f"migrate-storage: the target {where} does not read "
                                         f"back table {table} as written; do not use it",
                                         "migrate-mismatch")
        except BaseException:
            copied.close()
            raise
        check = Store._open_copy(store.location, store.config, path, root=store._root,
                                 clock=store._clock, actor=store.actor, storage=copied)
        try:
            facts = check._check_copy()
        finally:
            check.close()
    except HardenedError as exc:
        failure = exc
        if made:
            # Never leave a copy that failed its check where it could be used.
            with contextlib.suppress(HardenedError, OSError):
                target.discard(path)

        def failed(storage: Storage, note: _Note) -> None:
            raise failure

        store._run("migrate-storage", None, None, failed)
        raise  # pragma: no cover - _run raised the failure above

    def body(storage: Storage, note: _Note) -> None:
        note.reason = f"to {where}; head {facts['head_seq']}"

    store._run("migrate-storage", None, None, body)
    return MigrateReport(where, sum(len(r) for r in rows.values()),
                         int(facts["credentials"]), int(facts["versions"]),
                         int(facts["audit_events"]), int(facts["head_seq"]))
