"""One training process that commits step 1, then starts saving step 2 and pauses at a named
point of the save protocol (test hook) until the test SIGKILLs it.

Usage: python ckpt_crash_worker.py OUTDIR MODE POINT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from kempnerforge.checkpoint import CheckpointManager
from kempnerforge.checkpoint.storage import PAUSE_ENV, PAUSE_MARKER_ENV
from kempnerforge.config import CheckpointConfig


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    opt.zero_grad()


def main() -> None:
    out, mode, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    model, opt = build(0)
    mgr = CheckpointManager(CheckpointConfig(dir=str(out / "ckpt"), async_mode=mode), model, opt)
    train(model, opt)
    mgr.save(1, tokens_seen=10)
    mgr.wait()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "ref1.pt")
    train(model, opt)
    os.environ[PAUSE_ENV] = f"{point}=600"
    os.environ[PAUSE_MARKER_ENV] = str(out)
    mgr.save(2, tokens_seen=20)
    mgr.wait()  # never returns: the test kills us inside the pause
    raise SystemExit("not killed")


if __name__ == "__main__":
    main()
