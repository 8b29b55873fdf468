"""Every rank agrees on the same stop step (and on time-based saves) at almost no cost.

Each step, every rank contributes a few numbers (did a stop signal arrive here, and which kind;
is a time-based save due by this rank's clock) to a MAX all-reduce on a dedicated gloo group,
issued asynchronously. The result is read at the next step, when it has long arrived: the check
never waits on the network and never synchronises a GPU. All ranks read the same reduced values
at the same step, so they stop (or save) together, one step after the first rank saw the cause.
With a single process there is nothing to agree on: the local values are the answer at once.

The group is the agreement's own, so these collectives never interleave with the checkpoint's
background collectives or the training's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class StopAgreement:
    """``poll(values)`` returns the element-wise MAX over ranks of the previous call's values
    (None at the first call), or ``values`` themselves without a process group."""

    def __init__(self) -> None:
        self.distributed = (
            dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        )
        self._group = dist.new_group(backend="gloo") if self.distributed else None
        self._work: Any = None
        # two buffers: one in flight, the other filled for the next step (no allocation per step)
        self._bufs = [torch.zeros(2, dtype=torch.float64) for _ in range(2)]
        self._turn = 0

    def poll(self, values: list[float]) -> list[float] | None:
        if not self.distributed:
            return list(values)
        agreed = self._collect()
        self._turn ^= 1
        buf = self._bufs[self._turn]
        buf[0], buf[1] = values
        self._work = dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def _collect(self) -> list[float] | None:
        if self._work is None:
            return None
        self._work.wait()
        self._work = None
        return self._bufs[self._turn].tolist()

    def drain(self) -> None:
        """Complete the collective in flight (every rank calls it at the same point)."""
        self._collect()


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (for logging one loss per step); no collective on one
    process."""
    t = value.detach().to(torch.float64).reshape(())
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() / dist.get_world_size()
    return t.item()
