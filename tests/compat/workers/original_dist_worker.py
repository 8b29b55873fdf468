"""torchrun worker for the port of the original's tests/distributed/test_checkpoint.py.

Usage (``tests/`` on ``PYTHONPATH``, as :func:`helpers.torchrun.torchrun` sets it)::

    torchrun --standalone --nproc_per_node=2 original_dist_worker.py SCENARIO[,...] OUTDIR

The original ran on 4 CUDA GPUs with its Transformer under FSDP2; here: this project's GPT under
FSDP2 on gloo/CPU, 2 ranks. Each scenario asserts its expectations in its own directory
``OUTDIR/<scenario>``; ``OUTDIR/<scenario>.ok`` appears when they held on every rank. A failing
scenario writes ``<scenario>.err.<rank>`` and the remaining ones still run
(``helpers.dist_worker.run_scenarios`` with ``keep_going``), so each ported test reports alone.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.dist_worker import load_errors, unseen_paths, worker_main
from helpers.optim import adam_moments
from helpers.original_format import original_rng_state, point_latest
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.checkpoint.storage import PAUSE_ENV
from kempnerforge.config import AsyncCheckpointMode, CheckpointConfig
from kempnerforge.model import GPT, ModelConfig

SMALL = ModelConfig(vocab_size=128, seq_len=32, n_layer=2, n_head=2, d_model=32)


def fsdp_gpt(seed: int = 42) -> GPT:
    model = GPT(SMALL, seed=seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def tokens(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL.vocab_size, (2, 16), generator=g)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for i in range(n):
        model(tokens(i)).sum().backward()
        opt.step()
        opt.zero_grad()


# ----------------------------------------------------------------------------- scenarios
def scenario_save_load_fsdp(work: Path) -> None:
    ckpt = str(work)
    model = fsdp_gpt(42)
    opt = adamw(model)
    train(model, opt, 1)
    with torch.no_grad():
        ref = model(tokens()).clone()
    mgr = CheckpointManager(CheckpointConfig(dir=ckpt, keep_last_n=2), model, opt)
    mgr.save(step=1, tokens_seen=64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        assert not torch.allclose(ref, model(tokens()), atol=1e-3)
    mgr.load()
    with torch.no_grad():
        restored = model(tokens())
    assert torch.allclose(ref, restored, atol=1e-5), (ref - restored).abs().max().item()


def scenario_resume_restores_optimizer_moments(work: Path) -> None:
    ckpt = str(work)
    model = fsdp_gpt(42)
    opt = adamw(model)
    train(model, opt, 3)
    ref = adam_moments(opt)
    assert ref and any(ea.abs().sum().item() > 0 for ea, _ in ref)
    CheckpointManager(CheckpointConfig(dir=ckpt, keep_last_n=2), model, opt).save(
        step=3, tokens_seen=192
    )
    model2 = fsdp_gpt(42)
    opt2 = adamw(model2)
    assert not adam_moments(opt2), "fresh optimizer should be empty before load"
    CheckpointManager(CheckpointConfig(dir=ckpt, keep_last_n=2), model2, opt2).load()
    loaded = adam_moments(opt2)
    assert len(loaded) == len(ref), "optimizer moments not restored"
    for i, ((rea, rev), (lea, lev)) in enumerate(zip(ref, loaded, strict=True)):
        assert torch.equal(rea, lea), f"param {i}: exp_avg"
        assert torch.equal(rev, lev), f"param {i}: exp_avg_sq"


def scenario_latest_symlink(work: Path) -> None:
    ckpt = str(work)
    model = fsdp_gpt(0)
    mgr = CheckpointManager(CheckpointConfig(dir=ckpt, keep_last_n=3), model, adamw(model))
    mgr.save(step=10)
    mgr.save(step=20)
    if dist.get_rank() == 0:
        latest = Path(ckpt) / "latest"
        assert latest.exists()
        assert latest.resolve().name == "step_20"


def scenario_save_waits_for_rank0_writes(work: Path) -> None:
    """Rank 0 is slowed inside its train-state write (the original slowed its torch.save)."""
    ckpt = str(work)
    model = fsdp_gpt(0)
    mgr = CheckpointManager(CheckpointConfig(dir=ckpt, keep_last_n=2), model, adamw(model))
    sleep_s = 0.5
    os.environ[PAUSE_ENV] = f"train_state_write={sleep_s}@0"
    try:
        dist.barrier()
        t0 = time.perf_counter()
        mgr.save(step=1, tokens_seen=100)
        elapsed = time.perf_counter() - t0
    finally:
        del os.environ[PAUSE_ENV]
    assert elapsed >= 0.4 * sleep_s, f"save() returned after {elapsed:.3f}s: no end-of-save sync"
    step_dir = Path(ckpt) / "step_1"
    ts = [step_dir / "train_state.pt", step_dir / "train_state" / "rank_00000.pt"]
    assert any(p.exists() for p in ts), "rank 0's train state not visible after save()"
    assert (step_dir / "metadata.json").exists(), "metadata.json not visible after save()"


def scenario_load_does_not_hang_on_divergent_exists(work: Path) -> None:
    """Non-zero ranks see the train-state file as missing (attribute-cache skew): the load must
    not deadlock. The original's test skewed Path.exists for train_state.pt; here the skew
    covers both names and is_file, whichever the load consults. Adapted: the original read one
    train state on rank 0 and broadcast it, so the skew went unnoticed; here every rank reads
    its own, so the ranks agree before the collective load and all raise the same error."""
    ckpt = str(work)
    rank = dist.get_rank()
    model = fsdp_gpt(0)
    mgr = CheckpointManager(CheckpointConfig(dir=ckpt, keep_last_n=2), model, adamw(model))
    mgr.save(step=1, tokens_seen=100)
    dist.barrier()

    def skewed(path: Path) -> bool:
        return rank != 0 and (path.name == "train_state.pt" or path.parent.name == "train_state")

    with unseen_paths(skewed):
        raised, seen = load_errors(mgr.load)
    assert "rank 1 cannot see" in raised, f"rank {rank}: {raised!r}"
    assert len(set(seen)) == 1, f"ranks raised different errors: {seen}"


def scenario_latest_only_resolves_to_durable_checkpoints(work: Path) -> None:
    ckpt = str(work)
    rank = dist.get_rank()
    model = fsdp_gpt(0)
    cfg = CheckpointConfig(dir=ckpt, keep_last_n=3, async_mode=AsyncCheckpointMode.async_pinned)
    mgr = CheckpointManager(cfg, model, adamw(model))
    latest = Path(ckpt) / "latest"
    for s in (10, 20, 30, 40):
        mgr.save(step=s)
        if rank == 0 and latest.exists():
            assert (latest.resolve() / ".metadata").exists(), f"after save({s})"
    mgr.wait()
    if rank == 0:
        assert latest.resolve().name == "step_40"
        assert (latest.resolve() / ".metadata").exists()
    dist.barrier()
    step, _, _ = mgr.load()
    assert step == 40, f"rank {rank}: resumed at {step}"


def scenario_resume_falls_back_when_latest_incomplete(work: Path) -> None:
    """Rank 0 fabricates step_2 as the original's interrupted async flush left it (train_state.pt
    + metadata.json, no DCP .metadata) and repoints latest at it: resume uses step_1."""
    ckpt = str(work)
    rank = dist.get_rank()
    model = fsdp_gpt(0)
    mgr = CheckpointManager(CheckpointConfig(dir=ckpt, keep_last_n=5), model, adamw(model))
    mgr.save(step=1, tokens_seen=64)
    dist.barrier()
    if rank == 0:
        step2 = Path(ckpt) / "step_2"
        step2.mkdir()
        ts = {"step": 2, "tokens_seen": 128, "rng": original_rng_state()}
        torch.save(ts, step2 / "train_state.pt")
        (step2 / "metadata.json").write_text('{"step": 2, "tokens_seen": 128}')
        point_latest(ckpt, "step_2")
    dist.barrier()
    step, tokens_seen, _ = mgr.load()
    assert step == 1, f"rank {rank}: expected fallback to step 1, got {step}"
    assert tokens_seen == 64


def scenario_back_to_back_async_saves_do_not_deadlock(work: Path) -> None:
    ckpt = str(work)
    model = fsdp_gpt(0)
    cfg = CheckpointConfig(dir=ckpt, keep_last_n=3, async_mode=AsyncCheckpointMode.async_pinned)
    mgr = CheckpointManager(cfg, model, adamw(model))
    for s in (10, 20, 30, 40):
        mgr.save(step=s)
    mgr.wait()
    if dist.get_rank() == 0:
        assert (Path(ckpt) / "latest").resolve().name == "step_40"
    dist.barrier()


def main() -> int:
    timeout = float(os.environ.get("COMPAT_PG_TIMEOUT_S", "60"))
    return worker_main(globals(), keep_going=True, pg_timeout_s=timeout)


if __name__ == "__main__":
    sys.exit(main())
