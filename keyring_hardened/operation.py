"""One operation's working state, shared by the session and the gate it runs.

What an operation's body tells its audit event (:class:`_Note`), the body's
type (:data:`Body`), and what the operation has verified, and changed, of
the authenticated state (:class:`Meta`, :class:`_Tx`). The session runs
operations (:meth:`keyring_hardened.session.Session._run`); the gate judges
each inside its transaction (:func:`keyring_hardened.gate.admit`). Both
import these from here, so neither imports the other for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from . import state
from .port import BucketRow, HeadRow, KekRecord, VaultRecord, VersionRow

__all__ = ["Body", "Meta"]

T = TypeVar("T")


class _Note:
    """What an operation's body tells its audit event."""

    __slots__ = ("key_version", "reason")

    def __init__(self) -> None:
        self.key_version: int | None = None
        self.reason: str | None = None


#: An operation's body (see :meth:`~keyring_hardened.session.Session._run`): called with the open
#: storage and the note for its audit event. The storage parameter is ``Any``
#: rather than :class:`~keyring_hardened.port.Storage` only so that a test may
#: pass a body that reaches into the concrete engine under the port (a
#: parameter type is contravariant); every body in the core annotates it as
#: ``Storage``, and mypy checks each body against that.
Body = Callable[[Any, _Note], T]


class Meta(NamedTuple):
    """The vault-wide rows, verified against the state root."""

    vault: VaultRecord
    keks: list[KekRecord]
    past_keys: list[tuple[int, bytes]]
    anchor: tuple[int, bytes]
    #: (since, by whom) when sealed.
    seal: tuple[float, str] | None = None
    #: Rate-limit buckets short of tokens, in (rule, actor) order.
    buckets: list[BucketRow] = []  # noqa: RUF012 - a NamedTuple default, never mutated

    @property
    def active(self) -> KekRecord:
        """The KEK version new writes use (verified to be the newest)."""
        return self.keks[-1]


class _Tx:
    """What one operation has verified, and changed, of the authenticated state."""

    __slots__ = ("begin", "buckets", "last", "meta", "meta_dirty", "meta_exact", "nodes",
                 "root", "touched", "versions")

    def __init__(self, root: bytes, last: tuple[int, bytes]) -> None:
        #: The root the newest event carries; everything read is checked against it.
        self.root = root
        #: (seq, mac) of the newest event, to chain the next one onto.
        self.last = last
        self.begin = (root, last)
        self.nodes: dict[state.NodeKey, bytes] = {}
        self.buckets: dict[int, list[HeadRow]] = {}
        #: Version rows read with their bucket, by head id (not yet checked).
        self.versions: dict[int, list[VersionRow]] = {}
        self.meta: Meta | None = None
        self.touched: set[int] = set()
        self.meta_dirty = False
        #: Whether ``meta`` still equals the rows after this operation's changes.
        self.meta_exact = True

    def forget(self) -> None:
        """Back to the start: a rolled-back savepoint undid rows and events alike."""
        self.root, self.last = self.begin
        self.nodes.clear()
        self.buckets.clear()
        self.versions.clear()
        self.meta = None
        self.touched.clear()
        self.meta_dirty = False
        self.meta_exact = True
