"""Ends the process if the preemption save does not finish in time.

SLURM sends the preemption signal a lead time before it kills the job. A save that hangs
(a stuck filesystem, a rank that died mid-collective) would otherwise sit until SIGKILL with no
message. The watchdog, set shorter than the lead, prints what happened and exits: ``latest``
still points at the last committed checkpoint, so a rerun resumes from there.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)


class SaveWatchdog:
    """``with SaveWatchdog(90, "preemption save of step 40", exit_code=75): ...``"""

    def __init__(self, timeout_s: float, what: str, exit_code: int) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.exit_code = exit_code
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        msg = (
            f"watchdog: {self.what} did not finish within resilience.save_watchdog_s="
            f"{self.timeout_s:g}s; exiting with code {self.exit_code}. The last committed "
            "checkpoint stays 'latest' and a rerun resumes from it."
        )
        logger.critical(msg)
        try:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
        finally:
            os._exit(self.exit_code)

    def __enter__(self) -> SaveWatchdog:
        self._thread = threading.Thread(target=self._watch, name="save-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
