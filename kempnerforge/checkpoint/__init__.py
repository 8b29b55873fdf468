"""Distributed checkpointing for KempnerForge.

Public API (the original KempnerForge's, see docs/checkpointing.md):
:class:`CheckpointManager` (save / load / cleanup, and ``resume`` / ``maybe_save`` for a training
loop), :class:`AsyncCheckpointer` (non-blocking saves), :func:`build_train_state` /
:func:`restore_train_state` (the non-distributed state), :func:`get_rng_state` /
:func:`set_rng_state`, :func:`load_train_state_extras`.

Names load on first use, so the torch-free parts (``storage``, ``resolve``) can be imported by
launchers without importing torch.
"""

from __future__ import annotations

from kempnerforge._lazy import lazy_exports

_EXPORTS = {
    "AsyncCheckpointMode": "kempnerforge.checkpoint.config",
    "CheckpointConfig": "kempnerforge.checkpoint.config",
    "AsyncCheckpointer": "kempnerforge.checkpoint.async_save",
    "CheckpointError": "kempnerforge.checkpoint.async_save",
    "SaveStats": "kempnerforge.checkpoint.async_save",
    "CheckpointManager": "kempnerforge.checkpoint.manager",
    "build_train_state": "kempnerforge.checkpoint.state",
    "get_rng_state": "kempnerforge.checkpoint.state",
    "load_train_state_extras": "kempnerforge.checkpoint.state",
    "restore_train_state": "kempnerforge.checkpoint.state",
    "set_rng_state": "kempnerforge.checkpoint.state",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
