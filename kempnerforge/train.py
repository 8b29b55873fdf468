"""Train a GPT: ``python -m kempnerforge.train --config configs/debug.yaml [key=value ...] [--quiet]``.

The loop reads top to bottom:

1. config, an early signal flag (held until the checkpoint manager takes over), process group;
2. model (deterministic init), optimizer, LR schedule, checkpoint manager, data loader;
3. ``mgr.resume(scheduler, dataloader, freeze)``: the step, tokens and freeze list in force;
4. steps: freeze transition (after ``flush_pending_save()``), forward/backward over
   micro-batches, clip, AdamW, schedule, the mean loss for the metrics line; the step's scalars
   to ``metrics.jsonl`` and to TensorBoard / W&B (:mod:`kempnerforge.metrics`), flushed before
   the step's checkpoint can commit;
5. ``mgr.maybe_save(step, ...)``: saves on the interval, and on a stop signal agrees the stop
   step across ranks, saves it, makes it durable and requeues; the process then exits with
   ``mgr.exit_code`` (75: run again), after closing TensorBoard and W&B. The final step is
   always saved.

This is one user of the public calls, not a second implementation of them.
Step numbers count completed optimizer steps, from 1. See docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from kempnerforge import distributed, log
from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.config import ConfigError, JobConfig, load_config
from kempnerforge.data import GlobalSampler, StepLoader, build_dataset
from kempnerforge.freeze import (
    FreezeSpec,
    apply_freeze,
    canonical_freeze_meta,
    effective_freeze,
    validate_freeze,
)
from kempnerforge.job import JobEnvironment
from kempnerforge.metrics import MetricsLogger
from kempnerforge.model import GPT, num_parameters
from kempnerforge.optim import WarmupCosineSchedule, build_optimizer
from kempnerforge.resilience.agree import mean_over_ranks
from kempnerforge.resilience.signals import PreemptionFlag

logger = logging.getLogger("kempnerforge.train")


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: its exit code, and whether it was a stop (``maybe_save`` returned True:
    ``latest`` is durable and the requeue decided, so nothing is left that teardown could save;
    see ``_exit_now``)."""

    code: int
    stopped: bool


