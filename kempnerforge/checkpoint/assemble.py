"""What one save consists of: the DCP state dict, the train state and ``metadata.json``.

The manager decides *when* to save; this module builds *what* is saved from the live objects,
with no policy of its own: the model and optimizer state dicts (one ``get_state_dict`` call),
the handed-over states' tensors beside them, the per-rank train state (RNG captured at the
call), the metadata the commit completes, and which replicated entries are written from rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

from kempnerforge.checkpoint import storage
from kempnerforge.checkpoint.loaders import loader_generator_state
from kempnerforge.checkpoint.state import build_train_state, serialize_train_state
from kempnerforge.checkpoint.stateful import PREFIX as STATES_PREFIX
from kempnerforge.checkpoint.stateful import Captured
from kempnerforge.freeze import all_trainable

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]

_WRAPPER_PREFIXES = (
    "module.",
    "_orig_mod.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
)


def canonical_name(name: str) -> str:
    """A module's parameter or buffer name as the model state dict spells it (no wrappers)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def mutates_in_forward(model: torch.nn.Module) -> bool:
    """True when a forward pass changes saved state in place (normalisation running stats)."""
    from torch.nn.modules.batchnorm import _NormBase

    return any(
        isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None
        for m in model.modules()
    )


def model_state_dict(model: torch.nn.Module, optimizer: Any | None) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` as DCP saves and loads them.

    One call for both: torch maps parameter names once instead of twice (half the time a save
    spends assembling). Frozen parameters are in the model part either way; the optimizer part
    needs them marked trainable.
    """
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    with all_trainable(model):
        model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def dcp_state_dict(
    model: torch.nn.Module, optimizer: Any | None, captured: Captured
) -> dict[str, Any]:
    """What DCP writes: model, optimizer, and the handed-over states' tensors."""
    state_dict = model_state_dict(model, optimizer)
    tensors = {n: t for n, t in captured.tensors.items() if t}
    if tensors:
        state_dict[STATES_PREFIX] = tensors
    return state_dict


def params_without_state(model: torch.nn.Module, optim_sd: Any) -> dict[str, list[str]]:
    """Parameters the optimizer holds no state for yet (it creates state at a parameter's first
    update), split by whether they are frozen now. A resume leaves exactly these stateless;
    any other state missing from the checkpoint is an error."""
    if not isinstance(optim_sd, dict) or not isinstance(optim_sd.get("state"), dict):
        return {}
    frozen = {canonical_name(n) for n, p in model.named_parameters() if not p.requires_grad}
    names = [n for g in optim_sd.get("param_groups", []) for n in g.get("params", [])]
    missing = [n for n in names if isinstance(n, str) and n not in optim_sd["state"]]
    out = {
        "never_stepped": sorted(n for n in missing if n not in frozen),
        "frozen": sorted(n for n in missing if n in frozen),
    }
    return {k: v for k, v in out.items() if v}


def rank0_keys(model: torch.nn.Module, state_dict: dict[str, Any]) -> frozenset[str]:
    """Flattened keys of replicated entries written from rank 0's copy (see
    :class:`~kempnerforge.checkpoint.async_save.Rank0ReplicasPlanner`): the model's plain
    buffers, and every plain tensor of the handed-over states."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return frozenset()
    model_sd = state_dict.get("model", {})
    names = {canonical_name(n) for n, _ in model.named_buffers()}
    keys = {
        f"model.{k}"
        for k, v in model_sd.items()
        if k in names and isinstance(v, torch.Tensor) and not isinstance(v, DTensor)
    }
    for name, tensors in state_dict.get(STATES_PREFIX, {}).items():
        keys.update(
            f"{STATES_PREFIX}.{name}.{k}"
            for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and not isinstance(v, DTensor)
        )
    return frozenset(keys)


@dataclass
class SaveParts:
    """One save, assembled: what DCP writes, this rank's train state, the metadata to commit."""

    state_dict: dict[str, Any]
    train_state: bytes
    meta: dict[str, Any]
    from_rank0: frozenset[str]


def assemble(
    *,
    model: torch.nn.Module,
    optimizer: Any | None,
    captured: Captured,
    step: int,
    tokens_seen: int,
    scheduler: Any | None,
    dataloader: Any | None,
    extra: dict[str, Any] | None,
    world_size: int,
    async_mode: str,
    pp_rank: int | None,
) -> SaveParts:
    """Everything a save of ``step`` writes, captured now (RNG of step N included)."""
    state = build_train_state(step, tokens_seen, scheduler, dataloader, extra)
    gen = loader_generator_state(dataloader)
    if gen is not None:
        state["dataloader_generator"] = gen
    if captured.plain:
        state["states"] = captured.plain
    train_state = serialize_train_state(state)

    state_dict = dcp_state_dict(model, optimizer, captured)
    meta: dict[str, Any] = {
        "format": storage.FORMAT_NAME,
        "format_version": storage.FORMAT_VERSION,
        "step": int(step),
        "tokens_seen": int(tokens_seen),
        "world_size": world_size,
        "async_mode": async_mode,
        "torch_version": torch.__version__,
    }
    if pp_rank is not None:
        meta["pipeline_parallel"] = True
    if extra and "vlm_freeze" in extra:
        meta["vlm_freeze"] = extra["vlm_freeze"]
    if captured.plain:
        meta["states"] = sorted(captured.plain)
    stateless = params_without_state(model, state_dict.get("optimizer"))
    if stateless:
        meta["optimizer_without_state"] = stateless
    return SaveParts(state_dict, train_state, meta, rank0_keys(model, state_dict))


def temp_dirs(root: Path, step: int, token: str, pp_rank: int | None) -> tuple[Path, Path]:
    """(the save's temp dir, where DCP writes inside it)."""
    tmp = root / storage.tmp_step_dir_name(step, token)
    return tmp, (tmp / storage.pp_dir_name(pp_rank) if pp_rank is not None else tmp)
