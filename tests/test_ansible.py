"""The hardened.keyring collection, end to end: real ansible-playbook, ansible-doc, ansible-test."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keyring_hardened.store import Store

from .conftest import CANARY, FAST_KDF, PASSPHRASE

ROOT = Path(__file__).resolve().parent.parent
COLLECTION = ROOT / "ansible_collection"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _tool(name: str) -> str:
    exe = BIN / name
    if not exe.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}; run make test")
    return str(exe)


@pytest.fixture(scope="session")
def collections_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection installed the documented way."""
    path = tmp_path_factory.mktemp("collections")
    done = subprocess.run([_tool("ansible-galaxy"), "collection", "install", str(COLLECTION),
                           "-p", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (path / "ansible_collections" / "hardened" / "keyring" / "galaxy.yml").exists() or \
        (path / "ansible_collections" / "hardened" / "keyring" / "MANIFEST.json").exists()
    return path


@pytest.fixture
def vault(home: Path) -> Path:
    with Store.init(home) as store:
        store.set("db", "app", CANARY)
        store.set("api", "deploy", "api-token")
        store.set("templated", "app", "{{ lookup('env','HOME') }}")
        store.set("spaced", "app", "value with trailing space ")
    return home


def _env(collections_path: Path, home: Path, extra: dict[str, str] | None = None
         ) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "ANSIBLE_COLLECTIONS_PATH": str(collections_path),
        "KEYRING_HARDENED_HOME": str(home),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_LOCAL_TEMP": str(home.parent / "ansible-tmp"),
        "ANSIBLE_HOME": str(home.parent / "ansible-home"),
    })
    env.update(extra or {})
    return env


