# Copyright: (c) 2026, keyring-hardened developers
# MIT License (see LICENSE or https://opensource.org/licenses/MIT)
"""Unit tests of the action plugin, loaded through Ansible's plugin loader."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest

from ansible.errors import AnsibleActionFail
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import action_loader

from keyring_hardened.store import Store


def run(args, check=False, diff=False):
    task = MagicMock()
    task.args = args
    task.check_mode = check
    task.diff = diff
    task.async_val = 0
    task.action = "hardened.keyring.credential"
    action = action_loader.get("hardened.keyring.credential", task=task, connection=MagicMock(),
                               play_context=PlayContext(), loader=MagicMock(), templar=MagicMock(),
                               shared_loader_obj=None)
    assert action is not None
    return action.run(task_vars={})


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "vault"
    Store.init(path).close()
    return str(path)


def current(home, service="svc", username="u"):
    with Store.open(home) as store:
        return store.get(service, username).reveal()


def test_value_is_idempotent(home):
    args = {"service": "svc", "username": "u", "value": "one", "home": home}
    assert run(args)["changed"] is True
    assert run(args)["changed"] is False
    assert run({**args, "value": "two"})["version"] == 2
    assert current(home) == "two"


def test_generate_once_then_rotate(home):
    args = {"service": "svc", "username": "u", "generate": {"length": 20, "charset": "digits"},
            "home": home}
    first = run(args)
    assert (first["changed"], first["version"]) == (True, 1)
    value = current(home)
    assert len(value) == 20
    assert value.isdigit()
    assert run(args)["changed"] is False
    rotated = run({**args, "rotate": True})
    assert (rotated["changed"], rotated["version"]) == (True, 2)
    assert current(home) != value


def test_check_mode_and_diff_change_nothing(home):
    result = run({"service": "svc", "username": "u", "value": "secret-value", "home": home},
                 check=True, diff=True)
    assert result["changed"] is True
    assert "secret-value" not in repr(result)
    assert "(hidden)" in result["diff"]["after"]
    with Store.open(home) as store:
        assert store.credentials() == []


def test_absent(home):
    run({"service": "svc", "username": "u", "value": "x", "home": home})
    assert run({"service": "svc", "username": "u", "state": "absent", "home": home})["changed"] is True
    assert run({"service": "svc", "username": "u", "state": "absent", "home": home})["changed"] is False


def test_result_never_holds_the_value(home):
    result = run({"service": "svc", "username": "u", "value": "hunter2-canary", "home": home}, diff=True)
    assert "hunter2-canary" not in repr(result)


def test_bad_arguments(home):
    with pytest.raises(AnsibleActionFail):
        run({"service": "svc", "username": "u", "value": "x", "generate": {}, "home": home})
    with pytest.raises(AnsibleActionFail, match="length"):
        run({"service": "svc", "username": "u", "generate": {"length": 0}, "home": home})
