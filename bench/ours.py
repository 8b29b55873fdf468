"""Our side: ``kempnerforge.checkpoint.CheckpointManager`` timed from the caller's seat.

We time what the training loop sees (the ``save()`` call, then ``wait()`` until ``latest`` is
committed) and record, beside it, the manager's own telemetry for the same save when it exposes
one. The two are reported separately so a disagreement shows up instead of being averaged away.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from measure import Span, remove, settle

logger = logging.getLogger(__name__)

_STATS_ATTRS = ("last_save_stats", "last_stats", "save_stats", "stats")


def manager_stats(mgr: Any) -> dict[str, Any] | None:
    """The manager's telemetry for its last save, as a plain dict (None when it has none)."""
    for name in _STATS_ATTRS:
        obj = getattr(mgr, name, None)
        if callable(obj):
            try:
                obj = obj()
            except TypeError:
                continue
        if obj is None:
            continue
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {k: _plain(v) for k, v in dataclasses.asdict(obj).items()}
        if isinstance(obj, dict):
            return {k: _plain(v) for k, v in obj.items()}
        if hasattr(obj, "__dict__"):
            return {k: _plain(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return None


def _plain(v: Any) -> Any:
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def _latest_target(root: Path) -> str | None:
    try:
        return os.readlink(root / "latest")
    except OSError:
        return None


def measure(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    root: Path,
    mode: str,
    n_saves: int,
    probe_background_commit: bool = False,
) -> dict[str, Any]:
    """``n_saves`` saves in ``mode``; each timed from the call to ``latest`` committed.

    Per save: ``blocked_s`` (the call), ``staged_s`` (on CUDA: until every stream is idle, i.e. the
    device-to-host copy is done), ``durable_s`` (until ``wait()`` returned and ``latest`` names
    this step), ``new_host_bytes`` (pages first touched from the call to durable) and the
    manager's ``stats``. With ``probe_background_commit`` the last save is not waited on at once:
    we poll ``latest`` to learn whether the manager commits it by itself once the flush is durable
    (a crash between saves then loses nothing) or only at the next ``save()``/``wait()``.
    """
    from kempnerforge.checkpoint import CheckpointManager
    from kempnerforge.config import CheckpointConfig

    device = next(model.parameters()).device
    ckpt_dir = root / f"ours_{mode}"
    remove(ckpt_dir)
    cfg = CheckpointConfig(dir=str(ckpt_dir), interval=1, async_mode=mode, keep_last_n=1)
    mgr = CheckpointManager(cfg, model, opt)
    saves: list[dict[str, Any]] = []
    out: dict[str, Any] = {"mode": mode, "saves": saves}
    try:
        prepare = getattr(mgr, "prepare", None)
        if callable(prepare):  # staging buffers allocated off the caller's path (one-off)
            settle(device)
            span = Span().start()
            started = prepare()
            out["prepare_call_s"] = span.elapsed()  # what the caller waited for
            mgr.wait()
            out["prepare_s"] = span.elapsed() if started else 0.0  # until the buffers were ready
        for i in range(n_saves):
            step = i + 1
            settle(device)
            span = Span().start()
            mgr.save(step, tokens_seen=step * 1000)
            rec: dict[str, Any] = {"step": step, "blocked_s": span.elapsed()}
            if device.type == "cuda":
                torch.cuda.synchronize()
                rec["staged_s"] = span.elapsed()
            if probe_background_commit and i == n_saves - 1 and i > 0:
                limit = 1.5 * saves[-1]["durable_s"] + 2.0
                while _latest_target(ckpt_dir) != f"step_{step}" and span.elapsed() < limit:
                    time.sleep(0.005)
                bg = _latest_target(ckpt_dir) == f"step_{step}"
                out["latest_commits_without_wait"] = bg
                if bg:
                    rec["durable_latest_bg_s"] = span.elapsed()
            mgr.wait()
            rec["durable_s"] = span.elapsed()
            rec["new_host_bytes"] = span.new_host_bytes()
            rec["latest_ok"] = _latest_target(ckpt_dir) == f"step_{step}"
            rec["stats"] = manager_stats(mgr)
            saves.append(rec)
            logger.info("ours %s save %d: %s", mode, step, rec)
    finally:
        close = getattr(mgr, "close", None)
        if callable(close):
            close()
    out["ckpt_dir"] = str(ckpt_dir)
    return out
