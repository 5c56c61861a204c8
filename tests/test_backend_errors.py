"""The backend raises only KeyringError subclasses or keyring's own errors (issue 9 items 1, 2).

OS errors are injected under every public method at the points where the
core touches the file system: opening files, making folders, SQLite.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from keyring import errors as kerrors

from keyring_hardened import backend
from keyring_hardened.store import Store

from .conftest import CANARY

ERRNOS = [errno.EACCES, errno.ENOENT, errno.ENOSPC, errno.EROFS]


@pytest.fixture
def keyring_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("KEYRING_HARDENED_HOME", str(home))
    backend._close_all()
    yield home
    backend._close_all()


def _calls(kr: backend.HardenedKeyring) -> dict[str, Callable[[], Any]]:
    return {
        "get_password": lambda: kr.get_password("svc", "u"),
        "set_password": lambda: kr.set_password("svc", "u", CANARY),
        "delete_password": lambda: kr.delete_password("svc", "u"),
        "get_credential": lambda: kr.get_credential("svc", None),
        "get_credential_user": lambda: kr.get_credential("svc", "u"),
    }


def _failing(code: int) -> Callable[..., Any]:
    def fail(*args: object, **kwargs: object) -> Any:
        raise OSError(code, os.strerror(code), "/injected/path")
    return fail


#: Where an OS error can surface: each patched to raise.
TARGETS = ["os.open", "os.mkdir", "os.lstat", "os.stat", "os.fstat", "os.link", "os.read",
           "os.pread", "os.fchmod", "sqlite3.connect"]


@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("existing", [False, True], ids=["no-vault", "vault"])
def test_only_keyring_errors_escape(code: int, target: str, existing: bool, keyring_home: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if existing:
        with Store.init(keyring_home) as s:
            s.set("svc", "u", CANARY)
    kr = backend.HardenedKeyring()
    for name, call in _calls(kr).items():
        backend._close_all()
        with monkeypatch.context() as m:
            module, attr = target.split(".")
            m.setattr(os if module == "os" else sqlite3, attr, _failing(code))
            escaped: BaseException | None = None
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - the point: see what escapes
                escaped = exc
            if escaped is not None:
                assert isinstance(escaped, kerrors.KeyringError), (
                    f"{name} under {target} {errno.errorcode[code]} raised "
                    f"{type(escaped).__name__}: {escaped}")
                assert CANARY not in str(escaped), name


def test_injected_os_error_names_the_path(keyring_home: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend.HardenedKeyring, "_store", _failing(errno.EROFS))
    with pytest.raises(backend.StorageFailure, match="/injected/path: Read-only file system"):
        backend.HardenedKeyring().get_password("s", "u")


def test_a_bug_is_an_opaque_keyring_error(keyring_home: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*a: object, **k: object) -> None:
        raise TypeError(CANARY)
    monkeypatch.setattr(backend.HardenedKeyring, "_store", bug)
    with pytest.raises(backend.HardenedKeyringError, match=r"internal error \(TypeError\)") \
            as info:
        backend.HardenedKeyring().set_password("s", "u", "x")
    assert CANARY not in str(info.value)


def test_unreadable_home_raises_storage_failure_not_permission_error(
        keyring_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.init(keyring_home) as s:
        s.set("svc", "u", "x")
    backend._close_all()
    monkeypatch.setattr(os, "open", _failing(errno.EACCES))
    with pytest.raises(kerrors.KeyringError) as info:
        backend.HardenedKeyring().get_password("svc", "u")
    assert not isinstance(info.value, PermissionError)


@pytest.mark.parametrize("stdin", ["closed", "none"])
def test_closed_or_absent_stdin(stdin: str, keyring_home: Path) -> None:
    prelude = ("import sys; sys.stdin.close()" if stdin == "closed"
               else "import sys; sys.stdin = None")
    code = (f"{prelude}; import keyring; keyring.set_password('s', 'u', 'v'); "
            "print(keyring.get_password('s', 'u'))")
    done = subprocess.run([sys.executable, "-c", code],
                          env={**os.environ, "KEYRING_HARDENED_HOME": str(keyring_home),
                               "PYTHON_KEYRING_BACKEND":
                                   "keyring_hardened.backend.HardenedKeyring"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "v\n"


def test_closed_stdin_in_process(keyring_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    kr = backend.HardenedKeyring()
    assert kr.get_password("s", "u") is None
    kr.set_password("s", "u", "x")
    assert kr.get_password("s", "u") == "x"


def test_priority_survives_an_unreadable_home(keyring_home: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os.path, "lexists", _failing(errno.EACCES))
    assert backend.HardenedKeyring.priority == 0.9
