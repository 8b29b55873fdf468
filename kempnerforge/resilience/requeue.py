"""Self-requeue after a durable preemption save, with a loop guard.

Why the job requeues itself: SLURM never requeues a job that ran into its time limit, a job that
exits inside a partition-preemption grace time ends COMPLETED, and most clusters do not set
``RequeueExit``. So after the checkpoint of the stop step is durable, rank 0 runs
``scontrol requeue $SLURM_JOB_ID`` (checkpoint first, requeue last: the requeue kills the job's
processes soon after) and every rank exits with ``cfg.exit_code`` (75).

Why a guard: a job that crashes or is stopped right after every resume would otherwise requeue
forever and burn allocation. The guard allows a requeue only if the committed step advanced since
the last requeue, or if fewer than ``max_requeues_without_progress`` requeues in a row have made
no progress; and never more than ``max_requeues`` in total (0 = unlimited). Its bookkeeping is a
small JSON file in the checkpoint directory (it must survive the requeue), keyed by the job id so a
new submission starts fresh.

Outside SLURM the same guard decides whether a launcher may start the job again: ``maybe_requeue``
returns True (the caller exits 75 and the local launcher restarts it) or False.

Usage (rank 0 only, after ``flush_pending_save()`` + ``wait()``)::

    requeued = maybe_requeue(cfg.resilience, cfg.checkpoint.dir, committed_step)
    sys.exit(exit_code_after_preemption(cfg.resilience, requeued))
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kempnerforge import exit_codes
from kempnerforge.checkpoint import storage
from kempnerforge.job import JobEnvironment
from kempnerforge.resilience.config import ResilienceConfig

logger = logging.getLogger(__name__)

# Exit code when the guard (or a failed `scontrol`) stops the requeue loop: not 0 (the job did not
# finish) and not 75 (nothing may start it again, even on a cluster with RequeueExit=75). Above 75
# because srun reports the highest exit code of its tasks, and the other ranks exit 75.
REQUEUE_REFUSED_EXIT_CODE = exit_codes.REFUSED
_HISTORY_KEEP = 50


@dataclass
class GuardState:
    """What the guard remembers between runs of one job."""

    job_id: str = ""
    requeues: int = 0  # requeues granted to this job so far
    stalls: int = 0  # granted requeues in a row whose committed step did not advance
    last_step: int | None = None  # committed step at the last granted requeue
    refused: str | None = None  # why the last request was refused (None: it was granted)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class GuardDecision:
    allowed: bool
    progressed: bool
    reason: str


def guard_path(ckpt_dir: str | os.PathLike[str]) -> Path:
    return Path(ckpt_dir) / storage.GUARD_FILE


def load_guard(ckpt_dir: str | os.PathLike[str], job_id: str) -> GuardState:
    """The guard state of ``job_id``; a missing file, or one of another job, starts fresh."""
    path = guard_path(ckpt_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return GuardState(job_id=job_id)
    except (OSError, ValueError) as e:
        logger.warning("requeue guard %s unreadable (%s): starting a fresh count", path, e)
        return GuardState(job_id=job_id)
    if not isinstance(raw, dict) or str(raw.get("job_id")) != job_id:
        return GuardState(job_id=job_id)
    known = set(GuardState.__dataclass_fields__)
    return GuardState(**{k: v for k, v in raw.items() if k in known})


def save_guard(ckpt_dir: str | os.PathLike[str], state: GuardState) -> None:
    """Atomic and durable (storage's writer): the record must survive the requeue."""
    path = guard_path(ckpt_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.atomic_write_json(path, asdict(state))


def decide(cfg: ResilienceConfig, state: GuardState, committed_step: int | None) -> GuardDecision:
    """Pure guard logic: may the job run again, given what it committed since the last requeue?"""
    if cfg.max_requeues and state.requeues >= cfg.max_requeues:
        return GuardDecision(
            False,
            False,
            f"the job already requeued itself {state.requeues} time(s), the limit "
            f"(resilience.max_requeues={cfg.max_requeues}); raise it or resubmit",
        )
    progressed = state.requeues == 0 or (
        committed_step is not None and (state.last_step is None or committed_step > state.last_step)
    )
    if progressed:
        return GuardDecision(True, True, "the committed step advanced")
    if state.stalls < cfg.max_requeues_without_progress:
        return GuardDecision(
            True,
            False,
            f"no progress since the last requeue ({state.stalls + 1} of "
            f"{cfg.max_requeues_without_progress} allowed)",
        )
    return GuardDecision(
        False,
        False,
        f"the committed step has stayed at {_fmt_step(committed_step)} over the last "
        f"{state.stalls + 1} requeue(s) (resilience.max_requeues_without_progress="
        f"{cfg.max_requeues_without_progress}): the job fails before it makes progress. "
        "Read the log of the last runs, fix the cause, and resubmit; the last checkpoint is intact",
    )


def _fmt_step(step: int | None) -> str:
    return "none (no checkpoint)" if step is None else str(step)


def _record(
    state: GuardState, action: str, job: JobEnvironment, step: int | None, reason: str
) -> None:
    state.history.append(
        {
            "time": round(time.time(), 3),
            "action": action,
            "step": step,
            "restart_count": job.restart_count,
            "reason": reason,
        }
    )
    del state.history[:-_HISTORY_KEEP]


def maybe_requeue(cfg: ResilienceConfig, ckpt_dir: str, committed_step: int | None) -> bool:
    """Requeue this job (rank 0, after a durable save) if the loop guard allows it.

    Returns True when the job will run again: under SLURM ``scontrol requeue`` succeeded;
    outside SLURM the guard allows the launcher to restart it on exit code ``cfg.exit_code``.
    Returns False when ``cfg.requeue`` is off, the guard refuses (message logged at ERROR), or
    ``scontrol`` is missing or fails. Never raises for these cases: the caller is on its way out.
    """
    if not cfg.requeue:
        logger.info("resilience.requeue is false: not requeueing (exit code decides)")
        return False
    job = JobEnvironment.from_env()
    state = load_guard(ckpt_dir, job.job_id)
    verdict = decide(cfg, state, committed_step)
    if not verdict.allowed:
        state.refused = verdict.reason
        _record(state, "refused", job, committed_step, verdict.reason)
        save_guard(ckpt_dir, state)
        logger.error("requeue REFUSED for job %s: %s", job.job_id, verdict.reason)
        return False

    previous = GuardState(**{**asdict(state), "history": list(state.history)})
    state.requeues += 1
    state.stalls = 0 if verdict.progressed else state.stalls + 1
    state.last_step = committed_step if committed_step is not None else state.last_step
    state.refused = None
    _record(state, "requeue", job, committed_step, verdict.reason)
    # Recorded before `scontrol requeue`: the requeue kills this process soon after.
    save_guard(ckpt_dir, state)

    if not job.under_slurm:
        logger.info(
            "run %d of job %s stops at committed step %s; the launcher may start it again (%s)",
            job.restart_count,
            job.job_id,
            _fmt_step(committed_step),
            verdict.reason,
        )
        return True

    scontrol = shutil.which("scontrol")
    if scontrol is None:
        save_guard(ckpt_dir, previous)
        logger.error(
            "cannot requeue job %s: `scontrol` is not on PATH. In a container, bind-mount the "
            "SLURM client binaries, munge socket and slurm.conf, or requeue from outside.",
            job.job_id,
        )
        return False
    cmd = [scontrol, "requeue", job.job_id]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        save_guard(ckpt_dir, previous)
        logger.error("`%s` failed: %s", " ".join(cmd), e)
        return False
    if res.returncode != 0:
        save_guard(ckpt_dir, previous)
        logger.error(
            "`%s` failed (exit %d): %s. Was the job submitted with --requeue (or JobRequeue=1)?",
            " ".join(cmd),
            res.returncode,
            (res.stderr or res.stdout).strip(),
        )
        return False
    logger.info(
        "requeued job %s at committed step %s (requeue %d, restart count was %d; %s)",
        job.job_id,
        _fmt_step(committed_step),
        state.requeues,
        job.restart_count,
        verdict.reason,
    )
    return True


def exit_code_after_preemption(cfg: ResilienceConfig, requeued: bool) -> int:
    """The exit code for every rank after a preemption save.

    ``cfg.exit_code`` (75, "run me again") when the job will run again or requeueing is off (the
    launcher or the cluster's RequeueExit then decides); ``REQUEUE_REFUSED_EXIT_CODE`` when the
    guard refused or ``scontrol`` failed, so that nothing starts the job again.
    """
    if requeued or not cfg.requeue:
        return cfg.exit_code
    return REQUEUE_REFUSED_EXIT_CODE


def last_decision(ckpt_dir: str | os.PathLike[str]) -> GuardState | None:
    """The guard file as it stands (any job), for launchers and ``--status``."""
    try:
        raw = json.loads(guard_path(ckpt_dir).read_text())
    except (OSError, ValueError):
        return None
    known = set(GuardState.__dataclass_fields__)
    return (
        GuardState(**{k: v for k, v in raw.items() if k in known})
        if isinstance(raw, dict)
        else None
    )
