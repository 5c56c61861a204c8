"""The claims ledger (docs/claims.md) matches the documents and the tests.

Every security claim a document makes is marked where it is made with
``<!-- claim: ID -->``; the ledger lists each id once, the documents that
mark it, and the tests that prove it. These checks read files only (no
subprocess, no import of the tests), so they cost a few milliseconds.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
LEDGER = ROOT / "docs" / "claims.md"
PROVEN = "## Proven claims"
PENDING = "## Claims awaiting a proof"

_ID = re.compile(r"[A-Z][A-Z0-9]*-[1-9][0-9]*")
_MARK = re.compile(r"<!--\s*claim:\s*(.*?)\s*-->", re.DOTALL)
_CODE_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)


class Row(NamedTuple):
    """One ledger row."""

    id: str
    claim: str
    documents: tuple[str, ...]
    tests: tuple[str, ...]
    proven: bool
    line: int


def _documents() -> list[Path]:
    """Every document that may make a claim (the ledger itself excluded)."""
    docs = sorted(p for p in (ROOT / "docs").glob("*.md") if p != LEDGER)
    return [*docs, ROOT / "README.md", ROOT / "ansible_collection" / "README.md"]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _cells(line: str) -> list[str]:
    """The cells of a table row; ``\\|`` is a pipe inside a cell."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def _ticked(cell: str, sep: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("`").strip() for part in cell.split(sep) if part.strip())


@cache
def ledger() -> tuple[Row, ...]:
    """The rows of both tables of the ledger, in order."""
    rows: list[Row] = []
    section = ""
    for number, line in enumerate(LEDGER.read_text("utf-8").splitlines(), 1):
        if line.startswith("## "):
            section = line.strip()
            continue
        if section not in (PROVEN, PENDING) or not line.startswith("|"):
            continue
        cells = _cells(line)
        if cells[0] == "id" or set(cells[0]) <= {"-", ":"}:
            continue  # the header and its separator
        assert len(cells) == 4, f"docs/claims.md:{number}: expected 4 cells, got {len(cells)}"
        ident, claim, documents, tests = cells
        rows.append(Row(ident, claim, _ticked(documents, ","),
                        _ticked(tests, "<br>") if section == PROVEN else (),
                        section == PROVEN, number))
    return tuple(rows)


@cache
def marks() -> dict[str, dict[str, int]]:
    """Claim id -> {document: how many times it is marked there}."""
    found: dict[str, dict[str, int]] = {}
    for path in _documents():
        text = _CODE_FENCE.sub("", path.read_text("utf-8"))
        for match in _MARK.finditer(text):
            for ident in (part.strip() for part in match.group(1).split(",")):
                per_doc = found.setdefault(ident, {})
                per_doc[_rel(path)] = per_doc.get(_rel(path), 0) + 1
    return found


@cache
def _defined(path: Path) -> frozenset[str]:
    """Names a test file defines: module-level functions and classes, and
    ``Class::method`` for the methods of each class (nested classes too)."""
    if not path.is_file():
        return frozenset()
    names: set[str] = set()

    def walk(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(prefix + node.name)
                if prefix:
                    names.add(node.name)  # a method may be named alone
            elif isinstance(node, ast.ClassDef):
                names.add(prefix + node.name)
                walk(node.body, f"{prefix}{node.name}::")

    walk(ast.parse(path.read_text("utf-8"), filename=str(path)).body, "")
    return frozenset(names)


def test_ledger_has_only_proven_claims() -> None:
    # A claim the docs make without a test is a defect: prove it or drop it.
    # (The parser still reads a pending table, so one cannot hide there.)
    text = LEDGER.read_text("utf-8")
    assert PROVEN in text
    assert PENDING not in text, "a claim awaits a proof: write its test or remove the claim"
    assert ledger()
    assert all(row.proven for row in ledger())


def test_ids_are_well_formed_and_unique() -> None:
    seen: dict[str, int] = {}
    problems = []
    for row in ledger():
        if not _ID.fullmatch(row.id):
            problems.append(f"line {row.line}: malformed id {row.id!r}")
        if row.id in seen:
            problems.append(f"line {row.line}: {row.id} already listed at line {seen[row.id]}")
        seen.setdefault(row.id, row.line)
        if not row.claim:
            problems.append(f"line {row.line}: {row.id} has no claim text")
    assert not problems, "\n".join(problems)


def test_every_proven_row_names_a_test() -> None:
    empty = [f"line {row.line}: {row.id}" for row in ledger() if row.proven and not row.tests]
    assert not empty, "ledger rows without a test:\n" + "\n".join(empty)


def test_every_listed_test_exists() -> None:
    missing = []
    for row in ledger():
        for test in row.tests:
            test_file, sep, name = test.partition("::")
            if not (sep and test_file.startswith("tests/") and test_file.endswith(".py")):
                missing.append(f"{row.id}: {test!r} is not tests/<file>.py::<name>")
            elif not (ROOT / test_file).is_file():
                missing.append(f"{row.id}: {test_file} does not exist")
            elif name not in _defined(ROOT / test_file):
                missing.append(f"{row.id}: {test_file} defines no {name}")
    assert not missing, "\n".join(missing)


def test_every_row_names_existing_documents() -> None:
    known = {_rel(path) for path in _documents()}
    problems = [f"{row.id}: {doc!r} is not a document that makes claims"
                for row in ledger() for doc in row.documents if doc not in known]
    problems += [f"{row.id}: names no document" for row in ledger() if not row.documents]
    assert not problems, "\n".join(problems)


def test_every_marked_claim_is_in_the_ledger() -> None:
    listed = {row.id for row in ledger()}
    unknown = [f"{ident} (marked in {', '.join(sorted(docs))})"
               for ident, docs in sorted(marks().items()) if ident not in listed]
    assert not unknown, "claims marked in a document but missing from the ledger:\n" + \
        "\n".join(unknown)


def test_every_ledger_id_is_marked_in_its_documents() -> None:
    unmarked = [f"{row.id}: not marked in {doc}" for row in ledger() for doc in row.documents
                if doc not in marks().get(row.id, {})]
    assert not unmarked, "\n".join(unmarked)


def test_every_mark_is_named_by_its_row() -> None:
    """A document that marks a claim is listed in that claim's row."""
    rows = {row.id: row for row in ledger()}
    unlisted = [f"{ident}: marked in {doc}, which its row does not name"
                for ident, docs in sorted(marks().items()) if ident in rows
                for doc in docs if doc not in rows[ident].documents]
    assert not unlisted, "\n".join(unlisted)


def test_every_claim_is_proven() -> None:
    pending = [row.id for row in ledger() if not row.proven]
    assert not pending, f"{len(pending)} claims await a proof: {', '.join(pending)}"


def test_checks_catch_what_they_should(tmp_path: Path) -> None:
    """The helpers see a missing test, a method in a class, and a mark in a code fence."""
    (tmp_path / "tests").mkdir()
    sample = tmp_path / "tests" / "test_sample.py"
    sample.write_text("def test_a():\n    pass\n\nclass TestB:\n    def test_c(self):\n"
                      "        pass\n", "utf-8")
    names = _defined(sample)
    assert {"test_a", "TestB", "TestB::test_c", "test_c"} <= names
    assert "test_missing" not in names
    assert _defined(tmp_path / "tests" / "test_absent.py") == frozenset()
    fenced = "a<!-- claim: X-1 -->\n```\n<!-- claim: Y-2 -->\n```\n"
    ids = [m.group(1) for m in _MARK.finditer(_CODE_FENCE.sub("", fenced))]
    assert ids == ["X-1"]


def test_the_audit_guide_lists_every_operation() -> None:
    # The trail records these names in `op`; the guide's table must name each.
    from keyring_hardened import gate

    row = next(line for line in (ROOT / "docs" / "audit-trail.md").read_text("utf-8")
               .splitlines() if line.startswith("| `op` |"))
    listed = set(re.findall(r"`([a-z-]+)`", row)) - {"op"}
    assert set(gate.OPS) - {"key-rewrap-plan"} <= listed
