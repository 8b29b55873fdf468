"""Did a run make progress? The resume step of a checkpoint dir, and the crash policy built on it.

A run that crashed is worth starting again only if it got further than the run before it: a job
that fails at start-up would otherwise be restarted until the allocation is gone. Progress is
judged by the step a new run would resume from, read before the run starts and after it ended.

``resume_step`` is the checkpoint manager's own resolver (torch-free), so the launcher, ``--status``
and a resume agree on which step a run would start from.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

from kempnerforge.checkpoint.resolve import resume_step

logger = logging.getLogger(__name__)


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
