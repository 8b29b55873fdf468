"""At interpreter exit, finish (or report) the async saves still in flight.

The hook runs before the interpreter stops thread pools (the writer's threads must still be
able to start): ``threading``'s exit hooks run before ``atexit``'s, newest first. It acts only
in the process that registered the managers: a process forked from it (a DataLoader worker)
inherits the hook and the managers' memory, but not their threads, and must leave both alone.
A save that ended before exit, waited for or not, is not in flight: nothing is said about it
unless it failed.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import weakref
from typing import Any, Protocol


class Flushable(Protocol):
    """What the exit hook needs of a manager (it never imports the manager)."""

    config: Any

    @property
    def checkpointer(self) -> Any: ...

    @property
    def inflight_step(self) -> int | None: ...

    def wait(self) -> None: ...

    def close(self) -> None: ...


logger = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[Flushable] = weakref.WeakSet()
_OWNER_PID = os.getpid()


def track(mgr: Flushable) -> None:
    """Finish ``mgr``'s in-flight save at exit (as long as ``mgr`` is alive)."""
    _LIVE.add(mgr)


def _forget_in_child() -> None:
    global _OWNER_PID
    _OWNER_PID = os.getpid()
    _LIVE.clear()


def _flush_all_at_exit() -> None:
    if os.getpid() != _OWNER_PID:  # pragma: no cover - the fork hook already cleared _LIVE
        return
    for mgr in list(_LIVE):
        flush_at_exit(mgr)


def flush_at_exit(mgr: Flushable) -> None:
    """An async save still running when the interpreter exits: finish it, or say so.

    A save that already ended is not "in flight": its failure, if nobody waited for it, is
    reported as such, and only the checkpointer's thread is stopped (no collective, which a
    dead peer would make fail).
    """
    ck = mgr.checkpointer
    step = mgr.inflight_step
    if not ck.is_pending:
        error = ck.unreported_failure
        if error is not None:
            logger.warning(
                "a background checkpoint save failed and was never waited for (%s); latest "
                "still points at the previous checkpoint",
                error,
            )
        with contextlib.suppress(BaseException):
            ck.close()  # its thread must not run Python while the interpreter finalizes
        return
    what = f"checkpoint of step {step}" if step is not None else "background checkpoint work"
    if not ck.join(timeout=mgr.config.save_timeout_s):
        logger.warning(
            "%s was still being written at exit and did not finish within "
            "checkpoint.save_timeout_s; it is lost (latest still points at the previous "
            "checkpoint). Call mgr.wait() before exiting.",
            what,
        )
        return
    try:
        ck.wait()
    except BaseException as e:
        logger.warning(
            "%s was in flight at exit and failed (%s); latest still points at the previous "
            "checkpoint",
            what,
            e,
        )
        return
    if step is not None:
        logger.info("%s was in flight at exit: finished and committed", what)
    try:
        mgr.close()
    except BaseException as e:
        logger.warning("closing the checkpoint manager at exit failed: %s", e)


def _register() -> None:
    hook = getattr(threading, "_register_atexit", None)
    if hook is not None:
        hook(_flush_all_at_exit)
    else:  # pragma: no cover - an interpreter without it
        atexit.register(_flush_all_at_exit)
    os.register_at_fork(after_in_child=_forget_in_child)


_register()
