"""Moving in: import credentials from another keyring backend (issue 14).

An adapter, like the keyring backend: it talks to other keyring backends
(keyrings.alt's file keyrings, keyrings.cryptfile, the Secret Service, or
any backend given ``--entries``) and makes one store call per entry.

Every value is read through the source's own ``get_password``, so whatever
unlocking the source needs happens as usual (its password prompt, or
``KEYRING_PROPERTY_KEYRING_KEY``, which keyring applies to every backend
it makes). Each entry is written with :meth:`Store.import_secret
<keyring_hardened.store.Store.import_secret>` (the write path of ``set``,
audited as ``import`` with the source named), read back and compared, and
only then, with ``delete_source``, deleted from the source.
"""

from __future__ import annotations

import configparser
import importlib
import inspect
import json
import os
import stat
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from . import gate
from .errors import ConfigError, HardenedError, UsageError
from .store import Store

__all__ = ["Entry", "EntryResult", "ImportReport", "current_backend", "import_entries",
           "list_entries", "load_backend", "read_entries"]

#: The largest ``--entries`` file read (about 100,000 long lines).
ENTRIES_LIMIT = 16 << 20
#: The largest peer file listed (keyrings.alt rewrites it whole on every set).
SOURCE_FILE_LIMIT = 256 << 20
#: Our own backend: importing from it would read and write the same vault.
_OURS = "keyring_hardened.backend.HardenedKeyring"
#: Outcomes, in the order a summary lists them.
OUTCOMES = ("imported", "updated", "skipped", "failed")


class Entry(NamedTuple):
    """One credential of the source, named (never its value)."""

    service: str
    username: str


class EntryResult(NamedTuple):
    """What happened to one entry; never its value."""

    service: str
    username: str
    #: imported, updated, skipped, failed; with dry_run: would-import, would-update, would-skip
    outcome: str
    version: int | None = None
    #: Why it failed or was skipped (names and error classes, never a value).
    detail: str | None = None
    #: The source entry afterwards: kept, deleted, or delete-failed.
    source: str = "kept"
    #: The exit code of the failure's class (0 when none): the store's own
    #: errors keep theirs; 1 when the source has no such entry; 8 when the
    #: source could not be read or deleted from; 3 when the copy read back
    #: different.
    code: int = 0


@dataclass
class ImportReport:
    """Every entry's outcome, and the counts a summary prints."""

    source: str
    dry_run: bool
    results: list[EntryResult] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many entries had each outcome (dry runs count what would happen)."""
        found = dict.fromkeys(OUTCOMES, 0)
        for r in self.results:
            key = r.outcome.removeprefix("would-")
            found[key] = found.get(key, 0) + 1
        found["source_deleted"] = sum(r.source == "deleted" for r in self.results)
        found["source_delete_failed"] = sum(r.source == "delete-failed" for r in self.results)
        return found

    @property
    def ok(self) -> bool:
        """True when no entry failed and every asked-for source deletion happened."""
        return not any(r.outcome == "failed" or r.source == "delete-failed"
                       for r in self.results)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON object (``--json``)."""
        return {"source": self.source, "dry_run": self.dry_run, "counts": self.counts(),
                "entries": [r._asdict() for r in self.results]}


# -- finding the source -------------------------------------------------------


def _class_path(kr: object) -> str:
    cls = type(kr)
    return f"{cls.__module__}.{cls.__qualname__}"


