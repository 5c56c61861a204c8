"""pytest plugin for mutation runs: keep child-process tests out of broad functions' runs.

Loaded by ``[tool.mutmut] pytest_add_cli_args`` (``-p mutate.focus``; mutmut
copies ``mutate/`` into ``mutants/`` through ``also_copy``). It does nothing
in ``make test``. Two phases, told apart by mutmut's ``MUTANT_UNDER_TEST``:

- **Stats run** (``stats``): mutmut runs the whole suite once to learn which
  tests reach each function. This plugin notes every test that starts a child
  process (``subprocess.Popen``: the CLI tests' ``run_cli``, the agent
  tests' agents) in ``mutants/mutate-child-tests.json``. mutmut cannot see
  what a child runs; such a test is in a function's covering set only for
  what it does in-process (usually opening a vault to set up or inspect).
- **A mutant's run** (a mutant name): if the mutant's function is *broad*,
  covered by at least ``BROAD`` tests in mutmut's stats, the tests that start
  child processes are deselected, so the mutant runs against the in-process
  tests of that function only (hundreds of them for a broad function). A
  CLI test costs 0.3-2 s of process start-up each; a broad function of
  store.py or session.py had 280-360 covering tests, 72-90 s of test time,
  most of it in child processes. If every covering test starts a child, none
  is deselected.

Narrow functions (fewer than ``BROAD`` covering tests) keep every covering
test, child-process tests included: for them the CLI test may be the only
one that notices. Set ``MUTATE_FOCUS=off`` to run every covering test
(to check a survivor against the full set).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

#: A function covered by at least this many tests is broad.
BROAD = 100
#: Written in the stats run, read in mutants' runs; both run with cwd mutants/.
CHILD_TESTS = Path("mutate-child-tests.json")
STATS = Path("mutmut-stats.json")

_phase = os.environ.get
_current: list[str] = []
_spawning: set[str] = set()
_original_popen_init = subprocess.Popen.__init__


def _nodeid(nodeid: str) -> str:
    return nodeid.removeprefix("mutants/")


def _recording_popen_init(self: Any, *args: Any, **kwargs: Any) -> None:
    if _current:
        _spawning.add(_current[-1])
    _original_popen_init(self, *args, **kwargs)


def _in_stats_run() -> bool:
    return _phase("MUTANT_UNDER_TEST", "") == "stats"


def pytest_configure(config: pytest.Config) -> None:
    """In the stats run, note which tests start child processes."""
    if _in_stats_run():
        subprocess.Popen.__init__ = _recording_popen_init  # type: ignore[method-assign]


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    """Remember the test now running (stats run), to charge its child processes to it."""
    if _in_stats_run():
        _current.append(_nodeid(nodeid))


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    """Forget the test that has finished (stats run)."""
    if _in_stats_run() and _current:
        _current.pop()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Write the tests that started child processes, at the end of the stats run."""
    if not _in_stats_run():
        return
    subprocess.Popen.__init__ = _original_popen_init  # type: ignore[method-assign]
    known: set[str] = set()
    if CHILD_TESTS.exists():  # an incremental stats run adds to the list
        known = set(json.loads(CHILD_TESTS.read_text("utf-8")))
    CHILD_TESTS.write_text(json.dumps(sorted(known | _spawning), indent=1), "utf-8")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a broad function's mutant run, deselect the tests that start child processes."""
    mutant = _phase("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant or _phase("MUTATE_FOCUS", "") == "off":
        return
    if not (CHILD_TESTS.exists() and STATS.exists()):
        return
    function = mutant.partition("__mutmut_")[0]
    stats = json.loads(STATS.read_text("utf-8"))
    covering = stats["tests_by_mangled_function_name"].get(function, [])
    if len(covering) < BROAD:
        return
    spawning = set(json.loads(CHILD_TESTS.read_text("utf-8")))
    keep = [item for item in items if _nodeid(item.nodeid) not in spawning]
    if not keep or len(keep) == len(items):
        return
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep
