"""Which samples each rank reads at each step, as a function of one global position.

The position is the number of samples the whole job has consumed. Optimizer step ``k``
(0-based) consumes global samples ``[k * GBS, (k + 1) * GBS)``; global sample ``g`` lives in
epoch ``g // N`` at slot ``g % N`` of that epoch's permutation, which is drawn from
``(seed, epoch)`` alone. Data-parallel rank ``r`` of ``W`` takes the contiguous slice
``[r * GBS / W, (r + 1) * GBS / W)`` of the step's samples.

Because nothing here depends on the number of ranks except the slicing, a job stopped on 2
ranks and resumed on 3 consumes exactly the samples the 2-rank job had not yet consumed: the
union over ranks of a step's samples is the same for every ``W``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class GlobalSampler:
    """Deterministic, resumable sample order. State is plain ints."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        dp_rank: int,
        dp_world: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if global_batch_size % dp_world:
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is not divisible by the "
                f"data-parallel world size {dp_world}; pick a multiple of {dp_world}"
            )
        if num_samples <= 0:
            raise ValueError("the dataset has no samples")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0  # global samples consumed so far
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def global_indices(self, start: int, count: int) -> list[int]:
        """Dataset indices of global samples ``[start, start + count)``."""
        out = []
        for g in range(start, start + count):
            epoch, slot = divmod(g, self.num_samples)
            out.append(int(self._permutation(epoch)[slot]))
        return out

    def next_step(self) -> tuple[list[int], list[int]]:
        """This rank's (global sample numbers, dataset indices) for the next step; advances."""
        per_rank = self.global_batch_size // self.dp_world
        start = self.position + self.dp_rank * per_rank
        numbers = list(range(start, start + per_rank))
        indices = self.global_indices(start, per_rank)
        self.position += self.global_batch_size
        return numbers, indices

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_samples"]) != self.num_samples or int(state["seed"]) != self.seed:
            raise ValueError(
                f"checkpoint data state is for {state['num_samples']} samples / seed {state['seed']}, "
                f"this run has {self.num_samples} / {self.seed}: the dataset, model.seq_len or "
                "data.seed changed since the checkpoint was written"
            )
        self.position = int(state["position"])
