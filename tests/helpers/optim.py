"""Reading optimizer state back in tests."""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 state), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def adam_moments(opt: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every ``(exp_avg, exp_avg_sq)`` in parameter order; parameters the optimizer
    holds no state for yet (never stepped) are left out, so a fresh Adam gives ``[]``."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "exp_avg" in st:
                out.append((_local(st["exp_avg"]).clone(), _local(st["exp_avg_sq"]).clone()))
    return out
