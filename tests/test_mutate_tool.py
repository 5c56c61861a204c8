"""The mutation report's arithmetic (mutate/run.py): samples, intervals, what is counted.

``make mutate`` is not part of CI, but the figures docs/testing.md quotes
come from this report, so its counting is tested here like any other claim.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

RUN_PY = Path(__file__).resolve().parent.parent / "mutate" / "run.py"


def _load(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # mutate/ is not a package: load run.py by path (dataclasses need it in
    # sys.modules while the module body runs).
    spec = importlib.util.spec_from_file_location("mutate_run_under_test", RUN_PY)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = _load(monkeypatch)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    return module


def _meta(root: Path, module: str, codes: dict[str, int | None]) -> None:
    folder = root / "mutants" / "keyring_hardened"
    folder.mkdir(parents=True, exist_ok=True)
    names = {f"keyring_hardened.{module}.x_f__mutmut_{n}": code for n, code in codes.items()}
    (folder / f"{module}.py.meta").write_text(json.dumps({"exit_code_by_key": names}), "utf-8")


def test_wilson_interval_matches_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load(monkeypatch)
    # 45 of 50: the textbook Wilson interval is 0.7864 .. 0.9565.
    low, high = module.wilson(45, 50)
    assert math.isclose(low, 0.7864, abs_tol=5e-4)
    assert math.isclose(high, 0.9565, abs_tol=5e-4)
    # Every mutant detected: the upper bound is 1, the lower one below it.
    low, high = module.wilson(50, 50)
    assert math.isclose(high, 1.0)
    assert 0.92 < low < 0.93
    assert module.wilson(0, 0) == (0.0, 1.0)


def test_a_sample_is_repeatable_and_depends_on_seed_and_module(run: ModuleType,
                                                               tmp_path: Path) -> None:
    _meta(tmp_path, "store", {str(n): 1 for n in range(200)})
    _meta(tmp_path, "session", {str(n): 1 for n in range(200)})
    first = run.draw("store", 20, 0)
    assert first == run.draw("store", 20, 0)
    assert len(set(first)) == 20
    assert first != run.draw("store", 20, 1)
    assert [n.split(".")[2] for n in first] != [n.split(".")[2] for n in run.draw("session", 20, 0)]
    # A larger sample of the same seed holds the smaller one.
    assert set(first) < set(run.draw("store", 50, 0))
    # Asking for more than there are draws them all.
    assert len(run.draw("store", 500, 0)) == 200


def test_a_sample_needs_generated_mutants(run: ModuleType) -> None:
    with pytest.raises(SystemExit, match=r"no mutants of store\.py"):
        run.draw("store", 5, 0)


def test_a_sampled_row_counts_its_sample_only(run: ModuleType, tmp_path: Path) -> None:
    # Ten mutants; a sample of four: two killed, one survivor listed as
    # equivalent, one unexplained survivor. Those outside the sample (one
    # survivor, five never checked) must not count.
    _meta(tmp_path, "store", {"1": 1, "2": 1, "3": 0, "4": 0, "5": 0,
                              "6": None, "7": None, "8": None, "9": None, "10": None})
    sample = [f"keyring_hardened.store.x_f__mutmut_{n}" for n in ("1", "2", "3", "4")]
    equivalent = {"keyring_hardened.store.x_f__mutmut_3": "a reason",
                  "keyring_hardened.store.x_f__mutmut_99": "not in the sample: not stale"}
    text = run.report(["store"], equivalent, {"store": sample})
    row = next(line for line in text.splitlines() if line.startswith("| store.py"))
    assert "(sample of 4 in 10)" in row
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:8] == ["4", "2", "2", "0", "0", "0", "1"]
    low, high = run.wilson(2, 3)
    assert cells[8] == f"66.7% ({low:.1%}-{high:.1%})"
    assert "x_f__mutmut_4 (survived)" in text
    assert "x_f__mutmut_5" not in text
    assert "Stale entries" not in text
    assert "not checked" not in text
    # A sample's counts are not summed into a total with whole modules'.
    assert "| **all" not in text
    _meta(tmp_path, "agent", {"1": 1, "2": 0})
    text = run.report(["store", "agent"], equivalent, {"store": sample})
    assert "| **all whole modules** | 2 | 1 | 1 |" in text


def test_a_whole_row_counts_everything_and_names_stale_entries(run: ModuleType,
                                                               tmp_path: Path) -> None:
    _meta(tmp_path, "store", {"1": 1, "2": 0, "3": 36, "4": None})
    equivalent = {"keyring_hardened.store.x_f__mutmut_1": "killed now",
                  "keyring_hardened.store.x_f__mutmut_99": "gone"}
    text = run.report(["store"], equivalent)
    row = next(line for line in text.splitlines() if line.startswith("| store.py"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # killed 1 + timeout 1 over 4 - 1 not checked: 2 of 3.
    assert cells[0] == "store.py"
    assert cells[1:4] == ["4", "1", "1"]
    assert cells[8] == "66.7%"
    assert "x_f__mutmut_99" in text
    assert "x_f__mutmut_1\n" in text + "\n"
    assert "1 mutants were not checked" in text


def test_sample_mode_names_unchecked_sample_mutants_and_whole_other_modules(
    run: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _meta(tmp_path, "store", {str(n): (1 if n < 50 else None) for n in range(100)})
    _meta(tmp_path, "agent", {"1": None})
    calls: list[list[str]] = []
    monkeypatch.setattr(run.subprocess, "run", lambda argv, **_: calls.append(argv))
    monkeypatch.chdir(tmp_path)
    assert run.main(["--sample", "10", "store", "agent"]) == 0
    (argv,) = calls
    named = [a for a in argv if a.startswith("keyring_hardened.store.")]
    sample = run.draw("store", 10, 0)
    # Only the sample's mutants not yet checked are named; agent runs whole.
    assert sorted(named) == [n for n in sample if int(n.rsplit("_", 1)[1]) >= 50]
    assert "keyring_hardened.agent.*" in argv
    assert "keyring_hardened.session.*" not in argv


def test_sample_size_must_be_positive(run: ModuleType) -> None:
    with pytest.raises(SystemExit):
        run.main(["--sample", "0", "store"])
