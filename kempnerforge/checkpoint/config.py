"""Checkpoint configuration, kept beside the checkpoint code it drives."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field


class AsyncCheckpointMode(str, enum.Enum):
    """How a save leaves the training loop.

    ``disabled``: the save is synchronous; ``latest`` is committed before ``save()`` returns.
    ``async_``: the state is copied to host memory, then written by a background thread.
    ``async_pinned``: like ``async_`` but stages into pinned host buffers allocated once and
    reused (on CUDA); on CPU it behaves as ``async_``.
    """

    disabled = "disabled"
    async_ = "async"
    async_pinned = "async_with_pinned_mem"


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: <output_dir>/checkpoints
    interval: int = 100  # maybe_save saves every N optimizer steps
    interval_s: float = 0.0  # also save once this many seconds passed since the last save; 0 = off
    async_mode: AsyncCheckpointMode = AsyncCheckpointMode.disabled
    keep_last_n: int = 3  # <= 0 keeps every checkpoint
    # explicit checkpoint to resume from (a step dir or a checkpoint dir)
    load_path: str | None = None
    exclude_from_loading: list[str] = field(default_factory=list)  # e.g. ["optimizer"]
    ignore_freeze_mismatch: bool = False
    dir_mode: int = 0o700  # permissions of directories we create
    writer_threads: int = 0  # file writer threads per rank; 0 = min(8, CPU cores)
    writer: str = "staged"  # "staged" (ours, same DCP files, faster) | "dcp" (FileSystemWriter)
    verify_on_load: str = "size"  # "none" | "size" | "full" (checksums)
    save_timeout_s: float = 600.0  # a save not durable after this long is reported as hung
    # Every committed checkpoint of this run's dir unusable: "raise" (naming each), or
    # "start_fresh" (train from step 0 beside them, loudly; they are kept for inspection).
    on_all_corrupt: str = "raise"

    def __post_init__(self) -> None:
        if isinstance(self.async_mode, str) and not isinstance(
            self.async_mode, AsyncCheckpointMode
        ):
            try:
                self.async_mode = AsyncCheckpointMode(self.async_mode)
            except ValueError:
                valid = ", ".join(m.value for m in AsyncCheckpointMode)
                raise ValueError(
                    f"checkpoint.async_mode={self.async_mode!r} is not a mode; use one of: {valid}"
                ) from None
        if not isinstance(self.async_mode, AsyncCheckpointMode):
            raise ValueError(
                f"checkpoint.async_mode must be an AsyncCheckpointMode, got {self.async_mode!r}"
            )
        if self.interval <= 0:
            raise ValueError(
                f"checkpoint.interval must be > 0 (steps between saves), got {self.interval}"
            )
        if self.writer_threads < 0:
            raise ValueError(
                f"checkpoint.writer_threads must be >= 0 (0 = automatic), got {self.writer_threads}"
            )
        if self.writer not in ("staged", "dcp"):
            raise ValueError(
                f"checkpoint.writer must be 'staged' (default) or 'dcp' (torch's own "
                f"FileSystemWriter), got {self.writer!r}"
            )
        if self.verify_on_load not in ("none", "size", "full"):
            raise ValueError(
                f"checkpoint.verify_on_load must be 'none', 'size' or 'full', got {self.verify_on_load!r}"
            )
        if not 0 <= self.dir_mode <= 0o777:
            raise ValueError(
                f"checkpoint.dir_mode must be a permission mode like 0o700, got {self.dir_mode!r}"
            )
        if self.interval_s < 0:
            raise ValueError(
                f"checkpoint.interval_s must be >= 0 (seconds between saves; 0 = off), got "
                f"{self.interval_s}"
            )
        if self.on_all_corrupt not in ("raise", "start_fresh"):
            raise ValueError(
                f"checkpoint.on_all_corrupt must be 'raise' or 'start_fresh', got "
                f"{self.on_all_corrupt!r}"
            )
        if self.save_timeout_s <= 0:
            raise ValueError(f"checkpoint.save_timeout_s must be > 0, got {self.save_timeout_s}")

    def resolved_writer_threads(self) -> int:
        """``writer_threads``, with 0 meaning min(8, CPU cores): on the H100 machine 8 threads wrote
        fsync'd files at 2.27 GB/s against 1.10 with one, and they also hash what they write."""
        if self.writer_threads > 0:
            return self.writer_threads
        return max(1, min(8, os.cpu_count() or 1))
