"""Why is this job being stopped? A user's cancel, a preemption, or its time limit.

The signal alone does not say: SLURM sends SIGTERM for a cancel, for a time limit without a lead
signal, for an administrator's requeue and for a node failure, and the lead signal (SIGUSR1) for
both a time-limit warning and a partition preemption. The controller does know, and has already
updated the job when the signal arrives, so rank 0 asks it once (``scontrol show job``):

============================================  =================  =====  =======
what the controller shows                      reason             save   requeue
============================================  =================  =====  =======
RUNNING, ``PreemptTime`` set                   preemption         yes    yes
RUNNING, lead signal, little time left         time-limit         yes    yes
RUNNING, lead signal, time left                preemption-signal  yes    yes
RUNNING, SIGTERM (``scancel --signal=TERM``)   user-cancel        yes    no
COMPLETING/CANCELLED, ``Reason=TimeLimit``     time-limit-no-lead no     no
COMPLETING, restart count above this run's     requeued           yes    no (it is)
COMPLETING/CANCELLED otherwise                 user-cancel        yes    no
controller unreachable                         unknown            yes    yes
============================================  =================  =====  =======

A cancel must stay a cancel: a self-requeue after ``scancel`` succeeds and would bring the job
back. At the time limit without a lead signal the job has only SLURM's KillWait before SIGKILL,
too little to save a large model: it ends TIMEOUT without a new save or requeue, and a resubmit
resumes from ``latest``. Outside SLURM, SIGTERM is a cancel (or a preemption, by
``resilience.sigterm_without_slurm``) and every other stop signal a preemption.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from kempnerforge.job import JobEnvironment
from kempnerforge.resilience.config import ResilienceConfig

logger = logging.getLogger(__name__)

# What a rank saw, as the numbers the stop agreement carries: larger wins.
NO_STOP = 0
STOP_SIGNAL = 1  # a preemption-style signal (SIGUSR1 and the like)
STOP_TERMINATE = 2  # SIGTERM / SIGINT: the job is being ended

# Seconds before the limit within which a lead signal counts as the time-limit warning: SLURM
# checks limits every ~30 s, so the warning comes up to ~40 s earlier than the lead asked for.
SIGNAL_LEAD_ENV = "KEMPNERFORGE_SIGNAL_LEAD"
_DEFAULT_LEAD_S = 180
_WARNING_SLACK_S = 60


@dataclass(frozen=True)
class StopReason:
    kind: str
    save: bool
    requeue: bool
    detail: str


def job_fields(job_id: str, timeout_s: float = 15.0) -> dict[str, str] | None:
    """``scontrol show job -o`` of ``job_id`` as a dict, or None when it cannot be asked."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        res = subprocess.run(
            [scontrol, "show", "job", "-o", job_id],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0 or not res.stdout.strip():
        return None
    return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", res.stdout.strip().splitlines()[0]))


def slurm_seconds(spec: str) -> int | None:
    """``[D-]HH:MM:SS`` / ``MM:SS`` / ``MM`` as SLURM prints durations; None for UNLIMITED etc."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", spec or "")
    if not m:
        return None
    days = int(m.group(1) or 0)
    parts = [int(p) for p in m.group(2, 3, 4) if p is not None]
    if len(parts) == 3:
        h, mi, s = parts
    elif len(parts) == 2:
        h, mi, s = (parts[0], parts[1], 0) if m.group(1) else (0, parts[0], parts[1])
    else:
        h, mi, s = (parts[0], 0, 0) if m.group(1) else (0, parts[0], 0)
    return days * 86400 + h * 3600 + mi * 60 + s


def classify_stop(
    signal_kind: int,
    cfg: ResilienceConfig,
    job: JobEnvironment | None = None,
    fields: dict[str, str] | None = None,
) -> StopReason:
    """The reason for an agreed stop (rank 0). ``signal_kind`` is the strongest kind any rank
    saw (:mod:`~kempnerforge.resilience.agree`); ``fields`` (tests) stands in for scontrol."""
    job = job or JobEnvironment.from_env()
    terminate = signal_kind >= STOP_TERMINATE
    if not job.under_slurm:
        if terminate and cfg.sigterm_without_slurm == "cancel":
            return StopReason("user-cancel", True, False, "SIGTERM outside SLURM: a cancel")
        return StopReason("preemption", True, True, "stop signal outside SLURM")
    info = fields if fields is not None else job_fields(job.job_id)
    if info is None:
        return StopReason(
            "unknown", True, True, "the SLURM controller could not be asked; treated as preemption"
        )
    state, why = info.get("JobState", "?"), info.get("Reason", "None")
    restarts = int(info.get("Restarts", "0") or 0)
    seen = f"JobState={state} Reason={why} Restarts={restarts}"
    if state in ("COMPLETING", "CANCELLED", "TIMEOUT") or state.startswith("CANCELLED"):
        if why == "TimeLimit" or state == "TIMEOUT":
            return StopReason(
                "time-limit-no-lead",
                False,
                False,
                f"time limit reached without a lead signal ({seen}); SIGKILL follows within "
                "KillWait, so no new save; the job ends TIMEOUT and a resubmit resumes from "
                "latest",
            )
        if restarts > job.restart_count:
            return StopReason(
                "requeued", True, False, f"the cluster already requeued the job ({seen})"
            )
        return StopReason("user-cancel", True, False, f"the job was cancelled ({seen})")
    preempt = info.get("PreemptTime", "None")
    if preempt not in ("None", "", "Unknown"):
        return StopReason("preemption", True, True, f"partition preemption at {preempt} ({seen})")
    if terminate:
        return StopReason(
            "user-cancel", True, False, f"SIGTERM while the job runs on ({seen}): a cancel"
        )
    limit, ran = slurm_seconds(info.get("TimeLimit", "")), slurm_seconds(info.get("RunTime", ""))
    if limit is not None and ran is not None:
        left = limit - ran
        lead = int(os.environ.get(SIGNAL_LEAD_ENV) or _DEFAULT_LEAD_S)
        if left <= lead + _WARNING_SLACK_S:
            return StopReason(
                "time-limit", True, True, f"time-limit warning, {left}s left ({seen})"
            )
        return StopReason(
            "preemption-signal", True, True, f"stop signal with {left}s left ({seen})"
        )
    return StopReason("preemption-signal", True, True, f"stop signal ({seen})")
