"""A DCP storage reader that reads a checkpoint's files in parallel.

DCP's ``FileSystemReader`` reads the files of a load plan one after another in the caller's
thread: one stream from the disk, so a resume runs at a single reader's rate (on the disks we
measured, 60-80% of what several readers get). :class:`CheckpointReader` splits the plan by file
and hands each file to DCP's own ``read_data`` in a pool of threads; the bytes, the checks and
the copies into the target tensors are DCP's. File reads and tensor copies release the
interpreter lock, so the threads overlap; the planner's own bookkeeping (resolving a target,
storing a non-tensor value) runs under one lock, as it does when DCP calls it from one thread.

Metadata is read through :class:`~kempnerforge.checkpoint.safe_unpickle.SafeFileSystemReader`
(no foreign code runs while resuming).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.futures import Future

from kempnerforge.checkpoint.safe_unpickle import SafeFileSystemReader

DEFAULT_READ_THREADS = 8


class _SerialPlanner:
    """Passes the planner calls of DCP's ``read_data`` on one at a time, across reader threads.

    A plain planner was written for one caller: storing a value may create the dicts above it
    (check, then insert), which two threads could interleave.
    """

    def __init__(self, planner: Any) -> None:
        self._planner = planner
        self._lock = threading.Lock()

    def load_bytes(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._planner.load_bytes(*args, **kwargs)

    def resolve_tensor(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._planner.resolve_tensor(*args, **kwargs)

    def commit_tensor(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._planner.commit_tensor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


class CheckpointReader(SafeFileSystemReader):
    """Safe metadata, and the plan's files read by up to ``read_threads`` threads at once."""

    def __init__(
        self,
        path: str | os.PathLike,
        *args: Any,
        read_threads: int = DEFAULT_READ_THREADS,
        **kw: Any,
    ) -> None:
        super().__init__(path, *args, **kw)
        if read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {read_threads}")
        self.read_threads = read_threads

    def _by_file(self, plan: Any) -> list[list[Any]]:
        """The plan's items grouped by the file they come from, largest file first."""
        groups: dict[str, list[Any]] = {}
        size: dict[str, int] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            groups.setdefault(info.relative_path, []).append(item)
            size[info.relative_path] = size.get(info.relative_path, 0) + int(info.length)
        return [groups[p] for p in sorted(groups, key=lambda p: -size[p])]

    def read_data(self, plan: Any, planner: Any) -> Future[None]:
        groups = self._by_file(plan)
        threads = min(self.read_threads, len(groups))
        if threads <= 1:
            return super().read_data(plan, planner)
        serial = _SerialPlanner(planner)
        device = (
            torch.cuda.current_device()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )

        def read(items: list[Any]) -> None:
            if device is not None:  # a new thread would otherwise use (and init) GPU 0
                torch.cuda.set_device(device)
            FileSystemReader.read_data(self, dataclasses.replace(plan, items=items), serial).wait()

        with ThreadPoolExecutor(threads, thread_name_prefix="kempnerforge-read") as pool:
            for f in [pool.submit(read, items) for items in groups]:
                f.result()  # the first failure is raised, naming DCP's own error
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut
