#!/usr/bin/env python
"""Submit a training job to SLURM (submitit) or run it locally: ``kempnerforge.launch.cli``.

    python launch/submit.py --config configs/debug.yaml --nodes 2 [section.key=value ...]
    python launch/submit.py --local --tasks-per-node 2 -- python my_train.py --lr 3e-4
    python launch/submit.py --status JOB_ID

Kept so that commands written for a checkout keep working; the launcher itself is the package's
(``python -m kempnerforge.launch``, or the ``kempnerforge-submit`` script).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from kempnerforge.launch.cli import main
except ImportError:  # a checkout that was not installed: the package is beside this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kempnerforge.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
