"""Did a run make progress? The resume step of a checkpoint dir, and the crash policy built on it.

A run that crashed is worth starting again only if it got further than the run before it: a job
that fails at start-up would otherwise be restarted until the allocation is gone. Progress is
judged by the step a new run would resume from, read before the run starts and after it ended.

``resume_step`` must stay torch-free (the launcher and ``--status`` use it); it answers what the
checkpoint manager's resolver answers: the step of ``latest`` when that is a committed step
directory, else the newest committed ``step_N``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_PP_DIR = re.compile(r"^pp_?(\d+)$")


def _committed_step(step_dir: Path) -> int | None:
    """The step of a committed step directory: metadata.json with an integer step (written
    last by the commit) and DCP's ``.metadata``; None when either is missing or unreadable."""
    try:
        meta = json.loads((step_dir / "metadata.json").read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    step = meta.get("step") if isinstance(meta, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    return step if _has_dcp_metadata(step_dir) else None


def _has_dcp_metadata(step_dir: Path) -> bool:
    """DCP's ``.metadata`` in the step, or in every pipeline stage's dir (``pp_K`` / ``ppK``)."""
    if (step_dir / ".metadata").exists():
        return True
    try:
        stages = [c for c in step_dir.iterdir() if _PP_DIR.match(c.name) and c.is_dir()]
    except OSError:
        return False
    return bool(stages) and all((c / ".metadata").exists() for c in stages)


def _latest_target(root: Path) -> Path | None:
    link = root / "latest"
    try:
        if link.is_symlink():
            target = os.readlink(link)
        elif link.is_file():
            target = link.read_text().strip()
        else:
            return None
    except (OSError, UnicodeDecodeError):
        return None
    name = target.strip("/")
    if not name or os.path.isabs(target) or "/" in name or name in (".", ".."):
        return None
    return root / name


def _resume_step(root: str | os.PathLike[str]) -> int | None:
    root = Path(root)
    target = _latest_target(root)
    if target is not None and target.is_dir():
        step = _committed_step(target)
        if step is not None:
            return step
    try:
        children = list(root.iterdir())
    except OSError:
        return None
    steps = []
    for child in children:
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and not child.is_symlink():
            step = _committed_step(child)
            if step is not None:
                steps.append(step)
    return max(steps) if steps else None


# The one place that names the resolver: becomes
# ``from kempnerforge.checkpoint.resolve import resume_step`` once that module exists.
resume_step = _resume_step


@dataclass
class CrashDecision:
    """Whether a crashed run is started again, and why (kept in the exit record)."""

    restart: bool
    reason: str
    step_before: int | None = None
    step_after: int | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def crash_decision(
    requeue_on_crash: bool,
    checkpoint_dir: str | os.PathLike[str] | None,
    step_before: int | None,
    restarts_so_far: int,
    max_requeues: int,
) -> CrashDecision:
    """The crash policy: start a crashed run again only if it advanced the resume step.

    ``step_before`` is the resume step read before the run started; ``max_requeues`` (0 = no
    limit) bounds all restarts of the job, crash restarts included.
    """
    if not requeue_on_crash:
        return CrashDecision(False, "--requeue-on-crash not given")
    if checkpoint_dir is None:
        return CrashDecision(
            False, "no checkpoint dir to judge progress by (give --checkpoint-dir)", step_before
        )
    after = resume_step(checkpoint_dir)
    if max_requeues and restarts_so_far >= max_requeues:
        return CrashDecision(
            False,
            f"the job was already started again {restarts_so_far} time(s), the limit "
            f"(--max-requeues {max_requeues})",
            step_before,
            after,
        )
    if after is None or (step_before is not None and after <= step_before):
        where = "no checkpoint yet" if after is None else f"still at step {after}"
        return CrashDecision(
            False,
            f"no progress during this run (resume step: {where}): it fails before it gets "
            "anywhere; fix the cause and resubmit",
            step_before,
            after,
        )
    before = "none" if step_before is None else str(step_before)
    return CrashDecision(
        True,
        f"the resume step advanced from {before} to {after} during this run",
        step_before,
        after,
    )
