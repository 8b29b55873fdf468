"""Checkpoint benchmark: our save/resume against the machine's floors, measured in one run.

    python bench/checkpoint_bench.py                  # CPU sizes up to ~2 GB (GPU sizes on CUDA)
    python bench/checkpoint_bench.py --smoke          # CI-sized, seconds, no thresholds
    python bench/checkpoint_bench.py --dir /scratch/me/ckpt-bench --out results.json

Why one run: a figure is only meaningful as a ratio to what the same machine and filesystem can do
in the same minutes (shared nodes and filesystems drift by 2x within an hour). So the benchmark
first measures the floors (host memcpy, pinned device-to-host on CUDA, fsync'd write with 1/4/8
writer threads, cold read), then for several state sizes (a GPT + AdamW) measures:

- the fsync'd write of exactly the state's bytes with the best thread count, right before our
  saves (a drive's write cache makes the general floor's shorter write faster than a checkpoint's;
  ``--no-size-floor`` skips it and judges against the general floor);
- our ``CheckpointManager`` save: caller blocked, save call to durable ``latest``, whether later
  saves touch new host memory (page faults), and the manager's own telemetry;
- the same state with ``torch.save``, DCP ``save`` and DCP ``async_save`` (defaults);
- resume: process start to first step after ``load()``, against a cold start without checkpoint;
- steady-state training throughput with an async save every N steps vs none (each save in the
  middle of its interval, so its copy and flush overlap later steps as in a run that goes on);
- preemption: SIGUSR1 to exit with a durable ``latest``.

It prints tables with ratios and targets, writes JSON (``--out``) after every stage (so a run cut
short keeps what it measured) and a PNG plot beside it. Nothing here asserts a threshold: the
table says "miss" and the run still succeeds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # a plain checkout works without `pip install -e .`
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p
)
import baselines  # noqa: E402
import floors  # noqa: E402
import gpt  # noqa: E402
import ours  # noqa: E402
import preempt  # noqa: E402
from measure import files_under, remove  # noqa: E402

logger = logging.getLogger("checkpoint_bench")

GB = 1e9

CPU_SIZES = [
    gpt.GPTSize("gpt-5m", 256, 4, 8192, 128),
    gpt.GPTSize("gpt-29m", 512, 8, 8192, 128),
    gpt.GPTSize("gpt-91m", 768, 12, 8192, 128),
    gpt.GPTSize("gpt-185m", 1024, 14, 8192, 128),
]
GPU_SIZES = [  # the largest first: the headline case must finish inside a time-boxed run
    gpt.GPTSize("gpt-1b", 2048, 18, 50304, 2048),
    gpt.GPTSize("gpt-124m", 768, 12, 50304, 2048),
    gpt.GPTSize("gpt-354m", 1024, 24, 50304, 2048),
    gpt.GPTSize("gpt-757m", 1536, 24, 50304, 2048),
]
SMOKE_SIZES = [gpt.GPTSize("tiny-1m", 128, 2, 1024, 64), gpt.GPTSize("tiny-3m", 192, 4, 2048, 64)]

TARGETS = {
    "block_ratio_gpu": 1.25,
    "block_ratio_cpu": 1.5,
    "durable_ratio": 1.25,
    "throughput_ratio": 0.99,
    "preempt_slack_s": 2.0,
    "resume_ratio": 1.5,
}
# After the size-matched write floor and before our first save: the drive may still be draining
# its write cache, and our save would pay for the floor's bytes.
SIZE_FLOOR_PAUSE_S = 2.0


# ---------------------------------------------------------------------------------------------
# Plumbing
# ---------------------------------------------------------------------------------------------
class Budget:
    """A wall-clock budget: optional stages are skipped (and recorded as skipped) when it runs out."""

    def __init__(self, seconds: float | None) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU x{os.cpu_count()} ({platform.processor() or platform.machine()})"


def fs_type(path: Path) -> str:
    """The filesystem type of ``path`` from /proc/mounts (longest matching mount point)."""
    try:
        best, kind = "", "?"
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
        return f"{kind} at {best}"
    except OSError:
        return "?"


def _loadavg() -> str | None:
    """Other work on the machine skews every figure; the JSON records how busy it was."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


