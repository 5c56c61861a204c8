# Copyright: (c) 2026, keyring-hardened developers
# MIT License (see LICENSE or https://opensource.org/licenses/MIT)

from __future__ import annotations

DOCUMENTATION = r"""
module: credential
author: keyring-hardened developers (@keyring-hardened)
version_added: 0.1.0
short_description: Ensure a credential in the controller's keyring-hardened vault
description:
  - Creates, replaces, rotates or deletes a credential in the keyring-hardened vault on the
    Ansible controller. The work is done by an action plugin on the controller, whatever host
    the task targets; nothing is sent to the managed host.
  - Idempotent; supports check mode and diff mode. Diffs and results show versions and states,
    never values.
  - Read values back with the P(hardened.keyring.credential#lookup) lookup.
options:
  service:
    description: The credential's service.
    type: str
    required: true
  username:
    description: The credential's username.
    type: str
    required: true
  state:
    description:
      - V(present) makes sure the credential exists; V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  value:
    description:
      - The secret. Changes only when the stored value differs (or has expired).
      - Mutually exclusive with O(generate). Use C(no_log) on the task.
    type: str
  generate:
    description:
      - Generate a random secret when the credential does not exist or has expired (or on
        every run with O(rotate)). Used when neither O(value) nor O(generate) is given, too.
    type: dict
    suboptions:
      length:
        description: Number of characters.
        type: int
        default: 32
      charset:
        description:
          - Comma-separated character classes (V(ascii_letters), V(ascii_lowercase),
            V(ascii_uppercase), V(digits), V(hexdigits), V(punctuation)); any other item
            is taken as literal characters.
        type: str
        default: ascii_letters,digits
  rotate:
    description: Write a new generated version even though the credential exists.
    type: bool
    default: false
  ttl:
    description:
      - The new version expires after this long (V(90s), V(15m), V(12h), V(30d)); reads after
        that fail until a new value is set.
    type: str
  purge:
    description: With O(state=absent), also wipe every kept version (no rollback possible).
    type: bool
    default: false
extends_documentation_fragment:
  - hardened.keyring.store.module
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying the vault.
    support: full
  diff_mode:
    description: Will return details on what has changed (versions, not values).
    support: full
"""

EXAMPLES = r"""
- name: Store a known secret (changed only when it differs)
  hardened.keyring.credential:
    service: db.example.com
    username: app
    value: "{{ vault_db_password }}"
  no_log: true

- name: Make sure a random API token exists (created once, then left alone)
  hardened.keyring.credential:
    service: internal-api
    username: deploy
    generate:
      length: 40
      charset: ascii_letters,digits,-_

- name: Rotate it, with a 30-day lifetime
  hardened.keyring.credential:
    service: internal-api
    username: deploy
    rotate: true
    ttl: 30d

- name: Remove a credential and its history
  hardened.keyring.credential:
    service: old-service
    username: deploy
    state: absent
    purge: true
"""

RETURN = r"""
version:
  description: The credential's current version after the task (0 when absent).
  returned: always
  type: int
  sample: 3
state:
  description: The credential's state after the task.
  returned: always
  type: str
  sample: present
"""
