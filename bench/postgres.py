"""Benchmark: the PostgreSQL engine beside SQLite, in one run (issue 15).

Not a test: it measures and prints medians and ratios; it asserts nothing
about time. Run with ``make bench-postgres`` (also run by ``make bench``),
or alone: ``python postgres.py`` from ``bench/`` in the bench venv (under
``nice -n 5``: the machine is shared). Without PostgreSQL's server binaries
(``initdb``, ``pg_ctl``, ``postgres``) it prints one "skipped" line and
exits 0. ``--quick`` scales it down.

It starts a private server of its own (tests/pgcluster.py's ``Cluster``, but
with the settings of a real deployment: ``fsync``, ``full_page_writes`` and
``synchronous_commit`` on, no statement log, 128 MB of shared buffers), a
login role with a password (scram-sha-256, read by libpq from a
``PGPASSFILE``), and then, in one run:

1. The median audited ``Store.get`` over the socket in vaults of 1,000,
   10,000 and 100,000 credentials, in alternating rounds; target: the
   100,000 figure within 1.5 times the 1,000 one.
2. The audited ``Store.get`` and ``Store.set`` of one process, on random
   credentials of a 1,000-credential vault: SQLite (the home's file),
   PostgreSQL over its Unix socket, PostgreSQL over TCP loopback
   (127.0.0.1, the role and its password); timed in alternating rounds so
   the machine's noise falls on all alike. Median and p95.
3. Eight processes reading at once (each its own ``Store``, the vault open
   before the go signal, then audited gets of random credentials for 5 s):
   total reads per second, for each of the same.
4. For context, the peers' ``get_password`` and ``set_password``
   (keyrings.alt's PlaintextKeyring, keyrings.cryptfile) at 1,000 entries,
   as ``run.py`` measures them.

Every audited get is a write transaction (its audit event), so on a durable
server each one waits for its commit's WAL flush. Parts 1 to 3 therefore
also measure the socket with ``synchronous_commit=off`` set on the
connection (libpq's ``options`` in the URL, no server change): the commit
no longer waits for the disk, at the price that a server crash may lose the
last fraction of a second of acknowledged commits. The targets are judged
on the durable default; the second figure shows what the flush costs.

The PostgreSQL vaults are filled fast: one SQLite vault grows through the
Store API, and ``keyring-hardened migrate-storage --to`` copies it (verified)
into a fresh database at each size. The grown SQLite vault is kept at each
size in ``bench/results/pg-vaults/`` (per version of the schemas;
``--no-cache`` fills afresh), so only the first run pays for 100,000
``Store.set`` calls. Each PostgreSQL vault is then read by its own home (a
copy of the root key only), as another host would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

# Run as a script from bench/ (make bench): the repository root holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import CRYPTFILE, PLAIN, fill_peer, inprocess
from keyring_hardened.config import Config
from keyring_hardened.store import Store
from tests.pgcluster import Cluster, dbname_of, find_bindir

GET_TARGET_MS = 1.0
READS_TARGET = 3000.0
FLAT_TARGET = 1.5
ROLE = "kh_bench"
URL_ENV = "KEYRING_HARDENED_STORAGE_URL"

#: Per connection (libpq's ``options``): the lever, measured beside the default.
NO_WAIT = "&" + urlencode({"options": "-c synchronous_commit=off"}, quote_via=quote)
SOCKET, TCP, LEVER = "PostgreSQL socket", "PostgreSQL TCP", "PostgreSQL socket, no commit wait"

SKIPPED = "skipped: no PostgreSQL binaries (initdb, pg_ctl, postgres) found"


class BenchCluster(Cluster):
    """The test cluster with a real server's settings: durable, and no statement log."""

    def _write_settings(self) -> None:
        super()._write_settings()
        # The last setting of a name in the file wins.
        path = self.datadir / "kh_harness.conf"
        with path.open("a") as f:
            f.write("# bench/postgres.py: as deployed, not as tested\n"
                    "fsync = on\nfull_page_writes = on\nsynchronous_commit = on\n"
                    "log_statement = 'none'\nshared_buffers = '128MB'\n")


