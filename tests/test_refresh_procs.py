"""TTL auto-refresh across real processes: single flight, kill -9 of the runner, the
backend's background thread, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from keyring_hardened.config import Config
from keyring_hardened.refresh import command_spec
from keyring_hardened.store import Store

from .conftest import CANARY, run_cli

pytestmark = pytest.mark.slow

KEYRING_GET = textwrap.dedent("""
    import keyring
    from keyring_hardened.backend import HardenedKeyring
    keyring.set_keyring(HardenedKeyring())
    print(keyring.get_password("svc", "u"))
""")

BACKGROUND = textwrap.dedent("""
    import time, keyring
    from keyring_hardened.backend import HardenedKeyring
    keyring.set_keyring(HardenedKeyring())
    first = keyring.get_password("svc", "u")
    end = time.monotonic() + 60
    value = first
    while value == first and time.monotonic() < end:
        time.sleep(0.05)
        value = keyring.get_password("svc", "u")
    print(first, value)
""")


def refresher(tmp_path: Path, sleep: float = 0.5) -> str:
    """A refresher that counts its runs, sleeps, and prints ``fresh-<run>``."""
    script = tmp_path / "refresher.py"
    script.write_text(textwrap.dedent(f"""
        import fcntl, sys, time
        with open({str(tmp_path / 'runs')!r}, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            n = len(f.read()) + 1
            f.write("x")
        time.sleep({sleep})
        print(f"fresh-{{n}}")
    """))
    return f"{sys.executable} {script}"


def runs(tmp_path: Path) -> int:
    path = tmp_path / "runs"
    return len(path.read_text()) if path.exists() else 0


def expired_vault(home: Path, command: str, *, ttl: float = 60, ahead: float | None = None,
                  age: float = 1000, config: str = "") -> dict[str, str]:
    """A vault whose one credential was set ``age`` seconds ago (so, with ttl < age, expired)."""
    if config:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / "config.toml").write_text(config)
        (home / "config.toml").chmod(0o600)
    with Store.init(home, config=Config(), actor="setup",
                    clock=lambda: time.time() - age) as s:
        s.set("svc", "u", CANARY, ttl=ttl, refresher=command_spec(command),
              refresh_ahead=ahead)
    return {**os.environ, "KEYRING_HARDENED_HOME": str(home)}


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def test_eight_get_processes_run_the_refresher_once(home: Path, tmp_path: Path) -> None:
    env = expired_vault(home, refresher(tmp_path))
    procs = [_spawn([sys.executable, "-m", "keyring_hardened", "get", "svc", "u"], env)
             for _ in range(8)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [(p.returncode, out) for p, (out, _) in zip(procs, results, strict=True)] == \
        [(0, "fresh-1\n")] * 8, results
    assert runs(tmp_path) == 1
    with Store.open(home) as s:
        assert [v.version for v in s.history("svc", "u")] == [2, 1]
        refreshes = [e for e in s.trail.events() if e.op == "refresh"] \
            if hasattr(s.trail, "events") else None
    with sqlite3.connect(home / "vault.db") as conn:
        done = conn.execute("SELECT count(*) FROM audit_events WHERE op = 'refresh'"
                            " AND reason LIKE 'refreshed%'").fetchone()[0]
        leases = conn.execute("SELECT count(*) FROM refresh_leases").fetchone()[0]
    assert (done, leases) == (1, 0)
    del refreshes


def test_eight_readers_of_a_failing_refresher_run_it_once(home: Path, tmp_path: Path) -> None:
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        with open({str(tmp_path / 'runs')!r}, "a") as f:
            f.write("x")
        time.sleep(2)
        sys.exit("upstream said no")
    """))
    env = expired_vault(home, f"{sys.executable} {script}")
    procs = [_spawn([sys.executable, "-m", "keyring_hardened", "get", "svc", "u"], env)
             for _ in range(8)]
    results = [p.communicate(timeout=120) for p in procs]
    # Waiters see the runner let go without a value; latecomers find the failure
    # recent: nobody runs it again (the retry waits 5 s, doubling).
    assert [p.returncode for p in procs] == [7] * 8, results
    assert all(err.endswith("the refresh failed (exit 1: upstream said no)\n")
               for _, err in results), results
    assert all(CANARY not in out + err for out, err in results)
    assert runs(tmp_path) == 1