def _instantiate(cls: type) -> Any:
    """Make a backend as ``keyring -b`` does: check it is viable here, then construct it."""
    import keyring.backend

    if not (isinstance(cls, type) and issubclass(cls, keyring.backend.KeyringBackend)):
        raise UsageError(f"{cls!r} is not a keyring backend")
    if f"{cls.__module__}.{cls.__qualname__}" == _OURS:
        raise UsageError("the source is keyring-hardened itself; name the keyring to move from")
    name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        cls.priority  # noqa: B018 - raises when the backend cannot work here
    except Exception as exc:  # noqa: BLE001 - a third-party backend may raise anything
        # Its reason: a missing module or platform, never a value.
        raise UsageError(f"keyring backend {name} is not usable here "
                         f"({type(exc).__name__}: {exc})") from None
    try:
        kr = cls()
        # keyring's KEYRING_PROPERTY_* settings (the file path, the peer's
        # password): keyring applies them in KeyringBackend.__init__, which
        # the keyrings.alt and keyrings.cryptfile file keyrings never call.
        kr.set_properties_from_env()
    except Exception as exc:  # noqa: BLE001 - a third-party backend may raise anything
        # The type only: the message could quote a setting, a password included.
        raise UsageError(f"keyring backend {name} cannot be opened with the given settings "
                         f"({type(exc).__name__}; a wrong KEYRING_PROPERTY_KEYRING_KEY?)"
                         ) from None
    return kr


def load_backend(name: str) -> Any:
    """The backend ``name`` names: a class path (as ``keyring -b`` takes) or an entry-point name.

    An entry point of group ``keyring.backends`` names a module; its one
    viable backend class is used, or the error lists the class paths to
    choose from when it has several.
    """
    if not name or not name.isprintable():
        raise UsageError("--from needs a keyring backend name")
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, class_name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise UsageError(f"no keyring backend {name} ({type(exc).__name__})") from None
        return _instantiate(cls)
    from importlib import metadata

    import keyring.backend

    found = [ep for ep in metadata.entry_points(group="keyring.backends") if ep.name == name]
    if not found:
        raise UsageError(f"no keyring backend named {name}: give a class path (like "
                         "keyrings.alt.file.PlaintextKeyring) or an entry-point name "
                         "(keyring --list-backends shows what is installed)")
    try:
        module = found[0].load()
    except Exception as exc:  # noqa: BLE001 - a third-party plugin may raise anything
        raise UsageError(f"keyring backend {name} cannot be loaded ({type(exc).__name__})"
                         ) from None
    classes = sorted({c for _, c in inspect.getmembers(module, inspect.isclass)
                      if issubclass(c, keyring.backend.KeyringBackend)
                      and c.__module__ == getattr(module, "__name__", None)
                      and not inspect.isabstract(c) and _viable(c)},
                     key=lambda c: c.__qualname__)
    if len(classes) != 1:
        choices = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in classes) or "none"
        raise UsageError(f"keyring entry point {name} offers {len(classes)} usable backends "
                         f"({choices}); give one by its class path")
    return _instantiate(classes[0])


def _viable(cls: type) -> bool:
    try:
        return bool(cls.priority is not None)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - keyring's own test for viability
        return False


def current_backend() -> Any:
    """The backend keyring would pick if keyring-hardened were not installed.

    ``PYTHON_KEYRING_BACKEND``, then keyring's config file, then the
    viable backend of highest priority; whichever names this backend (or
    the chainer, which would include it) is passed over.
    """
    import keyring.core
    from keyring.backend import get_all_keyring
    from keyring.backends import chainer, fail

    for load in (keyring.core.load_env, keyring.core.load_config):
        try:
            chosen = load()
        except Exception as exc:  # noqa: BLE001 - keyring raises what the named class raises
            raise UsageError(f"keyring's configured backend cannot be loaded "
                             f"({type(exc).__name__}: {exc})") from None
        if chosen is not None and _class_path(chosen) != _OURS:
            return chosen
    candidates = [kr for kr in get_all_keyring()
                  if _class_path(kr) != _OURS
                  and not isinstance(kr, chainer.ChainerBackend | fail.Keyring)]
    if not candidates:
        raise UsageError("keyring finds no other usable backend to import from")
    return max(candidates, key=lambda kr: kr.priority)


# -- listing -----------------------------------------------------------------


def _file_base(kr: object) -> type | None:
    """The keyrings.alt or keyrings.cryptfile file keyring class ``kr`` derives from."""
    for cls in type(kr).__mro__:
        if cls.__name__ == "Keyring" and cls.__module__ in ("keyrings.alt.file_base",
                                                            "keyrings.cryptfile.file_base"):
            return cls
    return None


