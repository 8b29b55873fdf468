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

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kempnerforge.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
