"""World setup from torchrun / srun / a single process; process groups; FSDP2 or DDP wrapping."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistributedConfig:
    parallel: str = "auto"  # "auto" (fsdp when world > 1) | "fsdp" | "ddp" | "none"
    backend: str = "auto"  # "auto" (nccl on CUDA, else gloo) | "gloo" | "nccl"
    intra_op_threads: int = 1  # torch.set_num_threads per rank on CPU, so results do not depend on the launcher
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.parallel not in ("auto", "fsdp", "ddp", "none"):
            raise ValueError(f"distributed.parallel must be auto|fsdp|ddp|none, got {self.parallel!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"distributed.backend must be auto|gloo|nccl, got {self.backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"distributed.device must be auto|cpu|cuda, got {self.device!r}")
        if self.intra_op_threads < 0:
            raise ValueError(f"distributed.intra_op_threads must be >= 0 (0 = torch default), got {self.intra_op_threads}")
