"""The checkpoint the original KempnerForge wrote, kept in ``tests/fixtures/kf-original``.

How it was made is in that directory's README; ``expected.pt`` holds what resuming it must give.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

KF_ORIGINAL = Path(__file__).resolve().parents[1] / "fixtures" / "kf-original"
CHECKPOINTS = KF_ORIGINAL / "checkpoints"
EXPECTED = KF_ORIGINAL / "expected.pt"


def latest_target(checkpoints: str | Path) -> str:
    """The step directory that ``checkpoints/latest`` names.

    The original made ``latest`` a relative symlink; an archive or checkout without links keeps
    it as a regular file holding the same name. Both forms name the same checkpoint.
    """
    latest = Path(checkpoints) / "latest"
    if latest.is_symlink():
        return os.readlink(latest)
    return latest.read_text().strip()


def copy_kf_original(dest: str | Path) -> Path:
    """A writable copy of the fixture's ``checkpoints/`` at ``dest`` (which must not exist yet).

    Tests resume and save into the copy, never into the fixture; links stay links.
    """
    dest = Path(dest)
    shutil.copytree(CHECKPOINTS, dest, symlinks=True)
    for p in [dest, *dest.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o200)
    return dest
