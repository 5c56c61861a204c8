# Copyright: (c) 2026, keyring-hardened developers
# MIT License (see LICENSE or https://opensource.org/licenses/MIT)
"""Unit tests of the lookup, loaded through Ansible's plugin loader."""

from __future__ import annotations

import pytest

from ansible.errors import AnsibleLookupError
from ansible.plugins.loader import lookup_loader
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar

try:
    from ansible.template import trust_as_template
except ImportError:  # ansible-core before 2.19 templates every string it is given
    def trust_as_template(value):
        return value

from keyring_hardened.store import Store

CANARY = "canary-unit-lookup-DO-NOT-LEAK"


@pytest.fixture
def vault(tmp_path, monkeypatch):
    monkeypatch.delenv("KEYRING_HARDENED_PASSPHRASE", raising=False)
    home = tmp_path / "vault"
    with Store.init(home) as store:
        store.set("db", "app", CANARY)
        store.set("templated", "app", "{{ lookup('env', 'HOME') }}")
        store.set("spaced", "app", "  trailing  ")
    return str(home)


@pytest.fixture
def lookup():
    plugin = lookup_loader.get("hardened.keyring.credential")
    assert plugin is not None
    return plugin


def test_one_value_per_term(lookup, vault):
    assert lookup.run(["db", "spaced"], {}, username="app", home=vault) == [CANARY, "  trailing  "]


def test_community_general_term_form(lookup, vault):
    assert lookup.run(["db app"], {}, home=vault) == [CANARY]


def test_values_are_never_templated(lookup, vault):
    value = lookup.run(["templated"], {}, username="app", home=vault)[0]
    assert value == "{{ lookup('env', 'HOME') }}"
    templar = Templar(loader=DataLoader(), variables={"secret": value})
    assert templar.template(trust_as_template("{{ secret }}")) == "{{ lookup('env', 'HOME') }}"


def test_missing_term(lookup, vault):
    with pytest.raises(AnsibleLookupError, match="term 'nope': not found"):
        lookup.run(["nope"], {}, username="app", home=vault)
    assert lookup.run(["nope", "db"], {}, username="app", home=vault, on_missing="ignore") == ["", CANARY]
    assert lookup.run(["nope"], {}, username="app", home=vault, on_missing="warn") == [""]


def test_term_without_username(lookup, vault):
    with pytest.raises(AnsibleLookupError, match="needs a username"):
        lookup.run(["db"], {}, home=vault)


def test_options_from_variables(lookup, vault):
    variables = {"hardened_keyring_username": "app", "hardened_keyring_home": vault}
    assert lookup.run(["db"], variables) == [CANARY]


def test_errors_never_show_the_value(lookup, vault):
    with pytest.raises(AnsibleLookupError) as info:
        lookup.run(["db"], {}, username="app", home=vault, version=7)
    assert "not found" in str(info.value)
    assert CANARY not in str(info.value)


def test_audited_as_ansible(lookup, vault):
    lookup.run(["db"], {}, username="app", home=vault)
    with Store.open(vault) as store:
        events = store.trail.show(actor="*:ansible", op="read")
    assert events
    assert events[0].service == "db"
