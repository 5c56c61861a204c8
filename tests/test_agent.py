"""The unlock agent, with real processes: one unlock, verified callers, the same door."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyring_hardened.agent import Peer, program_of
from keyring_hardened.agentproto import AgentStore, connect, recv_frame, send_frame
from keyring_hardened.errors import LockedError, NotFoundError
from keyring_hardened.location import Location
from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF, PASSPHRASE, run_cli
from .test_ansible import collections_path  # noqa: F401 - a fixture
from .test_robustness import OTHER, _other_tree, as_other

pytestmark = pytest.mark.slow


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KEYRING_HARDENED_PASSPHRASE"}
    env["KEYRING_HARDENED_HOME"] = str(home)
    env.update(extra)
    return env


def _start(home: Path, *args: str, passphrase: str | None = PASSPHRASE,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    extra = {"KEYRING_HARDENED_PASSPHRASE": passphrase} if passphrase else {}
    return subprocess.run([sys.executable, "-m", "keyring_hardened", "agent", "start", *args],
                          env={**_env(home, **extra), **(env or {})}, capture_output=True,
                          text=True, timeout=120, check=False)


def _agent_pid(home: Path) -> int:
    done = run_cli("agent", "status", "--json", home=home, env={})
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["pid"])


@pytest.fixture
def vault(home: Path) -> Path:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("db", "app", CANARY)
        s.set("api", "deploy", "api-token")
    return home


@pytest.fixture
def agent(vault: Path) -> Iterator[Path]:
    started = _start(vault, "--idle-timeout", "10m")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == str(vault / "agent.sock")
    yield vault
    run_cli("agent", "stop", home=vault)
    for _ in range(50):
        if not (vault / "agent.sock").exists():
            break
        time.sleep(0.1)


def _actors(home: Path) -> list[str]:
    with sqlite3.connect(home / "vault.db") as conn:
        return [a for a, in conn.execute("SELECT actor FROM audit_events WHERE op = 'read'")]


KEYRING_GET = textwrap.dedent("""
    import keyring
    from keyring_hardened.backend import HardenedKeyring
    keyring.set_keyring(HardenedKeyring())
    print(keyring.get_password("api", "deploy"))
