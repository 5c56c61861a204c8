"""One behavioural suite, two engines: the store's tests run on SQLite and on PostgreSQL.

Every test of the modules in :data:`BOTH` runs twice, ``[sqlite]`` and
``[postgresql]``; the PostgreSQL run points ``KEYRING_HARDENED_STORAGE_URL``
at a fresh, empty database (``pg_url``, tests/conftest_pg.py), in this
process and in every process it starts. Nothing else differs: the same
test body, the same assertions.

A test that opens the SQLite file itself (it edits rows behind the vault's
back, reads raw pages, copies ``vault.db``) is about SQLite's file and runs
on SQLite only: found by its source naming the file or the driver, or
marked ``sqlite_only`` with a reason. The attacks it makes have their
PostgreSQL counterparts in tests/test_pg_shared.py.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest

#: The behavioural suite run against both engines.
BOTH = frozenset({
    "test_store.py", "test_cli.py", "test_access.py", "test_policies.py", "test_audit.py",
    "test_keys.py", "test_backend.py", "test_refresh.py",
})

#: Words in a test's source that mean it works on the SQLite file itself.
_FILE_LEVEL = ("sqlite3", "vault.db", "big_vault", "-wal", ".database")


@functools.cache
def _file_helpers(path: str) -> tuple[str, ...]:
    """The module's own helpers that open the SQLite file (a test calling one does too)."""
    import ast

    source = Path(path).read_text("utf-8")
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("test_"):
            text = ast.get_source_segment(source, node) or ""
            if any(word in text for word in _FILE_LEVEL):
                found.append(f"{node.name}(")
    return tuple(found)


def pytest_configure(config: pytest.Config) -> None:
    """Declare the marker."""
    config.addinivalue_line("markers", "sqlite_only(reason): a test of SQLite's own file; "
                                       "not run on PostgreSQL")


def sqlite_only(function: object, marker: pytest.Mark | None, path: str) -> bool:
    """Whether a test runs on SQLite only (marked, or it opens the file, itself or by a helper)."""
    if marker is not None:
        return True
    try:
        source = inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    return any(word in source for word in (*_FILE_LEVEL, *_file_helpers(path)))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise the suite of :data:`BOTH` over the engines."""
    if "storage_engine" not in metafunc.fixturenames:
        return
    if Path(str(metafunc.definition.fspath)).name not in BOTH:
        return
    engines = ["sqlite"]
    if not sqlite_only(metafunc.function, metafunc.definition.get_closest_marker("sqlite_only"),
                       str(metafunc.definition.fspath)):
        engines.append("postgresql")
    metafunc.parametrize("storage_engine", engines, indirect=True)


@pytest.fixture(autouse=True)
def storage_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                   _isolate: None) -> str:
    """The engine this test runs on; PostgreSQL: a fresh database, for every process."""
    name: str = getattr(request, "param", "sqlite")
    if name == "postgresql":
        url = request.getfixturevalue("pg_url")
        monkeypatch.setenv("KEYRING_HARDENED_STORAGE_URL", url)
    return name
