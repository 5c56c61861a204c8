"""Benchmark: what access control costs an audited get, in one run, as ratios.

Not a test: it measures and prints; it asserts nothing about time. Run with
``make bench`` (after ``run.py``) or alone: ``python access.py`` from
``bench/`` in the bench venv.

1. The audited ``get`` of a 10,000-credential vault through the Store API,
   with no access config, beside the same get with 20 policies and 10 rate
   limits configured (all generous: every request is allowed and granted,
   so the figure is the cost of deciding and of keeping the buckets). The
   two configurations are timed in alternating rounds, so the machine's
   noise falls on both alike.
2. Eight processes reading at once for 3 s, with no config, beside eight
   under one generous rate limit that all of them draw from (the
   contended case: every read rewrites the same bucket).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

# Run as a script from bench/ (make bench): the repository root holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import concurrent_reads, fill_ours
from keyring_hardened.config import Config
from keyring_hardened.store import Store

N = 10_000
TARGET = 1.3


def access_config() -> str:
    """20 policies and 10 rate limits, none of which refuses the benchmark's reads."""
    parts = ['default_policy = "allow"']
    for i in range(19):
        # Teams, each with their own services, and a deny for prod writes.
        parts.append(f'[[policies]]\nactors = ["team{i}-*", "svc-{i}:*"]\n'
                     f'services = ["team{i}/*", "shared/{i}-*"]\nallow = ["read", "list"]\n'
                     f'deny = ["admin"]')
    parts.append('[[policies]]\nactors = ["*"]\nservices = ["service-*"]\n'
                 'allow = ["read", "write", "list"]')
    for i in range(9):
        parts.append(f'[[rate_limits]]\nactors = ["team{i}-*"]\nservices = ["*"]\n'
                     f'operations = ["read"]\nlimit = 100\nper = "1s"\nburst = 200')
    parts.append('[[rate_limits]]\nactors = ["*"]\nservices = ["*"]\noperations = ["read"]\n'
                 'limit = 1000000\nper = "1s"\nburst = 1000000')
    text = "\n\n".join(parts) + "\n"
    access = Config.from_mapping(tomllib.loads(text)).access
    if access is None or (len(access.policies), len(access.rate_limits)) != (20, 10):
        raise SystemExit("the benchmark's access config is not 20 policies and 10 limits")
    return text


def gets(home: Path, n: int, rounds: int, per_round: int) -> dict[str, Any]:
    """Median audited get (ms) with and without access config, in alternating rounds."""
    text = access_config()
    stores = {"none": Store.open(home, config=Config()),
              "20 policies + 10 limits": Store.open(home, config=Config.from_mapping(
                  tomllib.loads(text)))}
    samples: dict[str, list[float]] = {name: [] for name in stores}
    rnd = random.Random(7)
    try:
        for _ in range(rounds):
            for name, store in stores.items():
                for _ in range(per_round):
                    i = rnd.randrange(n)
                    t = time.perf_counter()
                    store.get(f"service-{i}", f"user-{i}")
                    samples[name].append(time.perf_counter() - t)
    finally:
        for store in stores.values():
            store.close()
    medians = {name: statistics.median(s) * 1000 for name, s in samples.items()}
    ratio = medians["20 policies + 10 limits"] / medians["none"]
    for name, ms in medians.items():
        print(f"  audited get, N={n:,}, {name}: {ms:.4f} ms (median of {len(samples[name])})",
              flush=True)
    print(f"  ratio: {ratio:.2f}x (target at most {TARGET}x)", flush=True)
    return {"n": n, "median_ms": medians, "ratio": ratio}


def concurrent(home: Path, n: int) -> dict[str, Any]:
    """Eight readers with no config, then eight under one shared generous limit."""
    config = home / "config.toml"
    print("  no access config:", flush=True)
    none = concurrent_reads(home, n)
    config.write_text('[[rate_limits]]\nactors = ["*"]\nservices = ["*"]\n'
                      'operations = ["read"]\nlimit = 1000000\nper = "1s"\nburst = 1000000\n')
    config.chmod(0o600)
    print("  one generous rate limit shared by all eight:", flush=True)
    limited = concurrent_reads(home, n)
    config.unlink()
    ratio = limited["reads_per_second"] / none["reads_per_second"]
    print(f"  throughput under the limit: {ratio:.2f}x of none", flush=True)
    return {"none": none, "limited": limited, "ratio": ratio}


def main() -> int:
    """Fill a vault, run both measurements, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kh-bench-access-") as tmp:
        home = Path(tmp) / "vault"
        print(f"access control (N={args.n:,}):", flush=True)
        fill_ours(home, args.n)
        gets(home, args.n, args.rounds, args.per_round)
        concurrent(home, args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
