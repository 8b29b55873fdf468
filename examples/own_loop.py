"""A training script of your own, preemption-safe with three calls of KempnerForge.

A small CNN with BatchNorm and Dropout learns a synthetic image task with SGD (Nesterov momentum)
and OneCycleLR, reading its data through torchdata's ``StatefulDataLoader`` (shuffled, worker
processes), with gradient accumulation, clipping, autocast with a ``GradScaler``, an EMA copy of
the weights and counters of its own. Everything that must survive a restart beside the model and
the optimizer is handed to the manager once, as ``states``. It runs as one process or as several
DDP ranks (gloo on CPU, NCCL on GPUs):

    python examples/own_loop.py --out runs/own                       # one process
    torchrun --nproc_per_node=2 examples/own_loop.py --out runs/own  # two DDP ranks
    python launch/submit.py --local --tasks-per-node 2 -- python examples/own_loop.py --out runs/own
    python launch/submit.py --slurm --nodes 2 -- python examples/own_loop.py --out runs/own

Send SIGUSR1 (or let SLURM send it before the time limit): the run agrees on a step on every
rank, saves it, makes it durable, exits 75, and the launcher (or SLURM, through the job's own
``scontrol requeue``) starts it again; it continues bit for bit where it stopped.

Everything KempnerForge-specific is marked ``# <- KempnerForge``. The run writes, on rank 0,
``losses.jsonl`` (one line per step, appended across restarts) and, at the end, ``final.pt``
(weights, buffers, optimizer state, EMA, scaler and counters) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from kempnerforge.checkpoint import CheckpointManager  # <- KempnerForge
from kempnerforge.config import CheckpointConfig  # <- KempnerForge
from kempnerforge.log import progress  # <- KempnerForge (optional: one line like the library's)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


class Digits(torch.utils.data.Dataset):
    """Deterministic 16x16 "images" whose class is a pattern plus noise."""

    def __init__(self, n: int = 512, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 10, (n,), generator=g)
        protos = torch.randn(10, 1, 16, 16, generator=g)
        self.x = protos[self.y] + 0.8 * torch.randn(n, 1, 16, 16, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Counters:
    """The script's own numbers; any object with state_dict / load_state_dict can be handed over."""

    def __init__(self) -> None:
        self.samples = 0
        self.best_loss = float("inf")

    def state_dict(self) -> dict[str, float | int]:
        return {"samples": self.samples, "best_loss": self.best_loss}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.samples, self.best_loss = int(state["samples"]), float(state["best_loss"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run directory (checkpoints, losses, final state)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--interval", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    args = p.parse_args()

    torch.set_num_threads(1)  # results must not depend on the launcher's thread count
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank() if world > 1 else 0
    out = Path(args.out)
    torch.manual_seed(1234 + rank)

    data = Digits()
    sampler = StatefulDistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7)
    loader = StatefulDataLoader(
        data, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers
    )
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    if len(loader) % args.accum:
        p.error(f"--accum {args.accum} must divide the {len(loader)} batches of an epoch")
    per_epoch = len(loader) // args.accum  # optimizer steps per epoch
    total = args.epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
    scaler = torch.amp.GradScaler("cpu" if not torch.cuda.is_available() else "cuda")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95))
    counters = Counters()
    torch.manual_seed(1234 + rank)  # each rank its own Dropout stream

    mgr = CheckpointManager(  # <- KempnerForge
        CheckpointConfig(
            dir=str(out / "checkpoints"),
            interval=args.interval,
            async_mode="async" if args.async_save else "disabled",
        ),
        model,
        opt,
        states={
            "sched": sched,
            "loader": loader,
            "scaler": scaler,
            "ema": ema,
            "counters": counters,
        },
    )
    step, _, _ = mgr.resume()  # <- KempnerForge: every state above is restored before it returns
    ddp = DDP(model) if world > 1 else model
    device = "cuda" if torch.cuda.is_available() else "cpu"

    losses = open(out / "losses.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    last = time.perf_counter()
    while step < total:
        sampler.set_epoch(step // per_epoch)  # after resume(): the loader continues mid-epoch
        micro = 0
        for x, y in loader:
            ddp.train()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = F.cross_entropy(ddp(x), y) / args.accum
            scaler.scale(loss).backward()
            micro += 1
            if micro % args.accum:
                continue  # a stop can only come at an optimizer step: maybe_save is called there
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            ema.update_parameters(model)
            step += 1
            counters.samples += x.shape[0] * args.accum * world
            mean = loss.detach().float() * args.accum
            if world > 1:
                dist.all_reduce(mean)
                mean /= world
            counters.best_loss = min(counters.best_loss, mean.item())
            now = time.perf_counter()
            if losses is not None:
                row = {"step": step, "loss": mean.item(), "dt": now - last, "pid": os.getpid()}
                losses.write(json.dumps(row) + "\n")
                losses.flush()
            last = now
            if step % 10 == 0:
                progress("own_loop step %d/%d loss %.4f", step, total, mean.item())
            if mgr.maybe_save(step):  # <- KempnerForge
                sys.exit(mgr.exit_code)  # saved, durable, requeued: 75 means "run me again"
            if step == total:
                break
    mgr.wait()  # <- KempnerForge
    mgr.close()  # <- KempnerForge
    if rank == 0:
        final = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
        final.update(
            ema=ema.state_dict(), scaler=scaler.state_dict(), counters=counters.state_dict()
        )
        torch.save(final, out / "final.pt")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
