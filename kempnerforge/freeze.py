"""Freeze schedules: which modules train, from which step.

A :class:`FreezeSpec` names a module (an alias such as ``embedding``/``blocks``/``head`` or an
fnmatch pattern over parameter-owning module names) and whether it is frozen. A
:class:`FreezeStage` switches a new list of specs on at ``start_step``. The spec list in force at
step ``s`` is what the checkpoint records (``canonical_freeze_meta``), so a resume can check that
it restores the same trainable set it saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
            raise ValueError(f"freeze.stages has two stages with the same start_step: {sorted(steps)}")
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
