"""Tests that kill mutants of refresh.py which the rest of the suite let live.

The example refreshers (``generate``, ``file``) at their bounds, and the
time format of refresh messages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyring_hardened import refresh
from keyring_hardened.errors import UsageError
from keyring_hardened.refresh import OUTPUT_LIMIT, RefreshContext

from .test_refresh import install_plugin


def _context(argument: str | None) -> RefreshContext:
    return RefreshContext("svc", "u", 1, None, argument, 30.0)


def test_utc_format() -> None:
    assert refresh._utc(0) == "1970-01-01T00:00:00Z"
    assert refresh._utc(1_900_000_000.9) == "2030-03-17T17:46:40Z"


def test_generate_sizes() -> None:
    assert len(refresh.generate_refresher(_context(None))) == 43  # 32 bytes, base64url
    assert len(refresh.generate_refresher(_context("16"))) == 22
    assert len(refresh.generate_refresher(_context("1024"))) == 1366
    for bad in ("15", "1025", "x", "-20"):
        with pytest.raises(ValueError, match="byte count"):
            refresh.generate_refresher(_context(bad))


def test_file_refresher_reads_up_to_the_limit_and_two_bytes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"a" * OUTPUT_LIMIT + b"\n")
    assert len(refresh.file_refresher(_context(str(path)))) == OUTPUT_LIMIT
    path.write_bytes(b"b" * (OUTPUT_LIMIT + 5))
    # two bytes past the limit, so the caller sees the output is too long
    assert len(refresh.file_refresher(_context(str(path)))) == OUTPUT_LIMIT + 2


def test_file_refresher_never_waits_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        refresh.file_refresher(_context(str(fifo)))
    with pytest.raises(ValueError, match="absolute path"):
        refresh.file_refresher(_context(None))


def test_a_python_refresher_spec_names_the_option_it_came_from() -> None:
    # The one-line error names what was wrong: the option, then the problem.
    with pytest.raises(UsageError) as caught:
        refresh.plugin_spec("not a name!")
    assert str(caught.value).startswith("--refresher: expected NAME")
    with pytest.raises(UsageError) as caught:
        refresh.plugin_spec("not a name!", "refresh_default")
    assert str(caught.value).startswith("refresh_default: expected NAME")


def test_a_python_refresher_runs_in_a_thread_named_after_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A refresher past its time is abandoned, still running: its thread's name
    # is how a thread dump (faulthandler, py-spy) tells which one it is.
    import threading

    seen: list[str] = []

    def rotator(context: RefreshContext) -> str:
        seen.append(threading.current_thread().name)
        return "new"

    spec = install_plugin(monkeypatch, "rotator", rotator)
    assert refresh.run_python(spec, _context(None)) == b"new"
    assert seen == ["refresher-rotator"]


def test_a_failure_reads_as_one_printable_line() -> None:
    error = refresh._fail("exit 3", "bad\x1b[31m token\x00\nsecond line", ["token"])
    assert error.reason == "exit 3: bad?[31m [redacted]?"
    assert str(error) == "the refresher failed (exit 3: bad?[31m [redacted]?)"
    assert str(refresh._fail("timed out after 2s", "", [])) == \
        "the refresher failed (timed out after 2s)"


def test_a_success_clears_the_last_failure(home: Path, tmp_path: Path) -> None:
    import sys

    from keyring_hardened.config import Config
    from keyring_hardened.store import Store

    counter = tmp_path / "runs"
    script = tmp_path / "flaky.py"
    script.write_text(
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = len(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text('x' * n)\n"
        "if n == 1:\n"
        "    sys.stderr.write('upstream down')\n"
        "    sys.exit(3)\n"
        "print('fresh-' + str(n))\n")
    with Store.init(home, config=Config(refresh_timeout=10.0)) as s:
        s.set("svc", "u", "old", ttl=600,
              refresher=refresh.command_spec(f"{sys.executable} {script}"))
        assert s.refresh("svc", "u").result == "failed"
        assert [c.refresh_failure for c in s.credentials()] == ["exit 3: upstream down"]
        assert s.refresh("svc", "u").result == "refreshed"
        assert [c.refresh_failure for c in s.credentials()] == [None]
        assert s.get("svc", "u").reveal() == "fresh-2"
    with Store.open(home) as s:
        assert [c.refresh_failure for c in s.credentials()] == [None]


def test_a_command_refreshers_first_argument_is_hidden_its_program_not() -> None:
    spec = refresh.command_spec("/usr/local/bin/fetch-token s3cr3t-first --scope=db")
    hidden = spec.sensitive()
    assert "s3cr3t-first" in hidden
    assert "db" not in hidden  # shorter than 4 characters: never a token worth hiding
    assert "--scope=db" in hidden
    assert "/usr/local/bin/fetch-token" not in hidden


def test_a_command_printing_two_bytes_past_the_limit_fails_at_once(home: Path) -> None:
    import sys

    from keyring_hardened.config import Config
    from keyring_hardened.store import Store

    # It then hangs: the flood is cut off as soon as it passes the limit, not
    # at the refresher's timeout.
    over = (f"{sys.executable} -c \"import sys, time; "
            f"sys.stdout.write('x' * {OUTPUT_LIMIT + 2}); sys.stdout.flush(); time.sleep(60)\"")
    exact = (f"{sys.executable} -c \"import sys; "
             f"sys.stdout.write('y' * {OUTPUT_LIMIT} + chr(10))\"")
    with Store.init(home, config=Config(refresh_timeout=30.0)) as s:
        s.set("svc", "u", "old", ttl=600, refresher=refresh.command_spec(over))
        outcome = s.refresh("svc", "u")
        assert (outcome.result, outcome.summary) == (
            "failed", f"printed more than {OUTPUT_LIMIT} bytes")
        # The limit itself and one newline are a value.
        s.set("svc", "u", "old", ttl=600, refresher=refresh.command_spec(exact))
        assert s.refresh("svc", "u").result == "refreshed"
        assert len(s.get("svc", "u").reveal()) == OUTPUT_LIMIT


def test_a_refresh_event_names_the_key_its_refresher_is_sealed_under(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from keyring_hardened.store import Store

    spec = install_plugin(monkeypatch, "rotate", lambda context: "fresh")
    with Store.init(home) as s:
        s.keys.rotate()  # KEK 2 is active when the refresher is sealed
        s.set("svc", "u", "old", ttl=600, refresher=spec)
        assert s.refresh("svc", "u").result == "refreshed"
        events = s.trail.show(op="refresh")
        assert events
        assert {e.key_version for e in events} == {2}
