"""Field robustness (issue 9 items 2-7, 12, 14-16, 18): OS errors, bounds, output, helpers."""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from keyring_hardened import cli, sinks
from keyring_hardened.audit import Event
from keyring_hardened.config import Config, load_config, parse_duration
from keyring_hardened.errors import ConfigError, LockedError
from keyring_hardened.location import default_actor
from keyring_hardened.passphrase import from_environment
from keyring_hardened.store import Store

from .conftest import CANARY, run_cli

ROOT = Path(__file__).resolve().parent.parent
OTHER = 65534
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0
                                or shutil.which("setpriv") is None,
                                reason="runs commands as another uid: needs root and setpriv")


def as_other(argv: list[str], env: dict[str, str], timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as uid/gid 65534 (nobody), the way a second user would.

    Without coverage's subprocess hook: that user cannot write the test run's
    coverage data, and the failure would end the process with an error of
    coverage's own.
    """
    env = {k: v for k, v in env.items()
           if k != "COVERAGE_PROCESS_START" and not k.startswith("COV_CORE_")}
    return subprocess.run(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups",
                           *argv], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


_MADE: list[Path] = []


@atexit.register
def _remove_trees() -> None:
    for path in _MADE:
        shutil.rmtree(path, ignore_errors=True)


def _other_tree(tmp_path: Path) -> Path:
    """A folder the other user owns, reachable by them.

    Made outside pytest's temporary tree: that tree's top folder is root's
    and 0700, and every pytest session that starts on the machine (another
    suite, a mutation run) sets it back to 0700, which would cut the other
    user off in the middle of a test.
    """
    del tmp_path  # kept in the signature: callers pass theirs
    top = Path(tempfile.mkdtemp(prefix="kh-other-", dir="/tmp"))
    _MADE.append(top)
    os.chmod(top, 0o711)
    base = top / "other"
    base.mkdir(mode=0o700)
    os.chown(base, OTHER, OTHER)
    return base


# -- item 2: OS errors are the project's own errors ----------------------------------


@needs_root
def test_status_on_an_unreadable_home_names_it(tmp_path: Path) -> None:
    base = _other_tree(tmp_path)
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(base / "vault"), "HOME": str(base)}
    made = as_other([sys.executable, "-m", "keyring_hardened", "init"], env)
    assert made.returncode == 0, made.stderr
    os.chmod(base / "vault", 0o000)
    done = as_other([sys.executable, "-m", "keyring_hardened", "status"], env)
    assert done.returncode in (2, 8), done.stderr
    assert str(base / "vault") in done.stderr
    assert "internal error" not in done.stderr


@needs_root
def test_stale_read_only_wal_names_the_culprit(tmp_path: Path) -> None:
    base = _other_tree(tmp_path)
    home = base / "vault"
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(home), "HOME": str(base)}
    assert as_other([sys.executable, "-m", "keyring_hardened", "init"], env).returncode == 0
    # What a read-only episode leaves: a WAL and its index at the mode vault.db
    # had then. (Empty ones SQLite would chmod back itself.)
    for suffix, content in (("-wal", os.urandom(4096)), ("-shm", bytes(32768))):
        stale = Path(f"{home / 'vault.db'}{suffix}")
        stale.write_bytes(content)
        os.chown(stale, OTHER, OTHER)
        os.chmod(stale, 0o400)  # what a read-only episode leaves
    done = as_other([sys.executable, "-m", "keyring_hardened", "list"], env)
    assert done.returncode == 8, done.stderr
    assert "vault.db-wal" in done.stderr or "vault.db-shm" in done.stderr
    assert "chmod 600" in done.stderr


def test_get_to_a_full_disk_is_exit_8(home: Path) -> None:
    run_cli("init", home=home)
    run_cli("set", "s", "u", home=home, stdin=CANARY)
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "keyring_hardened", "get", "s", "u"],
                              env={**os.environ, "KEYRING_HARDENED_HOME": str(home)},
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False)
    assert done.returncode == 8, done.stderr
    assert "No space left" in done.stderr
    assert CANARY not in done.stderr


@pytest.mark.parametrize("argv", [
    ["get", "s", "u", "--version", "99999999999999999999"],
    ["get", "s", "u", "--version", "9" * 5000],
    ["rollback", "s", "u", "--version", "0"],
    ["key", "retire", "--below", "-1"],
    ["audit", "show", "--limit", "99999999999999999999"],
    ["audit", "prune", "--archive", "a.jsonl", "--keep", "99999999999999d"],
    ["audit", "prune", "--archive", "a.jsonl", "--keep", "9" * 5000 + "s"],
    ["audit", "prune", "--archive", "a.jsonl", "--keep", ""],
    ["set", "s", "u", "--ttl", ""],
])
def test_out_of_range_arguments_are_exit_2(argv: list[str], home: Path, tmp_path: Path) -> None:
    run_cli("init", home=home)
    done = subprocess.run([sys.executable, "-m", "keyring_hardened", *argv], cwd=tmp_path,
                          env={**os.environ, "KEYRING_HARDENED_HOME": str(home)}, input="x",
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_ttl_empty_stores_nothing(home: Path) -> None:
    run_cli("init", home=home)
    assert run_cli("set", "s", "u", "--ttl", "", home=home, stdin="x").returncode == 2
    assert run_cli("get", "s", "u", home=home).returncode == 1


def test_non_utf8_export_path_is_refused_and_writes_nothing(home: Path, tmp_path: Path) -> None:
    run_cli("init", home=home)
    name = os.fsdecode(b"export-\xff.jsonl")
    done = subprocess.run([sys.executable, "-m", "keyring_hardened", "audit", "export", name],
                          cwd=tmp_path, env={**os.environ, "KEYRING_HARDENED_HOME": str(home)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "not valid UTF-8" in done.stderr
    assert not any(p.name.startswith("export-") for p in tmp_path.iterdir())


# -- item 3: the first keyring set -----------------------------------------------------


def _keyring_env(home: Path) -> dict[str, str]:
    return {**os.environ, "KEYRING_HARDENED_HOME": str(home),
            "PYTHON_KEYRING_BACKEND": "keyring_hardened.backend.HardenedKeyring"}


def test_first_keyring_set_says_so_on_the_keyring_command(home: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "keyring", "set", "svc", "u"], input="x\n",
                          env=_keyring_env(home), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "created a new key-file vault" in done.stderr
    assert "master.key" in done.stderr
    again = subprocess.run([sys.executable, "-m", "keyring", "set", "svc", "u"], input="y\n",
                           env=_keyring_env(home), capture_output=True, text=True, timeout=60,
                           check=False)
    assert "created a new key-file vault" not in again.stderr
    status = run_cli("status", home=home)
    assert "created: " in status.stdout
    assert ":keyring" in status.stdout


def test_first_set_in_an_app_is_quiet_but_logged(home: Path) -> None:
    code = textwrap.dedent("""
        import logging, keyring
        logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
        keyring.set_password("svc", "u", "x")
    """)
    quiet = subprocess.run([sys.executable, "-c", "import keyring; "
                            "keyring.set_password('svc', 'u', 'x')"],
                           env=_keyring_env(home), capture_output=True, text=True, timeout=60,
                           check=False)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    logged = subprocess.run([sys.executable, "-c", code], env=_keyring_env(home.parent / "v2"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert "LOG keyring_hardened created a new key-file vault" in logged.stderr


# -- item 4: actors ---------------------------------------------------------------------


def test_actor_of_python_c_and_scripts(home: Path, tmp_path: Path) -> None:
    Store.init(home).close()
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(home)}
    code = "from keyring_hardened.store import Store; Store.open().get('s', 'u') if 0 else " \
           "Store.open().credentials()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    script = tmp_path / "deploy.py"
    script.write_text(code.replace("; ", "\n"))
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=60)
    with Store.open(home, actor="test") as s:
        actors = [e.actor for e in s.trail.show(op="list")]
    assert any(a.endswith(f":{Path(sys.executable).name} -c") for a in actors), actors
    assert any(a.endswith(":deploy.py") for a in actors), actors
    assert not any(a.endswith(":-c") for a in actors)


def test_derived_actor_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["/bin/evil\x1b[31m\nname" + "x" * 400])
    actor = default_actor()
    assert actor.isprintable()
    assert len(actor) <= 256
    assert "\x1b" not in actor


# -- item 6: busy_timeout ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["25d", "2h", "100w"])
def test_busy_timeout_is_range_checked(value: str, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nbusy_timeout = "{value}"\n')
    with pytest.raises(ConfigError, match=r"storage\.busy_timeout: must be at most 1h"):
        load_config(path)


def test_busy_timeout_within_range(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[storage]\nbusy_timeout = "1h"\n')
    assert load_config(path).busy_timeout == 3600


def test_durations_are_bounded() -> None:
    with pytest.raises(ConfigError, match="100 years"):
        parse_duration("40000d")
    with pytest.raises(ConfigError):
        parse_duration("9" * 5000 + "s")


# -- item 12: the file sink ----------------------------------------------------------------


def _event(reason: str = "r") -> Event:
    return Event(1, 1_750_000_000_000_000, "a", "read", "s", "u", "ok", 1, reason, b"\x00" * 32)


def test_sink_does_not_follow_links(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "sink.jsonl"
    link.symlink_to(victim)
    with caplog.at_level(logging.WARNING, "keyring_hardened.audit"):
        sinks.Sinks((f"file:{link}",)).emit(_event())
    assert victim.read_text() == "precious\n"
    assert "symbolic link" in caplog.text


def test_sink_fifo_does_not_hang(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fifo = tmp_path / "sink.fifo"
    os.mkfifo(fifo)
    with caplog.at_level(logging.WARNING, "keyring_hardened.audit"):
        sinks.Sinks((f"file:{fifo}",)).emit(_event())
    assert "FIFO" in caplog.text


def test_relative_sink_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[audit]\nsinks = ["file:audit.jsonl"]\n')
    with pytest.raises(ConfigError, match="must be absolute"):
        load_config(path)


def test_sink_short_write_leaves_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "sink.jsonl"
    sink = sinks.Sinks((f"file:{path}",))
    sink.emit(_event("first"))
    real_write = os.write
    calls = {"n": 0}

    def short(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, data[:10])  # the disk fills part way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short)
    with caplog.at_level(logging.WARNING, "keyring_hardened.audit"):
        sink.emit(_event("second"))
    monkeypatch.setattr(os, "write", real_write)
    sink.emit(_event("third"))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["reason"] for line in lines] == ["first", "third"]
    assert "No space left" in caplog.text


def test_syslog_never_falls_back_to_udp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sinks, "SYSLOG_SOCKET", str(tmp_path / "no-such-socket"))
    logger = logging.getLogger("keyring_hardened.audit.syslog")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    with caplog.at_level(logging.WARNING, "keyring_hardened.audit"):
        sinks.Sinks(("syslog",)).emit(_event())
    assert "cannot connect" in caplog.text
    assert not logger.handlers


# -- item 14: passphrase_command ------------------------------------------------------------


def _cmd(code: str) -> Config:
    return Config(passphrase_command=(sys.executable, "-c", code))


def test_helper_environment_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRING_HARDENED_NEW_PASSPHRASE", CANARY)
    monkeypatch.setenv("SOME_APP_TOKEN", CANARY)
    out = tmp_path / "env.json"
    code = f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w')); print('pw')"
    assert from_environment(_cmd(code)) == "pw"
    seen = json.loads(out.read_text())
    assert CANARY not in json.dumps(seen)
    assert "PATH" in seen


def test_answer_taken_at_first_newline_despite_background_job(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The helper answers and exits, leaving a job that holds its stdout for
    # far longer than the timeout: the answer must still be taken.
    monkeypatch.setattr("keyring_hardened.passphrase._COMMAND_TIMEOUT", 20.0)
    code = ("import subprocess, sys; print('pw-line', flush=True); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])")
    assert from_environment(_cmd(code)) == "pw-line"


def test_timeout_kills_the_whole_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keyring_hardened.passphrase._COMMAND_TIMEOUT", 1.0)
    pidfile = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep(120)']); open({str(pidfile)!r}, 'w').write(str(p.pid)); "
            f"time.sleep(120)")
    with pytest.raises(LockedError, match="no answer"):
        from_environment(_cmd(code))
    pid = int(pidfile.read_text())
    # Killed with the group: gone, or a zombie awaiting its reaper (or the pid
    # already reused by an unrelated process, which would not be our sleeper).
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        state, cmdline = "gone", b""
    assert state == "Z" or b"time.sleep(120)" not in cmdline, state


def test_helper_output_is_capped() -> None:
    code = "import sys\nfor _ in range(5000): sys.stdout.write('x' * 65536)"
    with pytest.raises(LockedError, match="more than 65536 bytes"):
        from_environment(_cmd(code))


# -- item 15: terminal output ----------------------------------------------------------------


def test_audit_show_escapes_every_cell(home: Path, tmp_path: Path) -> None:
    run_cli("init", home=home)
    evil = "x\x1b[31mRED\x1b]0;title\x07\u202e\x9b.jsonl"
    done = subprocess.run([sys.executable, "-m", "keyring_hardened", "audit", "export", evil],
                          cwd=tmp_path, env={**os.environ, "KEYRING_HARDENED_HOME": str(home)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for argv in (["audit", "show"], ["audit", "show", "--json"]):
        out = run_cli(*argv, home=home).stdout
        for raw in ("\x1b", "\x07", "\u202e", "\x9b"):
            assert raw not in out, (argv, raw)
    shown = run_cli("audit", "show", "--json", home=home).stdout.splitlines()
    assert any(json.loads(line)["reason"] == str(tmp_path / evil) or
               json.loads(line)["reason"] == evil for line in shown)


def test_json_output_escapes_c1_and_bidi(home: Path) -> None:
    run_cli("init", home=home)
    run_cli("set", "svc\u202egnp.exe", "u\x85", home=home, stdin="x")
    out = run_cli("list", "--json", home=home).stdout
    assert "\u202e" not in out
    assert "\x85" not in out
    assert json.loads(out)[0]["service"] == "svc\u202egnp.exe"


# -- item 16: the Ansible template leak is documented -----------------------------------------


def test_template_leak_documented() -> None:
    for doc in (ROOT / "ansible_collection" / "README.md",
                ROOT / "docs" / "credential-storage-security.md"):
        text = doc.read_text()
        assert "to_datetime" in text
        assert "2.19" in text


# -- item 18: minor --------------------------------------------------------------------------


def test_debug_zero_is_off(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                           ) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError(CANARY)
    monkeypatch.setattr(Store, "open", boom)
    for off in ("0", "false", "off", ""):
        monkeypatch.setenv("KEYRING_HARDENED_DEBUG", off)
        assert cli.main(["get", "s", "u"]) == cli.EXIT_INTERNAL
    assert CANARY not in capsys.readouterr().err


def test_grammar(home: Path) -> None:
    run_cli("init", home=home)
    run_cli("set", "s", "u", home=home, stdin="x")
    run_cli("key", "rotate", home=home)
    rewrap = run_cli("key", "rewrap", home=home)
    assert "in 1 batch " in rewrap.stderr
    assert "1 data key " in rewrap.stderr
    retire = run_cli("key", "retire", "--below", "2", home=home)
    assert "retired key version 1\n" in retire.stderr


@pytest.mark.parametrize("argv", [["get"], ["key", "rotate"], ["audit", "show"],
                                  ["config", "check"], ["key"]])
def test_subcommand_help_has_a_description(argv: list[str]) -> None:
    done = run_cli(*argv, "--help")
    assert done.returncode == 0
    paragraphs = done.stdout.split("\n\n")
    assert len(paragraphs) >= 3, done.stdout
    assert not paragraphs[1].startswith(("positional", "options"))
