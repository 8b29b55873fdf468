"""Small measuring helpers shared by the benchmark parts.

``new_host_bytes`` counts minor page faults of the whole process: touching memory that was not
mapped before faults once per page, so a save that stages into reused buffers faults ~0 bytes, and
one that allocates a fresh copy faults ~its size. That makes "second and later saves allocate no
new host memory" checkable without trusting the code under test.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path

import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Span:
    """Wall time and newly touched host bytes between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.f0 = 0

    def start(self) -> Span:
        self.t0 = time.perf_counter()
        self.f0 = minflt()
        return self

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def new_host_bytes(self) -> int:
        return (minflt() - self.f0) * PAGE


def settle(device: torch.device) -> None:
    """Start each timed save from the same state: device idle, no dirty pages queued for the disk."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    os.sync()


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
