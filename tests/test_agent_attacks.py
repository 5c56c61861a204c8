"""Attacks on the unlock agent (issue 12): identity, planting, other uids, protocol, lifecycle.

Each test is one attack. A passing test is a defence that holds (or, where
its docstring says LIMITATION, a property docs/agent.md must state); a
``xfail(strict=True)`` test is a bug, with the fix in its reason.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyring_hardened import agent as agent_mod
from keyring_hardened.agent import program_of
from keyring_hardened.agentproto import AgentStore, connect, recv_frame, send_frame
from keyring_hardened.errors import ConfigError, HardenedError, UsageError
from keyring_hardened.location import Location
from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF, PASSPHRASE

ROOT = Path(__file__).resolve().parent.parent
OTHER = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                                or shutil.which("prlimit") is None,
                                reason="runs processes as other uids: needs root, setpriv, prlimit")
ME = pwd.getpwuid(os.getuid()).pw_name


# -- helpers ---------------------------------------------------------------------------


def _base_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEYRING_HARDENED_", "COV_CORE_"))
           and k != "COVERAGE_PROCESS_START"}
    env["KEYRING_HARDENED_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _kh(home: Path, *args: str, env: dict[str, str] | None = None, stdin: str = "",
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "keyring_hardened", *args],
                          env={**_base_env(home), **(env or {})}, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def _stop(home: Path, env: dict[str, str] | None = None) -> None:
    _kh(home, "agent", "stop", env=env)


def _request(path: Path, doc: Any, timeout: float = 10) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        send_frame(sock, doc)
        return recv_frame(sock)
    finally:
        sock.close()


def _pid(path: Path) -> int:
    return int(_request(path, {"v": 1, "op": "status"})["result"]["pid"])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


def _trail(home: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(home / "vault.db") as conn:
        return list(conn.execute("SELECT * FROM audit_events"))


def _actors(home: Path) -> list[str]:
    with sqlite3.connect(home / "vault.db") as conn:
        return [a for a, in conn.execute("SELECT actor FROM audit_events")]


def _as(uid: int, gid: int, argv: list[str], env: dict[str, str], *,
        groups: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = [f"--groups={groups}"] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", *extra, *argv],
                          env=env, capture_output=True, text=True, timeout=60, check=False)


#: A stdlib-only client (another uid cannot import from pytest's 0700 tree anyway).
RAW_CLIENT = textwrap.dedent("""
    import socket, struct, sys
    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
    body = sys.argv[2].encode()
    try:
        s.sendall(struct.pack(">I", len(body)) + body)
    except OSError:
        pass  # refused: the agent says why and closes without reading
    head = s.recv(4, socket.MSG_WAITALL)
    n, = struct.unpack(">I", head)
    print(s.recv(n, socket.MSG_WAITALL).decode())
""")

#: A fake agent another user plants: answers ping, records what `set` sends, lies on `get`.
FAKE_AGENT = textwrap.dedent("""
    import json, os, socket, struct, sys
    srv = socket.socket(socket.AF_UNIX); srv.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666)
    srv.listen(8); print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        with c:
            while True:
                head = c.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    break
                req = json.loads(c.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL))
                print("harvested", json.dumps(req), flush=True)
                result = {"ping": "pong", "set": 1, "get": "attacker-value"}.get(req.get("op"))
                body = json.dumps({"v": 1, "ok": True, "result": result}).encode()
                c.sendall(struct.pack(">I", len(body)) + body)
""")


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A root-owned folder under /tmp that other users can traverse (0711)."""
    path = Path(tempfile.mkdtemp(prefix="kh-attack-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def keyvault(reachable: Path) -> Path:
    """A key-file vault (fast to unlock), under a folder other users can traverse."""
    home = reachable / "vault"
    with Store.init(home) as s:
        s.set("db", "app", CANARY)
        s.set("api", "deploy", "api-token")
    return home


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One passphrase-mode agent for the tests that only send it requests."""
    home = tmp_path_factory.mktemp("shared") / "vault"
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("db", "app", CANARY)
        s.set("api", "deploy", "api-token")
    started = _kh(home, "agent", "start", env={"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE})
    assert started.returncode == 0, started.stderr
    pid = _pid(home / "agent.sock")
    yield home
    _stop(home)
    _kill(pid)


def _start_shared(vault: Path, sock: Path, config: str,
                  prefix: tuple[str, ...] = ()) -> int:
    """A key-file agent as root, at ``sock``, with ``config``; its pid."""
    (vault / "config.toml").write_text(config)
    (vault / "config.toml").chmod(0o600)
    started = _kh(vault, "agent", "start", env={"KEYRING_HARDENED_AGENT_SOCK": str(sock)},
                  prefix=prefix)
    assert started.returncode == 0, started.stderr
    return _pid(sock)


# -- identity -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["python3", "-cimport os", "ansible-playbook"],      # -c with its code attached
    ["python3", "-Ic", "import os", "ansible-playbook"],  # -c combined with another flag
    ["python3", "-Ec", "import os"],
], ids=["attached-c", "combined-Ic", "combined-Ec"])
def test_program_of_follows_python_option_clusters(argv: list[str]) -> None:
    assert program_of("/usr/bin/python3.11", argv) == "python3.11 -c"


@pytest.mark.xfail(strict=True, reason=(
    "documented in docs/agent.md: for python -m pkg.mod the agent names the module as given "
    "(pkg.mod) and direct mode its file (mod.py); the agent cannot tell a package from a "
    "module without importing the caller's code"))
def test_agent_and_direct_mode_name_python_dash_m_alike(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("from keyring_hardened.location import _program\n"
                                "print(_program())\n")
    direct = subprocess.run([sys.executable, "-m", "pkg.mod"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
                            capture_output=True, text=True, timeout=60, check=True)
    assert program_of(sys.executable, [sys.executable, "-m", "pkg.mod"]) == \
        direct.stdout.strip()


READER = textwrap.dedent("""
    import sys
    from keyring_hardened.agentproto import connect
    from keyring_hardened.errors import HardenedError
    from keyring_hardened.location import Location
    store = connect(Location.resolve(sys.argv[1]))
    try:
        print(store.get("api", "deploy").reveal())
    except HardenedError as exc:
        print(exc.reason, file=sys.stderr)
        sys.exit(exc.exit_code)
""")


@pytest.mark.slow
@needs_root
def test_limitation_a_script_named_like_a_program_is_judged_as_that_program(
        keyvault: Path, tmp_path: Path) -> None:
    """LIMITATION (doc must say so): the program half of the 'verified' actor is a name the
    caller chooses, so same-user code passes any policy written for a program name."""
    sock = keyvault.parent / "agent.sock"
    os.chmod(keyvault.parent, 0o700)
    pid = _start_shared(keyvault, sock, 'default_policy = "deny"\n[[policies]]\n'
                        f'actors = ["{ME}:ansible-playbook"]\nservices = ["*"]\n'
                        'allow = ["read"]\n')
    env = _base_env(keyvault, KEYRING_HARDENED_AGENT_SOCK=str(sock))
    try:
        honest = tmp_path / "reader.py"
        honest.write_text(READER)
        denied = subprocess.run([sys.executable, str(honest), str(keyvault)], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert denied.returncode == 4, denied.stderr  # the policy is in force
        fake = tmp_path / "evil" / "ansible-playbook"
        fake.parent.mkdir()
        fake.write_text(READER)
        spoofed = subprocess.run([sys.executable, str(fake), str(keyvault)], env=env,
                                 capture_output=True, text=True, timeout=60, check=False)
        assert spoofed.returncode == 0, spoofed.stderr
        assert spoofed.stdout == "api-token\n"
        # And the trail cannot tell it from the real ansible-playbook.
        assert f"{ME}:ansible-playbook" in _actors(keyvault)
    finally:
        _stop(keyvault, {"KEYRING_HARDENED_AGENT_SOCK": str(sock)})
        _kill(pid)


@pytest.mark.slow
@needs_root
@pytest.mark.xfail(strict=True, reason=(
    "documented in docs/agent.md (threat model): the program half of a verified actor is "
    "the caller's choice of name, so limits and policies that should hold against the same "
    "user's code must match the user half (actors = [\"alice:*\"]), whose bucket is one; "
    "keying buckets on the uid is left for a later version"))
def test_renaming_the_script_does_not_refill_the_rate_limit(keyvault: Path,
                                                            tmp_path: Path) -> None:
    sock = keyvault.parent / "agent.sock"
    os.chmod(keyvault.parent, 0o700)
    pid = _start_shared(keyvault, sock, '[[rate_limits]]\nactors = ["*"]\nservices = ["*"]\n'
                        'operations = ["read"]\nlimit = 1\nper = "1h"\nburst = 1\n')
    env = _base_env(keyvault, KEYRING_HARDENED_AGENT_SOCK=str(sock))
    try:
        codes = []
        for i in range(3):
            script = tmp_path / f"reader{i}.py"
            script.write_text(READER)
            done = subprocess.run([sys.executable, str(script), str(keyvault)], env=env,
                                  capture_output=True, text=True, timeout=60, check=False)
            codes.append(done.returncode)
        assert codes[0] == 0
        assert codes[1:] == [5, 5], codes
    finally:
        _stop(keyvault, {"KEYRING_HARDENED_AGENT_SOCK": str(sock)})
        _kill(pid)


@pytest.mark.slow
def test_declared_actors_cannot_forge_or_break_the_trail(shared_agent: Path) -> None:
    path = shared_agent / "agent.sock"
    for declared in ("ci\nrunner\x1b[31m", "x" * 5000, "root:keyring) (declared y",
                     "\u202eevil", 12345):
        answer = _request(path, {"v": 1, "op": "get", "service": "api", "username": "deploy",
                                 "declared": declared})
        assert answer["ok"] is True, answer
    for row in _trail(shared_agent):
        for cell in row:
            if isinstance(cell, str):
                assert "\n" not in cell
                assert "\x1b" not in cell
                assert "\u202e" not in cell
                assert CANARY not in cell
    with sqlite3.connect(shared_agent / "vault.db") as conn:
        recorded = [a for a, in conn.execute("SELECT actor FROM audit_events WHERE op='read'")]
    assert all(len(a) <= 256 for a in recorded)
    # The verified identity always leads; a declared one only follows it.
    assert all(a.startswith(f"{ME}:") for a in recorded)


# -- socket planting ----------------------------------------------------------------------


def _plant(sock: Path) -> subprocess.Popen[str]:
    """A fake agent run by another user at ``sock``."""
    fake = subprocess.Popen(["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}",
                             "--clear-groups", sys.executable, "-c", FAKE_AGENT, str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert fake.stdout is not None
    assert fake.stdout.readline() == "ready\n"
    return fake


def _harvest(fake: subprocess.Popen[str]) -> str:
    fake.kill()
    out, _ = fake.communicate(timeout=10)
    return out


@needs_root
@pytest.mark.slow
def test_a_socket_planted_by_another_user_is_not_trusted(
        reachable: Path, keyvault: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    public = reachable / "public"  # a world-writable sticky folder, like /tmp
    public.mkdir()
    os.chmod(public, 0o1777)
    sock = public / "agent.sock"
    fake = _plant(sock)
    monkeypatch.setenv("KEYRING_HARDENED_AGENT_SOCK", str(sock))
    value = None
    try:
        with contextlib.suppress(HardenedError):
            store = connect(Location.resolve(keyvault))
            assert store is not None
            with contextlib.suppress(HardenedError):
                store.set("fresh", "u", "victim-secret-123")
            value = store.get("db", "app").reveal()
    finally:
        harvested = _harvest(fake)
    assert "victim-secret-123" not in harvested
    assert value != "attacker-value"


@needs_root
@pytest.mark.slow
def test_an_unsafe_home_is_refused_before_its_socket_is_trusted(keyvault: Path) -> None:
    os.chmod(keyvault, 0o777)  # direct mode would refuse this home
    with pytest.raises(ConfigError):
        Store.open(keyvault)
    fake = _plant(keyvault / "agent.sock")
    try:
        refused = False
        try:
            store = connect(Location.resolve(keyvault))
            assert store is not None
            store.set("fresh", "u", "victim-secret-456")
        except HardenedError:
            refused = True
    finally:
        out = _harvest(fake)
    assert "victim-secret-456" not in out
    assert refused


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "fifo", "other-users-socket", "open-folder"])
def test_agent_start_refuses_what_was_planted_at_its_socket(keyvault: Path, reachable: Path,
                                                            kind: str) -> None:
    folder = reachable / "sockdir"
    folder.mkdir(mode=0o700)
    sock = folder / "agent.sock"
    if kind == "file":
        sock.write_text("x")
    elif kind == "fifo":
        os.mkfifo(sock)
    elif kind == "other-users-socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(sock))
        s.close()
        os.chown(sock, OTHER, OTHER, follow_symlinks=False)
    else:
        os.chmod(folder, 0o1777)
    env = {"KEYRING_HARDENED_AGENT_SOCK": str(sock)}
    done = _kh(keyvault, "agent", "start", env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert ("is not this user's agent socket" in done.stderr if kind != "open-folder"
            else "must be yours and closed to others" in done.stderr)
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(sock).st_mode)  # left alone
    _stop(keyvault, env)


def test_two_starts_racing_over_a_stale_socket_leave_one_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    path = folder / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # an agent killed with -9 leaves this: a socket nobody answers
    stale.close()
    real_unlink = Path.unlink
    listeners: list[socket.socket] = []
    raced: list[bool] = []

    def racing_unlink(self: Path, missing_ok: bool = False) -> None:
        if self == path and not raced:
            raced.append(True)  # the other start runs between our probe and our unlink
            with contextlib.suppress(HardenedError):
                listeners.append(agent_mod.bind(path))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", racing_unlink)
    try:
        with contextlib.suppress(HardenedError):
            listeners.append(agent_mod.bind(path))
        assert len(listeners) == 1, "two agents bound: the first one's socket was unlinked"
    finally:
        for listener in listeners:
            listener.close()


# -- other users ----------------------------------------------------------------------------


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize("op", ["lock", "stop", "unlock"])
def test_an_allowed_other_user_cannot_stop_lock_or_unlock_the_agent(
        keyvault: Path, reachable: Path, op: str) -> None:
    sock = reachable / "agent.sock"
    pid = _start_shared(keyvault, sock, f"agent_allow_users = [{OTHER}]\n")
    try:
        if op == "unlock":
            assert _request(sock, {"v": 1, "op": "lock"})["ok"] is True  # the operator locks
        done = _as(OTHER, OTHER, [sys.executable, "-c", RAW_CLIENT, str(sock),
                                  json.dumps({"v": 1, "op": op})], {})
        assert done.returncode == 0, done.stderr
        time.sleep(1.5)  # a stop is noticed within a second
        assert _alive(pid)
        state = _request(sock, {"v": 1, "op": "status"})["result"]["state"]
        assert state == ("locked" if op == "unlock" else "unlocked")
        assert json.loads(done.stdout)["ok"] is False
    finally:
        _stop(keyvault, {"KEYRING_HARDENED_AGENT_SOCK": str(sock)})
        _kill(pid)


@needs_root
@pytest.mark.slow
def test_an_allowed_primary_group_is_served_and_others_are_refused(keyvault: Path,
                                                                   reachable: Path) -> None:
    sock = reachable / "agent.sock"
    pid = _start_shared(keyvault, sock, "agent_allow_groups = [4242]\n")
    ask = [sys.executable, "-c", RAW_CLIENT, str(sock),
           json.dumps({"v": 1, "op": "get", "service": "api", "username": "deploy"})]
    try:
        served = _as(OTHER, 4242, ask, {})
        assert json.loads(served.stdout)["result"] == "api-token", served.stderr
        refused = json.loads(_as(OTHER, OTHER, ask, {}).stdout)
        assert refused["ok"] is False
        assert refused["error"]["code"] == 6
        assert f"uid {OTHER} may not use this agent" in refused["error"]["message"]
        # Wrong-typed and surprising requests from another uid are refused before parsing.
        junk = json.loads(_as(OTHER, OTHER, [sys.executable, "-c", RAW_CLIENT, str(sock),
                                             '{"v": "1", "op": ["stop"]}'], {}).stdout)
        assert junk["ok"] is False
        assert _alive(pid)
    finally:
        _stop(keyvault, {"KEYRING_HARDENED_AGENT_SOCK": str(sock)})
        _kill(pid)


@needs_root
@pytest.mark.slow
def test_a_supplementary_group_of_the_calling_process_counts(keyvault: Path,
                                                             reachable: Path) -> None:
    sock = reachable / "agent.sock"
    pid = _start_shared(keyvault, sock, "agent_allow_groups = [4242]\n")
    try:
        done = _as(OTHER, OTHER, [sys.executable, "-c", RAW_CLIENT, str(sock),
                                  json.dumps({"v": 1, "op": "get", "service": "api",
                                              "username": "deploy"})], {}, groups="4242")
        assert json.loads(done.stdout).get("result") == "api-token", done.stdout
    finally:
        _stop(keyvault, {"KEYRING_HARDENED_AGENT_SOCK": str(sock)})
        _kill(pid)


def _member_of_some_group() -> tuple[pwd.struct_passwd, grp.struct_group] | None:
    for group in grp.getgrall():
        for member in group.gr_mem:
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam(member)
                if user.pw_uid not in (0, os.getuid()) and user.pw_gid != group.gr_gid:
                    return user, group
    return None


@needs_root
@pytest.mark.slow
def test_a_caller_that_dropped_the_group_is_not_served(keyvault: Path,
                                                       reachable: Path) -> None:
    found = _member_of_some_group()
    if found is None:
        pytest.skip("no user with a supplementary group in /etc/group")
    user, group = found
    sock = reachable / "agent.sock"
    pid = _start_shared(keyvault, sock, f"agent_allow_groups = [{group.gr_gid}]\n")
    try:
        done = _as(user.pw_uid, user.pw_gid, [sys.executable, "-c", RAW_CLIENT, str(sock),
                                               json.dumps({"v": 1, "op": "get", "service": "api",
                                                           "username": "deploy"})], {})
        answer = json.loads(done.stdout)
        assert answer["ok"] is False, f"{user.pw_name} without {group.gr_name} was served"
    finally:
        _stop(keyvault, {"KEYRING_HARDENED_AGENT_SOCK": str(sock)})
        _kill(pid)


# -- protocol -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_started_frame_must_arrive_within_ten_seconds(shared_agent: Path) -> None:
    body = json.dumps({"v": 1, "op": "ping"}).encode()
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    try:
        sock.connect(str(shared_agent / "agent.sock"))
        sock.sendall(struct.pack(">I", len(body)) + body[:3])
        time.sleep(11)
        with contextlib.suppress(OSError):
            sock.sendall(body[3:])
        try:
            answer = recv_frame(sock)
        except (OSError, ValueError):
            answer = None
        assert answer is None, "the agent waited more than 10 s for a started frame"
    finally:
        sock.close()


@needs_root
@pytest.mark.slow
def test_holding_many_connections_does_not_kill_the_agent(keyvault: Path,
                                                          reachable: Path) -> None:
    os.chmod(reachable, 0o700)
    sock = reachable / "agent.sock"
    pid = _start_shared(keyvault, sock, "", prefix=("prlimit", "--nofile=64:64"))
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while len(held) < 120 and time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2)
            try:
                s.connect(str(sock))
            except BlockingIOError:
                s.close()
                time.sleep(0.01)
                continue
            except OSError:
                s.close()
                break
            held.append(s)
        time.sleep(1)
        for s in held:
            s.close()
        held.clear()
        time.sleep(1)
        assert _alive(pid), "the agent died"
        assert _request(sock, {"v": 1, "op": "ping"})["result"] == "pong"
    finally:
        for s in held:
            s.close()
        _stop(keyvault, {"KEYRING_HARDENED_AGENT_SOCK": str(sock)})
        _kill(pid)


WRONG_TYPES: list[dict[str, Any]] = [
    {"op": "get", "service": "db", "username": "app", "version": v}
    for v in ("1", True, 10**30, [1], {"a": 1}, -1, 1.5, float("nan"))
] + [
    {"op": "set", "service": "t", "username": "u", "secret": "x", "ttl": t}
    for t in ("10", 10**400, -5, [1], float("nan"), float("inf"), True)
] + [
    {"op": "rollback", "service": "db", "username": "app", "to_version": t}
    for t in ("1", 10**30, [1], True, 0)
] + [
    {"op": "delete", "service": "nope", "username": "u", "purge": "yes"},
    {"op": "get", "service": ["db"], "username": "app"},
    {"op": "get", "service": "db", "username": None},
    {"op": "set", "service": "t", "username": "u", "secret": {"x": CANARY}},
    {"op": "history", "service": "db", "username": 5},
    {"op": "usernames", "service": {"a": 1}},
    {"op": "get", "service": "db" * 600000, "username": "app"},
]


@pytest.mark.slow
def test_wrong_types_are_usage_errors_and_never_show_a_secret(shared_agent: Path) -> None:
    path = shared_agent / "agent.sock"
    for doc in WRONG_TYPES:
        answer = _request(path, {"v": 1, **doc})
        assert answer["ok"] is False, doc
        assert answer["error"]["kind"] in ("usage", "not-found"), (doc, answer)
        assert answer["error"]["code"] in (1, 2)
        assert CANARY not in json.dumps(answer)
    for v in ("1", None, [1], 2, "v1"):
        answer = _request(path, {"v": v, "op": "get", "service": "db", "username": "app"})
        assert answer == {"v": 1, "ok": False, "error": {
            "kind": "usage", "code": 2, "reason": "agent-protocol",
            "message": "unknown protocol version (expected v 1)"}}
    # Nothing was written, nothing broke, the secret is where it was.
    assert _request(path, {"v": 1, "op": "get", "service": "db", "username": "app"})[
        "result"] == CANARY
    for row in _trail(shared_agent):
        assert CANARY not in json.dumps(row, default=str)
    status = _kh(shared_agent, "agent", "status", "--json")
    assert status.returncode == 0
    assert CANARY not in status.stdout + status.stderr


@pytest.mark.slow
def test_a_lone_surrogate_is_the_usage_error_of_direct_mode(shared_agent: Path) -> None:
    store = AgentStore(shared_agent / "agent.sock", Location.resolve(shared_agent))
    try:
        with pytest.raises(UsageError, match="lone surrogates"):
            store.set("bad\udc80", "u", "x")
    finally:
        store.close()


def _foreground(home: Path) -> subprocess.Popen[str]:
    agent = subprocess.Popen([sys.executable, "-m", "keyring_hardened", "agent", "run"],
                             env=_base_env(home, KEYRING_HARDENED_PASSPHRASE=PASSPHRASE),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert agent.stderr is not None
    assert agent.stderr.readline() == "ready\n"
    return agent


@pytest.fixture
def passvault(home: Path) -> Path:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("db", "app", CANARY)
        s.set("api", "deploy", "api-token")
    return home


def _junk_frames() -> list[bytes]:
    deep = b"[" * 200000
    return [struct.pack(">I", len(deep)) + deep,
            struct.pack(">I", 5) + b"\xff\xfe{}x",
            struct.pack(">I", 2**31),
            struct.pack(">I", 8) + b'{"v":1,',
            b"\x00\x00"]


def _send_junk(path: Path, frames: list[bytes]) -> None:
    for junk in frames:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(junk)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError, ValueError):
            recv_frame(sock)
        sock.close()


@pytest.mark.slow
def test_the_foreground_agents_stderr_never_shows_a_secret(passvault: Path) -> None:
    agent = _foreground(passvault)
    try:
        path = passvault / "agent.sock"
        _send_junk(path, _junk_frames())
        for doc in WRONG_TYPES[:6]:
            _request(path, {"v": 1, **doc})
        assert _request(path, {"v": 1, "op": "get", "service": "db", "username": "app"})[
            "result"] == CANARY
        assert _request(path, {"v": 1, "op": "stop"})["ok"] is True
        _, err = agent.communicate(timeout=30)
    finally:
        agent.kill()
        agent.wait()
    assert agent.returncode == 0
    assert CANARY not in err
    assert PASSPHRASE not in err


@pytest.mark.slow
def test_a_deeply_nested_frame_prints_no_traceback(passvault: Path) -> None:
    agent = _foreground(passvault)
    try:
        path = passvault / "agent.sock"
        _send_junk(path, _junk_frames()[:1])
        assert _request(path, {"v": 1, "op": "ping"})["result"] == "pong"
        _request(path, {"v": 1, "op": "stop"})
        _, err = agent.communicate(timeout=30)
    finally:
        agent.kill()
        agent.wait()
    assert "Traceback" not in err


# -- lifecycle and the passphrase ----------------------------------------------------------


@pytest.mark.slow
def test_agent_start_with_a_wrong_passphrase_exits_6_cleanly(passvault: Path) -> None:
    done = _kh(passvault, "agent", "start",
               env={"KEYRING_HARDENED_PASSPHRASE": "not the passphrase"})
    assert done.returncode == 6
    assert done.stdout == ""
    assert done.stderr == "keyring-hardened: error: wrong passphrase\n"
    assert not (passvault / "agent.sock").exists()
    none = _kh(passvault, "agent", "start")  # no passphrase anywhere, no terminal
    assert none.returncode == 6
    assert "needs a passphrase" in none.stderr
    assert "Traceback" not in none.stderr


@pytest.mark.slow
def test_wrong_agent_unlocks_count_in_the_unlock_throttle(passvault: Path) -> None:
    started = _kh(passvault, "agent", "start", env={"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE})
    assert started.returncode == 0, started.stderr
    path = passvault / "agent.sock"
    pid = _pid(path)
    try:
        assert _request(path, {"v": 1, "op": "lock"})["ok"] is True
        reasons = [_request(path, {"v": 1, "op": "unlock", "passphrase": f"guess {i}"})[
            "error"]["reason"] for i in range(6)]
        assert reasons == ["wrong-passphrase"] * 5 + ["unlock-throttled"]
        # Even the right passphrase waits now, as for any unlock.
        right = _request(path, {"v": 1, "op": "unlock", "passphrase": PASSPHRASE})
        assert right["error"]["reason"] == "unlock-throttled"
        with sqlite3.connect(passvault / "vault.db") as conn:
            assert conn.execute("SELECT failures FROM unlock_throttle").fetchone()[0] >= 5
        # The CLI says so with exit 6, and never echoes a guess.
        cli = _kh(passvault, "agent", "unlock", env={"KEYRING_HARDENED_PASSPHRASE": "guess 9"})
        assert cli.returncode == 6
        assert "guess 9" not in cli.stderr
    finally:
        _stop(passvault)
        _kill(pid)


@pytest.mark.slow
def test_lock_leaves_nothing_that_unlocks_without_the_passphrase(passvault: Path) -> None:
    started = _kh(passvault, "agent", "start", env={"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE})
    assert started.returncode == 0, started.stderr
    path = passvault / "agent.sock"
    pid = _pid(path)
    try:
        assert _request(path, {"v": 1, "op": "lock"})["ok"] is True
        answer = _request(path, {"v": 1, "op": "unlock"})
        state = _request(path, {"v": 1, "op": "status"})["result"]["state"]
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
        assert PASSPHRASE.encode() not in environ
        assert answer["ok"] is False
        assert state == "locked"
    finally:
        _stop(passvault)
        _kill(pid)


@pytest.mark.slow
def test_stop_mid_request_and_idle_lock_during_requests(passvault: Path) -> None:
    """The idle lock waits for a request in progress; stop answers, then the socket goes."""
    started = _kh(passvault, "agent", "start", "--idle-timeout", "2s",
                  env={"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE})
    assert started.returncode == 0, started.stderr
    path = passvault / "agent.sock"
    pid = _pid(path)
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(path))
        # Busy for longer than the idle timeout: never locked under a caller.
        end = time.monotonic() + 3
        while time.monotonic() < end:
            send_frame(sock, {"v": 1, "op": "get", "service": "db", "username": "app"})
            assert recv_frame(sock)["result"] == CANARY
            time.sleep(0.2)
        time.sleep(3)  # then idle: locked
        send_frame(sock, {"v": 1, "op": "get", "service": "db", "username": "app"})
        locked = recv_frame(sock)
        assert locked["error"]["reason"] == "agent-locked"
        assert CANARY not in json.dumps(locked)
        send_frame(sock, {"v": 1, "op": "stop"})
        assert recv_frame(sock)["ok"] is True
        sock.close()
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid)
        assert not path.exists()
    finally:
        _kill(pid)


def test_without_linux_peer_credentials_the_agent_refuses_to_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    opened: list[bool] = []
    with pytest.raises(ConfigError, match="peer credentials"):
        agent_mod.run(Location.resolve(tmp_path / "v"), tmp_path / "s.sock", 60.0, None,
                      lambda _p: opened.append(True))
    assert not opened  # refused before anything is unlocked


@needs_root
@pytest.mark.slow
def test_the_same_user_cannot_ptrace_the_agent(reachable: Path) -> None:
    base = reachable / "other"
    base.mkdir(mode=0o700)
    os.chown(base, OTHER, OTHER)
    env = {**_base_env(base / "vault"), "HOME": str(base)}
    assert _as(OTHER, OTHER, [sys.executable, "-m", "keyring_hardened", "init"],
               env).returncode == 0
    started = _as(OTHER, OTHER, [sys.executable, "-m", "keyring_hardened", "agent", "start"],
                  env)
    assert started.returncode == 0, started.stderr
    status = _as(OTHER, OTHER, [sys.executable, "-m", "keyring_hardened", "agent", "status",
                                "--json"], env)
    pid = int(json.loads(status.stdout)["pid"])
    try:
        attach = textwrap.dedent(f"""
            import ctypes, sys
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.ptrace(16, {pid}, 0, 0) == 0:  # PTRACE_ATTACH
                sys.exit("attached")
            print(ctypes.get_errno())
        """)
        done = _as(OTHER, OTHER, [sys.executable, "-c", attach], env)
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == 1  # EPERM
    finally:
        _as(OTHER, OTHER, [sys.executable, "-m", "keyring_hardened", "agent", "stop"], env)
        _kill(pid)