# ---------------------------------------------------------------------------------------------
# Child processes: resume and preemption
# ---------------------------------------------------------------------------------------------
def run_worker(mode: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Start ``worker.py mode`` and return its RESULT plus the parent's view of the process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(HERE / "worker.py"), mode, "--spec", json.dumps(spec)]
    t_launch = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    t_exit = time.time()
    res = _parse_result(proc.stdout)
    if res is None:
        return {"error": f"worker {mode} rc={proc.returncode}: {proc.stderr[-1500:]}"}
    res.update(t_launch=t_launch, t_exit=t_exit, rc=proc.returncode)
    return res


def _parse_result(stdout: str) -> dict[str, Any] | None:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return None


def measure_resume(
    size: gpt.GPTSize, device: torch.device, ckpt_dir: Path, batch: int, seq: int, timeout: float
) -> dict[str, Any]:
    """Process start to first step, with and without loading the checkpoint in ``ckpt_dir``.

    The checkpoint's pages are evicted from the page cache first, so the load reads the storage
    as the read floor did (``posix_fadvise``; a restarted job on another node reads cold too).
    """
    spec = {"size": size.to_dict(), "device": str(device), "batch": batch, "seq": seq}
    fresh = run_worker("fresh", spec, timeout)
    floors.evict_from_page_cache(files_under(ckpt_dir))
    resumed = run_worker("resume", dict(spec, ckpt_dir=str(ckpt_dir)), timeout)
    out: dict[str, Any] = {"fresh": fresh, "resume": resumed}
    if "error" in fresh or "error" in resumed:
        return out
    out["startup_s"] = fresh["t_first_step"] - fresh["t_launch"]
    out["resume_s"] = resumed["t_first_step"] - resumed["t_launch"]
    out["load_s"] = resumed["t_loaded"] - resumed["t_built"]
    out["interpreter_and_imports_s"] = resumed["t_imported"] - resumed["t_launch"]
    return out


# ---------------------------------------------------------------------------------------------
# Steady-state throughput
# ---------------------------------------------------------------------------------------------
def save_steps(steps: int, interval: int) -> list[int]:
    """The steps (1-based) of an arm that save: the middle of each whole interval.

    In a run that goes on, a save's device-to-host copy and flush overlap the steps after it. A
    save on an arm's last step would instead be waited for by the arm's closing synchronize, and
    the arm would time an edge effect of the benchmark, not the steady state. So an arm of
    ``interval * k`` steps carries exactly ``k`` saves (``step % interval == interval // 2``),
    none on its last step (for ``interval`` >= 2); steps past the last whole interval save nothing.
    """
    return [k * interval + max(interval // 2, 1) for k in range(steps // interval)]


def measure_throughput(
    model: gpt.GPT,
    opt: torch.optim.Optimizer,
    size: gpt.GPTSize,
    root: Path,
    mode: str,
    batch: int,
    seq: int,
    interval: int,
    intervals: int,
    reps: int = 1,
) -> dict[str, Any]:
    """Training steps/s with an async save every ``interval`` steps vs none, same model, same run.

    Both arms run ``interval * intervals`` steps; the saving arm saves in the middle of each
    interval (``save_steps``), so each interval carries one save's blocking and its copy and flush
    overlap the steps after it, as in a run that goes on, instead of the arm's closing synchronize
    waiting for a save made on its last step. The loss is read every 10 steps, as a logging loop
    would, and the wall time of each such 10-step window is recorded (``windows_*_s``: where in
    the interval the time goes). With ``reps`` > 1 the arms alternate (none, save, none, save,
    ...) and each arm's best is kept: on a shared machine a neighbour's burst otherwise lands in
    one arm only.
    """
    from kempnerforge.checkpoint import CheckpointManager
    from kempnerforge.config import CheckpointConfig

    device = next(model.parameters()).device
    data = gpt.make_batch(size, batch, seq, device)
    n = interval * intervals
    due = set(save_steps(n, interval))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def arm(mgr: Any) -> tuple[float, list[float]]:
        windows: list[float] = []  # seconds per 10 steps
        sync()
        t0 = t_win = time.perf_counter()
        for step in range(1, n + 1):
            loss = gpt.train_step(model, opt, data)
            if step % 10 == 0:
                loss.item()  # synchronizes: the window's time is the device's too
                now = time.perf_counter()
                windows.append(now - t_win)
                t_win = now
            if mgr is not None and step in due:
                mgr.save(step)
        sync()
        return time.perf_counter() - t0, windows

    for _ in range(5):  # warm-up: kernels, allocator, autotuning
        gpt.train_step(model, opt, data)
    sync()
    ckpt = root / "throughput"
    remove(ckpt)
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(ckpt), interval=interval, async_mode=mode, keep_last_n=1),
        model,
        opt,
    )
    mgr.save(0)  # steady state: the first save's one-off work (plans, framing) is not timed
    mgr.wait()
    nones: list[tuple[float, list[float]]] = []
    saves: list[tuple[float, list[float]]] = []
    for _ in range(reps):
        nones.append(arm(None))
        saves.append(arm(mgr))
        mgr.wait()  # the last save's flush must not spill into the next no-save arm
    (t_none, win_none), (t_save, win_save) = (min(x, key=lambda r: r[0]) for x in (nones, saves))
    t0 = time.perf_counter()
    mgr.wait()
    tail = time.perf_counter() - t0
    close = getattr(mgr, "close", None)
    if callable(close):
        close()
    remove(ckpt)
    return {
        "size": size.name,
        "mode": mode,
        "interval": interval,
        "steps_per_arm": n,
        "tokens_per_step": batch * seq,
        "save_steps": sorted(due),
        "no_save_s": t_none,
        "with_save_s": t_save,
        "no_save_s_all": [t for t, _ in nones],
        "with_save_s_all": [t for t, _ in saves],
        "windows_none_s": win_none,  # of the best rep of each arm
        "windows_save_s": win_save,
        "step_s_no_save": t_none / n,
        "excess_per_save_s": (t_save - t_none) / len(due) if due else None,
        "final_wait_s": tail,
        "throughput_ratio": t_none / t_save,
    }


# ---------------------------------------------------------------------------------------------
# One state size
# ---------------------------------------------------------------------------------------------
def write_gbps(row: dict[str, Any] | None, fl: dict[str, Any]) -> tuple[float, str]:
    """The fsync'd-write floor a size's durable figures are judged against, and which one it is:
    the write of exactly that state's bytes where it was measured, else the general floor."""
    at_size = ((row or {}).get("write_floor_at_size") or {}).get("gbps")
    return (at_size, "at size") if at_size else (fl["write_fsync_gbps"], "general")


def size_floor(root: Path, nbytes: int, threads: int) -> dict[str, Any]:
    """The fsync'd-write floor at exactly this state's size, taken right before our saves.

    The general floor is measured once on fewer bytes, and a drive's write cache makes that
    faster than a checkpoint-sized write; this one is the floor a save of ``nbytes`` can reach.
    Then ``os.sync()`` and a pause, so our first save does not wait for the floor's bytes.
    """
    try:
        out: dict[str, Any] = dict(floors.write_floor(root / "size_floor", nbytes, threads))
    except Exception as e:
        logger.exception("size-matched write floor failed")
        out = {"bytes": nbytes, "threads": threads, "error": f"{type(e).__name__}: {e}"[:800]}
    os.sync()
    time.sleep(SIZE_FLOOR_PAUSE_S)
    out["pause_s"] = SIZE_FLOOR_PAUSE_S
    logger.info("fsync'd write floor at %.3f GB: %s", nbytes / GB, out)
    return out


def run_size(
    size: gpt.GPTSize,
    device: torch.device,
    root: Path,
    fl: dict[str, Any],
    args: argparse.Namespace,
    budget: Budget,
    result: dict[str, Any],
) -> None:
    row: dict[str, Any] = {"size": size.to_dict(), "name": size.name, "skipped": []}
    result["sizes"].append(row)
    t_build = time.perf_counter()
    model, opt = gpt.build(size, device)
    batch = gpt.make_batch(size, 1, min(64, size.seq_len), device)
    gpt.train_step(model, opt, batch)  # creates the AdamW state
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["build_s"] = time.perf_counter() - t_build
    row["state_bytes"], row["state_tensors"] = gpt.state_bytes(model, opt)
    nbytes = row["state_bytes"]
    write_s = nbytes / (fl["write_fsync_gbps"] * GB)
    logger.info("size %s: %.3f GB in %d tensors", size.name, nbytes / GB, row["state_tensors"])

    modes = args.modes or (["async_with_pinned_mem"] if device.type == "cuda" else ["async"])
    if args.size_floor:
        if budget.allows(write_s + SIZE_FLOOR_PAUSE_S + args.saves * (2 * write_s + 2) + 30):
            row["write_floor_at_size"] = size_floor(root, nbytes, fl["write_fsync_best_threads"])
            write_s = nbytes / (write_gbps(row, fl)[0] * GB)
        else:
            row["skipped"].append("size_floor")
    row["ours"] = {}
    for mode in modes:
        if not budget.allows(args.saves * (2 * write_s + 2) + 30):
            row["skipped"].append(f"ours:{mode}")
            continue
        try:
            row["ours"][mode] = ours.measure(
                model, opt, root, mode, args.saves, probe_background_commit=nbytes < 2.5 * GB
            )
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            logger.exception("our %s save failed", mode)
            row["ours"][mode] = {"error": f"{type(e).__name__}: {e}"[:800]}
        write_json(result, args.out)

    ours_dir = next(
        (Path(o["ckpt_dir"]) for o in row["ours"].values() if "ckpt_dir" in o and "error" not in o),
        None,
    )
    if "resume" not in args.skip and ours_dir is not None and size.name in args.resume_sizes:
        if budget.allows(nbytes / (fl["read_gbps"] * GB) * 2 + 2 * row["build_s"] + 40):
            try:
                row["resume"] = measure_resume(
                    size,
                    device,
                    ours_dir,
                    1,
                    min(64, size.seq_len),
                    timeout=max(min(budget.left(), 1800), 60),
                )
            except Exception as e:
                logger.exception("resume failed")
                row["resume"] = {"error": f"{type(e).__name__}: {e}"[:800]}
            logger.info(
                "resume: %s",
                {k: v for k, v in row["resume"].items() if k not in ("fresh", "resume")},
            )
        else:
            row["skipped"].append("resume")
    for o in row["ours"].values():  # free the disk before the baselines write theirs
        if "ckpt_dir" in o:
            remove(Path(o["ckpt_dir"]))
    write_json(result, args.out)

    row["baselines"] = {}
    if "baselines" not in args.skip and size.name in args.baseline_sizes:
        for name in baselines.BASELINES:
            if not budget.allows(3 * write_s + 20):
                row["skipped"].append(f"baseline:{name}")
                continue
            row["baselines"][name] = baselines.run(name, model, opt, root)
            logger.info("baseline %s: %s", name, row["baselines"][name])
            write_json(result, args.out)

    if "throughput" not in args.skip and size.name == args.throughput_size:
        est = 2 * args.tp_interval * args.tp_intervals * 0.5 * args.tp_reps + 60
        if budget.allows(est):
            try:
                row["throughput"] = result["throughput"] = measure_throughput(
                    model,
                    opt,
                    size,
                    root,
                    modes[0],
                    args.tp_batch,
                    args.tp_seq,
                    args.tp_interval,
                    args.tp_intervals,
                    args.tp_reps,
                )
                logger.info("throughput: %s", result["throughput"])
            except Exception as e:
                logger.exception("throughput failed")
                result["throughput"] = {"error": f"{type(e).__name__}: {e}"[:800]}
        else:
            row["skipped"].append("throughput")
        write_json(result, args.out)

    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        # so the next size's first save really allocates its pinned buffers
        if host_empty is not None:
            host_empty()

    if "preempt" not in args.skip and size.name == args.preempt_size:
        if budget.allows(2 * row["build_s"] + 4 * write_s + 60):
            try:
                result["preemption"] = preempt.measure(
                    args.preempt_via,
                    size.to_dict(),
                    device.type,
                    root,
                    modes[0],
                    args.pe_batch,
                    args.pe_seq,
                    args.preempt_interval,
                    timeout=max(min(budget.left(), 600), 60),
                )
            except Exception as e:
                logger.exception("preemption failed")
                result["preemption"] = {"error": f"{type(e).__name__}: {e}"[:800]}
            result["preemption"]["size"] = size.name
            logger.info(
                "preemption: %s", {k: v for k, v in result["preemption"].items() if k != "log_tail"}
            )
        else:
            row["skipped"].append("preempt")
    row["figures"] = figures(row, fl, device)
    write_json(result, args.out)


# ---------------------------------------------------------------------------------------------
# Figures, ratios, tables
# ---------------------------------------------------------------------------------------------
def figures(row: dict[str, Any], fl: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Ratios of one size's measurements to the floors, and pass/miss against the targets."""
    nbytes = row["state_bytes"]
    gpu = device.type == "cuda"
    block_bw = fl.get("pinned_d2h_gbps") if gpu else fl.get("memcpy_gbps")
    general_s = nbytes / (fl["write_fsync_gbps"] * GB)
    write_bw, write_kind = write_gbps(row, fl)
    f: dict[str, Any] = {
        "state_gb": nbytes / GB,
        "block_floor_s": nbytes / (block_bw * GB) if block_bw else None,
        # the durable ratio's floor: the write of exactly this state's bytes when it was measured
        "durable_floor_s": nbytes / (write_bw * GB),
        "durable_floor_kind": write_kind,
        "durable_floor_at_size_s": nbytes / (write_bw * GB) if write_kind == "at size" else None,
        "durable_floor_general_s": general_s,
        "read_floor_s": nbytes / (fl["read_gbps"] * GB),
    }
    mode, o = next(((m, o) for m, o in row.get("ours", {}).items() if o.get("saves")), (None, None))
    if o is not None:
        saves = o["saves"]
        later = saves[1:] or saves
        f["ours_mode"] = mode
        f["ours_first_blocked_s"] = saves[0]["blocked_s"]
        f["ours_blocked_s"] = median([s["blocked_s"] for s in later])
        f["ours_durable_s"] = median([s["durable_s"] for s in later])
        f["ours_first_durable_s"] = saves[0]["durable_s"]
        if gpu:
            f["ours_staged_s"] = median([s["staged_s"] for s in later if "staged_s" in s])
            # save() no longer waits for the device-to-host copy: this is when it was complete
            f["staged_ratio"] = _ratio(f["ours_staged_s"], f["block_floor_s"])
        f["prepare_s"] = o.get("prepare_s")  # buffers allocated off the caller's path
        f["prepare_call_s"] = o.get("prepare_call_s")
        f["block_ratio"] = _ratio(f["ours_blocked_s"], f["block_floor_s"])
        f["block_target"] = TARGETS["block_ratio_gpu" if gpu else "block_ratio_cpu"]
        f["durable_ratio"] = _ratio(f["ours_durable_s"], f["durable_floor_s"])
        f["durable_ratio_general_floor"] = _ratio(f["ours_durable_s"], general_s)
        f["durable_target"] = TARGETS["durable_ratio"]
        f["ours_gbps_to_durable"] = nbytes / f["ours_durable_s"] / GB
        f["latest_ok"] = all(s.get("latest_ok") for s in saves)
        f["latest_commits_without_wait"] = o.get("latest_commits_without_wait")
        new = [s["new_host_bytes"] for s in saves[1:]]
        f["later_saves_new_host_bytes"] = max(new) if new else None
        # A few MB of page faults (metadata, pickles, thread stacks) is noise, not staging buffers.
        f["later_saves_reuse_host_memory"] = (
            (max(new) < max(0.05 * nbytes, 32 << 20)) if new else None
        )
        st = [s.get("stats") or {} for s in saves]
        if st and all("new_host_bytes" in s for s in st):
            f["manager_new_host_bytes_first"] = st[0]["new_host_bytes"]
            f["manager_new_host_bytes_later"] = max(
                (s["new_host_bytes"] for s in st[1:]), default=None
            )
            f["manager_staging_s"] = median(
                [s.get("staging_s", 0.0) for s in st[1:]] or [st[0].get("staging_s", 0.0)]
            )
            f["manager_blocked_s"] = median(
                [s.get("blocked_s", 0.0) for s in st[1:]] or [st[0].get("blocked_s", 0.0)]
            )
            f["manager_durable_s"] = median(
                [s.get("durable_s", 0.0) for s in st[1:]] or [st[0].get("durable_s", 0.0)]
            )
    else:
        f["ours_error"] = next(
            (o.get("error") for o in row.get("ours", {}).values() if "error" in o), None
        )
    for name, b in row.get("baselines", {}).items():
        if "error" in b:
            f[f"{name}_error"] = b["error"]
        else:
            f[f"{name}_blocked_s"] = b["blocked_s"]
            f[f"{name}_durable_s"] = b["durable_s"]
    r = row.get("resume") or {}
    if "resume_s" in r:
        f["resume_s"] = r["resume_s"]
        f["startup_s"] = r["startup_s"]
        f["resume_floor_s"] = f["read_floor_s"] + r["startup_s"]
        f["resume_ratio"] = _ratio(r["resume_s"], f["resume_floor_s"])
        f["resume_target"] = TARGETS["resume_ratio"]
    return f


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 10 ** (-nd) or v == 0 else f"{v:.1e}"
    return str(v)


def _judge(ratio: float | None, target: float, higher_is_better: bool = False) -> str:
    if ratio is None:
        return ""
    ok = ratio >= target if higher_is_better else ratio <= target
    return "ok" if ok else "MISS"


def table(result: dict[str, Any]) -> str:
    fl = result["floors"]
    lines = []
    meta = result["meta"]
    lines.append(
        f"# {meta['device']} | torch {meta['torch']} | {meta['date']} | ckpt fs: {meta['ckpt_fs']}"
    )
    fl_bits = [
        f"memcpy {fl['memcpy_gbps']:.2f} GB/s",
        f"fresh-alloc copy {fl['fresh_alloc_copy_gbps']:.2f} GB/s",
    ]
    if fl.get("pinned_d2h_gbps"):
        fl_bits.append(f"pinned D2H {fl['pinned_d2h_gbps']:.2f} GB/s")
    w = ", ".join(f"{k}t {v:.2f}" for k, v in fl["write_fsync_gbps_by_threads"].items())
    fl_bits.append(f"fsync write {fl['write_fsync_gbps']:.2f} GB/s ({w})")
    fl_bits.append(f"read {fl['read_gbps']:.2f} GB/s")
    lines.append("floors: " + "; ".join(fl_bits))
    at_size = [
        f"{r['name']} {w['gbps']:.2f} GB/s ({w['threads']}t, {w['bytes'] / GB:.2f} GB)"
        for r in result["sizes"]
        if (w := r.get("write_floor_at_size") or {}).get("gbps")
    ]
    if at_size:
        lines.append("fsync write floor at each state's size: " + "; ".join(at_size))
    lines.append("")
    hdr = (
        "| size | state GB | blocked s (1st) | block floor s | ratio (target) | durable s | fsync floor s "
        "| ratio (target) | ratio, general floor | resume s | resume floor s | ratio (target) "
        "| 2nd+ saves reuse host mem |"
    )
    lines += [hdr, "|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|"]
    rows = sorted(result["sizes"], key=lambda r: r.get("state_bytes", 0))
    skipped = [r for r in rows if any(s.startswith("ours") for s in r.get("skipped", []))]
    rows = [r for r in rows if r not in skipped]
    for r in rows:
        f = r.get("figures") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    _fmt(f.get("state_gb"), 3),
                    f"{_fmt(f.get('ours_blocked_s'), 3)} ({_fmt(f.get('ours_first_blocked_s'), 3)})",
                    _fmt(f.get("block_floor_s"), 3),
                    f"{_fmt(f.get('block_ratio'))} (<= {f.get('block_target', '-')}) {_judge(f.get('block_ratio'), f.get('block_target', 0))}",
                    _fmt(f.get("ours_durable_s")),
                    f"{_fmt(f.get('durable_floor_s'))} ({f.get('durable_floor_kind', '-')})",
                    f"{_fmt(f.get('durable_ratio'))} (<= {TARGETS['durable_ratio']}) {_judge(f.get('durable_ratio'), TARGETS['durable_ratio'])}",
                    _fmt(f.get("durable_ratio_general_floor")),
                    _fmt(f.get("resume_s")),
                    _fmt(f.get("resume_floor_s")),
                    f"{_fmt(f.get('resume_ratio'))} (<= {TARGETS['resume_ratio']}) {_judge(f.get('resume_ratio'), TARGETS['resume_ratio'])}",
                    _fmt(f.get("later_saves_reuse_host_memory")),
                ]
            )
            + " |"
        )
        if f.get("ours_error"):
            lines.append(f"|   ours failed: {f['ours_error'][:200]} |")
    for r in skipped:
        lines.append(f"({r['name']}: skipped, time budget: {', '.join(r['skipped'])})")
    lines.append("")
    hdr = "| size | state GB | ours blocked / durable s | torch.save s | DCP save s | DCP async_save blocked / durable s |"
    lines += [hdr, "|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|"]
    for r in rows:
        f = r.get("figures") or {}

        def pair(a: str, b: str, f: dict[str, Any] = f) -> str:
            if f.get(a.replace("_blocked_s", "_error")):
                return "error"
            return f"{_fmt(f.get(a))} / {_fmt(f.get(b))}"

        lines.append(
            f"| {r['name']} | {_fmt(f.get('state_gb'), 3)} | {pair('ours_blocked_s', 'ours_durable_s')} "
            f"| {'error' if f.get('torch_save_error') else _fmt(f.get('torch_save_durable_s'))} "
            f"| {'error' if f.get('dcp_sync_error') else _fmt(f.get('dcp_sync_durable_s'))} "
            f"| {pair('dcp_async_blocked_s', 'dcp_async_durable_s')} |"
        )
    lines.append("")
    tp = result.get("throughput")
    if tp and "throughput_ratio" in tp:
        lines.append(
            f"throughput ({tp['size']}, {tp['mode']}, save every {tp['interval']} steps, {tp['steps_per_arm']} steps/arm, "
            f"{tp['step_s_no_save'] * 1e3:.1f} ms/step): with/without = {tp['throughput_ratio']:.4f} "
            f"(>= {TARGETS['throughput_ratio']}) {_judge(tp['throughput_ratio'], TARGETS['throughput_ratio'], True)}; "
            f"excess per save {_fmt(None if tp.get('excess_per_save_s') is None else tp['excess_per_save_s'] * 1e3, 1)} ms"
        )
    elif tp:
        lines.append(f"throughput: {tp.get('error')}")
    pe = result.get("preemption")
    if pe and "signal_to_exit_s" in pe:
        lines.append(
            f"preemption ({pe['size']}, via {pe.get('via')}): SIGUSR1 to exit {pe['signal_to_exit_s']:.2f} s "
            f"(step {_fmt(pe.get('step_s'))}, save call to durable {_fmt(pe.get('save_call_to_durable_s'))}); "
            f"budget {_fmt(pe.get('budget_s'))} s (write floor {pe.get('budget_write_floor', '-')}) "
            f"{_judge(pe['signal_to_exit_s'], pe.get('budget_s') or 0)}; "
            f"exit 75: {_fmt(pe.get('exit_code_ok'))}, latest at final step: {_fmt(pe.get('latest_ok'))}"
        )
    elif pe:
        lines.append(f"preemption: {pe.get('error')}")
    return "\n".join(lines)


