"""All ranks agree on one stop step, riding on the per-step loss all-reduce.

The loop already all-reduces the step's loss so that rank 0 can log the global mean. The local
stop flag travels in the same tensor: ``[loss, flag]`` summed over ranks gives the mean loss
and, in the same operation, whether *any* rank saw a signal. Every rank reads the same sum, so
every rank stops after the same step, at the cost of 8 extra bytes in a collective the loop pays
for anyway.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_loss_and_stop(loss: torch.Tensor, stop_local: bool) -> tuple[float, bool]:
    """(mean loss over ranks, whether any rank asked to stop); no collective on one process."""
    packed = torch.stack(
        [
            loss.detach().to(torch.float64).reshape(()),
            torch.tensor(float(stop_local), dtype=torch.float64, device=loss.device),
        ]
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        world = dist.get_world_size()
    else:
        world = 1
    vals = packed.tolist()
    return vals[0] / world, vals[1] > 0.0
