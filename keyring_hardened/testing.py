"""Helpers for tests, ours and users': a frozen clock and a throwaway store.

Example::

    from keyring_hardened.testing import FrozenClock, temporary_store

    def test_my_app() -> None:
        clock = FrozenClock()
        with temporary_store(clock=clock) as store:
            store.set("db", "app", "s3cret")
            clock.advance(3600)
            assert store.get("db", "app").reveal() == "s3cret"
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import Config
from .store import Store

__all__ = ["FrozenClock", "temporary_store"]


class FrozenClock:
    """A clock that moves only when told to: pass it as ``clock=`` to a store."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        """The current frozen time, in seconds since the epoch."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


@contextmanager
def temporary_store(*, config: Config | None = None, clock: FrozenClock | None = None,
                    actor: str = "test") -> Iterator[Store]:
    """A key-file vault in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="keyring-hardened-") as tmp:
        home = Path(tmp, "vault")
        store = Store.init(home, config=config or Config(), actor=actor,
                           clock=clock if clock is not None else time.time)
        try:
            yield store
        finally:
            store.close()
