"""The training loop's data source: a dataset plus a :class:`GlobalSampler`, one step at a time.

This is the object handed to the checkpoint manager as ``dataloader``: its ``state_dict`` is
the sampler's (plain ints), so a resumed run on any number of ranks reads on from the same
global position.
"""

from __future__ import annotations

from typing import Any

import torch

from kempnerforge.data.dataset import TokenDataset
from kempnerforge.data.sampler import GlobalSampler


class StepLoader:
    def __init__(
        self, dataset: TokenDataset, sampler: GlobalSampler, micro_batch_size: int
    ) -> None:
        per_rank = sampler.global_batch_size // sampler.dp_world
        mbs = micro_batch_size or per_rank
        if per_rank % mbs:
            raise ValueError(
                f"train.micro_batch_size={mbs} does not divide the per-rank batch {per_rank} "
                f"(global_batch_size={sampler.global_batch_size} / {sampler.dp_world} ranks)"
            )
        self.dataset = dataset
        self.sampler = sampler
        self.micro_batch_size = mbs
        self.last_numbers: list[int] = []  # global sample numbers of the last step (for audits)
        self.last_indices: list[int] = []  # their dataset indices

    @property
    def accum_steps(self) -> int:
        return self.sampler.global_batch_size // self.sampler.dp_world // self.micro_batch_size

    def next_step(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches (inputs, targets) of this rank for the next optimizer step."""
        numbers, indices = self.sampler.next_step()
        self.last_numbers, self.last_indices = numbers, indices
        out = []
        for i in range(0, len(indices), self.micro_batch_size):
            x, y = self.dataset.batch(indices[i : i + self.micro_batch_size])
            out.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
