"""The training loop's data source: a dataset plus a :class:`GlobalSampler`, one step at a time.

This is the object handed to the checkpoint manager as ``dataloader``: its ``state_dict`` is
the sampler's (plain ints), so a resumed run on any number of ranks reads on from the same
global position.

With ``num_workers > 0`` the batches of the next steps are read ahead in worker processes (a
``torch.utils.data.DataLoader`` over steps). Which samples a step holds is a function of the
sampler's position alone, so reading ahead changes nothing a step sees, and the saved position
is the number of steps the loop has consumed, not how far the workers have read.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from kempnerforge.data.dataset import TokenDataset
from kempnerforge.data.sampler import GlobalSampler

Batch = tuple[torch.Tensor, torch.Tensor]


class _Steps(Dataset):
    """Step ``k`` (counted from the sampler position it was made at): its numbers, indices and
    micro-batches. Read in worker processes."""

    def __init__(self, dataset: TokenDataset, sampler: GlobalSampler, mbs: int) -> None:
        self.dataset, self.sampler, self.mbs = dataset, sampler, mbs
        self.start = sampler.position

    def __len__(self) -> int:
        return 1 << 62  # endless: epochs are positions of the sampler

    def __getitem__(self, k: int) -> tuple[list[int], list[int], list[Batch]]:
        s = copy.copy(self.sampler)
        s.position = self.start + k * s.global_batch_size
        numbers, indices = s.next_step()
        micro = [
            self.dataset.batch(indices[i : i + self.mbs]) for i in range(0, len(indices), self.mbs)
        ]
        return numbers, indices, micro


class StepLoader:
    def __init__(
        self,
        dataset: TokenDataset,
        sampler: GlobalSampler,
        micro_batch_size: int,
        num_workers: int = 0,
    ) -> None:
        per_rank = sampler.global_batch_size // sampler.dp_world
        mbs = micro_batch_size or per_rank
        if per_rank % mbs:
            raise ValueError(
                f"train.micro_batch_size={mbs} does not divide the per-rank batch {per_rank} "
                f"(global_batch_size={sampler.global_batch_size} / {sampler.dp_world} ranks)"
            )
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.sampler = sampler
        self.micro_batch_size = mbs
        self.num_workers = num_workers
        self.last_numbers: list[int] = []  # global sample numbers of the last step (for audits)
        self.last_indices: list[int] = []  # their dataset indices
        self._ahead: Any = None  # the workers' iterator, made at the first step

    @property
    def accum_steps(self) -> int:
        return self.sampler.global_batch_size // self.sampler.dp_world // self.micro_batch_size

    def next_step(self, device: torch.device) -> list[Batch]:
        """Micro-batches (inputs, targets) of this rank for the next optimizer step."""
        if self.num_workers:
            if self._ahead is None:
                steps = DataLoader(
                    _Steps(self.dataset, self.sampler, self.micro_batch_size),
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=2,
                    persistent_workers=False,
                )
                self._ahead = iter(steps)
            numbers, indices, micro = next(self._ahead)
            self.sampler.position += self.sampler.global_batch_size
        else:
            numbers, indices = self.sampler.next_step()
            micro = [
                self.dataset.batch(indices[i : i + self.micro_batch_size])
                for i in range(0, len(indices), self.micro_batch_size)
            ]
        self.last_numbers, self.last_indices = numbers, indices
        return [
            (x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in micro
        ]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.close()  # read-ahead from the old position is void

    def close(self) -> None:
        """Stop the worker processes (the next step starts new ones from the position)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and hasattr(ahead, "_shutdown_workers"):
            ahead._shutdown_workers()
