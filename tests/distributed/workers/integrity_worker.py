"""torchrun worker (gloo, CPU) for tests/distributed/test_integrity_dist.py.

``python -m torch.distributed.run --nproc_per_node=2 integrity_worker.py SCENARIO[,...] OUT``
(``tests/`` on ``PYTHONPATH``); each scenario runs in ``OUT/<scenario>`` and writes
``OUT/<scenario>.ok`` on rank 0 when its assertions held, or ``OUT/<scenario>.err.<rank>`` with
the traceback (see :mod:`helpers.dist_worker`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from helpers.dist_worker import load_errors, unseen_paths, worker_main
from torch.nn.parallel import DistributedDataParallel as DDP

from kempnerforge.checkpoint import CheckpointManager, storage
from kempnerforge.config import AsyncCheckpointMode, CheckpointConfig


def _linear_manager(ckpt: Path) -> CheckpointManager:
    model = nn.Linear(4, 2)
    return CheckpointManager(
        CheckpointConfig(dir=str(ckpt)), model, torch.optim.SGD(model.parameters(), lr=0.1)
    )


def scenario_missing_train_state(work: Path) -> None:
    """One rank cannot see its train state: every rank raises the same error, nobody hangs."""
    rank = dist.get_rank()
    ckpt = work / "ckpt"
    mgr = _linear_manager(ckpt)
    mgr.save(1)
    dist.barrier()
    if rank == 0:
        (ckpt / "step_1" / storage.train_state_name(1)).unlink()
    dist.barrier()
    raised, seen = load_errors(lambda: mgr.load(str(ckpt / "step_1")))
    assert "rank_00001.pt" in raised and "missing" in raised, raised
    assert len(set(seen)) == 1, seen
    mgr.close()


def scenario_stale_view(work: Path) -> None:
    """Rank 1's view of the shared filesystem lags (the file is there for rank 0): the ranks
    agree before the collective load and all raise the same error naming rank 1's view."""
    rank = dist.get_rank()
    mgr = _linear_manager(work / "ckpt")
    mgr.save(1)
    dist.barrier()
    with unseen_paths(lambda p: rank == 1 and p.parent.name == storage.TRAIN_STATE_DIR):
        raised, seen = load_errors(mgr.load)
    assert "rank 1 cannot see" in raised and "rank_00001.pt" in raised, raised
    assert len(set(seen)) == 1, seen
    mgr.close()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _build(
    seed: int, ckpt: Path, mode: str
) -> tuple[nn.Module, DDP, torch.optim.Optimizer, CheckpointManager]:
    torch.manual_seed(seed)
    raw = _Net()
    ddp = DDP(raw)
    opt = torch.optim.SGD(raw.parameters(), lr=0.05, momentum=0.9)
    cfg = CheckpointConfig(dir=str(ckpt), async_mode=AsyncCheckpointMode(mode))
    return raw, ddp, opt, CheckpointManager(cfg, raw, opt)


def _step(ddp: DDP, opt: torch.optim.Optimizer, k: int) -> float:
    g = torch.Generator().manual_seed(1000 * k + dist.get_rank())  # each rank its own batch
    x = torch.randn(5, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (5,), generator=g)
    loss = nn.functional.cross_entropy(ddp(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def scenario_ddp_batchnorm(work: Path) -> None:
    """BatchNorm running stats differ across DDP ranks between forwards; the checkpoint must
    hold rank 0's, which DDP broadcasts at the next forward, for a bit-exact resume."""
    for mode in ("disabled", "async"):
        ckpt = work / f"bn-{mode}"
        raw, ddp, opt, mgr = _build(0, ckpt, mode)
        for k in range(3):
            _step(ddp, opt, k)
        stats = [raw.bn.running_mean.clone()]
        dist.all_gather_object(stats_all := [None] * dist.get_world_size(), stats[0])
        assert not torch.equal(stats_all[0], stats_all[1]), "ranks' buffers should differ"
        mgr.save(3)
        mgr.wait()
        ref = [_step(ddp, opt, k) for k in range(3, 6)]
        ref_state = {k: v.clone() for k, v in raw.state_dict().items()}
        mgr.close()

        raw2, ddp2, opt2, mgr2 = _build(7, ckpt, mode)
        assert mgr2.load()[0] == 3
        got = [_step(ddp2, opt2, k) for k in range(3, 6)]
        assert got == ref, (mode, got, ref)
        for k, v in raw2.state_dict().items():
            assert torch.equal(v, ref_state[k]), (mode, k)
        mgr2.close()


def main() -> int:
    return worker_main(globals(), pg_timeout_s=30)


if __name__ == "__main__":
    sys.exit(main())
