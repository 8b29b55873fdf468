"""``python -m kempnerforge.launch``: see :mod:`kempnerforge.launch.cli`."""

from __future__ import annotations

import sys

from kempnerforge.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
