"""Preemption signals: the handler only records; the training loop decides at a step boundary.

A handler may run between any two bytecodes of the main thread, including inside a collective
or a checkpoint write, so it does nothing but set a flag. A second signal (SLURM may resend;
a user may press twice) is counted and otherwise ignored: it cannot interrupt the save that
the first one started.

A process forked from the one that installed the handlers (a DataLoader worker) has no training
loop that would read the flag, and must not die of the signal either: SLURM and our launcher send
a preemption signal to every process of the task, and a worker killed by it would fail the
loader (its SIGCHLD handler raises in the main thread) in the middle of the stop save. So at
fork the child's handlers for these signals become a handler that does nothing; the worker ends
when its loader shuts it down (or when it sees its parent gone). A program the worker ``exec``s
gets the default dispositions back, as for any Python handler.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import weakref
from types import FrameType

logger = logging.getLogger(__name__)

# Flags with handlers installed (a forked child quiets their signals).
_installed: list[weakref.ref[PreemptionFlag]] = []


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
        if self._previous and not any(r() is self for r in _installed):
            _installed.append(weakref.ref(self))
        return self

    def uninstall(self) -> None:
        self._restore()
        _installed[:] = [r for r in _installed if r() is not None and r() is not self]

    def _restore(self) -> None:
        for sig, prev in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the
            # closest we can put back
            signal.signal(sig, signal.SIG_DFL if prev is None else prev)  # type: ignore[arg-type]
        self._previous.clear()

    def request(self, name: str = "manual") -> None:
        """Ask for a stop from code (tests, a time budget) as if a signal had arrived."""
        self.count += 1
        self.signal_names.add(name)
        if not self.requested:
            self.signal_name = name
            self.requested = True


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The handler of a forked child: the parent owns the stop."""


def _quiet_in_child() -> None:
    """After ``fork``, in the child (whose forking thread is now its main thread)."""
    flags = [f for f in (r() for r in reversed(_installed)) if f is not None]
    _installed.clear()
    for flag in flags:
        for sig in flag._previous:
            try:
                signal.signal(sig, _ignore)
            except (OSError, ValueError) as e:  # pragma: no cover - nothing expected here
                logger.warning("could not quiet signal %s in a forked process: %s", sig, e)
        flag._previous.clear()


os.register_at_fork(after_in_child=_quiet_in_child)
