"""A canary secret driven through every error path never shows outside a successful read."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from keyring_hardened import backend
from keyring_hardened.errors import HardenedError
from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF, PASSPHRASE, run_cli


def _files(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(home.iterdir()) if p.is_file())


def test_canary_never_leaks(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with Store.init(home) as s:
        s.set("svc", "u", CANARY)
        s.set("svc", "u", CANARY + "-2")
        texts += [repr(s), repr(s.get("svc", "u")), str(s.status()), repr(s.history("svc", "u")),
                  repr(s.credentials()), repr(s._root), repr(list(s._keks.values()))]
        for call in (lambda: s.set("", "u", CANARY), lambda: s.set("s", "u", CANARY + "\ud800"),
                     lambda: s.get("svc", "nobody"), lambda: s.rollback("svc", "u", to_version=9),
                     lambda: s.set("svc", "u", CANARY * 40000)):
            with pytest.raises(HardenedError) as info:
                call()
            texts += [str(info.value), repr(info.value)]
    # On disk: never in clear, in the database, its WAL or anywhere in the home.
    assert CANARY.encode() not in _files(home)
    # Tampered: integrity error, CLI output, backend exception.
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute("UPDATE secret_versions SET ciphertext = substr(ciphertext, 1, 20)")
    # Every command's whole output is scanned, stdout included, and each exits
    # with its documented code: a damaged row is exit 3 wherever it is read.
    expected = {("get", "svc", "u"): 3, ("get", "svc", "u", "--version", "1"): 3,
                ("list",): 0, ("history", "svc", "u"): 3, ("rollback", "svc", "u"): 3,
                ("status",): 0}
    for args, code in expected.items():
        done = run_cli(*args, home=home)
        assert done.returncode == code, (args, done.stderr)
        if code:
            assert done.stdout == ""
        texts += [done.stdout, done.stderr]
    kr = backend.HardenedKeyring().with_properties(home=str(home))
    with pytest.raises(backend.IntegrityFailure) as kinfo:
        kr.get_password("svc", "u")
    texts += [str(kinfo.value), repr(kinfo.value)]
    backend._close_all()
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert CANARY not in text


def test_canary_passphrase_paths(home: Path) -> None:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("svc", "u", CANARY)
    done = run_cli("get", "svc", "u", home=home,
                   env={"KEYRING_HARDENED_PASSPHRASE": "wrong-" + CANARY})
    assert done.returncode == 6
    assert CANARY not in done.stdout + done.stderr
    assert CANARY.encode() not in _files(home)
    assert PASSPHRASE.encode() not in _files(home)
