"""Trusted files, as ssh's StrictModes (issue 9 items 8, 9, 10, 11, 13, 17).

Ownership cases need a second uid: as root (as CI runs) files are handed to
``nobody`` with ``os.chown``; without root they are skipped with the reason.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from keyring_hardened import _files
from keyring_hardened.config import check_config, load_config
from keyring_hardened.errors import ConfigError, LockedError
from keyring_hardened.location import Location, home_problems, make_home
from keyring_hardened.store import Store

from .conftest import CANARY, run_cli

#: A uid that is not ours: nobody's.
OTHER = 65534

needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="ownership cases chown files to another uid: needs root")


def _give_away(path: Path) -> None:
    os.chown(path, OTHER, OTHER, follow_symlinks=False)


# -- item 8: ownership -------------------------------------------------------------


@needs_root
def test_init_refuses_a_planted_key_file(home: Path) -> None:
    home.mkdir(mode=0o700)
    planted = home / "master.key"
    planted.write_bytes(os.urandom(32))
    os.chmod(planted, 0o600)
    _give_away(planted)
    done = run_cli("init", home=home)
    assert done.returncode == 2, done.stderr
    assert f"key file {planted} is owned by nobody (uid {OTHER})" in done.stderr
    assert not (home / "vault.db").exists()


@needs_root
def test_a_swapped_in_database_is_refused(store: Store, home: Path) -> None:
    store.close()
    _give_away(home / "vault.db")
    done = run_cli("set", "svc", "u", home=home, stdin=CANARY)
    assert done.returncode == 2, done.stderr
    assert "vault database" in done.stderr
    assert "owned by nobody" in done.stderr
    assert CANARY not in done.stderr


@needs_root
def test_foreign_home_is_refused(store: Store, home: Path) -> None:
    store.close()
    _give_away(home)
    with pytest.raises(ConfigError, match=r"vault home .* is owned by nobody"):
        Store.open(home)


@needs_root
def test_foreign_wal_file_is_refused(store: Store, home: Path) -> None:
    store.close()
    wal = Path(f"{home / 'vault.db'}-wal")
    wal.write_bytes(b"")
    os.chmod(wal, 0o600)
    _give_away(wal)
    with pytest.raises(ConfigError, match="-wal is owned by nobody"):
        Store.open(home)


def test_home_writable_by_others_is_refused(store: Store, home: Path) -> None:
    store.close()
    os.chmod(home, 0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        Store.open(home)
    os.chmod(home, 0o700)
    Store.open(home).close()


def test_parent_writable_by_others_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    home = shared / "vault"
    with pytest.raises(ConfigError, match=f"folder {shared} is writable by group or others"):
        Store.init(home)
    assert not home.exists()


def test_sticky_parent_is_accepted(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp-like"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    with Store.init(sticky / "vault") as s:
        s.set("s", "u", "x")
    assert home_problems(sticky / "vault") == []


@needs_root
def test_sticky_parent_does_not_excuse_a_foreign_home(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp-like"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    theirs = sticky / "vault"
    theirs.mkdir(mode=0o700)
    _give_away(theirs)
    with pytest.raises(ConfigError, match="owned by nobody"):
        Store.init(theirs)


@needs_root
def test_link_on_the_way_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    Store.init(real / "vault").close()
    link = tmp_path / "link"
    link.symlink_to(real)
    _give_away(link)
    with pytest.raises(ConfigError, match=f"symbolic link {link}"):
        Store.open(link / "vault")


def test_home_and_parents_made_0700_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Store.init(tmp_path / "a" / "b" / "vault").close()
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "vault"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_key_file_parent_made_0700(home: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRING_HARDENED_KEY_FILE", str(tmp_path / "keys" / "k"))
    old = os.umask(0)
    try:
        Store.init(home).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_uncreatable_home_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = run_cli("init", home=blocker / "vault")
    assert done.returncode == 2, done.stderr
    assert f"{blocker} is not a directory" in done.stderr
    done = run_cli("init", home=Path("/proc/x/y"))
    assert done.returncode == 8, done.stderr
    assert "cannot create vault home /proc/x/y" in done.stderr


# -- item 9: the config ------------------------------------------------------------


def _marker_config(path: Path, marker: Path) -> None:
    path.write_text(f'passphrase_command = ["{sys.executable}", "-c", '
                    f'"open({str(marker)!r}, \'w\').write(\'ran\'); print(\'pw-pw-pw-pw\')"]\n')


def test_config_writable_by_others_is_refused_and_not_run(home: Path, tmp_path: Path) -> None:
    run_cli("init", home=home)
    marker = tmp_path / "ran"
    config = home / "config.toml"
    _marker_config(config, marker)
    os.chmod(config, 0o666)
    done = run_cli("get", "s", "u", home=home)
    assert done.returncode == 2, done.stderr
    assert "config file" in done.stderr
    assert "writable by group or others" in done.stderr
    assert not marker.exists()


@needs_root
def test_config_owned_by_another_user_is_refused(home: Path, tmp_path: Path) -> None:
    run_cli("init", home=home)
    config = home / "config.toml"
    _marker_config(config, tmp_path / "ran")
    _give_away(config)
    with pytest.raises(ConfigError, match="owned by nobody"):
        load_config(config)


@needs_root
def test_config_check_reports_every_problem(home: Path) -> None:
    run_cli("init", home=home)
    config = home / "config.toml"
    config.write_text("max_versions = 'x'\nbogus = 1\n[storage]\nbusy_timeout = '30d'\n")
    os.chmod(config, 0o666)
    _give_away(config)
    os.chmod(home / "master.key", 0o644)
    done = run_cli("config", "check", home=home)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    for needle in ("config file", "owned by nobody", "writable by group or others",
                   "max_versions", "bogus: unknown key", "storage.busy_timeout",
                   "key file"):
        assert any(needle in line for line in lines), (needle, done.stderr)
    assert len(lines) >= 6
    status = run_cli("status", home=home)
    assert status.returncode == 2
    assert "key file" in status.stderr


def test_config_check_collects_content_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("a = 1\nb = 2\n")
    config, problems = check_config(path)
    assert config is None
    assert len(problems) == 2


# -- item 10: trusted opens --------------------------------------------------------


def test_fifo_at_config_does_not_hang(home: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    assert run_cli("init", home=home).returncode == 0
    done = run_cli("status", home=home, env={"KEYRING_HARDENED_CONFIG": str(fifo)}, timeout=60)
    assert done.returncode != 70
    assert "FIFO" in done.stderr or "not a regular file" in done.stderr
    listing = subprocess.run([sys.executable, "-m", "keyring", "--list-backends"],
                             env={**os.environ, "KEYRING_HARDENED_HOME": str(home),
                                  "KEYRING_HARDENED_CONFIG": str(fifo)},
                             capture_output=True, text=True, timeout=60, check=False)
    assert "HardenedKeyring" in listing.stdout


def test_dev_zero_config_is_capped(home: Path) -> None:
    done = run_cli("config", "check", home=home, env={"KEYRING_HARDENED_CONFIG": "/dev/zero"},
                   timeout=60)
    assert done.returncode == 2
    assert "not a regular file" in done.stderr


def test_read_trusted_caps_size(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    os.chmod(big, 0o600)
    with pytest.raises(ConfigError, match="larger than 1024 bytes"):
        _files.read_trusted(big, "file", 1024)
    assert _files.read_trusted(big, "file", 4096) == b"x" * 2048


def test_key_file_link_is_refused(store: Store, home: Path, tmp_path: Path) -> None:
    store.close()
    moved = tmp_path / "real.key"
    (home / "master.key").rename(moved)
    (home / "master.key").symlink_to(moved)
    with pytest.raises(ConfigError, match="symbolic link"):
        Store.open(home)


# -- item 11: exclusive random temporary names -------------------------------------


def test_write_private_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.chmod(victim, 0o644)
    target = tmp_path / "export.jsonl"
    # Every name the old code could have used for this process.
    (tmp_path / f".export.jsonl.{os.getpid()}.tmp").symlink_to(victim)
    _files.write_private(target, ["line"])
    assert victim.read_text() == "precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert target.read_text() == "line\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_write_private_never_replaces_a_device_or_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(Exception, match="not a regular file"):
        _files.write_private(fifo, ["x"])
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


# -- item 13: the rekey journal and lock -------------------------------------------


@needs_root
def test_planted_journal_is_refused_and_the_key_survives(store: Store, home: Path) -> None:
    store.set("s", "u", "x")
    store.close()
    journal = home / "rekey.json"
    journal.write_text('{"from_generation": 0, "from": "key file", "to": "passphrase"}')
    _give_away(journal)
    done = run_cli("get", "s", "u", home=home)
    assert done.returncode == 2, done.stderr
    assert "rekey journal" in done.stderr
    assert "owned by nobody" in done.stderr
    assert (home / "master.key").exists()


@needs_root
def test_foreign_rekey_lock_is_refused(store: Store, home: Path) -> None:
    store.close()
    (home / "rekey.json").write_text("{}")
    lock = home / "rekey.lock"
    lock.write_text("")
    _give_away(lock)
    with pytest.raises(ConfigError, match=r"rekey lock .* owned by nobody"):
        Store.open(home)


def test_journal_link_is_refused(store: Store, home: Path, tmp_path: Path) -> None:
    store.close()
    elsewhere = tmp_path / "j.json"
    elsewhere.write_text("{}")
    (home / "rekey.json").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="symbolic link"):
        Store.open(home)


# -- item 17: Kubernetes secret mounts ---------------------------------------------


def _kubernetes_mount(folder: Path, key: bytes) -> Path:
    """The layout kubelet makes for a secret volume (defaultMode 0644)."""
    folder.mkdir(mode=0o755)
    data = folder / "..2026_01_01_00_00_00.000000000"
    data.mkdir(mode=0o755)
    (data / "master.key").write_bytes(key)
    os.chmod(data / "master.key", 0o644)
    (folder / "..data").symlink_to(data.name)
    (folder / "master.key").symlink_to("..data/master.key")
    return folder / "master.key"


def test_kubernetes_secret_volume_layout_is_refused_with_reason(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _kubernetes_mount(tmp_path / "secrets", os.urandom(32))
    monkeypatch.setenv("KEYRING_HARDENED_KEY_FILE", str(key))
    with pytest.raises(ConfigError, match="symbolic link"):
        Store.init(home)


def test_kubernetes_subpath_mount_at_0400_works(home: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "etc" / "master.key"  # what a subPath bind mount presents: the file
    key.parent.mkdir(mode=0o755)
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o400)
    monkeypatch.setenv("KEYRING_HARDENED_KEY_FILE", str(key))
    with Store.init(home) as s:
        s.set("s", "u", "x")
    with Store.open(home) as s:
        assert s.get("s", "u").reveal() == "x"


def test_location_check_home_ignores_missing(tmp_path: Path) -> None:
    Location.resolve(tmp_path / "nothing").check_home()
    make_home(tmp_path / "x" / "y")
    assert (tmp_path / "x" / "y").is_dir()


def test_missing_key_file_stays_locked(store: Store, home: Path) -> None:
    store.close()
    (home / "master.key").unlink()
    with pytest.raises(LockedError, match="no key file"):
        Store.open(home)


# -- helpers' failure paths -----------------------------------------------------------


def test_write_private_failures_are_usage_errors(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from keyring_hardened.errors import UsageError

    with pytest.raises(UsageError, match="not valid UTF-8"):
        _files.write_private(tmp_path / "out", ["bad \udcff name"])
    with pytest.raises(UsageError, match="cannot write"):
        _files.write_private(tmp_path / "missing" / "out", ["x"])
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UsageError, match="No space left"):
        _files.write_private(tmp_path / "out", ["x"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left behind


def test_culprit_names_the_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from keyring_hardened import storage

    db = tmp_path / "vault.db"
    db.write_bytes(b"")
    wal = Path(f"{db}-wal")
    wal.write_bytes(b"x")
    os.chmod(wal, 0o444)
    real_access = os.access

    def access(path: object, mode: int) -> bool:  # root passes every check: pretend a user
        return False if str(path) == str(wal) else real_access(path, mode)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "access", access)
    assert "vault.db-wal is not writable (mode 0444" in (storage._culprit(db) or "")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert "vault folder" in (storage._culprit(db) or "")
