"""The non-distributed train state: step, tokens, scheduler, dataloader, extras, and RNG.

Model and optimizer go through DCP; everything else a bit-exact resume needs lives here, one file
per rank, because RNG streams differ per rank (DCP would merge per-rank values under one key).

Everything stored is loadable with ``torch.load(weights_only=True)``: numpy's generator state is
kept as a tensor plus plain numbers, never as a pickled numpy array, so loading a checkpoint
cannot execute code. Checkpoints of the original KempnerForge (one ``train_state.pt``, a pickle
with numpy's RNG tuple) are read with exactly that tuple's classes allowed.
"""

from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from kempnerforge.checkpoint import storage
from kempnerforge.checkpoint.storage import CheckpointFormatError

logger = logging.getLogger(__name__)

STANDARD_KEYS = frozenset(
    {"step", "tokens_seen", "rng", "scheduler", "dataloader", "dataloader_generator", "states"}
)


def get_rng_state() -> dict[str, Any]:
    """Capture python / numpy / torch CPU (and current CUDA device) RNG state of this process.

    The keys are the original KempnerForge's: ``python``, ``numpy`` (``np.random.get_state()``),
    ``torch_cpu`` and, when CUDA is initialized, ``torch_cuda``.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured, in either key set.

    Accepts the original KempnerForge's dict (``torch_cpu`` / ``torch_cuda``, numpy as the
    ``np.random.get_state()`` tuple) and this project's stored form (``torch`` / ``cuda`` for
    every device, numpy as plain numbers and a key tensor).
    """
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        np.random.set_state(_numpy_tuple(state["numpy"]))
    cpu = state.get("torch_cpu", state.get("torch"))
    if cpu is not None:
        torch.set_rng_state(cpu)
    if not torch.cuda.is_available():
        return
    if "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])
    elif "cuda" in state:
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "saved CUDA RNG has %d devices, this process sees %d: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def _numpy_tuple(n: Any) -> tuple:
    """numpy's legacy RNG state as ``np.random.set_state`` takes it, from either stored form."""
    if isinstance(n, dict):
        keys = n["keys"].numpy() if torch.is_tensor(n["keys"]) else np.asarray(n["keys"])
        return (
            n["kind"],
            keys.astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    kind, keys, pos, has_gauss, cached = n
    return (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))


def _storable_rng(rng: dict[str, Any]) -> dict[str, Any]:
    """The RNG dict with numpy's state as plain numbers and a tensor: ``weights_only``-loadable."""
    out = dict(rng)
    n = out.get("numpy")
    if n is not None and not isinstance(n, dict):
        kind, keys, pos, has_gauss, cached = _numpy_tuple(n)
        out["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        }
    return out


def reseed_rng(saved: dict[str, Any] | None, rank: int) -> int:
    """Seed every generator from a hash of a saved RNG state and ``rank``; returns the seed.

    Used when the world size changed: per-rank streams cannot be mapped 1:1, so each rank gets a
    deterministic, distinct stream instead (the same resume twice gives the same numbers).
    """
    h = xxhash.xxh3_64()
    cpu = None if saved is None else saved.get("torch_cpu", saved.get("torch"))
    if torch.is_tensor(cpu):
        h.update(cpu.numpy().tobytes())
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
    if "rng" in state:
        state = {**state, "rng": _storable_rng(state["rng"])}
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
        raise CheckpointFormatError(
            f"{name} cannot be loaded safely ({e}); the file is corrupt or not ours"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{name} does not hold a dict; the file is corrupt or not ours")
    return state


def _numpy_rng_globals() -> list[Any]:
    """What numpy's ``get_state()`` tuple needs to unpickle: its array and the uint32 dtype."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return allowed


def read_original_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``train_state.pt`` of a checkpoint written by the original KempnerForge.

    It is a pickle holding numpy's RNG tuple; it is read with ``torch.load(weights_only=True)``
    allowing exactly what that tuple needs (numpy's array reconstruction and the uint32 dtype),
    so anything else a planted file asks for is refused, never run.
    """
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointFormatError(
            f"{path}: cannot be loaded safely as an original KempnerForge train state ({e}); "
            "the file is corrupt, or holds something other than tensors, numbers, strings and "
            "numpy's RNG state (nothing in it was run)"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: does not hold a dict; it is not a train state")
    return state


def read_train_state(step_dir: str | os.PathLike, rank: int = 0) -> dict[str, Any]:
    """The train state ``rank`` resumes from in ``step_dir``, in either layout (see storage)."""
    root = Path(step_dir)
    meta, _ = storage.read_metadata(root)
    world = int((meta or {}).get("world_size", 1))
    path = storage.train_state_file(root, rank if rank < world else 0, world)
    if not path.is_file():
        raise FileNotFoundError(
            f"train state {path} is missing: checkpoint {root} is incomplete; load another step "
            "or delete it"
        )
    if path.name == storage.ORIGINAL_TRAIN_STATE_FILE:
        return read_original_train_state(path)
    return deserialize_train_state(path.read_bytes(), str(path))


def load_train_state_extras(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` keys saved with a checkpoint, without restoring anything (RNG untouched).

    For reading run identifiers (a logger's run id, a phase) before training objects exist.
    A step without a train state gives ``{}``.
    """
    try:
        state = read_train_state(step_dir, 0)
    except FileNotFoundError:
        return {}
    return split_extra(state)
