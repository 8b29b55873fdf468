"""A user's own state, handed over once: any object with ``state_dict`` / ``load_state_dict``.

``CheckpointManager(..., states={"scaler": scaler, "ema": ema, "loader": loader})`` takes
objects that follow torch's ``Stateful`` protocol. At every save each one's ``state_dict()`` is
split in two:

* its **tensors** join the model and optimizer in the DCP state dict, under
  ``states.<name>.<path>``: staged into the same reused host buffers, written in the background,
  sharded where they are DTensors, and, where they are plain (replicated) tensors, written once,
  from rank 0's copy;
* its **plain values** (numbers, strings, lists, dicts) stay in a skeleton, with a marker where
  each tensor was, that goes into every rank's train state.

A resume loads the tensors back (into the tensors the object's ``state_dict()`` returns now where
they exist, so DTensor placement is kept), puts them into the skeleton and hands the result to
``load_state_dict``. Data loaders are recognised and restored the way ``dataloader=`` is: their
position and their first ``iter()`` kept from shifting the RNG (see ``loaders``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kempnerforge.checkpoint.loaders import loader_generator_state

PREFIX = "states"
TENSOR_MARK = "__kempnerforge_tensor__"
_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def is_loader(obj: Any) -> bool:
    """A data loader: restored through its position and the first-``iter()`` RNG guard."""
    return isinstance(obj, torch.utils.data.DataLoader)


def check_states(states: Mapping[str, Any] | None) -> dict[str, Any]:
    """The handed-over objects, checked once: names usable as keys, the Stateful protocol."""
    out: dict[str, Any] = {}
    for name, obj in (states or {}).items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"states: name {name!r} must be letters, digits, '_' or '-' (it becomes a "
                "checkpoint key, states.<name>.*)"
            )
        missing = [
            m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))
        ]
        if missing:
            raise TypeError(
                f"states[{name!r}] ({type(obj).__qualname__}) has no {' / '.join(missing)}(): "
                "hand over objects that follow torch's Stateful protocol (a GradScaler, an "
                "nn.Module such as an EMA copy, a scheduler, a StatefulDataLoader), or wrap plain "
                "values in a small class with state_dict() and load_state_dict()"
            )
        out[name] = obj
    return out


@dataclass
class Captured:
    """What one save takes from the handed-over objects."""

    tensors: dict[str, dict[str, Any]]  # name -> {path key: tensor}, for DCP
    plain: dict[str, dict[str, Any]]  # name -> train-state entry (skeleton or loader state)

    @property
    def dcp_keys(self) -> list[str]:
        return [f"{PREFIX}.{n}.{k}" for n, ts in self.tensors.items() for k in ts]


def capture(states: Mapping[str, Any]) -> Captured:
    """Each object's state now, split into tensors (DCP) and plain values (train state)."""
    tensors: dict[str, dict[str, Any]] = {}
    plain: dict[str, dict[str, Any]] = {}
    for name, obj in states.items():
        if is_loader(obj):
            entry: dict[str, Any] = {"kind": "loader", "state": obj.state_dict()}
            gen = loader_generator_state(obj)
            if gen is not None:
                entry["generator"] = gen
            plain[name] = entry
            continue
        found: dict[str, Any] = {}
        skeleton = _split(obj.state_dict(), (), found, name)
        tensors[name] = found
        plain[name] = {"kind": "stateful", "skeleton": skeleton}
    return Captured(tensors, plain)


def _split(node: Any, path: tuple, found: dict[str, Any], name: str) -> Any:
    if isinstance(node, torch.Tensor):
        key = ".".join(str(p) for p in path) or "value"
        if key in found:
            raise ValueError(
                f"states[{name!r}]: two entries of its state_dict() both flatten to {key!r}; "
                "rename one of them"
            )
        found[key] = node.detach()
        return {TENSOR_MARK: key}
    if isinstance(node, Mapping):
        return {k: _split(v, (*path, k), found, name) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        items = [_split(v, (*path, i), found, name) for i, v in enumerate(node)]
        return items if isinstance(node, list) else tuple(items)
    return node


def join(skeleton: Any, tensors: Mapping[str, Any]) -> Any:
    """The state dict again: the skeleton with each tensor marker replaced by its tensor."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR_MARK}:
            return tensors[skeleton[TENSOR_MARK]]
        return {k: join(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(join(v, tensors) for v in skeleton)
    return skeleton


def tensor_keys(skeleton: Any) -> list[str]:
    """The path keys of the tensors a saved skeleton refers to."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR_MARK}:
            return [skeleton[TENSOR_MARK]]
        return [k for v in skeleton.values() for k in tensor_keys(v)]
    if isinstance(skeleton, (list, tuple)):
        return [k for v in skeleton for k in tensor_keys(v)]
    return []
