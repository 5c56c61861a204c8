# Copyright: (c) 2026, keyring-hardened developers
# MIT License (see LICENSE or https://opensource.org/licenses/MIT)
"""Action plugin behind the hardened.keyring.credential module: runs on the controller."""

from __future__ import annotations

import hmac
import secrets
import string

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.hardened.keyring.plugins.plugin_utils.store import (
    is_store_error,
    open_store,
    reason,
)

ARGUMENT_SPEC = {
    "service": {"type": "str", "required": True},
    "username": {"type": "str", "required": True},
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "value": {"type": "str", "no_log": True},
    "generate": {"type": "dict", "options": {
        "length": {"type": "int", "default": 32},
        "charset": {"type": "str", "default": "ascii_letters,digits"},
    }},
    "rotate": {"type": "bool", "default": False},
    "ttl": {"type": "str"},
    "purge": {"type": "bool", "default": False},
    "home": {"type": "path"},
    "actor": {"type": "str"},
}

CLASSES = ("ascii_letters", "ascii_lowercase", "ascii_uppercase", "digits", "hexdigits",
           "punctuation")


def _alphabet(charset):
    chars = []
    for item in charset.split(","):
        chars.append(getattr(string, item) if item in CLASSES else item)
    alphabet = "".join(dict.fromkeys("".join(chars)))  # unique, in order
    if not alphabet:
        raise AnsibleActionFail("generate.charset gives no characters")
    return alphabet


def _generate(spec):
    spec = spec or {}
    length = spec.get("length", 32)
    if not 1 <= length <= 4096:
        raise AnsibleActionFail("generate.length must be between 1 and 4096")
    alphabet = _alphabet(spec.get("charset") or "ascii_letters,digits")
    return "".join(secrets.choice(alphabet) for _index in range(length))


class ActionModule(ActionBase):
    """Ensure a credential in the controller's vault; never returns its value."""

    TRANSFERS_FILES = False
    _requires_connection = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(
            argument_spec=ARGUMENT_SPEC,
            mutually_exclusive=[("value", "generate"), ("value", "rotate")])
        try:
            result.update(self._ensure(args))
        except Exception as exc:  # pylint: disable=broad-exception-caught
            if not is_store_error(exc):
                raise
            raise AnsibleActionFail(f"hardened.keyring.credential: service "
                                    f"{args['service']!r}, user {args['username']!r}: "
                                    f"{reason(exc)}: {exc}") from None
        return result

    def _ensure(self, args):
        from keyring_hardened.config import parse_duration
        from keyring_hardened.errors import ExpiredError, NotFoundError

        store = open_store(args["home"], args["actor"])
        service, user = args["service"], args["username"]
        ttl = parse_duration(args["ttl"], "ttl") if args["ttl"] else None
        current, expired = None, False
        try:
            current = store.get(service, user).reveal()
        except ExpiredError:
            expired = True
        except NotFoundError:
            pass
        exists = current is not None or expired
        version = store.history(service, user)[0].version if exists else 0
        check = self._task.check_mode

        if args["state"] == "absent":
            changed = exists
            if changed and not check:
                store.delete(service, user, purge=args["purge"])
            return self._report(changed, exists, False, version, 0)

        if args["value"] is not None:
            # Constant time: the comparison is no oracle on the stored value.
            same = current is not None and hmac.compare_digest(
                current.encode("utf-8"), args["value"].encode("utf-8"))
            changed, new_value = not same, args["value"]
        else:
            changed = args["rotate"] or not exists or expired
            new_value = _generate(args["generate"]) if changed else None
        new_version = version
        if changed:
            new_version = version + 1
            if not check:
                new_version = store.set(service, user, new_value, ttl=ttl)
        return self._report(changed, exists, True, version, new_version)

    def _report(self, changed, existed, present, before, after):
        out = {"changed": changed, "state": "present" if present else "absent",
               "version": after if present else 0}
        if self._task.diff and changed:
            out["diff"] = {
                "before": (f"state: present\nversion: {before}\nvalue: (hidden)\n" if existed
                           else "state: absent\n"),
                "after": (f"state: present\nversion: {after}\nvalue: (hidden)\n" if present
                          else "state: absent\n"),
            }
        return out
