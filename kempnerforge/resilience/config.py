"""Preemption and requeue configuration."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field


@dataclass
class ResilienceConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])  # set the stop flag
    exit_code: int = 75  # EX_TEMPFAIL: "run me again"; launchers requeue on it
    requeue: bool = True  # under SLURM, rank 0 runs `scontrol requeue` before exiting
    max_requeues: int = (
        0  # total self-requeues allowed per job; 0 = unlimited (the progress guard still applies)
    )
    max_requeues_without_progress: int = 2  # guard: stop requeueing when the committed step stalls
    save_watchdog_s: float = 90.0  # a preemption save that takes longer ends the process
    on_save_error: str = (
        "raise"  # a failed save: "raise" (exit 1), "continue" training, or "exit" with exit_code
    )
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
        if self.on_save_error not in ("raise", "continue", "exit"):
            raise ValueError(
                f"resilience.on_save_error must be 'raise', 'continue' or 'exit', got {self.on_save_error!r}"
            )