""")


def test_every_surface_reads_through_the_agent_without_a_passphrase(agent: Path) -> None:
    env = _env(agent)  # no passphrase, no key file
    cli = run_cli("get", "api", "deploy", home=agent, env={})
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == "api-token\n"
    kr = subprocess.run([sys.executable, "-m", "keyring", "get", "api", "deploy"],
                        env={**env, "PYTHON_KEYRING_BACKEND":
                             "keyring_hardened.backend.HardenedKeyring"},
                        capture_output=True, text=True, timeout=60, check=False)
    assert kr.stdout == "api-token\n", kr.stderr
    api = subprocess.run([sys.executable, "-c", KEYRING_GET], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert api.stdout == "api-token\n", api.stderr
    # Writes, lists and the rest go through it too.
    assert run_cli("set", "new", "u", home=agent, stdin="v1", env={}).returncode == 0
    listed = run_cli("list", "--json", home=agent, env={})
    assert {c["service"] for c in json.loads(listed.stdout)} == {"db", "api", "new"}
    assert run_cli("history", "new", "u", home=agent, env={}).returncode == 0
    assert run_cli("get", "nope", "u", home=agent, env={}).returncode == 1
    # The trail names each caller as the kernel does: user and program.
    actors = _actors(agent)
    assert "root:keyring_hardened" in actors  # python -m keyring_hardened
    assert "root:keyring" in actors           # python -m keyring
    assert "root:python3.11 -c" in actors or any(a.endswith(" -c") for a in actors)
    assert CANARY not in cli.stderr + kr.stderr + api.stderr


def test_declared_actor_is_recorded_beside_and_policies_judge_the_verified(agent: Path) -> None:
    config = agent / "config.toml"
    config.write_text('default_policy = "deny"\n[[policies]]\nactors = ["ci-*"]\n'
                      'services = ["*"]\nallow = ["read"]\n')
    config.chmod(0o600)
    declared = {"KEYRING_HARDENED_ACTOR": "ci-runner"}
    # The agent read its config when it unlocked: restart it to take the policy.
    assert run_cli("agent", "stop", home=agent).returncode == 0
    assert _start(agent).returncode == 0
    denied = run_cli("get", "api", "deploy", home=agent, env=declared)
    assert denied.returncode == 4, denied.stderr
    assert "root:keyring_hardened" in denied.stderr  # judged as who it is
    config.write_text("agent_trust_declared_actor = true\n" + config.read_text())
    assert run_cli("agent", "stop", home=agent).returncode == 0
    assert _start(agent).returncode == 0
    trusted = run_cli("get", "api", "deploy", home=agent, env=declared)
    assert trusted.returncode == 0, trusted.stderr
    assert any(a == "root:keyring_hardened (declared ci-runner)" for a in _actors(agent))


def test_lock_unlock_status_and_a_second_start(agent: Path) -> None:
    assert run_cli("agent", "lock", home=agent).returncode == 0
    locked = run_cli("get", "api", "deploy", home=agent, env={})
    assert locked.returncode == 6
    assert "agent is locked" in locked.stderr
    status = json.loads(run_cli("agent", "status", "--json", home=agent).stdout)
    assert status["state"] == "locked"
    unlocked = run_cli("agent", "unlock", home=agent,
                       env={"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE})
    assert unlocked.returncode == 0, unlocked.stderr
    assert run_cli("get", "api", "deploy", home=agent, env={}).stdout == "api-token\n"
    wrong = run_cli("agent", "unlock", home=agent,
                    env={"KEYRING_HARDENED_PASSPHRASE": "not it at all"})
    assert wrong.returncode == 0  # already unlocked: nothing to do
    second = _start(agent)
    assert second.returncode == 2
    assert "already serves" in second.stderr


def test_idle_timeout_locks(vault: Path) -> None:
    assert _start(vault, "--idle-timeout", "4s").returncode == 0
    try:
        assert run_cli("get", "api", "deploy", home=vault, env={}).returncode == 0
        time.sleep(6)
        done = run_cli("get", "api", "deploy", home=vault, env={})
        assert done.returncode == 6
        assert "agent is locked" in done.stderr
    finally:
        run_cli("agent", "stop", home=vault)


def test_a_killed_agent_leaves_a_socket_clients_notice(agent: Path) -> None:
    os.kill(_agent_pid(agent), signal.SIGKILL)
    time.sleep(0.5)
    assert (agent / "agent.sock").exists()  # the dead socket
    done = run_cli("get", "api", "deploy", home=agent, env={})
    assert done.returncode == 6
    assert "agent at" in done.stderr
    assert "is not running; start it: keyring-hardened agent start" in done.stderr
    again = _start(agent)  # replaces the stale socket
    assert again.returncode == 0, again.stderr
    assert run_cli("get", "api", "deploy", home=agent, env={}).stdout == "api-token\n"


def test_key_file_mode_falls_back_to_direct_after_a_kill(home: Path) -> None:
    with Store.init(home) as s:
        s.set("svc", "u", "v")
    assert _start(home, passphrase=None).returncode == 0
    os.kill(_agent_pid(home), signal.SIGKILL)
    time.sleep(0.5)
    done = run_cli("get", "svc", "u", home=home, env={})
    assert done.returncode == 0
    assert done.stdout == "v\n"


WRITER = textwrap.dedent("""
    import sys
    from keyring_hardened.agentproto import connect
    from keyring_hardened.location import Location
    store = connect(Location.resolve(sys.argv[1]))
    for i in range(100000):
        store.set("w", f"u{i}", f"value-{i}")
        print(i, flush=True)
""")


def test_kill_9_of_the_agent_mid_write_loses_no_acknowledged_write(agent: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(agent)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(agent))
    assert writer.stdout is not None
    acked = [writer.stdout.readline() for _ in range(30)]
    os.kill(_agent_pid(agent), signal.SIGKILL)
    out, err = writer.communicate(timeout=60)
    assert writer.returncode != 0
    assert "agent at" in err  # the writer was told, not left hanging
    done = [int(x) for x in acked + out.split() if x.strip()]
    assert len(done) >= 30
    with Store.open(agent, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        for i in done:
            assert s.get("w", f"u{i}").reveal() == f"value-{i}"
        assert s.trail.verify().ok


def _raw(agent: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(agent / "agent.sock"))
    return sock


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, b: struct.pack(">I", n) + b, st.integers(0, 2**32 - 1),
              st.binary(max_size=32)),
    st.builds(lambda d: (lambda b: struct.pack(">I", len(b)) + b)(
        json.dumps(d).encode()), st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(
                st.sampled_from(["v", "op", "service", "username", "secret", "version"]),
                c, max_size=4), max_leaves=8)),
))
def test_fuzzed_requests_never_stop_the_agent(agent: Path, junk: bytes) -> None:
    sock = _raw(agent)
    try:
        sock.settimeout(2)
        sock.sendall(junk)
        sock.shutdown(socket.SHUT_WR)
        try:
            answer = recv_frame(sock)
        except (OSError, ValueError):
            answer = None
        if answer is not None:  # an answer is always a well-formed one
            assert answer["v"] == 1
            assert answer["ok"] in (True, False)
    finally:
        sock.close()
    good = _raw(agent)
    try:
        send_frame(good, {"v": 1, "op": "ping"})
        assert recv_frame(good) == {"v": 1, "ok": True, "result": "pong"}
    finally:
        good.close()


def test_slow_and_huge_requests_are_cut_off(agent: Path) -> None:
    huge = _raw(agent)
    huge.sendall(struct.pack(">I", 2**31))  # announces 2 GiB
    try:
        answer = recv_frame(huge)
    except (ValueError, OSError):
        answer = None
    assert answer is None  # dropped, not answered after reading 2 GiB
    huge.close()
    slow = _raw(agent)
    slow.sendall(struct.pack(">I", 10) + b"{")  # then nothing: the agent waits, others go on
    assert run_cli("get", "api", "deploy", home=agent, env={}).returncode == 0
    slow.close()


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A root-owned folder the other user can reach (not under pytest's 0700 tree)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kh-agent-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_another_uid_is_refused_unless_allowed(vault: Path, reachable: Path) -> None:
    shared = reachable
    sock = shared / "agent.sock"
    config = vault / "config.toml"
    config.write_text("agent_allow_users = []\n")
    config.chmod(0o600)
    env = {"KEYRING_HARDENED_AGENT_SOCK": str(sock)}
    assert _start(vault, env=env).returncode == 2  # allowing nobody else: folder must be 0700
    os.chmod(shared, 0o700)
    assert _start(vault, env=env).returncode == 0
    try:
        other_env = {**_env(vault), **env}
        reached = as_other([sys.executable, "-m", "keyring_hardened", "get", "api", "deploy"],
                           other_env)
        assert reached.returncode == 6  # cannot even reach the socket
        assert "no agent socket at" in reached.stderr
    finally:
        run_cli("agent", "stop", home=vault, env=env)
    os.chmod(shared, 0o711)
    config.write_text(f"agent_allow_users = [{OTHER + 1}]\n")  # someone else
    assert _start(vault, env=env).returncode == 0
    try:
        refused = as_other([sys.executable, "-m", "keyring_hardened", "get", "api", "deploy"],
                           other_env)
        assert refused.returncode == 6, refused.stderr
        assert f"uid {OTHER} may not use this agent" in refused.stderr
    finally:
        run_cli("agent", "stop", home=vault, env=env)
    config.write_text(f"agent_allow_users = [{OTHER}]\n")
    assert _start(vault, env=env).returncode == 0
    try:
        served = as_other([sys.executable, "-m", "keyring_hardened", "get", "api", "deploy"],
                          other_env)
        assert served.returncode == 0, served.stderr
        assert served.stdout == "api-token\n"
        for control in ("stop", "lock", "status"):  # credentials, not the agent itself
            tried = as_other([sys.executable, "-m", "keyring_hardened", "agent", control],
                             other_env)
            assert tried.returncode == 4, tried.stderr
            assert "only the agent's own user" in tried.stderr
        assert run_cli("agent", "status", home=vault, env=env).returncode == 0
    finally:
        run_cli("agent", "stop", home=vault, env=env)
    assert any(a.startswith("nobody:") for a in _actors(vault))


def test_the_agent_is_not_dumpable(tmp_path: Path) -> None:
    # Run as an unprivileged user: root may read any process's memory anyway.
    base = _other_tree(tmp_path)
    home = base / "vault"
    env = {**os.environ, "KEYRING_HARDENED_HOME": str(home), "HOME": str(base)}
    env.pop("KEYRING_HARDENED_PASSPHRASE", None)
    assert as_other([sys.executable, "-m", "keyring_hardened", "init"], env).returncode == 0
    started = as_other([sys.executable, "-m", "keyring_hardened", "agent", "start"], env)
    assert started.returncode == 0, started.stderr
    try:
        status = as_other([sys.executable, "-m", "keyring_hardened", "agent", "status",
                           "--json"], env)
        pid = json.loads(status.stdout)["pid"]
        # Not dumpable: the kernel makes its /proc files root's, and the same
        # user's other processes cannot read its memory.
        assert os.stat(f"/proc/{pid}/mem").st_uid == 0
        peek = as_other([sys.executable, "-c", f"open('/proc/{pid}/mem', 'rb')"], env)
        assert peek.returncode != 0
        assert "Permission denied" in peek.stderr or "Operation not permitted" in peek.stderr
        with open(f"/proc/{pid}/limits") as f:
            core = next(line for line in f if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]
    finally:
        as_other([sys.executable, "-m", "keyring_hardened", "agent", "stop"], env)


def test_program_names_from_the_kernel() -> None:
    assert program_of("/usr/bin/python3.11", ["python3", "/home/a/bin/keyring", "get"]) \
        == "keyring"
    assert program_of("/usr/bin/python3.11", ["python3", "-m", "pkg", "x"]) == "pkg"
    assert program_of("/usr/bin/python3.11", ["python3", "-mpkg"]) == "pkg"
    assert program_of("/usr/bin/python3.11", ["python3", "-c", "print()"]) == "python3.11 -c"
    assert program_of("/usr/bin/python3.11", ["python3", "-W", "error", "-u", "s.py"]) == "s.py"
    assert program_of("/usr/bin/python3.11", ["python3"]) == "python3.11"
    assert program_of("/usr/bin/ansible-playbook", ["ansible-playbook"]) == "ansible-playbook"
    assert Peer(1, 2, 3).uid == 2


def test_no_agent_means_direct_mode(vault: Path) -> None:
    assert connect(Location.resolve(vault)) is None
    store = AgentStore(vault / "agent.sock", Location.resolve(vault))
    with pytest.raises(LockedError, match="did not answer"):
        store.get("api", "deploy")
    with pytest.raises(NotFoundError):
        Store.open(vault, passphrase=PASSPHRASE, config=FAST_KDF).get("nope", "x")


def test_an_ansible_lookup_reads_through_the_agent(collections_path: Path,  # noqa: F811
                                                   agent: Path) -> None:
    from .test_ansible import playbook

    tasks = """
        - ansible.builtin.debug:
            msg: "{{ lookup('hardened.keyring.credential', 'api', username='deploy') }}"
    """
    done = playbook(collections_path, agent, tasks)  # no passphrase anywhere
    assert done.returncode == 0, done.stdout + done.stderr
    assert "api-token" in done.stdout
    # Verified from the kernel, with the plugin's actor recorded as declared.
    assert any(a.startswith("root:ansible") and "(declared root:ansible" in a
               for a in _actors(agent)), _actors(agent)


def test_max_lifetime_stops_the_agent(vault: Path) -> None:
    assert _start(vault, "--max-lifetime", "3s").returncode == 0
    assert run_cli("agent", "status", home=vault).returncode == 0
    for _ in range(100):
        if not (vault / "agent.sock").exists():
            break
        time.sleep(0.1)
    assert not (vault / "agent.sock").exists()
    gone = run_cli("agent", "status", home=vault)
    assert gone.returncode == 6
    assert "did not answer" in gone.stderr


def test_a_rekey_elsewhere_locks_the_agent(agent: Path) -> None:
    rekeyed = run_cli("key", "rekey", "--passphrase", home=agent,
                      env={"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE,
                           "KEYRING_HARDENED_NEW_PASSPHRASE": "a brand new passphrase"})
    assert rekeyed.returncode == 0, rekeyed.stderr
    done = run_cli("get", "api", "deploy", home=agent, env={})
    assert done.returncode == 6
    assert "rekeyed" in done.stderr
    assert "agent unlock" in done.stderr
    assert json.loads(run_cli("agent", "status", "--json", home=agent).stdout)["state"] \
        == "locked"
