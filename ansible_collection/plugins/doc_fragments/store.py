# Copyright: (c) 2026, keyring-hardened developers
# MIT License (see LICENSE or https://opensource.org/licenses/MIT)
"""Options shared by the hardened.keyring plugins."""

from __future__ import annotations


class ModuleDocFragment:
    """Where the vault is and who is asking."""

    # For the lookup: each option also from env, ansible.cfg and variables.
    DOCUMENTATION = r"""
options:
  home:
    description:
      - The vault home on the controller.
      - Default is E(KEYRING_HARDENED_HOME), else keyring's data root plus C(hardened)
        (on Linux C(~/.local/share/python_keyring/hardened)).
    type: path
    ini:
      - section: hardened_keyring
        key: home
    vars:
      - name: hardened_keyring_home
  actor:
    description:
      - The name the vault's audit trail records for these reads, and that access policies match.
      - Default is E(KEYRING_HARDENED_ACTOR), else who and what as the keyring backend derives it,
        the OS user and the Ansible program, for example C(deploy:ansible-playbook).
    type: str
    env:
      - name: KEYRING_HARDENED_ANSIBLE_ACTOR
    ini:
      - section: hardened_keyring
        key: actor
    vars:
      - name: hardened_keyring_actor
notes:
  - Runs on the controller and needs the C(keyring-hardened) Python package installed for the
    Python that runs Ansible.
  - The vault is unlocked once per process. Ansible runs each task in a fresh worker process, so
    each task unlocks it again. In key-file mode that costs a few milliseconds; in passphrase mode
    it costs one Argon2id derivation (about 0.1 s at the default 64 MiB).
  - A passphrase vault takes its passphrase from E(KEYRING_HARDENED_PASSPHRASE) or the vault's
    C(passphrase_command); Ansible never prompts for it.
"""

    # For the controller-side module: the same options as task arguments.
    MODULE = r"""
options:
  home:
    description:
      - The vault home on the controller.
      - Default is E(KEYRING_HARDENED_HOME), else keyring's data root plus C(hardened).
    type: path
  actor:
    description:
      - The name the vault's audit trail records for these changes.
      - Default is E(KEYRING_HARDENED_ACTOR), else the OS user and the Ansible program, for
        example C(deploy:ansible-playbook).
    type: str
notes:
  - Runs on the controller, whatever the task's host, and needs the C(keyring-hardened) Python
    package installed for the Python that runs Ansible.
"""
