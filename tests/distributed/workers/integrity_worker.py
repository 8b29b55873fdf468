"""torchrun worker (gloo, CPU) for tests/distributed/test_integrity_dist.py.

``python -m torch.distributed.run --nproc_per_node=2 integrity_worker.py SCENARIO OUT``; each
scenario writes ``OUT/<scenario>.ok`` on rank 0 when its assertions held, or
``OUT/<scenario>.err.<rank>`` with the traceback.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kempnerforge.checkpoint import CheckpointManager, storage
from kempnerforge.config import AsyncCheckpointMode, CheckpointConfig


def scenario_missing_train_state(out: Path) -> None:
    """One rank cannot see its train state: every rank raises the same error, nobody hangs."""
    rank = dist.get_rank()
    ckpt = out / "missing"
    model = nn.Linear(4, 2)
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(ckpt)), model, torch.optim.SGD(model.parameters(), lr=0.1)
    )
    mgr.save(1)
    dist.barrier()
    if rank == 0:
        (ckpt / "step_1" / storage.train_state_name(1)).unlink()
    dist.barrier()
    try:
        mgr.load(str(ckpt / "step_1"))
        raised = ""
    except FileNotFoundError as e:
        raised = str(e)
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, raised)
    assert "rank_00001.pt" in raised and "missing" in raised, raised
    assert len(set(seen)) == 1, seen
    mgr.close()


def scenario_stale_view(out: Path) -> None:
    """Rank 1's view of the shared filesystem lags (the file is there for rank 0): the ranks
    agree before the collective load and all raise the same error naming rank 1's view.

    The lag of a remote filesystem's attribute cache cannot be made real on one host: rank 1's
    ``Path.is_file`` / ``Path.exists`` answer False for train-state files, as such a cache would.
    """
    from unittest.mock import patch

    rank = dist.get_rank()
    ckpt = out / "stale"
    model = nn.Linear(4, 2)
    mgr = CheckpointManager(
        CheckpointConfig(dir=str(ckpt)), model, torch.optim.SGD(model.parameters(), lr=0.1)
    )
    mgr.save(1)
    dist.barrier()
    real_is_file, real_exists = Path.is_file, Path.exists

    def stale(real):
        def check(self: Path, *a, **k) -> bool:
            if rank == 1 and self.parent.name == storage.TRAIN_STATE_DIR:
                return False
            return real(self, *a, **k)

        return check

    with (
        patch.object(Path, "is_file", stale(real_is_file)),
        patch.object(Path, "exists", stale(real_exists)),
    ):
        try:
            mgr.load()
            raised = ""
        except FileNotFoundError as e:
            raised = str(e)
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, raised)
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


def scenario_ddp_batchnorm(out: Path) -> None:
    """BatchNorm running stats differ across DDP ranks between forwards; the checkpoint must
    hold rank 0's, which DDP broadcasts at the next forward, for a bit-exact resume."""
    for mode in ("disabled", "async"):
        ckpt = out / f"bn-{mode}"
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
    name, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    try:
        globals()[f"scenario_{name}"](out)
        dist.barrier()
        if rank == 0:
            (out / f"{name}.ok").write_text("ok")
        code = 0
    except BaseException:
        (out / f"{name}.err.{rank}").write_text(traceback.format_exc())
        code = 1
    os._exit(code)  # no teardown: a failed scenario must not hang in destroy_process_group


if __name__ == "__main__":
    sys.exit(main())
