"""Benchmark of moving in and keeping a copy (issue 14): import and online backup.

Not a test: it measures and prints; it asserts nothing about time. Run with
``make bench-moving`` (or ``python bench/moving.py`` in a venv with the
``bench`` extra).

* Import N entries (default 10,000) from a keyrings.alt ``PlaintextKeyring``
  file, timed as a whole and split into its two sides: the source's own
  ``get_password`` (which parses the whole file on every call) and the
  store's side (write, read back).
* Back up a vault of M credentials (default 100,000) while a writer in
  another process keeps writing; report the backup's time (copy, verify,
  publish) and the writer's throughput before and during it.
"""

from __future__ import annotations

import argparse
import configparser
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from keyring_hardened import backup as bk
from keyring_hardened import moving
from keyring_hardened.store import Store


def make_plaintext_file(path: Path, n: int) -> None:
    """A PlaintextKeyring file with n entries, in the peer's own format (escaped INI, base64).

    Written directly: the peer's set_password rewrites the whole file per
    entry, which for 10,000 entries takes a very long time.
    """
    from base64 import encodebytes

    from keyrings.alt.escape import escape

    config = configparser.RawConfigParser()
    for i in range(n):
        section = escape(f"service-{i}")
        config.add_section(section)
        config.set(section, escape(f"user-{i}"),
                   "\n" + encodebytes(f"secret-value-{i:08d}".encode()).decode())
    with open(path, "w", encoding="utf-8") as f:
        config.write(f)
    os.chmod(path, 0o600)


def bench_import(tmp: Path, n: int) -> dict[str, float]:
    source = tmp / "plain.cfg"
    make_plaintext_file(source, n)
    kr = moving.load_backend("keyrings.alt.file.PlaintextKeyring")
    kr.file_path = str(source)
    entries = moving.list_entries(kr)
    if len(entries) != n:
        raise SystemExit(f"listed {len(entries)} entries, expected {n}")
    sample = entries[: max(1, n // 20)]
    t = time.perf_counter()
    for e in sample:
        kr.get_password(e.service, e.username)
    source_per_entry = (time.perf_counter() - t) / len(sample)
    home = tmp / "import-vault"
    with Store.init(home) as store:
        t = time.perf_counter()
        report = moving.import_entries(store, kr, entries, source="bench")
        total = time.perf_counter() - t
    if not report.ok or report.counts()["imported"] != n:
        raise SystemExit(f"import failed: {report.counts()}")
    store_per_entry = total / n - source_per_entry
    return {"entries": n, "seconds": total, "per_second": n / total,
            "source_ms": source_per_entry * 1000, "store_ms": store_per_entry * 1000}


WRITER = textwrap.dedent("""
    import sys, time
    from keyring_hardened.store import Store
    home, stop = sys.argv[1], sys.argv[2]
    import os
    with Store.open(home) as s:
        i = 0
        while not os.path.exists(stop):
            s.set("writer", f"user-{i % 1000}", f"value-{i}")
            print(f"{time.time():.6f}", flush=True)
            i += 1
""")


def bench_backup(tmp: Path, m: int) -> dict[str, float]:
    home = tmp / "backup-vault"
    t = time.perf_counter()
    with Store.init(home) as store:
        for i in range(m):
            store.set(f"service-{i}", f"user-{i}", f"secret-value-{i:08d}")
    fill = time.perf_counter() - t
    stop = tmp / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(home), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(3.0)  # the writer's pace alone
    with Store.open(home) as store:
        t0 = time.time()
        report = bk.backup(store, tmp / "copy.db")
        t1 = time.time()
    time.sleep(1.0)
    stop.touch()
    out, _ = writer.communicate(timeout=120)
    stamps = [float(x) for x in out.split()]
    before = [s for s in stamps if s < t0]
    during = [s for s in stamps if t0 <= s <= t1]
    alone = (len(before) - 1) / (before[-1] - before[0]) if len(before) > 1 else 0.0
    return {"credentials": m, "fill_seconds": fill, "backup_seconds": t1 - t0,
            "bytes": report.bytes, "mb_per_second": report.bytes / (t1 - t0) / 1e6,
            "credentials_per_second": m / (t1 - t0),
            "writer_alone_per_second": alone,
            "writer_during_per_second": len(during) / (t1 - t0),
            "writer_commits_during": len(during)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--credentials", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kh-bench-moving-") as tmp_name:
        tmp = Path(tmp_name)
        imp = bench_import(tmp, args.entries)
        print(f"import: {imp['entries']:,} entries from a PlaintextKeyring file in "
              f"{imp['seconds']:.1f} s ({imp['per_second']:.0f} entries/s)")
        print(f"  per entry: source get_password {imp['source_ms']:.2f} ms, store side "
              f"(write + read back) {imp['store_ms']:.2f} ms -> bottleneck: "
              f"{'the source' if imp['source_ms'] > imp['store_ms'] else 'the store'}")
        bak = bench_backup(tmp, args.credentials)
        print(f"backup: {bak['credentials']:,} credentials ({bak['bytes'] / 1e6:.1f} MB) in "
              f"{bak['backup_seconds']:.1f} s ({bak['credentials_per_second']:,.0f} "
              f"credentials/s, {bak['mb_per_second']:.1f} MB/s; copy + verify + publish); "
              f"filled in {bak['fill_seconds']:.0f} s")
        print(f"  writer in another process: {bak['writer_alone_per_second']:.0f} commits/s "
              f"alone, {bak['writer_during_per_second']:.0f} commits/s during the backup "
              f"({bak['writer_commits_during']} commits)")


if __name__ == "__main__":
    main()