def list_entries(kr: Any) -> list[Entry]:
    """Every entry a listable source holds, by name; UsageError for one that cannot be listed."""
    base = _file_base(kr)
    if base is not None:
        return _file_entries(kr, base)
    if _class_path(kr) == "keyring.backends.SecretService.Keyring":
        return _secret_service_entries(kr)
    raise UsageError(f"keyring backend {_class_path(kr)} cannot list its entries; name them "
                     "with --entries FILE (service<TAB>username lines, or a JSON list)")


def _file_entries(kr: Any, base: type) -> list[Entry]:
    """The (service, username) pairs of a keyrings.alt or keyrings.cryptfile INI file.

    Sections and options are the escaped names; they are unescaped with the
    peer's own function. configparser lower-cases option names, so these
    peers keep user names in lower case: the import gets what they hold.
    """
    escape = importlib.import_module(base.__module__.rpartition(".")[0] + ".escape")
    path = Path(kr.file_path)
    try:
        # Never blocking: a FIFO at the path must not hang the import.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UsageError(f"the source file {path} does not exist (set "
                         "KEYRING_PROPERTY_FILE_PATH to the keyring's file)") from None
    except OSError as exc:
        raise UsageError(f"the source file {path} cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"the source file {path} is not a regular file")
        if st.st_size > SOURCE_FILE_LIMIT:
            raise UsageError(f"the source file {path} is larger than {SOURCE_FILE_LIMIT} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(SOURCE_FILE_LIMIT + 1)
    finally:
        os.close(fd)
    config = configparser.RawConfigParser()
    try:
        config.read_string(raw.decode("utf-8"), source=str(path))
    except (UnicodeDecodeError, configparser.Error) as exc:
        raise UsageError(f"the source file {path} is not a keyring file "
                         f"({type(exc).__name__})") from None
    # Encrypted peers keep their password check and scheme in this section.
    settings = escape.escape("keyring-setting") if hasattr(kr, "_unlock") else None
    found = []
    for section in config.sections():
        if section == settings:
            continue
        for option in config.options(section):
            try:
                found.append(Entry(escape.unescape(section), escape.unescape(option)))
            except (ValueError, UnicodeError):
                raise UsageError(f"the source file {path} holds a name that is not escaped "
                                 "as its keyring writes names") from None
    return found


def _secret_service_entries(kr: Any) -> list[Entry]:
    """The entries keyring wrote to the Secret Service (items with keyring's application id)."""
    scheme = kr.schemes[kr.scheme]
    collection = kr.get_preferred_collection()
    found = []
    with closing(collection.connection):
        for item in collection.search_items({"application": kr.appid}):
            attributes = item.get_attributes()
            service, username = attributes.get(scheme["service"]), attributes.get(
                scheme["username"])
            if isinstance(service, str) and isinstance(username, str) and service:
                found.append(Entry(service, username))
    return sorted(set(found))


def read_entries(path: Path) -> list[Entry]:
    """Entries named in a file: ``service<TAB>username`` lines, or a JSON list of objects.

    Blank lines are skipped; a user name may be empty (``service<TAB>``).
    A malformed line or item is an error naming it (exit 2). Repeats are
    dropped.
    """
    from ._files import read_trusted

    try:
        # Not a link, not a FIFO, capped; others may read it but not write it.
        raw = read_trusted(path, "entries file", ENTRIES_LIMIT, private=False)
    except FileNotFoundError:
        raise UsageError(f"entries file {path} does not exist") from None
    except ConfigError:
        raise
    except OSError as exc:
        raise UsageError(f"entries file {path} cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise UsageError(f"entries file {path} is not UTF-8 text") from None
    entries: list[Entry] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"entries file {path} is not valid JSON (line {exc.lineno})"
                             ) from None
        if not isinstance(items, list):
            raise UsageError(f"entries file {path} is not a JSON list")
        for n, item in enumerate(items, 1):
            if not (isinstance(item, dict) and isinstance(item.get("service"), str)
                    and isinstance(item.get("username"), str) and item["service"]):
                raise UsageError(f"entries file {path}: item {n} is not an object with a "
                                 "service and a username (strings)")
            entries.append(Entry(item["service"], item["username"]))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0]:
                raise UsageError(f"entries file {path}: line {n} is not service<TAB>username")
            entries.append(Entry(parts[0], parts[1]))
    return list(dict.fromkeys(entries))


# -- importing ----------------------------------------------------------------


def _failure(exc: BaseException) -> str:
    """An error as a report shows it: our messages (which never hold a value), else the type.

    A foreign backend's message could quote anything, a value included.
    """
    if isinstance(exc, HardenedError):
        return str(exc)
    return f"{type(exc).__name__} from the source"


def import_entries(store: Store, kr: Any, entries: Iterable[Entry], *, source: str,
                   update: bool = False, dry_run: bool = False, delete_source: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Import ``entries`` from the backend ``kr`` into ``store``, one transaction each.

    A failed entry is reported by name and the rest go on. Each stored
    value is read back and compared; only then, with ``delete_source``, is
    it deleted from the source, so the source keeps every entry whose copy
    failed, was skipped, or did not read back equal. ``dry_run`` reads
    the source but writes nothing anywhere.
    """
    if delete_source and dry_run:
        raise UsageError("--delete-source and --dry-run exclude each other")
    gate.require_admin(store, "import")
    todo = list(entries)
    report = ImportReport(source, dry_run)
    existing = {(c.service, c.username) for c in store.credentials()} if dry_run else set()
    for n, entry in enumerate(todo, 1):
        report.results.append(_one(store, kr, entry, source=source, update=update,
                                   dry_run=dry_run, delete_source=delete_source,
                                   existing=existing))
        if progress is not None:
            progress(n, len(todo))
    return report


def _one(store: Store, kr: Any, entry: Entry, *, source: str, update: bool, dry_run: bool,
         delete_source: bool, existing: set[tuple[str, str]]) -> EntryResult:
    service, username = entry
    try:
        value = kr.get_password(service, username)
    except Exception as exc:  # noqa: BLE001 - a third-party backend may raise anything
        return EntryResult(service, username, "failed",
                           detail=f"reading it from the source failed ({_failure(exc)})",
                           code=8)
    if value is None:
        return EntryResult(service, username, "failed", detail="the source has no such entry",
                           code=1)
    if not isinstance(value, str):
        return EntryResult(service, username, "failed",
                           detail="the source returned something other than text", code=8)
    if dry_run:
        there = (service, username) in existing
        outcome = "would-update" if there and update else "would-skip" if there \
            else "would-import"
        return EntryResult(service, username, outcome)
    try:
        outcome, version = store.import_secret(service, username, value, source=source,
                                               update=update)
    except HardenedError as exc:
        return EntryResult(service, username, "failed", detail=str(exc), code=exc.exit_code)
    if outcome == "skipped":
        return EntryResult(service, username, outcome, detail="exists (use --update)")
    try:
        same = store.get(service, username).reveal() == value
    except HardenedError as exc:
        return EntryResult(service, username, "failed", version,
                           detail=f"reading the copy back failed: {exc}", code=exc.exit_code)
    if not same:
        return EntryResult(service, username, "failed", version,
                           detail="the copy did not read back equal; the source keeps it",
                           code=3)
    if not delete_source:
        return EntryResult(service, username, outcome, version)
    try:
        kr.delete_password(service, username)
    except Exception as exc:  # noqa: BLE001 - a third-party backend may raise anything
        return EntryResult(service, username, outcome, version,
                           detail=f"deleting it from the source failed ({_failure(exc)})",
                           source="delete-failed", code=8)
    return EntryResult(service, username, outcome, version, source="deleted")
