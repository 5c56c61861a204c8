"""Benchmark: the unlock agent, as ratios against the peers in the same run.

Not a test: it measures and prints; it asserts nothing about time. Run with
``make bench-agent`` (or ``make bench``), or ``python agent.py`` from
``bench/`` in the bench venv.

1. A cold ``keyring get`` process through the agent on a passphrase vault,
   beside a cold ``keyring get`` on keyrings.alt's PlaintextKeyring with 100
   entries, and beside direct passphrase mode (one Argon2id per process).
   Round-robin, so the machine's noise falls on all alike.
2. In-process ``keyring.get_password`` through the agent: the median.
3. Eight client processes reading through the agent at once for 3 s.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script from bench/ (make bench): the repository root holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import OURS, PASSPHRASE, PEER_PASSWORD, PLAIN, _load, fill_ours, fill_peer

TARGET_COLD = 1.25
TARGET_INPROC_MS = 0.15
TARGET_READERS = 5000

READER = """
import random, sys, time
from keyring_hardened.agentproto import connect
from keyring_hardened.location import Location
home, start, duration, n = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
store = connect(Location.resolve(home))
rnd = random.Random()
while time.time() < start:
    time.sleep(0.001)
done, end = 0, start + duration
while time.time() < end:
    i = rnd.randrange(n)
    store.get(f"service-{i}", f"user-{i}")
    done += 1
print(done)
"""


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("KEYRING_", "PYTHON_KEYRING"))}
    return {**base, **extra}


def start_agent(home: Path) -> None:
    """``agent start`` on ``home`` (a passphrase vault): the one KDF run of the session."""
    done = subprocess.run([sys.executable, "-m", "keyring_hardened", "agent", "start"],
                          env=_env(KEYRING_HARDENED_HOME=str(home),
                                   KEYRING_HARDENED_PASSPHRASE=PASSPHRASE),
                          capture_output=True, text=True, check=False, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"agent start failed: {done.stderr.strip()}")


def stop_agent(home: Path) -> None:
    """``agent stop``."""
    subprocess.run([sys.executable, "-m", "keyring_hardened", "agent", "stop"],
                   env=_env(KEYRING_HARDENED_HOME=str(home)), capture_output=True,
                   check=False, timeout=60)


def cold(tmp: Path, home: Path, repeat: int) -> dict[str, Any]:
    """Median wall time of a whole ``keyring get`` process per case."""
    exe = Path(sys.executable).with_name("keyring")
    xdg = tmp / "cold-plain"
    fill_peer(PLAIN, xdg / "python_keyring" / _load(PLAIN).filename, 100)  # type: ignore[attr-defined]
    direct = tmp / "direct-passphrase"
    fill_ours(direct, 100, passphrase=True)
    cases = {
        "through the agent (passphrase vault)": _env(PYTHON_KEYRING_BACKEND=OURS,
                                                     KEYRING_HARDENED_HOME=str(home)),
        "direct (passphrase, Argon2id 64 MiB)": _env(
            PYTHON_KEYRING_BACKEND=OURS, KEYRING_HARDENED_HOME=str(direct),
            KEYRING_HARDENED_PASSPHRASE=PASSPHRASE),
        "PlaintextKeyring": _env(PYTHON_KEYRING_BACKEND=PLAIN, XDG_DATA_HOME=str(xdg)),
    }

    def once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(exe), "get", "service-3", "user-3"], env=env,
                              input=PEER_PASSWORD + "\n", capture_output=True, text=True,
                              check=False, start_new_session=True)

    for label, env in cases.items():
        done = once(env)
        if done.stdout.strip() != "secret-value-00000003":
            raise SystemExit(f"cold case {label} failed: {done.stderr.strip()[-300:]}")
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeat):
        for label, env in cases.items():
            t = time.perf_counter()
            once(env)
            samples[label].append(time.perf_counter() - t)
    medians = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    base = medians["PlaintextKeyring"]
    for label, ms in medians.items():
        print(f"  cold keyring get, {label}: {ms:.1f} ms ({ms / base:.2f}x PlaintextKeyring)",
              flush=True)
    ratio = medians["through the agent (passphrase vault)"] / base
    print(f"  through the agent: {ratio:.2f}x PlaintextKeyring (target at most {TARGET_COLD}x)",
          flush=True)
    return {"median_ms": medians, "ratio": ratio}


def inprocess(home: Path, n: int, repeat: int) -> dict[str, Any]:
    """Median ``keyring.get_password`` through the agent, in one process."""
    os.environ["KEYRING_HARDENED_HOME"] = str(home)
    import keyring

    from keyring_hardened.backend import HardenedKeyring

    keyring.set_keyring(HardenedKeyring())
    rnd = random.Random(3)
    keyring.get_password("service-1", "user-1")  # connect
    samples = []
    for _ in range(repeat):
        i = rnd.randrange(n)
        t = time.perf_counter()
        keyring.get_password(f"service-{i}", f"user-{i}")
        samples.append(time.perf_counter() - t)
    ms = statistics.median(samples) * 1000
    print(f"  in-process get_password through the agent: {ms:.3f} ms median "
          f"(target under {TARGET_INPROC_MS} ms)", flush=True)
    return {"median_ms": ms}


def readers(home: Path, n: int, procs: int = 8, duration: float = 3.0) -> dict[str, Any]:
    """Audited reads per second, in total, from ``procs`` clients of the agent at once."""
    start = time.time() + 2.0
    children = [subprocess.Popen([sys.executable, "-c", READER, str(home), str(start),
                                  str(duration), str(n)], stdout=subprocess.PIPE, text=True,
                                 env=_env(KEYRING_HARDENED_HOME=str(home)))
                for _ in range(procs)]
    counts = [int(c.communicate(timeout=120)[0]) for c in children]
    rate = sum(counts) / duration
    print(f"  {procs} clients reading through the agent at once: {rate:,.0f} audited reads/s "
          f"in total (target at least {TARGET_READERS:,})", flush=True)
    return {"reads_per_second": rate, "counts": counts}


def main() -> int:
    """Fill a passphrase vault, start its agent, run the three measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--cold-repeat", type=int, default=21)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kh-bench-agent-") as tmp:
        home = Path(tmp) / "vault"
        print(f"unlock agent (passphrase vault, N={args.n:,}):", flush=True)
        fill_ours(home, args.n, passphrase=True)
        start_agent(home)
        try:
            cold(Path(tmp), home, args.cold_repeat)
            inprocess(home, args.n, args.repeat)
            readers(home, args.n)
        finally:
            stop_agent(home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