def test_eight_keyring_processes_run_the_refresher_once(home: Path, tmp_path: Path) -> None:
    env = expired_vault(home, refresher(tmp_path))
    procs = [_spawn([sys.executable, "-c", KEYRING_GET], env) for _ in range(8)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [(p.returncode, out) for p, (out, _) in zip(procs, results, strict=True)] == \
        [(0, "fresh-1\n")] * 8, results
    assert runs(tmp_path) == 1


@pytest.mark.parametrize(("point", "ran"), [("refresh-running", 0),
                                            ("refresh-before-write", 1)])
def test_kill_9_of_the_runner_and_the_next_reader_takes_over(
        home: Path, tmp_path: Path, point: str, ran: int) -> None:
    # A lease lasts refresh_timeout + 2 s: 3 s here.
    env = expired_vault(home, refresher(tmp_path, sleep=0), config='refresh_timeout = "1s"\n')
    crashed = subprocess.run([sys.executable, "-m", "keyring_hardened", "get", "svc", "u"],
                             env={**env, "KEYRING_HARDENED_CRASH_AT": point},
                             capture_output=True, text=True, timeout=60, check=False)
    assert crashed.returncode == -signal.SIGKILL
    assert runs(tmp_path) == ran
    with sqlite3.connect(home / "vault.db") as conn:
        assert conn.execute("SELECT count(*) FROM refresh_leases").fetchone()[0] == 1
    # The next reader waits for the dead runner's lease to run out, then takes over.
    after = subprocess.run([sys.executable, "-m", "keyring_hardened", "get", "svc", "u"],
                           env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (after.returncode, after.stdout) == (0, f"fresh-{ran + 1}\n"), after.stderr
    assert runs(tmp_path) == ran + 1
    with Store.open(home) as s:
        assert [v.version for v in s.history("svc", "u")] == [2, 1]
        s.trail.verify()


def test_an_opted_in_backend_process_refreshes_in_the_background(
        home: Path, tmp_path: Path) -> None:
    # Set 100 s ago, TTL 600 s, window 550 s: inside the window now, far from expiry.
    env = expired_vault(home, refresher(tmp_path, sleep=0), ttl=600, ahead=550, age=100,
                        config="[refresh]\nbackground = true\n")
    done = subprocess.run([sys.executable, "-c", BACKGROUND], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, f"{CANARY} fresh-1\n"), done.stderr
    assert runs(tmp_path) == 1
    assert done.stderr == ""


def test_cli_set_ttl_refresh_list_status(home: Path, tmp_path: Path) -> None:
    def cli(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        done = run_cli(*args, home=home, stdin=stdin)
        return done.returncode, done.stdout, done.stderr

    assert cli("init")[0] == 0
    # Bad input: one line, exit 2, nothing stored.
    code, out, err = cli("set", "svc", "u", "--refresh-command", f"'get {CANARY}", stdin="v\n")
    assert (code, out) == (2, "")
    assert err == ("keyring-hardened: error: --refresh-command: cannot be split into arguments "
                   "(check its quotes)\n")
    assert cli("set", "svc", "u", "--refresher", "nope", stdin="v\n")[0] == 2
    assert cli("set", "svc", "u", "--refresher", "generate", "--refresh-command", "x",
               stdin="v\n")[0] == 2
    assert cli("list") == (0, "", "")
    token = f"--token={CANARY}"
    assert cli("set", "svc", "u", "--ttl", "1h", "--refresh-ahead", "5m", "--refresh-command",
               f"{refresher(tmp_path, sleep=0)} {token}", stdin="old\n")[0] == 0
    code, out, _ = cli("list")
    assert out.splitlines()[0].split() == ["SERVICE", "USERNAME", "VERSION", "UPDATED",
                                           "EXPIRES", "REFRESH"]
    assert out.splitlines()[1].split()[-1] == "command"
    code, out, _ = cli("refresh", "svc", "u")
    assert (code, out) == (0, "service 'svc', user 'u': refreshed (version 2)\n")
    assert cli("get", "svc", "u")[1] == "fresh-1\n"
    code, out, _ = cli("refresh", "--due")
    assert (code, out) == (0, "")
    code, out, _ = cli("refresh", "--due", "svc", "u")
    assert (code, out) == (0, "service 'svc', user 'u': not due\n")
    assert cli("refresh")[0] == 2
    assert cli("refresh", "svc")[0] == 2
    # A failing refresher: exit 7 with the summary; the value stays.
    assert cli("ttl", "svc", "u", "--refresh-command",
               f"{sys.executable} -c \"import sys; sys.exit('denied for {CANARY}')\"")[0] == 0
    code, out, err = cli("refresh", "svc", "u")
    assert (code, out) == (7, "")
    assert err == ("keyring-hardened: error: service 'svc', user 'u': refresh failed: exit 1: "
                   "denied for [redacted]\n")
    code, out, _ = cli("status")
    assert "expiry: 0 expired, 0 within their refresh-ahead window; refreshers: 1, 1 failing" \
        in out
    assert json.loads(cli("status", "--json")[1])["refresh"]["failing"] == 1
    assert cli("list")[1].splitlines()[1].split()[-2:] == ["command", "(failing)"]
    # history shows it on the current version only, never the spec.
    code, out, _ = cli("history", "svc", "u")
    lines = out.splitlines()
    assert lines[0].split() == ["VERSION", "KEY", "CREATED", "EXPIRES", "REFRESH"]
    assert lines[1].split()[-3:] == ["command", "(failing)", "current"]
    assert lines[2].split()[0] == "1"
    assert "command" not in lines[2]
    shown = json.loads(cli("history", "svc", "u", "--json")[1])
    assert [(v["refresher"], v["refresh_failure"]) for v in shown] == [
        ("command", "exit 1: denied for [redacted]"), (None, None)]
    assert CANARY not in out + json.dumps(shown)
    assert cli("get", "svc", "u")[1] == "fresh-1\n"
    # ttl: none, a duration, --no-refresh; bad input is exit 2.
    assert cli("ttl", "svc", "u", "none")[0] == 0
    assert cli("ttl", "svc", "u", "soon")[0] == 2
    assert cli("ttl", "svc", "u", "--no-refresh", "--refresher", "generate")[0] == 2
    assert cli("ttl", "svc", "u", "2h", "--refresh-ahead", "none")[0] == 0
    assert cli("ttl", "svc", "u", "--no-refresh")[0] == 0
    code, out, _ = cli("list", "--json")
    assert json.loads(out)[0]["refresher"] is None
    assert cli("ttl", "svc", "nobody", "1h")[0] == 1
    # Expired with a failing refresher: exit 7 naming the failure.
    assert cli("ttl", "svc", "u", "1s", "--refresh-command", "false")[0] == 0
    time.sleep(1.1)  # let the 1 s TTL pass (the outcome, not the time, is asserted)
    code, out, err = cli("get", "svc", "u")
    assert (code, out) == (7, "")
    assert err.endswith("; the refresh failed (exit 1)\n")
    for args in (("audit", "show"), ("status", "--json"), ("list", "--json")):
        code, out, err = cli(*args)
        assert CANARY not in out + err
