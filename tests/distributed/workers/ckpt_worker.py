"""torchrun worker for the checkpoint tests: FSDP2 (or plain) tiny model on gloo/CPU.

Usage (``tests/`` on ``PYTHONPATH``)::

    torchrun --standalone --nproc_per_node=N ckpt_worker.py SCENARIO[,SCENARIO...] OUTDIR

Each scenario runs in ``OUTDIR/<scenario>``, asserts its own expectations and leaves
``OUTDIR/<scenario>.ok`` when they held on every rank (``.err.<rank>`` with the traceback when
not, see :mod:`helpers.dist_worker`); several scenarios share one launch because starting
torchrun costs more than any scenario.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.dist_worker import worker_main
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.checkpoint.storage import PAUSE_ENV
from kempnerforge.config import CheckpointConfig

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    # uneven sizes so 3-way shards are uneven
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 5), torch.nn.Linear(5, 3)
    )
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(1000 + dist.get_rank())
    for _ in range(steps):
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "model": get_model_state_dict(model, options=FULL),
        "optim": get_optimizer_state_dict(model, opt, options=FULL).get("state", {}),
    }


def assert_equal(a: object, b: object, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (
            f"{where}: keys {a.keys()} != {b.keys()}"
        )
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def local_shards(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    out = {f"p.{k}": v.to_local().clone() for k, v in model.state_dict().items()}
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            out[f"o.{i}.{k}"] = (v.to_local() if hasattr(v, "to_local") else v).clone()
    return out


def cfg(out: Path, mode: str = "disabled", **kw: object) -> CheckpointConfig:
    return CheckpointConfig(dir=str(out / "ckpt"), async_mode=mode, writer_threads=1, **kw)


def scenario_save(out: Path) -> None:
    """Train, save (sync) at step 3, keep a full reference, reload into a fresh model: bit-exact."""
    model, opt = build(0)
    train(model, opt, 3)
    mgr = CheckpointManager(cfg(out), model, opt)
    mgr.save(3, tokens_seen=300, extra={"note": "x"})
    ref = full_state(model, opt)
    if dist.get_rank() == 0:
        torch.save(ref, out / "ref.pt")
    mine = local_shards(model, opt)
    model2, opt2 = build(1)
    mgr2 = CheckpointManager(cfg(out), model2, opt2)
    assert mgr2.peek_saved_step() == 3
    assert mgr2.load() == (3, 300, {"note": "x"})
    assert_equal(mine, local_shards(model2, opt2), "local")
    dist.barrier()


def scenario_load(out: Path) -> None:
    """Load the 2-rank checkpoint with this world size: full state bit-equal, RNG re-seeded."""
    out = out.parent  # runs inside the directory the "save" scenario wrote
    model, opt = build(7)
    mgr = CheckpointManager(cfg(out), model, opt)
    assert mgr.load() == (3, 300, {"note": "x"})
    ref = torch.load(out / "ref.pt", weights_only=True)
    full = full_state(model, opt)  # collective; only rank 0 receives the full tensors
    if dist.get_rank() == 0:
        assert ref["model"] and ref["optim"]
        assert_equal(ref, full, "full")
    # different world size: each rank got a distinct, deterministic stream
    draws = [None] * dist.get_world_size()
    first = torch.rand(2).tolist()
    dist.all_gather_object(draws, first)
    assert len({tuple(d) for d in draws}) == len(draws), draws
    mgr.load()
    assert torch.rand(2).tolist() == first  # the same resume re-seeds the same way
    train(model, opt, 1)  # the loaded state trains


def scenario_async_train(out: Path) -> None:
    """Async saves back to back while training runs FSDP collectives on the default group."""
    model, opt = build(0)
    mgr = CheckpointManager(cfg(out, "async", keep_last_n=2), model, opt)
    for step in range(1, 7):
        train(model, opt, 1)
        mgr.save(step, tokens_seen=step)
    mine = local_shards(model, opt)
    mgr.wait()
    assert os.readlink(out / "ckpt" / "latest") == "step_6"
    assert mgr.last_save_stats.new_host_bytes == 0  # buffers reused from the first save
    model2, opt2 = build(1)
    assert CheckpointManager(cfg(out), model2, opt2).load()[0] == 6
    assert_equal(mine, local_shards(model2, opt2), "local")
    mgr.close()
    dist.barrier()
    steps = sorted(p.name for p in (out / "ckpt").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_5", "step_6"], steps


def scenario_slow_rank0(out: Path) -> None:
    """Rank 0 sleeps inside its train-state write (env hook): nobody returns before `latest`."""
    os.environ[PAUSE_ENV] = "train_state_write=2@0"
    model, opt = build(0)
    for mode, step in (("disabled", 1), ("async", 2)):
        mgr = CheckpointManager(cfg(out, mode), model, opt)
        train(model, opt, 1)
        mgr.save(step)
        if mode == "async":
            mgr.wait()
        link = out / "ckpt" / "latest"
        assert os.readlink(link) == f"step_{step}", (dist.get_rank(), mode, os.readlink(link))
        assert (link / "metadata.json").is_file()
        mgr.close()
        dist.barrier()
    del os.environ[PAUSE_ENV]


def main() -> int:
    return worker_main(globals(), pg_timeout_s=120, log_level=logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
