"""No command exits 70 (or hangs) under hostile file layouts (issue 9, Tests).

FIFOs, symbolic links, directories and devices at every configurable path
(key file, config, vault home, checkpoint, archive, export, sink), foreign
owners and world-writable parents. Every run has a timeout, so a hang fails
the test instead of blocking the suite.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from keyring_hardened.store import Store

pytestmark = pytest.mark.slow

OTHER = 65534
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _link(path: Path) -> None:
    victim = path.parent / f"{path.name}.victim"
    victim.write_text("precious\n")
    path.symlink_to(victim)


def _directory(path: Path) -> None:
    path.mkdir()


def _device(path: Path) -> None:
    # A /dev/zero of our own (a link for a non-root run): endless reads, writes vanish.
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except OSError:
        path.symlink_to("/dev/zero")


def _foreign(path: Path) -> None:
    path.write_text("max_versions = 3\n" if path.suffix == ".toml" else "{}\n")
    os.chmod(path, 0o600)
    os.chown(path, OTHER, OTHER)


KINDS: dict[str, Callable[[Path], None]] = {"fifo": _fifo, "symlink": _link,
                                            "directory": _directory, "device": _device}
if IS_ROOT:
    KINDS["foreign-owner"] = _foreign


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "keyring_hardened", *argv], cwd=cwd,
                              env=env, input="a-secret\n", capture_output=True, text=True,
                              timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv} hung")


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    assert done.returncode != 70, (what, done.stderr)
    assert "Traceback" not in done.stderr, (what, done.stderr)
    assert len(done.stderr.strip().splitlines()) <= 12, (what, done.stderr)


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    home = tmp_path / "vault"
    with Store.init(home, actor="test") as s:
        s.set("svc", "u", "x")
    return home


#: The path each setting names, the environment that points at it, and the commands using it.
def _cases(home: Path, hostile: Path) -> dict[str, tuple[dict[str, str], list[list[str]]]]:
    p = str(hostile)
    return {
        "key file": ({"KEYRING_HARDENED_KEY_FILE": p}, [["get", "svc", "u"], ["status"],
                                                        ["config", "check"]]),
        "config": ({"KEYRING_HARDENED_CONFIG": p}, [["get", "svc", "u"], ["status"],
                                                    ["config", "check"], ["list"]]),
        "checkpoint in": ({}, [["audit", "verify", "--from-checkpoint", p]]),
        "checkpoint out": ({}, [["audit", "checkpoint", p]]),
        "export": ({}, [["audit", "export", p], ["audit", "verify", "--file", p]]),
        "archive": ({}, [["audit", "prune", "--archive", p, "--keep", "1s"]]),
    }


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("setting", ["key file", "config", "checkpoint in", "checkpoint out",
                                     "export", "archive"])
def test_hostile_file_paths(kind: str, setting: str, vault: Path, tmp_path: Path) -> None:
    hostile = tmp_path / ("hostile.toml" if setting == "config" else "hostile")
    KINDS[kind](hostile)
    env_extra, commands = _cases(vault, hostile)[setting]
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(vault), **env_extra}
    for argv in commands:
        _check(_run(argv, env, tmp_path), f"{setting} {kind} {argv}")
    victim = hostile.parent / f"{hostile.name}.victim"
    if victim.exists():
        assert victim.read_text() == "precious\n", f"{setting}: written through a link"


@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_vault_home(kind: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    KINDS[kind](home)
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(home)}
    for argv in (["init"], ["get", "svc", "u"], ["set", "svc", "u"], ["status"],
                 ["config", "check"]):
        _check(_run(argv, env, tmp_path), f"home {kind} {argv}")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["vault.db", "master.key", "config.toml", "rekey.json",
                                  "rekey.lock", "vault.db-wal"])
def test_hostile_files_in_the_home(kind: str, name: str, vault: Path, tmp_path: Path) -> None:
    target = vault / name
    if target.exists():
        target.unlink()
    KINDS[kind](target)
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(vault)}
    for argv in (["get", "svc", "u"], ["status"], ["config", "check"]):
        _check(_run(argv, env, tmp_path), f"{name} {kind} {argv}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_sink(kind: str, vault: Path, tmp_path: Path) -> None:
    sink = tmp_path / "sink.jsonl"
    KINDS[kind](sink)
    (vault / "config.toml").write_text(f'[audit]\nsinks = ["file:{sink}"]\n')
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(vault)}
    for argv in (["get", "svc", "u"], ["set", "svc", "u"]):
        done = _run(argv, env, tmp_path)
        _check(done, f"sink {kind} {argv}")
        assert done.returncode == 0, done.stderr  # a failing sink never fails the operation
    victim = sink.parent / f"{sink.name}.victim"
    if victim.exists():
        assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_world_writable_parents(mode: int, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(shared / "vault")}
    for argv in (["init"], ["set", "svc", "u"], ["get", "svc", "u"], ["status"]):
        done = _run(argv, env, tmp_path)
        _check(done, f"parent {mode:o} {argv}")
        # get on a vault that does not exist is "not found"; the rest refuse the parent.
        assert done.returncode == (1 if argv == ["get", "svc", "u"] else 2), done.stderr
    assert not (shared / "vault").exists()
