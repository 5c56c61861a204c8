"""Property tests: arbitrary text is stored exactly, or refused with a clear usage error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyring_hardened import cli
from keyring_hardened.errors import UsageError
from keyring_hardened.store import Store

from .conftest import run_cli

# Text including lone surrogates, NUL, whitespace and every plane.
ANY_TEXT = st.text(st.characters(codec=None), max_size=300)
LONG_TEXT = st.text(st.characters(), min_size=4000, max_size=5000)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store.init(tmp_path_factory.mktemp("prop") / "vault")
    yield s
    s.close()


def _valid(name: str, empty_ok: bool) -> bool:
    if (not name and not empty_ok) or "\x00" in name:
        return False
    try:
        return len(name.encode("utf-8")) <= 4096
    except UnicodeEncodeError:
        return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(service=ANY_TEXT | LONG_TEXT, username=ANY_TEXT, secret=ANY_TEXT | LONG_TEXT)
def test_round_trip_or_refusal(shared: Store, service: str, username: str, secret: str) -> None:
    ok = _valid(service, False) and _valid(username, True)
    try:
        secret.encode("utf-8")
    except UnicodeEncodeError:
        ok = False
    if ok:
        shared.set(service, username, secret)
        assert shared.get(service, username).reveal() == secret
    else:
        before = len(shared.credentials())
        with pytest.raises(UsageError) as info:
            shared.set(service, username, secret)
        assert "\n" not in str(info.value)
        assert len(shared.credentials()) == before


@settings(max_examples=40, deadline=None)
@given(service=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40),
       username=st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
       secret=st.text(st.characters(exclude_categories=["Cs"]), max_size=200))
def test_cli_round_trip(tmp_path_factory: pytest.TempPathFactory, service: str, username: str,
                        secret: str) -> None:
    home = tmp_path_factory.getbasetemp() / "cli-prop"
    # "--" ends the options, so names that start with "-" are names.
    args = ["--home", str(home), "set", "--no-strip", "--allow-empty", "--", service, username]
    if "\x00" in service + username:
        # NUL cannot travel in argv at all; the store refuses it through the API.
        return
    assert _cli(args, secret) == 0
    got = _cli_out(["--home", str(home), "get", "--", service, username])
    assert got == secret + "\n"


def _cli(argv: list[str], stdin: str) -> int:
    import io
    import sys

    class In(io.TextIOWrapper):
        def isatty(self) -> bool:
            return False
    old = sys.stdin
    sys.stdin = In(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8")
    try:
        return cli.main(argv)
    finally:
        sys.stdin = old


def _cli_out(argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    return buf.getvalue()


@pytest.mark.parametrize("secret", ["  leading and trailing  ", "\ttabs\t", "multi\nline\n",
                                    "emoji 🙂 and ünïcode", "{{ lookup('env','HOME') }}"])
def test_cli_subprocess_exact(home: Path, secret: str) -> None:
    assert run_cli("set", "svc", "u", "--no-strip", home=home, stdin=secret).returncode == 0
    assert run_cli("get", "svc", "u", home=home).stdout == secret + "\n"


def test_cli_refuses_overlong_name_with_exit_2(home: Path) -> None:
    done = run_cli("set", "x" * 5000, "u", home=home, stdin="s")
    assert done.returncode == 2
    assert "service is longer than 4096 bytes" in done.stderr
