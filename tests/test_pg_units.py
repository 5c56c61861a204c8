"""The PostgreSQL engine's pure parts: URLs as shown and as accepted (no server needed)."""

from __future__ import annotations

import pytest

from keyring_hardened.config import Config, check_url
from keyring_hardened.errors import ConfigError
from keyring_hardened.pgstorage import display_url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://app:s3cret-pw@db.example.com:5433/vault?sslmode=verify-full",
     "postgresql://app@db.example.com:5433/vault"),
    ("postgresql://app@db.example.com/vault?password=s3cret-pw",
     "postgresql://app@db.example.com/vault"),
    ("postgresql:///vault?host=/run/postgresql&user=app&password=s3cret-pw",
     "postgresql://app@[/run/postgresql]/vault"),
    ("postgresql://", "postgresql://localhost/"),
    ("postgresql://[bad", "postgresql://(unparsable URL)"),
])
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert display_url(url) == shown
    assert "s3cret" not in display_url(url)


def test_what_a_storage_url_may_be() -> None:
    assert check_url("postgresql://app@db/vault") is None
    assert check_url("postgres://app@db/vault") is None
    assert "expected a postgresql:// URL" in (check_url("mysql://app@db/vault") or "")
    assert "expected a postgresql:// URL" in (check_url("sqlite:///tmp/x.db") or "")
    # A password: allowed in the environment (private to the user), never in the config.
    assert check_url("postgresql://app:pw@db/vault") is None
    assert "holds a password" in (check_url("postgresql://app:pw@db/vault", in_config=True)
                                  or "")
    assert "holds a password" in (check_url("postgresql://app@db/vault?password=pw",
                                            in_config=True) or "")


def test_the_config_refuses_a_bad_storage_section() -> None:
    with pytest.raises(ConfigError, match=r"storage\.url: expected a postgresql:// URL"):
        Config.from_mapping({"storage": {"url": 5}})
    with pytest.raises(ConfigError, match=r"storage\.url: holds a password") as caught:
        Config.from_mapping({"storage": {"url": "postgresql://a:topsecret@h/d"}})
    assert "topsecret" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"storage\.password_keyring"):
        Config.from_mapping({"storage": {"password_keyring": ""}})
    config = Config.from_mapping({"storage": {"url": "postgresql://a@h/d",
                                              "password_command": ["pass", "show", "db"],
                                              "password_keyring": "db.example"}})
    assert config.storage_url == "postgresql://a@h/d"
    assert config.storage_password_command == ("pass", "show", "db")
    assert config.storage_password_keyring == "db.example"
