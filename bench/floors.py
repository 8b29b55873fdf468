"""Physical floors a checkpoint cannot beat, measured in the same run as the figures.

Why measure instead of quoting a datasheet: shared HPC nodes, VMs and network filesystems differ by
an order of magnitude from their nominal numbers, and a ratio "our time / floor time" is only
meaningful when both were taken on the same machine, the same filesystem and the same minute.

Every floor is the *best* of a few repetitions (a floor is what the hardware can do, not what it
does on average), in GB/s with GB = 1e9 bytes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from kempnerforge.checkpoint.storage import fsync_dir

logger = logging.getLogger(__name__)

GB = 1e9
_CHUNK = 16 * 1024 * 1024  # write/read granularity: large enough to hit the device's streaming rate


def memcpy_gbps(nbytes: int, repeats: int = 5) -> float:
    """Host memcpy into an existing (already touched) buffer.

    This is the floor of CPU staging with reused buffers: the state has to be read once and written
    once into memory that already exists. Uses ``Tensor.copy_`` (the primitive a stager uses), with
    torch's own intra-op threads.
    """
    n = max(nbytes // 4, 1)
    src = torch.rand(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.fill_(1.0)  # first touch outside the timed region
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best / GB


def fresh_alloc_copy_gbps(nbytes: int, repeats: int = 3) -> float:
    """Copy into a *fresh* allocation each time (what a stager without buffer reuse pays).

    Not a floor; reported so users see why buffer reuse matters (first touch of new pages).
    """
    n = max(nbytes // 4, 1)
    src = torch.rand(n, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
        del dst
    return src.numel() * 4 / best / GB


def pinned_d2h(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Device-to-host copy into an existing pinned buffer, and the one-off cost of pinning.

    Returns ``{"pinned_d2h_gbps", "pinned_alloc_s_per_gib"}``; the copy is timed with a device
    synchronize around it (the copy is asynchronous with respect to the host).
    """
    if not torch.cuda.is_available():
        return {}
    n = max(nbytes // 4, 1)
    src = torch.rand(n, dtype=torch.float32, device="cuda")
    t0 = time.perf_counter()
    dst = torch.empty(n, dtype=torch.float32, pin_memory=True)
    alloc_s = time.perf_counter() - t0
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    out = {
        "pinned_d2h_gbps": n * 4 / best / GB,
        "pinned_alloc_s_per_gib": alloc_s / (n * 4 / 2**30),
    }
    del src, dst
    torch.cuda.empty_cache()
    return out


def _payload(nbytes: int, block: int = 256 << 20) -> memoryview:
    """Incompressible bytes (a filesystem that compresses zeros would flatter the floor).

    A random block of up to 256 MiB, repeated: far beyond any compressor's window, and generating
    gigabytes of random bytes one by one would take longer than writing them.
    """
    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, 256, (min(nbytes, block),), dtype=torch.uint8, generator=g)
    reps = -(-nbytes // b.numel())
    t = b.repeat(reps)[:nbytes] if reps > 1 else b
    return memoryview(t.numpy()).cast("B")


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop clean cached pages of ``paths`` so a following read measures the storage, not RAM.

    ``posix_fadvise(DONTNEED)`` needs no privileges and drops only pages already written back
    (our files are fsynced first). Where it is unavailable the read figure is a cached read; the
    caller records whether eviction was possible.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _write_files(directory: Path, payload: memoryview, threads: int) -> tuple[float, list[Path]]:
    """Write ``payload`` split over ``threads`` files, one writer thread each, fsync each file."""
    per = len(payload) // threads
    paths = [directory / f"floor_{threads}_{i}.bin" for i in range(threads)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            part = payload[i * per : (i + 1) * per if i < threads - 1 else len(payload)]
            fd = os.open(paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for off in range(0, len(part), _CHUNK):
                    view = part[off : off + _CHUNK]
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:  # surfaced below; a floor must not silently shrink
            errors.append(e)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    fsync_dir(directory)
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed, paths


def _read_files(paths: list[Path], threads: int) -> float:
    """Read ``paths`` back (one thread per file, up to ``threads``) into reused buffers."""
    errors: list[BaseException] = []

    def work(p: Path) -> None:
        try:
            buf = bytearray(_CHUNK)
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        except BaseException as e:
            errors.append(e)

    t0 = time.perf_counter()
    pending = list(paths)
    while pending:
        batch, pending = pending[:threads], pending[threads:]
        ts = [threading.Thread(target=work, args=(p,)) for p in batch]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def disk_floors(
    directory: Path, nbytes: int, thread_counts: tuple[int, ...] = (1, 4, 8), read: bool = True
) -> dict[str, object]:
    """fsync'd write GB/s for each writer-thread count (best taken), and cold read GB/s.

    Written into ``directory`` (the checkpoint filesystem under test) and removed afterwards.
    """
    directory.mkdir(parents=True, exist_ok=True)
    payload = _payload(nbytes)
    write: dict[str, float] = {}
    best_threads, best_gbps = 0, 0.0
    keep: list[Path] = []
    for th in thread_counts:
        elapsed, paths = _write_files(directory, payload, th)
        gbps = nbytes / elapsed / GB
        write[str(th)] = gbps
        if gbps > best_gbps:
            for p in keep:
                p.unlink(missing_ok=True)
            best_threads, best_gbps, keep = th, gbps, paths
        else:
            for p in paths:
                p.unlink(missing_ok=True)
    reads: dict[str, float] = {}
    for th in sorted({1, best_threads}) if read else ():
        evict_from_page_cache(keep)
        reads[str(th)] = nbytes / _read_files(keep, th) / GB
    for p in keep:
        p.unlink(missing_ok=True)
    return {
        "write_fsync_gbps_by_threads": write,
        "write_fsync_gbps": best_gbps,
        "write_fsync_best_threads": best_threads,
        "read_gbps_by_threads": reads,
        "read_gbps": max(reads.values(), default=0.0),
        "read_cache_evicted": hasattr(os, "posix_fadvise"),
        "disk_floor_bytes": nbytes,
    }


def write_floor(directory: Path, nbytes: int, threads: int) -> dict[str, float | int]:
    """One fsync'd write of exactly ``nbytes`` over ``threads`` writer threads; files removed after.

    Why a second write floor: a drive's write cache makes a short fsync'd write faster than a long
    one, so a floor taken on fewer bytes than a checkpoint is a floor the checkpoint cannot reach.
    Returns ``{"bytes", "threads", "s", "gbps"}``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        elapsed, _ = _write_files(directory, _payload(nbytes), threads)
    finally:  # also after a failed write: the files would take the disk from what follows
        for p in directory.glob(f"floor_{threads}_*.bin"):
            p.unlink(missing_ok=True)
    return {"bytes": nbytes, "threads": threads, "s": elapsed, "gbps": nbytes / elapsed / GB}


def measure_all(directory: Path, mem_bytes: int, disk_bytes: int) -> dict[str, object]:
    """All floors of this machine: memcpy, fresh-alloc copy, pinned D2H (CUDA), disk write/read."""
    out: dict[str, object] = {
        "memcpy_gbps": memcpy_gbps(mem_bytes),
        "fresh_alloc_copy_gbps": fresh_alloc_copy_gbps(mem_bytes),
        "floor_mem_bytes": mem_bytes,
    }
    out.update(pinned_d2h(mem_bytes))
    out.update(disk_floors(directory, disk_bytes))
    logger.info("floors: %s", out)
    return out