def playbook(collections_path: Path, home: Path, tasks: str, *args: str,
             env: dict[str, str] | None = None, tmp: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    """Run a one-play playbook against localhost (connection local)."""
    book = (tmp or home.parent) / "playbook.yml"
    book.write_text("- hosts: localhost\n  connection: local\n  gather_facts: false\n"
                    "  tasks:\n" + textwrap.indent(textwrap.dedent(tasks), "    "))
    return subprocess.run([_tool("ansible-playbook"), "-i", "localhost,", str(book), *args],
                          env=_env(collections_path, home, env), capture_output=True,
                          text=True, check=False, timeout=300)


def test_lookup_reads_terms_and_forms(collections_path: Path, vault: Path) -> None:
    done = playbook(collections_path, vault, """
        - name: one term, and several with query and lookup
          ansible.builtin.assert:
            that:
              - lookup('hardened.keyring.credential', 'api', username='deploy') == 'api-token'
              - query('hardened.keyring.credential', 'api deploy', 'spaced app')
                == ['api-token', 'value with trailing space ']
              - lookup('hardened.keyring.credential', 'api deploy', 'api deploy')
                == 'api-token,api-token'
              - lookup('hardened.keyring.credential', 'templated', username='app')
                == "{{ '{{' }} lookup('env','HOME') {{ '}}' }}"
              - lookup('hardened.keyring.credential', 'nope', username='x', on_missing='ignore')
                == ''
          no_log: true
        - name: a secret holding a template comes back literally
          ansible.builtin.copy:
            content: "{{ lookup('hardened.keyring.credential', 'templated app') }}"
            dest: "{{ out }}"
            mode: "0600"
    """, "-e", f"out={vault.parent / 'out.txt'}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (vault.parent / "out.txt").read_text() == "{{ lookup('env','HOME') }}"
    assert CANARY not in done.stdout + done.stderr
    with Store.open(vault) as store:
        assert store.trail.show(actor="*:ansible-playbook", op="read")


def test_on_missing_modes(collections_path: Path, vault: Path) -> None:
    warn = playbook(collections_path, vault, """
        - ansible.builtin.debug:
            msg: "[{{ lookup('hardened.keyring.credential', 'nope', username='x',
                              on_missing='warn') }}]"
    """)
    assert warn.returncode == 0, warn.stdout
    assert "[WARNING]" in warn.stdout + warn.stderr
    assert "'nope'" in warn.stdout + warn.stderr
    error = playbook(collections_path, vault, """
        - ansible.builtin.debug:
            msg: "{{ lookup('hardened.keyring.credential', 'nope', username='x') }}"
    """)
    assert error.returncode == 2
    assert "term 'nope': not found" in error.stdout
    assert "Traceback" not in error.stdout + error.stderr
    by_env = playbook(collections_path, vault, """
        - ansible.builtin.debug:
            msg: "[{{ lookup('hardened.keyring.credential', 'nope', username='x') }}]"
    """, env={"KEYRING_HARDENED_ON_MISSING": "ignore"})
    assert by_env.returncode == 0
    assert "[]" in by_env.stdout


def test_locked_and_tampered_fail_clearly(collections_path: Path, home: Path) -> None:
    with Store.init(home, passphrase_mode=True, passphrase=PASSPHRASE, config=FAST_KDF) as s:
        s.set("db", "app", CANARY)
        s.set("other", "app", "x")
    tasks = """
        - ansible.builtin.debug:
            msg: "{{ lookup('hardened.keyring.credential', 'db app') }}"
    """
    locked = playbook(collections_path, home, tasks,
                      env={"KEYRING_HARDENED_PASSPHRASE": "wrong passphrase"})
    assert locked.returncode == 2
    assert "term 'db app': vault locked: wrong passphrase" in locked.stdout
    ok = playbook(collections_path, home, tasks, env={"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE})
    assert ok.returncode == 0, ok.stdout
    with sqlite3.connect(home / "vault.db") as conn:
        conn.execute("UPDATE secret_versions SET ciphertext = zeroblob(40) WHERE credential_id ="
                     " (SELECT id FROM credentials WHERE service = 'db')")
    tampered = playbook(collections_path, home, tasks,
                        env={"KEYRING_HARDENED_PASSPHRASE": PASSPHRASE})
    assert tampered.returncode == 2
    assert "term 'db app': integrity failure" in tampered.stdout
    for done in (locked, tampered):
        assert CANARY not in done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr


def test_canary_hidden_with_no_log_at_vvv(collections_path: Path, vault: Path) -> None:
    done = playbook(collections_path, vault, """
        - name: use the secret
          ansible.builtin.set_fact:
            password: "{{ lookup('hardened.keyring.credential', 'db', username='app') }}"
          no_log: true
        - name: loop with a label
          ansible.builtin.debug:
            msg: "{{ item }} has {{ password | length }} characters"
          loop: [a, b]
          loop_control:
            label: "{{ item }}"
          no_log: true
        - name: fail on purpose
          ansible.builtin.command: "false {{ password }}"
          no_log: true
          ignore_errors: true
    """, "-vvv")
    assert done.returncode == 0, done.stdout[-3000:]
    assert CANARY not in done.stdout + done.stderr


def test_missing_package_is_actionable(collections_path: Path, vault: Path,
                                       tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "keyring_hardened":
                    raise ImportError("keyring_hardened hidden for a test")
        sys.meta_path.insert(0, Block())
    """))
    done = playbook(collections_path, vault, """
        - ansible.builtin.debug:
            msg: "{{ lookup('hardened.keyring.credential', 'db app') }}"
    """, env={"PYTHONPATH": str(blocker)})
    assert done.returncode == 2
    assert "install keyring-hardened on the Ansible controller" in done.stdout


def test_credential_module(collections_path: Path, vault: Path) -> None:
    tasks = """
        - name: create from a value
          hardened.keyring.credential: {service: app, username: u, value: "first-value"}
          no_log: true
          register: created
        - name: same value again
          hardened.keyring.credential: {service: app, username: u, value: "first-value"}
          no_log: true
          register: same
        - name: generated once
          hardened.keyring.credential:
            service: gen
            username: u
            generate: {length: 24, charset: "digits"}
          register: gen1
        - name: generated again is unchanged
          hardened.keyring.credential: {service: gen, username: u, generate: {length: 24}}
          register: gen2
        - name: check mode predicts a rotation but does not write
          hardened.keyring.credential: {service: gen, username: u, rotate: true}
          check_mode: true
          register: predicted
        - name: rotate with a TTL
          hardened.keyring.credential: {service: gen, username: u, rotate: true, ttl: 30d}
          register: rotated
        - name: absent
          hardened.keyring.credential: {service: app, username: u, state: absent}
          register: removed
        - name: absent again
          hardened.keyring.credential: {service: app, username: u, state: absent}
          register: removed_again
        - ansible.builtin.assert:
            that:
              - created is changed and created.version == 1
              - same is not changed
              - gen1 is changed and gen2 is not changed
              - predicted is changed and predicted.version == 2
              - rotated is changed and rotated.version == 2
              - removed is changed and removed_again is not changed
              - lookup('hardened.keyring.credential', 'gen u') | length == 32
    """
    done = playbook(collections_path, vault, tasks, "--diff")
    assert done.returncode == 0, done.stdout[-4000:]
    assert "value: (hidden)" in done.stdout
    assert "first-value" not in done.stdout
    with Store.open(vault) as store:
        gen = store.history("gen", "u")
        assert [v.version for v in gen] == [2, 1]
        assert gen[0].expires_at is not None
        assert store.usernames("app") == []


def test_module_check_mode_writes_nothing(collections_path: Path, vault: Path) -> None:
    done = playbook(collections_path, vault, """
        - hardened.keyring.credential: {service: new, username: u, value: "v"}
          no_log: true
    """, "--check")
    assert done.returncode == 0, done.stdout
    assert "changed=1" in done.stdout
    with Store.open(vault) as store:
        assert store.usernames("new") == []


def test_ansible_doc_renders(collections_path: Path, vault: Path) -> None:
    env = _env(collections_path, vault)
    lookup = subprocess.run([_tool("ansible-doc"), "-t", "lookup",
                             "hardened.keyring.credential"], env=env, capture_output=True,
                            text=True, check=False)
    assert lookup.returncode == 0, lookup.stderr
    assert "on_missing" in lookup.stdout
    assert "hardened_keyring" in lookup.stdout
    module = subprocess.run([_tool("ansible-doc"), "hardened.keyring.credential"], env=env,
                            capture_output=True, text=True, check=False)
    assert module.returncode == 0, module.stderr
    assert "rotate" in module.stdout


@pytest.fixture(scope="session")
def ansible_test_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real copy of the collection at ansible_collections/hardened/keyring, in git."""
    root = tmp_path_factory.mktemp("ansible-test") / "ansible_collections" / "hardened"
    tree = root / "keyring"
    shutil.copytree(COLLECTION, tree, ignore=shutil.ignore_patterns("output", "__pycache__"))
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    return tree


def _ansible_test_env() -> dict[str, str]:
    """HOME for ansible-test: a cache kept between runs, with the offline pip bootstrap."""
    home = ROOT / ".ansible-test-home"
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    source = (Path(sys.executable).parent.parent / "lib" /
              f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" /
              "ansible_test" / "_internal" / "python_requirements.py")
    found = re.search(r"pip='([\d.]+)'", source.read_text("utf-8"))
    assert found, "cannot tell which pip ansible-test bootstraps"
    standin = COLLECTION / "tests" / "support" / "get_pip_standin.py"
    shutil.copyfile(standin, cache / f"get_pip_{found.group(1).replace('.', '_')}.py")
    return {**os.environ, "HOME": str(home)}


def test_ansible_test_sanity(ansible_test_tree: Path) -> None:
    done = subprocess.run([_tool("ansible-test"), "sanity", "--python",
                           f"{sys.version_info.major}.{sys.version_info.minor}", "--local"],
                          cwd=ansible_test_tree, env=_ansible_test_env(), capture_output=True,
                          text=True, check=False, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]


def test_ansible_test_units(ansible_test_tree: Path) -> None:
    done = subprocess.run([_tool("ansible-test"), "units", "--python",
                           f"{sys.version_info.major}.{sys.version_info.minor}", "--local"],
                          cwd=ansible_test_tree, env=_ansible_test_env(), capture_output=True,
                          text=True, check=False, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert re.search(r"\d+ passed", done.stdout)


def test_lookup_ignores_the_controllers_keyring_settings(collections_path: Path, vault: Path,
                                                         tmp_path: Path) -> None:
    # The lookup calls the core, never keyring.get_password: a keyring backend
    # chosen by environment or keyringrc cannot redirect it to another store.
    cfg = tmp_path / "keyring-config"
    cfg.mkdir()
    (cfg / "keyringrc.cfg").write_text("[backend]\ndefault-keyring=keyring.backends.fail.Keyring\n")
    done = playbook(collections_path, vault, """
        - ansible.builtin.assert:
            that: lookup('hardened.keyring.credential', 'api', username='deploy') == 'api-token'
    """, env={"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
              "XDG_CONFIG_HOME": str(tmp_path), "KEYRING_PROPERTY_HOME": "/nonexistent"})
    assert done.returncode == 0, done.stdout + done.stderr
