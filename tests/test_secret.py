from __future__ import annotations

import pickle

import pytest

from keyring_hardened.secret import Secret

from .conftest import CANARY


def test_redacted_everywhere() -> None:
    s = Secret(CANARY)
    for text in (repr(s), str(s), f"{s}", f"{s!r}", f"{s}", f"{s:>40}", repr([s])):
        assert CANARY not in text
        assert "**********" in text
    assert s.reveal() == CANARY
    assert len(s) == len(CANARY)


def test_comparison_and_hashing() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"
    with pytest.raises(TypeError):
        hash(Secret("a"))


def test_refuses_pickle_and_non_str() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(CANARY))
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]
