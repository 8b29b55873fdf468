"""Optimizer and learning-rate schedule (AdamW, linear warmup then cosine decay).

Two choices here exist for exact resume:

* Every parameter's AdamW state is created up front (zeros, step 0: exactly what AdamW would
  create lazily). The optimizer state then has the same keys whatever the freeze schedule has
  frozen so far, so a checkpoint saved while a module is frozen restores that module's moments
  too, and a later unfreeze continues from the same numbers as an uninterrupted run.
* The schedule is a pure function of the step count, and its ``state_dict`` is one int: no
  pickled lambdas, nothing that a new process could compute differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    decay_steps: int = 0  # steps of the cosine (warmup included); 0 = train.max_steps

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.decay_steps < 0:
            raise ValueError(
                f"optim.decay_steps must be >= 0 (0 = train.max_steps), got {self.decay_steps}"
            )


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over every parameter (frozen ones included, see module docstring).

    Matrices (embeddings and linear weights) decay; biases and LayerNorm gains do not.
    Parameter order is ``named_parameters()`` order, identical on every rank and launch.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=None
    )
    _prefill_state(opt)
    return opt


def _prefill_state(opt: torch.optim.AdamW) -> None:
    """Create AdamW's per-parameter state now, exactly as its first ``step()`` would."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            if group.get("capturable") or group.get("fused"):
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step + 1`` (``step`` steps completed).

    Linear warmup from lr/warmup to lr over ``warmup_steps``, then cosine down to ``min_lr`` at
    ``total_steps``; constant ``min_lr`` beyond.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """A LambdaLR-like schedule whose state is one int.

    ``step()`` after each optimizer step, as with torch schedulers. The group's ``lr`` is set
    from :func:`lr_at` on construction and after each ``step()``/``load_state_dict``.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
    ) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.total_steps = cfg.decay_steps or total_steps
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.last_step, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
