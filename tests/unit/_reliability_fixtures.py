"""Checkpoints on disk for the reliability tests, written with plain DCP in our layout.

The layout (``step_N/`` with DCP shards, ``train_state/rank_*.pt``, ``metadata.json`` with a
manifest written last, a relative ``latest`` link) is built here with the storage helpers and
``torch.distributed.checkpoint.save`` directly, so the CLI and the safe loaders are tested on
real DCP files independently of the manager's save path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from kempnerforge.checkpoint import storage


def tiny_model(seed: int = 0, width: int = 6) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def write_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    *,
    commit: bool = True,
    move_latest: bool = True,
) -> Path:
    """Save ``step`` under ``root`` as the manager lays it out; return the step dir."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = root / f"{storage.TMP_PREFIX}{step}"
    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, opt),
    }
    dcp.save(state, checkpoint_id=str(tmp))
    (tmp / storage.TRAIN_STATE_DIR).mkdir()
    torch.save(
        {"step": step, "tokens_seen": 10 * step, "rng": {"torch": torch.get_rng_state()}},
        tmp / storage.train_state_name(0),
    )
    if not commit:
        return tmp
    files = storage.list_files(tmp)
    meta = {
        "step": step,
        "tokens_seen": 10 * step,
        "world_size": 1,
        "saved_at_ns": time.time_ns(),
        "torch_version": torch.__version__,
        "manifest": {"algo": storage.CHECKSUM_ALGO, "files": storage.manifest_entries(tmp, files)},
    }
    storage.atomic_write_json(tmp / storage.METADATA_FILE, meta)
    final = root / storage.step_dir_name(step)
    os.rename(tmp, final)
    if move_latest:
        storage.atomic_symlink(final.name, root / storage.LATEST)
    return final


def shard_file(step_dir: Path) -> Path:
    """The first DCP data file of a step dir."""
    return sorted(step_dir.glob("*.distcp"))[0]
