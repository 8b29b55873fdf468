"""Distributed checkpointing for KempnerForge.

Public API: :class:`CheckpointManager` (save/load/cleanup), :class:`AsyncCheckpointer`
(non-blocking saves), :func:`build_train_state` / :func:`restore_train_state` (the
non-distributed state), :func:`get_rng_state` / :func:`set_rng_state`. See docs/checkpointing.md.
"""

from __future__ import annotations

from kempnerforge.checkpoint.async_save import AsyncCheckpointer, CheckpointError, SaveStats
from kempnerforge.checkpoint.config import AsyncCheckpointMode, CheckpointConfig
from kempnerforge.checkpoint.manager import CheckpointManager
from kempnerforge.checkpoint.state import (
    build_train_state,
    get_rng_state,
    restore_train_state,
    set_rng_state,
)

__all__ = [
    "AsyncCheckpointMode",
    "AsyncCheckpointer",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "SaveStats",
    "build_train_state",
    "get_rng_state",
    "restore_train_state",
    "set_rng_state",
]
