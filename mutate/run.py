"""Mutation testing of the security core: run mutmut, then print a report per module.

Run through ``make mutate`` (which builds ``.venv-mutate`` from the
project's ``mutate`` extra); it is not part of ``make test`` or CI.

mutmut (configured in ``[tool.mutmut]`` of pyproject.toml) runs the test
suite once to learn which tests reach each function, then runs every
mutant of a function against those tests only. Results are cached in
``mutants/``: a second run re-tests only what changed.

The report counts, per module, every mutant and what became of it, and
the kill rate over the mutants that are not equivalent. A mutant that
makes the covering tests time out was caught too, so it counts as
detected beside the killed ones. ``mutate/equivalent.txt`` lists the
survivors judged equivalent (no test can tell them apart from the
original), each with a one-line reason; the report names stale entries
there and every survivor that is neither killed nor listed.

Usage (from the repository root, with the mutate venv's python)::

    python mutate/run.py                    # every module, in the issue's order
    python mutate/run.py envelope audit     # some modules only
    python mutate/run.py --report-only      # the report of the last run
    python mutate/run.py --out report.md    # also write the report to a file
    python mutate/run.py --sample 80 store agent  # 80 of store.py's, all of agent.py's

The modules too large to run whole on this machine (``SAMPLED``: store.py,
session.py and refresh.py, thousands of mutants, most in functions hundreds
of tests cover) can be measured by a sample: with ``--sample N``, each of
them that is named gets N of its mutants drawn uniformly at random
(``random.Random(--seed)``, so a report can be redone and checked), runs
those only, and is reported over the sample with the kill rate's 95% Wilson
interval. Other modules named beside them run whole. A larger sample of the
same seed holds the smaller one, and only the sample's mutants not checked
yet are run, so a sample can be grown. The sample is drawn from the names
mutmut generated, so ``mutants/`` must hold them: any earlier ``mutmut
run`` (even one stopped after its generation step) made them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "keyring_hardened"
#: The security core, in the order the issue asks for when time is short.
MODULES = ("envelope", "_aead", "audit", "state", "rootkey", "trail", "keys", "rekeyjournal",
           "store", "session", "operation", "access", "refresh", "gate", "agentproto", "agent")
#: Too large to run whole here: ``--sample`` measures these by a random sample.
SAMPLED = ("store", "session", "refresh")
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.txt"
#: At most two workers: the machine has two cores and is shared.
MAX_CHILDREN = "2"

#: mutmut's exit codes as statuses (mutmut.stats.status_by_exit_code, restated
#: so the report does not depend on mutmut's internals).
_STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
           34: "skipped", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
           255: "timeout", -11: "segfault", -9: "segfault", 37: "type check"}


@dataclass
class Tally:
    """What became of one module's mutants."""

    total: int = 0
    killed: int = 0
    survived: int = 0
    timeout: int = 0
    no_tests: int = 0
    not_checked: int = 0
    other: int = 0
    equivalent: int = 0
    unexplained: list[str] = field(default_factory=list)

    @property
    def detected(self) -> int:
        """Killed or timed out: the tests noticed the change."""
        return self.killed + self.timeout

    @property
    def rate(self) -> float | None:
        """Detected over non-equivalent mutants."""
        scored = self.total - self.equivalent - self.not_checked
        return self.detected / scored if scored else None


def load_equivalent(path: Path = EQUIVALENT) -> dict[str, str]:
    """``mutant name -> reason`` from the equivalents file (``#`` starts a comment line)."""
    found: dict[str, str] = {}
    if not path.exists():
        return found
    for n, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}:{n}: {name} has no reason; say why it is equivalent")
        found[name] = reason.strip()
    return found


def status_of(exit_code: int | None) -> str:
    """A mutmut exit code as a status word."""
    if exit_code is None:
        return "not checked"
    return _STATUS.get(exit_code, "suspicious")


def results(module: str) -> dict[str, str]:
    """``mutant name -> status`` for one module, from mutmut's cache in ``mutants/``."""
    meta = ROOT / "mutants" / PACKAGE / f"{module}.py.meta"
    if not meta.exists():
        return {}
    data = json.loads(meta.read_text("utf-8"))
    return {name: status_of(code) for name, code in data["exit_code_by_key"].items()}


def draw(module: str, size: int, seed: int) -> list[str]:
    """``size`` of ``module``'s generated mutants, drawn uniformly at random (seeded)."""
    names = sorted(results(module))
    if not names:
        raise SystemExit(f"no mutants of {module}.py in mutants/: run mutmut once first "
                         "(its generation step makes every module's mutants)")
    # A seeded, repeatable draw is the point here (a report others can redo),
    # not unpredictability: random.Random, not secrets. One shuffle of every
    # name, then its first ``size``: a larger sample of the same seed holds the
    # smaller one, so a sample can be grown with the results already in hand.
    rng = random.Random(f"{seed}:{module}")  # noqa: S311
    rng.shuffle(names)
    return sorted(names[:size])


