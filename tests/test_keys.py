from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from keyring_hardened.config import Config
from keyring_hardened.errors import IntegrityError, LockedError, UsageError
from keyring_hardened.store import Store
from keyring_hardened.testing import FrozenClock

from .conftest import CANARY, FAST_KDF, PASSPHRASE, run_cli


def _ops(store: Store) -> list[tuple[str, str | None]]:
    return [(e.op, e.reason) for e in reversed(store.trail.show())]


def test_rotate_write_read_old_and_new(store: Store) -> None:
    store.set("svc", "old", "old-secret")
    assert store.keys.rotate() == 2
    store.set("svc", "new", "new-secret")
    assert store.get("svc", "old").reveal() == "old-secret"
    assert store.get("svc", "new").reveal() == "new-secret"
    keys = {k.version: k for k in store.keys.versions()}
    assert (keys[1].state, keys[1].data_keys, keys[1].wrap_count) == ("decrypt-only", 1, 1)
    assert (keys[2].state, keys[2].data_keys, keys[2].wrap_count) == ("active", 1, 1)
    assert ("key-rotate", "manual") in _ops(store)


def test_rewrap_retire_everything_readable(store: Store) -> None:
    for i in range(25):
        store.set("svc", f"u{i}", f"s{i}")
        store.set("svc", f"u{i}", f"s{i}-v2")
    store.keys.rotate()
    with pytest.raises(UsageError, match="still wrap 50 data keys of 25 credentials") as info:
        store.keys.retire(2)
    assert "key rewrap" in str(info.value)
    seen: list[tuple[int, int]] = []
    summary = store.keys.rewrap(batch=7, progress=lambda d, t: seen.append((d, t)))
    assert (summary.rewrapped, summary.batches, summary.target_version) == (50, 8, 2)
    assert seen[-1] == (50, 50)
    assert store.keys.retire(2) == [1]
    assert store.keys.retire(2) == []
    for i in range(25):
        assert store.get("svc", f"u{i}").reveal() == f"s{i}-v2"
        assert store.get("svc", f"u{i}", version=1).reveal() == f"s{i}"
    keys = {k.version: k for k in store.keys.versions()}
    assert (keys[1].state, keys[1].data_keys) == ("retired", 0)
    assert keys[2].wrap_count == 50
    with sqlite3.connect(store.location.database) as conn:
        assert conn.execute("SELECT wrapped FROM keks WHERE version = 1").fetchone()[0] is None
    store.close()
    with Store.open(store.location.home) as again:
        assert again.get("svc", "u3").reveal() == "s3-v2"


def test_retire_refusals(store: Store) -> None:
    with pytest.raises(UsageError, match="active one"):
        store.keys.retire(2)
    with pytest.raises(UsageError, match="batch"):
        store.keys.rewrap(batch=0)


def test_rewrap_detects_tampered_key(store: Store) -> None:
    store.set("svc", "u", "x")
    store.keys.rotate()
    with sqlite3.connect(store.location.database) as conn:
        conn.execute("UPDATE secret_versions SET wrapped_key = zeroblob(61)")

    with pytest.raises(IntegrityError, match="version 1 of service 'svc', user 'u'"):
        store.keys.rewrap()


def test_automatic_rotation_by_age(home: Path) -> None:
    clock = FrozenClock()
    with Store.init(home, clock=clock, config=Config(rotate_after=90 * 86400.0)) as s:
        s.set("svc", "u", "one")
        assert s.status()["rotation"]["due_at"] == clock.now + 90 * 86400
        clock.advance(91 * 86400)
        assert s.get("svc", "u").reveal() == "one"  # reads never rotate
        assert [k.version for k in s.keys.versions()] == [1]
        s.set("svc", "u", "two")
        assert [(k.version, k.state) for k in s.keys.versions()] == [
            (1, "decrypt-only"), (2, "active")]
        assert s.history("svc", "u")[0].kek_version == 2
        assert ("key-rotate", "auto-age") in _ops(s)


def test_automatic_rotation_by_wrap_count(home: Path) -> None:
    with Store.init(home, config=Config(max_wraps=3)) as s:
        for i in range(7):
            s.set("svc", f"u{i}", "x")
        assert [(k.version, k.wrap_count) for k in s.keys.versions()] == [(1, 3), (2, 3), (3, 1)]
        assert _ops(s).count(("key-rotate", "auto-wrap-limit")) == 2
        assert s.status()["rotation"]["wraps_left"] == 2


