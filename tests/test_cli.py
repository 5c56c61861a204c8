from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from keyring_hardened import cli
from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF, PASSPHRASE, run_cli


class _Stdin(io.TextIOWrapper):
    def __init__(self, data: bytes, tty: bool = False) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def run(home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))

    def go(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", _Stdin(stdin.encode("utf-8")))
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return go


def test_main_flow(run: Any, home: Path) -> None:
    assert run("init")[0] == 0
    assert run("set", "svc", "alice", stdin="one\n")[0] == 0
    assert run("set", "svc", "alice", "-v", stdin="two\n") == (0, "", "stored version 2\n")
    assert run("get", "svc", "alice") == (0, "two\n", "")
    assert run("get", "svc", "alice", "--version", "1") == (0, "one\n", "")
    code, out, _ = run("list", "--json")
    assert json.loads(out)[0]["service"] == "svc"
    assert json.loads(out)[0]["version"] == 2
    code, out, _ = run("list")
    assert out.splitlines()[0].split() == ["SERVICE", "USERNAME", "VERSION", "UPDATED"]
    code, out, _ = run("history", "svc", "alice", "--json")
    assert [v["version"] for v in json.loads(out)] == [2, 1]
    code, out, _ = run("history", "svc", "alice")
    assert "current" in out.splitlines()[1]
    assert run("rollback", "svc", "alice") == (0, "", "restored as version 3\n")
    assert run("get", "svc", "alice")[1] == "one\n"
    assert run("delete", "svc", "alice")[0] == 0
    code, out, err = run("get", "svc", "alice")
    assert (code, out) == (1, "")
    assert err == "keyring-hardened: error: credential for service 'svc', user 'alice' " \
                  "is deleted\n"
    assert run("rollback", "svc", "alice", "--version", "3")[0] == 0
    assert run("delete", "svc", "alice", "--purge")[0] == 0
    assert run("history", "svc", "alice")[0] == 1
    assert run("list") == (0, "", "")


def test_set_keeps_whitespace_and_no_strip(run: Any) -> None:
    run("set", "s", "u", stdin="  spaced \t\n\n")
    assert run("get", "s", "u")[1] == "  spaced \t\n\n"
    run("set", "s", "u", "--no-strip", stdin="line\n")
    assert run("get", "s", "u")[1] == "line\n\n"


def test_set_creates_vault_and_says_so(run: Any, home: Path) -> None:
    code, _, err = run("set", "s", "u", stdin="x")
    assert code == 0
    assert "created a new key-file vault" in err
    assert (home / "master.key").exists()


def test_set_rejects_non_utf8(run: Any, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", _Stdin(b"\xff\xfe"))
    assert cli.main(["set", "s", "u"]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_set_prompts_on_a_tty(run: Any, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter([CANARY, CANARY, CANARY, "different"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    monkeypatch.setattr("sys.stdin", _Stdin(b"", tty=True))
    assert cli.main(["set", "s", "u"]) == 0
    assert cli.main(["set", "s", "u"]) == 2
    out, err = capsys.readouterr()
    assert "did not match" in err
    assert CANARY not in out + err


def test_init_twice_and_passphrase(run: Any, home: Path, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path) -> None:
    monkeypatch.setattr(cli, "_tty", lambda: False)
    monkeypatch.setenv("KEYRING_HARDENED_PASSPHRASE", PASSPHRASE)
    config = tmp_path / "fast.toml"
    config.write_text(f"[kdf]\nargon2_memory_kib = {FAST_KDF.argon2_memory_kib}\n"
                      "argon2_iterations = 2\nargon2_lanes = 1\n")
    monkeypatch.setenv("KEYRING_HARDENED_CONFIG", str(config))
    code, out, _ = run("init", "--passphrase")
    assert code == 0
    assert "argon2id (memory 19456 KiB, iterations 2, lanes 1)" in out
    code, _, err = run("init")
    assert code == 2
    assert "already exists" in err
    run("set", "s", "u", stdin=CANARY)
    monkeypatch.setenv("KEYRING_HARDENED_PASSPHRASE", "wrong passphrase!")
    code, out, err = run("get", "s", "u")
    assert (code, out) == (6, "")
    assert "wrong passphrase" in err


def test_init_prompts_twice(run: Any, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setattr(cli, "_tty", lambda: True)
    answers = iter([PASSPHRASE, "mismatch-mismatch"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    code, _, err = run("init", "--passphrase", "--kdf", "pbkdf2")
    assert code == 2
    assert "did not match" in err
    assert not (home / "vault.db").exists()
    answers = iter([PASSPHRASE, PASSPHRASE, PASSPHRASE])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert run("init", "--passphrase", "--kdf", "pbkdf2")[0] == 0
    assert run("status")[0] == 0


def test_status(run: Any, home: Path) -> None:
    code, out, _ = run("status")
    assert code == 0
    assert "vault: none" in out
    code, out, _ = run("status", "--json")
    assert json.loads(out) == {"home": str(home), "exists": False}
    run("init")
    run("set", "s", "u", stdin="x")
    code, out, _ = run("status")
    assert "credentials: 1 live" in out
    assert "key version 1: active" in out
    info = json.loads(run("status", "--json")[1])
    assert info["exists"] is True
    assert info["credentials"] == 1
    os.chmod(home, 0o755)
    assert "warning" in run("status")[2]


def test_config_check(run: Any, home: Path) -> None:
    code, out, _ = run("config", "check")
    assert code == 0
    assert "defaults apply" in out
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text("max_versions = 5\n")
    assert "OK" in run("config", "check")[1]
    (home / "config.toml").write_text("[kdf]\nargon2_iterations = 'x'\n")
    code, _, err = run("config", "check")
    assert code == 2
    assert "kdf.argon2_iterations" in err


@pytest.mark.parametrize("argv", [[], ["bogus"], ["get", "only-one"], ["get", "s", "u", "--version",
                                                                       "x"], ["config"]])
def test_usage_errors_are_one_line_exit_2(argv: list[str], run: Any) -> None:
    code, _, err = run(*argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("keyring-hardened: error:")


def test_version_and_help(run: Any) -> None:
    code, out, _ = run("--version")
    assert code == 0
    assert out.startswith("keyring-hardened ")
    code, out, _ = run("--help")
    assert code == 0
    assert "rollback" in out


def test_home_option_anywhere(run: Any, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run("--home", str(other), "init")[0] == 0
    assert run("set", "s", "u", "--home", str(other), stdin="x")[0] == 0
    assert (other / "vault.db").exists()
    assert run("get", "s", "u", "--home", str(other))[1] == "x\n"


def test_internal_errors_hide_text(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError(CANARY)
    monkeypatch.setattr(Store, "open", boom)
    code, out, err = run("get", "s", "u")
    assert code == cli.EXIT_INTERNAL
    assert CANARY not in out + err
    assert "RuntimeError" in err
    monkeypatch.setenv("KEYRING_HARDENED_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run("get", "s", "u")


def test_interrupt(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(*a: object, **k: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(Store, "open", stop)
    assert run("list")[0] == 130


def test_names_with_control_characters_are_escaped(run: Any) -> None:
    run("set", "line\nbreak", "tab\tuser", stdin="x")
    out = run("list")[1]
    assert "'line\\nbreak'" in out
    assert len(out.splitlines()) == 2


def test_real_processes(home: Path) -> None:
    assert run_cli("init", home=home).returncode == 0
    done = run_cli("set", "svc", "u", home=home, stdin=CANARY + "\n")
    assert done.returncode == 0
    assert CANARY not in done.stdout + done.stderr
    done = run_cli("get", "svc", "u", home=home)
    assert done.stdout == CANARY + "\n"
    done = run_cli("get", "svc", "missing", home=home)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    done = run_cli("list", "--json", home=home)
    assert CANARY not in done.stdout
    listed = json.loads(done.stdout)
    assert listed[0]["username"] == "u"


def test_console_script(home: Path) -> None:
    import shutil
    import subprocess

    exe = shutil.which("keyring-hardened")
    if exe is None:
        pytest.skip("console script not on PATH")
    env = dict(os.environ, KEYRING_HARDENED_HOME=str(home))
    done = subprocess.run([exe, "status"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert "vault: none" in done.stdout


def test_passphrase_vault_without_passphrase_is_locked(home: Path) -> None:
    Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF).close()
    done = run_cli("get", "s", "u", home=home)
    assert done.returncode == 6
    assert "needs a passphrase" in done.stderr
    done = run_cli("get", "s", "u", home=home, env={"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE})
    assert done.returncode == 1


def test_set_with_ttl_and_expired_exit_7(home: Path) -> None:
    import sqlite3

    assert run_cli("set", "svc", "u", "--ttl", "1h", home=home, stdin="x").returncode == 0
    hist = json.loads(run_cli("history", "svc", "u", "--json", home=home).stdout)
    assert hist[0]["expires_at"] is not None
    assert "EXPIRES" in run_cli("history", "svc", "u", home=home).stdout
    assert run_cli("set", "svc", "u", "--ttl", "soon", home=home, stdin="x").returncode == 2
    # Move the clock past the expiry the honest way: a TTL of one second.
    assert run_cli("set", "svc", "v", "--ttl", "1s", home=home, stdin=CANARY).returncode == 0
    import time

    time.sleep(1.1)
    done = run_cli("get", "svc", "v", home=home)
    assert done.returncode == 7
    assert "expired at" in done.stderr
    assert CANARY not in done.stdout + done.stderr
    with sqlite3.connect(home / "vault.db") as conn:
        assert conn.execute("SELECT count(*) FROM audit_events WHERE outcome = 'expired'"
                            ).fetchone()[0] == 1


def test_set_refuses_empty_and_closed_stdin(run: Any, home: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run("set", "s", "u", stdin="kept")
    code, _, err = run("set", "s", "u", stdin="")
    assert code == 2
    assert "empty; nothing was stored" in err
    code, _, err = run("set", "s", "u", stdin="\n")
    assert code == 2
    assert run("get", "s", "u")[1] == "kept\n"
    assert run("set", "s", "u", "--allow-empty", stdin="")[0] == 0
    assert run("get", "s", "u")[1] == "\n"
    monkeypatch.setattr("sys.stdin", None)
    assert cli.main(["set", "s", "u"]) == 2
    assert "stdin is closed" in capsys.readouterr().err


def test_set_with_closed_stdin_process(home: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "keyring_hardened", "--home", str(home), "set",
                           "s", "u"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2
    assert not (home / "vault.db").exists()
