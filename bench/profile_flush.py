"""Where does the time between ``save()`` and a durable ``latest`` go? A phase profile.

    python bench/profile_flush.py --size gpt-1b --out flush.json        # on a GPU machine
    python bench/profile_flush.py --size gpt-29m --cpu                   # anywhere

Wraps (in this process only) the functions one save passes through - DCP's ``save``, the
manifest checksums, train-state write, metadata write, directory commit, ``latest`` swap, fsyncs -
with timers, then runs a few saves per variant: our staged writer and DCP's ``FileSystemWriter``
at several thread counts; ``--floor`` first measures the fsync'd-write floor at exactly the state's
size on the same filesystem. A diagnostic, not a benchmark:
it monkeypatches the checkpoint package and must not be imported by anything else.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
import floors  # noqa: E402
import gpt  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from checkpoint_bench import CPU_SIZES, GPU_SIZES, SMOKE_SIZES  # noqa: E402
from measure import remove, settle  # noqa: E402

import kempnerforge.checkpoint.manager as manager_mod  # noqa: E402
import kempnerforge.checkpoint.storage as storage  # noqa: E402
from kempnerforge.checkpoint import CheckpointManager  # noqa: E402
from kempnerforge.config import CheckpointConfig  # noqa: E402

_lock = threading.Lock()
PHASES: dict[str, float] = defaultdict(float)


def _timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            with _lock:
                PHASES[name] += time.perf_counter() - t0

    return wrapper


def instrument() -> None:
    orig = getattr(instrument, "_orig", None)
    if orig is None:
        orig = instrument._orig = {  # type: ignore[attr-defined]
            "dcp.save": dcp.save,
            "manifest_entries": storage.manifest_entries,
            **{n: getattr(storage, n) for n in _STORAGE_FNS},
            "_state_dict": manager_mod.CheckpointManager._state_dict,
        }
    dcp.save = _timed("dcp.save (write + fsync shards)", orig["dcp.save"])
    storage.manifest_entries = _timed(
        "manifest (checksum re-reads, if any)", orig["manifest_entries"]
    )
    for n in _STORAGE_FNS:
        setattr(storage, n, _timed(f"storage.{n}", orig[n]))
    manager_mod.CheckpointManager._state_dict = _timed("get_*_state_dict", orig["_state_dict"])


_STORAGE_FNS = (
    "atomic_write_bytes",
    "atomic_write_json",
    "commit_dir",
    "atomic_symlink",
    "fsync_dir",
    "make_dir",
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="gpt-1b")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()) / "kempnerforge-flush-profile"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--saves", type=int, default=2, help="timed saves per variant (after a warm-up)"
    )
    ap.add_argument("--variants", type=int, default=3, help="how many of the variants to run")
    ap.add_argument("--floor", action="store_true", help="measure the disk floor at the state size")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    size = next(s for s in GPU_SIZES + CPU_SIZES + SMOKE_SIZES if s.name == args.size)
    model, opt = gpt.build(size, device)
    gpt.train_step(model, opt, gpt.make_batch(size, 1, 64, device))
    nbytes, _ = gpt.state_bytes(model, opt)
    mode = "async_with_pinned_mem" if device.type == "cuda" else "async"
    variants = [
        ("staged writer (default), 8 threads", "staged", 8),
        ("DCP FileSystemWriter, 8 threads", "dcp", 8),
        ("staged writer, 4 threads", "staged", 4),
        ("staged writer, 16 threads", "staged", 16),
        ("DCP FileSystemWriter, 4 threads", "dcp", 4),
    ][: args.variants]
    report: dict[str, Any] = {
        "size": size.name,
        "state_bytes": nbytes,
        "device": str(device),
        "torch": torch.__version__,
        "variants": [],
    }
    ckpt = args.dir / "flush"
    remove(ckpt)
    # One manager for every variant: its staging buffers are allocated once (by the warm-up save)
    # and the writer-thread count is read at each save.
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(ckpt), async_mode=mode, keep_last_n=1), model, opt
    )
    instrument()
    mgr.save(1)
    mgr.wait()
    step = 1
    if args.floor:  # the fsync'd-write floor at exactly this state's size, same filesystem
        fl = floors.disk_floors(args.dir / "floor", nbytes, (8,), read=False)
        report["floor"] = fl
        print(
            f"fsync'd write floor at {nbytes / 1e9:.2f} GB: {fl['write_fsync_gbps']:.2f} GB/s "
            f"(8 threads) = {nbytes / 1e9 / fl['write_fsync_gbps']:.2f} s",
            flush=True,
        )
    # Rounds alternate the variants (A, B, A, B, ...): a disk whose rate drifts under sustained
    # writes then penalises every variant alike instead of whichever ran last.
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in variants}
    for _ in range(args.saves):
        for label, kind, threads in variants:
            mgr.checkpointer.writer_threads = threads
            mgr.checkpointer.writer_kind = kind
            step += 1
            settle(device)
            PHASES.clear()
            t0 = time.perf_counter()
            mgr.save(step)
            blocked = time.perf_counter() - t0
            mgr.wait()
            durable = time.perf_counter() - t0
            runs[label].append(
                {"blocked_s": blocked, "durable_s": durable, "phases_s": dict(PHASES)}
            )
            print(f"  {label}: durable {durable:.2f}s", flush=True)
    if args.floor:  # again after the saves: a disk that slows under sustained writes shows here
        fl2 = floors.disk_floors(args.dir / "floor", nbytes, (8,), read=False)
        report["floor_after"] = fl2
        print(
            f"fsync'd write floor again after the saves: {fl2['write_fsync_gbps']:.2f} GB/s "
            f"= {nbytes / 1e9 / fl2['write_fsync_gbps']:.2f} s",
            flush=True,
        )
    for label, kind, threads in variants:
        best = min(runs[label], key=lambda r: r["durable_s"])
        report["variants"].append(
            {"label": label, "writer": kind, "writer_threads": threads, "runs": runs[label]}
        )
        print(
            f"{label}: blocked {best['blocked_s']:.3f}s durable {best['durable_s']:.2f}s "
            f"({nbytes / best['durable_s'] / 1e9:.2f} GB/s; all: "
            f"{', '.join(format(r['durable_s'], '.2f') for r in runs[label])})",
            flush=True,
        )
        for k, v in sorted(best["phases_s"].items(), key=lambda kv: -kv[1]):
            print(f"    {k:40s} {v:8.3f}s", flush=True)
    mgr.close()
    remove(ckpt)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
