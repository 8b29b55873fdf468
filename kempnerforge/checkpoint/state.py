"""The non-distributed train state: step, tokens, scheduler, dataloader, extras, and RNG.

Model and optimizer go through DCP; everything else a bit-exact resume needs lives here, one file
per rank, because RNG streams differ per rank (DCP would merge per-rank values under one key).

Everything stored is loadable with ``torch.load(weights_only=True)``: numpy's generator state is
kept as a tensor plus plain numbers, never as a pickled numpy array, so loading a checkpoint
cannot execute code.
"""

from __future__ import annotations

import io
import logging
import random
from typing import Any

import numpy as np
import torch
import xxhash

logger = logging.getLogger(__name__)

STANDARD_KEYS = frozenset({"step", "tokens_seen", "rng", "scheduler", "dataloader"})


def get_rng_state() -> dict[str, Any]:
    """Capture python / numpy / torch (and CUDA, when present) RNG state of this process."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA only if saved and present)."""
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        n = state["numpy"]
        keys = (
            n["keys"].numpy().astype(np.uint32)
            if torch.is_tensor(n["keys"])
            else np.asarray(n["keys"], np.uint32)
        )
        np.random.set_state(
            (n["kind"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "saved CUDA RNG has %d devices, this process sees %d: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def reseed_rng(saved: dict[str, Any] | None, rank: int) -> int:
    """Seed every generator from a hash of a saved RNG state and ``rank``; returns the seed.

    Used when the world size changed: per-rank streams cannot be mapped 1:1, so each rank gets a
    deterministic, distinct stream instead (the same resume twice gives the same numbers).
    """
    h = xxhash.xxh3_64()
    if saved is not None and torch.is_tensor(saved.get("torch")):
        h.update(saved["torch"].numpy().tobytes())
    h.update(f"rank={rank}".encode())
    seed = h.intdigest() & ((1 << 63) - 1)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed


def build_train_state(
    step: int,
    tokens_seen: int,
    scheduler: Any | None = None,
    dataloader: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The non-distributed part of the training state, with ``extra``'s keys at the top level.

    ``extra`` may not use the standard keys (step, tokens_seen, rng, scheduler, dataloader): they
    would silently overwrite what resume needs.
    """
    state: dict[str, Any] = {
        "step": int(step),
        "tokens_seen": int(tokens_seen),
        "rng": get_rng_state(),
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if dataloader is not None and hasattr(dataloader, "state_dict"):
        state["dataloader"] = dataloader.state_dict()
    for k, v in (extra or {}).items():
        if k in STANDARD_KEYS:
            raise ValueError(f"build_train_state: extra key {k!r} is reserved; rename it")
        state[k] = v
    return state


def split_extra(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in STANDARD_KEYS}


def restore_train_state(
    state: dict[str, Any], scheduler: Any | None = None, dataloader: Any | None = None
) -> tuple[int, int, dict[str, Any]]:
    """Restore RNG, scheduler and dataloader from ``state``; return (step, tokens_seen, extra)."""
    if "rng" in state:
        set_rng_state(state["rng"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if dataloader is not None and "dataloader" in state and hasattr(dataloader, "load_state_dict"):
        dataloader.load_state_dict(state["dataloader"])
    return int(state.get("step", 0)), int(state.get("tokens_seen", 0)), split_extra(state)


def serialize_train_state(state: dict[str, Any]) -> bytes:
    """``torch.save`` to bytes, refusing anything ``weights_only`` loading would reject.

    Checking at save time means a bad ``extra`` value fails the save that added it, with its
    name, instead of failing a resume days later.
    """
    try:
        data = _dump(state)
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        bad = []
        for k, v in state.items():
            try:
                torch.load(io.BytesIO(_dump(v)), weights_only=True)
            except Exception:
                bad.append(k)
        raise ValueError(
            f"train state key(s) {bad or '?'} cannot be stored safely (weights_only loading refuses "
            f"them: {e}); keep extra/scheduler/dataloader state to tensors, numbers, strings, "
            f"lists and dicts"
        ) from None
    return data


def _dump(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deserialize_train_state(data: bytes, name: str = "train state") -> dict[str, Any]:
    """Load bytes written by :func:`serialize_train_state` without executing pickled code."""
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(
            f"{name} cannot be loaded safely ({e}); the file is corrupt or not ours"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{name} does not hold a dict; the file is corrupt or not ours")
    return state
