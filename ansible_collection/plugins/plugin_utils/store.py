# Copyright: (c) 2026, keyring-hardened developers
# MIT License (see LICENSE or https://opensource.org/licenses/MIT)
"""Controller-side helpers shared by the hardened.keyring plugins.

The keyring_hardened package is imported here, late and behind a guard, so a
controller without it gets one actionable error instead of a traceback. The
plugins call the store directly, never keyring.get_password, so the user's
global keyring settings cannot send them to another store.
"""

from __future__ import annotations

import os

from ansible.errors import AnsibleError

try:
    from keyring_hardened.agentproto import connect
    from keyring_hardened.errors import HardenedError
    from keyring_hardened.location import ENV_ACTOR, Location
    from keyring_hardened.location import default_actor as derived_actor
    from keyring_hardened.store import Store
except ImportError as exc:  # pragma: no cover - exercised by a test with the package hidden
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

INSTALL_HINT = ("install keyring-hardened on the Ansible controller, in the Python that runs "
                "ansible: python -m pip install keyring-hardened")

#: What each error class is called in messages.
REASONS = {
    "not-found": "not found",
    "usage": "bad input",
    "config": "configuration error",
    "integrity": "integrity failure",
    "denied": "denied by policy",
    "rate-limited": "rate limited",
    "locked": "vault locked",
    "expired": "expired",
    "storage": "storage error",
}

_stores = {}


def require_package():
    """Raise an actionable AnsibleError when keyring-hardened is not installed."""
    if IMPORT_ERROR is not None:
        raise AnsibleError(f"the hardened.keyring collection needs the keyring-hardened Python "
                           f"package: {INSTALL_HINT}")


def default_actor():
    """Who and what, as the keyring backend says it: ``user:ansible-playbook``.

    The OS user, and the Ansible program running (``ansible-playbook``,
    ``ansible``, ...; plain ``ansible`` when the plugin runs elsewhere, say
    in unit tests), so a read through this lookup and one through
    ``community.general.keyring`` over the keyring backend carry the same
    actor. ``KEYRING_HARDENED_ACTOR``, when set, wins here as it does there.
    """
    require_package()
    if os.environ.get(ENV_ACTOR):
        return derived_actor()
    user, _sep, program = derived_actor().rpartition(":")
    if not program.startswith("ansible"):
        program = "ansible"
    return f"{user}:{program}"


def open_store(home=None, actor=None):
    """The unlocked store for (home, actor), opened once per process."""
    require_package()
    actor = actor or default_actor()
    key = (os.path.abspath(os.path.expanduser(home)) if home else None, actor)
    store = _stores.get(key)
    if store is None:
        # An agent serving the vault does the work: the actor goes to it as
        # declared, and the agent records the identity the kernel gives it.
        store = connect(Location.resolve(home), declared=actor)
        if store is None:
            # No prompt: a worker process has no terminal. The passphrase, if any,
            # comes from KEYRING_HARDENED_PASSPHRASE or passphrase_command.
            store = Store.open(home, actor=actor)
        _stores[key] = store
    return store


def is_store_error(exc):
    """Whether ``exc`` is one of keyring-hardened's errors."""
    return IMPORT_ERROR is None and isinstance(exc, HardenedError)


def reason(exc):
    """The reason class of a store error, as messages name it."""
    return REASONS.get(getattr(exc, "kind", ""), "error")
