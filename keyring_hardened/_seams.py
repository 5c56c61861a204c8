"""A test seam: die at a named point, as ``kill -9`` would.

Crash tests must land *inside* multi-step work (a rekey between its commit
and its rename, a rewrap batch before its commit, a vault half created),
whatever the speed of the machine: a kill after a sleep lands wherever the
process happens to be. So the code names its steps, and a test sets
``KEYRING_HARDENED_CRASH_AT`` to one of them.

Kept in the installed package on purpose: the crash tests run the real
installed code in real processes. It is harmless: only code that can set
this process's environment can trigger it, and such code can kill the
process anyway. It only ever kills; it never skips or changes a step.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "KEYRING_HARDENED_CRASH_AT"


def crash_point(name: str) -> None:
    """Die here with SIGKILL when ``KEYRING_HARDENED_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
