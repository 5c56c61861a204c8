"""A secret value whose representation never shows what it holds."""

from __future__ import annotations

import hmac
from typing import NoReturn

__all__ = ["Secret"]

_REDACTED = "Secret('**********')"


class Secret:
    """A secret string that prints as ``Secret('**********')``.

    ``repr``, ``str``, ``format`` and f-strings all show the redacted form,
    so a secret that ends up in a log line or an exception message shows
    nothing. Call :meth:`reveal` to get the value, at the one place that
    needs it. Secrets compare in constant time and refuse to be pickled.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret value must be str")
        self._value = value

    def reveal(self) -> str:
        """Return the secret value itself."""
        return self._value

    def __repr__(self) -> str:
        return _REDACTED

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return _REDACTED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # Constant time, so a comparison is no timing oracle on the value.
        return hmac.compare_digest(self._value.encode("utf-8", "surrogatepass"),
                                   other._value.encode("utf-8", "surrogatepass"))

    def __hash__(self) -> int:
        # Hashing would make the value observable through dict timing; refuse it.
        raise TypeError("Secret is not hashable")

    def __len__(self) -> int:
        return len(self._value)

    def __reduce__(self) -> NoReturn:
        # Pickling would write the value somewhere the caller did not choose.
        raise TypeError("Secret cannot be pickled")