def test_rolled_back_rotation_leaves_no_key_behind(home: Path) -> None:
    with Store.init(home, config=Config(max_wraps=1)) as s:
        s.set("svc", "a", "first")
        with sqlite3.connect(home / "vault.db") as conn:
            conn.execute("CREATE TRIGGER nope BEFORE INSERT ON secret_versions"
                         " BEGIN SELECT RAISE(ABORT, 'no'); END")
        # The trigger's abort is a constraint failure: reported as damage, undone whole.
        with pytest.raises(IntegrityError, match="damaged"):
            s.set("svc", "b", "second")
        assert [k.version for k in s.keys.versions()] == [1]
        with sqlite3.connect(home / "vault.db") as conn:
            conn.execute("DROP TRIGGER nope")
        s.set("svc", "b", "second")
        assert s.get("svc", "b").reveal() == "second"
    with Store.open(home) as again:
        assert again.get("svc", "b").reveal() == "second"


def test_rekey_key_file(store: Store, home: Path) -> None:
    store.set("svc", "u", CANARY)
    old = (home / "master.key").read_bytes()
    assert "new key file" in store.keys.rekey()
    assert (home / "master.key").read_bytes() != old
    assert store.get("svc", "u").reveal() == CANARY
    store.close()
    with Store.open(home) as s:
        assert s.get("svc", "u").reveal() == CANARY
        s.trail.verify()  # the chain spans the rekey
    (home / "master.key").write_bytes(old)
    with pytest.raises(LockedError, match="wrong key file"):
        Store.open(home)
    assert not (home / "master.key.new").exists()
    assert not (home / "rekey.json").exists()


def test_rekey_passphrase_and_switches(home: Path, tmp_path: Path) -> None:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("svc", "u", "x")
        s.keys.rekey(passphrase="second passphrase")
    with pytest.raises(LockedError, match="wrong passphrase"):
        Store.open(home, passphrase=PASSPHRASE, config=FAST_KDF)
    with Store.open(home, passphrase="second passphrase", config=FAST_KDF) as s:
        assert "argon2id" in s.status()["kdf"]
        s.keys.rekey(to="key file")
    assert (home / "master.key").exists()
    with Store.open(home) as s, pytest.raises(UsageError, match="at least 8"):
        s.keys.rekey(to="passphrase", passphrase="short")
    with Store.open(home, config=FAST_KDF) as s:
        s.keys.rekey(to="passphrase", passphrase="third passphrase", kdf="pbkdf2")
        assert "pbkdf2" in s.status()["kdf"]
        assert s.get("svc", "u").reveal() == "x"
    assert not (home / "master.key").exists()
    with Store.open(home, passphrase="third passphrase") as s:
        assert s.get("svc", "u").reveal() == "x"
        with pytest.raises(UsageError):
            s.keys.rekey(to="key file", passphrase="x" * 10)
        with pytest.raises(UsageError, match="argon2id or pbkdf2"):
            s.keys.rekey(passphrase="x" * 10, kdf="scrypt")
        with pytest.raises(UsageError, match="target"):
            s.keys.rekey(to="smartcard")


def test_kdf_upgrade_warning_and_rekey(home: Path) -> None:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        assert s.status()["warnings"] == []
    stronger = Config(argon2_memory_kib=32768, argon2_iterations=3, argon2_lanes=1)
    with Store.open(home, passphrase=PASSPHRASE, config=stronger) as s:
        assert any("below the configured" in w for w in s.status()["warnings"])
        s.keys.rekey(passphrase=PASSPHRASE + "!")
        assert s.status()["warnings"] == []
        assert "32768 KiB, iterations 3" in s.status()["kdf"]
    with pytest.raises(LockedError):
        Store.open(home, passphrase=PASSPHRASE, config=stronger)


def test_pbkdf2_below_configured_warns(home: Path) -> None:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, kdf="pbkdf2") as s:
        assert s.status()["warnings"] == []
    with Store.open(home, passphrase=PASSPHRASE, config=Config(pbkdf2_iterations=700_000)) as s:
        assert any("700000" in w for w in s.status()["warnings"])


def test_rekey_revokes_the_old_keys_of_open_processes(home: Path) -> None:
    # Key-file mode: a process opened before another's rekey takes the new key
    # file, checked like any unlock, and goes on; it never writes under old keys.
    Store.init(home).close()
    stale = Store.open(home, config=Config(max_wraps=1))
    stale.set("svc", "a", "x")
    with Store.open(home) as other:
        other.keys.rekey()
    stale.set("svc", "b", "y")
    assert stale.get("svc", "a").reveal() == "x"
    assert stale._epoch == 2
    stale.close()
    with Store.open(home) as fresh:
        assert fresh.get("svc", "b").reveal() == "y"
        fresh.trail.verify()


