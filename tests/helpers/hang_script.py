"""A training loop in which rank 1 blocks inside one step for good: what the hang watchdog ends.

Run it on every rank of a gloo group (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the launcher)::

    python hang_script.py CKPT_DIR HANG_TIMEOUT_S [--hang-at N] [--steps N]
        [--max-requeues-without-progress N] [--step-sleep-s S]

Rank 1 prints ``rank 1 blocks inside step N`` and sleeps in :func:`block_inside_step`; rank 0
waits for it in DDP's gradient all-reduce, so neither rank makes step progress. Each rank's
watchdog then dumps every thread's stack (this file's frames among them) and exits with the
checkpoint manager's exit code; the requeue guard decides between another run and a stop.
Tests build the command line with :func:`command` (the launcher adds the interpreter).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PATH = Path(__file__).resolve()


def command(
    ckpt_dir: str | Path,
    hang_timeout_s: float,
    *,
    hang_at: int = 6,
    steps: int = 20,
    max_requeues_without_progress: int = 1,
    step_sleep_s: float = 0.0,
) -> list[str]:
    """This script and its arguments, for ``[python, *command(...)]``."""
    return [
        str(PATH),
        str(ckpt_dir),
        str(hang_timeout_s),
        f"--hang-at={hang_at}",
        f"--steps={steps}",
        f"--max-requeues-without-progress={max_requeues_without_progress}",
        f"--step-sleep-s={step_sleep_s}",
    ]


def block_inside_step(step: int) -> None:
    print(f"rank 1 blocks inside step {step}", flush=True)
    time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt_dir")
    p.add_argument("hang_timeout_s", type=float)
    p.add_argument("--hang-at", type=int, default=6, help="the step rank 1 blocks inside")
    p.add_argument("--steps", type=int, default=20, help="where a run that never hangs ends")
    p.add_argument("--max-requeues-without-progress", type=int, default=1)
    p.add_argument("--step-sleep-s", type=float, default=0.0, help="pace of the steps")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kempnerforge.checkpoint import CheckpointManager
    from kempnerforge.config import CheckpointConfig
    from kempnerforge.resilience.config import ResilienceConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res = ResilienceConfig(
        hang_timeout_s=args.hang_timeout_s,
        max_requeues_without_progress=args.max_requeues_without_progress,
    )
    cfg = CheckpointConfig(dir=args.ckpt_dir, interval=4)
    mgr = CheckpointManager(cfg, model, opt, resilience=res)
    step, _, _ = mgr.resume()
    ddp = DDP(model)
    while step < args.steps:
        if rank == 1 and step + 1 == args.hang_at:
            block_inside_step(step + 1)
        ddp(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        step += 1
        time.sleep(args.step_sleep_s)
        if mgr.maybe_save(step):
            return mgr.exit_code
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
