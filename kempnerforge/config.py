"""Job configuration: YAML onto dataclasses, with dotted ``key=value`` overrides.

Each component keeps its own config dataclass beside its code (``checkpoint/config.py``,
``model.py``, ...); this module assembles them into :class:`JobConfig` and does the strict
mapping. Unknown keys and values of the wrong type are errors that name the key, so a typo in
a config never silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from kempnerforge.checkpoint.config import AsyncCheckpointMode, CheckpointConfig
from kempnerforge.data.config import DataConfig
from kempnerforge.distributed import DistributedConfig
from kempnerforge.errors import ConfigError
from kempnerforge.freeze import FreezeConfig
from kempnerforge.metrics import MetricsConfig
from kempnerforge.model import ModelConfig
from kempnerforge.optim import OptimConfig
from kempnerforge.resilience.config import ResilienceConfig

__all__ = [
    "AsyncCheckpointMode",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "FreezeConfig",
    "JobConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ResilienceConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
]


@dataclass
class TrainConfig:
    """The loop itself: how long, how big a batch, how often to report."""

    max_steps: int = 20
    seed: int = 1234
    global_batch_size: int = 8  # sequences per optimizer step, summed over data-parallel ranks
    # per rank per forward; 0 = global_batch_size / dp_world (no accumulation)
    micro_batch_size: int = 0
    log_interval: int = 10  # steps between progress lines
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be > 0, got {self.max_steps}")
        if self.global_batch_size <= 0:
            raise ValueError(f"train.global_batch_size must be > 0, got {self.global_batch_size}")
        if self.micro_batch_size < 0:
            raise ValueError(f"train.micro_batch_size must be >= 0, got {self.micro_batch_size}")
        if self.log_interval <= 0:
            raise ValueError(f"train.log_interval must be > 0, got {self.log_interval}")


@dataclass
class JobConfig:
    """Everything one training job needs. ``output_dir`` defaults to ``runs/<config name>``."""

    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    logging: MetricsConfig = field(default_factory=MetricsConfig)  # TensorBoard / W&B

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- strict mapping


def from_dict(cls: type, data: Any, where: str = "", source: str = "<config>") -> Any:
    """Build dataclass ``cls`` from plain ``data``; errors name ``source`` and the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: '{where or '<top>'}' must be a mapping, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(
            f"{source}: unknown key '{key}'. Valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key, source)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: invalid '{where or cls.__name__}': {e}") from e


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: '{key}' has a bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{key}.{k}", source) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key, source)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            valid = [m.value for m in tp]
            raise ConfigError(f"{source}: '{key}' must be one of {valid}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.max_steps=5", "model.n_layer=2"]`` -> nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from e
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None
) -> JobConfig:
    """Read ``path`` (YAML; None for defaults), apply overrides, fill derived defaults."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file not found: {p}. Pass --config configs/debug.yaml or another file."
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source = f"{source} (with overrides)"
    cfg = from_dict(JobConfig, data, "", source)
    if not cfg.output_dir:
        name = Path(path).stem if path is not None else "default"
        cfg.output_dir = str(Path("runs") / name)
    if not cfg.checkpoint.dir:
        cfg.checkpoint.dir = str(Path(cfg.output_dir) / "checkpoints")
    if not cfg.logging.dir:
        cfg.logging.dir = cfg.output_dir
    return cfg
