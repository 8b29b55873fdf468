"""Async pinned checkpoints of an FSDP2 model while training runs its collectives, on every rank.

    torchrun --standalone --nproc_per_node=2 bench/dist_bench.py --size gpt-1b --out dist-bench.json
    torchrun --standalone --nproc_per_node=2 bench/dist_bench.py --device cpu --backend gloo \\
        --size tiny-1m --batch 2 --seq 32 --steps 20 --interval 5     # a CPU smoke run

What the single-process checkpoint bench cannot show: the manager's save path (gloo control
group, DCP's planning collectives, the background flush) running beside FSDP2's NCCL all-gathers
and reduce-scatters. One run, one model, three parts:

1. throughput: the same number of training steps without saves and with a save every
   ``--interval`` steps (async with pinned memory; the device-to-host copy is deferred to the
   next optimizer step by the manager's own hooks). Each save sits in the middle of its interval,
   so its copy and flush overlap later steps as in a run that goes on, rather than the arm's
   closing synchronize waiting for a save made on its last step. Per save and rank: the time
   ``save()`` blocked the caller and the manager's ``last_save_stats`` (staged, durable, new host
   bytes).
2. exactness: one more save, a copy of this rank's live state taken right after ``save()``
   returned, a few more steps (they change every tensor while the flush is in flight), then the
   checkpoint is loaded into a freshly built (differently initialised) model and optimizer and
   every local tensor is compared bit for bit with the copy.
3. the whole run is meant to sit under a time box (the launcher's ``timeout``): a deadlock shows
   up as a missing JSON section, never as a hang of what follows.

Rank 0 writes the JSON after every part (``--out``), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # a plain checkout works without `pip install -e .`
import checkpoint_bench  # noqa: E402
import gpt  # noqa: E402
from measure import Span, remove  # noqa: E402
from ours import manager_stats  # noqa: E402

from kempnerforge import distributed  # noqa: E402

logger = logging.getLogger("dist_bench")

SIZES = {
    s.name: s
    for s in (
        *checkpoint_bench.GPU_SIZES,
        *checkpoint_bench.CPU_SIZES,
        *checkpoint_bench.SMOKE_SIZES,
    )
}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def local_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor this rank holds of model and optimizer, by a name that does not depend on
    object identity, so a freshly built model/optimizer pair yields the same keys."""
    out = {
        f"model.{k}": _local(v)
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optimizer.{names[id(p)]}.{k}"] = _local(v)
    return out


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A device-side copy of ``local_state``: stream-ordered, so it holds the values of now even
    though the caller does not synchronize."""
    return {k: v.detach().clone() for k, v in local_state(model, opt).items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Bit-for-bit comparison (``torch.equal`` would call -0.0 and 0.0 equal, NaN unequal)."""
    missing = sorted(set(ref) ^ set(got))
    differ = []
    nbytes = 0
    for k in sorted(set(ref) & set(got)):
        a, b = ref[k], got[k]
        if (
            a.dtype != b.dtype
            or a.shape != b.shape
            or not torch.equal(_bits(a), _bits(b.to(a.device)))
        ):
            differ.append(k)
        nbytes += a.numel() * a.element_size()
    return {
        "tensors": len(ref),
        "bytes": nbytes,
        "missing_or_extra": missing[:20],
        "differ": differ[:20],
        "n_differ": len(differ),
        "ok": not missing and not differ,
    }


def all_max(x: float, device: torch.device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def fsdp_wrap(device: torch.device, world: int) -> Callable[[gpt.GPT], None]:
    """FSDP2 (one unit per block, then the root) over all ranks, as the training loop does."""

    def wrap(model: gpt.GPT) -> None:
        if world > 1:
            distributed.wrap_model(model, "fsdp", device)

    return wrap


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------
def run_arms(
    model: gpt.GPT,
    opt: torch.optim.Optimizer,
    mgr: Any,
    data: tuple[torch.Tensor, ...],
    steps: int,
    interval: int,
    device: torch.device,
    first_step: int = 0,
) -> dict[str, Any]:
    """Steps without saves, then the same steps with a save every ``interval``; this rank's view.

    The saves fall in the middle of each whole interval (``checkpoint_bench.save_steps``): the
    steady state of a run that goes on, not a save on the last step whose device-to-host copy the
    arm's closing synchronize would wait for. Before each save the previous one is waited for explicitly (``save()`` would do it first
    thing anyway) so its stats are final and can be recorded; the wait is inside the timed arm.
    """

    due = set(checkpoint_bench.save_steps(steps, interval))

    def arm(saving: bool, first_step: int) -> tuple[float, list[dict[str, Any]]]:
        saves: list[dict[str, Any]] = []
        pending: dict[str, Any] | None = None
        windows: list[float] = []  # seconds per 10 steps: where in the interval time is lost
        sync(device)
        t0 = t_win = time.perf_counter()
        for i in range(1, steps + 1):
            loss = gpt.train_step(model, opt, data)
            if i % 10 == 0:
                loss.item()  # as a logging loop would
                now = time.perf_counter()
                windows.append(now - t_win)
                t_win = now
            if saving and i in due:
                mgr.wait()
                if pending is not None:
                    pending["stats"] = manager_stats(mgr)
                    pending["proc_new_host_bytes"] = pending.pop("_span").new_host_bytes()
                span = Span().start()
                mgr.save(first_step + i)
                pending = {"step": first_step + i, "blocked_call_s": span.elapsed(), "_span": span}
                saves.append(pending)
        sync(device)
        elapsed = time.perf_counter() - t0
        t_wait = time.perf_counter()
        mgr.wait()  # the last flush must not spill into what follows
        if pending is not None:
            pending["stats"] = manager_stats(mgr)
            pending["proc_new_host_bytes"] = pending.pop("_span").new_host_bytes()
            pending["final_wait_s"] = time.perf_counter() - t_wait
        if saves:
            saves[0]["windows_s"] = windows
        return elapsed, saves

    t_none, _ = arm(False, 0)
    t_save, saves = arm(True, first_step)
    out = {
        "steps": steps,
        "interval": interval,
        "no_save_s": t_none,
        "with_save_s": t_save,
        "throughput_ratio": t_none / t_save if t_save > 0 else None,
        "saves": saves,
    }
    if device.type == "cuda":  # headroom for a larger size or batch
        out["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def run_verify(
    model: gpt.GPT,
    opt: torch.optim.Optimizer,
    mgr: Any,
    data: tuple[torch.Tensor, ...],
    step: int,
    extra_steps: int,
    device: torch.device,
) -> tuple[dict[str, Any], dict]:
    """Save ``step``, copy the live state at once, train on while the flush runs, then wait."""
    gpt.train_step(model, opt, data)
    span = Span().start()
    mgr.save(step)
    blocked = span.elapsed()
    ref = snapshot(model, opt)
    for _ in range(extra_steps):  # each optimizer step first waits for the deferred copy
        gpt.train_step(model, opt, data)
    mgr.wait()
    rec = {
        "step": step,
        "blocked_call_s": blocked,
        "stats": manager_stats(mgr),
        "proc_new_host_bytes": span.new_host_bytes(),
        "extra_steps": extra_steps,
    }
    moved = compare(ref, local_state(model, opt))
    rec["live_changed_after_save"] = not moved["ok"]  # else the check below proves little
    return rec, ref


def run_load(
    size: gpt.GPTSize,
    device: torch.device,
    world: int,
    cfg: Any,
    step: int,
    ref: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Fresh model and optimizer (another seed), load the newest checkpoint, compare with ``ref``."""
    from kempnerforge.checkpoint import CheckpointManager

    model, opt = gpt.build(size, device, seed=1, wrap=fsdp_wrap(device, world))
    weights = {k: v for k, v in ref.items() if k.startswith("model.")}
    fresh_differs = not compare(weights, local_state(model, opt))["ok"]  # else proves nothing
    t0 = time.perf_counter()
    mgr = CheckpointManager(cfg, model, opt)
    try:
        loaded, _, _ = mgr.load()
    finally:
        mgr.close()
    sync(device)
    out: dict[str, Any] = {"loaded_step": loaded, "load_s": time.perf_counter() - t0}
    out.update(compare(ref, local_state(model, opt)))
    out["fresh_differed_before_load"] = fresh_differs
    out["ok"] = out["ok"] and loaded == step and fresh_differs
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"dist bench: {result['meta']['size']} over {result['meta']['world_size']} ranks "
        f"({result['meta']['backend']}, {result['meta']['device']}), "
        f"{result['meta'].get('state_gb_per_rank', 0):.2f} GB state per rank"
    ]
    lines.append(
        f"{'rank':>4} {'step':>6} {'blocked':>8} {'staged':>8} {'durable':>8} "
        f"{'new_host_B':>11} {'GB/s':>6}"
    )
    for r in result.get("ranks", []):
        recs = [
            *r.get("throughput", {}).get("saves", []),
            *([r["verify"]] if "verify" in r else []),
        ]
        for s in recs:
            st = s.get("stats") or {}
            lines.append(
                f"{r['rank']:>4} {s['step']:>6} {_f(s.get('blocked_call_s')):>8} "
                f"{_f(st.get('staged_s')):>8} {_f(st.get('durable_s'), 2):>8} "
                f"{st.get('new_host_bytes', '-'):>11} {_f(st.get('gbps'), 2):>6}"
            )
    tp = result.get("throughput")
    if tp:
        lines.append(
            f"throughput: {tp['steps']} steps/arm, save every {tp['interval']}: "
            f"no save {tp['no_save_s']:.2f}s, with saves {tp['with_save_s']:.2f}s, "
            f"ratio {_f(tp['throughput_ratio'])}, excess per save "
            f"{_f(None if tp.get('excess_per_save_s') is None else tp['excess_per_save_s'] * 1e3, 1)}"
            f" ms (slowest rank per arm)" + (f" [{tp['note']}]" if tp.get("note") else "")
        )
    v = result.get("verify")
    if v:
        lines.append(
            f"exactness: {v['tensors']} tensors on {v['ranks']} ranks, "
            f"{v['n_differ']} differ, {v['missing_or_extra']} missing/extra, "
            f"live state moved after the save: {v['live_changed_after_save']}"
        )
    lines.append(f"VERDICT: {result.get('verdict', 'INCOMPLETE')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available"
    )
    ap.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto")
    ap.add_argument("--size", default="gpt-1b", help=f"one of {sorted(SIZES)}")
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (<= size.seq_len)")
    ap.add_argument("--steps", type=int, default=100, help="steps per throughput arm (at most)")
    ap.add_argument("--interval", type=int, default=50, help="steps between saves")
    ap.add_argument(
        "--extra-steps",
        type=int,
        default=3,
        help="steps trained after the exactness save while it flushes",
    )
    ap.add_argument("--mode", default="async_with_pinned_mem", help="checkpoint.async_mode")
    ap.add_argument("--dir", type=Path, default=None, help="checkpoint root (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="JSON written by rank 0")
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="fewer steps per arm when the whole run would not fit",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: default)")
    ap.add_argument(
        "--writers",
        default="",
        help="extra throughput arms with other writers, e.g. dcp:8,staged:2",
    )
    ap.add_argument("--timeout-s", type=float, default=300.0, help="process-group timeout")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dcfg = distributed.DistributedConfig(
        parallel="fsdp",
        backend=args.backend,
        device=want,
        deterministic=False,
        intra_op_threads=args.threads,
        timeout_s=args.timeout_s,
    )
    info, device = distributed.setup(dcfg)
    rank, world = info.rank, info.world_size
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        force=True,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    if args.size not in SIZES:
        raise SystemExit(f"--size {args.size!r}: choose from {sorted(SIZES)}")
    if args.steps < 1 or args.interval < 1:
        raise SystemExit("--steps and --interval must be >= 1")
    size = SIZES[args.size]
    seq = min(args.seq, size.seq_len)
    from kempnerforge.checkpoint.config import CheckpointConfig

    own_dir = args.dir is None
    root_box = [
        str(
            Path(tempfile.mkdtemp(prefix="kf-dist-bench-"))
            if own_dir and rank == 0
            else (args.dir or "")
        )
    ]
    if dist.is_initialized():
        dist.broadcast_object_list(root_box, src=0)
    root = Path(root_box[0]) / "ckpt"
    if rank == 0:
        remove(root)
    cfg = CheckpointConfig(
        dir=str(root), interval=args.interval, async_mode=args.mode, keep_last_n=1
    )
    result: dict[str, Any] = {
        "meta": {
            "size": size.name,
            "size_spec": size.to_dict(),
            "world_size": world,
            "backend": dist.get_backend() if dist.is_initialized() else "none",
            "device": checkpoint_bench.device_name(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "mode": args.mode,
            "batch_per_rank": args.batch,
            "seq": seq,
            "ckpt_root": str(root),
            "ckpt_fs": checkpoint_bench.fs_type(root.parent),
            "host_cpus": os.cpu_count(),
        },
        "ranks": [],
    }

    def budget_left() -> float:
        if args.time_budget_s is None:
            return float("inf")
        return args.time_budget_s - (time.perf_counter() - t_start)

    def publish(part: str, rec: dict[str, Any], per_rank: dict[str, Any]) -> None:
        """Gather this part from every rank; rank 0 folds it in and rewrites the JSON."""
        got = gather(rec)
        if rank != 0 or got is None:
            return
        if not result["ranks"]:
            result["ranks"] = [{"rank": r} for r in range(world)]
        for r, g in enumerate(got):
            result["ranks"][r][part] = g
        result.update(per_rank)
        if args.out is not None:
            checkpoint_bench.write_json(result, args.out)

    from kempnerforge.checkpoint import CheckpointManager

    mgr = None
    try:
        t0 = time.perf_counter()
        model, opt = gpt.build(size, device, wrap=fsdp_wrap(device, world))
        data = gpt.make_batch(size, args.batch, seq, device)
        mgr = CheckpointManager(cfg, model, opt)  # before the first step: its hooks stage pinned
        for i in range(5):  # warm-up; after the first step the manager pins its buffers itself
            if i == 2:
                sync(device)
                t_warm = time.perf_counter()
            gpt.train_step(model, opt, data)
        sync(device)
        step_s = all_max((time.perf_counter() - t_warm) / 3, device)
        mgr.wait()  # the buffer allocation must not land inside the no-save arm
        # One save before the arms: steady state is what is measured; the first save's one-off
        # work (DCP's plan, torch.save's framing per tensor kind) is reported by its own row.
        mgr.save(1)
        mgr.wait()
        mine = local_state(model, opt)  # this rank's shards (a DTensor's numel() is global)
        nbytes, ntensors = sum(t.numel() * t.element_size() for t in mine.values()), len(mine)
        del mine
        total_t = torch.tensor([nbytes], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(total_t)
        total = int(total_t.item())
        result["meta"].update(
            build_s=time.perf_counter() - t0,
            step_s_warmup=step_s,
            state_bytes_per_rank=nbytes,
            state_tensors_per_rank=ntensors,
            state_bytes_total=total,
            state_gb_per_rank=nbytes / 1e9,
        )
        logger.info(
            "%s over %d ranks: %.2f GB state per rank (%.2f GB total), warm-up %.3f s/step",
            size.name,
            world,
            nbytes / 1e9,
            total / 1e9,
            step_s,
        )

        # Steps per arm: as asked, unless the budget says otherwise (same answer on every rank:
        # step_s is the all-reduced max, the budget the same flag value).
        reserve = 30 + 3 * total / 1e9 + (args.extra_steps + 2) * step_s  # exactness + load
        left = -all_max(-min(budget_left(), 1e9), device)  # the smallest, the same on all ranks
        fit = int(max(0.0, left - reserve) / (2.5 * step_s))  # two arms, saves cost extra
        steps, interval, note = args.steps, args.interval, ""
        if fit < steps:
            # At least one whole interval, of 2+ steps where possible: its save then falls before
            # the arm's last step (checkpoint_bench.save_steps).
            steps = max(2, fit)
            interval = min(interval, max(2, steps // 2))
            steps -= steps % interval
            note = f"reduced to {steps} steps/arm, save every {interval} (time budget)"
            logger.warning(note)
        elif interval > steps:  # else the saving arm would not save at all
            interval = steps
            note = f"save every {interval} (--steps < --interval)"
            logger.warning(note)
        n_saves = len(checkpoint_bench.save_steps(steps, interval))  # steps // interval, >= 1
        tp = run_arms(model, opt, mgr, data, steps, interval, device)
        no_save = all_max(tp["no_save_s"], device)
        with_save = all_max(tp["with_save_s"], device)
        publish(
            "throughput",
            tp,
            {
                "throughput": {
                    "steps": steps,
                    "interval": interval,
                    "no_save_s": no_save,
                    "with_save_s": with_save,
                    "throughput_ratio": no_save / with_save if with_save > 0 else None,
                    "step_s_no_save": no_save / steps,
                    "saves_per_arm": n_saves,
                    "excess_per_save_s": (with_save - no_save) / n_saves,
                    "note": note,
                }
            },
        )

        # Optional: the same arms again with other writers (kind:threads), same model and run.
        variants: dict[str, Any] = {}
        for k, spec in enumerate(w for w in args.writers.split(",") if w):
            kind, _, threads = spec.partition(":")
            if budget_left() < reserve + 2.5 * steps * step_s:
                variants[spec] = {"skipped": "time budget"}
                continue
            mgr.checkpointer.writer_kind = kind
            mgr.checkpointer.writer_threads = int(threads or mgr.checkpointer.writer_threads)
            v = run_arms(model, opt, mgr, data, steps, interval, device, first_step=(k + 1) * 1000)
            ns, ws = all_max(v["no_save_s"], device), all_max(v["with_save_s"], device)
            variants[spec] = {
                "no_save_s": ns,
                "with_save_s": ws,
                "throughput_ratio": ns / ws,
                "durable_s": [(x.get("stats") or {}).get("durable_s") for x in v["saves"]],
                "windows_s": v["saves"][0].get("windows_s") if v["saves"] else None,
            }
            logger.info(
                "writer %s: throughput ratio %.3f, durable %s",
                spec,
                ns / ws,
                variants[spec]["durable_s"],
            )
        if variants:
            publish("writer_variants", {}, {"writer_variants": variants})
        mgr.checkpointer.writer_kind = cfg.writer
        mgr.checkpointer.writer_threads = cfg.resolved_writer_threads()

        vstep = 10 * (steps + 1) + 10_000  # a step number no arm used
        vrec, ref = run_verify(model, opt, mgr, data, vstep, args.extra_steps, device)
        mgr.close()
        mgr = None
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        vrec["load"] = run_load(size, device, world, cfg, vstep, ref)
        del ref
        ok = vrec["load"]["ok"] and vrec["live_changed_after_save"]
        oks = gather(ok)
        publish("verify", vrec, {})
        if rank == 0 and oks is not None:
            loads = [r["verify"]["load"] for r in result["ranks"]]
            result["verify"] = {
                "ok": all(oks),
                "ranks": world,
                "step": vstep,
                "tensors": sum(x["tensors"] for x in loads),
                "bytes": sum(x["bytes"] for x in loads),
                "n_differ": sum(x["n_differ"] for x in loads),
                "missing_or_extra": sum(len(x["missing_or_extra"]) for x in loads),
                "live_changed_after_save": all(
                    r["verify"]["live_changed_after_save"] for r in result["ranks"]
                ),
            }
            result["verdict"] = (
                "bit-exact, no deadlock" if all(oks) else "MISMATCH (see verify in the JSON)"
            )
            result["meta"]["wall_s"] = time.perf_counter() - t_start
            if args.out is not None:
                checkpoint_bench.write_json(result, args.out)
            print(table(result), flush=True)
        if dist.is_initialized():
            dist.barrier()  # nobody deletes the directory while another rank still reads it
    finally:  # on an error no barrier: torchrun ends the other ranks when this one exits
        if mgr is not None:
            mgr.close()
        if rank == 0:
            shutil.rmtree(root if not own_dir else root.parent, ignore_errors=True)
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
