from __future__ import annotations

import sys

import pytest

from keyring_hardened.config import Config
from keyring_hardened.errors import LockedError
from keyring_hardened.passphrase import from_environment, provider


def _cmd(code: str) -> Config:
    return Config(passphrase_command=(sys.executable, "-c", code))


def test_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRING_HARDENED_PASSPHRASE", "from-env")
    assert from_environment(_cmd("print('from-cmd')")) == "from-env"


def test_command_output_one_newline_stripped() -> None:
    assert from_environment(_cmd("print('from-cmd ')")) == "from-cmd "
    assert from_environment(Config()) is None


@pytest.mark.parametrize(("code", "message"), [
    ("import sys; print('leaky', file=sys.stderr); sys.exit(3)", "exited with status 3"),
    ("print('')", "empty passphrase"),
    ("import sys; sys.stdout.buffer.write(b'\\xff')", "not UTF-8"),
])
def test_command_failures(code: str, message: str) -> None:
    with pytest.raises(LockedError, match=message) as info:
        from_environment(_cmd(code))
    assert "leaky" not in str(info.value)


def test_missing_program() -> None:
    with pytest.raises(LockedError, match="not found"):
        from_environment(Config(passphrase_command=("/nonexistent/helper",)))


def test_unrunnable_program(tmp_path: object) -> None:
    with pytest.raises(LockedError, match="cannot run"):
        from_environment(Config(passphrase_command=("/",)))


def test_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keyring_hardened.passphrase._COMMAND_TIMEOUT", 0.2)
    with pytest.raises(LockedError, match="no answer"):
        from_environment(_cmd("import time; time.sleep(5)"))


def test_provider_order() -> None:
    assert provider(Config(), lambda: "prompted")() == "prompted"
    with pytest.raises(LockedError, match="needs a passphrase"):
        provider(Config())()