def _pct(samples: list[float], q: int) -> float:
    """The q-th percentile (ms)."""
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1000


def _key(i: int) -> tuple[str, str]:
    return f"service-{i}", f"user-{i}"


def grow(home: Path, start: int, stop: int) -> None:
    """Credentials ``start`` to ``stop`` into the SQLite vault at ``home`` (made if new)."""
    opened = Store.open if (home / "vault.db").exists() else Store.init
    with opened(home, config=Config()) as s:
        for i in range(start, stop):
            s.set(*_key(i), f"secret-value-{i:08d}")


def cache_key() -> str:
    """Filled vaults are kept per version of the schemas: a new migration fills afresh."""
    import hashlib

    import keyring_hardened

    package = Path(keyring_hardened.__file__).parent
    digest = hashlib.sha256()
    for name in ("schema.py", "pgschema.py"):
        digest.update((package / name).read_bytes())
    return f"schema-{digest.hexdigest()[:12]}"


def keep(source: Path, kept: Path) -> None:
    """A copy of the closed SQLite vault at ``source`` for the next run, put in place whole."""
    kept.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = kept.with_name(kept.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    partial.rename(kept)


def host(source: Path, home: Path) -> Path:
    """Another host's home for the same vault: a folder of its own and the root key."""
    home.mkdir(mode=0o700)
    shutil.copy2(source / "master.key", home / "master.key")
    (home / "master.key").chmod(0o600)
    return home


def _cli() -> list[str]:
    return [sys.executable, "-m", "keyring_hardened"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != URL_ENV}
    env.update(extra)
    return env


def migrate(home: Path, url: str) -> float:
    """``migrate-storage --to url`` of the SQLite vault at ``home``; seconds taken."""
    t = time.perf_counter()
    done = subprocess.run([*_cli(), "migrate-storage", "--to", url, "--json"],
                          env=_env(KEYRING_HARDENED_HOME=str(home)), capture_output=True,
                          text=True, check=False)
    took = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"migrate-storage failed ({done.returncode}): {done.stderr.strip()}")
    report = json.loads(done.stdout)
    print(f"    migrated {report['credentials']:,} credentials and {report['audit_events']:,} "
          f"events in {took:.1f}s", flush=True)
    return took


def alternate(stores: dict[str, Store], op: Callable[[Store, int], object], n: int,
              rounds: int, per_round: int, seed: int) -> dict[str, list[float]]:
    """Timings (s) of ``op`` on random credentials, in alternating rounds over the stores."""
    samples: dict[str, list[float]] = {name: [] for name in stores}
    rnd = random.Random(seed)
    for _ in range(rounds):
        for name, store in stores.items():
            for _ in range(per_round):
                i = rnd.randrange(n)
                t = time.perf_counter()
                op(store, i)
                samples[name].append(time.perf_counter() - t)
    return samples


def _get(store: Store, i: int) -> object:
    return store.get(*_key(i))


def _set(store: Store, i: int) -> object:
    return store.set(*_key(i), f"new-secret-value-{i:08d}")


