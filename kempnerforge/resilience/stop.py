"""The stop decisions: whether to stop, why, whether the job may run again, with which code.

:class:`StopController` is what a training loop's per-step check needs: the signal handlers
(they only set a flag), the cross-rank agreement and the hang watchdog. The functions below
answer the questions the stop tail asks (the tail itself is ``CheckpointManager``'s: it owns the
save it must finish first)::

    reason: rank 0 asks SLURM (:func:`classify`), every rank gets the answer
    save this step unless already saved, flush, wait            [the manager; SaveWatchdog]
    rank 0: :func:`requeue_code` (the progress guard, ``scontrol requeue``)
    rank 0: :func:`log_stop_line`; every rank: the same exit code

Nothing here knows the manager: what a decision needs comes in as arguments. Exit codes are
:mod:`kempnerforge.exit_codes`: 75 run again, 76 the guard refused, 77 a hang, 0 otherwise. The
one line ``kempnerforge stop: reason=... step=... saved=... requeue=... exit=...`` is what
``kempnerforge-submit --status`` shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kempnerforge import exit_codes
from kempnerforge.job import JobEnvironment
from kempnerforge.resilience.agree import StopAgreement
from kempnerforge.resilience.config import ResilienceConfig
from kempnerforge.resilience.reason import (
    NO_STOP,
    STOP_SIGNAL,
    STOP_TERMINATE,
    StopReason,
    classify_stop,
)
from kempnerforge.resilience.requeue import last_decision, maybe_requeue
from kempnerforge.resilience.signals import PreemptionFlag
from kempnerforge.resilience.watchdog import HangWatchdog

logger = logging.getLogger(__name__)

_TERMINATE = frozenset({"SIGTERM", "SIGINT"})
# How long a rank other than 0 waits before leaving a hung run, so that rank 0 can requeue
# first (srun --kill-on-bad-exit would otherwise end rank 0 before its `scontrol requeue`).
_HANG_PEER_WAIT_S = 15.0


class StopController:
    """Signal flag, agreement and hang watchdog of one training run (one per manager)."""

    def __init__(self, cfg: ResilienceConfig, on_hang: Callable[[str], int]) -> None:
        self.cfg = cfg
        self.flag = PreemptionFlag()
        if threading.current_thread() is threading.main_thread():
            self.flag.install(cfg.signals)
        else:
            logger.warning(
                "the checkpoint manager is used outside the main thread: it cannot catch %s; "
                "stops must be requested through flag.request()",
                ", ".join(cfg.signals),
            )
        self.agreement = StopAgreement()
        self.hang: HangWatchdog | None = None
        if cfg.hang_detection:
            self.hang = HangWatchdog(
                on_hang, timeout_s=cfg.hang_timeout_s, factor=cfg.hang_factor, min_s=cfg.hang_min_s
            )

    def local_kind(self) -> int:
        if not self.flag.requested:
            return NO_STOP
        return STOP_TERMINATE if self.flag.signal_names & _TERMINATE else STOP_SIGNAL

    def step(self, step: int, save_due: bool) -> tuple[int, bool]:
        """(agreed stop kind, agreed time-based save) for this step; beats the hang watchdog."""
        if self.hang is not None:
            self.hang.beat(step)
        agreed = self.agreement.poll([float(self.local_kind()), float(save_due)])
        if agreed is None:
            return NO_STOP, False
        return int(agreed[0]), agreed[1] > 0

    def close(self) -> None:
        if self.hang is not None:
            self.hang.stop()
        self.agreement.drain()
        self.flag.uninstall()


def classify(kind: int, cfg: ResilienceConfig) -> StopReason:
    """Rank 0: why this stop happens (asks SLURM); never raises, the other ranks wait for it."""
    try:
        return classify_stop(kind, cfg)
    except Exception as e:
        return StopReason("unknown", True, True, f"classifying the stop failed: {e!r}")


def requeue_code(cfg: ResilienceConfig, ckpt_dir: Path, committed_step: int | None) -> int:
    """Rank 0: ask the guard (and SLURM) for another run; ``cfg.exit_code`` when granted, else
    76. With requeueing off the code is still ``cfg.exit_code``: the launcher decides."""
    if not cfg.requeue:
        return cfg.exit_code
    granted = maybe_requeue(cfg, str(ckpt_dir), committed_step)
    return cfg.exit_code if granted else exit_codes.REFUSED


def requeue_outcome(cfg: ResilienceConfig, code: int) -> str:
    """The ``requeue=`` field of the stop line for a requeue that was asked for."""
    if not cfg.requeue:
        return "off"
    return "granted" if code == cfg.exit_code else "refused"


def log_stop_line(
    reason: StopReason,
    signal_name: str | None,
    step: int,
    saved: str,
    requeue: str,
    code: int,
    seconds: float,
) -> None:
    """Rank 0's one line per stop (``--status`` finds it)."""
    logger.warning(
        "kempnerforge stop: reason=%s signal=%s step=%d saved=%s requeue=%s exit=%d: %s (%.2fs)",
        reason.kind,
        signal_name or "none-on-rank-0",
        step,
        saved,
        requeue,
        code,
        reason.detail,
        seconds,
    )


def hang_exit_code(
    cfg: ResilienceConfig,
    rank: int,
    ckpt_dir: Path,
    committed_step: Callable[[], int | None],
    message: str,
) -> int:
    """The hang watchdog's decision (its own thread; no collectives): rank 0 requeues through
    the guard, every rank leaves with 77, or 76 once the guard refused (the other ranks read
    rank 0's verdict from the guard file)."""
    if rank == 0:
        granted = cfg.requeue and maybe_requeue(cfg, str(ckpt_dir), committed_step())
        code = exit_codes.HANG if granted else exit_codes.REFUSED
        logger.critical(
            "kempnerforge hang: rank=0 %s; stacks above; requeue=%s exit=%d",
            message,
            "granted" if granted else "refused",
            code,
        )
        return code
    logger.critical("kempnerforge hang: rank=%d %s; stacks above", rank, message)
    job = JobEnvironment.from_env()
    if job.under_slurm:
        time.sleep(_HANG_PEER_WAIT_S)
    # the guard's verdict, as rank 0 recorded it: a refusal ends every rank with 76 (srun
    # reports the highest code of its tasks, and 77 would hide it)
    guard = last_decision(ckpt_dir)
    refused = guard is not None and guard.job_id == job.job_id and bool(guard.refused)
    return exit_codes.REFUSED if refused else exit_codes.HANG