# --------------------------------------------------------------------------- small helpers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kempnerforge.train", description=__doc__.splitlines()[0]
    )
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/debug.yaml")
    p.add_argument(
        "--quiet", action="store_true", help="no progress lines (same as train.quiet=true)"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    return p.parse_intermixed_args(argv)


def setup_logging(rank: int, quiet: bool) -> None:
    level = logging.INFO if rank == 0 and not quiet else logging.WARNING
    fmt = "%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    log.quiet(quiet)  # the progress channel has a level of its own: --quiet must reach it too


def seed_everything(seed: int, rank: int) -> None:
    """Seeds for anything stochastic in the step (dropout); the checkpoint restores them on resume."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def open_metrics(path: Path) -> IO[str]:
    """Open metrics.jsonl for appending, dropping a torn last line left by a SIGKILL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def fmt_eta(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass(frozen=True)
class LastSave:
    """The newest checkpoint of the run, for the progress line: ``at`` is None for the one this
    run resumed from."""

    step: int
    at: float | None = None
    blocked_s: float = 0.0

    def text(self, now: float) -> str:
        if self.at is None:
            return f"last save step {self.step} (resumed)"
        return f"last save step {self.step} {now - self.at:.0f}s ago, blocked {self.blocked_s:.3f}s"


class GoodputLine:
    """``goodput N%`` from the run ledger in the checkpoint dir (:mod:`kempnerforge.goodput`),
    read at most every ``every_s`` (the ledger grows with the job). The ledger knows this run's
    progress from its heartbeats, so the figure lags by up to one beat; empty until the first
    beat, or while there is no ledger or it cannot be read."""

    every_s = 30.0

    def __init__(self, ckpt_dir: str) -> None:
        self.dir = ckpt_dir
        self._next = 0.0
        self._text = ""

    def text(self, now: float) -> str:
        if now >= self._next:
            self._next = now + self.every_s
            try:
                from kempnerforge import goodput, ledger

                if Path(ledger.path(self.dir)).is_file():
                    rep = goodput.report(self.dir)
                    if rep["parts"]["productive_s"] > 0:
                        self._text = f"goodput {100 * rep['goodput']:.1f}%"
            except Exception as e:  # a report is never worth a failed run
                logger.debug("goodput for the progress line: %r", e)
        return self._text


def open_scalars(cfg: JobConfig, rank: int, step: int) -> MetricsLogger:
    """TensorBoard / W&B for this run (nothing when the run has no step left to log)."""
    if step >= cfg.train.max_steps:
        return MetricsLogger(cfg.logging.dir, resume_step=step, tensorboard=False, rank=rank)
    return MetricsLogger.from_config(cfg.logging, resume_step=step, rank=rank, config=cfg.to_dict())


def grad_norm_value(norm: torch.Tensor | None) -> float | None:
    """The global gradient norm as a float. Every rank calls it: under FSDP the norm is a
    DTensor whose ``full_tensor()`` may reduce across ranks."""
    if norm is None:
        return None
    full = getattr(norm, "full_tensor", None)
    return float((full() if callable(full) else norm).item())


# --------------------------------------------------------------------------- the run


def train(
    cfg: JobConfig, info: JobEnvironment, device: torch.device, early: PreemptionFlag
) -> RunEnd:
    """Run to ``train.max_steps`` (returns 0) or to an agreed stop (returns its exit code)."""
    with contextlib.ExitStack() as cleanup:
        return _train(cfg, info, device, early, cleanup)


def _train(
    cfg: JobConfig,
    info: JobEnvironment,
    device: torch.device,
    early: PreemptionFlag,
    cleanup: contextlib.ExitStack,
) -> RunEnd:
    rank, world = info.rank, info.world_size
    out_dir = Path(cfg.output_dir)
    gbs, seq_len = cfg.train.global_batch_size, cfg.model.seq_len
    seed_everything(cfg.train.seed, rank)

    # -- model, optimizer, schedule, checkpoints ---------------------------------------------
    raw = GPT(cfg.model, seed=cfg.train.seed).to(device)
    validate_freeze(raw, cfg.freeze)
    mode = distributed.parallel_mode(cfg.distributed, world)
    if mode == "fsdp":
        distributed.wrap_model(raw, "fsdp", device)  # in place: names and params become sharded
    optimizer = build_optimizer(raw, cfg.optim)
    scheduler = WarmupCosineSchedule(optimizer, cfg.optim, cfg.train.max_steps)
    ckpt = CheckpointManager(cfg.checkpoint, raw, optimizer, resilience=cfg.resilience)
    cleanup.callback(ckpt.close)  # drains a save in flight, stops its threads
    logger.info(
        "model: %.2fM params, %d layers, d_model %d | world %d (%s, %s) | %s",
        num_parameters(raw) / 1e6,
        cfg.model.n_layer,
        cfg.model.d_model,
        world,
        mode,
        info.launcher,
        device,
    )

    # -- resume: peek -> freeze in force at that step -> load -> dataloader state ----------------
    dataset = build_dataset(cfg.data, seq_len, cfg.model.vocab_size)
    sampler = GlobalSampler(len(dataset), gbs, rank, world, cfg.data.seed, cfg.data.shuffle)
    loader = StepLoader(dataset, sampler, cfg.train.micro_batch_size, cfg.data.num_workers)
    cleanup.callback(loader.close)
    step, tokens_seen, _extra = ckpt.resume(
        scheduler=scheduler, dataloader=loader, freeze=cfg.freeze
    )
    if early.requested:  # a signal that came before the manager's handlers were installed
        ckpt.request_stop(early.signal_name or "signal")
    # Freeze "in force at step s" is what step s trained with: effective_freeze(s - 1).
    in_force: list[FreezeSpec] = effective_freeze(cfg.freeze, max(step - 1, 0))
    model = distributed.wrap_model(raw, "ddp", device) if mode == "ddp" else raw
    if sampler.position != step * gbs:
        logger.warning(
            "data position %d is not step %d x global_batch_size %d (batch size changed?); "
            "continuing from the saved position",
            sampler.position,
            step,
            gbs,
        )

    metrics = cleanup.enter_context(open_metrics(out_dir / "metrics.jsonl")) if rank == 0 else None
    scalars = open_scalars(cfg, rank, step)
    cleanup.callback(scalars.close)  # before the process exits, os._exit included (main)
    track_norm = cfg.logging.enabled  # config, not rank-local state: the norm may be collective
    last_save = LastSave(step) if step > 0 else None
    goodput_line = GoodputLine(cfg.checkpoint.dir)
    samples_log = None
    if cfg.data.log_samples:  # debug: which global samples this rank consumed, per step
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"samples.rank{rank}.jsonl"
        samples_log = cleanup.enter_context(open(path, "a", encoding="utf-8"))  # noqa: SIM115
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=cfg.model.compute_dtype == "bfloat16"
    )

    def durable_metrics() -> None:
        """The step's metrics line is on disk before its checkpoint can commit."""
        if metrics is not None:
            metrics.flush()
            os.fsync(metrics.fileno())

    # -- the loop ---------------------------------------------------------------------------------
    max_steps = cfg.train.max_steps
    t_start = time.perf_counter()
    t_log, step_log, first_step = t_start, step, step
    while step < max_steps:
        t_step = time.perf_counter()
        want = effective_freeze(cfg.freeze, step)
        if canonical_freeze_meta(want) != canonical_freeze_meta(in_force):
            ckpt.flush_pending_save()  # the previous save records the old freeze list
            in_force = want
            n = apply_freeze(raw, in_force)
            if mode == "ddp":  # DDP registers trainable params at construction
                model = distributed.wrap_model(raw, "ddp", device)
            logger.info(
                "freeze stage at step %d: %s (%d trainable params)",
                step + 1,
                canonical_freeze_meta(in_force),
                n,
            )

        model.train()
        micro = loader.next_step(device)
        loss_sum = torch.zeros((), device=device)
        for x, y in micro:
            with autocast:
                loss = model(x, y)
            (loss / len(micro)).backward()
            loss_sum += loss.detach()
        norm = None
        if cfg.optim.grad_clip > 0 or track_norm:
            grads = [p for p in raw.parameters() if p.grad is not None]
            if grads and cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(grads, cfg.optim.grad_clip)
            elif grads:
                norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        tokens_seen += gbs * seq_len
        res = cfg.resilience
        if step == res.debug_signal_step and res.debug_signal_rank in (-1, rank):
            os.kill(os.getpid(), getattr(signal, res.signals[0]))  # testing aid, see config

        loss_mean = mean_over_ranks(loss_sum / len(micro))
        gnorm = grad_norm_value(norm) if track_norm else None
        step_s = time.perf_counter() - t_step
        scalars.log(
            step,
            loss=loss_mean,
            lr=lr,
            grad_norm=gnorm,
            tokens_per_s=gbs * seq_len / max(step_s, 1e-9),
            step_time_s=step_s,
        )
        # Every step, so the events of any step a save (interval, time, stop) may commit are
        # in the file first: one small write, no fsync.
        scalars.flush()
        if metrics is not None:
            metrics.write(
                json.dumps({"step": step, "loss": loss_mean, "lr": lr, "tokens_seen": tokens_seen})
                + "\n"
            )
            metrics.flush()
        if samples_log is not None:
            samples_log.write(
                json.dumps(
                    {"step": step, "samples": loader.last_numbers, "indices": loader.last_indices}
                )
                + "\n"
            )
            samples_log.flush()
        if step % cfg.train.log_interval == 0 or step == max_steps:
            now = time.perf_counter()
            tps = (step - step_log) * gbs * seq_len / max(now - t_log, 1e-9)
            eta = (now - t_start) / max(step - first_step, 1) * (max_steps - step)
            tail = [last_save.text(now) if last_save else "no save yet", goodput_line.text(now)]
            log.progress(
                "step %d/%d | loss %.4f | lr %.3e | %.0f tok/s | ETA %s | %s",
                step,
                max_steps,
                loss_mean,
                lr,
                tps,
                fmt_eta(eta),
                " | ".join(t for t in tail if t),
            )
            t_log, step_log = now, step

        save_args = {
            "tokens_seen": tokens_seen,
            "scheduler": scheduler,
            "dataloader": loader,
            "extra": {"vlm_freeze": canonical_freeze_meta(in_force)},
        }
        last = step == max_steps  # the final checkpoint is saved whatever the interval
        if last or step % cfg.checkpoint.interval == 0:
            durable_metrics()
        stop = ckpt.maybe_save(step, **save_args, force=last)
        if ckpt.has_saved(step):  # the save's own figure, at its step
            blocked = ckpt.last_save_stats.blocked_s
            scalars.log(step, save_blocked_s=blocked)
            last_save = LastSave(step, time.perf_counter(), blocked)
        if stop:
            logger.warning("stopped at step %d; exit code %d", step, ckpt.exit_code)
            return RunEnd(ckpt.exit_code, stopped=True)

    ckpt.wait()
    logger.info("done: %d steps", step)
    return RunEnd(0, stopped=False)


def _exit_now(code: int) -> None:
    """Leave the process at once: flush what we print, skip interpreter and CUDA teardown.

    Freeing gigabytes of pinned staging memory, destroying the CUDA context and the process group
    take seconds after the checkpoint is already durable, and a preempted job is on the clock
    (the grace time before SIGKILL). The kernel reclaims everything anyway.
    """
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(code)


def main(argv: list[str] | None = None, *, exit_when_stopped: bool = False) -> int:
    """Run one job. ``exit_when_stopped`` (the command line): after a stop, exit the process
    directly instead of returning (see ``_exit_now``)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.quiet:
        cfg.train.quiet = True
    # Until the checkpoint manager installs its own handlers (at resume), a stop signal is held
    # here rather than ending the process: never miss one.
    early = PreemptionFlag().install(cfg.resilience.signals)
    info, device = distributed.setup(cfg.distributed)
    setup_logging(info.rank, cfg.train.quiet)
    end = RunEnd(1, stopped=False)
    try:
        end = train(cfg, info, device, early)
    except ConfigError as e:
        logger.error("config error: %s", e)
        end = RunEnd(2, stopped=False)
    finally:
        early.uninstall()
        if exit_when_stopped and end.stopped:
            _exit_now(end.code)
        with contextlib.suppress(Exception):
            distributed.shutdown()
    return end.code


if __name__ == "__main__":
    sys.exit(main(exit_when_stopped=True))