def latency(homes: dict[str, tuple[Path, str | None]], n: int, rounds: int,
            per_round: int) -> dict[str, dict[str, float]]:
    """Median and p95 (ms) of audited get and set for each (home, storage URL)."""
    stores = {name: Store.open(home, config=Config(storage_url=url))
              for name, (home, url) in homes.items()}
    try:
        for store in stores.values():  # each connection made and warm
            _get(store, 0)
        gets = alternate(stores, _get, n, rounds, per_round, 7)
        sets = alternate(stores, _set, n, rounds, max(1, per_round // 4), 8)
    finally:
        for store in stores.values():
            store.close()
    out: dict[str, dict[str, float]] = {}
    for name in stores:
        out[name] = {"get_ms": statistics.median(gets[name]) * 1000,
                     "get_p95_ms": _pct(gets[name], 95),
                     "set_ms": statistics.median(sets[name]) * 1000,
                     "set_p95_ms": _pct(sets[name], 95),
                     "gets": len(gets[name]), "sets": len(sets[name])}
        r = out[name]
        print(f"  {name}: get {r['get_ms']:.3f} ms (p95 {r['get_p95_ms']:.3f}), set "
              f"{r['set_ms']:.3f} ms (p95 {r['set_p95_ms']:.3f})", flush=True)
    return out


def floor(url: str, repeat: int) -> dict[str, float]:
    """Median (ms) of a transaction shaped like an audited get, doing nothing else.

    BEGIN, the advisory lock, three one-row SELECTs, one small INSERT and
    COMMIT: the seven round trips of an audited get over PostgreSQL, with
    the commit flushed and then without the wait. What is left of an audited
    get beyond this is the client's own work (decrypting, the state check,
    the event's HMAC) and the rows' size.
    """
    import psycopg

    out = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (x int)")
    for label, extra in (("flushed", ""), ("no commit wait", NO_WAIT)):
        with psycopg.connect(url + extra) as conn:
            samples = []
            for _ in range(repeat):
                t = time.perf_counter()
                conn.execute("SELECT pg_advisory_xact_lock(42)")  # psycopg sends BEGIN first
                for _ in range(3):
                    conn.execute("SELECT 1").fetchone()
                conn.execute("INSERT INTO bench_floor VALUES (1)")
                conn.commit()
                samples.append(time.perf_counter() - t)
        out[label] = statistics.median(samples) * 1000
        print(f"  seven round trips and a commit, {label}: {out[label]:.3f} ms", flush=True)
    return out


READER = textwrap.dedent("""
    import random, sys, time
    from keyring_hardened.store import Store
    home, duration, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    with Store.open(home) as s:
        s.get("service-0", "user-0")       # connected, unlocked, warm
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        sys.stdin.readline()               # the go signal
        rnd = random.Random()
        done, end = 0, time.time() + duration
        while time.time() < end:
            i = rnd.randrange(n)
            s.get(f"service-{i}", f"user-{i}")
            done += 1
    sys.stdout.write(f"{done}\\n")
""")


def readers(home: Path, url: str | None, n: int, procs: int, duration: float
            ) -> dict[str, Any]:
    """Audited reads per second, in total, from ``procs`` processes reading at once."""
    env = _env(**({URL_ENV: url} if url else {}))
    children = [subprocess.Popen([sys.executable, "-c", READER, str(home), str(duration),
                                  str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
                for _ in range(procs)]
    for child in children:  # every reader has its vault open before any starts
        if child.stdout is None or child.stdout.readline().strip() != "ready":
            _, err = child.communicate(timeout=120)
            raise SystemExit(f"a reader did not start: {err.strip()[-500:]}")
    for child in children:
        if child.stdin is not None:
            child.stdin.write("go\n")
            child.stdin.flush()
    counts = []
    for child in children:
        out, err = child.communicate(timeout=120)
        if child.returncode != 0:
            raise SystemExit(f"a reader failed ({child.returncode}): {err.strip()[-500:]}")
        counts.append(int(out))
    return {"processes": procs, "reads_per_second": sum(counts) / duration, "counts": counts}


def flat(homes: dict[tuple[str, int], tuple[Path, str]], rounds: int, per_round: int
         ) -> dict[tuple[str, int], float]:
    """Median audited get (ms) of each (connection, size), in alternating rounds."""
    stores = {key: Store.open(home, config=Config(storage_url=url))
              for key, (home, url) in homes.items()}
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in stores}
    rnd = random.Random(9)
    try:
        for (_, size), store in stores.items():
            # A first pass over some of the keys: the pages of a cold vault into memory.
            for _ in range(per_round):
                _get(store, rnd.randrange(size))
        for _ in range(rounds):
            for (name, size), store in stores.items():
                for _ in range(per_round):
                    i = rnd.randrange(size)
                    t = time.perf_counter()
                    _get(store, i)
                    samples[name, size].append(time.perf_counter() - t)
    finally:
        for store in stores.values():
            store.close()
    medians = {key: statistics.median(s) * 1000 for key, s in samples.items()}
    for (name, size), ms in medians.items():
        print(f"  {name}, N={size:,}: get {ms:.3f} ms (median of {len(samples[name, size])})",
              flush=True)
    return medians


def peers(tmp: Path, n: int, repeat: int) -> dict[str, dict[str, float]]:
    """The peers' in-process get and set (ms) at ``n`` entries, as run.py measures them."""
    out = {}
    for name, label, reps in ((PLAIN, "PlaintextKeyring", repeat),
                              (CRYPTFILE, "CryptFileKeyring", 3)):
        kr = fill_peer(name, tmp / f"{label}.cfg", n)
        keys = [_key(i) for i in range(8)]
        get_ms, set_ms = inprocess(kr, keys, reps)
        out[label] = {"get_ms": get_ms, "set_ms": set_ms, "samples": reps}
        print(f"  {label} N={n:,}: get {get_ms:.3f} ms, set {set_ms:.3f} ms ({reps} samples)",
              flush=True)
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(args: argparse.Namespace, figs: dict[str, Any]) -> str:
    """The figures as Markdown, with each target met or not."""
    lat, conc, sizes, peer = figs["latency"], figs["readers"], figs["flat"], figs["peers"]
    base = lat["SQLite"]
    lines = [f"## PostgreSQL beside SQLite ({figs['date']})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}, PostgreSQL {figs['server']}; load average "
             f"{figs['load_before']:.2f} before, {figs['load_after']:.2f} after "
             f"(1 min); run under nice {os.nice(0)}.", "",
             f"Audited `Store.get` / `Store.set` in one process, {args.n:,} credentials, "
             f"{args.rounds} alternating rounds ({base['gets']:,} gets and {base['sets']:,} "
             f"sets each):", "",
             "| storage | get median ms | get p95 ms | set median ms | set p95 ms | get / "
             "SQLite | set / SQLite |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in lat.items():
        lines.append(f"| {name} | {r['get_ms']:.3f} | {r['get_p95_ms']:.3f} | {r['set_ms']:.3f} "
                     f"| {r['set_p95_ms']:.3f} | {r['get_ms'] / base['get_ms']:.1f}x | "
                     f"{r['set_ms'] / base['set_ms']:.1f}x |")
    for label, r in peer.items():
        lines.append(f"| {label} (peer, keyring API, {r['samples']} samples) | "
                     f"{r['get_ms']:.3f} | - | {r['set_ms']:.3f} | - | "
                     f"{r['get_ms'] / base['get_ms']:.1f}x | {r['set_ms'] / base['set_ms']:.1f}x |")
    fl = figs["floor"]
    lines += ["", f"The floor over the socket: BEGIN, the advisory lock, three SELECTs, one "
              f"INSERT, COMMIT (the seven round trips of an audited get, no other work): "
              f"{fl['flushed']:.3f} ms with the commit flushed, {fl['no commit wait']:.3f} ms "
              f"without the wait."]
    lines += ["", f"{args.readers} processes reading at once for {args.duration:.0f} s "
              f"(audited gets, each process its own Store):", "",
              "| storage | audited reads/s in total | per process | ratio to SQLite |",
              "|---|---:|---:|---:|"]
    for name, r in conc.items():
        lines.append(f"| {name} | {r['reads_per_second']:,.0f} | {min(r['counts']):,} to "
                     f"{max(r['counts']):,} | "
                     f"{r['reads_per_second'] / conc['SQLite']['reads_per_second']:.2f} |")
    names = list(dict.fromkeys(name for name, _ in sizes))
    counts = sorted({size for _, size in sizes})
    smallest, largest = counts[0], counts[-1]
    lines += ["", "Median audited get over the socket by vault size "
              f"({args.flat_rounds} alternating rounds of {args.per_round}):", "",
              "| credentials | " + " | ".join(f"{name} ms | ratio" for name in names) + " |",
              "|---:|" + "---:|---:|" * len(names)]
    for size in counts:
        lines.append(f"| {size:,} | " + " | ".join(
            f"{sizes[name, size]:.3f} | {sizes[name, size] / sizes[name, smallest]:.2f}"
            for name in names) + " |")
    sock = lat[SOCKET]["get_ms"]
    total = conc[SOCKET]["reads_per_second"]
    ratio = sizes[SOCKET, largest] / sizes[SOCKET, smallest]
    lines += ["", "Targets (issue 15), on the server as deployed (every commit flushed):", "",
              f"- audited get median under {GET_TARGET_MS:g} ms over the socket: "
              f"{sock:.3f} ms: {_verdict(sock < GET_TARGET_MS)}",
              f"- {args.readers} processes: at least {READS_TARGET:,.0f} audited reads/s in "
              f"total (socket): {total:,.0f}/s: {_verdict(total >= READS_TARGET)}",
              f"- latency flat from {smallest:,} to {largest:,} credentials (at most "
              f"{FLAT_TARGET}x): {ratio:.2f}x: {_verdict(ratio <= FLAT_TARGET)}"]
    if LEVER in lat:
        ratio = sizes[LEVER, largest] / sizes[LEVER, smallest]
        lines += ["", f"The same with `synchronous_commit=off` on the connection ({LEVER}):",
                  "", f"- get median {lat[LEVER]['get_ms']:.3f} ms: "
                  f"{_verdict(lat[LEVER]['get_ms'] < GET_TARGET_MS)}; "
                  f"{conc[LEVER]['reads_per_second']:,.0f} reads/s from {args.readers} "
                  f"processes: {_verdict(conc[LEVER]['reads_per_second'] >= READS_TARGET)}; "
                  f"{largest:,}/{smallest:,}: {ratio:.2f}x: {_verdict(ratio <= FLAT_TARGET)}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Start a server, fill the vaults, measure, print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="credentials for parts 1 and 2")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--flat-rounds", type=int, default=5)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of reading")
    parser.add_argument("--peer-repeat", type=int, default=21)
    parser.add_argument("--quick", action="store_true",
                        help="scaled down: sizes 1,000 and 10,000, fewer rounds, 2 s of reading")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--cache", default=str(Path(__file__).resolve().parent / "results"
                                               / "pg-vaults"),
                        help="where the filled SQLite vaults are kept for the next run")
    parser.add_argument("--no-cache", action="store_true",
                        help="fill the vaults afresh and keep nothing")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.flat_rounds = "1000,10000", 4, 4
        args.duration, args.peer_repeat = 2.0, 6
    sizes = sorted({int(s) for s in args.sizes.split(",") if s} | {args.n})
    bindir = find_bindir()
    if bindir is None:
        print(SKIPPED, flush=True)
        return 0
    os.environ.pop(URL_ENV, None)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    figs: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "load_before": load_before}
    with tempfile.TemporaryDirectory(prefix="kh-bench-pg-") as tmp_name, \
            BenchCluster(bindir) as cluster:
        tmp = Path(tmp_name)
        password = secrets.token_urlsafe(24)
        cluster.create_role(ROLE, password)
        passfile = tmp / "pgpass"
        passfile.write_text(f"127.0.0.1:{cluster.port}:*:{ROLE}:{password}\n")
        passfile.chmod(0o600)
        os.environ["PGPASSFILE"] = str(passfile)  # libpq reads it; children inherit it
        with cluster._admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
            figs["server"] = str(row[0]) if row else "?"
        print(f"PostgreSQL {figs['server']} ({bindir}), fsync on, no statement log; "
              f"load average {load_before:.2f}", flush=True)

        print("filling (one SQLite vault, migrate-storage into a database per size):",
              flush=True)
        source = tmp / "source"
        cache = None if args.no_cache else Path(args.cache) / cache_key()
        if cache is not None:
            print(f"  filled vaults kept in {cache} (--no-cache: fill afresh)", flush=True)
        urls: dict[int, tuple[str, str]] = {}  # size: (socket URL, TCP URL), as the role's db
        have = 0
        for size in sizes:
            t = time.perf_counter()
            kept = cache / f"source-{size}" if cache else None
            if kept is not None and (kept / "vault.db").exists():
                shutil.rmtree(source, ignore_errors=True)
                shutil.copytree(kept, source)
                how = f"copied from {kept}"
            else:
                grow(source, have, size)
                how = "filled"
                if kept is not None:
                    keep(source, kept)
            have = size
            print(f"  N={size:,}: {how} in {time.perf_counter() - t:.1f}s", flush=True)
            db = dbname_of(cluster.new_database(owner=ROLE))
            tcp = cluster.tcp_url(db, ROLE)
            migrate(source, tcp)  # the role's tables: the TCP store reads them as the role
            urls[size] = (cluster.admin_url(db), tcp)
            if size == args.n:
                sqlite_home = tmp / "sqlite"
                shutil.copytree(source, sqlite_home)  # closed: the whole vault is vault.db

        # First, while every vault holds only what migrate-storage copied.
        print("audited get over the socket by vault size:", flush=True)
        figs["flat"] = flat({(name, size): (host(source, tmp / f"flat-{i}-{size}"), url)
                             for size in sizes
                             for i, (name, url) in enumerate(((SOCKET, urls[size][0]),
                                                              (LEVER, urls[size][0] + NO_WAIT)))},
                            args.flat_rounds, args.per_round)

        socket_url, tcp_url = urls[args.n]
        configs: list[tuple[str, Path, str | None]] = [
            ("SQLite", sqlite_home, None), (SOCKET, source, socket_url), (TCP, source, tcp_url),
            (LEVER, source, socket_url + NO_WAIT)]
        print(f"audited get and set, N={args.n:,}:", flush=True)
        figs["latency"] = latency(
            {name: (home if url is None else host(home, tmp / f"lat-{i}"), url)
             for i, (name, home, url) in enumerate(configs)},
            args.n, args.rounds, args.per_round)

        print("the floor: an empty transaction of the same shape, over the socket:", flush=True)
        figs["floor"] = floor(socket_url, args.rounds * args.per_round // 2)

        print(f"{args.readers} processes reading at once for {args.duration:.0f}s, "
              f"N={args.n:,}:", flush=True)
        figs["readers"] = {}
        for i, (name, home, url) in enumerate(configs):
            home = home if url is None else host(home, tmp / f"readers-{i}")
            r = readers(home, url, args.n, args.readers, args.duration)
            figs["readers"][name] = r
            print(f"  {name}: {r['reads_per_second']:,.0f} audited reads/s in total "
                  f"(per process {min(r['counts'])}..{max(r['counts'])})", flush=True)

        print(f"peers, N={args.n:,}:", flush=True)
        figs["peers"] = peers(tmp, args.n, args.peer_repeat)
    figs["load_after"] = os.getloadavg()[0]
    text = report(args, figs)
    if args.json:
        figs["flat"] = {f"{name}, N={size}": ms for (name, size), ms in figs["flat"].items()}
        Path(args.json).write_text(json.dumps(figs, indent=1, default=str), "utf-8")
    print(f"\n(took {time.perf_counter() - started:.0f}s)\n", flush=True)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
