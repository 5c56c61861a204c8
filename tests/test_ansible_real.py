"""A real ansible-playbook run reading through keyring.get_password (issue 9 items 1 and 4).

ansible-core 2.19 runs lookups with stdin closed. A tiny lookup plugin that
does what community.general.keyring does (``keyring.get_password(service,
username)``) runs over this backend, proving the closed-stdin crash is gone,
and its audit actor matches the hardened.keyring lookup's.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from keyring_hardened.store import Store

from .conftest import CANARY
from .test_ansible import collections_path, playbook

__all__ = ["collections_path"]  # the session fixture, imported to be used here

pytestmark = pytest.mark.slow

#: What community.general.keyring's lookup does, minus its option handling.
KEYRING_LOOKUP = textwrap.dedent('''
    from ansible.errors import AnsibleError
    from ansible.plugins.lookup import LookupBase

    import keyring


    class LookupModule(LookupBase):
        def run(self, terms, variables=None, **kwargs):
            values = []
            for term in terms:
                service, username = term.split()
                secret = keyring.get_password(service, username)
                if secret is None:
                    raise AnsibleError(f"no secret for {term}")
                values.append(secret.rstrip())
            return values
''')


def test_keyring_get_password_under_ansible_playbook(collections_path: Path, home: Path,
                                                      tmp_path: Path) -> None:
    with Store.init(home) as store:
        store.set("db", "app", CANARY)
    plugins = tmp_path / "lookup_plugins"
    plugins.mkdir()
    (plugins / "viakeyring.py").write_text(KEYRING_LOOKUP)
    done = playbook(collections_path, home, """
        - name: read through keyring, as community.general.keyring does
          ansible.builtin.assert:
            that:
              - lookup('viakeyring', 'db app') == expected
              - lookup('hardened.keyring.credential', 'db', username='app') == expected
          no_log: true
    """, "-e", f"expected={CANARY}", env={
        "ANSIBLE_LOOKUP_PLUGINS": str(plugins),
        "PYTHON_KEYRING_BACKEND": "keyring_hardened.backend.HardenedKeyring",
    }, tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "closed file" not in done.stdout + done.stderr
    assert CANARY not in done.stdout + done.stderr
    with Store.open(home, actor="test") as store:
        actors = {e.actor for e in store.trail.show(op="read")}
    # Who and what, the same through the backend and through the collection.
    assert len(actors) == 1, actors
    (actor,) = actors
    assert actor.endswith(":ansible-playbook")
    assert not actor.startswith(":")
