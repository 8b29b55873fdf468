"""Write checkpoints in the on-disk layout of the original KempnerForge (KempnerInstitute/KempnerForge).

What the original's ``CheckpointManager.save`` wrote (read from its manager.py / state.py at
commits 1f95035 and 66c9d31, and checked against the checkpoint it wrote at 5666d0d, kept in
``tests/fixtures/kf-original``, see :mod:`helpers.kf_original`)::

    {dir}/latest -> step_N                 relative symlink (swapped via ``latest.tmp``)
    {dir}/step_N/.metadata                 DCP metadata (pipeline parallel: step_N/pp{K}/.metadata)
    {dir}/step_N/__0_0.distcp ...          DCP shards of {"model": ..., "optimizer": ...}
    {dir}/step_N/train_state.pt            rank 0 only: torch.save of a plain pickle
    {dir}/step_N/metadata.json             json.dumps({"step", "tokens_seen"[, "vlm_freeze"]}, indent=2)

The DCP state is ``{"model": get_model_state_dict(model), "optimizer":
get_optimizer_state_dict(model, optimizer)}`` (parameter-name keyed optimizer state), saved with
``dcp.save(state, checkpoint_id=dir)``. ``train_state.pt`` holds ``{"step", "tokens_seen", "rng":
{"python", "numpy", "torch_cpu"[, "torch_cuda"]}, ["scheduler"], ["dataloader"], **extra}``, the
numpy entry being the raw ``np.random.get_state()`` tuple (so the pickle references numpy's
``_reconstruct``/``ndarray``/``dtype`` and ``_codecs.encode``). Only public torch APIs are used
here; nothing is imported from ``kempnerforge``.
"""

from __future__ import annotations

import io
import json
import pickletools
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

TRAIN_STATE_FILE = "train_state.pt"
METADATA_FILE = "metadata.json"


def original_rng_state() -> dict[str, Any]:
    """The original's ``get_rng_state()``: python / numpy (raw tuple) / torch_cpu / torch_cuda."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def original_train_state(
    step: int,
    tokens_seen: int = 0,
    scheduler: Any | None = None,
    dataloader_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict the original's ``build_train_state`` returned (same key order)."""
    state: dict[str, Any] = {
        "step": step,
        "tokens_seen": tokens_seen,
        "rng": original_rng_state() if rng is None else rng,
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if dataloader_state is not None:
        state["dataloader"] = dataloader_state
    if extra:
        state.update(extra)  # extra keys live at the top level, as in the original
    return state


def write_original_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    *,
    tokens_seen: int = 0,
    scheduler: Any | None = None,
    dataloader_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    pp_rank: int | None = None,
    latest: str | None = "symlink",
    dcp_complete: bool = True,
    dcp_state: dict[str, Any] | None = None,
    train_state: Any | None = None,
) -> Path:
    """Write ``{root}/step_{step}`` as the original's sync ``save()`` did; returns the step dir.

    ``model=None`` skips the DCP part (the original's tests did that with DCP mocked).
    ``latest``: ``"symlink"`` (what the original made), ``"file"`` (a regular file holding the
    target name, the form the fixture has after packaging) or ``None`` (leave ``latest`` alone).
    ``dcp_complete=False`` removes DCP's ``.metadata``, as an interrupted async flush left it.
    ``dcp_state`` replaces the DCP state dict built from ``model``/``optimizer`` (to write
    checkpoints with hand-edited optimizer state); ``train_state`` replaces the whole
    ``train_state.pt`` payload (hand-written files, as the original's tests made them).
    """
    root = Path(root)
    ckpt_dir = root / f"step_{step}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    dcp_dir = ckpt_dir / f"pp{pp_rank}" if pp_rank is not None else ckpt_dir
    dcp_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] | None = dcp_state
    if state is None and model is not None:
        state = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if state is not None:
        with warnings.catch_warnings():  # DCP warns that it saves without a process group
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=str(dcp_dir))
        if not dcp_complete:
            (dcp_dir / ".metadata").unlink()
    # build_train_state runs after the DCP dispatch, so the RNG is the one right after it
    if train_state is None:
        train_state = original_train_state(
            step, tokens_seen, scheduler, dataloader_state, extra, rng
        )
    torch.save(train_state, ckpt_dir / TRAIN_STATE_FILE)
    meta: dict[str, Any] = {"step": step, "tokens_seen": tokens_seen}
    if extra is not None and "vlm_freeze" in extra:
        meta["vlm_freeze"] = extra["vlm_freeze"]
    (ckpt_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    if latest is not None:
        point_latest(root, ckpt_dir.name, kind=latest)
    return ckpt_dir


def point_latest(root: str | Path, target: str, kind: str = "symlink") -> None:
    """Point ``{root}/latest`` at ``target`` the way the original did (tmp link, rename)."""
    link = Path(root) / "latest"
    tmp = link.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    if kind == "symlink":
        tmp.symlink_to(target)
    elif kind == "file":
        tmp.write_text(target)
    else:
        raise ValueError(f"latest kind must be 'symlink' or 'file', got {kind!r}")
    tmp.rename(link)


# ------------------------------------------------------------------ inspecting what was written
def pickle_globals(train_state_file: str | Path) -> set[str]:
    """``module name`` of every global the pickle inside a ``torch.save`` file references."""
    with zipfile.ZipFile(train_state_file) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        data = z.read(name)
    out: set[str] = set()
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name == "GLOBAL":
            out.add(str(arg))
        elif op.name == "STACK_GLOBAL":
            out.add(f"{strings[-2]} {strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)
    return out


def zip_entries(train_state_file: str | Path) -> list[str]:
    """Record names inside a ``torch.save`` zip, minus the per-save serialization id."""
    with zipfile.ZipFile(train_state_file) as z:
        return sorted(n for n in z.namelist() if not n.endswith("serialization_id"))


def dcp_keys(dcp_dir: str | Path) -> dict[str, tuple[str, tuple[int, ...] | None, str | None]]:
    """DCP metadata as {key: (kind, global shape, dtype)} (read with DCP's own reader)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(dcp_dir)).read_metadata()
    out = {}
    for k, v in md.state_dict_metadata.items():
        size = getattr(v, "size", None)
        props = getattr(v, "properties", None)
        out[k] = (
            type(v).__name__,
            tuple(size) if size is not None else None,
            str(props.dtype) if props is not None else None,
        )
    return out


def files_under(root: str | Path) -> list[str]:
    """Relative paths of every file and link under ``root`` (links reported as links)."""
    root = Path(root)
    return sorted(
        str(p.relative_to(root)) + (" -> link" if p.is_symlink() else "")
        for p in root.rglob("*")
        if p.is_file() or p.is_symlink()
    )
