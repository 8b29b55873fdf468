"""Deadlines that end the process when the main thread cannot: a stop save that does not finish,
and a run whose steps stopped making progress (a hung rank, collective or data loader).

Both run in a daemon thread and, when their time is up, print what happened, dump every
thread's Python stack into the job log (``faulthandler``), let the caller decide the exit code
(rank 0 asks the requeue guard for another run), and leave through ``os._exit``: the main thread
is stuck, so nothing it holds can be unwound. A C-level ``faulthandler`` backstop fires a minute
later in case the stuck thread holds the interpreter lock and no Python thread can run.

A process forked from the watched one (a DataLoader worker) gets no watchdog: the threads do not
come along, a watchdog it inherited does nothing there, and the backstop is disarmed around every
``fork`` (and re-armed in the parent). An armed ``faulthandler`` timer inherited without its
thread would make any later cancel or re-arm in the child, including a user's, wait forever.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import statistics
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

logger = logging.getLogger(__name__)

BACKSTOP_S = 60.0

_backstop_mutex = threading.Lock()
_backstop_deadline: float | None = None  # monotonic time our armed backstop fires


def _arm_backstop(seconds: float) -> None:
    """Arm the C-level backstop: dump every stack and exit after ``seconds``."""
    global _backstop_deadline
    with _backstop_mutex:
        faulthandler.dump_traceback_later(seconds, exit=True)
        _backstop_deadline = time.monotonic() + seconds


def _cancel_backstop() -> None:
    global _backstop_deadline
    with _backstop_mutex:
        faulthandler.cancel_dump_traceback_later()
        _backstop_deadline = None


def _before_fork() -> None:
    _backstop_mutex.acquire()  # released by the after-fork hooks, so no arm or cancel races it
    if _backstop_deadline is not None:
        faulthandler.cancel_dump_traceback_later()


def _after_fork_in_parent() -> None:
    try:
        if _backstop_deadline is not None:
            left = max(_backstop_deadline - time.monotonic(), 0.001)
            faulthandler.dump_traceback_later(left, exit=True)
    finally:
        _backstop_mutex.release()


def _after_fork_in_child() -> None:
    global _backstop_mutex, _backstop_deadline
    _backstop_mutex = threading.Lock()
    _backstop_deadline = None
    for w in list(_hang_watchdogs):
        w._inherit()


_hang_watchdogs: weakref.WeakSet[HangWatchdog] = weakref.WeakSet()


def dump_stacks() -> None:
    """Every thread's Python stack to stderr (the job log)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()


def _leave(message: str, decide: Callable[[], int], stacks: bool) -> None:
    try:
        logger.critical("%s", message)
        sys.stderr.write(message + "\n")
        if stacks:
            dump_stacks()
        code = decide()
    except BaseException:  # the exit must happen whatever the decision raised
        code = 1
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class SaveWatchdog:
    """``with SaveWatchdog(90, "stop save of step 40", decide): ...`` exits with ``decide()``'s
    code when the block has not finished within ``timeout_s``."""

    def __init__(self, timeout_s: float, what: str, decide: Callable[[], int]) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.decide = decide
        self._done = threading.Event()
        self._pid: int | None = None  # the process that entered the block

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        _leave(
            f"watchdog: {self.what} did not finish within resilience.save_watchdog_s="
            f"{self.timeout_s:g}s; the last committed checkpoint stays 'latest' and a rerun "
            "resumes from it",
            self.decide,
            stacks=True,
        )

    def __enter__(self) -> SaveWatchdog:
        self._pid = os.getpid()
        threading.Thread(target=self._watch, name="kempnerforge-save-watchdog", daemon=True).start()
        _arm_backstop(self.timeout_s + BACKSTOP_S)
        return self

    def __exit__(self, *exc: object) -> None:
        if os.getpid() != self._pid:
            return  # a forked child leaving the block: the watchdog and backstop are the parent's
        self._done.set()
        _cancel_backstop()


class HangWatchdog:
    """Ends the run when ``beat()`` has not been called for longer than the threshold.

    ``timeout_s > 0`` is a fixed threshold, armed at the first beat. Otherwise it is
    ``max(min_s, factor x median interval between beats)``, armed once ``warmup`` intervals were
    measured (the first steps include compilation and warm-up). ``on_hang(message)`` returns the
    exit code. ``pause()`` / ``beat()`` around work that is not a step (a long synchronous save).
    """

    def __init__(
        self,
        on_hang: Callable[[str], int],
        *,
        timeout_s: float = 0.0,
        factor: float = 10.0,
        min_s: float = 300.0,
        warmup: int = 3,
        poll_s: float = 1.0,
    ) -> None:
        self.on_hang = on_hang
        self.timeout_s, self.factor, self.min_s, self.warmup = timeout_s, factor, min_s, warmup
        self.poll_s = poll_s
        self._intervals: deque[float] = deque(maxlen=101)
        self._last: float | None = None
        self._step: int | None = None
        self._paused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inherited = False  # a copy in a forked child: never starts a thread
        _hang_watchdogs.add(self)

    def _inherit(self) -> None:
        """In a forked child: no thread, and fresh synchronisation (the parent's watchdog
        thread may have held the event's lock at fork)."""
        self._inherited = True
        self._stop = threading.Event()
        self._stop.set()

    def threshold(self) -> float | None:
        """Seconds without a beat that count as a hang, or None while not armed."""
        if self.timeout_s > 0:
            return self.timeout_s
        if len(self._intervals) < self.warmup:
            return None
        return max(self.min_s, self.factor * statistics.median(self._intervals))

    def beat(self, step: int | None = None) -> None:
        now = time.monotonic()
        if self._last is not None and not self._paused:
            self._intervals.append(now - self._last)
        self._last, self._step, self._paused = now, step, False
        if self._thread is None and not self._inherited:
            self._thread = threading.Thread(
                target=self._watch, name="kempnerforge-hang-watchdog", daemon=True
            )
            self._thread.start()

    def pause(self) -> None:
        """Not a step until the next beat (which restarts the clock without measuring)."""
        self._paused = True

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            limit, last = self.threshold(), self._last
            if self._paused or limit is None or last is None:
                continue
            idle = time.monotonic() - last
            if idle > limit:
                _arm_backstop(BACKSTOP_S)
                msg = (
                    f"no step progress for {idle:.0f}s after step {self._step} (hang threshold "
                    f"{limit:.0f}s)"
                )
                _leave(msg, lambda m=msg: self.on_hang(m), stacks=True)


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
