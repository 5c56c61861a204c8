"""The trail's ends: an emptied or cut trail, and archives cut at either end, fail to verify.

An event never leaves the trail without a recorded prune; a vault row that
names a later event proves the tail existed, so plain ``audit verify``
flags an emptied trail and any tail cut that removes a write. An export or
archive authenticates its first and last event in its header, so
``audit verify --file`` flags a file cut at either end, even when the
attacker rewrites the header to match the cut (issue 8).
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from .test_replay import (
    Result,
    Snapshot,
    clean_env,
    cli_batch,
    cli_steps,
    cmd,
    copy_vault,
    put,
    snapshot,
    write_back,
)


class Trail(NamedTuple):
    """A vault whose newest event is a write, and its rows just after init."""

    home: Path
    at_init: Snapshot
    events: int
    scratch: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Trail:
    base = tmp_path_factory.mktemp("trail")
    env = clean_env(base)
    home = base / "vault"
    cli_steps(home, (cmd("init"),), env)
    at_init = snapshot(home / "vault.db")
    cli_steps(home, (put("a", "a-1"), put("b", "b-1"), cmd("get", "svc", "a"),
                     put("a", "a-2"), cmd("list"), cmd("delete", "svc", "b")), env)
    # Old enough for ``audit prune --keep 1s`` to archive all of them.
    time.sleep(1.1)
    events = len(snapshot(home / "vault.db")["audit_events"].rows)
    return Trail(home, at_init, events, base / "scratch", env)


def _copy(trail: Trail, name: str) -> Path:
    trail.scratch.mkdir(exist_ok=True)
    return copy_vault(trail.home, Path(tempfile.mkdtemp(prefix=name, dir=trail.scratch)) / "v")


def _sql(home: Path, statement: str, *params: object) -> None:
    conn = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        conn.execute(statement, params)
    finally:
        conn.close()


def _reads(trail: Trail, home: Path) -> tuple[Result, Result, Result]:
    a, b, verified = cli_batch([(home, cmd("get", "svc", "a")), (home, cmd("get", "svc", "b")),
                                (home, cmd("audit", "verify"))], trail.env)
    return a, b, verified


def _assert_cut_detected(a: Result, b: Result, verified: Result) -> None:
    assert verified.code == 3, verified
    # Reads answer what they answered before the cut, or exit 3: never an older state.
    assert (a.code, a.out) in ((0, "a-2\n"), (3, "")), a
    assert (b.code, b.out) in ((1, ""), (3, "")), b


@pytest.mark.parametrize("how", ["events deleted", "events deleted, anchor at genesis",
                                 "trail of a new vault written back"])
def test_emptied_trail_fails_audit_verify(trail: Trail, how: str) -> None:
    home = _copy(trail, f"emptied-{how}")
    db = home / "vault.db"
    if how == "trail of a new vault written back":
        write_back(db, trail.at_init, ["audit_events", "audit_anchor"])
    else:
        _sql(home, "DELETE FROM audit_events")
        if how == "events deleted, anchor at genesis":
            write_back(db, trail.at_init, ["audit_anchor"])
    _assert_cut_detected(*_reads(trail, home))


@pytest.mark.parametrize("cut", [1, 2, 3, -1])
def test_tail_cut_that_removes_a_write_fails_audit_verify(trail: Trail, cut: int) -> None:
    """Cut the newest ``cut`` events (-1: all but the first); the newest one is a write."""
    home = _copy(trail, f"cut-{cut}")
    keep = 1 if cut == -1 else trail.events - cut
    _sql(home, "DELETE FROM audit_events WHERE seq > (SELECT min(seq) FROM audit_events) + ? - 1",
         keep)
    assert len(snapshot(home / "vault.db")["audit_events"].rows) == keep
    _assert_cut_detected(*_reads(trail, home))


# -- archives -------------------------------------------------------------------------


class Archive(NamedTuple):
    """A vault and the lines of an export of its trail, or of an archive pruned from it."""

    home: Path
    lines: list[str]


@pytest.fixture(scope="module", params=["export", "prune"])
def archive(request: pytest.FixtureRequest, trail: Trail) -> Archive:
    home = _copy(trail, f"archive-{request.param}")
    file = home.parent / f"{request.param}.jsonl"
    argv = (("audit", "export", str(file)) if request.param == "export"
            else ("audit", "prune", "--archive", str(file), "--keep", "1s"))
    made, verified = cli_batch([(home, (argv, "")),
                                (home, cmd("audit", "verify", "--file", str(file)))], trail.env)
    assert made.code == 0, made.err
    assert verified.code == 0, verified
    lines = file.read_text("utf-8").splitlines()
    assert len(lines) >= 4
    return Archive(home, lines)


def _verify_files(trail: Trail, archive: Archive, files: dict[str, list[str]]
                  ) -> dict[str, Result]:
    """``audit verify --file`` of each set of lines, written to a file of its own."""
    folder = Path(tempfile.mkdtemp(dir=archive.home.parent))
    calls = []
    for n, lines in enumerate(files.values()):
        path = folder / f"{n}.jsonl"
        path.write_text("\n".join(lines) + "\n", "utf-8")
        calls.append((archive.home, cmd("audit", "verify", "--file", str(path))))
    return dict(zip(files, cli_batch(calls, trail.env), strict=True))


def _replaced(value: Any, mapping: dict[Any, Any]) -> Any:
    """``value`` with every scalar found in ``mapping`` replaced (in nested objects too)."""
    if isinstance(value, dict):
        return {k: _replaced(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_replaced(v, mapping) for v in value]
    if isinstance(value, int | str) and not isinstance(value, bool) and value in mapping:
        return mapping[value]
    return value


def _cut(lines: list[str], end: str, rewrite: bool) -> list[str]:
    """Drop the first or last event; with ``rewrite``, make the header name the new end."""
    header, events = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    gone, new = (events[0], events[1]) if end == "first" else (events[-1], events[-2])
    kept = lines[2:] if end == "first" else lines[1:-1]
    if not rewrite:
        return [lines[0], *kept]
    mapping: dict[Any, Any] = {len(events): len(events) - 1}
    if end == "first":
        # The dropped event becomes the anchor; the next one the first event.
        mapping.update({gone["seq"] - 1: gone["seq"], header.get("anchor_mac"): gone["mac"]})
    mapping.update({gone[k]: new[k] for k in ("seq", "mac", "ts_us", "time") if k in gone})
    mapping.pop(None, None)
    fields = {k: v for k, v in header.items() if k == "format"}
    rewritten = {**_replaced(header, mapping), **fields}
    return [json.dumps(rewritten), *kept]


@pytest.mark.parametrize(("end", "rewrite"), [("first", False), ("first", True),
                                              ("last", False), ("last", True)],
                         ids=["first dropped", "first dropped, header rewritten",
                              "last dropped", "last dropped, header rewritten"])
def test_archive_cut_at_either_end_fails_audit_verify_file(trail: Trail, archive: Archive,
                                                           end: str, rewrite: bool) -> None:
    done = _verify_files(trail, archive, {"cut": _cut(archive.lines, end, rewrite)})["cut"]
    assert done.code == 3, done


def _edited(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1")
    return None


def test_edited_archive_header_fails_audit_verify_file(trail: Trail, archive: Archive) -> None:
    header, *rest = archive.lines
    fields = json.loads(header)
    edits = {f"header {k} edited": [json.dumps({**fields, k: _edited(v)}), *rest]
             for k, v in fields.items() if k != "format"}
    assert edits
    problems = [f"{label}: exit {done.code} {done.out.strip()}"
                for label, done in _verify_files(trail, archive, edits).items() if done.code != 3]
    assert not problems, "\n".join(problems)
