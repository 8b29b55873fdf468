"""What ``CheckpointManager.maybe_save``'s per-step check costs the training loop.

    python bench/maybe_save_cost.py --device cpu --size debug --ranks 2 --steps 200
    python bench/maybe_save_cost.py --device cuda --size gpt-1b --steps 240 --json out.json

A training loop calls ``maybe_save(step)`` after every optimizer step. On the steps where
nothing is saved (almost all of them) it still runs the check: the signal flag, the cross-rank
stop agreement (one tiny asynchronous gloo all-reduce, read one step later) and the hang
watchdog's beat. That check is paid on every step of every run, so it must be small against a
step even for the smallest model we train, and it must never wait for the GPU.

Why one run with its own floor: the check's cost only means something as a fraction of the step
it rides on, measured on the same machine in the same minutes (a shared machine drifts by more
than the figure we look for). So one run measures, with the checkpoint interval set beyond the
run (only the check runs, never a save):

- the plain training step (forward, backward, gradient clipping, AdamW, LR schedule), in arms
  without ``maybe_save``;
- the ``maybe_save(step)`` call itself, timed with ``perf_counter`` around the call. On CUDA
  this is the host cost: the host runs ahead of the GPU, so a check that synchronised would take
  about a step, and a separate probe asks torch's sync debug mode and the stream whether it did;
- arms with the check, alternating with arms without (A/B/A/B ...), so drift of the machine
  falls on both alike: the throughput ratio says whether the step time with the check differs.

With ``--ranks N`` (N > 1) on CPU the script starts itself under torchrun (gloo), and the model
is wrapped as ``kempnerforge.train`` wraps it for that many ranks; then the agreement really
sends an all-reduce each step. Figures are printed one a line with the targets (PASS/MISS) and
written as JSON with ``--json``; nothing here fails on a miss.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))  # a plain checkout works without `pip install -e .`

import gpt  # noqa: E402

from kempnerforge import distributed  # noqa: E402
from kempnerforge.checkpoint.config import CheckpointConfig  # noqa: E402
from kempnerforge.checkpoint.manager import CheckpointManager  # noqa: E402
from kempnerforge.config import load_config  # noqa: E402
from kempnerforge.distributed import DistributedConfig  # noqa: E402
from kempnerforge.model import GPT, num_parameters  # noqa: E402
from kempnerforge.optim import OptimConfig, WarmupCosineSchedule, build_optimizer  # noqa: E402
from kempnerforge.resilience.config import ResilienceConfig  # noqa: E402

# The check's cost as a fraction of one training step (median check / step time).
TARGETS = {"cpu": 0.01, "cuda": 0.001}
GPT_1B = gpt.GPTSize("gpt-1b", 2048, 18, 50304, 2048)  # the checkpoint benchmark's headline size
NEVER = 10**12  # checkpoint interval beyond any run: maybe_save only checks


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a p90 is a value that was measured)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# --------------------------------------------------------------------------- launching


def relaunch_under_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``--ranks`` copies of this script under torchrun; the checkpoint directory is made
    here so every rank gets the same path, and removed when they are done."""
    work = Path(tempfile.mkdtemp(prefix="maybe-save-cost-"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.ranks}",
        str(Path(__file__).resolve()),
        *argv,
        "--dir",
        str(work / "checkpoints"),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        return subprocess.run(cmd, env=env, check=False).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- the model


class Trainer:
    """One training step of the chosen model, as ``kempnerforge.train`` runs it (no data loader:
    a fixed batch, so the step is the model's work and nothing else)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, world: int) -> None:
        self.device = device
        optim_cfg = OptimConfig()
        if args.size == "debug":
            job = load_config(REPO / "configs" / "debug.yaml")
            optim_cfg = job.optim
            raw: torch.nn.Module = GPT(job.model, seed=job.train.seed).to(device)
            batch = args.batch or max(1, job.train.global_batch_size // world)
            seq, vocab = args.seq or job.model.seq_len, job.model.vocab_size
            self.size = {
                "name": "debug",
                "config": "configs/debug.yaml",
                **{k: getattr(job.model, k) for k in ("d_model", "n_layer", "vocab_size")},
            }
            mode = distributed.parallel_mode(job.distributed, world)
        else:
            torch.manual_seed(0)
            with torch.device(device):
                raw = gpt.GPT(GPT_1B)
            batch, seq, vocab = args.batch or 8, args.seq or GPT_1B.seq_len, GPT_1B.vocab
            self.size = GPT_1B.to_dict()
            mode = "fsdp" if world > 1 else "none"
        self.params = num_parameters(raw)  # before sharding: the whole model's
        if mode == "fsdp":
            distributed.wrap_model(raw, "fsdp", device)  # in place, before the optimizer
        self.raw = raw
        self.optimizer = build_optimizer(raw, optim_cfg)
        self.scheduler = WarmupCosineSchedule(self.optimizer, optim_cfg, NEVER)
        self.model = distributed.wrap_model(raw, "ddp", device) if mode == "ddp" else raw
        self.mode, self.batch, self.seq = mode, batch, seq
        self.grad_clip = optim_cfg.grad_clip
        g = torch.Generator().manual_seed(1)
        data = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
        self.x, self.y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
        )

    def step(self) -> None:
        """Forward, backward, clip, AdamW, schedule; nothing that waits for the GPU."""
        self.model.train()
        with self.autocast:
            loss = self.model(self.x, self.y)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.raw.parameters()), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_arm(
    tr: Trainer,
    mgr: CheckpointManager,
    step: int,
    n: int,
    with_check: bool,
    step_times: list[float],
    check_times: list[float],
) -> tuple[int, float]:
    """``n`` steps, each followed by ``maybe_save`` when ``with_check``; returns (step, wall s).

    The arm starts and ends with the device idle (synchronised outside the timed span on CUDA,
    and a barrier between ranks), so its wall time is its steps' time, not queued work of the
    arm before. Per-step times are host times: only meaningful on CPU.
    """
    sync(tr.device)
    if dist.is_initialized():
        dist.barrier()
    t_arm = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        tr.step()
        step += 1
        t1 = time.perf_counter()
        step_times.append(t1 - t0)
        if with_check:
            stop = mgr.maybe_save(step)
            check_times.append(time.perf_counter() - t1)
            if stop:
                raise RuntimeError(f"maybe_save asked to stop at step {step}: a signal arrived")
    sync(tr.device)
    return step, time.perf_counter() - t_arm


def sync_probe(tr: Trainer, mgr: CheckpointManager, step: int, n: int) -> tuple[int, dict]:
    """CUDA only: does the check wait for the GPU? Two independent witnesses per call.

    torch's sync debug mode warns on every synchronising CUDA call torch makes (``.item()``, a
    device-to-host copy, a stream synchronise); and the current stream is asked, without waiting,
    whether it is still busy before and after the call: a check that drained the queue would
    find it busy and leave it idle. Kept out of the timed arms (the probing costs host time).
    """
    stream = torch.cuda.current_stream()
    busy_before = busy_after = drained = flagged = 0
    where: list[str] = []  # the debug mode and the warning capture are process-wide: say where
    for i in range(n):
        tr.step()
        step += 1
        before = not stream.query()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                mgr.maybe_save(step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        after = not stream.query()
        hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
        flagged += len(hits)
        where.extend(f"call {i}: {w.filename}:{w.lineno}: {str(w.message)[:200]}" for w in hits)
        busy_before += before
        busy_after += after
        drained += before and not after
    sync(tr.device)
    return step, {
        "calls": n,
        "sync_calls_flagged": flagged,
        "sync_flagged_where": where[:10],
        "stream_busy_before_call": busy_before,
        "stream_busy_after_call": busy_after,
        "busy_before_idle_after": drained,
    }


def gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def measure(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    dcfg = DistributedConfig(
        device=args.device,
        # CPU: one thread per rank, as the debug config (and kempnerforge.train) runs it.
        # CUDA: torch's default threads, and no deterministic kernels: the faster step is the
        # harder denominator for the check.
        intra_op_threads=1 if args.device == "cpu" else 0,
        deterministic=False,
    )
    info, device = distributed.setup(dcfg)
    rank, world = info.rank, info.world_size
    tr = Trainer(args, device, world)
    ckpt_dir = args.dir or tempfile.mkdtemp(prefix="maybe-save-cost-")
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(Path(ckpt_dir)), interval=NEVER),
        tr.raw,
        tr.optimizer,
        resilience=ResilienceConfig(),
    )
    step, _, _ = mgr.resume(scheduler=tr.scheduler)  # what a loop does first: fresh run, step 0

    # warm-up: allocator, kernels, the agreement's group and its first collectives, the watchdog
    for _ in range(args.warmup):
        tr.step()
        step += 1
        mgr.maybe_save(step)
    sync(device)

    pairs = max(1, args.pairs)
    per_arm = max(1, args.steps // pairs)
    arms: dict[str, list[float]] = {"without": [], "with": []}
    steps_without: list[float] = []
    steps_with: list[float] = []
    checks: list[float] = []
    for _ in range(pairs):
        step, wall = run_arm(tr, mgr, step, per_arm, False, steps_without, checks)
        arms["without"].append(wall)
        step, wall = run_arm(tr, mgr, step, per_arm, True, steps_with, checks)
        arms["with"].append(wall)
    probe = None
    if device.type == "cuda":
        step, probe = sync_probe(tr, mgr, step, args.probe_steps)
    saved = mgr.committed_step()
    mgr.close()

    per_rank = gather({"rank": rank, "checks": checks, "steps_without": steps_without})
    if dist.is_initialized():
        distributed.shutdown()
    if args.dir is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if rank != 0:
        return None

    all_checks = [c for r in per_rank for c in r["checks"]]
    mean_without = sum(arms["without"]) / (pairs * per_arm)
    mean_with = sum(arms["with"]) / (pairs * per_arm)
    # CPU: the median of the timed steps themselves. CUDA: the per-step host time only says how
    # long the host took to queue the step, so the step is the arms' wall time per step.
    if device.type == "cpu":
        step_s, step_src = statistics.median(steps_without), "median of per-step times (rank 0)"
    else:
        step_s, step_src = mean_without, "wall time of the arms without the check, per step"
    check_med = statistics.median(all_checks)
    check_p90 = percentile(all_checks, 90)
    per_pair = [a / b for a, b in zip(arms["without"], arms["with"], strict=True)]
    arm_steps = [a / per_arm for a in arms["without"]]
    target = TARGETS[device.type]
    res: dict[str, Any] = {
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(),
            "loadavg_start": args.loadavg_start,
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "ranks": world,
            "parallel": tr.mode,
            "size": tr.size,
            "params": tr.params,
            "batch_per_rank": tr.batch,
            "seq": tr.seq,
            "autocast_bf16": device.type == "cuda",
            "warmup_steps": args.warmup,
            "pairs": pairs,
            "steps_per_arm": per_arm,
            "command": " ".join([Path(sys.argv[0]).name, *args.argv]),
        },
        "step_s": step_s,
        "step_source": step_src,
        "step_p90_s": percentile(steps_without, 90) if device.type == "cpu" else None,
        # the same per-step time in the arms with the check (the check itself excluded): a
        # check whose cost moved into the next step (a collective it waits for) shows here
        "step_median_with_check_s": statistics.median(steps_with) if device.type == "cpu" else None,
        "step_arm_mean_without_s": mean_without,
        "step_arm_mean_with_s": mean_with,
        "check_median_us": check_med * 1e6,
        "check_p90_us": check_p90 * 1e6,
        "check_mean_us": statistics.fmean(all_checks) * 1e6,
        "check_max_us": max(all_checks) * 1e6,
        "check_calls": len(all_checks),
        "check_per_rank": [
            {
                "rank": r["rank"],
                "median_us": statistics.median(r["checks"]) * 1e6,
                "p90_us": percentile(r["checks"], 90) * 1e6,
            }
            for r in per_rank
        ],
        "check_timing": "host time around mgr.maybe_save(step), perf_counter"
        + ("; the GPU is not synchronised around it" if device.type == "cuda" else ""),
        "ratio_check_step": check_med / step_s,
        "ratio_check_p90_step": check_p90 / step_s,
        "throughput": {
            "arms_without_s": arms["without"],
            "arms_with_s": arms["with"],
            # steps per second with the check over steps per second without it
            "ratio": sum(arms["without"]) / sum(arms["with"]),
            "ratio_per_pair": per_pair,
            "excess_per_step_us": (mean_with - mean_without) * 1e6,
            # how much the arms without the check differ among themselves: the noise floor
            "spread_without_us": (max(arm_steps) - min(arm_steps)) * 1e6,
        },
        "saved_any": saved is not None,
        "sync_probe": probe,
        "target": {
            "name": f"check / step <= {target:.1%} ({device.type})",
            "limit": target,
            "value": check_med / step_s,
            "pass": check_med / step_s <= target,
        },
    }
    return res


def report(res: dict[str, Any]) -> None:
    m, tp = res["meta"], res["throughput"]
    print(
        f"device {m['device']} ({m['device_name']}), torch {m['torch']}, {m['ranks']} rank(s) "
        f"[{m['parallel']}], {m['size']['name']} {m['params'] / 1e6:.2f}M params, "
        f"batch {m['batch_per_rank']} x {m['seq']} per rank, {m['pairs']} x "
        f"{m['steps_per_arm']} steps per arm"
    )
    print(f"step (no check):           {res['step_s'] * 1e3:.3f} ms  [{res['step_source']}]")
    if res["step_p90_s"] is not None:
        print(f"step p90 (no check):       {res['step_p90_s'] * 1e3:.3f} ms")
        print(
            f"step median, check arms:   {res['step_median_with_check_s'] * 1e3:.3f} ms  "
            "[the step alone, in the arms that also call maybe_save]"
        )
    print(
        f"check median:              {res['check_median_us']:.1f} us  "
        f"[{res['check_calls']} calls, {res['check_timing']}]"
    )
    print(f"check p90:                 {res['check_p90_us']:.1f} us")
    for r in res["check_per_rank"]:
        print(f"  rank {r['rank']}: median {r['median_us']:.1f} us, p90 {r['p90_us']:.1f} us")
    print(f"ratio check/step (median): {res['ratio_check_step']:.5%}")
    print(f"ratio check/step (p90):    {res['ratio_check_p90_step']:.5%}")
    print(
        f"throughput with/without:   {tp['ratio']:.4f}  (per pair "
        + ", ".join(f"{r:.4f}" for r in tp["ratio_per_pair"])
        + ")"
    )
    print(
        f"step with - without:       {tp['excess_per_step_us']:+.1f} us per step "
        f"(arms without the check differ by {tp['spread_without_us']:.1f} us per step)"
    )
    if res["sync_probe"] is not None:
        p = res["sync_probe"]
        print(
            f"GPU sync probe:            {p['sync_calls_flagged']} synchronising calls flagged in "
            f"{p['calls']} checks; stream busy before/after the call "
            f"{p['stream_busy_before_call']}/{p['stream_busy_after_call']}, "
            f"busy before and idle after {p['busy_before_idle_after']}"
        )
        for line in p["sync_flagged_where"]:
            print(f"  flagged: {line}")
    t = res["target"]
    verdict = "PASS" if t["pass"] else "MISS"
    print(f"{verdict}: {t['name']}: {t['value']:.5%}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=("debug", "gpt-1b"), default="debug")
    p.add_argument("--ranks", type=int, default=1, help="processes; > 1 starts torchrun")
    p.add_argument("--steps", type=int, default=200, help="timed steps per arm kind")
    p.add_argument("--pairs", type=int, default=5, help="alternating without/with arm pairs")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--probe-steps", type=int, default=20, help="CUDA sync probe steps")
    p.add_argument("--batch", type=int, default=0, help="sequences per rank (0: the size's)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (0: the size's)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)  # set for torchrun workers
    args = p.parse_args(argv)
    args.argv = list(argv)
    args.loadavg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.ranks > 1 and "WORLD_SIZE" not in os.environ:
        return relaunch_under_torchrun(args, argv)
    if args.device == "cuda" and args.ranks > 1:
        print("note: several GPUs run the same code with FSDP2 over NCCL; not measured yet")
    res = measure(args)
    if res is None:
        return 0
    if args.dir is not None:  # under torchrun: the command the user typed
        res["meta"]["command"] = res["meta"]["command"].rsplit(" --dir ", 1)[0]
    report(res)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
