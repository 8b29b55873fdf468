"""A training script of your own, preemption-safe with three calls of KempnerForge.

A small CNN with BatchNorm and Dropout learns a synthetic image task with SGD (Nesterov momentum)
and OneCycleLR, reading its data through torchdata's ``StatefulDataLoader`` (shuffled, worker
processes). It runs as one process or as several DDP ranks (gloo on CPU, NCCL on GPUs):

    python examples/own_loop.py --out runs/own                       # one process
    torchrun --nproc_per_node=2 examples/own_loop.py --out runs/own  # two DDP ranks
    python launch/submit.py --local --tasks-per-node 2 -- python examples/own_loop.py --out runs/own
    python launch/submit.py --slurm --nodes 2 -- python examples/own_loop.py --out runs/own

Send SIGUSR1 (or let SLURM send it before the time limit): the run agrees on a step on every
rank, saves it, makes it durable, exits 75, and the launcher (or SLURM, through the job's own
``scontrol requeue``) starts it again; it continues bit for bit where it stopped.

Everything KempnerForge-specific is marked ``# <- KempnerForge``. The run writes, on rank 0,
``losses.jsonl`` (one line per step, appended across restarts) and, at the end, ``final.pt``
(weights, buffers and optimizer state) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from kempnerforge.checkpoint import CheckpointManager  # <- KempnerForge
from kempnerforge.config import CheckpointConfig  # <- KempnerForge


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run directory (checkpoints, losses, final state)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--interval", type=int, default=10, help="steps between checkpoints")
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
    total = args.epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
    torch.manual_seed(1234 + rank)  # each rank its own Dropout stream

    mgr = CheckpointManager(  # <- KempnerForge
        CheckpointConfig(dir=str(out / "checkpoints"), interval=args.interval), model, opt
    )
    step, _, _ = mgr.resume(scheduler=sched, dataloader=loader)  # <- KempnerForge
    ddp = DDP(model) if world > 1 else model

    losses = open(out / "losses.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    while step < total:
        sampler.set_epoch(step // len(loader))
        for x, y in loader:
            ddp.train()
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if world > 1:
                dist.all_reduce(mean := loss.detach().clone())
                mean /= world
            else:
                mean = loss.detach()
            if losses is not None:
                losses.write(json.dumps({"step": step, "loss": mean.item()}) + "\n")
                losses.flush()
            if mgr.maybe_save(step, scheduler=sched, dataloader=loader):  # <- KempnerForge
                sys.exit(mgr.exit_code)  # saved, durable, requeued: 75 means "run me again"
            if step == total:
                break
    mgr.wait()  # <- KempnerForge
    mgr.close()  # <- KempnerForge
    if rank == 0:
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
            out / "final.pt",
        )
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
