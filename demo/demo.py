"""``make demo``: the main job, end to end, on a throwaway vault.

Every step runs a real command (the ``keyring-hardened`` CLI, the ``keyring``
CLI, or Python calling ``keyring.get_password``) against a vault in a
temporary folder, and prints what a person would type and see. The folder is
removed at the end; nothing touches the user's own keyring.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent

PLAYBOOK = """\
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Read a credential (no_log keeps it out of the output)
      ansible.builtin.set_fact:
        api_token: "{{ lookup('hardened.keyring.credential', 'api.example.com deploy') }}"
      no_log: true
    - name: Show only its length
      ansible.builtin.debug:
        msg: "the token has {{ api_token | length }} characters"
    - name: Make sure a generated credential exists
      hardened.keyring.credential:
        service: generated.example.com
        username: ansible
        generate: {length: 24}
"""


def step(title: str) -> None:
    print(f"\n== {title}")


def run(argv: list[str], env: dict[str, str], stdin: str | None = None,
        expect: int = 0) -> str:
    if argv[0] == sys.executable and argv[1] == "-c" and '"' not in argv[2]:
        shown = f'python -c "{argv[2]}"'
    else:
        shown = shlex.join(argv)
    if stdin is not None and stdin.endswith("\n") and "\n" not in stdin[:-1]:
        shown = f"echo {shlex.quote(stdin[:-1])} | {shown}"
    elif stdin is not None:
        shown = f"printf %s {shlex.quote(stdin)} | {shown}"
    print(f"$ {shown}")
    exe = [str(BIN / argv[0]), *argv[1:]] if (BIN / argv[0]).exists() else argv
    done = subprocess.run(exe, input=stdin if stdin is not None else "", env=env,
                          capture_output=True, text=True, check=False)
    for stream in (done.stdout, done.stderr):
        if stream:
            print("  " + stream.rstrip("\n").replace("\n", "\n  "))
    if done.returncode != expect:
        raise SystemExit(f"demo failed: {shown} exited {done.returncode}, expected {expect}")
    if expect:
        print(f"  (exit {done.returncode}, as documented)")
    return done.stdout


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="keyring-hardened-demo-") as tmp:
        home = Path(tmp, "vault")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KEYRING_HARDENED_", "PYTHON_KEYRING"))}
        env["KEYRING_HARDENED_HOME"] = str(home)
        env["PYTHON_KEYRING_BACKEND"] = "keyring_hardened.backend.HardenedKeyring"
        print(f"Throwaway vault: KEYRING_HARDENED_HOME={home}")
        print("Backend: PYTHON_KEYRING_BACKEND=keyring_hardened.backend.HardenedKeyring")

        step("Create a vault (key-file mode)")
        run(["keyring-hardened", "init"], env)

        step("An existing app stores and reads a credential through keyring, unchanged")
        code = ("import keyring; keyring.set_password('db.example.com', 'app', 'first-s3cret'); "
                "print(keyring.get_password('db.example.com', 'app'))")
        out = run([sys.executable, "-c", code], env)
        assert out.strip() == "first-s3cret"

        step("The keyring CLI reads and writes the same vault")
        run(["keyring", "get", "db.example.com", "app"], env)
        run(["keyring", "set", "db.example.com", "app"], env, stdin="second-s3cret\n")
        run(["keyring", "get", "db.example.com", "app"], env)

        step("The admin CLI: secrets from a pipe, never argv")
        run(["keyring-hardened", "set", "api.example.com", "deploy"], env, stdin="token-123\n")
        run(["keyring-hardened", "list"], env)
        run(["keyring-hardened", "history", "db.example.com", "app"], env)

        step("Roll back to the previous version")
        run(["keyring-hardened", "rollback", "db.example.com", "app"], env)
        out = run(["keyring-hardened", "get", "db.example.com", "app"], env)
        assert out.strip() == "first-s3cret"

        step("Delete, see not-found (exit 1), then restore a kept version")
        run(["keyring-hardened", "delete", "api.example.com", "deploy"], env)
        run(["keyring-hardened", "get", "api.example.com", "deploy"], env, expect=1)
        run(["keyring-hardened", "rollback", "api.example.com", "deploy"], env)
        run(["keyring-hardened", "get", "api.example.com", "deploy"], env)

        step("Tampering is detected, never answered with a wrong secret (exit 3)")
        import sqlite3

        with sqlite3.connect(home / "vault.db") as conn:
            conn.execute("UPDATE secret_versions SET ciphertext = zeroblob(40) WHERE version = 1")
        run(["keyring-hardened", "get", "db.example.com", "app", "--version", "1"], env,
            expect=3)

        step("Ansible: install the collection, then read the credential in a playbook")
        collections = Path(tmp, "collections")
        source = Path(__file__).resolve().parent.parent / "ansible_collection"
        ansible_env = {**env, "ANSIBLE_COLLECTIONS_PATH": str(collections),
                       "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_NOCOLOR": "1",
                       "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
                       "ANSIBLE_HOME": str(Path(tmp, "ansible-home"))}
        run(["ansible-galaxy", "collection", "install", str(source), "-p", str(collections)],
            ansible_env)
        book = Path(tmp, "playbook.yml")
        book.write_text(PLAYBOOK, "utf-8")
        out = run(["ansible-playbook", "-i", "localhost,", str(book)], ansible_env)
        assert "ok=3" in out, out
        shown = run(["keyring-hardened", "audit", "show", "--actor", "*ansible*"], env)
        assert "ansible-playbook" in shown, shown

        step("Writing an old row back is detected too: the state is authenticated as a whole")
        with sqlite3.connect(home / "vault.db") as conn:
            old = conn.execute("SELECT * FROM credentials WHERE service = 'api.example.com'"
                               ).fetchone()
        run(["keyring-hardened", "set", "api.example.com", "deploy"], env, stdin="newer-token")
        with sqlite3.connect(home / "vault.db") as conn:
            marks = ", ".join("?" * len(old))
            conn.execute(f"REPLACE INTO credentials VALUES ({marks})", old)
        run(["keyring-hardened", "get", "api.example.com", "deploy"], env, expect=3)

        step("Status")
        run(["keyring-hardened", "status"], env)
        mode = oct((home / "master.key").stat().st_mode & 0o777)
        print(f"\nKey file mode {mode}; the throwaway vault is removed now.")
    print("demo: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
