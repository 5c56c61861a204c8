from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyring_hardened.config import Config
from keyring_hardened.store import Store

#: The PostgreSQL harness (tests/conftest_pg.py), and the store's behavioural
#: suite on both engines (tests/engines_plugin.py).
pytest_plugins = ["tests.conftest_pg", "tests.engines_plugin"]

#: Driven through every path; must never show anywhere but a successful read.
CANARY = "canary-7f3a9c1e-DO-NOT-LEAK"

#: Fast but legal KDF settings for passphrase tests (the OWASP floor).
FAST_KDF = Config(argon2_memory_kib=19456, argon2_iterations=2, argon2_lanes=1)

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the user's real vault, keyring config or environment."""
    for name in list(os.environ):
        if name.startswith(("KEYRING_HARDENED_", "KEYRING_PROPERTY_", "PYTHON_KEYRING")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "vault"


@pytest.fixture
def store(home: Path) -> Iterator[Store]:
    s = Store.init(home, config=Config(), actor="test")
    yield s
    s.close()


def run_cli(*args: str, home: Path | None = None, stdin: str | None = None,
            env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    """Run ``python -m keyring_hardened`` as a real process."""
    full_env = dict(os.environ)
    if home is not None:
        full_env["KEYRING_HARDENED_HOME"] = str(home)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "keyring_hardened", *args],
                          input=stdin if stdin is not None else "", capture_output=True,
                          text=True, env=full_env, timeout=timeout, check=False)