def wilson(detected: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a kill rate measured on a sample of n."""
    if n == 0:
        return (0.0, 1.0)
    p = detected / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n))


def tally(module: str, equivalent: dict[str, str], only: set[str] | None = None) -> Tally:
    """Count one module's mutants (or those in ``only``) by status, equivalents apart."""
    t = Tally()
    for name, status in sorted(results(module).items()):
        if only is not None and name not in only:
            continue
        t.total += 1
        if status == "killed":
            t.killed += 1
        elif status == "timeout":
            t.timeout += 1
        elif status == "not checked":
            t.not_checked += 1
        else:
            if status == "survived":
                t.survived += 1
            elif status == "no tests":
                t.no_tests += 1
            else:
                t.other += 1
            if name in equivalent:
                t.equivalent += 1
            else:
                t.unexplained.append(f"{name} ({status})")
    return t


def report(modules: list[str], equivalent: dict[str, str],
           samples: dict[str, list[str]] | None = None) -> str:
    """The Markdown report: one row a module, then what is left to explain.

    A module in ``samples`` is counted over its sample only, and its row
    names the sample's size and the rate's 95% Wilson interval.
    """
    samples = samples or {}
    lines = ["| module | mutants | killed | survived | timeout | no tests | other | "
             "equivalent | kill rate* |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    whole = Tally()
    unexplained: list[str] = []
    not_checked = 0
    tallies = {m: tally(m, equivalent, set(samples[m]) if m in samples else None)
               for m in modules}
    for module, t in tallies.items():
        rate = f"{t.rate:.1%}" if t.rate is not None else "-"
        label = f"{module}.py"
        if module in samples:
            scored = t.total - t.equivalent - t.not_checked
            low, high = wilson(t.detected, scored)
            label += f" (sample of {len(samples[module])} in {len(results(module))})"
            rate += f" ({low:.1%}-{high:.1%})"
        lines.append(f"| {label} | {t.total} | {t.killed} | {t.survived} | {t.timeout} | "
                     f"{t.no_tests} | {t.other} | {t.equivalent} | {rate} |")
        unexplained += t.unexplained
        not_checked += t.not_checked
        if module in samples:
            continue  # a sample's rate is not summed with whole modules' counts
        for name in ("total", "killed", "survived", "timeout", "no_tests", "not_checked",
                     "other", "equivalent"):
            setattr(whole, name, getattr(whole, name) + getattr(t, name))
    if whole.total:
        rate = f"{whole.rate:.1%}" if whole.rate is not None else "-"
        label = "all whole modules" if samples else "all"
        lines.append(f"| **{label}** | {whole.total} | {whole.killed} | {whole.survived} | "
                     f"{whole.timeout} | {whole.no_tests} | {whole.other} | "
                     f"{whole.equivalent} | **{rate}** |")
    lines += ["", "\\* (killed + timeout) / (mutants - equivalent); a survivor, a mutant no "
              "test reaches (no tests) and any other outcome count against it."]
    if samples:
        lines += ["", "A sampled row counts its sample only; the bracket is the rate's 95% "
                  "Wilson interval."]
    if not_checked:
        lines += ["", f"{not_checked} mutants were not checked (not yet, or the run was "
                  "stopped)."]
    known = {name for m in modules for name in results(m)}
    stale_scope = {m for m in modules if m not in samples}
    stale = [name for name in equivalent
             if name.split(".")[1] in stale_scope and name not in known]
    killed_listed = [name for m in modules for name, s in results(m).items()
                     if name in equivalent and s in ("killed", "timeout")
                     and (m not in samples or name in samples[m])]
    if stale or killed_listed:
        lines += ["", "Stale entries in mutate/equivalent.txt (no such mutant, or killed now):"]
        lines += [f"- {name}" for name in stale + killed_listed]
    if unexplained:
        lines += ["", "Survivors neither killed nor listed as equivalent "
                  "(see: mutmut show NAME):"]
        lines += [f"- {name}" for name in unexplained]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run mutmut over the chosen modules (all by default) and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of "
                        f"{', '.join(MODULES)})")
    parser.add_argument("--report-only", action="store_true",
                        help="print the report of the last run without running anything")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--sample", type=int, metavar="N",
                        help=f"run and report N mutants, drawn at random, of each of "
                        f"{', '.join(SAMPLED)} named (other modules run whole)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the sample's seed (default 0): the same seed draws the same sample")
    args = parser.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        parser.error("--sample must be at least 1")
    modules = args.modules or list(MODULES)
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        parser.error(f"not a security-core module: {', '.join(unknown)}")
    os.chdir(ROOT)
    equivalent = load_equivalent()
    samples = ({m: draw(m, args.sample, args.seed) for m in modules if m in SAMPLED}
               if args.sample is not None else {})
    started = time.monotonic()
    if not args.report_only:
        mutmut = Path(sys.executable).parent / "mutmut"
        # Named mutants are always run again; with no names mutmut runs every
        # module and re-tests only mutants whose function or tests changed.
        if samples:
            # Only the sample's mutants not checked yet: named mutants are
            # always run again, and a grown sample keeps the results in hand.
            globs = [name for m, names in samples.items()
                     for status in (results(m),) for name in names
                     if status[name] == "not checked"]
            globs += [f"{PACKAGE}.{m}.*" for m in modules if m not in samples]
        elif set(modules) == set(MODULES):
            globs = []
        else:
            globs = [f"{PACKAGE}.{m}.*" for m in modules]
        # mutmut's own exit status says nothing about survivors; the report does.
        # The mutated modules are large (every mutant sits beside the original):
        # let Python cache their bytecode, or each CLI test's process compiles
        # them again (seconds each).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        if globs or not samples:
            subprocess.run([str(mutmut), "run", "--max-children", MAX_CHILDREN,  # noqa: S603
                            *globs], check=False, env=env)
    text = report(modules, equivalent, samples)
    if not args.report_only:
        text += f"\n\nWall time of this run: {time.monotonic() - started:.0f} s."
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