def preempt_budget(result: dict[str, Any]) -> None:
    """Target: one step + one blocking + one flush (floors of this run, on the bytes the run's
    checkpoint really had) + 2 s of slack. The flush is judged against the write floor measured at
    the preemption size's state bytes when that size has one, else the general floor."""
    pe = result.get("preemption")
    if not pe or not pe.get("step_s"):
        return
    row = next((r for r in result["sizes"] if r["name"] == pe.get("size")), None)
    fl = result["floors"]
    nbytes = pe.get("state_bytes_on_disk") or (row or {}).get("state_bytes")
    block_bw = (
        fl.get("pinned_d2h_gbps")
        if result["meta"]["device_type"] == "cuda"
        else fl.get("memcpy_gbps")
    )
    if not nbytes or not block_bw:
        return
    write_bw, pe["budget_write_floor"] = write_gbps(row, fl)
    pe["budget_s"] = (
        pe["step_s"]
        + nbytes / (block_bw * GB)
        + nbytes / (write_bw * GB)
        + TARGETS["preempt_slack_s"]
    )
    pe["within_budget"] = pe["signal_to_exit_s"] <= pe["budget_s"]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CI-sized run (tiny sizes, seconds)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON output (default bench/results/...)"
    )
    ap.add_argument("--plot", type=Path, default=None, help="PNG output (default beside --out)")
    ap.add_argument(
        "--dir", type=Path, default=None, help="checkpoint filesystem to test (default: a temp dir)"
    )
    ap.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    ap.add_argument(
        "--sizes",
        default="",
        help="comma-separated size names to run (default: all of the device's)",
    )
    ap.add_argument(
        "--modes",
        default="",
        help="our async modes, comma-separated (default: pinned on CUDA, async on CPU)",
    )
    ap.add_argument(
        "--saves", type=int, default=3, help="our saves per size (the first one allocates)"
    )
    ap.add_argument(
        "--skip", default="", help="comma-separated: baselines,resume,throughput,preempt"
    )
    ap.add_argument(
        "--preempt-via",
        choices=("auto", "entrypoint", "worker"),
        default="auto",
        help="preemption through python -m kempnerforge.train, the bench worker, or auto",
    )
    ap.add_argument(
        "--preempt-size",
        dest="preempt_size_opt",
        default=None,
        help="size for the preemption figure",
    )
    ap.add_argument(
        "--preempt-interval",
        dest="preempt_interval_opt",
        type=int,
        default=None,
        help="save interval (steps) of the preemption run; its flush must fit in the interval",
    )
    ap.add_argument("--all-baselines", action="store_true", help="baselines at every size (CUDA)")
    ap.add_argument(
        "--time-budget-s", type=float, default=None, help="skip optional stages past this"
    )
    ap.add_argument(
        "--tp-reps",
        dest="tp_reps_opt",
        type=int,
        default=None,
        help="throughput: alternating arm pairs, best of each kept",
    )
    ap.add_argument(
        "--tp-intervals",
        dest="tp_intervals_opt",
        type=int,
        default=None,
        help="throughput: save intervals (saves) per arm",
    )
    ap.add_argument("--floor-mem-bytes", type=int, default=None)
    ap.add_argument("--floor-disk-bytes", type=int, default=None)
    ap.add_argument(
        "--no-size-floor",
        dest="size_floor",
        action="store_false",
        help="skip the fsync'd write of each state's size before our saves (durable ratio "
        "against the general floor)",
    )
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.skip = {s for s in args.skip.split(",") if s}
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "smoke" if args.smoke else device.type
    if args.out is None:
        args.out = HERE / "results" / f"checkpoint-{tag}-{stamp}.json"
    if args.plot is None:
        args.plot = args.out.with_suffix(".png")
    if args.smoke:
        sizes = SMOKE_SIZES
        mem_b, disk_b = 32 << 20, 32 << 20
        args.throughput_size = args.preempt_size = SMOKE_SIZES[0].name
        args.tp_batch, args.tp_seq, args.tp_interval, args.tp_intervals = 2, 32, 4, 2
        args.preempt_interval = 5
        args.tp_reps = 1
        args.pe_batch, args.pe_seq = 2, 32
        args.saves = min(args.saves, 3)
    elif device.type == "cuda":
        sizes = GPU_SIZES
        mem_b, disk_b = 2 << 30, 4 << 30
        args.throughput_size = args.preempt_size = GPU_SIZES[0].name
        args.tp_batch, args.tp_seq, args.tp_interval, args.tp_intervals = 8, 2048, 50, 2
        args.preempt_interval = 40  # a 12 GB flush must finish inside one interval
        args.tp_reps = 1
        args.pe_batch, args.pe_seq = 4, 1024
    else:
        sizes = CPU_SIZES
        mem_b, disk_b = 1 << 30, 1 << 30
        args.throughput_size = CPU_SIZES[0].name
        args.preempt_size = CPU_SIZES[1].name
        # CPU steps are slow: a short interval keeps this informative part to seconds.
        args.tp_batch, args.tp_seq, args.tp_interval, args.tp_intervals = 2, 32, 20, 2
        args.preempt_interval = 5
        args.tp_reps = 2
        args.pe_batch, args.pe_seq = 2, 32
    args.tp_reps = args.tp_reps_opt or args.tp_reps
    args.tp_intervals = args.tp_intervals_opt or args.tp_intervals
    # Resume costs two fresh processes per size; the smoke measures it once.
    args.resume_sizes = {sizes[-1].name} if args.smoke else {s.name for s in sizes}
    # Baselines are the slowest part (torch.save alone runs at a fraction of the disk floor); on
    # CUDA they run for all but the 757M size so four sizes of our figures fit one time-boxed run.
    args.baseline_sizes = {s.name for s in sizes} - (
        {"gpt-757m"} if device.type == "cuda" and not args.all_baselines else set()
    )
    args.preempt_size = args.preempt_size_opt or args.preempt_size
    args.preempt_interval = args.preempt_interval_opt or args.preempt_interval
    if args.sizes:
        wanted = set(args.sizes.split(","))
        unknown = wanted - {s.name for s in sizes}
        if unknown:
            raise SystemExit(
                f"--sizes: unknown {sorted(unknown)}; choose from {[s.name for s in sizes]}"
            )
        sizes = [s for s in sizes if s.name in wanted]
    mem_b = args.floor_mem_bytes or mem_b
    disk_b = args.floor_disk_bytes or disk_b

    own_dir = args.dir is None
    root = (
        Path(tempfile.mkdtemp(prefix="kf-ckpt-bench-"))
        if own_dir
        else args.dir / f"kf-ckpt-bench-{stamp}"
    )
    root.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.time_budget_s)
    result: dict[str, Any] = {
        "meta": {
            "date": _dt.date.today().isoformat(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "device": device_name(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "ckpt_root": str(root),
            "ckpt_fs": fs_type(root),
            "smoke": args.smoke,
            "loadavg_start": _loadavg(),
        },
        "targets": TARGETS,
        "sizes": [],
    }
    try:
        result["floors"] = fl = floors.measure_all(root / "floors", mem_b, disk_b)
        write_json(result, args.out)
        for size in sizes:
            run_size(size, device, root, fl, args, budget, result)
        preempt_budget(result)
        result["meta"]["wall_s"] = time.perf_counter() - budget.t0
        result["meta"]["loadavg_end"] = _loadavg()
        write_json(result, args.out)
        print(table(result), flush=True)
        try:
            import plot

            plot.plot(result, args.plot)
            print(f"plot: {args.plot}")
        except Exception:
            logger.exception("plot failed")
        print(f"json: {args.out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
