"""``python -m keyring_hardened``: the admin CLI."""

import sys

from .cli import main

sys.exit(main())
