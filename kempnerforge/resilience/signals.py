"""Preemption signals: the handler only records; the training loop decides at a step boundary.

A handler may run between any two bytecodes of the main thread, including inside a collective
or a checkpoint write, so it does nothing but set a flag. A second signal (SLURM may resend;
a user may press twice) is counted and otherwise ignored: it cannot interrupt the save that
the first one started.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)


class PreemptionFlag:
    """Installs handlers for ``names`` and records the first signal received."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None  # the first signal received
        self.signal_names: set[str] = set()  # every signal received
        self.count = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.signal_names.add(signal.Signals(signum).name)
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            self.requested = True

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self, names: list[str]) -> PreemptionFlag:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for name in names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def request(self, name: str = "manual") -> None:
        """Ask for a stop from code (tests, a time budget) as if a signal had arrived."""
        self.count += 1
        self.signal_names.add(name)
        if not self.requested:
            self.signal_name = name
            self.requested = True
