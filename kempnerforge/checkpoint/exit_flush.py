"""At interpreter exit, finish (or report) the async saves still in flight.

The hook runs before the interpreter stops thread pools (the writer's threads must still be
able to start): ``threading``'s exit hooks run before ``atexit``'s, newest first. It acts only
in the process that registered the managers: a process forked from it (a DataLoader worker)
inherits the hook and the managers' memory, but not their threads, and must leave both alone.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kempnerforge.checkpoint.manager import CheckpointManager

logger = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()
_OWNER_PID = os.getpid()


def track(mgr: CheckpointManager) -> None:
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


def flush_at_exit(mgr: CheckpointManager) -> None:
    """An async save still in flight when the interpreter exits: finish it, or say so."""
    step = mgr.inflight_step
    if step is None and not mgr.checkpointer.is_pending:
        return
    try:
        if not mgr.checkpointer.join(timeout=mgr.config.save_timeout_s):
            logger.warning(
                "checkpoint of step %s was still being written at exit and did not finish "
                "within checkpoint.save_timeout_s; it is lost (latest still points at the "
                "previous checkpoint). Call mgr.wait() before exiting.",
                step,
            )
            return
        mgr.close()
        if step is not None:
            logger.info("checkpoint of step %s was in flight at exit: finished and committed", step)
    except BaseException as e:
        logger.warning(
            "checkpoint of step %s was in flight at exit and failed (%s); latest still points "
            "at the previous checkpoint",
            step,
            e,
        )


def _register() -> None:
    hook = getattr(threading, "_register_atexit", None)
    if hook is not None:
        hook(_flush_all_at_exit)
    else:  # pragma: no cover - an interpreter without it
        atexit.register(_flush_all_at_exit)
    os.register_at_fork(after_in_child=_forget_in_child)


_register()
