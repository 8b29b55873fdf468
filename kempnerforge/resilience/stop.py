"""The one stop path: from a signal to a durable checkpoint, a requeue decision and an exit code.

:class:`StopController` is what a training loop's per-step check needs: the signal handlers
(they only set a flag), the cross-rank agreement and the hang watchdog. :func:`run_stop` is the
tail every stop takes, whoever wrote the loop (``CheckpointManager.maybe_save`` calls it;
``kempnerforge.train`` is one such loop)::

    reason (rank 0 asks SLURM, every rank gets the answer)
      -> save this step unless already saved -> flush_pending_save() -> wait()   [watchdog]
      -> rank 0: requeue through the progress guard (when the reason calls for it)
      -> every rank: the same exit code (the broadcast is the barrier: the requeue happened
         before any task exits), background threads stopped

Exit codes are :mod:`kempnerforge.exit_codes`: 75 run again, 76 the guard refused, 0 otherwise.
Rank 0 logs one line ``kempnerforge stop: reason=... step=... saved=... requeue=... exit=...``
that ``kempnerforge-submit --status`` shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

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
from kempnerforge.resilience.watchdog import HangWatchdog, SaveWatchdog

if TYPE_CHECKING:
    from kempnerforge.checkpoint.manager import CheckpointManager

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


def run_stop(
    mgr: CheckpointManager,
    step: int,
    reason: StopReason,
    save: Callable[[], None],
    signal_name: str | None = None,
) -> int:
    """Stop the run at ``step`` for ``reason`` on every rank; returns the exit code.

    ``save`` saves this step; ``signal_name`` is what this rank received (for the log line).
    """
    cfg = mgr.resilience
    saved = "not-needed"

    def on_timeout() -> int:
        return _requeue_code(mgr) if mgr.rank == 0 else cfg.exit_code

    t0 = time.perf_counter()
    with SaveWatchdog(cfg.save_watchdog_s, f"stop save of step {step}", on_timeout):
        try:
            mgr.wait()  # an earlier save's failure must not keep this one from being tried
        except Exception as e:
            logger.error("an earlier checkpoint save failed: %s", e)
        try:
            if reason.save:
                if not mgr.has_saved(step):
                    save()
                saved = "yes"
            mgr.flush_pending_save()
            mgr.wait()
        except Exception as e:  # a failed stop save: `latest` is the previous checkpoint
            saved = "failed"
            logger.error("stop save of step %d failed: %s", step, e)
    code, requeue = exit_codes.OK, "not-needed"
    if mgr.rank == 0:
        if reason.requeue:
            code = _requeue_code(mgr)
            requeue = (
                "off" if not cfg.requeue else ("granted" if code == cfg.exit_code else "refused")
            )
        elif reason.kind == "requeued":
            code = cfg.exit_code  # the cluster runs it again
        logger.warning(
            "kempnerforge stop: reason=%s signal=%s step=%d saved=%s requeue=%s exit=%d: %s "
            "(%.2fs)",
            reason.kind,
            signal_name or "none-on-rank-0",
            step,
            saved,
            requeue,
            code,
            reason.detail,
            time.perf_counter() - t0,
        )
    code = mgr.control.bcast(code)
    mgr.close(wait_for_trash=False)
    return int(code)


def _requeue_code(mgr: CheckpointManager) -> int:
    """Rank 0: ask the guard (and SLURM) for another run; 75 when granted, else 76."""
    cfg = mgr.resilience
    if not cfg.requeue:
        return cfg.exit_code
    granted = maybe_requeue(cfg, str(mgr.dir), mgr.committed_step())
    return cfg.exit_code if granted else exit_codes.REFUSED


def on_hang(mgr: CheckpointManager, message: str) -> int:
    """The hang watchdog's decision (its own thread; no collectives): rank 0 requeues through
    the guard, every rank leaves with 77, or 76 once the guard refused (the other ranks read
    rank 0's verdict from the guard file)."""
    if mgr.rank == 0:
        granted = mgr.resilience.requeue and maybe_requeue(
            mgr.resilience, str(mgr.dir), mgr.committed_step()
        )
        code = exit_codes.HANG if granted else exit_codes.REFUSED
        logger.critical(
            "kempnerforge hang: rank=0 %s; stacks above; requeue=%s exit=%d",
            message,
            "granted" if granted else "refused",
            code,
        )
        return code
    logger.critical("kempnerforge hang: rank=%d %s; stacks above", mgr.rank, message)
    job = JobEnvironment.from_env()
    if job.under_slurm:
        time.sleep(_HANG_PEER_WAIT_S)
    # the guard's verdict, as rank 0 recorded it: a refusal ends every rank with 76 (srun
    # reports the highest code of its tasks, and 77 would hide it)
    guard = last_decision(mgr.dir)
    refused = guard is not None and guard.job_id == job.job_id and bool(guard.refused)
    code = exit_codes.REFUSED if refused else exit_codes.HANG
    return code


def stop_reason(mgr: CheckpointManager, kind: int) -> StopReason:
    """Rank 0 classifies the stop, every rank gets its answer."""
    reason = None
    if mgr.rank == 0:
        try:
            reason = classify_stop(kind, mgr.resilience)
        except Exception as e:  # asking the controller must not leave other ranks waiting
            reason = StopReason("unknown", True, True, f"classifying the stop failed: {e!r}")
    return mgr.control.bcast(reason)
