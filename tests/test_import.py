"""Moving in: import from real peer files (made by the peers themselves) and a listing-less fake."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError

from keyring_hardened import cli, moving
from keyring_hardened.errors import UsageError
from keyring_hardened.secret import Secret
from keyring_hardened.store import Store

from .conftest import CANARY, run_cli

PLAIN = "keyrings.alt.file.PlaintextKeyring"
ENCRYPTED = "keyrings.alt.file.EncryptedKeyring"
CRYPTFILE = "keyrings.cryptfile.cryptfile.CryptFileKeyring"
PEER_KEY = "peer-file-password"
BIG = "".join(chr(0x41 + i % 26) for i in range(64 * 1024))  # a 64 KiB value
#: Names a peer stores; keyrings.alt keeps user names lower-cased (configparser).
SAMPLE = {("db.example.com", "app"): "s3cret", ("sérvice ☃ 東京", "ünïcode-user"): "välue ✓",
          ("big", "blob"): BIG, ("svc with spaces", "user@example.com"): "p a s s"}


class MemoryKeyring(KeyringBackend):
    """A backend that cannot list its entries (as most OS keyrings), for --entries."""

    priority = 1
    data: ClassVar[dict[tuple[str, str], str]] = {}
    fail_read: ClassVar[set[tuple[str, str]]] = set()
    fail_delete: ClassVar[set[tuple[str, str]]] = set()

    def get_password(self, service: str, username: str) -> str | None:
        if (service, username) in self.fail_read:
            raise RuntimeError(f"backend exploded holding {CANARY}")
        return self.data.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.data[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if (service, username) in self.fail_delete:
            raise PasswordDeleteError(f"cannot delete {CANARY}")
        if self.data.pop((service, username), None) is None:
            raise PasswordDeleteError("not found")


@pytest.fixture
def memory() -> type[MemoryKeyring]:
    MemoryKeyring.data = {}
    MemoryKeyring.fail_read = set()
    MemoryKeyring.fail_delete = set()
    return MemoryKeyring


def _peer(name: str, path: Path, entries: dict[tuple[str, str], str]) -> Any:
    """A real peer file, written by the peer's own set_password."""
    kr = moving.load_backend(name)
    kr.file_path = str(path)
    if name != PLAIN:
        kr.keyring_key = PEER_KEY
    for (service, username), value in entries.items():
        kr.set_password(service, username, value)
    return kr


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# keyrings.alt's EncryptedKeyring calls PBKDF2 with pycryptodome's deprecated defaults.
@pytest.mark.filterwarnings("ignore:PBKDF2 without:DeprecationWarning")
@pytest.mark.parametrize("peer", [PLAIN, ENCRYPTED, CRYPTFILE])
def test_import_from_real_peer_files(home: Path, tmp_path: Path, peer: str) -> None:
    source = tmp_path / "peer.cfg"
    _peer(peer, source, SAMPLE)
    env = {"KEYRING_PROPERTY_FILE_PATH": str(source), "KEYRING_PROPERTY_KEYRING_KEY": PEER_KEY}
    done = run_cli("import", "--from", peer, home=home, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "imported 4, updated 0, skipped 0, failed 0" in done.stderr
    with Store.open(home) as s:
        for (service, username), value in SAMPLE.items():
            assert s.get(service, username.lower()).reveal() == value
        events = [e for e in s.trail.show(op="import")]
        assert len(events) == 4
        assert {e.reason for e in events} == {f"from {peer}"}
        assert all(e.outcome == "ok" for e in events)
    # A second run skips every entry (nothing overwritten); --update makes new versions.
    again = run_cli("import", "--from", peer, "--json", home=home, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["counts"]["skipped"] == 4
    assert report["counts"]["imported"] == 0
    update = run_cli("import", "--from", peer, "--update", home=home, env=env, timeout=300)
    assert update.returncode == 0
    assert "updated 4" in update.stderr
    with Store.open(home) as s:
        assert s.history("big", "blob")[0].version == 2
    # The source file is untouched without --delete-source.
    kr = _peer(peer, source, {})
    assert kr.get_password("big", "blob") == BIG


def test_wrong_peer_password_is_refused_and_stores_nothing(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "peer.cfg"
    _peer(CRYPTFILE, source, {("a", "b"): CANARY})
    Store.init(home).close()
    env = {"KEYRING_PROPERTY_FILE_PATH": str(source),
           "KEYRING_PROPERTY_KEYRING_KEY": "wrong-" + CANARY}
    done = run_cli("import", "--from", "cryptfile", home=home, env=env, timeout=300)
    assert done.returncode == 2  # the source refused the settings it was given
    assert "cannot be opened with the given settings (ValueError" in done.stderr
    assert CANARY not in done.stdout + done.stderr
    with Store.open(home) as s:
        assert s.credentials() == []


def test_listing_less_backend_needs_entries(home: Path, tmp_path: Path,
                                            memory: type[MemoryKeyring],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    memory.data = {("svc", ""): "empty-user", ("svc", "x"): "y", ("ünï", "ç"): BIG}
    src = "tests.test_import.MemoryKeyring"
    code, _, err = _main(capsys, "--home", str(home), "import", "--from", src)
    assert code == 2
    assert "--entries" in err
    entries = tmp_path / "entries.tsv"
    entries.write_text("svc\t\nsvc\tx\n\nünï\tç\nsvc\tx\n", "utf-8")
    code, _, err = _main(capsys, "--home", str(home), "import", "--from", src, "--entries",
                         str(entries))
    assert code == 0, err
    assert "imported 3" in err
    with Store.open(home) as s:
        assert s.get("svc", "").reveal() == "empty-user"
        assert s.get("ünï", "ç").reveal() == BIG
    as_json = tmp_path / "entries.json"
    as_json.write_text(json.dumps([{"service": "svc", "username": ""}]), "utf-8")
    code, out, _ = _main(capsys, "--home", str(home), "import", "--from", src, "--entries",
                         str(as_json), "--json")
    assert code == 0
    assert json.loads(out)["entries"][0]["outcome"] == "skipped"


def test_dry_run_changes_nothing(home: Path, tmp_path: Path, memory: type[MemoryKeyring],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    memory.data = {("a", "1"): "one", ("b", "2"): "two"}
    with Store.init(home) as s:
        s.set("a", "1", "already")
    entries = tmp_path / "e.tsv"
    entries.write_text("a\t1\nb\t2\nc\t3\n", "utf-8")
    before = (home / "vault.db").read_bytes()
    code, out, err = _main(capsys, "--home", str(home), "import", "--from",
                           "tests.test_import.MemoryKeyring", "--entries", str(entries),
                           "--dry-run", "--update")
    assert code == 1  # c is not in the source
    assert "would-update: service a, user 1" in out
    assert "would-import: service b, user 2" in out
    assert "failed: service c, user 3: the source has no such entry" in out
    with Store.open(home) as s:
        assert [c.username for c in s.credentials()] == ["1"]
        assert s.get("a", "1").reveal() == "already"
        assert not s.trail.show(op="import")
    assert memory.data == {("a", "1"): "one", ("b", "2"): "two"}
    assert before  # the vault existed; only a list was audited
    code, _, err = _main(capsys, "--home", str(home), "import", "--from",
                         "tests.test_import.MemoryKeyring", "--entries", str(entries),
                         "--dry-run", "--delete-source")
    assert code == 2
    assert "exclude each other" in err


def test_delete_source_keeps_every_entry_whose_copy_failed(
        home: Path, tmp_path: Path, memory: type[MemoryKeyring],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    memory.data = {("ok", "1"): "v1", ("boom", "2"): CANARY, ("bad\x00name", "3"): "v3",
                   ("mismatch", "4"): "v4", ("ok", "5"): "v5", ("nodelete", "6"): "v6"}
    memory.fail_read = {("boom", "2")}
    memory.fail_delete = {("nodelete", "6")}
    entries = tmp_path / "e.tsv"
    entries.write_text("".join(f"{s}\t{u}\n" for s, u in memory.data), "utf-8")
    real_get = Store.get

    def lying_get(self: Store, service: str, username: str, **kw: Any) -> Secret:
        if service == "mismatch":
            return Secret("not what was stored")
        return real_get(self, service, username, **kw)

    monkeypatch.setattr(Store, "get", lying_get)
    code, out, err = _main(capsys, "--home", str(home), "import", "--from",
                           "tests.test_import.MemoryKeyring", "--entries", str(entries),
                           "--delete-source", "--json")
    report = json.loads(out)
    by_name = {(r["service"], r["username"]): r for r in report["entries"]}
    # The first failure is the source's read: exit 8; every other entry still ran.
    assert code == 8
    assert by_name[("ok", "1")]["source"] == "deleted"
    assert by_name[("ok", "5")]["source"] == "deleted"
    assert by_name[("boom", "2")]["outcome"] == "failed"
    assert by_name[("bad\x00name", "3")]["outcome"] == "failed"
    assert by_name[("bad\x00name", "3")]["code"] == 2
    assert by_name[("mismatch", "4")]["outcome"] == "failed"
    assert by_name[("mismatch", "4")]["code"] == 3
    assert by_name[("nodelete", "6")]["source"] == "delete-failed"
    assert report["counts"] == {"imported": 3, "updated": 0, "skipped": 0, "failed": 3,
                                "source_deleted": 2, "source_delete_failed": 1}
    # The source keeps every entry whose copy failed (and the one it refused to delete).
    assert set(memory.data) == {("boom", "2"), ("bad\x00name", "3"), ("mismatch", "4"),
                                ("nodelete", "6")}
    assert CANARY not in out + err
    with Store.open(home) as s:
        trail = " ".join(f"{e.reason}" for e in s.trail.show())
    assert CANARY not in trail


def test_human_report_names_failures(home: Path, tmp_path: Path, memory: type[MemoryKeyring],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    memory.data = {("a", "1"): "x"}
    entries = tmp_path / "e.tsv"
    entries.write_text("a\t1\nmissing\tm\n", "utf-8")
    code, out, err = _main(capsys, "--home", str(home), "import", "--from",
                           "tests.test_import.MemoryKeyring", "--entries", str(entries))
    assert code == 1
    assert out == ""
    assert "failed: service missing, user m: the source has no such entry" in err
    assert "imported 1, updated 0, skipped 0, failed 1" in err
    code, out, err = _main(capsys, "--home", str(home), "import", "--from",
                           "tests.test_import.MemoryKeyring", "--entries", str(entries))
    assert "skipped: service a, user 1" in err


def test_from_current_passes_over_this_backend(memory: type[MemoryKeyring],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "tests.test_import.MemoryKeyring")
    assert isinstance(moving.current_backend(), MemoryKeyring)
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring_hardened.backend.HardenedKeyring")
    chosen = moving.current_backend()
    assert moving._class_path(chosen) != "keyring_hardened.backend.HardenedKeyring"
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "no.such.Backend")
    with pytest.raises(UsageError, match="cannot be loaded"):
        moving.current_backend()


def test_backend_names(tmp_path: Path) -> None:
    assert type(moving.load_backend("cryptfile")).__name__ == "CryptFileKeyring"
    with pytest.raises(UsageError, match=r"offers 2 usable backends .*PlaintextKeyring"):
        moving.load_backend("file")
    for bad, why in [("no.such.Thing", "no keyring backend"), ("nothing", "no keyring backend"),
                     ("keyring_hardened.backend.HardenedKeyring", "keyring-hardened itself"),
                     ("hardened", "keyring-hardened itself"), ("os.path", "not a keyring"),
                     ("", "needs a keyring backend")]:
        with pytest.raises(UsageError, match=why):
            moving.load_backend(bad)
    with pytest.raises(UsageError, match="cannot list"):
        moving.list_entries(MemoryKeyring())  # type: ignore[no-untyped-call]


def test_peer_file_problems(tmp_path: Path) -> None:
    kr = moving.load_backend(PLAIN)
    kr.file_path = str(tmp_path / "absent.cfg")
    with pytest.raises(UsageError, match="KEYRING_PROPERTY_FILE_PATH"):
        moving.list_entries(kr)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    kr.file_path = str(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        moving.list_entries(kr)  # and it did not hang
    garbage = tmp_path / "garbage.cfg"
    garbage.write_bytes(b"\xff\xfe not ini")
    kr.file_path = str(garbage)
    with pytest.raises(UsageError, match="not a keyring file"):
        moving.list_entries(kr)
    bad = tmp_path / "bad.cfg"
    bad.write_text("[svc]\nuser_ZZ_C3 = x\n", "utf-8")
    kr.file_path = str(bad)
    with pytest.raises(UsageError, match="not escaped"):
        moving.list_entries(kr)


def test_entries_file_errors_name_the_line(tmp_path: Path) -> None:
    f = tmp_path / "e"
    for text, why in [("svc\tu\nno-tab-here\n", "line 2"), ("\tuser\n", "line 1"),
                      ("a\tb\tc\n", "line 1"), ('[{"service": "s"}]', "item 1"),
                      ('[{"service": "", "username": "u"}]', "item 1"), ("[1, 2", "not valid"),
                      ('{"service": "s"}', "line 1"), ('  ["x"]', "item 1")]:
        f.write_text(text, "utf-8")
        with pytest.raises(UsageError, match=why):
            moving.read_entries(f)
    f.write_bytes(b"\xff\tx\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        moving.read_entries(f)
    with pytest.raises(UsageError, match="does not exist"):
        moving.read_entries(tmp_path / "absent")
    f.write_text('{"a": 1}', "utf-8")
    f.write_text('[{"service": "s", "username": "u"}]', "utf-8")
    assert moving.read_entries(f) == [moving.Entry("s", "u")]


def test_entries_json_object_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "e.json"
    f.write_text("[]", "utf-8")
    assert moving.read_entries(f) == []
    f.write_text("\ufeffsvc\tu\n", "utf-8")
    assert moving.read_entries(f) == [moving.Entry("svc", "u")]


class _Item:
    def __init__(self, attributes: dict[str, str]) -> None:
        self._attributes = attributes

    def get_attributes(self) -> dict[str, str]:
        return self._attributes


class _Collection:
    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.connection = self
        self.closed = False
        self.queries: list[dict[str, str]] = []

    def search_items(self, query: dict[str, str]) -> list[_Item]:
        self.queries.append(query)
        return self.items

    def close(self) -> None:
        self.closed = True


def test_secret_service_listing_reads_keyrings_items() -> None:
    """SecretStorage is optional: the listing is checked against its item interface."""
    from keyring.backends import SecretService

    collection = _Collection([_Item({"service": "s", "username": "u", "application": "x"}),
                              _Item({"service": "s", "username": "u"}),
                              _Item({"service": "t", "username": ""}),
                              _Item({"service": "", "username": "skip"}),
                              _Item({"username": "no-service"})])
    kr = SecretService.Keyring.__new__(SecretService.Keyring)
    kr.get_preferred_collection = lambda: collection  # type: ignore[method-assign]
    assert moving.list_entries(kr) == [moving.Entry("s", "u"), moving.Entry("t", "")]
    assert collection.queries == [{"application": "Python keyring library"}]
    assert collection.closed