def test_rekey_locks_out_open_passphrase_processes(home: Path) -> None:
    Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF).close()
    stale = Store.open(home, passphrase=PASSPHRASE, config=FAST_KDF)
    stale.set("svc", "a", "x")
    with Store.open(home, passphrase=PASSPHRASE, config=FAST_KDF) as other:
        other.keys.rekey(passphrase="another passphrase")
    for call in (lambda: stale.get("svc", "a"), lambda: stale.set("svc", "b", "y")):
        with pytest.raises(LockedError, match="open it again"):
            call()
    stale.close()


REKEY = textwrap.dedent("""
    import os, sys
    from keyring_hardened.store import Store
    home, target, old, new = sys.argv[1:5]
    s = Store.open(home, passphrase=old if old != "-" else None)
    s.keys.rekey(to=target, passphrase=new if new != "-" else None)
""")


def _opens(home: Path, passphrase: str | None) -> bool:
    try:
        Store.open(home, passphrase=passphrase).close()
        return True
    except LockedError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("point", ["rekey-before-commit", "rekey-after-commit",
                                   "rekey-after-rename"])
@pytest.mark.parametrize(("start", "target"), [
    ("key file", "key file"), ("key file", "passphrase"), ("passphrase", "key file"),
    ("passphrase", "passphrase")])
def test_kill_9_during_rekey_leaves_exactly_one_key(tmp_path: Path, point: str, start: str,
                                                     target: str) -> None:
    home = tmp_path / "vault"
    old_pw = PASSPHRASE if start == "passphrase" else None
    new_pw = "the new passphrase" if target == "passphrase" else None
    (tmp_path / "fast.toml").write_text(
        "[kdf]\nargon2_memory_kib = 19456\nargon2_iterations = 2\nargon2_lanes = 1\n")
    env = {**os.environ, "KEYRING_HARDENED_CONFIG": str(tmp_path / "fast.toml"),
           "KEYRING_HARDENED_CRASH_AT": point}
    os.environ["KEYRING_HARDENED_CONFIG"] = str(tmp_path / "fast.toml")
    try:
        with Store.init(home, passphrase_mode=start == "passphrase", passphrase=old_pw) as s:
            s.set("svc", "u", CANARY)
        old_key = (home / "master.key").read_bytes() if start == "key file" else None
        done = subprocess.run([sys.executable, "-c", REKEY, str(home), target, old_pw or "-",
                               new_pw or "-"], env=env, capture_output=True, text=True,
                              check=False)
        assert done.returncode == -9, done.stderr
        committed = point != "rekey-before-commit"
        # The next open resolves the journal and says which key opens the vault now.
        with Store.open(home, passphrase=new_pw if committed else old_pw) as s:
            assert s.get("svc", "u").reveal() == CANARY
            assert s.notices
            assert ("had completed" if committed else "had not taken effect") in s.notices[0]
            s.trail.verify()
        assert not (home / "rekey.json").exists()
        assert not (home / "master.key.new").exists()
        if start == "key file" and target == "key file":
            assert ((home / "master.key").read_bytes() == old_key) is not committed
        # Exactly one of the two root keys opens it: the vault is in one mode,
        # and in passphrase mode only one of the two passphrases works.
        mode = (target if committed else start)
        with Store.open(home, passphrase=new_pw if committed else old_pw) as s:
            assert s.status()["mode"] == mode
        assert (home / "master.key").exists() is (mode == "key file")
        if start == target == "passphrase":
            assert _opens(home, old_pw) is not committed
            assert _opens(home, new_pw) is committed
    finally:
        del os.environ["KEYRING_HARDENED_CONFIG"]


