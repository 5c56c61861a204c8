"""TTL auto-refresh (issue 13), in process under a frozen clock: no sleeping.

The refresher is real (a child process, or a Python entry point); only the
store's clock is frozen, so expiry, the refresh-ahead window and the lease's
expiry and takeover are decided at exactly the times the test sets.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyring_hardened import refresh
from keyring_hardened.config import Config, check_config
from keyring_hardened.errors import (
    DeniedError,
    ExpiredError,
    IntegrityError,
    NotFoundError,
    UsageError,
)
from keyring_hardened.refresh import RefreshContext, command_spec, lease_decision, plugin_spec
from keyring_hardened.store import Store

from .conftest import CANARY

T0 = 1_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def counting(tmp_path: Path, value: str = "fresh", *, code: int = 0, stderr: str = "",
             sleep: float = 0.0, out_bytes: int | None = None) -> refresh.RefreshSpec:
    """A refresher that counts its runs in a file and prints ``value-<run>``."""
    counter = tmp_path / "runs"
    script = (
        "import sys, time, pathlib\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = len(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text('x' * n)\n"
        f"time.sleep({sleep})\n"
        f"sys.stderr.write({stderr!r})\n"
        + (f"sys.stdout.write('x' * {out_bytes})\n" if out_bytes is not None
           else f"print({value!r} + '-' + str(n))\n")
        + f"sys.exit({code})\n")
    path = tmp_path / "refresher.py"
    path.write_text(script)
    return command_spec(f"{sys.executable} {path}")


class _Plugin:
    """An installed Python refresher (an entry point) that calls ``function``."""

    def __init__(self, function: Any) -> None:
        self._function = function

    def load(self) -> Any:
        return self._function


def install_plugin(monkeypatch: pytest.MonkeyPatch, name: str, function: Any
                   ) -> refresh.RefreshSpec:
    """Make ``function`` the only installed Python refresher, as ``name``; its spec."""
    monkeypatch.setattr(refresh, "_plugins", lambda: {name: _Plugin(function)})
    return refresh.plugin_spec(name)


def runs(tmp_path: Path) -> int:
    counter = tmp_path / "runs"
    return len(counter.read_text()) if counter.exists() else 0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(home: Path, clock: Clock) -> Iterator[Store]:
    s = Store.init(home, config=Config(refresh_timeout=5.0), actor="test", clock=clock)
    yield s
    s.close()


def events(home: Path, op: str | None = None) -> list[tuple[Any, ...]]:
    with sqlite3.connect(home / "vault.db") as conn:
        rows = list(conn.execute("SELECT actor, op, service, username, outcome, reason"
                                 " FROM audit_events ORDER BY seq"))
    return [r for r in rows if op is None or r[1] == op]


def test_expired_read_runs_the_refresher_once_and_returns_the_new_value(
        store: Store, clock: Clock, tmp_path: Path, home: Path) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    assert store.get("svc", "u").reveal() == "old"
    assert runs(tmp_path) == 0
    clock.now += 60
    assert store.get("svc", "u").reveal() == "fresh-1"
    assert store.get("svc", "u").reveal() == "fresh-1"
    assert runs(tmp_path) == 1
    # A new version with the credential's TTL, counted from the refresh.
    newest = store.history("svc", "u")[0]
    assert (newest.version, newest.current, newest.expires_at) == (2, True, clock.now + 60)
    assert [e[4:] for e in events(home, "refresh")] == [("ok", "started; command"),
                                                        ("ok", "refreshed; version 2")]
    assert ("test", "read", "svc", "u", "expired", "expired-refreshing") in events(home)
    store.trail.verify()


def test_no_refresher_is_still_exit_7(store: Store, clock: Clock) -> None:
    store.set("svc", "u", "old", ttl=60)
    clock.now += 60
    with pytest.raises(ExpiredError, match="no refresh is configured"):
        store.get("svc", "u")


def test_refresh_ahead_returns_the_current_value_and_refreshes(
        store: Store, clock: Clock, tmp_path: Path) -> None:
    store.set("svc", "u", "old", ttl=600, refresher=counting(tmp_path), refresh_ahead=120)
    clock.now += 479  # one second before the window
    assert store.get("svc", "u").reveal() == "old"
    assert runs(tmp_path) == 0
    clock.now += 1  # inside: this reader is elected, and still gets the valid value
    assert store.get("svc", "u").reveal() == "old"
    assert runs(tmp_path) == 1
    assert store.get("svc", "u").reveal() == "fresh-1"
    assert store.history("svc", "u")[0].expires_at == clock.now + 600


def test_refresh_ahead_failure_warns_keeps_the_value_then_exit_7_with_the_summary(
        store: Store, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store.set("svc", "u", CANARY, ttl=600,
              refresher=counting(tmp_path, code=3, stderr="backend unreachable\nmore\n"),
              refresh_ahead=120)
    clock.now += 500
    with caplog.at_level(logging.WARNING, logger="keyring_hardened"):
        assert store.get("svc", "u").reveal() == CANARY
    assert "failed (exit 3: backend unreachable); the current value is used" in caplog.text
    assert store.notices
    assert "exit 3: backend unreachable" in store.notices[-1]
    # A failing refresher is retried after 5 s, doubling with each failure in a row.
    assert store.get("svc", "u").reveal() == CANARY
    assert runs(tmp_path) == 1
    clock.now += 5
    assert store.get("svc", "u").reveal() == CANARY
    assert runs(tmp_path) == 2
    clock.now += 9
    assert store.get("svc", "u").reveal() == CANARY
    assert runs(tmp_path) == 2
    clock.now += 1
    assert store.get("svc", "u").reveal() == CANARY
    assert runs(tmp_path) == 3
    assert store.refresh_due()[0].result == "backoff"
    assert store.refresh("svc", "u").result == "failed"  # by hand: no wait
    assert runs(tmp_path) == 4
    info = store.credentials()[0]
    assert (info.refresher, info.refresh_failure) == ("command", "exit 3: backend unreachable")
    assert store.status()["refresh"] == {"refreshers": 1, "expired": 0, "expiring": 1,
                                         "failing": 1}
    clock.now += 100
    with pytest.raises(ExpiredError) as caught:
        store.get("svc", "u")
    assert "the refresh failed (exit 3: backend unreachable)" in str(caught.value)
    assert runs(tmp_path) == 5
    assert store.history("svc", "u")[0].version == 1  # the old value is intact
    assert store.status()["refresh"]["expired"] == 1


@pytest.mark.parametrize(("kwargs", "summary"), [
    ({"code": 2, "stderr": "no such role\n"}, "exit 2: no such role"),
    ({"value": ""}, "empty output"),
    ({"out_bytes": 10 * 1024 * 1024}, "printed more than 1048576 bytes"),
    ({"sleep": 30}, "timed out after 1s"),
])
def test_refresher_failures_are_clear_and_keep_the_old_value(
        home: Path, clock: Clock, tmp_path: Path, kwargs: dict[str, Any], summary: str) -> None:
    with Store.init(home, config=Config(refresh_timeout=1.0), actor="test", clock=clock) as s:
        spec = counting(tmp_path, **kwargs)
        if kwargs.get("value") == "":
            spec = command_spec(f"{sys.executable} -c pass")
        s.set("svc", "u", CANARY, ttl=600, refresher=spec)
        outcome = s.refresh("svc", "u")
        assert (outcome.result, outcome.summary) == ("failed", summary)
        assert s.get("svc", "u").reveal() == CANARY
        assert s.history("svc", "u")[0].version == 1
    trail = json.dumps(events(home))
    assert summary in trail
    assert CANARY not in trail


def test_a_refresher_printing_its_token_to_stderr_is_redacted(
        store: Store, clock: Clock, tmp_path: Path, home: Path) -> None:
    token = "tok-" + CANARY
    spec = command_spec(f"{sys.executable} -c \"import sys; sys.stderr.write('bad token ' + "
                        f"sys.argv[1] + chr(10)); sys.exit(1)\" --token={token}")
    store.set("svc", "u", "old", ttl=60, refresher=spec)
    clock.now += 60
    with pytest.raises(ExpiredError) as caught:
        store.get("svc", "u")
    assert "bad token [redacted])" in str(caught.value)
    assert CANARY not in str(caught.value)
    assert CANARY not in json.dumps(events(home))


def test_a_refresher_echoing_its_new_value_on_stderr_before_failing_is_redacted(
        store: Store, tmp_path: Path, home: Path) -> None:
    spec = command_spec(f"{sys.executable} -c \"import sys; print('{CANARY}'); "
                        f"sys.stderr.write('made {CANARY}'); sys.exit(4)\"")
    store.set("svc", "u", "old", ttl=60, refresher=spec)
    outcome = store.refresh("svc", "u")
    assert outcome.summary == "exit 4: made [redacted]"
    assert CANARY not in json.dumps(events(home))


def test_the_spec_is_sealed_and_shown_nowhere_but_its_kind(
        store: Store, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = "sk-" + CANARY
    store.set("svc", "u", "v", ttl=60,
              refresher=command_spec(f"curl -H 'Authorization: Bearer {token}' https://x"))
    store.close()
    from keyring_hardened.cli import main

    for argv in (["list", "--json"], ["list"], ["status", "--json"], ["status"],
                 ["history", "svc", "u", "--json"], ["audit", "show", "--json"],
                 ["audit", "export", str(tmp_path / "trail.jsonl")]):
        assert main([*argv, "--home", str(home)]) == 0, argv
        out, err = capsys.readouterr()
        assert CANARY not in out + err
    assert CANARY not in (tmp_path / "trail.jsonl").read_text()
    assert main(["list", "--json", "--home", str(home)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["refresher"] == "command"
    for name in ("vault.db", "vault.db-wal"):
        path = home / name
        if path.exists():
            assert CANARY.encode() not in path.read_bytes()
    with sqlite3.connect(home / "vault.db") as conn:
        blob, = conn.execute("SELECT refresh FROM credentials").fetchone()
    assert json.loads(blob)["kind"] == "command"


def _edit(home: Path, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(home / "vault.db", isolation_level=None)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()


@pytest.mark.parametrize("edit", ["ahead", "failure", "null", "written-back", "swapped"])
def test_editing_the_refresher_record_is_an_integrity_failure(
        home: Path, clock: Clock, tmp_path: Path, edit: str) -> None:
    with Store.init(home, config=Config(), actor="test", clock=clock) as s:
        s.set("svc", "u", "v", ttl=60, refresher=counting(tmp_path), refresh_ahead=10)
        s.set("svc", "other", "w", ttl=60, refresher=command_spec("echo other"))
        with sqlite3.connect(home / "vault.db") as conn:
            old, = conn.execute("SELECT refresh FROM credentials WHERE username = 'u'").fetchone()
            theirs, = conn.execute(
                "SELECT refresh FROM credentials WHERE username = 'other'").fetchone()
        s.ttl("svc", "u", refresh_ahead=20)
    doc = json.loads(old)
    if edit == "ahead":  # widen the window
        _edit(home, "UPDATE credentials SET refresh = ? WHERE username = 'u'",
              json.dumps({**doc, "ahead": 59.0}).encode())
    elif edit == "failure":  # hide a failing refresh
        _edit(home, "UPDATE credentials SET refresh = ? WHERE username = 'u'",
              json.dumps({**doc, "failure": "x", "failures": 1}).encode())
    elif edit == "null":  # remove the refresher
        _edit(home, "UPDATE credentials SET refresh = NULL WHERE username = 'u'")
    elif edit == "written-back":  # the spec as it was before the ttl change
        _edit(home, "UPDATE credentials SET refresh = ? WHERE username = 'u'", old)
    else:  # another credential's sealed spec
        _edit(home, "UPDATE credentials SET refresh = ? WHERE username = 'u'", theirs)
    with Store.open(home, config=Config(), actor="test", clock=clock) as s:
        with pytest.raises(IntegrityError):
            s.get("svc", "u")
        with pytest.raises(IntegrityError):
            s.refresh("svc", "u")
    assert runs(tmp_path) == 0


def test_a_spec_moved_to_another_credential_does_not_open(
        store: Store, tmp_path: Path) -> None:
    # Below the state root: the spec's own binding (AEAD associated data).
    store.set("svc", "u", "v", ttl=60, refresher=counting(tmp_path))
    store.set("svc", "w", "v", ttl=60, refresher=counting(tmp_path))
    with store._guard() as storage:
        heads = {h.username: h for _, h in storage.all_heads()}
    moved = heads["w"]._replace(refresh=heads["u"].refresh)
    with pytest.raises(IntegrityError, match="refresher's integrity check failed"):
        refresh.open_spec(store, moved, refresh.state_of(moved))  # type: ignore[arg-type]


# -- the lease --------------------------------------------------------------------


def test_lease_decision() -> None:
    me, other = b"m" * 16, b"o" * 16
    assert lease_decision(None, 100.0, me, 3, 32.0) == "free"
    assert lease_decision(("h", me, 3, 50.0), 100.0, me, 3, 32.0) == "ours"
    assert lease_decision(("h", other, 3, 120.0), 100.0, me, 3, 32.0) == "held"
    assert lease_decision(("h", other, 3, 132.0), 100.0, me, 3, 32.0) == "held"
    assert lease_decision(("h", other, 3, 100.0), 100.0, me, 3, 32.0) == "free"  # expired
    assert lease_decision(("h", other, 3, 132.5), 100.0, me, 3, 32.0) == "free"  # planted far
    assert lease_decision(("h", other, 2, 120.0), 100.0, me, 3, 32.0) == "free"  # older base
    assert lease_decision(("h", other, 3, "soon"), 100.0, me, 3, 32.0) == "free"
    assert lease_decision(("h", other, 3, True), 100.0, me, 3, 32.0) == "free"
    assert lease_decision(("h", other), 100.0, me, 3, 32.0) == "free"


def _plant(home: Path, head_id: int, base: int, expires: float) -> None:
    _edit(home, "INSERT OR REPLACE INTO refresh_leases VALUES (?, 'ghost:1', ?, ?, ?)",
          head_id, b"g" * 16, base, expires)


def _head_id(home: Path) -> int:
    with sqlite3.connect(home / "vault.db") as conn:
        return int(conn.execute("SELECT id FROM credentials").fetchone()[0])


def test_a_live_lease_makes_readers_wait_and_an_expired_one_is_taken_over(
        home: Path, clock: Clock, tmp_path: Path) -> None:
    # refresh_timeout 0.2 s: a lease lasts 2.2 s; the waiter gives up after that (real time).
    with Store.init(home, config=Config(refresh_timeout=0.2), actor="test", clock=clock) as s:
        s.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
        clock.now += 60
        _plant(home, _head_id(home), 1, clock.now + 2)
        with pytest.raises(ExpiredError, match="another process is still refreshing it"):
            s.get("svc", "u")
        assert runs(tmp_path) == 0  # it waited; it did not run a second refresher
        clock.now += 2  # the holder's lease ran out (it died): the next reader takes over
        assert s.get("svc", "u").reveal() == "fresh-1"
        assert runs(tmp_path) == 1


def test_a_planted_lease_far_in_the_future_is_ignored(
        store: Store, clock: Clock, tmp_path: Path, home: Path) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    clock.now += 60
    _plant(home, _head_id(home), 1, clock.now + 10 * 365 * 86400)
    assert store.get("svc", "u").reveal() == "fresh-1"


def test_a_lease_taken_over_mid_run_discards_the_value(
        store: Store, clock: Clock, tmp_path: Path, home: Path) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    clock.now += 60
    head_id, token = _head_id(home), b"t" * 16
    assert refresh._take_lease(store, head_id, 1, token) == "ours"
    started = refresh._start(store, "svc", "u", head_id, 1, token, force=False)
    assert isinstance(started, refresh._Started)
    _plant(home, head_id, 1, clock.now + 5)  # another process took the lease meanwhile
    outcome = refresh._finish(store, "svc", "u", started, token, b"late", None)
    assert outcome.result == "superseded"
    assert store.history("svc", "u")[0].version == 1
    assert events(home, "refresh")[-1][4:] == ("ok", "superseded; value discarded")


def test_a_set_during_a_refresh_wins(store: Store, clock: Clock, tmp_path: Path,
                                     home: Path) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    head_id, token = _head_id(home), b"t" * 16
    assert refresh._take_lease(store, head_id, 1, token) == "ours"
    started = refresh._start(store, "svc", "u", head_id, 1, token, force=True)
    assert isinstance(started, refresh._Started)
    store.set("svc", "u", "by hand")
    assert refresh._finish(store, "svc", "u", started, token, b"late", None).result \
        == "superseded"
    assert store.get("svc", "u").reveal() == "by hand"
    # Taking the lease for a version that is no longer current does nothing.
    assert refresh._take_lease(store, head_id, 1, token) == "changed"


def test_start_refuses_a_lease_that_is_not_ours_and_what_is_not_due(
        store: Store, clock: Clock, tmp_path: Path, home: Path) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    head_id = _head_id(home)
    assert refresh._start(store, "svc", "u", head_id, 1, b"x" * 16, force=False) \
        == refresh.Outcome("svc", "u", "changed")
    assert refresh._take_lease(store, head_id, 1, b"t" * 16) == "ours"
    assert refresh._take_lease(store, head_id, 1, b"s" * 16) == "held"
    assert refresh._start(store, "svc", "u", head_id, 1, b"t" * 16, force=False) \
        == refresh.Outcome("svc", "u", "not-due")
    assert refresh.refresh_one(store, "svc", "u", head_id, 1, wait=False).result == "held"


# -- ttl, set and config ------------------------------------------------------------------


def test_ttl_changes_expiry_refresher_and_window(store: Store, clock: Clock, tmp_path: Path,
                                                 home: Path) -> None:
    store.set("svc", "u", "v")
    assert store.history("svc", "u")[0].expires_at is None
    store.ttl("svc", "u", ttl=3600)
    assert store.history("svc", "u")[0].expires_at == clock.now + 3600
    with pytest.raises(UsageError, match="has no refresher"):
        store.ttl("svc", "u", refresh_ahead=60)
    store.ttl("svc", "u", refresher=counting(tmp_path), refresh_ahead=600)
    assert store.credentials()[0].refresher == "command"
    with pytest.raises(UsageError, match="shorter than the TTL"):
        store.ttl("svc", "u", ttl=600)
    store.ttl("svc", "u", refresher=None)
    assert store.credentials()[0].refresher is None
    store.ttl("svc", "u", ttl=None)
    clock.now += 10 ** 6
    assert store.get("svc", "u").reveal() == "v"
    with pytest.raises(UsageError, match="nothing to change"):
        store.ttl("svc", "u")
    with pytest.raises(NotFoundError):
        store.ttl("svc", "nobody", ttl=60)
    store.delete("svc", "u")
    with pytest.raises(NotFoundError, match="deleted"):
        store.ttl("svc", "u", ttl=60)
    reasons = [e[5] for e in events(home, "ttl") if e[4] == "ok"]
    assert reasons == ["ttl-3600s", "refresher-command; ahead-600s", "refresher-removed",
                       "ttl-none"]
    store.trail.verify()


def test_set_keeps_the_refresher_and_clears_a_failure(store: Store, tmp_path: Path) -> None:
    store.set("svc", "u", "v", ttl=600, refresher=counting(tmp_path, code=1))
    assert store.refresh("svc", "u").result == "failed"
    assert store.credentials()[0].refresh_failure == "exit 1"
    store.set("svc", "u", "by hand", ttl=600)
    info = store.credentials()[0]
    assert (info.refresher, info.refresh_failure) == ("command", None)
    with pytest.raises(UsageError, match="shorter than the TTL"):
        store.set("svc", "u", "x", ttl=60, refresh_ahead=60)
    with pytest.raises(UsageError, match="has no refresher"):
        store.set("svc", "new", "x", ttl=60, refresh_ahead=6)
    with pytest.raises(UsageError, match="refresher must be a RefreshSpec"):
        store.set("svc", "u", "x", refresher="echo hi")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="refresh_ahead must be a positive"):
        store.set("svc", "u", "x", refresh_ahead=-1)


def test_default_ttl_by_service_glob(home: Path, clock: Clock) -> None:
    config = Config.from_mapping({"default_ttl": {"prod/*": "1h", "*": "30d"}})
    with Store.init(home, config=config, actor="test", clock=clock) as s:
        s.set("prod/db", "u", "v")
        s.set("dev/db", "u", "v")
        s.set("prod/api", "u", "v", ttl=60)
        expiry = {(c.service): c.expires_at for c in s.credentials()}
    assert expiry == {"prod/db": T0 + 3600, "dev/db": T0 + 30 * 86400, "prod/api": T0 + 60}
    assert Config.from_mapping({"default_ttl": "12h"}).default_ttl == (("*", 43200.0),)


@pytest.mark.parametrize(("doc", "message"), [
    ({"default_ttl": 5}, "default_ttl: expected a duration or a table"),
    ({"default_ttl": {"[^x]": "1h"}}, "default_ttl: glob number 1"),
    ({"default_ttl": {"*": "soon"}}, "default_ttl (glob number 1): expected a positive"),
    ({"refresh_timeout": "2h"}, "refresh_timeout: must be at most 1h"),
    ({"refresh_env": ["OK", "NOT-A-NAME"]}, "refresh_env[1]: not an environment variable"),
    ({"refresh_env": "PATH"}, "refresh_env: expected a list"),
    ({"refresh": {"background": "yes"}}, "refresh.background: expected true or false"),
    ({"refresh": {"nope": True}}, "refresh.nope: unknown key"),
])
def test_refresh_config_errors_name_the_key(tmp_path: Path, doc: dict[str, Any],
                                             message: str) -> None:
    import tomllib  # noqa: F401 - the documents are TOML-shaped

    path = tmp_path / "config.toml"
    lines = []
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines.extend(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
        else:
            lines.insert(0, f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    config, problems = check_config(path, True)
    assert config is None
    assert any(message in p for p in problems), problems


def test_refresh_config_values() -> None:
    config = Config.from_mapping({"refresh_timeout": "45s", "refresh_env": ["AWS_PROFILE"],
                                  "refresh": {"background": True}})
    assert (config.refresh_timeout, config.refresh_env, config.refresh_background) == (
        45.0, ("AWS_PROFILE",), True)


# -- refreshers --------------------------------------------------------------------------


def test_command_spec_parsing() -> None:
    assert command_spec("get-token --role 'a b'").argv == ("get-token", "--role", "a b")
    for bad, message in (("'unclosed", "cannot be split"), ("", "must name a program"),
                         ("''", "must name a program"), ("a\x00b", "NUL")):
        with pytest.raises(UsageError, match=message):
            command_spec(bad)
    with pytest.raises(UsageError, match="longer than 64 KiB"):
        command_spec("x " * 40000)
    with pytest.raises(UsageError, match="expected a command line"):
        command_spec(5)  # type: ignore[arg-type]
    assert "tok" not in repr(command_spec("get --token tok-123456"))


def test_plugin_spec_parsing() -> None:
    assert plugin_spec("generate") == refresh.RefreshSpec("python", (), "generate", None)
    assert plugin_spec("file:/a:b").argument == "/a:b"
    with pytest.raises(UsageError, match="no refresher named 'nope' is installed"):
        plugin_spec("nope")
    for bad in ("", "a b", "-x", 5):
        with pytest.raises(UsageError, match="expected NAME"):
            plugin_spec(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="at most 64 KiB"):
        plugin_spec("generate:" + "x" * 70000)


def test_the_generate_refresher(store: Store, clock: Clock) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=plugin_spec("generate:48"))
    clock.now += 60
    first = store.get("svc", "u").reveal()
    assert len(first) == 64
    assert first != "old"
    assert store.refresh("svc", "u").result == "refreshed"
    assert store.get("svc", "u").reveal() not in (first, "old")
    store.ttl("svc", "u", refresher=plugin_spec("generate:7"))
    outcome = store.refresh("svc", "u")
    assert outcome.result == "failed"
    assert outcome.summary == "ValueError: generate: the argument is a byte count from 16 to 1024"


def test_the_file_refresher(store: Store, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("projected-1\n")
    store.set("svc", "u", "old", ttl=60, refresher=plugin_spec(f"file:{token}"))
    assert store.refresh("svc", "u").version == 2
    assert store.get("svc", "u").reveal() == "projected-1"
    token.write_text("")
    assert store.refresh("svc", "u").summary == "empty output"
    token.unlink()
    token.mkdir()
    assert store.refresh("svc", "u").summary == \
        "ValueError: file: [redacted] is a directory, not a regular file"
    store.ttl("svc", "u", refresher=plugin_spec("file:relative"))
    assert store.refresh("svc", "u").summary == \
        "ValueError: file: the argument must be an absolute path"


def _context(argument: str | None = None, timeout: float = 1.0) -> RefreshContext:
    return RefreshContext("svc", "u", 1, None, argument, timeout)


def test_python_refresher_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    class EP:
        def __init__(self, func: Any) -> None:
            self.func = func

        def load(self) -> Any:
            return self.func

    def plugins(**found: Any) -> None:
        monkeypatch.setattr(refresh, "_plugins", lambda: {k: EP(v) for k, v in found.items()})

    import threading

    never = threading.Event()
    from keyring_hardened.secret import Secret

    plugins(ok=lambda c: Secret(f"{c.service}/{c.username}/{c.version}"),
            number=lambda c: 5, empty=lambda c: "",
            boom=lambda c: (_ for _ in ()).throw(RuntimeError(f"bad {c.argument} here")),
            hang=lambda c: never.wait(5))
    spec = refresh.RefreshSpec
    assert refresh.run_python(spec("python", (), "ok"), _context()) == b"svc/u/1"
    for name, summary in (("number", "returned int, not a string"), ("empty", "empty output"),
                          ("gone", "refresher 'gone' is not installed"),
                          ("hang", "timed out after 0.05s")):
        with pytest.raises(refresh.RefreshFailedError) as caught:
            refresh.run_python(spec("python", (), name), _context(timeout=0.05))
        assert caught.value.reason == summary
    never.set()
    with pytest.raises(refresh.RefreshFailedError) as caught:
        refresh.run_python(spec("python", (), "boom", "s3cr3t-arg"), _context("s3cr3t-arg"))
    assert caught.value.reason == "RuntimeError: bad [redacted] here"


def test_command_environment_is_minimal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRING_HARDENED_PASSPHRASE", CANARY)
    monkeypatch.setenv("PASSED_ON", "yes")
    monkeypatch.setenv("LANG", "C.UTF-8")
    script = "import os, json; print(json.dumps(sorted(os.environ)))"
    out = refresh.run_command((sys.executable, "-c", script), 10, ("PASSED_ON", "UNSET"))
    names = set(json.loads(out)) - {"LC_CTYPE", "PWD"}  # what Python itself may add
    assert names <= {"PATH", "HOME", "LANG", "PASSED_ON"}
    assert {"PASSED_ON", "PATH"} <= names


def test_command_not_found_and_signals() -> None:
    with pytest.raises(refresh.RefreshFailedError) as caught:
        refresh.run_command(("/nonexistent/refresher", "--token", "abcdef"), 5)
    assert caught.value.reason == "program 'refresher' not found"
    with pytest.raises(refresh.RefreshFailedError) as caught:
        refresh.run_command(("/",), 5)
    assert caught.value.reason == "cannot run '': Permission denied"
    with pytest.raises(refresh.RefreshFailedError) as caught:
        refresh.run_command((sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"), 5)
    assert caught.value.reason == "killed by signal 9"
    with pytest.raises(refresh.RefreshFailedError) as caught:
        refresh.run_command((sys.executable, "-c",
                             "import sys; sys.stdout.buffer.write(b'\\xff\\xfe')"), 5)
    assert caught.value.reason == "output is not UTF-8 text"


def test_stdin_is_closed_and_one_newline_is_stripped() -> None:
    script = "import sys; data = sys.stdin.read(); print(repr(data) + '\\n')"
    assert refresh.run_command((sys.executable, "-c", script), 10) == b"''\n"


def test_a_background_job_holding_stdout_does_not_cost_the_timeout() -> None:
    script = ("import subprocess, sys; subprocess.Popen(['sleep', '30']); print('answer')")
    assert refresh.run_command((sys.executable, "-c", script), 20) == b"answer"


# -- access control ---------------------------------------------------------------------


def test_a_reader_that_may_not_write_does_not_start_a_refresher(
        home: Path, clock: Clock, tmp_path: Path) -> None:
    config = Config.from_mapping({"policies": [
        {"actors": ["reader"], "services": ["*"], "allow": ["read", "list"],
         "deny": ["write"]}]})
    with Store.init(home, config=config, actor="owner", clock=clock) as s:
        s.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    clock.now += 60
    with Store.open(home, config=config, actor="reader", clock=clock) as s:
        with pytest.raises(ExpiredError, match=r"the refresher was not run: .*denied"):
            s.get("svc", "u")
        with pytest.raises(DeniedError):
            s.refresh("svc", "u")
    assert runs(tmp_path) == 0
    assert ("reader", "refresh", "svc", "u", "denied") in [e[:5] for e in events(home)]


def test_refresh_of_what_has_no_refresher(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.refresh("svc", "u")
    store.set("svc", "u", "v")
    with pytest.raises(UsageError, match="no refresher is configured"):
        store.refresh("svc", "u")
    store.delete("svc", "u")
    with pytest.raises(NotFoundError, match="deleted"):
        store.refresh("svc", "u")


# -- refresh --due and the background thread ---------------------------------------------------


def test_refresh_due_refreshes_only_what_is_due(store: Store, clock: Clock,
                                                tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    store.set("svc", "due", "old", ttl=600, refresher=counting(tmp_path / "a"),
              refresh_ahead=300)
    store.set("svc", "later", "old", ttl=6000, refresher=counting(tmp_path / "b"),
              refresh_ahead=300)
    store.set("svc", "plain", "old", ttl=60)
    clock.now += 300
    assert [(o.username, o.result) for o in store.refresh_due()] == [("due", "refreshed")]
    assert store.refresh_due() == []
    assert store.refresh("svc", "later", due_only=True).result == "not-due"
    assert (runs(tmp_path / "a"), runs(tmp_path / "b")) == (1, 0)


def test_background_thread_refreshes_and_stops(store: Store, clock: Clock,
                                               tmp_path: Path) -> None:
    store.set("svc", "u", "old", ttl=600, refresher=counting(tmp_path), refresh_ahead=300)
    handle = refresh.start_background(store, interval=3600)
    try:
        assert refresh.start_background(store) is handle  # one per store
        _passes(handle, 1)
        assert runs(tmp_path) == 0  # nothing due yet
        clock.now += 300
        # A read inside the window wakes the thread; the reader keeps the current value.
        assert store.get("svc", "u").reveal() == "old"
        _passes(handle, 2)
        assert runs(tmp_path) == 1
        assert store.get("svc", "u").reveal() == "fresh-1"
    finally:
        handle.stop()
    assert not handle.alive
    assert refresh.background_of(store) is None
    with pytest.raises(UsageError, match="interval"):
        refresh.start_background(store, interval=0)


def _passes(handle: refresh.BackgroundRefresh, n: int) -> None:
    """Wait (bounded) until the thread finished ``n`` passes; the count, not the time, is tested."""
    import time

    end = time.monotonic() + 60
    while handle.passes < n and time.monotonic() < end:
        time.sleep(0.01)
    assert handle.passes >= n


def test_background_thread_survives_errors(store: Store, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def flaky(s: Store, **_: Any) -> list[refresh.Outcome]:
        calls.append(1)
        if len(calls) == 1:
            raise IntegrityError("damaged", "x")
        if len(calls) == 2:
            raise RuntimeError("bug")
        return [refresh.Outcome("svc", "u", "failed", None, "exit 1")]

    monkeypatch.setattr(refresh, "refresh_due", flaky)
    with caplog.at_level(logging.WARNING, logger="keyring_hardened"):
        handle = refresh.start_background(store, interval=3600)
        try:
            for n in (1, 2, 3):
                if n > 1:
                    handle.poke()
                _passes(handle, n)
        finally:
            handle.stop()
    assert "background refresh: damaged" in caplog.text
    assert "background refresh: internal error" in caplog.text
    assert "refresh of service 'svc', user 'u' failed: exit 1" in caplog.text


# -- keys -----------------------------------------------------------------------------


def test_specs_follow_key_rotation_and_block_retire_until_rewrapped(
        store: Store, clock: Clock, tmp_path: Path) -> None:
    store.set("svc", "u", "old", ttl=600, refresher=counting(tmp_path))
    store.set("svc", "w", "old", ttl=600, refresher=counting(tmp_path))
    store.keys.rotate()
    with pytest.raises(UsageError, match="still seal 2 refresher specs"):
        store.keys.retire(below=2)
    # A refresh moves its credential's spec to the active key...
    assert store.refresh("svc", "u").result == "refreshed"
    # ... and rewrap moves the rest; then the old key can go.
    summary = store.keys.rewrap()
    assert summary.rewrapped >= 1
    assert store.keys.retire(below=2) == [1]
    assert store.refresh("svc", "w").result == "refreshed"
    store.trail.verify()


def test_retry_schedule() -> None:
    state = refresh.RefreshState("command", None, 1, b"", b"")
    assert refresh.retry_at(state) is None
    after = [refresh.retry_at(state._replace(failure="x", failed_at=100.0, failures=n))
             for n in (1, 2, 3, 7, 8, 100)]
    assert after == [105.0, 110.0, 120.0, 400.0, 400.0, 400.0]


def test_a_garbled_record_is_skipped_as_a_hint_and_refused_when_checked(
        store: Store, clock: Clock, tmp_path: Path, home: Path) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path))
    _edit(home, "UPDATE credentials SET refresh = X'7b7d'")
    assert store.status()["refresh"]["refreshers"] == 1
    with pytest.raises(IntegrityError):
        store.refresh_due()
    with pytest.raises(IntegrityError, match="refresh record is damaged"):
        refresh.decode_state(b"{}")
    with pytest.raises(IntegrityError, match="refresh record is damaged"):
        refresh.decode_state(json.dumps({"v": 2, "kind": "command"}).encode())
    assert runs(tmp_path) == 0


def test_a_read_of_a_version_number_never_refreshes(store: Store, clock: Clock,
                                                     tmp_path: Path) -> None:
    store.set("svc", "u", "old", ttl=60, refresher=counting(tmp_path), refresh_ahead=30)
    clock.now += 40
    assert store.get("svc", "u", version=1).reveal() == "old"
    clock.now += 20
    with pytest.raises(ExpiredError, match="a read without a version number refreshes it"):
        store.get("svc", "u", version=1)
    assert runs(tmp_path) == 0


def test_a_closed_store_stops_its_background_thread(home: Path, clock: Clock) -> None:
    s = Store.init(home, config=Config(), actor="test", clock=clock)
    handle = refresh.start_background(s, interval=3600)
    _passes(handle, 1)
    s.close()
    handle.poke()
    handle._thread.join(60)
    assert not handle.alive
    handle.stop()
