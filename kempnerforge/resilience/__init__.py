"""Stopping a training run cleanly, and starting it again only when that makes sense.

Most loops need none of this directly: ``CheckpointManager.resume`` / ``maybe_save`` use it (see
docs/own-script.md). Public names: :class:`ResilienceConfig`; the stop path
(:class:`StopController`, :func:`classify`, :func:`requeue_code`, :func:`hang_exit_code`); why a job stops (:func:`classify_stop`,
:class:`StopReason`); the requeue guard (:func:`maybe_requeue`, :func:`last_decision`); the
watchdogs (:class:`SaveWatchdog`, :class:`HangWatchdog`); the signal flag
(:class:`PreemptionFlag`); the cross-rank agreement (:class:`StopAgreement`). Exit codes are in
:mod:`kempnerforge.exit_codes`.

Names load on first use, so the torch-free parts (config, reason, requeue) can be imported by
launchers without importing torch.
"""

from __future__ import annotations

from kempnerforge._lazy import lazy_exports

_EXPORTS = {
    "ResilienceConfig": "kempnerforge.resilience.config",
    "StopController": "kempnerforge.resilience.stop",
    "classify": "kempnerforge.resilience.stop",
    "requeue_code": "kempnerforge.resilience.stop",
    "hang_exit_code": "kempnerforge.resilience.stop",
    "StopReason": "kempnerforge.resilience.reason",
    "classify_stop": "kempnerforge.resilience.reason",
    "maybe_requeue": "kempnerforge.resilience.requeue",
    "last_decision": "kempnerforge.resilience.requeue",
    "SaveWatchdog": "kempnerforge.resilience.watchdog",
    "HangWatchdog": "kempnerforge.resilience.watchdog",
    "PreemptionFlag": "kempnerforge.resilience.signals",
    "StopAgreement": "kempnerforge.resilience.agree",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
