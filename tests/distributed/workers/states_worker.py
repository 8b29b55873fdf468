"""torchrun worker: handed-over states under 2 gloo ranks (``CheckpointManager(states=...)``).

Scenarios (``tests/`` on ``PYTHONPATH``; see :mod:`helpers.dist_worker`):

* ``replicated``: an EMA whose tensors differ on rank 1 (as BatchNorm statistics do between
  forwards) is written once, from rank 0's copy, and every rank loads rank 0's values;
* ``sharded``: a state holding a DTensor sharded over both ranks is written as two shards, one
  per rank, and each rank loads its own shard back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.dist_worker import run_scenarios
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.checkpoint.safe_unpickle import load_dcp_metadata
from kempnerforge.config import CheckpointConfig


class Holder:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, sd: dict) -> None:
        self.value = sd["value"]


def files_holding(step_dir: Path, prefix: str) -> dict[str, set[str]]:
    md = load_dcp_metadata(step_dir)
    out: dict[str, set[str]] = {}
    for index, info in md.storage_data.items():
        if index.fqn.startswith(prefix):
            out.setdefault(index.fqn, set()).add(str(info.relative_path))
    return out


def replicated(work: Path) -> None:
    rank = dist.get_rank()
    model = torch.nn.Linear(4, 4)
    ema = torch.nn.Linear(4, 4)
    with torch.no_grad():
        ema.weight.fill_(1.0 + rank)  # rank 1 differs
    cfg = CheckpointConfig(dir=str(work / "ckpt"), async_mode="async")
    mgr = CheckpointManager(cfg, model, None, states={"ema": ema})
    mgr.save(1)
    mgr.wait()
    mgr.close()
    held = files_holding(work / "ckpt" / "step_1", "states.ema.")
    assert set(held) == {"states.ema.weight", "states.ema.bias"}, held
    for key, files in held.items():
        assert len(files) == 1 and next(iter(files)).startswith("__0_"), (key, files)
    fresh = torch.nn.Linear(4, 4)
    mgr = CheckpointManager(cfg, torch.nn.Linear(4, 4), None, states={"ema": fresh})
    mgr.resume()
    mgr.close()
    assert torch.equal(fresh.weight, torch.ones(4, 4)), fresh.weight


def sharded(work: Path) -> None:
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(24.0).reshape(6, 4)
    state = Holder(distribute_tensor(full, mesh, [Shard(0)]))
    cfg = CheckpointConfig(dir=str(work / "ckpt"))
    mgr = CheckpointManager(cfg, torch.nn.Linear(2, 2), None, states={"shards": state})
    mgr.save(1)
    mgr.close()
    held = files_holding(work / "ckpt" / "step_1", "states.shards.")
    assert set(held) == {"states.shards.value"}, held
    assert held["states.shards.value"] == {"__0_0.distcp", "__1_0.distcp"}, held
    back = Holder(distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)]))
    mgr = CheckpointManager(cfg, torch.nn.Linear(2, 2), None, states={"shards": back})
    mgr.resume()
    mgr.close()
    assert isinstance(back.value, DTensor)
    assert torch.equal(back.value.to_local(), full.chunk(2)[rank])


if __name__ == "__main__":
    sys.exit(
        run_scenarios(
            {"replicated": replicated, "sharded": sharded},
            sys.argv[1].split(","),
            Path(sys.argv[2]),
        )
    )
