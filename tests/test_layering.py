"""Architecture rules that the code must keep."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import keyring_hardened

PACKAGE = Path(keyring_hardened.__file__).parent
ADAPTERS = {"backend.py", "cli.py", "__main__.py", "moving.py", "pgpassword.py"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_core_imports_with_adapters_blocked() -> None:
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("keyring", "ansible", "argparse"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import tempfile, pathlib
        import keyring_hardened
        from keyring_hardened import testing
        for m in ("errors", "secret", "envelope", "rootkey", "config", "location",
                  "passphrase", "storage", "session", "store", "audit", "trail", "keys",
                  "sinks"):
            __import__("keyring_hardened." + m)
        with testing.temporary_store() as s:
            s.set("a", "b", "c")
            assert s.get("a", "b").reveal() == "c"
        assert keyring_hardened.Store is not None
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_core_modules_never_import_adapters_or_frameworks() -> None:
    for path in PACKAGE.glob("*.py"):
        if path.name in ADAPTERS:
            continue
        assert not _imports(path) & {"keyring", "ansible", "argparse"}, path.name


def test_only_storage_imports_sqlite3() -> None:
    users = {p.name for p in PACKAGE.glob("*.py") if "sqlite3" in _imports(p)}
    assert users == {"storage.py"}


def test_only_the_private_module_touches_primitives() -> None:
    users = {p.name for p in PACKAGE.glob("*.py") if "cryptography" in _imports(p)}
    assert users == {"_aead.py"}
    importers = {p.name for p in PACKAGE.glob("*.py")
                 if "_aead" in p.read_text("utf-8") and p.name != "_aead.py"}
    assert importers <= {"envelope.py", "rootkey.py"}


PUBLIC = {
    "Config", "ConfigError", "CredentialInfo", "DeniedError", "ExpiredError", "HardenedError",
    "IntegrityError", "LockedError", "NotFoundError", "RateLimitedError", "Secret",
    "StorageError", "Store", "UsageError", "VersionInfo", "__version__",
}


def test_public_surface_is_exact() -> None:
    # The curated surface is exactly this list: adding or dropping a public
    # name is a decision this test makes visible.
    assert set(keyring_hardened.__all__) == PUBLIC
    assert len(keyring_hardened.__all__) == len(PUBLIC)
    assert dir(keyring_hardened) == sorted(PUBLIC)
    from keyring_hardened import errors, secret, store

    for name in PUBLIC - {"__version__"}:
        value = getattr(keyring_hardened, name)
        home = {"Secret": secret, "Store": store, "CredentialInfo": store,
                "VersionInfo": store}.get(name)
        if home is not None:
            assert value is getattr(home, name)
        elif name != "Config":
            assert value is getattr(errors, name)
    assert "Store" in dir(keyring_hardened)
    try:
        keyring_hardened.nothing_here  # noqa: B018
    except AttributeError:
        pass
    else:
        raise AssertionError("unknown attribute resolved")


def test_backend_import_is_light() -> None:
    """keyring imports the backend in every process: no SQLite or cryptography then."""
    code = ("import sys, keyring_hardened.backend; print(any(m.startswith(("
            "'keyring_hardened.storage', 'keyring_hardened.store', 'cryptography'))"
            " for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def _package_imports(path: Path) -> dict[str, bool]:
    """The package's modules that ``path`` imports anywhere (top level, in a
    function, or for type checking only), each with whether any import of it
    sits at module level."""
    found: dict[str, bool] = {}

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.ImportFrom):
                if child.level == 1 and child.module:
                    names = [child.module.split(".")[0]]
                elif child.level == 1:
                    names = [a.name for a in child.names]
                elif child.level == 0 and (child.module or "").startswith("keyring_hardened."):
                    names = [(child.module or "").split(".")[1]]
            elif isinstance(child, ast.Import):
                names = [a.name.split(".")[1] for a in child.names
                         if a.name.startswith("keyring_hardened.")]
            for name in names:
                found[name] = found.get(name, False) or top
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, inner)

    visit(ast.parse(path.read_text("utf-8")), True)
    return {name: top for name, top in found.items() if (PACKAGE / f"{name}.py").exists()}


def test_the_core_reaches_storage_through_the_port() -> None:
    # The core types against port.Storage; the engines (SQLite, PostgreSQL)
    # are named in one place, engines.py, and loaded there only when a vault
    # is opened with them.
    for engine in ("storage", "pgstorage"):
        users = {p.name for p in PACKAGE.glob("*.py") if engine in _package_imports(p)}
        assert users == {"engines.py"}, engine
        assert _package_imports(PACKAGE / "engines.py")[engine] is False
    for path in PACKAGE.glob("*.py"):
        assert "SQLiteStorage" not in path.read_text("utf-8") or path.name in {
            "storage.py", "engines.py"}, path.name
        assert "PostgresStorage" not in path.read_text("utf-8") or path.name in {
            "pgstorage.py"}, path.name


def test_the_schema_is_apart_from_row_access() -> None:
    # Tables and migrations live in schema.py (SQLite) and pgschema.py
    # (PostgreSQL); storage.py and pgstorage.py read and write rows.
    ddl = {p.name for p in PACKAGE.glob("*.py")
           if any(word in p.read_text("utf-8") for word in ("CREATE TABLE", "ALTER TABLE"))}
    assert ddl == {"schema.py", "pgschema.py"}
    assert "sqlite3" not in _imports(PACKAGE / "schema.py")
    assert "psycopg" not in _imports(PACKAGE / "pgschema.py")


def test_only_pgstorage_imports_the_postgresql_driver() -> None:
    users = {p.name for p in PACKAGE.glob("*.py") if "psycopg" in _imports(p)}
    assert users == {"pgstorage.py"}


def _import_graph() -> dict[str, set[str]]:
    return {p.stem: set(_package_imports(p)) - {p.stem} for p in PACKAGE.glob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph``, as a path that ends where it starts, or None."""
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = walk(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = walk(start, [])
        if found:
            return found
    return None


def test_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_flow_one_way() -> None:
    # Every import counts: at module level, inside a function, and those for
    # type checking only (a type named across modules is a dependency too).
    cycle = _cycle(_import_graph())
    assert cycle is None, " -> ".join(cycle or ())


def test_key_management_and_the_trail_sit_on_the_session() -> None:
    graph = _import_graph()
    assert "session" in graph["keys"]
    assert "session" in graph["trail"]
    assert not graph["session"] & {"keys", "trail", "store", "refresh"}
    # The session runs every operation through the gate; the gate sees the
    # session only through its Guarded protocol.
    assert "gate" in graph["session"]
    assert not graph["gate"] & {"session", "store"}
    # The port and the schema are below everything that uses them.
    assert graph["port"] <= {"audit", "errors"}
    assert graph["schema"] <= {"errors"}
