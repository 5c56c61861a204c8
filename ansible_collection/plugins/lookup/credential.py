# Copyright: (c) 2026, keyring-hardened developers
# MIT License (see LICENSE or https://opensource.org/licenses/MIT)

from __future__ import annotations

DOCUMENTATION = r"""
name: credential
author: keyring-hardened developers (@keyring-hardened)
version_added: 0.1.0
short_description: Read credentials from a keyring-hardened vault
description:
  - Returns one secret per term from the keyring-hardened vault on the controller.
  - A term is a service name, with O(username) giving the user; or, for playbooks written for
    C(community.general.keyring), a C(service username) pair separated by white space.
  - Every read is recorded in the vault's tamper-evident audit trail under O(actor). Access
    policies and rate limits, once the vault enforces them, apply without a change here.
  - The value is returned exactly as stored, and never templated, so a secret holding
    C({{ }}) comes back literally. Unlike C(community.general.keyring), trailing white space
    is not stripped.
  - C(lookup) joins several values with commas; use C(query) (or O(ignore:wantlist=true)) to get
    a list.
options:
  _terms:
    description: Service names, or C(service username) pairs.
    required: true
    type: list
    elements: str
  username:
    description:
      - The username for every term. Without it, each term must be a C(service username) pair.
    type: str
    env:
      - name: KEYRING_HARDENED_USERNAME
    ini:
      - section: hardened_keyring
        key: username
    vars:
      - name: hardened_keyring_username
  version:
    description:
      - Read this kept version instead of the current one.
    type: int
    vars:
      - name: hardened_keyring_version
  on_missing:
    description:
      - What to do when a credential does not exist.
      - V(error) fails the task; V(warn) and V(ignore) return an empty string for that term,
        keeping the other terms in place, V(warn) with a warning.
    type: str
    default: error
    choices: [error, warn, ignore]
    env:
      - name: KEYRING_HARDENED_ON_MISSING
    ini:
      - section: hardened_keyring
        key: on_missing
    vars:
      - name: hardened_keyring_on_missing
extends_documentation_fragment:
  - hardened.keyring.store
seealso:
  - module: hardened.keyring.credential
"""

EXAMPLES = r"""
- name: Use a database password without showing it
  ansible.builtin.command: /usr/local/bin/migrate --password-stdin
  args:
    stdin: "{{ lookup('hardened.keyring.credential', 'db.example.com', username='app') }}"
  no_log: true

- name: Several secrets as a list (query, not lookup, which joins with commas)
  ansible.builtin.set_fact:
    api_tokens: "{{ query('hardened.keyring.credential', 'github', 'gitlab', username='deploy') }}"
  no_log: true

- name: Migrate from community.general.keyring by renaming the lookup
  ansible.builtin.debug:
    msg: "{{ lookup('hardened.keyring.credential', 'servicename username') | length }} characters"

- name: Loop without printing the values
  ansible.builtin.uri:
    url: "https://{{ item.host }}/health"
    url_password: "{{ lookup('hardened.keyring.credential', item.host, username='monitor') }}"
  loop: "{{ monitored_hosts }}"
  loop_control:
    label: "{{ item.host }}"
  no_log: true

- name: Tolerate a credential that is not there yet
  ansible.builtin.set_fact:
    maybe_token: "{{ lookup('hardened.keyring.credential', 'optional-api', username='ci',
                     on_missing='ignore') }}"
  no_log: true
"""

RETURN = r"""
_raw:
  description: One secret per term, in the order of the terms.
  type: list
  elements: str
"""

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase
from ansible.utils.display import Display
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hardened.keyring.plugins.plugin_utils.store import (
    is_store_error,
    open_store,
    reason,
)

display = Display()


class LookupModule(LookupBase):
    """hardened.keyring.credential: one secret per term."""

    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        username = self.get_option("username")
        version = self.get_option("version")
        on_missing = self.get_option("on_missing")
        home, actor = self.get_option("home"), self.get_option("actor")
        values = []
        for term in terms:
            if not isinstance(term, str):
                raise AnsibleLookupError(f"hardened.keyring.credential: term {term!r} is not "
                                         "a string")
            service, user = term, username
            if user is None:
                parts = term.split()
                if len(parts) != 2:
                    raise AnsibleLookupError(
                        f"hardened.keyring.credential: term {term!r} needs a username: pass "
                        "username=... or write the term as 'service username'")
                service, user = parts
            try:
                store = open_store(home, actor)
                secret = store.get(service, user, version=version).reveal()
            except Exception as exc:
                if not is_store_error(exc):
                    raise
                if getattr(exc, "kind", "") == "not-found" and on_missing != "error":
                    if on_missing == "warn":
                        display.warning(f"hardened.keyring.credential: term {term!r}: {exc}")
                    values.append("")
                    continue
                # from None: the cause's text and traceback add nothing and are not shown.
                raise AnsibleLookupError(f"hardened.keyring.credential: term {term!r}: "
                                         f"{reason(exc)}: {exc}") from None
            # Unsafe: the value is data, never a template, whatever it contains.
            values.append(wrap_var(secret))
        return values
