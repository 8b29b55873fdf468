"""Process group setup from the job environment; FSDP2 or DDP wrapping.

Where this process sits (rank, world, master address and port) comes from
:class:`kempnerforge.job.JobEnvironment`, the one reader of launcher variables:
torchrun-style variables, else SLURM tasks, else a single process without a process group.

Results must not depend on the launcher, so the intra-op thread count is set here from the
config rather than inherited from whatever ``OMP_NUM_THREADS`` the launcher chose.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kempnerforge.job import JobEnvironment
from kempnerforge.nccl import NCCL_SAFE_DEFAULTS

logger = logging.getLogger(__name__)


@dataclass
class DistributedConfig:
    parallel: str = "auto"  # "auto" (fsdp when world > 1) | "fsdp" | "ddp" | "none"
    backend: str = "auto"  # "auto" (nccl on CUDA, else gloo) | "gloo" | "nccl"
    # torch.set_num_threads per rank on CPU, so results do not depend on the launcher
    intra_op_threads: int = 1
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    timeout_s: float = 600.0
    # on CUDA: deterministic kernels (bit-exact resume); no effect on CPU
    deterministic: bool = True

    def __post_init__(self) -> None:
        if self.parallel not in ("auto", "fsdp", "ddp", "none"):
            raise ValueError(
                f"distributed.parallel must be auto|fsdp|ddp|none, got {self.parallel!r}"
            )
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"distributed.backend must be auto|gloo|nccl, got {self.backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"distributed.device must be auto|cpu|cuda, got {self.device!r}")
        if self.intra_op_threads < 0:
            raise ValueError(
                f"distributed.intra_op_threads must be >= 0 (0 = torch default), got {self.intra_op_threads}"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"distributed.timeout_s must be > 0, got {self.timeout_s}")


# --------------------------------------------------------------------------- setup / teardown


def resolve_device(cfg: DistributedConfig, info: JobEnvironment) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "distributed.device=cuda but CUDA is not available; use device=cpu or auto"
            )
        idx = info.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def setup(cfg: DistributedConfig) -> tuple[JobEnvironment, torch.device]:
    """Set threads and determinism, pick the device, and join the process group if world > 1."""
    if cfg.intra_op_threads > 0:
        torch.set_num_threads(cfg.intra_op_threads)
    info = JobEnvironment.from_env()
    device = resolve_device(cfg, info)
    if device.type == "cuda":
        for k, v in NCCL_SAFE_DEFAULTS.items():
            os.environ.setdefault(k, v)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.use_deterministic_algorithms(True, warn_only=True)
            # The memory-efficient attention kernel's backward accumulates in a nondeterministic
            # order (and with warn_only it only warns): SDPA then takes flash (bf16) or math.
            torch.backends.cuda.enable_mem_efficient_sdp(False)
    if info.world_size > 1 and not dist.is_initialized():
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        dist.init_process_group(
            backend=backend,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
            device_id=device if backend == "nccl" else None,
        )
        logger.debug(
            "rank %d/%d joined (%s, %s)", info.rank, info.world_size, backend, info.launcher
        )
    return info, device


def shutdown() -> None:
    """Leave the process group cleanly.

    ``gc.collect()`` first, so objects held only by reference cycles (FSDP2 state, groups) are
    freed now rather than during interpreter finalization. It does not stop the abort at exit
    ("terminate called without an active exception"): that came from a checkpoint thread still
    freeing tensors at finalization; ``CheckpointManager.close()`` joins its threads for that.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


# --------------------------------------------------------------------------- wrapping


def parallel_mode(cfg: DistributedConfig, world_size: int) -> str:
    if cfg.parallel == "auto":
        return "fsdp" if world_size > 1 else "none"
    if cfg.parallel in ("fsdp", "ddp") and world_size == 1 and not dist.is_initialized():
        return "none"
    return cfg.parallel


def wrap_model(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """FSDP2 (one unit per block, then the root) or DDP; "none" returns the model unchanged.

    FSDP2 keeps the module tree and names as they are (it swaps classes in place), so freeze
    patterns and checkpoint keys are the same as for an unwrapped model. DDP adds a wrapper;
    :func:`unwrap` returns the inner module.
    """
    if mode == "none":
        return model
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.blocks:  # type: ignore[attr-defined]
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    raise ValueError(f"unknown parallel mode {mode!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return (
        getattr(model, "module", model)
        if type(model).__name__ == "DistributedDataParallel"
        else model
    )
