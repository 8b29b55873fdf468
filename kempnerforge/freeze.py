"""Freeze schedules: which modules train, from which step.

A :class:`FreezeSpec` names a module (an alias such as ``embedding``/``blocks``/``head`` or an
fnmatch pattern over parameter-owning module names) and whether it is frozen. A
:class:`FreezeStage` switches a new list of specs on at ``start_step``. The spec list in force at
step ``s`` is what the checkpoint records (``canonical_freeze_meta``), so a resume can check that
it restores the same trainable set it saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kempnerforge.errors import ConfigError


@dataclass(frozen=True)
class FreezeSpec:
    module: str
    frozen: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.module, str) or not self.module:
            raise ValueError(f"FreezeSpec.module must be a non-empty string, got {self.module!r}")
        if not isinstance(self.frozen, bool):
            raise ValueError(f"FreezeSpec.frozen must be true or false, got {self.frozen!r}")


@dataclass
class FreezeStage:
    start_step: int
    specs: list[FreezeSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.start_step < 0:
            raise ValueError(f"freeze stage start_step must be >= 0, got {self.start_step}")


@dataclass
class FreezeConfig:
    """Base specs apply from step 0; each stage's specs override them from its ``start_step``."""

    base: list[FreezeSpec] = field(default_factory=list)
    stages: list[FreezeStage] = field(default_factory=list)

    def __post_init__(self) -> None:
        steps = [s.start_step for s in self.stages]
        if len(set(steps)) != len(steps):
            raise ValueError(
                f"freeze.stages has two stages with the same start_step: {sorted(steps)}"
            )
        self.stages = sorted(self.stages, key=lambda s: s.start_step)


def effective_freeze(config: FreezeConfig, step: int) -> list[FreezeSpec]:
    """Specs in force for the optimizer step that follows ``step`` completed steps.

    A stage with ``start_step=S`` is in force once ``S`` steps have completed, i.e. for step S+1
    onwards. Later specs for the same module win.
    """
    merged: dict[str, bool] = {s.module: s.frozen for s in config.base}
    for stage in config.stages:
        if stage.start_step <= step:
            for s in stage.specs:
                merged[s.module] = s.frozen
    return [FreezeSpec(m, f) for m, f in merged.items()]


def canonical_freeze_meta(specs: list[FreezeSpec]) -> list[dict[str, Any]]:
    """The form stored in checkpoint metadata: one entry per module, sorted by module name.

    When a module appears twice the last spec wins, as in :func:`effective_freeze`.
    """
    merged: dict[str, bool] = {}
    for s in specs:
        merged[s.module] = bool(s.frozen)
    return [{"module": m, "frozen": merged[m]} for m in sorted(merged)]


# --------------------------------------------------------------------------- applying specs

# Aliases name the model's top-level parts (see kempnerforge.model.GPT).
ALIASES: dict[str, str] = {
    "embedding": "embedding",
    "blocks": "blocks",
    "head": "head",
    "ln_f": "ln_f",
}


def resolve_spec(model: Any, module: str) -> list[str]:
    """Parameter names that ``module`` (an alias or an fnmatch pattern) selects.

    A pattern selects a parameter when it matches the parameter's name or the name of any
    module that owns it (``blocks.1`` selects ``blocks.1.attn.qkv.weight``; ``blocks.*.mlp``
    every MLP). Nothing selected is a config error: a typo must not silently train everything.
    """
    import fnmatch

    pattern = ALIASES.get(module, module)
    names = [n for n, _ in model.named_parameters()]
    hits = []
    for name in names:
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            hits.append(name)
    if not hits:
        raise ConfigError(
            f"freeze: {module!r} is not a module alias ({', '.join(sorted(ALIASES))}) and as a "
            f"pattern matches no parameter of the model (e.g. {names[0]!r}); fix freeze.base / "
            "freeze.stages"
        )
    return hits


def validate_freeze(model: Any, config: FreezeConfig) -> None:
    """Resolve every spec of every stage now, so a bad name fails at start, not at its stage."""
    for spec in config.base:
        resolve_spec(model, spec.module)
    for stage in config.stages:
        for spec in stage.specs:
            resolve_spec(model, spec.module)


def apply_freeze(model: Any, specs: list[FreezeSpec]) -> int:
    """Set ``requires_grad`` from ``specs`` (later specs win); returns the trainable count.

    Every parameter starts trainable, so applying the specs in force at a step gives the same
    result whatever was applied before (a resume and an uninterrupted run agree).
    """
    params = dict(model.named_parameters())
    want = dict.fromkeys(params, True)
    for spec in specs:
        for name in resolve_spec(model, spec.module):
            want[name] = not spec.frozen
    for name, p in params.items():
        if p.requires_grad != want[name]:
            p.requires_grad_(want[name])
    return sum(p.numel() for n, p in params.items() if want[n])


@contextlib.contextmanager
def all_trainable(model: Any) -> Iterator[None]:
    """Mark every parameter trainable for the duration, then restore each flag.

    ``torch.distributed.checkpoint.state_dict``'s optimizer functions handle state only for
    parameters with ``requires_grad``. A module frozen at the checkpoint's step still has AdamW
    moments from before it was frozen, and an unfreeze later must continue from those exact
    moments, so the checkpoint manager saves and restores optimizer state under this context.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