def test_rekey_readers_use_the_new_key_file_before_its_rename(store: Store, home: Path) -> None:
    store.set("svc", "u", "x")
    store.close()
    env = {**os.environ, "KEYRING_HARDENED_CRASH_AT": "rekey-after-commit",
           "KEYRING_HARDENED_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", REKEY, str(home), "key file", "-", "-"],
                          env=env, capture_output=True, text=True, check=False)
    assert done.returncode == -9
    # Another rekey is not running: but hold the lock as if it were, so the
    # reader cannot finish the rename and must read the .new key itself.
    import fcntl

    fd = os.open(home / "rekey.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with Store.open(home) as s:
            assert s.get("svc", "u").reveal() == "x"
            assert s.notices == []
        assert (home / "master.key.new").exists()
    finally:
        os.close(fd)


def test_second_rekey_while_one_runs_is_refused(store: Store, home: Path) -> None:
    import fcntl

    fd = os.open(home / "rekey.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(UsageError, match="another key rekey"):
            store.keys.rekey()
    finally:
        os.close(fd)


def test_journal_content_is_never_trusted(store: Store, home: Path) -> None:
    # Whatever a journal says, the vault's own verifier decides: a damaged or
    # planted journal is removed and changes no key file.
    store.close()
    key = (home / "master.key").read_bytes()
    for text in ("{not json", '{"from_generation": 0, "from": "key file", "to": "passphrase"}'):
        (home / "rekey.json").write_text(text)
        with Store.open(home) as s:
            assert "interrupted rekey" in s.notices[0]
        assert not (home / "rekey.json").exists()
        assert (home / "master.key").read_bytes() == key
    # A planted .new key file that does not match the verifier is removed, never adopted.
    (home / "master.key.new").write_bytes(os.urandom(32))
    os.chmod(home / "master.key.new", 0o600)
    (home / "rekey.json").write_text('{"from_generation": 0, "from": "key file", "to": "key file"}')
    with Store.open(home) as s:
        assert "had not taken effect" in s.notices[0]
    assert not (home / "master.key.new").exists()
    assert (home / "master.key").read_bytes() == key


FILL = textwrap.dedent("""
    import sys
    from keyring_hardened.store import Store
    with Store.open(sys.argv[1]) as s:
        for i in range(int(sys.argv[2])):
            s.set(f"svc-{i}", "u", f"secret-{i}")
        s.keys.rotate()
""")


BIG = 6000


@pytest.fixture(scope="module")
def big_vault(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("big") / "vault"
    Store.init(home).close()
    subprocess.run([sys.executable, "-c", FILL, str(home), str(BIG)], check=True)
    return home


@pytest.mark.slow
def test_kill_9_during_rewrap_loses_nothing(big_vault: Path, tmp_path: Path) -> None:
    import shutil

    home = tmp_path / "vault"
    shutil.copytree(big_vault, home)
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(home)}
    rewrap = [sys.executable, "-m", "keyring_hardened", "key", "rewrap", "--batch", "700"]

    def killed_at(point: str) -> int:
        # The child kills itself at the named point, so the kill lands mid-work
        # every time, however fast or loaded the machine is.
        done = subprocess.run(rewrap, env={**env, "KEYRING_HARDENED_CRASH_AT": point},
                              capture_output=True, check=False)
        assert done.returncode == -9, done.stderr
        with Store.open(home) as s:
            return {k.version: k.data_keys for k in s.keys.versions()}[1]

    assert killed_at("rewrap-after-batch") == BIG - 700  # one batch committed, then killed
    # Killed inside a batch, after its rows were re-wrapped but before the
    # commit: the batch in flight is rolled back whole.
    assert killed_at("rewrap-mid-batch") == BIG - 700
    assert killed_at("rewrap-after-batch") == BIG - 1400
    with Store.open(home) as s:
        for i in range(0, BIG, 97):
            assert s.get(f"svc-{i}", "u").reveal() == f"secret-{i}"
    finished = run_cli("key", "rewrap", home=home)
    assert finished.returncode == 0, finished.stderr
    assert "none left under older versions" in finished.stderr
    assert run_cli("key", "retire", "--below", "2", home=home).returncode == 0
    with Store.open(home) as s:
        assert [(k.version, k.state, k.data_keys) for k in s.keys.versions()] == [
            (1, "retired", 0), (2, "active", BIG)]
        for i in range(BIG):
            assert s.get(f"svc-{i}", "u").reveal() == f"secret-{i}"
        s.trail.verify()


WORKER = textwrap.dedent("""
    import os, sys, time
    from keyring_hardened.store import Store
    home, role, stop = sys.argv[1], sys.argv[2], sys.argv[4]
    errors = ops = 0
    stamps = []
    with Store.open(home) as s:
        print("ready", flush=True)
        i = 0
        # Work until the test says the rewrap is over, and a little after.
        while not os.path.exists(stop) or i < 3:
            i += 1
            stamps.append(time.time())
            try:
                if role == "reader":
                    n = (i * 7919) % int(sys.argv[3])
                    if s.get(f"svc-{n}", "u").reveal() != f"secret-{n}":
                        errors += 1
                else:
                    s.set(f"new-{i}", "u", f"v-{i}")
                    if s.get(f"new-{i}", "u").reveal() != f"v-{i}":
                        errors += 1
                ops += 1
            except Exception as exc:
                print(type(exc).__name__, exc, file=sys.stderr)
                errors += 1
    print(ops, errors, *stamps)
""")


@pytest.mark.slow
def test_readers_and_writers_during_rewrap(big_vault: Path, tmp_path: Path) -> None:
    import shutil

    home = tmp_path / "vault"
    shutil.copytree(big_vault, home)
    stop = tmp_path / "stop"
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(home), role, str(BIG),
                                 str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
               for role in ("reader", "reader", "writer")]
    for w in workers:  # every worker has the vault open before the rewrap starts
        assert w.stdout is not None
        assert w.stdout.readline() == "ready\n"
    started = time.time()
    done = run_cli("key", "rewrap", "--batch", "500", home=home)
    ended = time.time()
    stop.touch()
    assert done.returncode == 0, done.stderr
    assert "in 12 batches" in done.stderr  # the rewrap committed batch after batch
    for w in workers:
        out, err = w.communicate(timeout=120)
        ops, errors, *stamps = out.split()
        assert int(ops) == len(stamps) - int(errors) > 0
        assert int(errors) == 0, err
        # The overlap the test is about: each worker's operations went on
        # while the rewrap ran, not only before or after it.
        assert any(started < float(t) < ended for t in stamps), (started, ended)


def test_key_cli(home: Path) -> None:
    assert run_cli("init", home=home).returncode == 0
    run_cli("set", "svc", "u", home=home, stdin="x")
    assert "key version 2 is active" in run_cli("key", "rotate", home=home).stderr
    listed = json.loads(run_cli("key", "list", "--json", home=home).stdout)
    assert [(k["version"], k["state"]) for k in listed] == [(1, "decrypt-only"), (2, "active")]
    table = run_cli("key", "list", home=home).stdout
    assert table.split("\n")[0].split() == ["VERSION", "STATE", "CREATED", "DATA", "KEYS",
                                            "WRAPS"]
    refused = run_cli("key", "retire", "--below", "2", home=home)
    assert refused.returncode == 2
    assert "still wrap 1 data keys of 1 credentials" in refused.stderr
    assert "rewrapped 1 data key " in run_cli("key", "rewrap", home=home).stderr
    assert "retired key version 1\n" in run_cli("key", "retire", "--below", "2",
                                                  home=home).stderr
    assert "no key versions below 2" in run_cli("key", "retire", "--below", "2",
                                                   home=home).stderr
    assert "new key file" in run_cli("key", "rekey", home=home).stderr
    switched = run_cli("key", "rekey", "--passphrase", home=home,
                       env={"KEYRING_HARDENED_NEW_PASSPHRASE": PASSPHRASE})
    assert switched.returncode == 0, switched.stderr
    env = {"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE}
    assert run_cli("get", "svc", "u", home=home, env=env).stdout == "x\n"
    assert run_cli("key", "rekey", "--passphrase", home=home, env=env).returncode == 2
    assert run_cli("key", "rekey", "--key-file", "--kdf", "pbkdf2", home=home,
                   env=env).returncode == 2
    status = run_cli("status", home=home, env=env)
    assert "next rotation: not scheduled" in status.stdout
    ops = [json.loads(line)["op"] for line in run_cli("audit", "show", "--json", home=home,
                                                      env=env).stdout.splitlines()]
    for op in ("key-rotate", "key-rewrap", "key-retire", "key-rekey", "key-list"):
        assert op in ops


def test_rekey_prompt_mismatch_changes_nothing(store: Store, home: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from keyring_hardened import cli

    store.set("svc", "u", "x")
    store.close()
    before = _tables(home), (home / "master.key").read_bytes()
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))
    monkeypatch.setattr(cli, "_tty", lambda: True)
    answers = iter(["a new passphrase", "a different one"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert cli.main(["key", "rekey", "--passphrase"]) == 2
    assert "did not match" in capsys.readouterr().err
    assert (home / "master.key").read_bytes() == before[1]
    assert _tables(home) == before[0]  # not a row changed, not an event added
    with Store.open(home) as s:
        assert s.get("svc", "u").reveal() == "x"
        assert s.status()["mode"] == "key file"


def _tables(home: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(home / "vault.db") as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: conn.execute(f"SELECT * FROM {n}").fetchall() for n in names}


def test_rewrap_progress_on_a_terminal(store: Store, home: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from keyring_hardened import cli

    for i in range(5):
        store.set("svc", f"u{i}", "x")
    store.keys.rotate()
    store.close()
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    import io

    err = io.StringIO()
    err.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stderr", err)
    assert cli.main(["key", "rewrap", "--batch", "2"]) == 0
    assert "rewrap" in err.getvalue()
    assert "rewrapped 5 data keys" in err.getvalue()
