"""What users would do without KempnerForge, measured on the same state and filesystem.

- ``torch_save``: ``torch.save`` of ``{"model": ..., "optim": ...}`` into one file, then fsync (the
  save is not a checkpoint until it is durable, so the fsync is counted).
- ``dcp_sync``: ``torch.distributed.checkpoint.save`` with its defaults (fsyncs its files).
- ``dcp_async``: ``torch.distributed.checkpoint.async_save`` with its defaults (a fresh staging copy
  every save, no buffer reuse); blocked = until the call returns, durable = until its future is done.

Each returns ``{"blocked_s", "durable_s", "new_host_bytes", "disk_bytes"}`` or ``{"error": ...}``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from measure import Span, dir_bytes, remove, settle
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from kempnerforge.checkpoint.storage import fsync_dir

logger = logging.getLogger(__name__)


def _dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def torch_save(model: torch.nn.Module, opt: torch.optim.Optimizer, root: Path) -> dict[str, object]:
    path = root / "torch_save.pt"
    settle(next(model.parameters()).device)
    span = Span().start()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(root)
    t = span.elapsed()
    out = {"blocked_s": t, "durable_s": t, "new_host_bytes": span.new_host_bytes()}
    out["disk_bytes"] = dir_bytes(path)
    remove(path)
    return out


def dcp_sync(model: torch.nn.Module, opt: torch.optim.Optimizer, root: Path) -> dict[str, object]:
    path = root / "dcp_sync"
    remove(path)
    settle(next(model.parameters()).device)
    span = Span().start()
    dcp.save(_dcp_state(model, opt), checkpoint_id=str(path))
    t = span.elapsed()
    out = {"blocked_s": t, "durable_s": t, "new_host_bytes": span.new_host_bytes()}
    out["disk_bytes"] = dir_bytes(path)
    remove(path)
    return out


def dcp_async(model: torch.nn.Module, opt: torch.optim.Optimizer, root: Path) -> dict[str, object]:
    path = root / "dcp_async"
    remove(path)
    settle(next(model.parameters()).device)
    span = Span().start()
    fut = dcp.async_save(_dcp_state(model, opt), checkpoint_id=str(path))
    blocked = span.elapsed()
    fut.result()
    durable = span.elapsed()
    out = {"blocked_s": blocked, "durable_s": durable, "new_host_bytes": span.new_host_bytes()}
    out["disk_bytes"] = dir_bytes(path)
    remove(path)
    return out


BASELINES = {"torch_save": torch_save, "dcp_sync": dcp_sync, "dcp_async": dcp_async}


def run(
    name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, root: Path
) -> dict[str, object]:
    """Run one baseline; a failure is recorded (with its message), never fatal to the benchmark."""
    try:
        return BASELINES[name](model, opt, root)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        logger.exception("baseline %s failed", name)
        return {"error": f"{type(e).__name__}: {e}"[:500]}
