"""Stop signals, requeue, watchdogs and hang detection: the resilience section of a job."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field


@dataclass
class ResilienceConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])  # set the stop flag
    exit_code: int = 75  # EX_TEMPFAIL: "run me again"; launchers requeue on it
    requeue: bool = True  # under SLURM, rank 0 runs `scontrol requeue` before exiting
    # total self-requeues allowed per job; 0 = unlimited (the progress guard still applies)
    max_requeues: int = 0
    max_requeues_without_progress: int = 2  # guard: stop requeueing when the committed step stalls
    save_watchdog_s: float = 90.0  # a preemption save that takes longer ends the process
    # Outside SLURM nobody can tell why a SIGTERM came: "cancel" (stop, no restart) or
    # "preemption" (save, then exit 75 so a launcher restarts the job).
    sigterm_without_slurm: str = "cancel"
    # Hang detection: no step progress (maybe_save calls) for this long dumps every thread's
    # stack and ends the run (exit 77, requeued under the guard). 0 = automatic:
    # max(hang_min_s, hang_factor x the median step time), armed after a few measured steps.
    hang_timeout_s: float = 0.0
    hang_factor: float = 10.0
    hang_min_s: float = 300.0
    hang_detection: bool = True
    # a failed periodic save: "raise" (the exception ends the run), "continue" training, or
    # "exit": stop as after a preemption (requeued under the guard, exit 75 or 76)
    on_save_error: str = "raise"
    # Testing aid: after optimizer step N (> 0), rank debug_signal_rank (-1: every rank) sends
    # itself the first of `signals`, so a preemption lands at an exact step through the real handler.
    debug_signal_step: int = 0
    debug_signal_rank: int = 0

    def __post_init__(self) -> None:
        for name in self.signals:
            if not hasattr(signal, name) or not name.startswith("SIG"):
                raise ValueError(
                    f"resilience.signals: {name!r} is not a signal name like 'SIGUSR1'"
                )
        if not 0 < self.exit_code < 256:
            raise ValueError(f"resilience.exit_code must be in 1..255, got {self.exit_code}")
        if self.max_requeues < 0:
            raise ValueError(
                f"resilience.max_requeues must be >= 0 (0 = unlimited), got {self.max_requeues}"
            )
        if self.max_requeues_without_progress < 0:
            raise ValueError(
                f"resilience.max_requeues_without_progress must be >= 0, got {self.max_requeues_without_progress}"
            )
        if self.save_watchdog_s <= 0:
            raise ValueError(f"resilience.save_watchdog_s must be > 0, got {self.save_watchdog_s}")
        if self.debug_signal_step < 0 or self.debug_signal_rank < -1:
            raise ValueError(
                "resilience.debug_signal_step must be >= 0 and debug_signal_rank >= -1"
            )
        if self.debug_signal_step and not self.signals:
            raise ValueError(
                "resilience.debug_signal_step needs at least one name in resilience.signals"
            )
        if self.sigterm_without_slurm not in ("cancel", "preemption"):
            raise ValueError(
                "resilience.sigterm_without_slurm must be 'cancel' or 'preemption', got "
                f"{self.sigterm_without_slurm!r}"
            )
        if self.hang_timeout_s < 0 or self.hang_min_s <= 0 or self.hang_factor <= 1:
            raise ValueError(
                "resilience: hang_timeout_s must be >= 0 (0 = automatic), hang_min_s > 0 and "
                f"hang_factor > 1; got {self.hang_timeout_s}, {self.hang_min_s}, {self.hang_factor}"
            )
        if self.on_save_error not in ("raise", "continue", "exit"):
            raise ValueError(
                f"resilience.on_save_error must be 'raise', 'continue' or 'exit', got {self.on_save_error!r}"
            )
