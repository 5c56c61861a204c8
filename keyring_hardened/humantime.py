"""Durations and times as people write and read them.

Below everything that takes a duration (config, access, audit) or prints a
time, so none of them has to import another for it.
"""

from __future__ import annotations

import re
import time

from .errors import ConfigError

__all__ = ["MAX_DURATION", "parse_duration", "utc"]

# At most 12 digits a part: an endless digit string must not reach int() (which
# refuses over 4300 digits) nor make a number SQLite or a timer cannot hold.
_DURATION = re.compile(r"(\d{1,12})([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: The longest duration anything takes: 100 years, as for a TTL.
MAX_DURATION = 100 * 365 * 86400


def parse_duration(text: str, what: str = "duration") -> float:
    """Parse ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` or ``1h30m`` into seconds."""
    if not isinstance(text, str):
        raise ConfigError(f"{what}: expected a duration such as 90s, 15m, 12h or 30d")
    s = text.strip().lower()
    pos, total = 0, 0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s) or total <= 0:
        raise ConfigError(f"{what}: expected a positive duration such as 90s, 15m, 12h or 30d")
    if total > MAX_DURATION:
        raise ConfigError(f"{what}: must be at most 100 years")
    return float(total)


def utc(ts: float) -> str:
    """A Unix time as an ISO 8601 UTC timestamp, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
