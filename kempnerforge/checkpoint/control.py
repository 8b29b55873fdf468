"""The checkpoint's own control group: object collectives that carry decisions between ranks.

Resolving what to load, the manifest gather, the commit outcome and the pre-load file check all
travel on a dedicated gloo group, so they work from the background thread and beside NCCL default
groups. Without a process group every call is the identity.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


class ControlGroup:
    def __init__(self) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.group = dist.new_group(backend="gloo") if self.distributed else None

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out
