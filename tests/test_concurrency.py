"""Real processes: concurrent writers, and kill -9 in the middle of writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keyring_hardened.errors import NotFoundError
from keyring_hardened.store import Store

WRITER = textwrap.dedent("""
    import sys
    from keyring_hardened.config import Config
    from keyring_hardened.store import Store
    home, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # Losing nothing under contention is the point, not latency: on a loaded
    # machine a writer may wait its turn longer than the default 10 s.
    with Store.open(home, create=True, config=Config(busy_timeout=120.0)) as s:
        for i in range(count):
            s.set(f"svc-{prefix}", f"user-{i}", f"secret-{prefix}-{i}")
            # Acknowledge only after set() returned, i.e. after COMMIT.
            print(i, flush=True)
""")

BACKEND_WRITER = textwrap.dedent("""
    import sys
    import keyring
    from keyring_hardened.backend import HardenedKeyring
    keyring.set_keyring(HardenedKeyring())
    prefix, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        keyring.set_password(f"svc-{prefix}", f"user-{i}", f"secret-{prefix}-{i}")
""")

pytestmark = pytest.mark.slow


def _spawn(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))


def test_four_writers_lose_nothing(home: Path) -> None:
    # No vault yet: the four race to create it too.
    procs = [_spawn(WRITER, str(home), str(p), "200") for p in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert len(out.split()) == 200
    with Store.open(home) as s:
        assert len(s.credentials()) == 800
        for n in range(4):
            for i in range(0, 200, 7):
                assert s.get(f"svc-{n}", f"user-{i}").reveal() == f"secret-{n}-{i}"
        assert s.status()["keys"][0]["wrap_count"] == 800


def test_four_keyring_processes_same_credentials(home: Path) -> None:
    """Writers of the same names through the keyring API: every write a version."""
    Store.init(home).close()
    env = {"KEYRING_HARDENED_HOME": str(home)}
    procs = [_spawn(BACKEND_WRITER, "shared", "50", env=env) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with Store.open(home) as s:
        assert len(s.credentials()) == 50
        for i in range(50):
            assert s.get("svc-shared", f"user-{i}").reveal() == f"secret-shared-{i}"
            assert s.history("svc-shared", f"user-{i}")[0].version == 4


@pytest.mark.parametrize("after", [1, 37, 150])
def test_kill_9_loses_no_acknowledged_write(home: Path, after: int) -> None:
    Store.init(home).close()
    proc = _spawn(WRITER, str(home), "k", "100000")
    assert proc.stdout is not None
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= after:
            break
    os.kill(proc.pid, signal.SIGKILL)
    # Acknowledgements still in the pipe, or already read ahead into the
    # reader's buffer, count as well: drain the same reader to its end.
    for line in proc.stdout:
        acked = int(line)
    proc.communicate(timeout=30)
    with Store.open(home) as s:
        for i in range(acked + 1):
            assert s.get("svc-k", f"user-{i}").reveal() == f"secret-k-{i}"
        # Whatever the kill interrupted is either whole or absent: read it.
        names = {c.username for c in s.credentials()}
        assert len(names) in (acked + 1, acked + 2)
        interrupted = f"user-{acked + 1}"
        if interrupted in names:
            assert s.get("svc-k", interrupted).reveal() == f"secret-k-{acked + 1}"
        else:
            with pytest.raises(NotFoundError):
                s.get("svc-k", interrupted)
        s.set("svc-k", "after-crash", "fine")
        assert s.get("svc-k", "after-crash").reveal() == "fine"


@pytest.mark.parametrize(("point", "made"), [
    ("create-after-key-file", False),   # the key file exists, no database yet
    ("create-before-link", False),      # a complete database under its temporary name
    ("create-after-link", True),        # vault.db linked into place, never opened
])
def test_kill_9_during_vault_creation(tmp_path: Path, point: str, made: bool) -> None:
    """A creator killed at each step: the vault exists whole or not at all."""
    home = tmp_path / "vault"
    # The child kills itself at the named step, so the kill lands there every time.
    proc = _spawn(WRITER, str(home), "c", "1", env={"KEYRING_HARDENED_CRASH_AT": point})
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (home / "vault.db").exists() is made
    if made:
        with Store.open(home) as s:
            assert s.credentials() == []
            s.trail.verify()
    # Nothing half-made blocks the next creator, and it reuses the key file.
    key = (home / "master.key").read_bytes()
    with Store.open(home, create=True) as s:
        s.set("a", "b", "c")
        assert s.get("a", "b").reveal() == "c"
    assert (home / "master.key").read_bytes() == key
