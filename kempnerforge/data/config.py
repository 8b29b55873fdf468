"""Data configuration (see ``data/README.md`` for preparing a token file)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # token file (.npy or .bin of uint16/uint32); None: built-in synthetic corpus
    path: str | None = None
    dtype: str = "uint16"  # for raw .bin files; .npy files carry their own dtype
    synthetic_tokens: int = 1_000_000  # size of the synthetic corpus
    seed: int = 0  # shuffling seed of the sample order
    shuffle: bool = True
    # worker processes reading the next steps ahead (0: read in the training process)
    num_workers: int = 0
    # debug: append each step's consumed samples to <output_dir>/samples.rank<R>.jsonl
    log_samples: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("uint16", "uint32"):
            raise ValueError(f"data.dtype must be 'uint16' or 'uint32', got {self.dtype!r}")
        if self.synthetic_tokens <= 0:
            raise ValueError(f"data.synthetic_tokens must be > 0, got {self.synthetic_tokens}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
