"""Small pieces the ported tests have in common (tiny models, log capture, reading a saved step)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kempnerforge.freeze import FreezeSpec, canonical_freeze_meta
from kempnerforge.model import GPT, ModelConfig

# the checkpoint package's loggers, whichever of its modules logs (records propagate up)
CHECKPOINT_LOGGER = "kempnerforge.checkpoint"
TINY = ModelConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def tiny_gpt(seed: int = 0) -> GPT:
    return GPT(TINY, seed=seed)


def lazy_adamw(model: torch.nn.Module, lr: float = 1e-3) -> torch.optim.AdamW:
    """A plain AdamW whose state appears at the first step, like the original's optimizers.

    (``kempnerforge.optim.build_optimizer`` pre-creates every state entry, which would defeat
    tests that start from an empty optimizer.)
    """
    return torch.optim.AdamW(model.parameters(), lr=lr)


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        tokens = torch.randint(0, TINY.vocab_size, (2, TINY.seq_len), generator=g)
        model(tokens).sum().backward()
        opt.step()
        opt.zero_grad()


def freeze_meta(*pairs: tuple[str, bool]) -> list[dict[str, Any]]:
    return canonical_freeze_meta([FreezeSpec(m, f) for m, f in pairs])


@contextlib.contextmanager
def captured_logs(
    name: str = CHECKPOINT_LOGGER, level: int = logging.DEBUG
) -> Iterator[list[logging.LogRecord]]:
    """Records of ``name`` (and its children) via a handler attached to it directly."""
    records: list[logging.LogRecord] = []

    class _Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    target = logging.getLogger(name)
    handler, prior = _Capture(level=level), target.level
    target.addHandler(handler)
    target.setLevel(level)
    try:
        yield records
    finally:
        target.removeHandler(handler)
        target.setLevel(prior)


def messages(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records]


def saved_train_state(step_dir: str | Path, rank: int = 0) -> dict[str, Any]:
    """The train state a save wrote: ours (``train_state/rank_XXXXX.pt``) or the original's
    (``train_state.pt``). Test-only reader of files the test itself wrote."""
    step_dir = Path(step_dir)
    ours = step_dir / "train_state" / f"rank_{rank:05d}.pt"
    path = ours if ours.is_file() else step_dir / "train_state.pt"
    return torch.load(path, weights_only=False, map_location="cpu")
